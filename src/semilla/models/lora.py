"""LoRA: low-rank adapters on a transformer's linear layers, and PEFT's file layout.

A target layer `W` (out, in) becomes `W x + (alpha / r) * B A dropout(x)` with A (r, in) and
B (out, r); B starts at zero, so a fresh adapter leaves the model unchanged. Only A and B
train. The adapted layer keeps the original as `base_layer` (PEFT's name); FusedLinear sees a
layer that is not a plain nn.Linear and calls it, so generation with an unmerged adapter is the
adapter's math. `merge_and_unload` folds the adapter into plain layers for the fast paths.

On disk an adapter is a PEFT directory: `adapter_config.json` + `adapter_model.safetensors` with
PEFT's names for the Hugging Face export (`base_model.model.<HF module>.lora_A.weight`), so
`peft.PeftModel.from_pretrained` loads it onto `semilla export hf`'s model and semilla loads
adapters PEFT trained there. The gpt2 family's export fuses q, k, v into one `c_attn`; see
`gpt2_adapter_tensors` for how adapters cross that boundary.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save
from torch import nn

from semilla.atomic import atomic_directory, atomic_write_bytes, atomic_write_text, refuse_to_replace
from semilla.errors import SemillaError

LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# GPT-2's Hugging Face modules -> semilla's; q/k/v are one fused `attn.c_attn` there
GPT2_MODULES = {"attn.c_proj": "self_attn.o_proj", "mlp.c_fc": "mlp.up_proj", "mlp.c_proj": "mlp.down_proj"}
QKV = ("q_proj", "k_proj", "v_proj")


class AdapterError(SemillaError):
    """An adapter cannot be built, read or applied to this model."""


@dataclass
class LoraConfig:
    """rank r, scale alpha / r, dropout on the adapter's input, and the layers it adapts."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")

    def __post_init__(self) -> None:
        self.target_modules = parse_target_modules(self.target_modules)
        problems = []
        if not isinstance(self.r, int) or self.r < 1:
            problems.append(f"LoRA rank r must be a positive integer, got {self.r!r}")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        if self.alpha <= 0:
            problems.append(f"LoRA alpha must be positive, got {self.alpha}")
        if problems:
            raise AdapterError("; ".join(problems))

    @property
    def scaling(self) -> float:
        return self.alpha / self.r


def parse_target_modules(targets: str | tuple[str, ...] | list[str]) -> tuple[str, ...]:
    """'q_proj,v_proj' or 'all-linear' (every linear layer of the blocks, not the head)."""
    names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets) if t.strip()]
    if names == ["all-linear"]:
        return LINEAR_MODULES
    unknown = [n for n in names if n not in LINEAR_MODULES]
    if unknown or not names:
        raise AdapterError(
            f"unknown LoRA target module {', '.join(unknown) or '(none)'}: "
            f"choose from {', '.join(LINEAR_MODULES)} or all-linear"
        )
    return tuple(n for n in LINEAR_MODULES if n in names)  # the model's order


