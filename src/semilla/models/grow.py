"""Function-preserving growth of a trained transformer: wider, deeper, more heads, longer context.

The grown model computes the same function as the source (same logits for every input, up to
float rounding); its new units start where they change nothing yet still receive gradient.
The expansions follow Gesmundo & Maile 2023 ("Composable function-preserving expansions for
transformer architectures", arXiv 2308.06103):

- residual width d -> d': new embedding columns and new output rows of o_proj/down_proj are
  zero, so the residual stream is x' = [x, 0]. RMSNorm of the padded vector:
  rms' = sqrt((d/d') mean(x^2) + eps'). With eps' = eps * d/d', rms' = sqrt(d/d') rms, so gains
  multiplied by sqrt(d/d') give back exactly w * x / rms on the old coordinates (and 0 on the
  new ones). norm_eps in the grown config is eps * d/d'.
- MLP width: new gate/up rows random, new down_proj columns zero.
- query heads at a fixed head size: new q rows random, new o_proj columns zero. With grouped
  -query attention each old query head keeps its key/value head: heads are laid out again so
  every old head sits in a group whose key/value head is a copy of its old one.
- key/value heads: copies of the old ones where old query heads need them, random otherwise.
- depth: new blocks whose o_proj and down_proj are zero are identities on the residual stream.
- context: RoPE tables are computed, so longer contexts are exact; learned position rows for
  the new positions are random.

The GPT-2 family (LayerNorm, learned positions, GELU, biases) grows exactly in every dimension
too, though zero padding alone would not do: LayerNorm subtracts the mean over all d'
coordinates, and zeros move the mean and the variance. Instead every new residual coordinate
carries the mean m of the old ones: each write into the residual stream (embedding columns,
o_proj and down_proj rows and biases) gets, in its new positions, the mean of its old ones, and
the mean is linear, so the new coordinates hold m at every layer. The mean over d' is then m,
the variance r * var (r = d/d'), and with eps' = r * eps and gains times sqrt(r), LayerNorm
gives back exactly its old output on the old coordinates and (m - m) * gain + 0 = 0 on the new
ones (new biases are zero). tests/test_grow.py measures it like the rest.

Mode `stack` grows depth by copying existing blocks (G_stack, "Stacking your transformers",
2024): the source stack is repeated, which is not function-preserving.

One plan (GrowthPlan) maps every parameter of the grown model to the source's: it builds the
grown weights and grows any other dict keyed by parameter names (AdamW moments), so the two can
never disagree.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from semilla.config import SHAPE_FIELDS, ModelConfig
from semilla.config import preset as preset_config
from semilla.errors import ConfigError

MODES = ("exact", "stack")
INSERTS = ("end", "interleave")
FAMILIES = ("llama", "gpt2")

# Parameters of a block, by name suffix: what each dimension indexes, and the dimensions along
# which new positions must keep the function: zero where they read new units or (llama) write
# into the residual stream; residual writes of the LayerNorm family take the mean instead.
BLOCK_PARAMETERS = {
    "self_attn.q_proj.weight": (("q", "resid"), ()),
    "self_attn.q_proj.bias": (("q",), ()),
    "self_attn.k_proj.weight": (("kv", "resid"), ()),
    "self_attn.k_proj.bias": (("kv",), ()),
    "self_attn.v_proj.weight": (("kv", "resid"), ()),
    "self_attn.v_proj.bias": (("kv",), ()),
    "self_attn.o_proj.weight": (("resid", "q"), (0, 1)),
    "self_attn.o_proj.bias": (("resid",), (0,)),
    "mlp.gate_proj.weight": (("ffn", "resid"), ()),
    "mlp.up_proj.weight": (("ffn", "resid"), ()),
    "mlp.up_proj.bias": (("ffn",), ()),
    "mlp.down_proj.weight": (("resid", "ffn"), (0, 1)),
    "mlp.down_proj.bias": (("resid",), (0,)),
}
NORMS = ("input_layernorm", "post_attention_layernorm")
OUTPUT_PROJECTIONS = ("self_attn.o_proj.", "mlp.down_proj.")  # zero in a new block: an identity
# Optimizer state entries that scale with the gradient, and their power (AdamW, Adam, SGD)
MOMENT_POWERS = {"exp_avg": 1, "exp_avg_sq": 2, "max_exp_avg_sq": 2, "momentum_buffer": 1}


class GrowthError(ConfigError):
    """A model cannot grow into the requested shape (the message lists every problem)."""


@dataclass(frozen=True)
class TensorMap:
    """How one tensor of the grown model is made from the source's.

    source: the source parameter it comes from (None: a tensor of a new block)
    index: per dimension, for each position of the grown tensor the source position, -1 if new
    zero_dims: new positions along these dimensions are zero, which keeps the function
        (`noise` perturbs exactly these); other new positions are random like a fresh model's
    scale: factor on the values (norm gains); gradients scale by 1/scale, and so do moments
    mean_dim: new positions along this dimension (a residual write of the LayerNorm family)
        take the mean of the old positions, which also keeps the function (`noise` too)
    """

    source: str | None
    index: tuple[torch.Tensor, ...]
    zero_dims: tuple[int, ...]
    scale: float = 1.0
    mean_dim: int | None = None

    def masks(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(new anywhere, must be zero) as boolean tensors of the grown shape."""
        return _new_along(self.index, range(len(self.index))), _new_along(self.index, self.zero_dims)

    def fill_means(self, value: torch.Tensor, perturbation: torch.Tensor) -> torch.Tensor:
        """New positions along mean_dim set to the mean of the old ones (plus perturbation)."""
        if self.mean_dim is None:
            return value
        old = torch.nonzero(self.index[self.mean_dim] >= 0).flatten()
        mean = value.index_select(self.mean_dim, old).mean(self.mean_dim, keepdim=True)
        new = _new_along(self.index, (self.mean_dim,))
        return torch.where(new, mean + perturbation, value)

    def gather(self, old: torch.Tensor) -> torch.Tensor:
        """The source's values at their grown positions (new positions hold arbitrary values)."""
        for dim, idx in enumerate(self.index):
            old = old.index_select(dim, idx.clamp(min=0))
        return old


