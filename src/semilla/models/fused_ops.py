"""The elementwise parts of a llama layer (RMSNorm, RoPE, SwiGLU) and causal attention under
CPU autocast, each an autograd function with a hand-written backward.

Autograd's graph of these small formulas is four to ten operators each way, each a pass over
memory; on a CPU, where a small model's matmuls are quick, they were about a fifth of the
default model's training step and a third of its evaluation forward. Where semilla's compiled
kernels apply (models/kernels.py: CPU, plain tensors, supported shapes) each is one pass forward
and one back; elsewhere (no compiler, a GPU, torch.compile, which fuses by itself) the same
formulas run as PyTorch operators. Both compute in float32 and give the same values up to float
rounding. Attention is the one place bfloat16 arithmetic is chosen here (see causal_attention).
(Decode steps of inference have kernels of their own: models/kernels.py.)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from semilla.models import kernels


def autocast_bfloat16(t: torch.Tensor) -> bool:
    return (
        torch.is_autocast_enabled(t.device.type) and torch.get_autocast_dtype(t.device.type) == torch.bfloat16
    )


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """w * x / rms(x) in float32, as Hugging Face's LlamaRMSNorm. Under bfloat16 autocast the
    kernel gives bfloat16: every consumer of a norm is a matmul that autocast feeds bfloat16,
    so rounding here gives it the same values one copy sooner."""
    applies = x.dtype == weight.dtype == torch.float32 and x.size(-1) % 8 == 0
    if applies and kernels.elementwise("rms_norm_forward", x, weight) is not None:
        return RMSNormKernel.apply(x.contiguous(), weight, eps)
    return RMSNormFunction.apply(x, weight, eps)


class RMSNormKernel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        y, rstd = kernels.kernel("rms_norm_forward")(x, weight, eps, autocast_bfloat16(x))
        ctx.save_for_backward(x, rstd, weight)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: torch.Tensor):
        x, rstd, weight = ctx.saved_tensors
        dx, dweight = kernels.kernel("rms_norm_backward")(dy.contiguous(), x, rstd, weight)
        return dx, dweight, None


class RMSNormFunction(torch.autograd.Function):
    """RMSNorm in PyTorch operators with a hand-written backward: half the time of autograd's
    five small ops on CPU."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.float()
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        xhat = xf * rstd
        ctx.save_for_backward(xhat, rstd, weight)
        ctx.input_dtype = x.dtype
        return weight * xhat.to(x.dtype)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        xhat, rstd, weight = ctx.saved_tensors
        dy = dy.float()
        dxhat = dy * weight.float()
        dx = rstd * (dxhat - xhat * (dxhat * xhat).mean(-1, keepdim=True))
        dw = (dy * xhat).reshape(-1, xhat.size(-1)).sum(0)
        return dx.to(ctx.input_dtype), dw.to(weight.dtype), None


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, for gate and up side by side along the last dimension (one matmul's
    output), in its dtype."""
    hidden = gate_up.size(-1) // 2
    applies = gate_up.dtype in kernels.DTYPES and hidden % 16 == 0
    if applies and kernels.elementwise("swiglu_forward", gate_up) is not None:
        return SwiGLUKernel.apply(gate_up.contiguous())
    gate, up = gate_up.split(hidden, dim=-1)
    return F.silu(gate) * up


class SwiGLUKernel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(gate_up)
        return kernels.kernel("swiglu_forward")(gate_up)

    @staticmethod
    @once_differentiable
    def backward(ctx, dh: torch.Tensor):
        (gate_up,) = ctx.saved_tensors
        return kernels.kernel("swiglu_backward")(dh.contiguous(), gate_up)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE in the rotate-half layout: x (B, T, heads, hs) with cos and sin broadcastable to it
    (the kernel takes (T, 1, hs) float32 tables, and gives float32, as x * cos does)."""
    T, hs = x.size(1), x.size(-1)
    if (
        x.dim() == 4
        and x.stride(-1) == 1
        and hs % 16 == 0
        and x.dtype in kernels.DTYPES
        and cos.shape == sin.shape == (T, 1, hs)
        and cos.dtype == sin.dtype == torch.float32
        and kernels.elementwise("rope_forward", x, cos, sin) is not None
    ):
        return RotaryKernel.apply(x, cos.contiguous(), sin.contiguous())
    if torch.is_grad_enabled() and x.requires_grad:
        return RotaryFunction.apply(x, cos, sin)
    return x * cos + rotate_half(x) * sin


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RotaryKernel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        ctx.bfloat16 = x.dtype == torch.bfloat16
        return kernels.kernel("rope_forward")(x, cos, sin)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return kernels.kernel("rope_backward")(grad.float().contiguous(), cos, sin, ctx.bfloat16), None, None


