"""Training's RMSNorm, SwiGLU and RoPE (models/fused_ops.py): the compiled kernels' values
and gradients against the same formulas in PyTorch operators, float32 and bfloat16; the weight
gradient the same bit for bit on one thread or two; and a model's training step that goes
through all three kernels with the same loss and gradients as without them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from semilla.config import ModelConfig
from semilla.models import build_model, fused_ops, kernels
from semilla.models.fused_ops import rotate_half
from semilla.models.transformer import RotaryEmbedding


@pytest.fixture(scope="module", autouse=True)
def compiled():
    assert kernels.compiled() is not None, "the CPU kernels must build here (setup installs g++ and ninja)"


def forward_backward(fn, inputs: list[torch.Tensor], grad_seed: int = 1):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed)).to(out.dtype)
    out.backward(grad)
    return out, [t.grad for t in inputs]


def graph_names(t: torch.Tensor) -> set[str]:
    seen, todo = set(), [t.grad_fn]
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        todo.extend(next_fn for next_fn, _ in node.next_functions)
    return {type(node).__name__ for node in seen}


@pytest.mark.parametrize("autocast", [False, True])
def test_rms_norm_kernel_gives_the_operators_values_and_gradients(autocast) -> None:
    torch.manual_seed(0)
    x, w = torch.randn(3, 70, 64), torch.randn(64)  # 210 rows: blocks of 64 and a partial one

    def norm(fn):
        def run(x, w):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                y = fn(x, w, 1e-5)
            return y.to(torch.bfloat16) if autocast else y  # what the next matmul would read

        return run

    y, (dx, dw) = forward_backward(norm(fused_ops.rms_norm), [x, w])
    assert "RMSNormKernelBackward" in graph_names(y)
    y_ops, (dx_ops, dw_ops) = forward_backward(norm(fused_ops.RMSNormFunction.apply), [x, w])
    assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
    torch.testing.assert_close(y, y_ops, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dx, dx_ops, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dw, dw_ops, rtol=1e-5, atol=1e-4)


def test_rms_norm_weight_gradient_is_the_same_on_one_thread_or_two() -> None:
    torch.manual_seed(0)
    x, w = torch.randn(8, 100, 128), torch.randn(128)
    before = torch.get_num_threads()
    try:
        grads = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            grads.append(forward_backward(lambda x, w: fused_ops.rms_norm(x, w, 1e-5), [x, w])[1])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(grads[0][0], grads[1][0]) and torch.equal(grads[0][1], grads[1][1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_kernel_gives_silu_gate_times_up_and_its_gradient(dtype) -> None:
    torch.manual_seed(0)
    gate_up = (torch.randn(2, 33, 96) * 4).to(dtype)  # sigmoid's tails too

    def exact(gate_up):  # float64, then rounded once
        gate, up = gate_up.double().split(48, dim=-1)
        return (F.silu(gate) * up).to(dtype)

    h, (d,) = forward_backward(fused_ops.swiglu, [gate_up])
    assert "SwiGLUKernelBackward" in graph_names(h)
    h_exact, (d_exact,) = forward_backward(exact, [gate_up])
    assert h.dtype == d.dtype == dtype
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 1e-2}
    torch.testing.assert_close(h, h_exact, **tolerance)
    torch.testing.assert_close(d, d_exact, **tolerance)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_kernel_rotates_a_strided_qkv_slice_as_the_formula_does(dtype) -> None:
    torch.manual_seed(0)
    cos, sin = RotaryEmbedding(ModelConfig(n_head=4, n_embd=128, block_size=16))(torch.arange(16))
    qkv = torch.randn(2, 16, 12, 32).to(dtype)

    def ours(qkv):
        return fused_ops.rotary(qkv[:, :, :8], cos, sin)  # q and k heads, a strided view

    def exact(qkv):
        x = qkv[:, :, :8].double()
        return x * cos.double() + rotate_half(x) * sin.double()

    y, (d,) = forward_backward(ours, [qkv])
    assert "RotaryKernelBackward" in graph_names(y)
    y_exact, (d_exact,) = forward_backward(exact, [qkv])
    assert y.dtype == torch.float32 and d.dtype == dtype
    torch.testing.assert_close(y.double(), y_exact, rtol=1e-5, atol=1e-5)
    assert torch.equal(d[:, :, 8:], torch.zeros_like(d[:, :, 8:]))  # v is not rotated
    tolerance = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 1e-2}
    torch.testing.assert_close(d.double(), d_exact.double(), **tolerance)


def model_step(autocast: bool):
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=50, n_layer=2, n_head=4, n_embd=64, block_size=32))
    idx = torch.randint(0, 50, (4, 32), generator=torch.Generator().manual_seed(1))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(idx[:, :-1])
    loss = F.cross_entropy(logits.float().flatten(0, 1), idx[:, 1:].flatten())
    loss.backward()
    return logits, loss, {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("autocast", [False, True])
def test_a_llama_training_step_is_the_same_with_the_kernels_as_without(autocast, monkeypatch) -> None:
    logits, loss, grads = model_step(autocast)
    assert {"RMSNormKernelBackward", "SwiGLUKernelBackward", "RotaryKernelBackward"} <= graph_names(logits)
    monkeypatch.setattr(kernels, "elementwise", lambda *tensors: None)
    logits_ops, loss_ops, grads_ops = model_step(autocast)
    assert not {"RMSNormKernelBackward", "SwiGLUKernelBackward"} & graph_names(logits_ops)
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if not autocast else {"rtol": 2e-2, "atol": 2e-3}
    torch.testing.assert_close(loss, loss_ops, **tolerance)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, grads_ops[name], **tolerance, msg=lambda m, n=name: f"{n}: {m}")


def test_causal_attention_as_matmuls_is_sdpa_to_bfloat16_precision() -> None:
    """Under bf16 autocast: values and gradients of q, k, v against float64 SDPA, within 4x the
    error of float32 SDPA on the same bf16 v and within 2^-7 of the largest value (bf16 inputs
    to three of the matmuls, as GPU kernels have); the probabilities past the diagonal are exact
    zeros (a future key changes nothing)."""
    torch.manual_seed(0)
    B, H, T, hs = 2, 3, 48, 32
    q, k, v = (torch.randn(B, H, T, hs, dtype=torch.float64) for _ in range(3))
    grad = torch.randn(B, H, T, hs, dtype=torch.float64)

    def run(attend, q_dtype, v_dtype):
        inputs = [q.to(q_dtype), k.to(q_dtype), v.to(v_dtype)]
        inputs = [t.detach().requires_grad_() for t in inputs]
        out = attend(*inputs)
        out.backward(grad.to(out.dtype))
        return [out.double()] + [t.grad.double() for t in inputs]

    def ours(q, k, v):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fused_ops.causal_attention(q, k, v)
        assert out is not None and "MatmulAttentionBackward" in graph_names(out)
        return out

    def sdpa(q, k, v):
        return F.scaled_dot_product_attention(q, k, v.to(q.dtype), is_causal=True)

    exact = run(sdpa, torch.float64, torch.float64)
    float32 = run(sdpa, torch.float32, torch.bfloat16)
    for name, mine, reference, f32 in zip(
        ("out", "dq", "dk", "dv"), run(ours, torch.float32, torch.bfloat16), exact, float32, strict=True
    ):
        error, f32_error = (mine - reference).abs().max(), (f32 - reference).abs().max()
        assert error <= 4 * f32_error and error <= 2**-7 * reference.abs().max(), name

    future = v.float().clone()
    future[:, :, -1] += 100.0  # the last key's value: seen by the last query only
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = fused_ops.causal_attention(q.float(), k.float(), v.float())
        after = fused_ops.causal_attention(q.float(), k.float(), future)
    assert torch.equal(before[:, :, :-1], after[:, :, :-1])


def test_causal_attention_leaves_what_it_does_not_cover_to_sdpa() -> None:
    q = torch.randn(1, 2, 24, 32)  # T not a multiple of 16
    assert fused_ops.causal_attention(q, q, q) is None
    k = torch.randn(1, 1, 32, 32)  # grouped kv heads
    assert fused_ops.causal_attention(torch.randn(1, 2, 32, 32), k, k) is None
    long = torch.randn(1, 1, fused_ops.ATTENTION_MAX_T + 16, 32)  # PyTorch's kernel is faster there
    assert fused_ops.causal_attention(long, long, long) is None
    many = torch.randn(fused_ops.ATTENTION_MAX_SCORES // 256**2 + 1, 1, 256, 32)  # too many scores to keep
    assert fused_ops.causal_attention(many, many, many) is None
