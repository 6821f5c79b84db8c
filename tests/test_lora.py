"""LoRA adapters: merge == unmerged, PEFT's layout, and PEFT itself as the oracle on the Hugging
Face export (both ways), for the llama and gpt2 families; bad adapters are one clear error."""

from __future__ import annotations

import json

import pytest
import torch
from export_helpers import MULTILINGUAL, PROMPT, greedy, save_tiny
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from semilla.checkpoint import load_checkpoint
from semilla.errors import SemillaError
from semilla.export.hf import export_hf
from semilla.models.lora import (
    AdapterError,
    LoraConfig,
    LoRALinear,
    apply_lora,
    export_peft,
    load_adapter,
    lora_layers,
    merge_and_unload,
    merge_lora,
    save_adapter,
    unmerge_lora,
)

FAMILIES = ("llama", "gpt2")


@pytest.fixture(scope="module", params=FAMILIES)
def base(request, tmp_path_factory):
    """(checkpoint dir, Hugging Face export dir, family) of a tiny random model."""
    root = tmp_path_factory.mktemp(f"lora-{request.param}")
    ckpt = save_tiny(root / "ckpt", request.param, "char")
    export_hf(ckpt, root / "hf")
    return ckpt, root / "hf", request.param


def adapted(ckpt, targets="q_proj,v_proj", r=4, seed=0):
    """The checkpoint's model with a LoRA adapter whose B is random (a fresh one is a no-op)."""
    model, tok, _ = load_checkpoint(ckpt)
    apply_lora(model, LoraConfig(r=r, alpha=8, dropout=0.0, target_modules=targets))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.02)
    return model.eval(), tok


def ids(tok):
    prompt = tok.encode(PROMPT)
    return torch.tensor([prompt, tok.encode(MULTILINGUAL)[: len(prompt)]])


def test_a_fresh_adapter_changes_nothing_and_only_it_trains(base):
    ckpt, _, _ = base
    model, tok, _ = load_checkpoint(ckpt)
    x = ids(tok)
    with torch.no_grad():
        before = model(x)
        layers = apply_lora(model, LoraConfig(r=4, target_modules="all-linear"))
        # (B = 0; only the order of float32 sums differs: fused matmuls before, one per layer now)
        assert (model(x) - before).abs().max() < 1e-5
    assert len(layers) == 7 * model.config.n_layer - (model.config.mlp != "swiglu") * model.config.n_layer
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


@pytest.mark.parametrize("targets", ["q_proj,v_proj", "all-linear"])
def test_merged_equals_unmerged_and_generation_uses_the_adapter(base, targets):
    ckpt, _, _ = base
    model, tok = adapted(ckpt, targets)
    x = ids(tok)
    plain, _, _ = load_checkpoint(ckpt)
    with torch.no_grad():
        unmerged = model(x)
        assert (unmerged - plain(x)).abs().max() > 1e-3  # the adapter does something
        merge_lora(model)
        # float32's own rounding: the unmerged float32 logits are 1.4e-5 off float64's here
        assert (model(x) - unmerged).abs().max() < 5e-5
        unmerge_lora(model)
        assert (model(x) - unmerged).abs().max() < 5e-5
        model.double()  # the math itself, without float32's noise
        exact = model(x)
        merge_lora(model)
        assert (model(x) - exact).abs().max() < 1e-5
        model.float()
        unmerge_lora(model)
    prompt = tok.encode(PROMPT)
    tokens = greedy(model, prompt, 32)  # KV cache, FusedLinear calling the LoRA layers one by one
    merged = merge_and_unload(model)
    assert not lora_layers(merged)
    assert greedy(merged, prompt, 32) == tokens
    with torch.no_grad():
        assert (merged(x) - unmerged).abs().max() < 5e-5


def test_save_writes_peft_layout_and_loads_back(base, tmp_path):
    ckpt, _, family = base
    model, tok = adapted(ckpt)
    save_adapter(tmp_path / "a", model, LoraConfig(r=4, alpha=8, dropout=0.0), str(ckpt))
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["base_model_name_or_path"]) == (4, 8, str(ckpt))
    keys = set(load_file(tmp_path / "a" / "adapter_model.safetensors"))
    if family == "llama":
        assert config["target_modules"] == ["q_proj", "v_proj"]
        assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    else:
        assert config["target_modules"] == ["attn.c_attn"]
        assert "base_model.model.transformer.h.0.attn.c_attn.lora_B.weight" in keys
    again, _, _ = load_checkpoint(ckpt)
    load_adapter(again, tmp_path / "a")
    x = ids(tok)
    with torch.no_grad():
        assert (again(x) - model(x)).abs().max() < 1e-6