class LoRALinear(nn.Module):
    """A linear layer plus a low-rank update: base(x) + scaling * B(A(dropout(x)))."""

    def __init__(self, base_layer: nn.Linear, r: int, scaling: float, dropout: float):
        super().__init__()
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        weight = base_layer.weight
        self.lora_A = nn.Linear(self.in_features, r, bias=False, device=weight.device, dtype=weight.dtype)
        self.lora_B = nn.Linear(r, self.out_features, bias=False, device=weight.device, dtype=weight.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's default init
        nn.init.zeros_(self.lora_B.weight)
        self.scaling = scaling
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def delta_weight(self) -> torch.Tensor:
        """The update the adapter adds to the base weight, (out, in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        return y + self.lora_B(self.lora_A(self.dropout(x))) * self.scaling

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base_layer.weight += self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base_layer.weight -= self.delta_weight().to(self.base_layer.weight.dtype)
            self.merged = False


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{semilla module name: LoRA layer}, e.g. 'model.layers.0.self_attn.q_proj'."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _target_parents(model: nn.Module, targets: tuple[str, ...]) -> list[tuple[str, nn.Module, str]]:
    found = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if child_name in targets and type(child) is nn.Linear:
                found.append((f"{name}.{child_name}", module, child_name))
    return found


def apply_lora(model: nn.Module, config: LoraConfig) -> dict[str, LoRALinear]:
    """Wrap `config.target_modules` of `model` in LoRA layers (in place) and freeze everything
    else; returns the new layers by name."""
    if lora_layers(model):
        raise AdapterError("the model already has a LoRA adapter")
    parents = _target_parents(model, config.target_modules)
    if not parents:
        raise AdapterError(f"the model has no {', '.join(config.target_modules)} layers to adapt")
    for _, parent, child_name in parents:
        layer = LoRALinear(getattr(parent, child_name), config.r, config.scaling, config.dropout)
        setattr(parent, child_name, layer)
    mark_only_lora_as_trainable(model)
    return lora_layers(model)


def mark_only_lora_as_trainable(model: nn.Module) -> None:
    for name, p in model.named_parameters():
        p.requires_grad = ".lora_A." in name or ".lora_B." in name


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight (the layers still hold A and B, for unmerge)."""
    for layer in lora_layers(model).values():
        layer.merge()


def unmerge_lora(model: nn.Module) -> None:
    for layer in lora_layers(model).values():
        layer.unmerge()


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Merge every adapter and put the plain base layers back: the model is an ordinary one
    again (fused and prepacked inference paths, exports), with the adapter in its weights."""
    for name, layer in lora_layers(model).items():
        layer.merge()
        parent_name, _, child_name = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child_name, layer.base_layer)
    for p in model.parameters():
        p.requires_grad = True
    return model


# --- PEFT layout ------------------------------------------------------------------------------


def _family(model: nn.Module) -> str:
    return getattr(model.config, "family", None) or "llama"  # not exportable: semilla's own names


def _peft_targets(config: LoraConfig, family: str) -> tuple[list[str], dict[str, int], dict[str, float]]:
    """target_modules (and per-module rank/alpha patterns) as PEFT names them on the HF export."""
    if family == "llama":
        return list(config.target_modules), {}, {}
    ours_to_gpt2 = {v.split(".")[1]: k for k, v in GPT2_MODULES.items()}
    targets = [ours_to_gpt2[t] for t in config.target_modules if t not in QKV]
    fused = sum(t in QKV for t in config.target_modules)
    if not fused:
        return targets, {}, {}
    # q, k, v side by side: rank fused * r, alpha scaled alike so alpha / r stays the same
    return ["attn.c_attn", *targets], {"attn.c_attn": fused * config.r}, {"attn.c_attn": fused * config.alpha}


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's weights under PEFT's names for the Hugging Face export of `model`."""
    layers = lora_layers(model)
    if _family(model) == "gpt2":
        return gpt2_adapter_tensors(layers)
    out = {}
    for name, layer in layers.items():
        out[f"{PEFT_PREFIX}{name}.lora_A.weight"] = layer.lora_A.weight
        out[f"{PEFT_PREFIX}{name}.lora_B.weight"] = layer.lora_B.weight
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def gpt2_adapter_tensors(layers: dict[str, LoRALinear]) -> dict[str, torch.Tensor]:
    """GPT-2's export fuses q, k, v into `c_attn` (out = 3 * n_embd), so their adapters become one
    of rank (number adapted) * r: A stacks their A's, B places each B in its own rows and
    columns (zeros elsewhere). The update, and so every logit, is the same; only the rank grows.
    o_proj, up_proj and down_proj map one to one (`GPT2_MODULES`)."""
    out: dict[str, torch.Tensor] = {}
    by_block: dict[str, dict[str, LoRALinear]] = {}
    for name, layer in layers.items():
        prefix, _, module = name.rpartition(".")  # model.layers.N.self_attn | mlp, q_proj ...
        block, _, part = prefix.rpartition(".")
        hf = f"{PEFT_PREFIX}transformer.h.{block.rsplit('.', 1)[1]}."
        if module in QKV:
            by_block.setdefault(hf, {})[module] = layer
            continue
        theirs = {v: k for k, v in GPT2_MODULES.items()}[f"{part}.{module}"]
        out[f"{hf}{theirs}.lora_A.weight"] = layer.lora_A.weight
        out[f"{hf}{theirs}.lora_B.weight"] = layer.lora_B.weight
    for hf, qkv in by_block.items():
        parts = [qkv[m] for m in QKV if m in qkv]
        r, n_out = parts[0].lora_A.weight.size(0), parts[0].out_features
        B = parts[0].lora_B.weight.new_zeros(3 * n_out, r * len(parts))
        for i, layer in enumerate(parts):
            row = QKV.index(next(m for m in QKV if qkv.get(m) is layer)) * n_out
            B[row : row + n_out, i * r : (i + 1) * r] = layer.lora_B.weight
        out[f"{hf}attn.c_attn.lora_A.weight"] = torch.cat([layer.lora_A.weight for layer in parts])
        out[f"{hf}attn.c_attn.lora_B.weight"] = B
    return {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in out.items()}


def peft_config(config: LoraConfig, family: str, base_model: str) -> dict[str, Any]:
    targets, ranks, alphas = _peft_targets(config, family)
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": config.r,
        "lora_alpha": config.alpha,
        "lora_dropout": config.dropout,
        "target_modules": targets,
        "rank_pattern": ranks,
        "alpha_pattern": alphas,
        "bias": "none",
        "fan_in_fan_out": family == "gpt2",  # GPT-2's Conv1D stores weights (in, out)
        "base_model_name_or_path": base_model,
        "inference_mode": True,
    }