def _new_along(index: tuple[torch.Tensor, ...], dims) -> torch.Tensor:
    shape = [len(i) for i in index]
    mask = torch.zeros(shape, dtype=torch.bool)
    for d in dims:
        mask |= (index[d] < 0).view([-1 if k == d else 1 for k in range(len(shape))])
    return mask


# --- the grown shape ----------------------------------------------------------------------


def target_config(source: ModelConfig, preset: str | None = None, **dims: int | None) -> ModelConfig:
    """The config of `source` grown to a preset's shape or to explicit dimensions.

    dims: any of n_embd, n_layer, n_head, n_kv_head, intermediate_size, block_size (explicit
    ones override the preset's). Dimensions not given keep the source's; n_head follows
    n_embd at the source's head size, and a model without grouped-query attention keeps none.
    Everything else (family switches, vocabulary, rope_theta) stays the source's; norm_eps
    becomes eps * d/d' (see the module docstring). Raises GrowthError listing every problem
    (a smaller dimension, a head size change, kv heads that do not divide the query heads,
    an LSTM or a family other than llama and gpt2)."""
    unknown = sorted(set(dims) - set(SHAPE_FIELDS))
    if unknown:
        raise GrowthError(f"unknown dimensions: {', '.join(unknown)}; choose from {', '.join(SHAPE_FIELDS)}")
    wanted = {k: v for k, v in dims.items() if v is not None}
    if preset:
        p = preset_config(preset)
        wanted = {
            "n_embd": p.n_embd, "n_layer": p.n_layer, "n_head": p.n_head, "n_kv_head": p.n_kv_head,
            "intermediate_size": p.ffn_size, "block_size": p.block_size, **wanted,
        }  # fmt: skip
    if source.arch != "transformer":
        raise GrowthError(f"{source.arch.upper()} models cannot grow: only llama and gpt2 transformers can")
    n_embd = wanted.get("n_embd", source.n_embd)
    default_heads = n_embd // source.head_dim if n_embd % source.head_dim == 0 else source.n_head
    n_head = wanted.get("n_head", default_heads)
    multi_head = source.kv_heads == source.n_head
    shape = {
        "n_embd": n_embd,
        "n_layer": wanted.get("n_layer", source.n_layer),
        "n_head": n_head,
        "n_kv_head": wanted.get("n_kv_head", n_head if multi_head else source.kv_heads),
        "intermediate_size": wanted.get("intermediate_size", source.ffn_size),
        "block_size": wanted.get("block_size", source.block_size),
    }
    eps = source.norm_eps * source.n_embd / n_embd if n_embd > 0 else source.norm_eps
    target = dataclasses.replace(source, **shape, norm_eps=eps)
    problems = growth_problems(source, target, "exact", "end")
    if problems:
        raise GrowthError("cannot grow the model: " + "; ".join(problems))
    return target


