"""`semilla finetune` / `semilla.finetune`: only the adapter trains, through train.fit (held-out
split, metrics, resume), the output is a PEFT directory, and the adapter teaches its domain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers import DEMO_TEXT, TINY_TRAIN, assert_one_line_error, run_cli, tiny_configs
from safetensors.torch import load_file

import semilla
from semilla.batches import MixtureDataset, TokenDataset
from semilla.checkpoint import load_checkpoint
from semilla.data import prepare
from semilla.errors import CheckpointError, ConfigError
from semilla.evaluate import prepared_split_ids
from semilla.models.lora import load_adapter, merge_and_unload
from semilla.tokenizer import Tokenizer
from semilla.train import train
from semilla.train_metrics import loss_fn

FINETUNE = {k: v for k, v in TINY_TRAIN.items() if k != "block_size"}
SYMPTOMS = ["fiebre", "tos", "dolor de cabeza", "cansancio", "mareo", "dolor de espalda", "gripe", "catarro"]
REMEDIES = ["reposo y agua", "paracetamol", "dormir bien", "ir al medico", "calor y descanso"]


def domain_rows(n: int, offset: int = 0) -> list[dict]:
    """A clinic's conversations: the assistant always answers in one fixed pattern."""
    rows = []
    for i in range(offset, offset + n):
        symptom, remedy = SYMPTOMS[i % len(SYMPTOMS)], REMEDIES[(i // 3) % len(REMEDIES)]
        answer = f"para la {symptom} le recomiendo {remedy}, y vuelva si sigue la {symptom}."
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": f"tengo {symptom}"},
                    {"role": "assistant", "content": answer},
                ]
            }
        )
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def base(tmp_path_factory, prepared_dir):
    """A tiny llama trained on the Quijote long enough to know its letters."""
    root = tmp_path_factory.mktemp("lora-base")
    train(*tiny_configs(prepared_dir, root / "run", max_iters=600, eval_interval=600, warmup_iters=10, block_size=128,
                        batch_size=8, save_interval=600, sample_interval=1000, log_interval=50))  # fmt: skip
    return root / "run" / "best"