def write_adapter(directory: Path, model: nn.Module, config: LoraConfig, base_model: str) -> None:
    """adapter_config.json and adapter_model.safetensors into `directory` (which exists), each
    file replaced atomically."""
    present = {name.rsplit(".", 1)[1] for name in lora_layers(model)}  # all-linear: gpt2 has no gate
    adapted = LoraConfig(
        config.r, config.alpha, config.dropout, tuple(t for t in config.target_modules if t in present)
    )
    text = json.dumps(peft_config(adapted, _family(model), base_model), indent=2) + "\n"
    atomic_write_text(directory / ADAPTER_CONFIG, text)
    atomic_write_bytes(directory / ADAPTER_WEIGHTS, save(adapter_tensors(model), metadata={"format": "pt"}))


def save_adapter(directory: str | os.PathLike, model: nn.Module, config: LoraConfig, base_model: str) -> Path:
    """Write `model`'s adapter as a PEFT directory, atomically."""
    with atomic_directory(directory) as tmp:
        write_adapter(tmp, model, config, base_model)
    return Path(directory)


def read_adapter_config(directory: str | os.PathLike) -> tuple[LoraConfig, dict[str, Any]]:
    """(rank, alpha and dropout as a LoraConfig, the raw adapter_config.json)."""
    path = Path(directory) / ADAPTER_CONFIG
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise AdapterError(f"{directory} is not a LoRA adapter: it has no {ADAPTER_CONFIG}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AdapterError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        raise AdapterError(
            f"{path}: peft_type must be LORA, got {raw.get('peft_type') if isinstance(raw, dict) else raw!r}"
        )
    try:
        config = LoraConfig(
            r=raw.get("r"),
            alpha=float(raw.get("lora_alpha", 8)),
            dropout=float(raw.get("lora_dropout", 0.0)),
            target_modules=LINEAR_MODULES,
        )  # the layers adapted are those its weights name
    except (TypeError, ValueError) as e:
        raise AdapterError(f"{path}: {e}") from None
    return config, raw


def _read_tensors(directory: Path) -> dict[str, torch.Tensor]:
    path = directory / ADAPTER_WEIGHTS
    try:
        return load_file(str(path))
    except FileNotFoundError:
        raise AdapterError(f"{directory} has no {ADAPTER_WEIGHTS}") from None
    except (SafetensorError, OSError, ValueError) as e:
        raise AdapterError(f"{path} is corrupt or truncated: {e}") from None


