"""Hugging Face export and import: transformers loads the directory offline and computes the
same logits, greedy tokens and token ids; export -> import gives back identical logits."""

from __future__ import annotations

import json

import pytest
import torch
from export_helpers import MULTILINGUAL, PROMPT, greedy, save_tiny
from helpers import assert_one_line_error, run_cli
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from semilla.checkpoint import load_checkpoint
from semilla.export import ExportError
from semilla.export.hf import export_hf
from semilla.export.importer import import_hf

CASES = [(f, k) for f in ("llama", "gpt2") for k in ("char", "bpe")]


@pytest.fixture(scope="module", params=CASES, ids=[f"{f}-{k}" for f, k in CASES])
def exported(request, tmp_path_factory):
    family, kind = request.param
    root = tmp_path_factory.mktemp(f"hf-{family}-{kind}")
    ckpt = save_tiny(root / "ckpt", family, kind, tie_embeddings=kind == "bpe")
    export_hf(ckpt, root / "hf")
    model, tok, _ = load_checkpoint(ckpt)
    return root, model, tok, family


def test_config_and_files(exported):
    root, model, _, family = exported
    config = json.loads((root / "hf" / "config.json").read_text())
    assert config["architectures"] == [{"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[family]]
    for name in ("model.safetensors", "tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (root / "hf" / name).is_file()
    assert "chat_template" in json.loads((root / "hf" / "tokenizer_config.json").read_text())


def test_transformers_logits_and_greedy_match(exported):
    root, model, tok, _ = exported
    hf = AutoModelForCausalLM.from_pretrained(root / "hf", local_files_only=True).eval()
    prompt = tok.encode(PROMPT)
    x = torch.tensor([prompt, tok.encode(MULTILINGUAL)[: len(prompt)]])
    with torch.no_grad():
        ours, theirs = model(x), hf(x).logits
    assert (ours - theirs).abs().max() < 1e-4
    no_stop = GenerationConfig(do_sample=False, max_new_tokens=64, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), generation_config=no_stop)
    assert out[0, len(prompt) :].tolist() == greedy(model, prompt)


def test_auto_tokenizer_gives_the_same_ids(exported):
    root, _, tok, _ = exported
    hf_tok = AutoTokenizer.from_pretrained(root / "hf", local_files_only=True)
    assert hf_tok(MULTILINGUAL, add_special_tokens=False).input_ids == tok.encode(MULTILINGUAL)
    assert hf_tok.decode(tok.encode(PROMPT)) == tok.decode(tok.encode(PROMPT))
    chat = [{"role": "user", "content": "hola"}]
    text = hf_tok.apply_chat_template(chat, tokenize=False, add_generation_prompt=True)
    assert text == "<|user|>hola<|end|><|assistant|>"


def test_import_round_trip_gives_identical_logits(exported):
    root, model, tok, _ = exported
    back = import_hf(root / "hf", root / "imported")
    model2, tok2, _ = load_checkpoint(back)
    x = torch.tensor([tok.encode(MULTILINGUAL)[:100]])
    with torch.no_grad():
        assert torch.equal(model(x), model2(x))
    assert tok2.encode(MULTILINGUAL) == tok.encode(MULTILINGUAL)


def test_import_of_a_transformers_gpt2_without_semilla_tokens(tmp_path):
    """A GPT-2 saved by transformers itself, with a tokenizer lacking semilla's special tokens."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab = {chr(c): i for i, c in enumerate(range(32, 127))}
    hf_tok = HFTokenizer(models.WordLevel(vocab, unk_token="~"))
    hf_tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(
        GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=2, n_head=2)
    ).eval()
    gpt2.save_pretrained(tmp_path / "hf")
    hf_tok.save(str(tmp_path / "hf" / "tokenizer.json"))
    model, tok, _ = load_checkpoint(import_hf(tmp_path / "hf", tmp_path / "ckpt"))
    assert tok.vocab_size == len(vocab) + 8 and model.config.vocab_size == len(vocab) + 8
    x = torch.tensor([[5, 17, 40, 2, 90]])
    with torch.no_grad():
        assert (model(x)[..., : len(vocab)] - gpt2(x).logits).abs().max() < 1e-4


def test_refuses_models_without_a_hf_architecture(tmp_path):
    for name, overrides in {
        "sinusoidal": dict(norm="layernorm", pos="sinusoidal", mlp="gelu", bias=True),
        "lstm": dict(arch="lstm", lstm_hidden=16),
    }.items():
        ckpt = save_tiny(tmp_path / name, "gpt2", "char", **overrides)
        with pytest.raises(ExportError, match="pos=sinusoidal" if name == "sinusoidal" else "LSTM"):
            export_hf(ckpt, tmp_path / f"{name}-hf")
    proc = run_cli("export", "hf", tmp_path / "lstm", tmp_path / "out")
    assert_one_line_error(proc, "cannot export to Hugging Face", "LSTM")
    assert not (tmp_path / "out").exists()


def test_import_refuses_pickles_and_other_architectures(tmp_path, cli_in_process):
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    (tmp_path / "bin" / "pytorch_model.bin").write_bytes(b"pickle")
    assert_one_line_error(
        run_cli("import", "hf", tmp_path / "bin", tmp_path / "o"), "pytorch_model.bin is a pickle"
    )
    (tmp_path / "mistral").mkdir()
    (tmp_path / "mistral" / "config.json").write_text(json.dumps({"architectures": ["MistralForCausalLM"]}))
    proc = cli_in_process("import", "hf", tmp_path / "mistral", tmp_path / "o")
    assert_one_line_error(proc, "cannot import MistralForCausalLM")


def test_tokenizer_length_and_generation_config_fit_the_model(exported):
    """model_max_length is the context (not 1e6); generating with the stored generation
    config and a max_new_tokens, as a transformers user does, warns about nothing (a stored
    max_length did: 'Both max_new_tokens and max_length seem to have been set')."""
    import logging
    import warnings

    root, model, tok, _ = exported
    hf_tok = AutoTokenizer.from_pretrained(root / "hf", local_files_only=True)
    assert hf_tok.model_max_length == model.config.block_size
    hf = AutoModelForCausalLM.from_pretrained(root / "hf", local_files_only=True).eval()
    inputs = hf_tok(PROMPT, return_tensors="pt", add_special_tokens=False)
    records: list[logging.LogRecord] = []
    catch = logging.Handler(logging.WARNING)
    catch.emit = records.append
    library = logging.getLogger("transformers")  # its own handler, no propagation to the root
    library.addHandler(catch)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            hf.generate(**inputs, max_new_tokens=5)
    finally:
        library.removeHandler(catch)
    assert [str(w.message) for w in caught] == []
    assert [r.getMessage() for r in records] == []