def held_out_loss(model, tok, rows: list[dict]) -> float:
    """Mean loss over the assistant turns of `rows`."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids, mask = tok.encode_chat(row["messages"])
            x, y = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
            y[0, ~torch.tensor(mask[1:], dtype=torch.bool)] = -100
            n = int((y != -100).sum())
            total += float(loss_fn(model(x), y)) * n
            count += n
    return total / count


def test_an_adapter_learns_its_domain(base, tmp_path):
    data = write_jsonl(tmp_path / "clinic.jsonl", domain_rows(200))
    result = semilla.finetune(base, str(data), tmp_path / "adapters" / "clinica", lora_r=8, lora_alpha=16,
                              target_modules="all-linear", **{**FINETUNE, "max_iters": 120, "eval_interval": 40,
                              "learning_rate": 1e-2, "warmup_iters": 10, "batch_size": 8, "eval_iters": 4})  # fmt: skip
    adapter = Path(result["adapter"])
    assert (adapter / "adapter_config.json").is_file() and (adapter / "last" / "trainer_state.json").is_file()
    rows = [json.loads(line) for line in (adapter / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "val"] == [40, 80, 120]
    plain, tok, _ = load_checkpoint(base)
    tuned, _, _ = load_checkpoint(base)
    load_adapter(tuned, adapter)
    held_out = domain_rows(24, offset=1000)  # other conversations of the same clinic
    before, after = held_out_loss(plain, tok, held_out), held_out_loss(tuned, tok, held_out)
    assert after < 0.5 * before  # measured: 2.38 -> 0.83


def test_only_the_adapter_changes_and_the_run_resumes(base, tmp_path):
    data = write_jsonl(tmp_path / "clinic.jsonl", domain_rows(60))
    out = tmp_path / "a"
    settings = {**FINETUNE, "max_iters": 4, "save_interval": 2}
    semilla.finetune(base, str(data), out, lora_r=4, **settings)
    keys = set(load_file(out / "adapter_model.safetensors"))
    assert keys and all(".lora_A." in k or ".lora_B." in k for k in keys)
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["r"], config["target_modules"]) == (4, ["q_proj", "v_proj"])
    assert not (out / "config.json").exists()  # the top is a PEFT directory, not a checkpoint
    more = semilla.finetune(None, "", out, resume=True, max_iters=6)
    assert more["step"] == 6
    model, _, _ = load_checkpoint(base)
    load_adapter(model, out / "last")
    trained = merge_and_unload(model).state_dict()
    frozen, _, _ = load_checkpoint(base)
    changed = [k for k, v in frozen.state_dict().items() if not torch.equal(v, trained[k])]
    assert changed and all(k.endswith(("q_proj.weight", "v_proj.weight")) for k in changed)


def test_an_existing_adapter_is_not_overwritten(base, tmp_path):
    data = write_jsonl(tmp_path / "clinic.jsonl", domain_rows(60))
    semilla.finetune(base, str(data), tmp_path / "a", lora_r=2, **{**FINETUNE, "max_iters": 2})
    with pytest.raises(CheckpointError, match="already holds a run"):
        semilla.finetune(base, str(data), tmp_path / "a", lora_r=2, **{**FINETUNE, "max_iters": 2})
    semilla.finetune(
        base, str(data), tmp_path / "a", lora_r=2, overwrite=True, **{**FINETUNE, "max_iters": 2}
    )


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lora-r", "0"], "rank r must be a positive integer"),
        (["--lora-r", "-3"], "rank r must be a positive integer"),
        (["--target-modules", "q_proj,attn"], "unknown LoRA target module attn"),
    ],
)
def test_finetune_cli_bad_settings_are_one_line(base, tmp_path, flags, message):
    data = write_jsonl(tmp_path / "clinic.jsonl", domain_rows(10))
    proc = run_cli("finetune", str(base), "--data", str(data), "-o", str(tmp_path / "a"), *flags)
    assert_one_line_error(proc, message)
    assert not (tmp_path / "a").exists()


def test_finetune_cli_writes_a_peft_adapter(base, tmp_path):
    data = write_jsonl(tmp_path / "clinic.jsonl", domain_rows(40))
    flags = [
        "--max-iters",
        "2",
        "--eval-interval",
        "2",
        "--eval-iters",
        "1",
        "--batch-size",
        "2",
        "--no-progress",
    ]
    proc = run_cli("finetune", str(base), "--data", str(data), "-o", str(tmp_path / "a"), "--lora-r", "2",
                   "--lora-alpha", "4", "--target-modules", "q_proj,k_proj", "--device", "cpu", "--json", *flags)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout.splitlines()[-1])["adapter"] == str(tmp_path / "a")
    config = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["target_modules"]) == (2, 4, ["q_proj", "k_proj"])


def test_lora_needs_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="lora_r needs init_from"):
        train(*tiny_configs(tmp_path, tmp_path / "run", lora_r=4))


def test_general_data_can_be_replayed_in_a_fine_tune(base, tmp_path, prepared_dir):
    """`--data chats.jsonl:0.5,general:0.5`: the general data mixed in (what keeps an adapter from
    forgetting the rest; bench/README.md) is read with the base model's tokenizer."""
    data = write_jsonl(tmp_path / "clinic.jsonl", domain_rows(40))
    out = tmp_path / "a"
    result = semilla.finetune(base, f"{data}:0.5,{prepared_dir}:0.5", out, lora_r=2, **FINETUNE)
    assert result["step"] == FINETUNE["max_iters"] and (out / "adapter_model.safetensors").is_file()
    _, tok, _ = load_checkpoint(base)
    assert Tokenizer.load(out / "data_0").same_encoding(tok)  # the chats, prepared for this model
    mixed = MixtureDataset(
        [TokenDataset(out / "data_0", "train", True), TokenDataset(prepared_dir, "train")], [0.5, 0.5]
    )
    x, y = mixed.random_batch(16, 32, torch.Generator().manual_seed(0))
    assert (y == -100).any() and (y != -100).all(dim=1).any()  # chat rows masked, general rows whole