def _ours(
    tensors: dict[str, torch.Tensor], family: str, path: Path
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """PEFT's tensors -> {semilla module name: (A, B)}; GPT-2's c_attn splits into q, k, v, each
    with the shared A and its rows of B (the same update)."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        module, _, kind = key.removeprefix(PEFT_PREFIX).rpartition(".lora_")
        if kind not in ("A.weight", "B.weight") or not key.startswith(PEFT_PREFIX):
            raise AdapterError(f"{path}: unexpected tensor {key} (not a LoRA A or B weight)")
        pairs.setdefault(module, {})[kind[0]] = value
    out = {}
    for module, ab in pairs.items():
        if set(ab) != {"A", "B"}:
            raise AdapterError(f"{path}: {module} has lora_{'A' if 'A' not in ab else 'B'} missing")
        if family != "gpt2":
            out[module] = (ab["A"], ab["B"])
            continue
        if not module.startswith("transformer.h."):
            raise AdapterError(
                f"{path}: {module} is not a layer of this model (an adapter for another base?)"
            )
        index, _, theirs = module.removeprefix("transformer.h.").partition(".")
        ours = f"model.layers.{index}."
        if theirs == "attn.c_attn":
            n_out = ab["B"].size(0) // 3
            for i, m in enumerate(QKV):
                out[f"{ours}self_attn.{m}"] = (ab["A"], ab["B"][i * n_out : (i + 1) * n_out])
        elif theirs in GPT2_MODULES:
            out[ours + GPT2_MODULES[theirs]] = (ab["A"], ab["B"])
        else:
            raise AdapterError(
                f"{path}: {module} is not a layer of this model (an adapter for another base?)"
            )
    return out


def read_adapter(
    model: nn.Module, directory: str | os.PathLike
) -> tuple[LoraConfig, dict[str, tuple[torch.Tensor, torch.Tensor, float]]]:
    """The PEFT adapter in `directory`, checked against `model` (left unchanged): its config and
    {semilla module name: (A (r, in), B (out, r), scaling)}. An adapter for another base (names
    or shapes) is an AdapterError naming the layer."""
    directory = Path(directory)
    config, raw = read_adapter_config(directory)
    weights = _ours(_read_tensors(directory), _family(model), directory)
    wanted = {name for name, _, _ in _target_parents(model, LINEAR_MODULES)}
    missing = sorted(set(weights) - wanted)
    if missing:
        raise AdapterError(
            f"{directory}: {missing[0]} is not a layer of this model (an adapter for another base?)"
        )
    targets = tuple(m for m in LINEAR_MODULES if any(n.endswith("." + m) for n in weights))
    config = LoraConfig(config.r, config.alpha, config.dropout, targets)
    alphas, ranks = raw.get("alpha_pattern") or {}, raw.get("rank_pattern") or {}
    checked = {}
    for name, parent, child_name in _target_parents(model, targets):
        if name not in weights:
            continue
        A, B = weights[name]
        base = getattr(parent, child_name)
        fits = A.dim() == B.dim() == 2 and A.size(0) == B.size(1)
        if not fits or A.size(1) != base.in_features or B.size(0) != base.out_features:
            raise AdapterError(
                f"{directory}: {name} has A {tuple(A.shape)} and B {tuple(B.shape)}, which do not fit "
                f"the layer ({base.out_features}, {base.in_features}): an adapter for another base?"
            )
        rank = next((int(v) for k, v in ranks.items() if _matches(name, k)), config.r)
        if rank != A.size(0):
            raise AdapterError(f"{directory}: {name} has rank {A.size(0)}, the config says r={rank}")
        alpha = next((float(a) for k, a in alphas.items() if _matches(name, k)), config.alpha)
        checked[name] = (A, B, alpha / rank)
    return config, checked


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> LoraConfig:
    """Apply the PEFT adapter in `directory` to `model` (in place, unmerged) and return its
    config. Every layer is checked (`read_adapter`) before any is changed: nothing half applied."""
    config, weights = read_adapter(model, directory)
    for name, parent, child_name in _target_parents(model, config.target_modules):
        if name not in weights:
            continue
        A, B, scaling = weights[name]
        layer = LoRALinear(getattr(parent, child_name), A.size(0), scaling, config.dropout)
        with torch.no_grad():
            layer.lora_A.weight.copy_(A)
            layer.lora_B.weight.copy_(B)
        setattr(parent, child_name, layer)
    mark_only_lora_as_trainable(model)
    return config


def _matches(semilla_name: str, pattern: str) -> bool:
    """Whether a PEFT rank/alpha pattern key names this layer (by its last parts)."""
    tail = pattern.rsplit(".", 1)[-1]
    if tail == "c_attn":
        return semilla_name.rsplit(".", 1)[-1] in QKV
    if pattern in GPT2_MODULES:
        return semilla_name.endswith(GPT2_MODULES[pattern])
    return semilla_name.endswith("." + tail)


def export_peft(adapter: str | os.PathLike, out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Copy a LoRA adapter directory (checked: a readable PEFT LoRA) to `out`, atomically; the
    adapter is PEFT's layout already. An existing `out` is replaced only with `overwrite`."""
    refuse_to_replace(out, overwrite)
    adapter = Path(adapter)
    read_adapter_config(adapter)
    _read_tensors(adapter)
    with atomic_directory(out) as tmp:
        for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            shutil.copyfile(adapter / name, tmp / name)
    return Path(out)
