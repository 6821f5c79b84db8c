"""Decoder-only transformer. Config switches give the llama family (RMSNorm, RoPE, SwiGLU)
and the gpt2 family (LayerNorm, learned positions, GELU) among others.

Parameter names equal Hugging Face's `LlamaForCausalLM` (model.layers.N.self_attn.q_proj, ...),
so a llama-family export is a save; the gpt2 family maps name by name onto `GPT2LMHeadModel`.
"""

from __future__ import annotations

import math
import platform
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from semilla.config import ModelConfig
from semilla.models import fused_ops, kernels

if TYPE_CHECKING:
    from semilla.models.adapter_bank import RowAdapters


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (  # inference outside autocast: the decode kernels' RMSNorm, or PyTorch's
            not torch.is_grad_enabled()
            and x.dtype == self.weight.dtype
            and not torch.is_autocast_enabled(x.device.type)
        ):
            kernel = kernels.rms_norm(x, self.weight)
            if kernel is not None:
                return kernel(x, self.weight, self.eps)
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)
        return fused_ops.rms_norm(x, self.weight, self.eps)


def make_norm(cfg: ModelConfig) -> nn.Module:
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.n_embd, cfg.norm_eps)
    return nn.LayerNorm(cfg.n_embd, eps=cfg.norm_eps, bias=cfg.bias)


class RotaryEmbedding(nn.Module):
    """RoPE in the rotate-half layout Hugging Face's Llama uses."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        dim = cfg.head_dim
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        t = torch.arange(cfg.block_size, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (T, hs/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (T, hs)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions (T,) or (B, T) -> cos, sin broadcastable to (B, T, heads, hs)
        return self.cos[positions].unsqueeze(-2), self.sin[positions].unsqueeze(-2)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return fused_ops.rotary(x, cos, sin)


def sinusoidal_table(n_positions: int, dim: int) -> torch.Tensor:
    """The fixed sine/cosine position encoding of 'Attention is all you need'."""
    pos = torch.arange(n_positions, dtype=torch.float32).unsqueeze(1)
    div = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32) * (-math.log(10000.0) / dim))
    table = torch.zeros(n_positions, dim)
    table[:, 0::2] = torch.sin(pos * div)
    table[:, 1::2] = torch.cos(pos * div[: dim // 2])
    return table


class KVCache:
    """Keys and values of every layer for B rows and up to `max_len` positions.

    Row b writes the keys of position p into slot p, so rows of different lengths share one
    tensor; a query at position p sees slots 0..p of its own row.
    """

    def __init__(self, cfg: ModelConfig, batch_size: int, max_len: int, device, dtype):
        shape = (batch_size, cfg.kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layer)]
        self.max_len = max_len


class CacheStep:
    """Where this forward's tokens go in the KV cache and which slots each may see: worked out
    once per forward, shared by every layer.

    positions (B, T) -> where each row's keys go; length S = furthest position + 1; visible
    (B, T, S), or None when every query sees every slot (rows decoding at the same position).
    A decode step (T = 1) on CPU runs the compiled kernel instead (`kernel`, with the slots).
    """

    def __init__(self, cfg: ModelConfig, positions: torch.Tensor, cache: KVCache, batch_size: int):
        B, T = batch_size, positions.size(-1)
        pos = positions.expand(B, T)  # (T,), (1, T) or (B, T): one row of positions per row
        self.kernel = kernels.decode_attention(cache.k[0], cfg.head_dim, positions) if T == 1 else None
        if self.kernel is not None:  # it needs no mask: each row attends up to its own slot
            self.slot = pos[:, 0].contiguous()
            return
        self.length = int(pos.max()) + 1  # slots beyond the furthest position are never visible
        if T == 1:  # decode: row b writes slot pos[b] (an indexed copy, cheaper than a scatter)
            self.rows, self.slot = torch.arange(B, device=pos.device), pos[:, 0]
        else:
            self.slots = pos[:, None, :, None].expand(B, cfg.kv_heads, T, cfg.head_dim)
        self.visible = None
        if T > 1 or bool((pos != self.length - 1).any()):
            self.visible = torch.arange(self.length, device=pos.device)[None, None, :] <= pos[:, :, None]

    def store(self, cache: torch.Tensor, new: torch.Tensor) -> None:
        """Write new keys or values (B, nkv, T, hs) into a layer's cache (B, nkv, S_max, hs)."""
        if new.size(2) == 1 and self.visible is None:  # every row at the same slot: a plain copy
            cache[:, :, self.length - 1] = new[:, :, 0]
        elif new.size(2) == 1:
            cache[self.rows, :, self.slot] = new[:, :, 0]
        else:
            cache.scatter_(2, self.slots, new)


