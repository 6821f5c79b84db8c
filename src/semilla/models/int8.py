"""Int8 weights for CPU inference: post-training dynamic quantization.

The Linear layers of the transformer blocks keep their weights as int8, one symmetric scale
per output channel; activations are quantized on the fly, per call, by PyTorch's fbgemm
kernels. Embeddings, norms and the output head stay float32 (the head decides every token,
and the generation code reads its weight for the device).

Stored in model.safetensors as `NAME.weight` (int8) plus `NAME.weight_scale` (float32, one
per output row), so loading never unpickles anything.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

SCALE_SUFFIX = ".weight_scale"
METHOD = {"method": "dynamic-int8", "weights": "per-channel symmetric", "layers": "transformer blocks"}


def quantizable_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The Linear layers inside the transformer blocks, by module name."""
    if getattr(model.config, "arch", "transformer") != "transformer":
        return {}
    return {
        name: m
        for name, m in model.named_modules()
        if name.startswith("model.layers.") and isinstance(m, nn.Linear)
    }


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 weight, float32 scale per output row) with w ~= int8 * scale[:, None]."""
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12).float()
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def int8_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every quantizable weight as int8 + its scales."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    if getattr(model.config, "tie_embeddings", False):
        state.pop("lm_head.weight", None)
    for name in quantizable_layers(model):
        q, scale = quantize_weight(state[name + ".weight"].float())
        state[name + ".weight"], state[name + SCALE_SUFFIX] = q, scale
    return state


def split_int8_state(
    tensors: dict[str, torch.Tensor],
) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(float state dict to build the model from, {layer name: (int8 weight, scale)})."""
    floats, packed = dict(tensors), {}
    for key in [k for k in tensors if k.endswith(SCALE_SUFFIX)]:
        name = key[: -len(SCALE_SUFFIX)]
        q, scale = floats.pop(name + ".weight"), floats.pop(key)
        packed[name] = (q, scale)
        floats[name + ".weight"] = q.float() * scale[:, None]
    return floats, packed


def dynamic_linear(q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> nn.Module:
    """PyTorch's dynamically quantized Linear holding exactly these int8 weights."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    with warnings.catch_warnings():  # torch.ao is deprecated in favour of torchao; same kernels
        warnings.simplefilter("ignore")
        layer = DynamicLinear(q.size(1), q.size(0), bias_=bias is not None, dtype=torch.qint8)
        zero = torch.zeros(q.size(0), dtype=torch.long)
        qweight = torch._make_per_channel_quantized_tensor(q, scale.double(), zero, 0)
        layer.set_weight_bias(qweight, None if bias is None else bias.detach().float())
    return layer


def packed_parameters(model: nn.Module) -> int:
    """Weights and biases held inside int8 layers, which `parameters()` does not list."""
    total = 0
    for m in model.modules():
        if hasattr(m, "_packed_params") and hasattr(m, "in_features"):
            total += m.in_features * m.out_features + (m.out_features if m.bias() is not None else 0)
    return total


def apply_int8(model: nn.Module, packed: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> nn.Module:
    """Swap the named Linear layers for int8 ones (CPU only)."""
    for name, (q, scale) in packed.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        setattr(parent, child, dynamic_linear(q, scale, old.bias))
    return model