def growth_problems(source: ModelConfig, target: ModelConfig, mode: str, insert: str | int) -> list[str]:
    """Everything that keeps `source` from growing into `target` (empty: it can)."""
    if source.arch != "transformer":
        return [f"{source.arch.upper()} models cannot grow: only llama and gpt2 transformers can"]
    if source.family not in FAMILIES:
        return [
            f"only the llama and gpt2 families can grow; this model has norm={source.norm}, "
            f"pos={source.pos}, mlp={source.mlp}, bias={source.bias}"
        ]
    p = []
    before, after = _shape(source), _shape(target)
    for name in before:
        if after[name] < before[name]:
            p.append(f"{name} would shrink from {before[name]} to {after[name]} (growth only grows)")
    if target.vocab_size != source.vocab_size:
        p.append(f"the vocabulary stays {source.vocab_size} tokens, got vocab_size {target.vocab_size}")
    for name in SHAPE_FIELDS:
        if (after.get(name) or 1) < 1:
            p.append(f"{name} must be >= 1, got {after[name]}")
    nh, kv = target.n_head, target.kv_heads
    if nh >= 1 and target.n_embd % nh:
        p.append(f"head size: n_embd ({target.n_embd}) must be divisible by n_head ({nh})")
    elif nh >= 1 and target.head_dim != source.head_dim:
        fix = (
            f" (use n_head {target.n_embd // source.head_dim})"
            if target.n_embd % source.head_dim == 0
            else ""
        )
        p.append(
            f"the head size must stay {source.head_dim} (n_embd / n_head), got "
            f"{target.n_embd} / {nh} = {target.head_dim}{fix}"
        )
    if kv >= 1 and nh >= 1 and nh % kv:
        p.append(f"n_kv_head ({kv}) must divide n_head ({nh})")
    elif kv >= source.kv_heads and nh >= source.n_head and head_layout(source, target) is None:
        p.append(
            f"n_kv_head {kv} with n_head {nh} cannot keep every old query head with its key/value head "
            f"(groups of {source.n_head // source.kv_heads} become groups of {nh // kv})"
        )
    if source.family == "gpt2" and kv != nh:
        p.append(f"the gpt2 family has no grouped-query attention: n_kv_head ({kv}) must equal n_head ({nh})")
    if mode not in MODES:
        p.append(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if isinstance(insert, int) and not 0 <= insert <= source.n_layer:
        p.append(f"insert position must be in 0..{source.n_layer} (the source's layers), got {insert}")
    elif not isinstance(insert, int) and insert not in INSERTS:
        p.append(f"insert must be end, interleave or a layer index, got {insert!r}")
    return p


def _shape(cfg: ModelConfig) -> dict[str, int]:
    return {
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "n_kv_head": cfg.kv_heads,
        "intermediate_size": cfg.ffn_size, "block_size": cfg.block_size,
    }  # fmt: skip


def head_layout(source: ModelConfig, target: ModelConfig) -> tuple[list[int], list[int]] | None:
    """(grown query head -> source query head, grown kv head -> source kv head), -1 where new;
    None when the grown groups cannot hold every old query head with a copy of its kv head.

    Each old kv head k gets `copies` consecutive grown kv heads (copies of it), enough query
    slots for its old query heads, which take the first slots in order; kv heads left over are
    new (random), and so are the query heads of every slot left over.
    """
    old_group = source.n_head // source.kv_heads
    new_group = target.n_head // target.kv_heads
    copies = -(-old_group // new_group)  # ceil
    if source.kv_heads * copies > target.kv_heads:
        return None
    q_map, kv_map = [-1] * target.n_head, [-1] * target.kv_heads
    for k in range(source.kv_heads):
        first = k * copies
        kv_map[first : first + copies] = [k] * copies
        for p in range(old_group):
            q_map[first * new_group + p] = k * old_group + p
    return q_map, kv_map


def layer_sources(n_old: int, n_new: int, mode: str, insert: str | int) -> list[int | None]:
    """For each grown layer, the source layer whose weights it takes (None: a new identity block).

    insert: end (new blocks after the old ones), interleave (spread evenly between them), or N
    (all new blocks before old block N). In stack mode new blocks are copies: at the end the
    source stack repeated (G_stack), elsewhere a copy of the old block before each (block 0 at 0).
    """
    added = n_new - n_old
    if insert == "end":
        order: list[int | None] = [*range(n_old), *[None] * added]
    elif insert == "interleave":
        order = []
        for i in range(n_old):  # old block i is followed by its share of the new ones
            order += [i, *[None] * (((i + 1) * added) // n_old - (i * added) // n_old)]
    else:
        order = [*range(insert), *[None] * added, *range(insert, n_old)]
    if mode == "stack":
        if insert == "end":
            order = [*range(n_old), *[j % n_old for j in range(added)]]
        else:
            previous = 0
            for j, src in enumerate(order):
                order[j] = previous if src is None else src
                previous = order[j]
    return order


# --- the plan -----------------------------------------------------------------------------


@dataclass
class GrowthPlan:
    """The mapping from a source model's parameters to the grown model's, by name."""

    source: ModelConfig
    target: ModelConfig
    mode: str
    layers: list[int | None]  # per grown layer: the source layer it comes from (None: new)
    maps: dict[str, TensorMap]

    @property
    def exact(self) -> bool:
        """Whether the grown model computes the source's function (up to float rounding)."""
        return self.mode == "exact"

    def grow_weights(self, state: dict[str, torch.Tensor], seed: int = 0, noise: float = 0.0) -> nn.Module:
        """A new float32 Transformer of the grown shape, on the CPU, from a source state dict.

        New random values come from a fresh model built with `seed` (the model's own init);
        the values that keep the function (zeros, means) get `noise` * N(0, 1) added."""
        from semilla.models.transformer import Transformer

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            grown = Transformer(self.target)
            generator = torch.Generator().manual_seed(seed + 1)
            grown_state = grown.state_dict()  # shares storage with the parameters
            assert set(grown_state) - set(self.maps) <= {"lm_head.weight"}, "a parameter without a plan"
            with torch.no_grad():
                for name, m in self.maps.items():
                    fresh = grown_state[name]
                    new, zero = m.masks()
                    value = fresh.clone()
                    if m.source is not None:
                        value = torch.where(new, value, m.gather(state[m.source].detach().float().cpu()))
                    value = value * m.scale
                    perturbation = torch.zeros_like(value)
                    if noise > 0:
                        perturbation = noise * torch.randn(value.shape, generator=generator)
                    value = torch.where(zero, perturbation, value)
                    fresh.copy_(m.fill_means(value, perturbation))
        return grown

    def grow_tensors(self, tensors: dict[str, torch.Tensor], power: int = 1) -> dict[str, torch.Tensor]:
        """Any per-parameter tensors (keyed by source parameter names) in the grown layout: new
        entries zero, copied ones copied, norm gains' entries scaled as their gradients are.

        power: how the tensor scales with a gradient (1: AdamW exp_avg, 2: exp_avg_sq, 0: as is).
        Grown parameters whose source is missing from `tensors` are left out; new blocks' are
        zeros."""
        if not tensors:  # a state key no parameter has (momentum_buffer, max_exp_avg_sq)
            return {}
        out = {}
        like = next(iter(tensors.values()))
        for name, m in self.maps.items():
            if m.source is not None and m.source not in tensors:
                continue
            new, _ = m.masks()
            if m.source is None:
                out[name] = torch.zeros(new.shape, dtype=like.dtype, device=like.device)
                continue
            old = tensors[m.source]
            grown = m.gather(old) * m.scale ** (-power)
            out[name] = torch.where(
                new.to(old.device), torch.zeros((), dtype=old.dtype, device=old.device), grown
            )
        return out

    def grow_optimizer_state(self, state: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        """An optimizer's per-parameter state keyed by source parameter name (AdamW: step,
        exp_avg, exp_avg_sq) for the grown model: moments by grow_tensors, other entries (the
        step) kept; parameters of new blocks get zero moments and the others' step."""
        if not state:  # an optimizer that has not stepped yet
            return {}
        grown = {
            key: self.grow_tensors({n: s[key] for n, s in state.items() if key in s}, power)
            for key, power in MOMENT_POWERS.items()
        }
        step = next((s["step"] for s in state.values() if "step" in s), None)
        out: dict[str, dict[str, Any]] = {}
        for name, m in self.maps.items():
            if m.source is not None and m.source not in state:
                continue  # a parameter the optimizer has not touched yet
            kept = state[m.source] if m.source is not None else {}
            entry = {k: v for k, v in kept.items() if k not in MOMENT_POWERS}
            if m.source is None and step is not None:
                entry["step"] = step.clone() if torch.is_tensor(step) else step
            entry.update({key: tensors[name] for key, tensors in grown.items() if name in tensors})
            out[name] = entry
        return out


def plan_growth(
    source: ModelConfig, target: ModelConfig, mode: str = "exact", insert: str | int = "end"
) -> GrowthPlan:
    """The GrowthPlan from `source` to `target` (see target_config); GrowthError if impossible."""
    problems = growth_problems(source, target, mode, insert)
    if problems:
        raise GrowthError("cannot grow the model: " + "; ".join(problems))
    target = target_config(source, **_shape(target))  # only the shape is the caller's to choose
    q_map, kv_map = head_layout(source, target)
    hd = source.head_dim

    def heads(mapping: list[int]) -> torch.Tensor:  # head map -> row map, head_dim rows per head
        return torch.tensor([h * hd + i if h >= 0 else -1 for h in mapping for i in range(hd)])

    def extend(old: int, new: int) -> torch.Tensor:
        return torch.cat([torch.arange(old), torch.full((new - old,), -1)])

    index = {
        "resid": extend(source.n_embd, target.n_embd),
        "ffn": extend(source.ffn_size, target.ffn_size),
        "q": heads(q_map),
        "kv": heads(kv_map),
        "vocab": torch.arange(source.vocab_size),
        "pos": extend(source.block_size, target.block_size),
    }
    norm_scale = math.sqrt(source.n_embd / target.n_embd)
    layernorm = source.norm == "layernorm"
    maps: dict[str, TensorMap] = {}

    def norm(name: str, src: str | None) -> None:
        if src is None:  # a new block's norm: a fresh one (gains 1, biases 0)
            fresh = (torch.full((target.n_embd,), -1),)
            maps[name + ".weight"] = TensorMap(None, fresh, ())
            if layernorm:
                maps[name + ".bias"] = TensorMap(None, fresh, ())
            return
        maps[name + ".weight"] = TensorMap(src + ".weight", (index["resid"],), (), norm_scale)
        if layernorm:  # new coordinates output (m - m) * gain + 0 (module docstring)
            maps[name + ".bias"] = TensorMap(src + ".bias", (index["resid"],), (0,))

    def kept(src: str, kinds: tuple[str, ...], zero_dims: tuple[int, ...]) -> TensorMap:
        writes = [d for d in zero_dims if kinds[d] == "resid"]  # the dimension written to the residual
        if layernorm and writes:  # new residual coordinates carry the old ones' mean
            rest = tuple(d for d in zero_dims if d not in writes)
            return TensorMap(src, tuple(index[k] for k in kinds), rest, mean_dim=writes[0])
        return TensorMap(src, tuple(index[k] for k in kinds), zero_dims)

    suffixes = [
        s
        for s in BLOCK_PARAMETERS
        if (source.bias or not s.endswith(".bias"))
        and (source.mlp == "swiglu" or not s.startswith("mlp.gate"))
    ]
    layers = layer_sources(source.n_layer, target.n_layer, mode, insert)
    for j, i in enumerate(layers):
        new, old = f"model.layers.{j}.", None if i is None else f"model.layers.{i}."
        for norm_name in NORMS:
            norm(new + norm_name, old and old + norm_name)
        for suffix in suffixes:
            kinds, zero_dims = BLOCK_PARAMETERS[suffix]
            if old is None:
                shape = [len(index[k]) for k in kinds]
                whole = tuple(range(len(kinds))) if suffix.startswith(OUTPUT_PROJECTIONS) else ()
                maps[new + suffix] = TensorMap(None, tuple(torch.full((n,), -1) for n in shape), whole)
            else:
                maps[new + suffix] = kept(old + suffix, kinds, zero_dims)
    maps["model.embed_tokens.weight"] = kept("model.embed_tokens.weight", ("vocab", "resid"), (1,))
    if source.pos == "learned":
        maps["model.embed_positions.weight"] = kept("model.embed_positions.weight", ("pos", "resid"), (1,))
    norm("model.norm", "model.norm")
    if not source.tie_embeddings:  # tied, the head is the embedding; its new columns read zeros
        maps["lm_head.weight"] = TensorMap("lm_head.weight", (index["vocab"], index["resid"]), ())
    return GrowthPlan(source, target, mode, layers, maps)


# --- growing models, tensors and checkpoints ----------------------------------------------


def grow_model(
    model: nn.Module,
    target: ModelConfig,
    mode: str = "exact",
    noise: float = 0.0,
    insert: str | int = "end",
    seed: int = 0,
) -> nn.Module:
    """A new model of `target`'s shape computing the same function as `model` (mode exact; see
    the module docstring for what is exact), on the same device and dtype, same train/eval mode.

    mode: exact | stack (new blocks copy old ones; not function-preserving). noise: standard
    deviation of a perturbation of the zeros that keep the function (0: exact). insert: where
    new blocks go, end | interleave | N. seed: the new random weights and the noise."""
    if any("quantized" in type(m).__module__ for m in model.modules()):
        raise GrowthError("int8 models cannot grow: grow the float32 checkpoint, then quantize it")
    if not noise >= 0:
        raise GrowthError(f"noise must be >= 0, got {noise}")
    plan = plan_growth(model.config, target, mode, insert)
    grown = plan.grow_weights(model.state_dict(), seed, noise)
    weight = next(model.parameters())
    return grown.to(device=weight.device, dtype=weight.dtype).train(model.training)


def grow_tensors(
    tensors: dict[str, torch.Tensor],
    source: ModelConfig,
    target: ModelConfig,
    mode: str = "exact",
    insert: str | int = "end",
    power: int = 1,
) -> dict[str, torch.Tensor]:
    """Per-parameter tensors keyed by the source's parameter names (AdamW exp_avg: power 1,
    exp_avg_sq: power 2) laid out for the grown model, by the same plan as grow_model: new
    entries zero, copied entries (key/value heads, stacked blocks) copied. Steps stay as they are."""
    return plan_growth(source, target, mode, insert).grow_tensors(tensors, power)


def grow_optimizer_state(
    state: dict[str, dict[str, Any]],
    source: ModelConfig,
    target: ModelConfig,
    mode: str = "exact",
    insert: str | int = "end",
) -> dict[str, dict[str, Any]]:
    """Optimizer state keyed by parameter name ({name: {"step", "exp_avg", "exp_avg_sq"}}) for
    the grown model, by the same plan as grow_model (see GrowthPlan.grow_optimizer_state)."""
    return plan_growth(source, target, mode, insert).grow_optimizer_state(state)


@torch.no_grad()
def probe_deviation(source: nn.Module, grown: nn.Module, seed: int = 0, tokens: int = 64) -> float:
    """The largest |logit change| between two models on a random batch (2 rows) of token ids
    that fits the source's context."""
    generator = torch.Generator().manual_seed(seed)
    length = min(tokens, source.config.block_size)
    idx = torch.randint(source.config.vocab_size, (2, length), generator=generator)
    device = next(source.parameters()).device
    was = source.training, grown.training
    source.eval(), grown.eval()
    before = source(idx.to(device)).float()
    after = grown(idx.to(next(grown.parameters()).device)).float().to(device)
    source.train(was[0]), grown.train(was[1])
    return float((after - before).abs().max())


def describe_shape(cfg: ModelConfig) -> str:
    """One line: the shape of a transformer config."""
    return (
        f"n_embd {cfg.n_embd}, n_layer {cfg.n_layer}, n_head {cfg.n_head}, n_kv_head {cfg.kv_heads}, "
        f"intermediate_size {cfg.ffn_size}, block_size {cfg.block_size}"
    )


def grow_checkpoint(
    src: str,
    out: str,
    target: ModelConfig | None = None,
    mode: str = "exact",
    noise: float = 0.0,
    insert: str | int = "end",
    seed: int = 0,
    overwrite: bool = False,
    preset: str | None = None,
    **dims: int | None,
) -> dict:
    """Grow the checkpoint `src` into a new checkpoint directory `out` (tokenizer kept), written
    atomically: a failure (a full disk) leaves no partial output and the source untouched.

    The grown shape is `target`, or target_config(source, preset, **dims). An existing `out` is
    refused unless overwrite. Returns a summary: shapes, parameter counts, whether the growth
    is exact, and the largest logit change measured on a random batch."""
    from semilla.atomic import existing_dir
    from semilla.checkpoint import load_checkpoint, read_config, resolve_checkpoint, save_checkpoint
    from semilla.models import count_parameters

    if existing_dir(out) is not None and not overwrite:
        raise GrowthError(f"{out} already exists; choose another output or pass --overwrite to replace it")
    directory = resolve_checkpoint(src)
    config = read_config(directory)
    if config.get("quantization"):
        raise GrowthError(
            f"{directory} is an int8 checkpoint and cannot grow: grow its float32 source instead"
        )
    if config["model"].get("arch", "transformer") != "transformer":
        raise GrowthError(
            f"{directory} is an {config['model']['arch'].upper()} model: only transformers can grow"
        )
    model, tokenizer, _ = load_checkpoint(directory, dtype="float32")
    target = target if target is not None else target_config(model.config, preset, **dims)
    plan = plan_growth(model.config, target, mode, insert)  # refuses bad shapes before any work
    grown = grow_model(model, target, mode, noise, insert, seed)
    deviation = probe_deviation(model, grown, seed)
    save_checkpoint(out, grown, tokenizer)
    return {
        "path": str(out),
        "source": {"shape": describe_shape(model.config), "parameters": count_parameters(model)},
        "grown": {"shape": describe_shape(grown.config), "parameters": count_parameters(grown)},
        "mode": mode,
        "exact": plan.exact and noise == 0,
        "max_logit_change": deviation,
    }
