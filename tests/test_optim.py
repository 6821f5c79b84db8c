"""The optimizers: which weights Muon updates, MuonAdamW against torch's own two optimizers,
and the settings that choose between Muon and AdamW (auto, FSDP, LoRA, runs saved before)."""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from helpers import assert_one_line_error, run_cli, tiny_configs

from semilla.config import ModelConfig, TrainConfig, preset
from semilla.errors import CheckpointError
from semilla.models import build_model
from semilla.optim import MuonAdamW, make_optimizer, muon_matrices, resolved_optimizer
from semilla.train import train
from semilla.train_setup import resume_configs

CPU = torch.device("cpu")


def names_of(model: torch.nn.Module, params) -> set[str]:
    return {name for name, p in model.named_parameters() if any(p is q for q in params)}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_muon_takes_the_blocks_linear_weights_only(family: str) -> None:
    shape = dict(norm="layernorm", pos="learned", mlp="gelu", bias=True) if family == "gpt2" else {}
    model = build_model(ModelConfig(vocab_size=40, n_layer=2, n_embd=32, n_head=4, **shape))
    muon = names_of(model, muon_matrices(model))
    per_layer = {"q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"}
    per_layer |= {"gate_proj"} if family == "llama" else set()
    assert {n.split(".")[-2] for n in muon} == per_layer and len(muon) == 2 * len(per_layer)
    assert all(n.endswith(".weight") and n.startswith("model.layers.") for n in muon)
    optimizer = make_optimizer(model, TrainConfig(), CPU)
    assert isinstance(optimizer, MuonAdamW)
    adamw = {
        n for g in optimizer.param_groups if g["optimizer"] == "adamw" for n in names_of(model, g["params"])
    }
    assert adamw == {n for n, _ in model.named_parameters()} - muon  # embeddings, head, norms, biases
    decayed = [g for g in optimizer.param_groups if g["optimizer"] == "adamw" and g["weight_decay"] > 0]
    assert all(p.dim() >= 2 for g in decayed for p in g["params"])


def test_an_lstm_and_adamw_get_plain_adamw() -> None:
    lstm = build_model(ModelConfig(arch="lstm", vocab_size=40, n_embd=16, lstm_hidden=24, n_layer=1))
    assert type(make_optimizer(lstm, TrainConfig(), CPU)) is torch.optim.AdamW
    llama = build_model(ModelConfig(vocab_size=40, n_layer=1, n_embd=32, n_head=4))
    assert type(make_optimizer(llama, TrainConfig(optimizer="adamw"), CPU)) is torch.optim.AdamW


def random_grads(model: torch.nn.Module, seed: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g) for p in model.parameters()]


def test_muon_adamw_steps_exactly_as_torchs_muon_and_adamw() -> None:
    """The combined optimizer against the reference: torch.optim.Muon on the blocks' matrices
    and torch.optim.AdamW on the rest, stepped side by side on copies of the same model."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=40, n_layer=2, n_embd=32, n_head=4))
    reference = copy.deepcopy(model)
    cfg = TrainConfig(learning_rate=2e-3, weight_decay=0.1, beta1=0.9, beta2=0.95)
    ours = make_optimizer(model, cfg, CPU)
    matrices = muon_matrices(reference)
    rest = [p for p in reference.parameters() if p not in matrices]
    muon = torch.optim.Muon(
        [p for p in reference.parameters() if p in matrices],
        lr=2e-3,
        weight_decay=0.1,
        adjust_lr_fn="match_rms_adamw",
    )
    adamw = torch.optim.AdamW(
        [
            {"params": [p for p in rest if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in rest if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=2e-3,
        betas=(0.9, 0.95),
        fused=True,
    )
    for step in range(4):
        for m in (model, reference):
            for p, g in zip(m.parameters(), random_grads(m, step), strict=True):
                p.grad = g
        lr = 2e-3 * (step + 1) / 4  # a schedule sets every group's lr
        for group in [*ours.param_groups, *muon.param_groups, *adamw.param_groups]:
            group["lr"] = lr
        ours.step()
        muon.step()
        adamw.step()
    for (name, a), b in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert torch.equal(a, b), name


def test_muon_adamw_state_round_trips() -> None:
    """state_dict -> load_state_dict on a fresh optimizer, then more steps: the same weights as
    the optimizer that never stopped (the inner optimizers follow the loaded groups and state)."""
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=40, n_layer=1, n_embd=32, n_head=4))
    twin = copy.deepcopy(model)
    a, b = make_optimizer(model, TrainConfig(), CPU), make_optimizer(twin, TrainConfig(), CPU)

    def step(m, opt, seed):
        for p, g in zip(m.parameters(), random_grads(m, seed), strict=True):
            p.grad = g
        opt.step()

    for seed in range(2):
        step(model, a, seed)
        step(twin, b, seed)
    saved = json.loads(json.dumps(b.state_dict()["param_groups"]))  # checkpoints keep groups as JSON
    restored = make_optimizer(twin, TrainConfig(), CPU)
    restored.load_state_dict({"state": b.state_dict()["state"], "param_groups": saved})
    for seed in range(2, 4):
        step(model, a, seed)
        step(twin, restored, seed)
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert torch.equal(p, q), name


def test_auto_is_muon_but_adamw_for_fsdp_and_lora() -> None:
    assert resolved_optimizer(TrainConfig()) == "muon"
    assert resolved_optimizer(TrainConfig(fsdp=True)) == "adamw"
    assert resolved_optimizer(TrainConfig(lora_r=4, init_from="x")) == "adamw"
    assert any(
        "fsdp cannot use --optimizer muon" in p for p in TrainConfig(optimizer="muon", fsdp=True).problems()
    )
    assert any("LoRA" in p for p in TrainConfig(optimizer="muon", lora_r=4, init_from="x").problems())
    assert any("optimizer must be one of" in p for p in TrainConfig(optimizer="sgd").problems())


def test_the_cli_refuses_an_unknown_optimizer(tmp_path: Path) -> None:
    proc = run_cli("train", "--data", tmp_path, "--optimizer", "sgd")
    assert_one_line_error(proc, "optimizer must be one of auto, muon, adamw", "sgd")


def test_a_run_resumes_with_its_own_optimizer(tmp_path: Path, prepared_dir: Path, tiny_run: Path) -> None:
    with pytest.raises(CheckpointError, match="trained with muon"):
        resume_configs(str(tiny_run), {"optimizer": "adamw"})
    assert resume_configs(str(tiny_run), {"optimizer": "muon"})[1].optimizer == "muon"
    # a run saved before the setting existed was trained with AdamW, and resumes with it
    old = tmp_path / "old"
    train(*tiny_configs(prepared_dir, old, optimizer="adamw", max_iters=2))
    config = json.loads((old / "last" / "config.json").read_text())
    del config["train"]["optimizer"]
    (old / "last" / "config.json").write_text(json.dumps(config))
    model_cfg, train_cfg = resume_configs(str(old), {"max_iters": 4})
    assert train_cfg.optimizer == "adamw"
    assert train(model_cfg, train_cfg, resume=str(old))["step"] == 4


def test_presets_train_with_muon_by_default() -> None:
    model = build_model(replace(preset("tiny"), vocab_size=50))
    assert isinstance(make_optimizer(model, TrainConfig(), CPU), MuonAdamW)