class RotaryFunction(torch.autograd.Function):
    """RoPE in PyTorch operators, with a shorter graph. rotate_half(x) * sin is x rolled by half
    a head times sin with its first half negated, and that roll is its own transpose, so the
    backward is roll(g * signed sin) + g * cos: three kernels each way, where autograd's graph of
    chunk, neg, cat, two products and a sum took about ten."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.size(-1) // 2
        signed = torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)
        ctx.save_for_backward(cos, signed)
        ctx.x_dtype = x.dtype
        return (x * cos).addcmul_(x.roll(half, -1), signed)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, signed = ctx.saved_tensors
        grad_x = (grad * signed).roll(grad.size(-1) // 2, -1).addcmul_(grad, cos)
        return grad_x.to(ctx.x_dtype), None, None


ATTENTION_MAX_T = 256  # past it PyTorch's kernel is faster (at 512: 61 ms against 76 for 8 x 4 heads)
ATTENTION_MAX_SCORES = 1 << 24  # B * heads * T * T: the probabilities kept for the backward


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor | None:
    """Causal attention of q, k, v (B, heads, T, hs) under bfloat16 autocast on a CPU: the
    probabilities from semilla's kernel, then bfloat16 matmuls; None where it does not apply: no
    kernels, grouped kv heads, T not a multiple of 16, or past ATTENTION_MAX_T or
    ATTENTION_MAX_SCORES, where PyTorch's fused kernel (whose memory grows with T, not T
    squared) is the better choice.

    PyTorch's CPU kernel for this runs in float32 (its bfloat16 backward is ~4x slower). Here
    the scores q k^T and their gradient's part dO V^T are computed in float32 by the kernels for
    the causal half only, each with its softmax (forward, backward) in the same pass, and the
    products with the probabilities are bfloat16 matmuls, as GPU kernels do."""
    B, H, T, hs = q.shape
    if (
        k.shape != q.shape
        or v.shape != q.shape
        or T % 16
        or T > ATTENTION_MAX_T
        or B * H * T * T > ATTENTION_MAX_SCORES
        or kernels.elementwise("causal_attention_probs", q, k, v) is None
    ):
        return None
    return MatmulAttention.apply(q, k, v)


class MatmulAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        B, H, T, hs = q.shape
        q3, k3 = (t.reshape(B * H, T, hs).float().contiguous() for t in (q, k))
        v3 = v.reshape(B * H, T, hs).to(torch.bfloat16).contiguous()
        scale = hs**-0.5
        with torch.autocast("cpu", enabled=False):  # the dtypes are chosen here
            probs = kernels.kernel("causal_attention_probs")(q3, k3, scale)  # (BH, T, T)
            out = torch.bmm(probs, v3)
        ctx.save_for_backward(q3.to(torch.bfloat16), k3.to(torch.bfloat16), v3, probs)
        ctx.scale, ctx.dtypes = scale, (q.dtype, k.dtype, v.dtype)
        return out.view(B, H, T, hs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor):
        q3, k3, v3, probs = ctx.saved_tensors
        B, H, T, hs = grad.shape
        g = grad.reshape(B * H, T, hs)
        with torch.autocast("cpu", enabled=False):
            dv = torch.bmm(probs.mT, g.to(torch.bfloat16))
            dscores = kernels.kernel("causal_attention_dscores")(g.float().contiguous(), v3, probs, ctx.scale)
            dq, dk = torch.bmm(dscores, k3), torch.bmm(dscores.mT, q3)
        return tuple(d.view(B, H, T, hs).to(dtype) for d, dtype in zip((dq, dk, dv), ctx.dtypes, strict=True))