@pytest.mark.parametrize("targets", ["q_proj,v_proj", "all-linear"])
def test_peft_loads_a_semilla_adapter_with_the_same_logits(base, tmp_path, targets):
    ckpt, hf_dir, _ = base
    model, tok = adapted(ckpt, targets)
    save_adapter(
        tmp_path / "a", model, LoraConfig(r=4, alpha=8, dropout=0.0, target_modules=targets), str(hf_dir)
    )
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True)
    peft_model = PeftModel.from_pretrained(hf, tmp_path / "a").eval()
    x = ids(tok)
    with torch.no_grad():
        assert (peft_model(x).logits - model(x)).abs().max() < 1e-4


def test_semilla_loads_a_peft_trained_adapter_with_the_same_logits(base, tmp_path):
    ckpt, hf_dir, family = base
    targets = ["q_proj", "v_proj", "o_proj"] if family == "llama" else ["c_attn", "attn.c_proj", "mlp.c_fc"]
    hf = AutoModelForCausalLM.from_pretrained(hf_dir, local_files_only=True)
    peft_model = get_peft_model(
        hf, PeftLoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets)
    )
    model, tok, _ = load_checkpoint(ckpt)
    x = ids(tok)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(3):  # a few real steps: B leaves zero
        loss = peft_model(x, labels=x).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    peft_model.save_pretrained(tmp_path / "peft")
    load_adapter(model, tmp_path / "peft")
    peft_model.eval()
    with torch.no_grad():
        theirs = peft_model(x).logits
        with peft_model.disable_adapter():
            assert (theirs - peft_model(x).logits).abs().max() > 1e-3  # trained: not the base any more
        assert (model(x) - theirs).abs().max() < 1e-4


def test_export_hf_with_an_adapter_merges_it_and_export_peft_copies_it(base, tmp_path):
    ckpt, _, _ = base
    model, tok = adapted(ckpt, "all-linear")
    save_adapter(tmp_path / "a", model, LoraConfig(r=4, alpha=8, target_modules="all-linear"), str(ckpt))
    export_hf(ckpt, tmp_path / "merged", adapter=tmp_path / "a")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", local_files_only=True).eval()
    x = ids(tok)
    with torch.no_grad():
        assert (hf(x).logits - model(x)).abs().max() < 1e-4
    export_peft(tmp_path / "a", tmp_path / "copy")
    assert (tmp_path / "copy" / "adapter_model.safetensors").read_bytes() == (
        tmp_path / "a" / "adapter_model.safetensors"
    ).read_bytes()
    with pytest.raises(SemillaError, match="already exists; pass --overwrite"):
        export_peft(tmp_path / "a", tmp_path / "copy")


# --- bad input ----------------------------------------------------------------------------------


@pytest.mark.parametrize("r", [0, -2])
def test_rank_must_be_positive(r):
    with pytest.raises(AdapterError, match="rank r must be a positive integer"):
        LoraConfig(r=r)


def test_unknown_target_module_is_named():
    with pytest.raises(AdapterError, match="unknown LoRA target module qkv_proj"):
        LoraConfig(target_modules="q_proj,qkv_proj")


@pytest.fixture
def llama_adapter(tmp_path):
    ckpt = save_tiny(tmp_path / "ckpt", "llama", "char")
    model, _ = adapted(ckpt)
    save_adapter(tmp_path / "a", model, LoraConfig(r=4, alpha=8), str(ckpt))
    return tmp_path / "a"


def test_an_adapter_for_another_base_is_refused(llama_adapter, tmp_path):
    wider = save_tiny(tmp_path / "wider", "llama", "char", n_embd=64)
    model, _, _ = load_checkpoint(wider)
    with pytest.raises(AdapterError, match=r"q_proj has A .* which do not fit the layer .* another base"):
        load_adapter(model, llama_adapter)
    shallow = save_tiny(tmp_path / "shallow", "llama", "char", n_layer=1)
    model, _, _ = load_checkpoint(shallow)
    with pytest.raises(AdapterError, match=r"model.layers.1.self_attn.q_proj is not a layer of this model"):
        load_adapter(model, llama_adapter)
    assert not lora_layers(model)  # nothing half applied


def test_a_truncated_or_corrupted_adapter_file_is_one_clear_error(llama_adapter):
    path = llama_adapter / "adapter_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    model, _, _ = load_checkpoint(llama_adapter.parent / "ckpt")
    with pytest.raises(AdapterError, match="is corrupt or truncated"):
        load_adapter(model, llama_adapter)
    (llama_adapter / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="adapter_config.json is not valid JSON"):
        load_adapter(model, llama_adapter)


def test_a_tensor_that_is_not_lora_is_refused(llama_adapter):
    path = llama_adapter / "adapter_model.safetensors"
    save_file({**load_file(path), "base_model.model.lm_head.weight": torch.zeros(2, 2)}, path)
    model, _, _ = load_checkpoint(llama_adapter.parent / "ckpt")
    with pytest.raises(AdapterError, match="unexpected tensor base_model.model.lm_head.weight"):
        load_adapter(model, llama_adapter)


def test_lora_layer_reports_the_base_shape():
    layer = LoRALinear(torch.nn.Linear(6, 10), r=2, scaling=1.0, dropout=0.0)
    assert (layer.in_features, layer.out_features) == (6, 10)
