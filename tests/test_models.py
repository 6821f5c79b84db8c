"""Models: preset sizes, Hugging Face names, KV cache == full forward, per-row positions."""

from __future__ import annotations

import pytest
import torch

from semilla.config import ModelConfig, preset, replace
from semilla.info import describe
from semilla.models import build_model, count_parameters, model_on_meta

VOCAB = 50


def tiny(**changes) -> ModelConfig:
    return replace(preset("tiny"), vocab_size=VOCAB, block_size=32, **changes)


VARIANTS = {
    "llama": tiny(),
    "gpt2": tiny(norm="layernorm", pos="learned", mlp="gelu", bias=True),
    "sinusoidal-relu": tiny(norm="layernorm", pos="sinusoidal", mlp="relu", bias=True),
    "relu2": tiny(mlp="relu2"),
    "gqa": tiny(n_head=4, n_kv_head=1),
    "tied": tiny(tie_embeddings=True),
}


def make(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(cfg).eval()


# --- sizes ------------------------------------------------------------------------------


def test_datashark_10m_has_exactly_10_052_480_parameters() -> None:
    cfg = preset("datashark-10m")
    assert (cfg.family, cfg.vocab_size, cfg.block_size) == ("gpt2", 38, 512)
    assert count_parameters(model_on_meta(cfg)) == 10_052_480
    assert describe("datashark-10m")["parameters"] == 10_052_480


def test_robo_poet_lstm_parameters() -> None:
    # Keras counts 4,769,552; PyTorch's second LSTM bias vector adds 4 * 256 per layer
    assert count_parameters(model_on_meta(preset("robo-poet-lstm"))) == 4_769_552 + 2 * 1024


def test_thau_age_15_builds_on_meta_without_allocating() -> None:
    model = model_on_meta(preset("thau-age-15"))
    assert all(p.is_meta for p in model.parameters())
    n = count_parameters(model)
    assert 2.0e9 < n < 2.1e9 and round(n / 1e9, 2) == 2.06
    report = describe("thau-age-15")
    assert report["parameters"] == n and report["context"] == 4096
    assert report["forward_flops_per_token"] > 2 * n


@pytest.mark.parametrize("name", ["thau-age-0", "thau-age-1", "thau-age-3", "thau-age-6", "thau-age-12"])
def test_thau_ages_report_true_counts(name: str) -> None:
    cfg = preset(name)
    n = count_parameters(model_on_meta(cfg))
    per_layer = 4 * cfg.n_embd**2 + 3 * cfg.n_embd * cfg.ffn_size + 2 * cfg.n_embd
    assert n == 2 * cfg.vocab_size * cfg.n_embd + cfg.n_layer * per_layer + cfg.n_embd


def test_llama_family_uses_hugging_face_names() -> None:
    names = set(make(tiny()).state_dict())
    for expected in (
        "model.embed_tokens.weight",
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.self_attn.k_proj.weight",
        "model.layers.0.self_attn.v_proj.weight",
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.mlp.gate_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
        "model.layers.0.mlp.down_proj.weight",
        "model.layers.0.input_layernorm.weight",
        "model.layers.0.post_attention_layernorm.weight",
        "model.norm.weight",
        "lm_head.weight",
    ):
        assert expected in names


def test_tied_embeddings_share_one_tensor() -> None:
    model = make(VARIANTS["tied"])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert count_parameters(model) == count_parameters(make(tiny())) - VOCAB * 32


def test_context_overflow_is_a_clear_error() -> None:
    model = make(tiny())
    with pytest.raises(ValueError, match="context"):
        model(torch.zeros(1, 33, dtype=torch.long))


# --- KV cache ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(VARIANTS))
def test_kv_cache_forward_equals_full_forward(name: str) -> None:
    model = make(VARIANTS[name])
    idx = torch.randint(0, VOCAB, (2, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(2, 20)
        prefill = model(idx[:, :7], torch.arange(7), cache)  # prompt in one call
        steps = [model(idx[:, p : p + 1], torch.tensor([p]), cache) for p in range(7, 20)]
    cached = torch.cat([prefill, *steps], dim=1)
    torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-5)


def test_lstm_state_continues_like_a_full_forward() -> None:
    model = make(replace(preset("robo-poet-lstm"), vocab_size=VOCAB, n_embd=16, lstm_hidden=24))
    idx = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(idx)
        state = model.new_cache(2)
        parts = [model(idx[:, :5], cache=state)] + [
            model(idx[:, p : p + 1], cache=state) for p in range(5, 12)
        ]
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gpt2", "sinusoidal-relu", "gqa"])
def test_right_padded_rows_with_own_positions_equal_each_row_alone(name: str) -> None:
    """Two prompts of different lengths in one batch, right-padded, then decoded per row."""
    model = make(VARIANTS[name])
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(4, VOCAB, (n,), generator=gen) for n in (5, 9)]
    new_tokens = torch.randint(4, VOCAB, (2, 4), generator=gen)  # fed one per step
    lengths = torch.tensor([len(p) for p in prompts])
    batch = torch.zeros(2, 9, dtype=torch.long)  # pad id 0 on the right
    for row, p in enumerate(prompts):
        batch[row, : len(p)] = p
    with torch.no_grad():
        cache = model.new_cache(2, 16)
        prefill = model(batch, torch.arange(9).expand(2, 9), cache)
        outputs = [prefill[torch.arange(2), lengths - 1]]  # each row's last real token
        for step in range(4):
            positions = (lengths + step)[:, None]  # (B, 1): every row at its own position
            logits = model(new_tokens[:, step : step + 1], positions, cache)
            outputs.append(logits[:, 0])
        batched = torch.stack(outputs, dim=1)  # (B, 5, vocab)
        for row, p in enumerate(prompts):
            alone = model(torch.cat([p, new_tokens[row]])[None])[0, len(p) - 1 :]
            torch.testing.assert_close(batched[row], alone, rtol=1e-4, atol=1e-5)
            prefix = prefill[row, : len(p)]
            torch.testing.assert_close(prefix, model(p[None])[0], rtol=1e-4, atol=1e-5)


def test_training_mode_with_dropout_is_stochastic_and_eval_is_not() -> None:
    model = make(tiny(dropout=0.5)).train()
    idx = torch.randint(0, VOCAB, (1, 8))
    assert not torch.equal(model(idx), model(idx))
    model.eval()
    assert torch.equal(model(idx), model(idx))


@pytest.mark.parametrize("mlp", ["swiglu", "gelu"])
def test_inference_reuses_stacked_weights_until_a_weight_changes(mlp: str) -> None:
    """Under no_grad the fused q/k/v (and gate/up) weights are cached; an optimizer step or a
    load must still be seen, so no_grad logits always equal the grad-enabled forward's."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16, mlp=mlp))
    idx = torch.randint(0, 50, (2, 10))
    with torch.no_grad():
        before = model(idx)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(idx).logsumexp(-1).mean().backward()
    optimizer.step()
    with torch.no_grad():
        after_step = model(idx)
    assert not torch.allclose(before, after_step)
    torch.testing.assert_close(after_step, model(idx).detach(), rtol=0, atol=1e-6)
    fresh = build_model(model.config)
    model.load_state_dict(fresh.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(idx), fresh(idx), rtol=0, atol=1e-6)


def test_single_row_inference_sees_weights_changed_in_place() -> None:
    """One row runs through the few-rows kernel's packed copy of the weights: an optimizer
    step or a load must repack it, as it does the stacked weights of more rows."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16)).eval()
    idx = torch.randint(0, 50, (1, 1))
    with torch.no_grad():
        before = model(idx)
    model(torch.randint(0, 50, (2, 10))).logsumexp(-1).mean().backward()
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    with torch.no_grad():
        after_step = model(idx)
    assert not torch.allclose(before, after_step)
    torch.testing.assert_close(after_step, model(idx).detach(), rtol=0, atol=1e-6)  # autograd's path
    with torch.no_grad():
        fresh = build_model(model.config).eval()
        model.load_state_dict(fresh.state_dict())
        torch.testing.assert_close(model(idx), fresh(idx), rtol=0, atol=0)


def test_fused_adamw_updates_are_seen_by_the_next_evaluation() -> None:
    """Fused AdamW changes weights without bumping their versions: a training loop's
    train() / eval() switch is what refreshes the stacked weights."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=16))
    idx = torch.randint(0, 50, (2, 10))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1, fused=True)
    for _ in range(3):
        model.train()
        model(idx).logsumexp(-1).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        model.eval()
        with torch.no_grad():
            cached = model(idx)
        # stale weights would be off by ~0.1; inference kernels sum in another order (~1e-6)
        torch.testing.assert_close(cached, model(idx).detach(), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ["llama", "gpt2", "gqa", "tied"])
def test_a_bfloat16_copy_follows_the_float32_logits_with_and_without_the_cache(name: str) -> None:
    """load(dtype="bfloat16") casts a model after its float32 weights were cached (and, on CPUs
    with native bf16, prepacked for oneDNN): the cached weights must follow the cast, and the
    logits stay within bfloat16 rounding of float32's, whole-sequence and token by token."""
    model = make(VARIANTS[name])
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.3)  # peaked logits: a wrong kernel changes them, not just noise
    idx = torch.randint(0, VOCAB, (3, 12))
    with torch.no_grad():
        exact = model(idx)
        model.to(torch.bfloat16)
        full = model(idx)
        cache = model.new_cache(3)
        stepped = torch.cat([model(idx[:, t : t + 1], torch.tensor([t]), cache) for t in range(12)], dim=1)
    assert full.dtype == stepped.dtype == torch.bfloat16
    scale = exact.abs().max()
    for got in (full, stepped):
        error = (got.float() - exact).abs().max()
        assert error < 0.08 * scale, (name, float(error), float(scale))
    assert (full.float().argmax(-1) == exact.argmax(-1)).float().mean() > 0.9


