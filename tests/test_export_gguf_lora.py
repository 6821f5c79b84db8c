"""A LoRA adapter as a GGUF adapter file, checked by llama.cpp itself (llama-cpp-python): the F32
base GGUF plus the adapter continue a prompt with the same 32 greedy tokens as semilla with the
adapter; the Ollama Modelfile names the adapter; an adapter for another base is refused."""

from __future__ import annotations

import pytest
import torch
from export_helpers import PROMPT, greedy, save_tiny
from helpers import assert_one_line_error, run_cli
from llama_cpp import Llama
from test_export_gguf import GGML_TYPE_F32, llama_cpp_greedy

from semilla.checkpoint import load_checkpoint
from semilla.export.gguf import export_gguf
from semilla.export.gguf_lora import export_gguf_adapter
from semilla.models.lora import LoraConfig, apply_lora, load_adapter, lora_layers, save_adapter


def random_adapter(ckpt, directory, targets: str, r: int = 4):
    """A PEFT adapter for `ckpt` whose B is random (a fresh one changes nothing)."""
    model, _, _ = load_checkpoint(ckpt)
    config = LoraConfig(r=r, alpha=3 * r, dropout=0.0, target_modules=targets)
    apply_lora(model, config)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B.weight.copy_(torch.randn(layer.lora_B.weight.shape, generator=gen) * 0.1)
    return save_adapter(directory, model, config, str(ckpt))


@pytest.mark.parametrize(
    ("family", "targets"), [("llama", "all-linear"), ("llama", "q_proj,k_proj"), ("gpt2", "all-linear")]
)
def test_llama_cpp_with_the_gguf_adapter_continues_like_semilla(tmp_path, family, targets):
    ckpt = save_tiny(tmp_path / "ckpt", family, "char")
    adapter = random_adapter(ckpt, tmp_path / "adapter", targets)
    base_file = export_gguf(ckpt, tmp_path / "base.gguf", "f32")
    adapter_file = export_gguf_adapter(ckpt, adapter, tmp_path / "adapter.gguf")
    model, tok, _ = load_checkpoint(ckpt)
    prompt = tok.encode(PROMPT)
    plain = greedy(model, prompt, 32)
    load_adapter(model, adapter)
    expected = greedy(model.eval(), prompt, 32)
    assert expected != plain  # the adapter changes the continuation
    llm = Llama(
        str(base_file), lora_path=str(adapter_file), n_ctx=128, n_threads=1, logits_all=True,
        verbose=False, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32,
    )  # fmt: skip
    assert llama_cpp_greedy(llm, prompt, 32) == expected
    assert llm.metadata.get("general.type") != "adapter"  # the base stays a model


def test_cli_gguf_adapter_and_ollama_adapter_line(tmp_path):
    ckpt = save_tiny(tmp_path / "ckpt", "llama", "char")
    adapter = random_adapter(ckpt, tmp_path / "medicina", "q_proj,v_proj")
    proc = run_cli("export", "gguf", ckpt, tmp_path / "medicina.gguf", "--adapter", adapter)
    assert proc.returncode == 0, proc.stderr
    assert "LoRA adapter" in proc.stdout and (tmp_path / "medicina.gguf").is_file()
    proc = run_cli(
        "export", "ollama", ckpt, tmp_path / "semilla-medicina", "--adapter", adapter, "--type", "f32"
    )
    assert proc.returncode == 0, proc.stderr
    modelfile = (tmp_path / "semilla-medicina" / "Modelfile").read_text()
    assert modelfile.startswith("FROM ./model.gguf\nADAPTER ./adapter.gguf\n")
    assert (tmp_path / "semilla-medicina" / "adapter.gguf").is_file()


def test_an_adapter_for_another_base_is_refused_and_nothing_is_written(tmp_path, cli_in_process):
    ckpt = save_tiny(tmp_path / "ckpt", "llama", "char")
    adapter = random_adapter(ckpt, tmp_path / "a", "q_proj,v_proj")
    wider = save_tiny(tmp_path / "wider", "llama", "char", n_embd=64)
    proc = run_cli("export", "gguf", wider, tmp_path / "a.gguf", "--adapter", adapter)
    assert_one_line_error(proc, "do not fit the layer", "another base")
    assert not (tmp_path / "a.gguf").exists() and not list(tmp_path.glob(".a.gguf.tmp-*"))
    proc = cli_in_process("export", "onnx", ckpt, tmp_path / "o", "--adapter", adapter)
    assert_one_line_error(proc, "--adapter is for export hf, gguf and ollama, not onnx")
