"""Growth: each operation alone and THAU's ages composed keep the function (logits, 64 greedy
tokens, loss); new units learn; the optimizer moments follow the same plan; grown checkpoints
export to Hugging Face and GGUF and serve; bad input is one line and exit code 2."""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from export_helpers import PROMPT, greedy, save_tiny
from helpers import assert_one_line_error, clean_env, limit_file_size, run_cli

from semilla.checkpoint import load_checkpoint, save_checkpoint
from semilla.cli import main
from semilla.config import ModelConfig
from semilla.models import Transformer, build_model
from semilla.models.grow import (
    GrowthError,
    grow_model,
    grow_optimizer_state,
    grow_tensors,
    layer_sources,
    plan_growth,
    probe_deviation,
    target_config,
)
from semilla.tokenizer import Tokenizer

VOCAB = 256
LLAMA = dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False)
GPT2 = dict(norm="layernorm", pos="learned", mlp="gelu", bias=True)


def random_model(seed: int = 0, std: float = 0.1, **shape) -> Transformer:
    """A float32 model with weights large enough for peaked logits (no greedy near-ties)."""
    values = dict(vocab_size=VOCAB, block_size=128, n_layer=2, n_head=4, n_embd=32, **LLAMA)
    torch.manual_seed(seed)
    model = build_model(ModelConfig(**{**values, **shape}))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
            elif name.endswith("weight"):  # norm gains away from 1, so their rescale is tested
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, 0.1)
    return model.eval()