@pytest.mark.parametrize("name", ["llama", "gpt2", "relu2"])
def test_prepacked_float32_weights_give_the_plain_matmuls_logits(name: str, monkeypatch) -> None:
    """Off Intel CPUs inference runs float32 weights through oneDNN, prepacked (models.transformer.
    prepacks); forced on or off here, so both paths are checked on any x86 machine."""
    from semilla.models import transformer

    model = make(VARIANTS[name])
    idx = torch.randint(0, VOCAB, (3, 12))
    logits = {}
    for prepack in (False, True):
        monkeypatch.setattr(transformer, "FLOAT32_PREPACK", prepack)
        model.train().eval()  # forget the weights prepared under the other setting
        with torch.no_grad():
            logits[prepack] = model(idx)
        packed = [fused.prepared[2] for fused in (model.head, model.model.layers[0].mlp.up)]
        assert packed == [prepack and transformer.ONEDNN] * 2  # the path asked for was taken
    torch.testing.assert_close(logits[True], logits[False], rtol=1e-5, atol=1e-5)


def test_inference_under_cpu_autocast_follows_the_float32_logits() -> None:
    """Evaluation during `train --dtype bfloat16` runs without grad inside CPU autocast: the
    matmuls must take autocast's dtypes, not the float32 weights prepared for plain inference."""
    model = make(VARIANTS["llama"])
    idx = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        exact = model(idx)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mixed = model(idx)
    assert (mixed.float() - exact).abs().max() < 0.05 * exact.abs().max()