def cached_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, visible: torch.Tensor | None
) -> torch.Tensor:
    """Attention over cache slots with an explicit mask. For the few query tokens of a decode
    step, plain matmuls are far faster on CPU than SDPA's masked kernel (7 ms -> 0.1 ms).

    q (B, nh, T, hs); k, v (B, nkv, S, hs); visible (B, T, S) or None: all -> (B, nh, T, hs)
    """
    B, nh, T, hs = q.shape
    nkv = k.size(1)
    q = q.view(B, nkv, nh // nkv, T, hs)  # query heads grouped by the kv head they share
    scores = (q @ k.unsqueeze(2).transpose(-1, -2)) / math.sqrt(hs)  # (B, nkv, g, T, S)
    if visible is not None:
        scores = scores.masked_fill(~visible[:, None, None], -math.inf)
    y = scores.softmax(-1) @ v.unsqueeze(2)  # (B, nkv, g, T, hs)
    return y.view(B, nh, T, hs)


def prepacks(weight: torch.Tensor) -> bool:
    """Whether inference runs this weight through oneDNN, prepacked once into its blocked layout.

    bfloat16 on a CPU with native bf16 (AVX512-BF16, AMX): a 32-row matmul takes ~30 us
    where float32 takes ~110 (Sapphire Rapids), 36 us where unpacked bf16 takes 46 (EPYC).
    float32 on x86 CPUs other than Intel's, where PyTorch's default float32 matmul (MKL) is
    slow: a 10M model's weights take 1.2 ms for one row instead of 2.6 on an AMD EPYC. On
    Intel MKL is faster for one row (1.9 vs 2.5 ms), so float32 stays on F.linear there.
    Figures: bench/README.md."""
    if weight.device.type != "cpu":
        return False
    if weight.dtype == torch.bfloat16:
        return BF16_KERNELS
    return weight.dtype == torch.float32 and FLOAT32_PREPACK


ONEDNN = (
    torch.backends.mkldnn.is_available()
    and platform.machine().lower() in ("x86_64", "amd64")
    and hasattr(torch.ops.mkldnn, "_linear_pointwise")  # private ops: absent, plain F.linear
)
BF16_KERNELS = ONEDNN and torch.ops.mkldnn._is_mkldnn_bf16_supported()
FLOAT32_PREPACK = ONEDNN and kernels.cpuinfo("vendor_id") not in ("GenuineIntel", "")


ACTIVATIONS = {
    "gelu_exact": F.gelu,  # nanoGPT's nn.GELU(); 3x faster than tanh on CPU
    "gelu": lambda x: F.gelu(x, approximate="tanh"),  # GPT-2's gelu_new
    "relu": F.relu,
    "relu2": lambda x: F.relu(x).square(),
}
FUSED_ACTIVATIONS = {  # oneDNN post-ops of the prepacked kernel: (attr, scalars, algorithm)
    "gelu_exact": ("gelu", [], "none"),
    "gelu": ("gelu", [], "tanh"),
    "relu": ("relu", [], ""),
}


class FusedLinear:
    """One or several of a module's nn.Linear layers applied as one matmul (weights stacked
    along outputs): q/k/v, gate/up, or a single layer.

    The layers keep their own parameters (and so Hugging Face's names); they are looked up by
    name on every call, so layers swapped for int8 ones (models/int8.py), or with hooks, are
    simply called one by one. In eval mode with no gradient recorded (generation, evaluation)
    the stacked weight is cached: for 1 to 4 rows on a CPU (a single stream's decode step)
    packed for semilla's few-rows kernel (models/kernels.py), for more rows prepacked for
    oneDNN on a CPU (see prepacks); each is built when first needed. It is rebuilt when a weight is replaced or changed in place by a versioned op (a load, a
    plain optimizer, a dtype change), and forgotten when the model switches between train()
    and eval(): PyTorch's fused AdamW updates weights without bumping their version counters,
    and a training loop always switches to eval() before it evaluates.
    """

    def __init__(self, owner: nn.Module, *names: str, activation: str | None = None):
        self.owner, self.names, self.activation = owner, names, activation
        self.key: list | None = None
        self.prepared: tuple[torch.Tensor, torch.Tensor | None, bool] | None = None
        self.rows: tuple[torch.Tensor, torch.Tensor | None] | None = None  # for the few-rows kernel

    def forget(self) -> None:
        self.key = self.prepared = self.rows = None

    def __getstate__(self) -> dict:  # copy.deepcopy, pickle: packed oneDNN tensors have no storage
        return {**vars(self), "key": None, "prepared": None, "rows": None}

    def _stack(self, linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if len(linears) == 1:
            return linears[0].weight, linears[0].bias
        weight = torch.cat([lin.weight for lin in linears])
        bias = torch.cat([lin.bias for lin in linears]) if linears[0].bias is not None else None
        return weight, bias

    def _prepare(self, linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
        weight, bias = self._stack(linears)
        if prepacks(weight):
            return torch.ops.mkldnn._reorder_linear_weight(weight, 32), bias, True
        return weight, bias, False

    def __call__(self, x: torch.Tensor, adapters: RowAdapters | None = None) -> torch.Tensor:
        """The layers' outputs side by side along the last dimension; with `adapters`, each row
        plus its own LoRA adapter's update (before the activation), the base matmul unchanged."""
        if adapters is not None and self in adapters.layers:
            return self._activate(adapters.add(self, x, self._linear(x, activate=False)))
        return self._linear(x, activate=True)

    def _linear(self, x: torch.Tensor, activate: bool) -> torch.Tensor:
        act = self._activate if activate else _identity
        linears = self._linears()
        if not self._plain(linears):
            outputs = [act(lin(x)) for lin in linears]  # int8 layers, hooks: one call each
            return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=-1)
        if not self._cacheable(x):
            return act(F.linear(x, *self._stack(linears)))
        self._refresh(linears)
        kernel = kernels.linear_rows(x, [lin._parameters["weight"] for lin in linears])
        if kernel is not None:  # a single stream: weights read at the memory's speed
            return act(kernel(x, *self._rows(linears)))
        if self.prepared is None:
            self.prepared = self._prepare(linears)
        weight, bias, packed = self.prepared
        if packed and activate and self.activation in FUSED_ACTIVATIONS:  # activation inside the kernel
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, *FUSED_ACTIVATIONS[self.activation])
        if packed:
            return act(torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], ""))
        return act(F.linear(x, weight, bias))

    def rows_weight(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None] | None:
        """The stacked weight packed for the few-rows kernel and the stacked bias (cached), for
        a kernel that runs these layers itself; None where they must run as modules or the
        cache may not be used (see _cacheable)."""
        linears = self._linears()
        if not self._plain(linears) or linears[0].in_features % 16 or not self._cacheable(x):
            return None  # (the kernel reads 16 columns at a time)
        self._refresh(linears)
        return self._rows(linears)

    def _linears(self) -> list[nn.Module]:
        modules = self.owner._modules  # a plain dict: no nn.Module.__getattr__ on this hot path
        return [modules[name] for name in self.names]

    @staticmethod
    def _plain(linears: list[nn.Module]) -> bool:
        """Plain nn.Linear layers without hooks (int8 layers and hooked ones run as modules)."""
        return all(
            type(lin) is nn.Linear and not lin._forward_hooks and not lin._forward_pre_hooks
            for lin in linears
        )

    def _cacheable(self, x: torch.Tensor) -> bool:
        return not (
            torch.is_grad_enabled()
            or self.owner.training  # weights change under fused optimizers without a version bump
            or torch.is_autocast_enabled(x.device.type)  # autocast chooses the dtypes: plain F.linear
            or torch.compiler.is_compiling()  # the compiler fuses by itself, and a cache would break graphs
        )

    def _refresh(self, linears: list[nn.Linear]) -> None:
        """Forget what was prepared when a weight was replaced or changed in place."""
        key = [
            (p.data_ptr(), p._version, p.dtype)
            for lin in linears
            for p in lin._parameters.values()
            if p is not None
        ]
        if key != self.key:
            self.key, self.prepared, self.rows = key, None, None

    def _rows(self, linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.rows is None:
            weight, bias = self._stack(linears)
            self.rows = kernels.pack_rows(weight), bias
        return self.rows

    def _activate(self, y: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.activation](y) if self.activation else y


def _identity(y: torch.Tensor) -> torch.Tensor:
    return y


def causal_attention(q, k, v, dropout: float, gqa: bool) -> torch.Tensor:
    """Causal SDPA over whole sequences. Under bfloat16 autocast on the CPU, semilla's kernel
    where it applies (fused_ops.causal_attention), else PyTorch's fused kernel in float32: its
    bfloat16 backward is about 4x slower than its float32 one."""
    # the autocast dtype, not q's, decides: RoPE's float32 tables turn a bfloat16 q and k to
    # float32 while v stays bfloat16, and SDPA under autocast would take them all to bfloat16
    if q.device.type == "cpu" and fused_ops.autocast_bfloat16(q):
        y = fused_ops.causal_attention(q, k, v) if not (dropout or gqa) else None
        if y is not None:  # scores in float32, products with the probabilities in bfloat16
            return y
        with torch.autocast("cpu", enabled=False):
            y = F.scaled_dot_product_attention(
                q.float(), k.float(), v.float(), is_causal=True, dropout_p=dropout, enable_gqa=gqa
            )
        return y.to(torch.bfloat16)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout, enable_gqa=gqa)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.kv_heads, cfg.head_dim
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * cfg.head_dim, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.kv_heads * cfg.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.n_embd, bias=cfg.bias)
        self.qkv = FusedLinear(self, "q_proj", "k_proj", "v_proj")
        self.out = FusedLinear(self, "o_proj")
        self.dropout = cfg.dropout

    def forward(
        self, x, rope, cache: KVCache | None, step: CacheStep | None, layer: int, adapters: RowAdapters | None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv = self.n_head, self.n_kv_head
        qkv = self.qkv(x, adapters).view(B, T, nh + 2 * nkv, self.head_dim)  # one matmul for q, k and v
        if step is not None and step.kernel is not None:  # a decode step: rotates q, k and writes k, v
            q, k, v = qkv[:, 0, :nh], qkv[:, 0, nh : nh + nkv], qkv[:, 0, nh + nkv :]
            y = step.kernel(q, k, v, cache.k[layer], cache.v[layer], step.slot, *(rope or (None, None)))
            return self.out(y.view(B, 1, nh * self.head_dim), adapters)
        qk = apply_rope(qkv[:, :, : nh + nkv], *rope) if rope is not None else qkv  # q and k rotated at once
        q = qk[:, :, :nh].transpose(1, 2)  # (B, nh, T, hs)
        k = qk[:, :, nh : nh + nkv].transpose(1, 2)  # (B, nkv, T, hs)
        v = qkv[:, :, nh + nkv :].transpose(1, 2)
        gqa = self.n_kv_head != self.n_head
        dropout = self.dropout if self.training else 0.0
        if cache is None:
            y = causal_attention(q, k, v, dropout, gqa)
        else:
            step.store(cache.k[layer], k)
            step.store(cache.v[layer], v)
            keys, values = cache.k[layer][:, :, : step.length], cache.v[layer][:, :, : step.length]
            if step.visible is None:  # every slot visible: SDPA's unmasked kernel is fastest
                y = F.scaled_dot_product_attention(q, keys, values, enable_gqa=gqa)
            else:
                y = cached_attention(q, keys, values, step.visible)
        y = y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim)
        return self.out(y, adapters)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        hidden = cfg.ffn_size
        if cfg.mlp == "swiglu":
            self.gate_proj = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.up_proj = nn.Linear(cfg.n_embd, hidden, bias=cfg.bias)
        self.down_proj = nn.Linear(hidden, cfg.n_embd, bias=cfg.bias)
        if cfg.mlp == "swiglu":
            self.up = FusedLinear(self, "gate_proj", "up_proj")
        else:
            self.up = FusedLinear(self, "up_proj", activation=cfg.mlp)
        self.down = FusedLinear(self, "down_proj")

    def forward(self, x: torch.Tensor, adapters: RowAdapters | None = None) -> torch.Tensor:
        h = self.up(x, adapters)  # a gelu or relu MLP's activation is applied by self.up
        if self.kind == "swiglu":  # gate and up: the halves of one matmul's output
            h = fused_ops.swiglu(h)
        return self.down(h, adapters)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = make_norm(cfg)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.dropout = cfg.dropout

    def forward(self, x, rope, cache, step, layer, adapters: RowAdapters | None = None) -> torch.Tensor:
        if step is not None and step.kernel is not None and adapters is None:  # a decode step
            y = self.decode_step(x, rope, cache, step, layer)
            if y is not None:
                return y
        attended = self.self_attn(self.input_layernorm(x), rope, cache, step, layer, adapters)
        dropout = self.dropout if self.training else 0.0  # (a call less per layer at inference)
        x = x + (F.dropout(attended, dropout) if dropout else attended)
        mixed = self.mlp(self.post_attention_layernorm(x), adapters)
        return x + (F.dropout(mixed, dropout) if dropout else mixed)

    def decode_step(self, x, rope, cache: KVCache, step: CacheStep, layer: int) -> torch.Tensor | None:
        """The whole layer in one kernel call where it applies (a llama layer, float32, plain
        linears in eval mode), else None. Same operations, same results: kernels.decode_layer."""
        norms = (self.input_layernorm, self.post_attention_layernorm)
        if (
            self.mlp.kind != "swiglu"
            or not all(type(n) is RMSNorm for n in norms)
            or norms[0].eps != norms[1].eps
        ):
            return None
        kernel = kernels.decode_layer(x, [n.weight for n in norms])
        if kernel is None:
            return None
        attn = self.self_attn
        parts = [f.rows_weight(x) for f in (attn.qkv, attn.out, self.mlp.up, self.mlp.down)]
        if any(p is None or p[0].dtype != torch.float32 for p in parts):
            return None
        (qkv, qkv_bias), (o, o_bias), (gate_up, gate_up_bias), (down, down_bias) = parts
        cos, sin = rope or (None, None)
        return kernel(
            x, norms[0].weight, qkv, qkv_bias, o, o_bias, norms[1].weight, gate_up, gate_up_bias,
            down, down_bias, cache.k[layer], cache.v[layer], step.slot, cos, sin, norms[0].eps,
        )  # fmt: skip