def batch(seed: int = 1, rows: int = 4, length: int = 64, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randint(vocab, (rows, length + 1), generator=torch.Generator().manual_seed(seed))


def loss(model: torch.nn.Module, data: torch.Tensor) -> torch.Tensor:
    logits = model(data[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), data[:, 1:].flatten())


def assert_same_function(before: torch.nn.Module, after: torch.nn.Module) -> None:
    """Logits within 1e-5, loss on a fixed batch within 1e-6, 64 greedy tokens identical."""
    data = batch()
    with torch.no_grad():
        a, b = before(data[:, :-1]), after(data[:, :-1])
        assert (a - b).abs().max() < 1e-5, float((a - b).abs().max())
        assert abs(float(loss(before, data)) - float(loss(after, data))) < 1e-6
    prompt = data[0, :8].tolist()
    tokens = greedy(before, prompt, 64)
    assert greedy(after, prompt, 64) == tokens
    assert len(set(tokens)) > 3  # a real sequence, not one token repeated


SINGLE_OPERATIONS = {
    "width": (dict(), dict(n_embd=64)),  # heads follow at the same head size: 4 -> 8
    "mlp": (dict(), dict(intermediate_size=160)),
    "heads-gqa": (dict(n_head=4, n_kv_head=2), dict(n_embd=48, n_head=6)),  # groups of 2 -> 3
    "kv-heads": (dict(n_head=4, n_kv_head=1), dict(n_kv_head=2)),  # copies keep each head's group
    "kv-and-heads": (dict(n_head=4, n_kv_head=2), dict(n_embd=64, n_head=8, n_kv_head=8)),
    "depth-end": (dict(), dict(n_layer=4)),
    "depth-interleave": (dict(), dict(n_layer=4)),
    "depth-0": (dict(), dict(n_layer=3)),
    "depth-1": (dict(), dict(n_layer=5)),
    "context": (dict(), dict(block_size=256)),
    "tied-width": (dict(tie_embeddings=True), dict(n_embd=48)),
}


@pytest.mark.parametrize("name", SINGLE_OPERATIONS)
def test_each_llama_growth_alone_keeps_the_function(name):
    source_shape, dims = SINGLE_OPERATIONS[name]
    source = random_model(**source_shape)
    insert = name.removeprefix("depth-") if name.startswith("depth-") else "end"
    insert = int(insert) if insert.isdigit() else insert
    target = target_config(source.config, **dims)
    grown = grow_model(source, target, insert=insert, seed=3)
    for key, value in dims.items():
        assert getattr(grown.config, key) == value
    assert grown.config.norm_eps == pytest.approx(
        source.config.norm_eps * source.config.n_embd / grown.config.n_embd
    )
    assert_same_function(source, grown)


@pytest.mark.parametrize(
    "heads, grown",
    [((4, 1), (6, 3)), ((6, 2), (8, 4)), ((4, 2), (8, 8)), ((6, 3), (8, 4)), ((4, 4), (6, 6))],
    ids=lambda v: f"{v[0]}q{v[1]}kv",
)
def test_grouped_query_layouts_keep_every_head_with_its_kv_head(heads, grown):
    source = random_model(n_embd=8 * heads[0], n_head=heads[0], n_kv_head=heads[1])
    target = target_config(source.config, n_embd=8 * grown[0], n_head=grown[0], n_kv_head=grown[1])
    assert_same_function(source, grow_model(source, target, seed=7))


def test_new_blocks_go_where_insert_says():
    assert layer_sources(2, 4, "exact", "end") == [0, 1, None, None]
    assert layer_sources(2, 4, "exact", "interleave") == [0, None, 1, None]
    assert layer_sources(3, 5, "exact", 1) == [0, None, None, 1, 2]
    assert layer_sources(2, 3, "exact", 0) == [None, 0, 1]
    assert layer_sources(2, 5, "stack", "end") == [0, 1, 0, 1, 0]  # G_stack: the stack repeated
    assert layer_sources(2, 4, "stack", "interleave") == [0, 0, 1, 1]


def test_the_grown_context_runs_past_the_old_one():
    """RoPE is computed: a 127-token input runs, its first 64 positions exactly as before."""
    source = random_model(block_size=64)
    grown = grow_model(source, target_config(source.config, block_size=128))
    long = batch(length=127)[:, :-1]
    with torch.no_grad():
        assert (grown(long)[:, :64] - source(long[:, :64])).abs().max() < 1e-5


def test_thau_ages_composed_keep_the_function():
    """Ages 0 -> 1 -> 3 -> 6 (widths 256/384/512/768, layers 2/3/6/12, head size 64) scaled
    down 8x in width: 32/48/64/96 at head size 8, the presets' SwiGLU sizes, llama family."""
    ages = [(32, 2), (48, 3), (64, 6), (96, 12)]
    swiglu = {32: 128, 48: 128, 64: 192, 96: 256}  # 64 * ceil(8/3 * width / 64), as the presets
    model = random_model(n_embd=32, n_layer=2, n_head=4, intermediate_size=swiglu[32])
    source = model
    for width, layers in ages[1:]:
        target = target_config(model.config, n_embd=width, n_layer=layers, intermediate_size=swiglu[width])
        model = grow_model(model, target, insert="interleave", seed=width)
        assert model.config.n_head == width // 8
    assert model.config.norm_eps == pytest.approx(source.config.norm_eps * 32 / 96)
    assert_same_function(source, model)


def test_presets_give_the_shape_and_keep_the_vocabulary():
    source = ModelConfig(vocab_size=VOCAB, n_embd=256, n_layer=2, n_head=4, block_size=2048, **LLAMA)
    target = target_config(source, preset="thau-age-3")
    assert (target.n_embd, target.n_layer, target.n_head, target.vocab_size) == (512, 6, 8, VOCAB)
    assert target.ffn_size == 1408 and target.norm_eps == pytest.approx(source.norm_eps / 2)
    assert target_config(source, preset="thau-age-3", n_layer=8).n_layer == 8  # explicit wins


def test_gpt2_depth_mlp_and_context_are_exact():
    source = random_model(**GPT2)
    target = target_config(source.config, n_layer=4, intermediate_size=192, block_size=256)
    assert plan_growth(source.config, target).exact
    assert_same_function(source, grow_model(source, target, insert="interleave"))


def test_gpt2_width_and_heads_are_exact_with_layernorm():
    """New residual coordinates that carry the old ones' mean keep LayerNorm exact; zeros there
    (Llama's recipe) would not. The residual stream here has a clear mean (0.5)."""
    source = random_model(**GPT2)
    with torch.no_grad():
        source.model.embed_tokens.weight += 0.5
    for dims in (dict(n_embd=48), dict(n_embd=64, n_layer=3, intermediate_size=192)):
        target = target_config(source.config, **dims)
        plan = plan_growth(source.config, target)
        assert plan.exact
        grown = grow_model(source, target, insert="interleave")
        assert_same_function(source, grown)
        zero_padded = copy.deepcopy(grown)
        state = zero_padded.state_dict()
        with torch.no_grad():
            for name, m in plan.maps.items():
                if m.mean_dim is not None or name.endswith("norm.weight"):
                    state[name][m.masks()[0]] = 0.0
            magnitude = float(source(batch()[:, :-1]).abs().max())
        exact, padded = probe_deviation(source, grown), probe_deviation(source, zero_padded)
        print(
            f"gpt2 {dims}: max |logit change| / max |logit| {exact / magnitude:.1e} with the mean, "
            f"{padded / magnitude:.1e} with zero padding"
        )
        assert padded / magnitude > 1e-2


@pytest.mark.parametrize("family", [dict(n_head=4, n_kv_head=2), GPT2], ids=["llama-gqa", "gpt2"])
def test_new_units_learn(family):
    """The zeros that keep the function get gradient at the first step; the new random
    input-side weights, which read those zeros, at the second. Nothing new stays dead."""
    source = random_model(**family)
    target = target_config(source.config, n_embd=48, n_head=6, n_layer=3, intermediate_size=160)
    plan = plan_growth(source.config, target)
    grown = grow_model(source, target, seed=1).train()
    before = {k: v.clone() for k, v in grown.state_dict().items()}
    optimizer = torch.optim.AdamW(grown.parameters(), lr=1e-3, weight_decay=0.0)
    for step in range(2):
        optimizer.zero_grad()
        loss(grown, batch(seed=step, length=32)).backward()
        optimizer.step()
        if step == 0:
            after_first = {k: v.clone() for k, v in grown.state_dict().items()}
    after = grown.state_dict()
    for name, m in plan.maps.items():
        new, zero = m.masks()
        if not new.any() or name.endswith("k_proj.bias"):  # softmax ignores it in any model
            continue
        changed = before[name] != after[name]
        if name == "model.embed_tokens.weight":  # only the rows of tokens read move
            seen = batch(seed=0, length=32)[:, :-1].unique()
            changed, new, zero = changed[seen], new[seen], zero[seen]
        if name == "model.embed_positions.weight":  # only the 32 positions of the batches
            changed, new, zero = changed[:32], new[:32], zero[:32]
        assert changed[new].float().mean() > 0.99, name
        if zero.any():  # output-side zeros move at once
            moved = before[name] != after_first[name]
            if name == "model.embed_tokens.weight":
                moved = moved[seen]
            if name == "model.embed_positions.weight":
                moved = moved[:32]
            assert moved[zero].float().mean() > 0.99, name


def test_moments_follow_the_weights():
    """grow_tensors maps per-parameter tensors with the same plan: gradients of the source,
    grown, equal the grown model's own gradients at every old position (norm gains scaled)."""
    source = random_model(**LLAMA)
    target = target_config(source.config, n_embd=48, n_layer=3, intermediate_size=160, block_size=256)
    grown = grow_model(source, target, insert=1, seed=2)
    data = batch(length=32)
    grads = []
    for model in (source, grown):
        model.zero_grad()
        loss(model, data).backward()
        grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
    plan = plan_growth(source.config, target, insert=1)
    for power in (1, 2):
        grown_moments = grow_tensors(
            {k: g**power for k, g in grads[0].items()}, source.config, target, insert=1, power=power
        )
        assert set(grown_moments) == set(grads[1])
        for name, value in grown_moments.items():
            new, _ = plan.maps[name].masks()
            assert torch.all(value[new] == 0), name
            torch.testing.assert_close(value[~new], grads[1][name][~new] ** power, rtol=1e-4, atol=1e-7)


def test_adamw_state_grows_by_name_and_the_grown_run_steps_on():
    source = random_model(n_head=4, n_kv_head=2).train()
    optimizer = torch.optim.AdamW(source.parameters(), lr=1e-3)
    for step in range(2):
        optimizer.zero_grad()
        loss(source, batch(seed=step, length=16)).backward()
        optimizer.step()
    state = {name: optimizer.state[p] for name, p in source.named_parameters()}
    target = target_config(source.config, n_embd=48, n_head=6, n_layer=3)
    grown = grow_model(source, target, insert="interleave").train()
    grown_state = grow_optimizer_state(state, source.config, target, insert="interleave")
    plan = plan_growth(source.config, target, insert="interleave")
    resumed = torch.optim.AdamW(grown.parameters(), lr=1e-3)
    for name, p in grown.named_parameters():
        entry = grown_state[name]
        assert entry["exp_avg"].shape == entry["exp_avg_sq"].shape == p.shape
        assert float(entry["step"]) == 2
        new, _ = plan.maps[name].masks()
        assert not entry["exp_avg"][new].any() and not entry["exp_avg_sq"][new].any()
        resumed.state[p] = entry
    resumed.zero_grad()
    loss(grown, batch(seed=2, length=16)).backward()
    resumed.step()
    assert all(float(resumed.state[p]["step"]) == 3 for p in grown.parameters())


def test_noise_perturbs_only_the_zeros():
    source = random_model()
    target = target_config(source.config, n_embd=48, n_layer=3)
    exact, noisy = grow_model(source, target, seed=5), grow_model(source, target, seed=5, noise=1e-3)
    plan = plan_growth(source.config, target)
    for name, m in plan.maps.items():
        _, zero = m.masks()
        a, b = exact.state_dict()[name], noisy.state_dict()[name]
        assert torch.equal(a[~zero], b[~zero]), name
        assert bool((a[zero] == 0).all()) and bool((b[zero] != 0).all()), name
    assert 0 < probe_deviation(source, noisy) < 0.1


def test_stack_copies_blocks_and_their_moments():
    source = random_model()
    target = target_config(source.config, n_layer=4)
    grown = grow_model(source, target, mode="stack")
    state = grown.state_dict()
    for suffix in ("self_attn.o_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
        assert torch.equal(state[f"model.layers.2.{suffix}"], state[f"model.layers.0.{suffix}"])
    assert probe_deviation(source, grown) > 1e-2  # not function-preserving
    moments = {k: torch.rand_like(v) for k, v in source.named_parameters()}
    stacked = grow_tensors(moments, source.config, target, mode="stack")
    assert torch.equal(
        stacked["model.layers.3.mlp.up_proj.weight"], moments["model.layers.1.mlp.up_proj.weight"]
    )


def test_impossible_growth_lists_every_problem():
    source = ModelConfig(vocab_size=VOCAB, n_embd=32, n_head=4, n_kv_head=2, n_layer=2, **LLAMA)
    with pytest.raises(GrowthError) as e:
        plan_growth(source, target_config(source, n_embd=16, n_layer=1, n_head=3, n_kv_head=2))
    message = str(e.value)
    for needle in (
        "n_embd would shrink",
        "n_layer would shrink",
        "n_head would shrink",
        "divisible by n_head (3)",
    ):
        assert needle in message
    with pytest.raises(GrowthError, match="head size must stay 8"):
        plan_growth(source, target_config(source, n_embd=48, n_head=4))
    with pytest.raises(GrowthError, match=r"n_kv_head \(3\) must divide n_head \(8\)"):
        plan_growth(source, target_config(source, n_embd=64, n_kv_head=3))
    with pytest.raises(GrowthError, match="LSTM models cannot grow"):
        target_config(ModelConfig(arch="lstm", vocab_size=VOCAB), n_layer=3)
    sinusoidal = ModelConfig(vocab_size=VOCAB, norm="layernorm", pos="sinusoidal", mlp="relu", bias=True)
    with pytest.raises(GrowthError, match="only the llama and gpt2 families"):
        plan_growth(sinusoidal, target_config(sinusoidal, n_layer=5))


# --- checkpoints: exports, serving, the CLI -----------------------------------------------

GROWN_FLAGS = ["--n-embd", "48", "--n-layer", "3", "--n-kv-head", "3"]  # and a longer MLP and context
GROWN_FLAGS += ["--intermediate-size", "160", "--block-size", "256"]


SHAPES = {  # source and grown shape lines `semilla grow` prints, by family
    "llama": ("n_embd 32, n_layer 2, n_head 4, n_kv_head 2", "n_embd 48, n_layer 3, n_head 6, n_kv_head 3"),
    "gpt2": ("n_embd 32, n_layer 2, n_head 2, n_kv_head 2", "n_embd 48, n_layer 3, n_head 3, n_kv_head 3"),
}


@pytest.fixture(scope="module", params=list(SHAPES))
def grown_checkpoint(request, tmp_path_factory):
    """A tiny llama (4 query heads, 2 kv heads) or gpt2 (2 heads) grown in every dimension by
    `semilla grow`."""
    root = tmp_path_factory.mktemp(f"grown-{request.param}")
    source = save_tiny(root / "source", request.param, "char")
    proc = run_cli("grow", source, "-o", root / "grown", *GROWN_FLAGS, "--insert", "interleave")
    assert proc.returncode == 0, proc.stderr
    assert "exact" in proc.stdout and "parameters" in proc.stdout
    return source, root / "grown", proc.stdout, request.param


def test_cli_prints_shapes_and_counts(grown_checkpoint):
    source, grown, stdout, family = grown_checkpoint
    lines = stdout.splitlines()
    assert lines[0].startswith(f"source  {SHAPES[family][0]}")
    assert lines[1].startswith(f"grown   {SHAPES[family][1]}, intermediate_size 160, block_size 256")
    model, tok, config = load_checkpoint(grown)
    assert f"{sum(p.numel() for p in model.parameters()):,} parameters" in lines[1]
    assert (Path(grown) / "tokenizer.json").read_text() == (Path(source) / "tokenizer.json").read_text()
    before, _, _ = load_checkpoint(source)
    prompt = tok.encode(PROMPT)
    assert greedy(model, prompt) == greedy(before, prompt)


def test_grown_checkpoint_exports_to_transformers(grown_checkpoint, tmp_path):
    from transformers import AutoModelForCausalLM, GenerationConfig

    from semilla.export.hf import export_hf

    _, grown, _, _ = grown_checkpoint
    model, tok, _ = load_checkpoint(grown)
    hf = AutoModelForCausalLM.from_pretrained(export_hf(grown, tmp_path / "hf"), local_files_only=True).eval()
    prompt = tok.encode(PROMPT)
    with torch.no_grad():
        assert (model(torch.tensor([prompt])) - hf(torch.tensor([prompt])).logits).abs().max() < 1e-4
        no_stop = GenerationConfig(do_sample=False, max_new_tokens=64, eos_token_id=None, pad_token_id=0)
        out = hf.generate(torch.tensor([prompt]), generation_config=no_stop)
    assert out[0, len(prompt) :].tolist() == greedy(model, prompt)


def test_grown_checkpoint_exports_to_gguf(grown_checkpoint, tmp_path):
    from test_export_gguf import llama_cpp_greedy, load_gguf

    from semilla.export.gguf import export_gguf

    _, grown, _, _ = grown_checkpoint
    model, tok, _ = load_checkpoint(grown)
    llm = load_gguf(export_gguf(grown, tmp_path / "grown-f32.gguf", "f32"))
    prompt = tok.encode(PROMPT)
    assert llama_cpp_greedy(llm, prompt) == greedy(model, prompt)


def test_grown_checkpoint_serves_the_source_answers(grown_checkpoint, tmp_path):
    import openai
    from server_helpers import running_server

    import semilla
    from semilla.serve.app import create_app
    from semilla.serve.registry import load_models
    from semilla.serve.settings import ServerSettings

    source, grown, _, _ = grown_checkpoint
    messages = [{"role": "user", "content": "the quick fox"}]
    app = create_app(ServerSettings(data_dir=str(tmp_path / "data")), load_models([("grown", str(grown))]))
    with running_server(app) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        r = client.chat.completions.create(model="grown", messages=messages, max_tokens=16, temperature=0)
    assert r.usage.completion_tokens > 0
    assert r.choices[0].message.content == semilla.load(str(source)).chat(
        messages, max_new_tokens=16, temperature=0
    )


def test_python_api_grows_a_checkpoint(tmp_path):
    import semilla

    source = save_tiny(tmp_path / "source", "llama", "char")
    result = semilla.grow(str(source), str(tmp_path / "grown"), preset=None, n_layer=4, insert=0)
    assert result["exact"] and result["max_logit_change"] < 1e-5
    assert result["grown"]["parameters"] > result["source"]["parameters"]
    assert load_checkpoint(tmp_path / "grown")[0].config.n_layer == 4


def test_thau_preset_from_age_0_to_age_1(tmp_path):
    """The real shapes: a THAU age-0 model (256 wide, 2 layers, head size 64) grown by preset."""
    import semilla

    tok = Tokenizer.train_char(["abcdefghijklmnopqrstuvwxyz "])
    source = random_model(std=0.05, vocab_size=tok.vocab_size, n_embd=256, n_head=4, block_size=2048)
    save_checkpoint(tmp_path / "age0", source, tok)
    result = semilla.grow(str(tmp_path / "age0"), str(tmp_path / "age1"), preset="thau-age-1")
    grown, _, _ = load_checkpoint(tmp_path / "age1")
    assert (grown.config.n_embd, grown.config.n_layer, grown.config.n_head) == (384, 3, 6)
    assert grown.config.vocab_size == tok.vocab_size and result["exact"]
    data = batch(length=32, vocab=tok.vocab_size)
    with torch.no_grad():
        assert (source(data) - grown(data)).abs().max() < 1e-5


def test_help_says_what_is_exact():
    proc = run_cli("grow", "--help")
    text = " ".join(proc.stdout.split())
    assert proc.returncode == 0
    for needle in (
        "Exact for the llama family",
        "gpt2 family too",
        "not function-preserving",
        "--noise",
        "--insert",
    ):
        assert needle in text, needle


@pytest.mark.parametrize(
    "flags, needles",
    [
        (("--n-embd", "16"), ("n_embd would shrink from 32 to 16",)),
        (("--n-layer", "1"), ("n_layer would shrink from 2 to 1",)),
        (("--n-kv-head", "1"), ("n_kv_head would shrink from 2 to 1",)),
        (("--intermediate-size", "64"), ("intermediate_size would shrink from 128 to 64",)),
        (("--block-size", "64"), ("block_size would shrink from 128 to 64",)),
        (("--n-embd", "48", "--n-head", "5"), ("n_embd (48) must be divisible by n_head (5)",)),
        (("--n-embd", "48", "--n-head", "4"), ("head size must stay 8",)),
        (("--n-embd", "64", "--n-kv-head", "3"), ("n_kv_head (3) must divide n_head (8)",)),
        (("--insert", "7", "--n-layer", "3"), ("insert position must be in 0..2",)),
        ((), ("say what to grow to",)),
    ],
)
def test_cli_refuses_bad_shapes(tmp_path, capsys, flags, needles):
    """In process (`semilla.cli.main`): these fail before any model work."""
    source = save_tiny(tmp_path / "source", "llama", "char")
    args = ["grow", str(source), "-o", str(tmp_path / "out"), *flags]
    code = main(args)
    captured = capsys.readouterr()
    assert_one_line_error(subprocess.CompletedProcess(args, code, captured.out, captured.err), *needles)
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["source"]


def test_cli_refuses_lstm_and_int8(tmp_path, cli_in_process):
    from semilla.export.quantize import quantize_int8

    lstm = save_tiny(tmp_path / "lstm", "llama", "char", arch="lstm", lstm_hidden=16)
    assert_one_line_error(
        run_cli("grow", lstm, "-o", tmp_path / "a", "--n-layer", "3"), "LSTM", "only transformers"
    )
    int8 = quantize_int8(save_tiny(tmp_path / "float", "llama", "char"), tmp_path / "int8")
    assert_one_line_error(
        cli_in_process("grow", int8, "-o", tmp_path / "b", "--n-layer", "3"), "int8 checkpoint"
    )
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_refuses_to_overwrite_and_survives_a_full_disk(tmp_path):
    source = save_tiny(tmp_path / "source", "llama", "char")
    files = {p.name: p.read_bytes() for p in source.iterdir()}
    (tmp_path / "taken").mkdir()
    assert_one_line_error(
        run_cli("grow", source, "-o", tmp_path / "taken", "--n-layer", "3"), "already exists", "--overwrite"
    )
    size = (source / "model.safetensors").stat().st_size
    no_compiler_run = clean_env(SEMILLA_KERNELS="0")  # the kernels' build would hit the limit too
    proc = run_cli(
        "grow",
        source,
        "-o",
        tmp_path / "out",
        "--n-embd",
        "64",
        preexec_fn=limit_file_size(size + 1024),
        env=no_compiler_run,
    )
    assert_one_line_error(proc, "cannot save checkpoint")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["source", "taken"]  # no partial output
    assert {p.name: p.read_bytes() for p in source.iterdir()} == files
    proc = run_cli("grow", source, "-o", tmp_path / "taken", "--n-layer", "3", "--overwrite", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["grown"]["shape"].startswith("n_embd 32, n_layer 3")


def test_growing_twice_with_a_saved_and_loaded_checkpoint(tmp_path):
    """Grown weights survive the checkpoint round trip (eps, kv heads, sizes read back)."""
    tok = Tokenizer.train_char(["abcdefgh"])
    source = random_model(vocab_size=tok.vocab_size, n_head=4, n_kv_head=2)
    first = grow_model(source, target_config(source.config, n_embd=48, n_head=6))
    save_checkpoint(tmp_path / "ckpt", first, tok)
    loaded, _, _ = load_checkpoint(tmp_path / "ckpt")
    assert loaded.config == first.config