def test_training_attention_under_cpu_autocast_runs_in_float32() -> None:
    """A llama layer under bfloat16 autocast (RoPE leaves q and k in float32, v in bfloat16),
    where the matmul attention does not apply (here 20 tokens, not a multiple of 16): attention
    runs in float32 (the CPU's bfloat16 SDPA backward is ~4x slower), so its output and the
    gradients of q, k, v equal float32 SDPA's on the same inputs."""
    from semilla.models import transformer

    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 20, 8, requires_grad=True), torch.randn(2, 4, 20, 8, requires_grad=True)
    v = torch.randn(2, 4, 20, 8).bfloat16().requires_grad_()
    out_grad = torch.randn(2, 4, 20, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = transformer.causal_attention(q, k, v, 0.0, False)
    exact = torch.nn.functional.scaled_dot_product_attention(q, k, v.float(), is_causal=True)
    assert mixed.dtype == torch.bfloat16
    torch.testing.assert_close(mixed, exact.bfloat16(), rtol=0, atol=0)
    grads = torch.autograd.grad(mixed.float(), (q, k, v), out_grad)
    exact_grads = torch.autograd.grad(exact, (q, k, v), out_grad)
    for ours, reference in zip(grads, exact_grads, strict=True):
        torch.testing.assert_close(ours.float(), reference.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_training_rope_has_the_plain_formula_s_values_and_gradients(dtype) -> None:
    """RotaryFunction (training's RoPE, a roll with a signed sin) against rotate-half RoPE left
    to autograd, on q and k heads of a strided qkv view, float64 and bfloat16 (float32 out)."""
    from semilla.models.fused_ops import RotaryFunction, rotate_half
    from semilla.models.transformer import RotaryEmbedding

    torch.manual_seed(0)
    cos, sin = RotaryEmbedding(ModelConfig(n_head=4, n_embd=64, block_size=16))(torch.arange(16))
    cos, sin = cos.to(torch.float64), sin.to(torch.float64)
    if dtype == torch.bfloat16:
        cos, sin = cos.float(), sin.float()
    qkv = torch.randn(2, 16, 12, 16, dtype=dtype, requires_grad=True)
    x = qkv[:, :, :8]  # q and k, as the attention layer rotates them
    grad = torch.randn(2, 16, 8, 16, dtype=cos.dtype)
    ours = RotaryFunction.apply(x, cos, sin)
    plain = x * cos + rotate_half(x) * sin
    torch.testing.assert_close(ours, plain)
    (ours_grad,) = torch.autograd.grad(ours, qkv, grad)
    (plain_grad,) = torch.autograd.grad(plain, qkv, grad)
    assert ours_grad.dtype == dtype
    if dtype == torch.bfloat16:  # one rounding of the summed gradient, not one per term: closer
        wide = x.detach().double().requires_grad_()  # to float64's answer
        exact = torch.autograd.grad(
            wide * cos.double() + rotate_half(wide) * sin.double(), wide, grad.double()
        )[0]
        ours_error = (ours_grad[:, :, :8].double() - exact).abs().max()
        assert ours_error <= (plain_grad[:, :, :8].double() - exact).abs().max()
        assert ours_error <= 2**-8 * exact.abs().max()
    else:
        torch.testing.assert_close(ours_grad, plain_grad)
        assert torch.autograd.gradcheck(
            lambda t: RotaryFunction.apply(t, cos, sin), (x.detach().requires_grad_(),)
        )


def test_a_model_used_for_inference_still_deep_copies_and_pickles(tmp_path) -> None:
    import copy

    model = make(VARIANTS["gpt2"])
    idx = torch.randint(0, VOCAB, (2, 10))
    with torch.no_grad():
        expected = model(idx)  # prepares (and on x86 prepacks) every weight
        twin = copy.deepcopy(model)
        torch.save(model, tmp_path / "model.pt")
        loaded = torch.load(tmp_path / "model.pt", weights_only=False)
        torch.testing.assert_close(twin(idx), expected, rtol=0, atol=0)
        torch.testing.assert_close(loaded(idx), expected, rtol=0, atol=0)


def test_forward_hooks_on_the_linear_layers_still_fire() -> None:
    model = make(VARIANTS["llama"])
    seen = []
    for name in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj"):
        model.model.layers[0].get_submodule(name).register_forward_hook(
            lambda m, i, o, n=name: seen.append(n)
        )
    model.lm_head.register_forward_hook(lambda m, i, o: seen.append("lm_head"))
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (1, 5)))
    assert sorted(seen) == ["lm_head", "mlp.down_proj", "self_attn.o_proj", "self_attn.q_proj"]


def test_eval_on_a_model_already_in_eval_keeps_the_prepared_weights() -> None:
    """generate() calls model.eval() every time; repacking every weight on each call would
    cost more than a short generation."""
    model = make(VARIANTS["llama"])
    with torch.no_grad():
        model(torch.randint(0, VOCAB, (1, 5)))
        prepared = model.head.prepared
        model.eval()
        model(torch.randint(0, VOCAB, (1, 5)))
    assert prepared is not None and model.head.prepared is prepared
    model.train()
    assert model.head.prepared is None  # a real switch forgets (fused optimizers, see FusedLinear)