class TransformerBody(nn.Module):
    """Hugging Face's `model.*` part: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.pos == "learned":
            self.embed_positions = nn.Embedding(cfg.block_size, cfg.n_embd)
        elif cfg.pos == "sinusoidal":
            self.register_buffer("sinusoidal", sinusoidal_table(cfg.block_size, cfg.n_embd), persistent=False)
        self.rotary = RotaryEmbedding(cfg) if cfg.pos == "rope" else None
        self.dropout = cfg.dropout
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg.n_layer))
        self.norm = make_norm(cfg)
        self.pos = cfg.pos


class Transformer(nn.Module):
    """`model(idx)` -> logits (B, T, vocab). With a KVCache, `positions` says where idx sits;
    `adapters` gives rows of the batch their own LoRA adapters (models/adapter_bank.py)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        assert cfg.vocab_size > 0, "vocab_size must be set before building a model"
        self.config = cfg
        self.model = TransformerBody(cfg)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.head = FusedLinear(self, "lm_head")
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scale residual projections by depth
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    def train(self, mode: bool = True) -> Transformer:
        if mode != self.training:  # a switch: weights may have changed without a version bump
            for module in self.modules():
                for fused in vars(module).values():
                    if isinstance(fused, FusedLinear):
                        fused.forget()
        return super().train(mode)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def rebuild_buffers(self) -> None:
        """Recompute the non-persistent buffers (after building on the meta device)."""
        body, device = self.model, self.lm_head.weight.device
        if body.rotary is not None:
            body.rotary = RotaryEmbedding(self.config).to(device)
        if body.pos == "sinusoidal":
            body.sinusoidal = sinusoidal_table(self.config.block_size, self.config.n_embd).to(device)

    def new_cache(self, batch_size: int, max_len: int | None = None) -> KVCache:
        p = self.lm_head.weight
        return KVCache(self.config, batch_size, max_len or self.config.block_size, p.device, p.dtype)

    def forward(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        adapters: RowAdapters | None = None,
    ) -> torch.Tensor:
        return self.head(self.hidden_states(idx, positions, cache, adapters))

    def hidden_states(
        self,
        idx: torch.Tensor,
        positions: torch.Tensor | None = None,
        cache: KVCache | None = None,
        adapters: RowAdapters | None = None,
    ) -> torch.Tensor:
        """The body's output after the final norm, (B, T, C): what the head turns into logits
        and what embeddings pool."""
        B, T = idx.shape
        body = self.model
        if positions is None:
            if self.config.block_size < T:
                raise ValueError(f"{T} tokens do not fit the context of {self.config.block_size}")
            positions = torch.arange(T, device=idx.device)
        elif int(positions.max()) >= self.config.block_size:
            raise ValueError(
                f"position {int(positions.max())} is past the context of {self.config.block_size} tokens"
            )
        x = body.embed_tokens(idx)  # (B, T, C)
        if body.pos == "learned":
            x = x + body.embed_positions(positions)
        elif body.pos == "sinusoidal":
            x = x + body.sinusoidal[positions]
        x = F.dropout(x, body.dropout, self.training)
        rope = body.rotary(positions) if body.rotary is not None else None
        step = CacheStep(self.config, positions, cache, B) if cache is not None else None
        for i, layer in enumerate(body.layers):
            x = layer(x, rope, cache, step, i, adapters)
        return body.norm(x)
