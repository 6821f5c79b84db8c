"""The compiled CPU kernels (models/cpu_kernels.cpp) against PyTorch's own operators.

Each kernel must give what the operators it replaces give: decode attention (with RoPE, GQA,
rows at different positions, bf16), the few-rows matmul, RMSNorm; and a model must generate
the same tokens with the kernels as without them. The build itself: it happens here (the CI
machine has a compiler), a broken source falls back with one warning, SEMILLA_KERNELS=0 skips it.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from generation_helpers import FAMILIES, char_tokenizer, tiny_model

from semilla.config import GenerateConfig, ModelConfig
from semilla.generate import beam_search, generate
from semilla.models import build_model, kernels
from semilla.models.transformer import RotaryEmbedding, apply_rope, cached_attention


@pytest.fixture(scope="module")
def compiled():
    module = kernels.compiled()
    assert module is not None, "the CPU kernels must build here (setup installs g++ and ninja)"
    return module


@pytest.fixture
def two_threads():
    """The kernels split rows over PyTorch's threads; the suite runs on one (conftest)."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def reference_decode(q, k, v, k_cache, v_cache, slots, cos=None, sin=None):
    """What the model does without the kernel: rotate, write the slots, masked attention."""
    if cos is not None:
        q, k = apply_rope(q, cos[:, None], sin[:, None]), apply_rope(k, cos[:, None], sin[:, None])
    rows = torch.arange(q.size(0))
    k_cache[rows, :, slots] = k
    v_cache[rows, :, slots] = v
    length = int(slots.max()) + 1
    visible = (torch.arange(length)[None, :] <= slots[:, None])[:, None, :]  # (B, 1, S)
    y = cached_attention(
        q[:, :, None].float(),
        k_cache[:, :, :length].float(),
        v_cache[:, :, :length].float(),
        visible,
    )
    return y[:, :, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize(("n_head", "n_kv_head", "head_dim"), [(4, 4, 16), (6, 2, 40), (2, 1, 64)])
def test_decode_attention_matches_masked_attention(
    compiled, two_threads, dtype, rope, n_head, n_kv_head, head_dim
):
    torch.manual_seed(0)
    B, S = 5, 200  # long enough that two threads split the (row, head) pairs
    slots = torch.tensor([0, 3, 199, 111, 111])  # a fresh row, short and long rows, a tie
    q = torch.randn(B, n_head, head_dim, dtype=dtype)
    k = torch.randn(B, n_kv_head, head_dim, dtype=dtype)
    v = torch.randn(B, n_kv_head, head_dim, dtype=dtype)
    cache_k = torch.randn(B, n_kv_head, S, head_dim, dtype=dtype)
    cache_v = torch.randn(B, n_kv_head, S, head_dim, dtype=dtype)
    cos = sin = None
    if rope:
        cfg = ModelConfig(vocab_size=8, n_head=n_head, n_embd=n_head * head_dim, block_size=S)
        table = RotaryEmbedding(cfg)
        cos, sin = table.cos[slots].to(dtype), table.sin[slots].to(dtype)
    ref_k, ref_v = cache_k.clone(), cache_v.clone()
    expected = reference_decode(q, k, v, ref_k, ref_v, slots, cos, sin)
    got = compiled.decode_attention(q, k, v, cache_k, cache_v, slots, cos, sin)
    tol = dict(rtol=0, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.float(), expected, **tol)
    torch.testing.assert_close(cache_k, ref_k, **tol)  # rotated keys written to their slots
    torch.testing.assert_close(cache_v, ref_v, rtol=0, atol=0)


def test_decode_attention_reads_strided_views_and_cache_rows(compiled) -> None:
    """The model passes q, k, v as views of one qkv matmul and a row slice of the serving cache."""
    torch.manual_seed(1)
    qkv = torch.randn(3, 8, 16)  # (B, nh + 2 nkv, hs) with nh = 4, nkv = 2
    full_k, full_v = torch.randn(6, 2, 10, 16), torch.randn(6, 2, 10, 16)
    k_cache, v_cache = full_k[2:5], full_v[2:5]  # rows 2..4 of a 6-row cache
    slots = torch.tensor([4, 9, 0])
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    expected = reference_decode(qkv[:, :4], qkv[:, 4:6], qkv[:, 6:], ref_k, ref_v, slots)
    got = compiled.decode_attention(qkv[:, :4], qkv[:, 4:6], qkv[:, 6:], k_cache, v_cache, slots, None, None)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(full_k[2:5], ref_k, rtol=0, atol=0)


def test_decode_attention_refuses_what_it_cannot_do(compiled) -> None:
    q, kv = torch.randn(1, 2, 16), torch.randn(1, 2, 16)
    cache = torch.zeros(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match="slot out of range"):
        compiled.decode_attention(q, kv, kv, cache, cache.clone(), torch.tensor([8]), None, None)
    with pytest.raises(RuntimeError, match="multiple of 8"):
        compiled.decode_attention(q[..., :12], kv[..., :12], kv[..., :12], cache[..., :12], cache[..., :12], torch.tensor([0]), None, None)  # fmt: skip
    with pytest.raises(RuntimeError, match="dtype mismatch"):
        compiled.decode_attention(q, kv, kv, cache.double(), cache.double(), torch.tensor([0]), None, None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_linear_rows_matches_f_linear_side_by_side(compiled, two_threads, dtype, rows) -> None:
    torch.manual_seed(2)
    x = torch.randn(rows, 1, 1024, dtype=dtype)  # K = 1024: tasks of 64 rows, split over both threads
    weight = torch.randn(203, 1024, dtype=dtype)  # not a multiple of 4 rows: 3 left unpacked
    bias = torch.randn(203, dtype=dtype)
    expected = F.linear(x.float(), weight.float(), bias.float())
    got = compiled.linear_rows(x, kernels.pack_rows(weight), bias)
    assert got.shape == (rows, 1, 203) and got.dtype == dtype
    tol = dict(rtol=1e-5, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=0.5)
    torch.testing.assert_close(got.float(), expected, **tol)


def test_linear_rows_refuses_what_it_cannot_do(compiled) -> None:
    with pytest.raises(RuntimeError, match="1 to 4 rows"):
        compiled.linear_rows(torch.randn(5, 16), torch.randn(4, 16), None)
    with pytest.raises(RuntimeError, match="multiple of 16"):
        compiled.linear_rows(torch.randn(1, 12), torch.randn(4, 12), None)
    with pytest.raises(RuntimeError, match=r"\(N, K\)"):
        compiled.linear_rows(torch.randn(1, 16), torch.randn(16, 4).t(), None)
    with pytest.raises(RuntimeError, match=r"\(N,\)"):
        compiled.linear_rows(torch.randn(1, 16), torch.randn(4, 16), torch.randn(5))
    assert kernels.linear_rows(torch.randn(5, 16), [torch.randn(4, 16)]) is None  # the model's guard
    assert kernels.linear_rows(torch.randn(1, 16, requires_grad=True), [torch.randn(4, 16)]) is None


def test_bfloat16_outputs_are_rounded_to_nearest(compiled) -> None:
    """Each output is its float32 sum rounded once to nearest-even (truncation would miss ~half)."""
    torch.manual_seed(6)
    x = torch.randn(1, 512).bfloat16()
    w = torch.randn(300, 512).bfloat16()
    expected = (x.double() @ w.double().t()).to(torch.bfloat16)
    got = compiled.linear_rows(x, kernels.pack_rows(w), None)
    assert (got == expected).float().mean() > 0.97  # the rest: float32 sums a hair off a tie


def test_rms_norm_matches_pytorch(compiled, two_threads) -> None:
    torch.manual_seed(3)
    x, w = torch.randn(3, 700, 40) * 3, torch.randn(40)  # 2,100 rows: split over both threads
    torch.testing.assert_close(
        compiled.rms_norm(x, w, 1e-5), F.rms_norm(x, (40,), w, 1e-5), rtol=0, atol=1e-5
    )


def without_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kernels, "compiled", lambda: None)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gqa", "sinusoidal"])
def test_generation_is_the_same_with_and_without_kernels(compiled, family, monkeypatch) -> None:
    """Greedy tokens and log-probabilities of 1 row (the few-rows matmul), 6 rows of different
    prompt lengths (decode attention with per-row positions) and of beam search."""
    tok = char_tokenizer()
    model = tiny_model(tok, seed=4, **FAMILIES[family])
    prompts = [tok.encode(p) for p in ("the quick", "En un", "t", "lugar de la Mancha", "dog", "fox. ")]
    cfg = GenerateConfig(max_new_tokens=20, temperature=0.0, logprobs=2)
    beam = GenerateConfig(max_new_tokens=12, num_beams=3)
    runs = {}
    for label in ("kernels", "pytorch"):
        if label == "pytorch":
            without_kernels(monkeypatch)
        runs[label] = generate(model, prompts[:1], cfg) + generate(model, prompts, cfg)
        runs[label + " beams"] = beam_search(model, prompts[3], beam)
    for a, b in zip(runs["kernels"], runs["pytorch"], strict=True):
        assert a.tokens == b.tokens
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    for (tokens_a, score_a), (tokens_b, score_b) in zip(
        runs["kernels beams"], runs["pytorch beams"], strict=True
    ):
        assert tokens_a == tokens_b and score_a == pytest.approx(score_b, abs=1e-4)


def test_model_forward_uses_the_kernels_only_for_inference(compiled, monkeypatch) -> None:
    """Autograd (training) reaches only the elementwise kernels (models/fused_ops.py), forward
    and backward, and so does autocast inference, forward only; no_grad decode steps outside
    autocast reach the inference kernels."""
    calls = []
    module = kernels.compiled()

    class Spy:
        def __getattr__(self, name):
            def call(*args):
                calls.append(name)
                return getattr(module, name)(*args)

            return call

    monkeypatch.setattr(kernels, "compiled", lambda: Spy())
    torch.manual_seed(5)
    model = build_model(ModelConfig(vocab_size=20, n_layer=1, n_head=2, n_embd=32, block_size=16))
    idx = torch.randint(0, 20, (1, 1))
    cache = model.new_cache(1)
    model.train()
    model(torch.randint(0, 20, (1, 4))).sum().backward()  # 4 rows: the few-rows matmul's size
    elementwise = {f"{op}_{way}" for op in ("rms_norm", "swiglu", "rope") for way in ("forward", "backward")}
    assert set(calls) == elementwise
    calls.clear()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        model.eval()(idx, torch.tensor([[0]]), model.new_cache(1))
    assert set(calls) == {"rms_norm_forward", "swiglu_forward"}  # RoPE of a cache step: PyTorch's
    calls.clear()
    with torch.no_grad():
        model(idx, torch.tensor([[0]]), cache)
    assert set(calls) == {"decode_layer", "linear_rows", "rms_norm"}  # the layer's, the head's


def test_a_broken_build_falls_back_with_one_warning(tmp_path, monkeypatch, caplog) -> None:
    broken = tmp_path / "cpu_kernels.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(kernels, "SOURCE", broken)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    kernels.compiled.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="semilla.models.kernels"):
            assert kernels.compiled() is None
            assert kernels.decode_attention(torch.zeros(1, 1, 4, 16), 16, torch.zeros(1, 1)) is None
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert warnings == [
            "CPU kernels not built (the C++ compiler failed on cpu_kernels.cpp); using PyTorch's operators"
        ]
        assert "\n" not in warnings[0]
    finally:
        kernels.compiled.cache_clear()


def test_semilla_kernels_0_turns_them_off(monkeypatch) -> None:
    monkeypatch.setenv("SEMILLA_KERNELS", "0")
    kernels.compiled.cache_clear()
    try:
        assert kernels.compiled() is None
        with torch.no_grad():
            assert kernels.rms_norm(torch.zeros(2, 16), torch.ones(16)) is None
    finally:
        kernels.compiled.cache_clear()


def test_a_lock_left_by_a_killed_build_does_not_hang_the_next() -> None:
    """PyTorch waits for its own `lock` file without a timeout; one a killed build left behind,
    however fresh, is removed under semilla's lock instead of waited for."""
    kernels.compiled.cache_clear()
    directory = kernels.cache_dir() / kernels.build_name()
    directory.mkdir(parents=True, exist_ok=True)
    lock = directory / "lock"
    lock.touch()
    try:
        assert kernels.compiled() is not None
        assert not lock.exists()
    finally:
        lock.unlink(missing_ok=True)
        kernels.compiled.cache_clear()


HOLD_LOCK = """
import sys, time
from pathlib import Path
from semilla.models.kernels import build_lock
with build_lock(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(60)
"""


def hold_build_lock(directory: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(directory)], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_build_lock_dies_with_its_holder(tmp_path: Path) -> None:
    """kill -9 of a build releases its lock at once: the next build does not wait 600 s."""
    holder = hold_build_lock(tmp_path)
    holder.kill()
    holder.wait()
    start = time.monotonic()
    with kernels.build_lock(tmp_path):
        assert (tmp_path / "build.lock").read_text() == str(os.getpid())
    assert time.monotonic() - start < 5


def test_waiting_for_a_build_names_the_pid_that_holds_it(tmp_path: Path, caplog) -> None:
    holder = hold_build_lock(tmp_path)
    try:
        threading.Timer(1.0, holder.kill).start()
        with caplog.at_level(logging.INFO, logger="semilla.models.kernels"), kernels.build_lock(tmp_path):
            pass
    finally:
        holder.kill()
        holder.wait()
    assert f"waiting for the CPU kernel build held by PID {holder.pid}" in caplog.text


def test_every_clone_compiles_the_same_source_path(monkeypatch, tmp_path: Path) -> None:
    """ninja keys a build on the source's path: each clone compiling its own copy rebuilt the
    kernels in turn. The build directory, named by the source's content, holds the copy."""
    clone = tmp_path / "clone" / "cpu_kernels.cpp"
    clone.parent.mkdir()
    clone.write_text(kernels.SOURCE.read_text())
    names = {kernels.build_name()}
    monkeypatch.setattr(kernels, "SOURCE", clone)
    names.add(kernels.build_name())
    assert len(names) == 1
    kernels.compiled.cache_clear()
    try:
        assert kernels.compiled() is not None
        build = kernels.cache_dir() / kernels.build_name()
        assert "clone" not in (build / "build.ninja").read_text()
        assert str(build / "cpu_kernels.cpp") in (build / "build.ninja").read_text()
    finally:
        kernels.compiled.cache_clear()


def test_positions_broadcast_over_the_batch(compiled, monkeypatch) -> None:
    """One row of positions (1, 1) for B rows decoding at the same place, as without kernels."""
    torch.manual_seed(7)
    model = build_model(ModelConfig(vocab_size=20, n_layer=2, n_head=2, n_embd=32, block_size=16)).eval()
    prompt, step = torch.randint(0, 20, (3, 4)), torch.randint(0, 20, (3, 1))
    outputs = []
    for use_kernels in (True, False):
        if not use_kernels:
            without_kernels(monkeypatch)
        with torch.no_grad():
            cache = model.new_cache(3)
            model(prompt, torch.arange(4)[None], cache)
            outputs.append(model(step, torch.tensor([[4]]), cache))
    torch.testing.assert_close(outputs[0], outputs[1], rtol=0, atol=1e-5)


@pytest.mark.filterwarnings("ignore:There is a performance drop:UserWarning")  # vmap over SDPA
def test_vmap_and_tensor_subclasses_take_pytorchs_path(compiled) -> None:
    """torch.func wrappers and tensor subclasses have no memory a kernel could read."""
    from torch.testing._internal.two_tensor import TwoTensor

    torch.manual_seed(8)
    model = build_model(ModelConfig(vocab_size=20, n_layer=1, n_head=2, n_embd=32, block_size=16)).eval()
    idx = torch.randint(0, 20, (3, 4))
    with torch.no_grad():
        expected = model(idx)
        mapped = torch.func.vmap(lambda row: model(row[None])[0])(idx)
        torch.testing.assert_close(mapped, expected, rtol=0, atol=1e-5)
        assert kernels.rms_norm(TwoTensor(torch.zeros(1, 16), torch.zeros(1, 16)), torch.ones(16)) is None
        expanded = torch.zeros(1, 2, 8, 16).expand(3, -1, -1, -1)
        assert kernels.decode_attention(expanded, 16, torch.zeros(3, 1)) is None
        sliced = torch.zeros(3, 2, 8, 16)[:, :, :4]  # not (B, nkv, S, hs) past the batch dimension
        assert kernels.decode_attention(sliced, 16, torch.zeros(3, 1)) is None


def test_loading_a_model_builds_the_kernels_so_generation_timings_exclude_the_build(tiny_run) -> None:
    """`semilla generate` printed '20 tokens in 30.69 s' when the first decode step built them."""
    from semilla.api import load

    kernels.compiled.cache_clear()
    try:
        load(str(tiny_run), device="cpu")
        assert kernels.compiled.cache_info().currsize == 1  # built (or found built) while loading
    finally:
        kernels.compiled.cache_clear()


@pytest.mark.parametrize("extra", [{}, dict(n_kv_head=2, bias=True)])
def test_the_whole_layer_kernel_gives_the_layers_own_results(compiled, monkeypatch, extra) -> None:
    """A decode step with one decode_layer call per layer gives the logits, to the bit, of the
    same layers run operation by operation; rows at different positions, grouped kv heads and
    biases included."""
    torch.manual_seed(7)
    model = build_model(ModelConfig(vocab_size=30, n_layer=2, n_head=4, n_embd=64, block_size=32, **extra))
    model.eval()
    calls = []
    whole_layer = kernels.decode_layer

    def counted(*args):
        found = whole_layer(*args)
        calls.append(found is not None)
        return found

    prompts = torch.randint(0, 30, (2, 6))

    def decode() -> torch.Tensor:
        cache = model.new_cache(2)
        with torch.no_grad():
            model(prompts, torch.arange(6).expand(2, 6), cache)
            steps = [
                model(torch.tensor([[t], [t + 1]]), torch.tensor([[6 + i], [3 + i]]), cache)
                for i, t in enumerate(range(5, 15))
            ]
        return torch.cat(steps, 1)

    monkeypatch.setattr(kernels, "decode_layer", counted)
    fused = decode()
    assert calls and all(calls)  # every layer of every step went through the whole-layer kernel
    monkeypatch.setattr(kernels, "decode_layer", lambda *args: None)
    torch.testing.assert_close(fused, decode(), rtol=0, atol=0)


def test_a_layer_the_kernel_cannot_read_runs_operation_by_operation(compiled) -> None:
    """A feed-forward width that is not a multiple of 16: the layer runs as modules (the down
    projection through PyTorch), and the decode step still equals the full forward."""
    torch.manual_seed(8)
    model = build_model(ModelConfig(vocab_size=30, n_layer=1, n_head=2, n_embd=32, block_size=16, intermediate_size=40))  # fmt: skip
    model.eval()
    idx = torch.randint(0, 30, (1, 7))
    cache = model.new_cache(1)
    with torch.no_grad():
        model(idx[:, :6], torch.arange(6)[None], cache)
        step = model(idx[:, 6:], torch.tensor([[6]]), cache)
        torch.testing.assert_close(step[:, 0], model(idx)[:, -1], rtol=1e-5, atol=1e-5)