@pytest.fixture(scope="module")
def quijote_base(tmp_path_factory):
    """(prepared Quijote, a tiny llama trained 600 steps on all of it: about 3 epochs, not overfit)."""
    root = tmp_path_factory.mktemp("lora-quijote")
    prepare([str(DEMO_TEXT)], str(root / "data"))
    train(*tiny_configs(root / "data", root / "run", max_iters=600, eval_interval=600, warmup_iters=10, block_size=128,
                        batch_size=8, save_interval=600, sample_interval=1000, log_interval=50))  # fmt: skip
    return root / "data", root / "run" / "best"


def general_loss(model, ids: torch.Tensor, block: int = 128) -> float:
    """Mean cross-entropy over `ids` in consecutive windows of `block` tokens."""
    total = count = 0.0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, block):
            window = ids[start : start + block + 1]
            total += float(F.cross_entropy(model(window[None, :-1])[0], window[1:], reduction="sum"))
            count += len(window) - 1
    return total / count


@pytest.mark.slow
def test_an_adapter_learns_its_domain_and_keeps_the_rest_with_replay(quijote_base, tmp_path):
    """Replay (70% of the rows from the base's own training data), rank 4: the clinic's held-out
    loss drops by more than a quarter while the Quijote's validation loss rises at most 2%
    (measured: -29.6% and +1.9%; without replay +19%: bench/README.md)."""
    data, base = quijote_base
    clinic = write_jsonl(tmp_path / "clinic.jsonl", domain_rows(200))
    settings = dict(lora_r=4, lora_alpha=8, target_modules="all-linear", learning_rate=2e-3, min_lr=1e-4,
                    batch_size=16, max_iters=200, eval_interval=25, early_stopping_patience=3, eval_iters=4,
                    warmup_iters=10, log_interval=20, save_interval=1000, sample_interval=1000)  # fmt: skip
    semilla.finetune(base, f"{clinic}:0.3,{data}:0.7", tmp_path / "a", **{**FINETUNE, **settings})
    plain, tok, _ = load_checkpoint(base)
    tuned, _, _ = load_checkpoint(base)
    load_adapter(tuned, tmp_path / "a")
    held_out, ids = domain_rows(24, offset=1000), prepared_split_ids(data, "val")
    assert held_out_loss(tuned, tok, held_out) < 0.75 * held_out_loss(plain, tok, held_out)
    assert general_loss(tuned, ids) <= 1.02 * general_loss(plain, ids)


def test_a_fine_tune_trains_on_from_an_adapter_of_the_same_shape(base, tmp_path):
    """--lora-from: the new run starts with the adapter's weights (its first evaluation is the
    adapter's loss, not the base's), and an adapter of another rank is refused in one line."""
    data = write_jsonl(tmp_path / "clinic.jsonl", domain_rows(40))
    first = semilla.finetune(base, str(data), tmp_path / "a", lora_r=2, **{**FINETUNE, "learning_rate": 1e-2})
    one_step = {**FINETUNE, "max_iters": 1, "learning_rate": 1e-9, "min_lr": 0.0, "warmup_iters": 0}
    fresh = semilla.finetune(base, str(data), tmp_path / "b", lora_r=2, **one_step)
    started = semilla.finetune(base, str(data), tmp_path / "c", lora_r=2, lora_from=str(tmp_path / "a" / "last"),
                               **one_step)  # fmt: skip
    assert started["val_loss"] == pytest.approx(first["val_loss"], abs=1e-3)
    assert fresh["val_loss"] - started["val_loss"] > 0.05  # measured: 2.50 fresh, 2.35 trained on
    with pytest.raises(ConfigError, match="r=2.*give the same lora_r"):
        semilla.finetune(
            base, str(data), tmp_path / "d", lora_r=4, lora_from=str(tmp_path / "a" / "last"), **FINETUNE
        )
