"""Learn and judge: a candidate trained from the current model on the teacher's examples mixed
with replayed original data, then promoted only if it recalls more of the round's facts, keeps
the facts of earlier rounds, and its original validation perplexity rises at most max_ppl_rise
over the run's own model's.

With `into_adapter` the candidate is a LoRA adapter trained on from the current one (the base
model frozen); the gate judges base + adapter, and a promotion replaces the adapter directory.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from pathlib import Path
from typing import Any

from semilla.api import LanguageModel
from semilla.atomic import atomic_directory, existing_dir
from semilla.checkpoint import resolve_checkpoint
from semilla.evaluate import likelihood_metrics, prepared_split_ids
from semilla.learn.config import LearnConfig
from semilla.learn.gaps import recall
from semilla.learn.journal import Journal
from semilla.models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS, LINEAR_MODULES, read_adapter_config

CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json")
ADAPTER_FILES = (ADAPTER_CONFIG, ADAPTER_WEIGHTS)


def train_candidate(
    journal: Journal, current: Path, datasets: list[Path], original: Path, cfg: LearnConfig
) -> dict[str, Any]:
    """Train RUN/learn/candidate from `current` on `datasets` (chat JSONL) mixed with `original`
    (prepared, replay_fraction of each batch); returns the compute used."""
    from semilla.config import TrainConfig
    from semilla.data import prepare
    from semilla.errors import SemillaError
    from semilla.finetuning import finetune
    from semilla.train import train
    from semilla.train_inputs import checkpoint_model_config, init_model_config

    new_data = journal.root / "candidate_data"
    prepare([str(p) for p in datasets], str(new_data), split=(1.0, 0.0, 0.0), tokenizer_from=str(current),
            overwrite=True)  # fmt: skip
    settings = dict(
        max_iters=cfg.train_steps,
        batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        min_lr=cfg.learning_rate / 10,
        warmup_iters=min(20, cfg.train_steps // 10),
        eval_interval=cfg.train_steps,
        eval_iters=4,
        save_interval=cfg.train_steps,
        sample_interval=cfg.train_steps * 10,
        log_interval=max(1, cfg.train_steps // 10),
        seed=cfg.seed,
        device=cfg.device,
        progress=False,
    )
    data = f"{new_data}:{1 - cfg.replay_fraction:g},{original}:{cfg.replay_fraction:g}"
    started = time.perf_counter()
    if cfg.into_adapter:  # the base stays; the adapter trains on from the current one
        adapter = current_adapter(cfg)
        result = finetune(current, data, journal.candidate, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                          target_modules=cfg.target_modules, lora_from=str(adapter) if adapter else "",
                          overwrite=True, **settings)  # fmt: skip
    else:
        train_cfg = TrainConfig(data=data, out_dir=str(journal.candidate), init_from=str(current), **settings)
        problems = train_cfg.problems()
        if problems:
            raise SemillaError("invalid training settings: " + "; ".join(problems))
        result = train(init_model_config(str(current), {}), train_cfg, overwrite=True)
    if result["interrupted"]:
        raise KeyboardInterrupt
    block_size = checkpoint_model_config(current).block_size
    return {
        "train_steps": result["step"],
        "train_tokens": result["step"] * cfg.batch_size * block_size,
        "train_seconds": round(time.perf_counter() - started, 2),
    }


def validation_ppl(lm: LanguageModel, original: Path, max_tokens: int) -> float:
    """Perplexity of the original data's validation split (its first max_tokens tokens)."""
    ids = prepared_split_ids(original, "val")
    return likelihood_metrics(lm, ids, n_chars=len(ids), max_tokens=max_tokens)["perplexity"]


def measure(
    lm: LanguageModel, facts: list[dict], held_out: list[dict], original: Path, cfg: LearnConfig
) -> dict:
    return {
        "recall": recall(lm, facts, cfg.max_answer_tokens),
        "held_out_recall": recall(lm, held_out, cfg.max_answer_tokens) if held_out else None,
        "val_ppl": validation_ppl(lm, original, cfg.val_tokens),
    }


def judge(before: dict, after: dict, baseline_ppl: float, cfg: LearnConfig) -> dict[str, Any]:
    """The gate's decision and its reasons: {"promote", "reasons", "before", "after"}."""
    reasons = []
    if after["recall"] <= before["recall"]:
        reasons.append(
            f"recall of the round's facts did not improve ({before['recall']:.2f} -> {after['recall']:.2f})"
        )
    if (
        before["held_out_recall"] is not None
        and after["held_out_recall"] < before["held_out_recall"] - cfg.max_fact_drop
    ):
        reasons.append(
            f"recall of earlier facts fell ({before['held_out_recall']:.2f} -> {after['held_out_recall']:.2f})"
        )
    limit = baseline_ppl * (1 + cfg.max_ppl_rise)
    if after["val_ppl"] > limit:
        reasons.append(
            f"validation perplexity {after['val_ppl']:.4f} > {limit:.4f} (baseline {baseline_ppl:.4f})"
        )
    return {
        "enabled": cfg.gate,
        "promote": not reasons or not cfg.gate,
        "reasons": reasons,
        "before": before,
        "after": after,
        "baseline_ppl": baseline_ppl,
    }


def candidate_checkpoint(journal: Journal) -> Path:
    return resolve_checkpoint(journal.candidate, prefer="last")


def candidate_adapter(journal: Journal) -> Path:
    return journal.candidate / "last"  # a LoRA run's last/ is its adapter


def current_adapter(cfg: LearnConfig) -> Path | None:
    """The adapter --into-adapter names, once it holds one (a crash mid-swap: the previous one)."""
    found = existing_dir(cfg.into_adapter) if cfg.into_adapter else None
    return found if found and (found / ADAPTER_CONFIG).is_file() else None


def adapter_settings(cfg: LearnConfig) -> LearnConfig:
    """`cfg` with the rank, scale and layers of the adapter into_adapter already holds: the
    rounds train that adapter on. A directory there that is not an adapter is refused."""
    from semilla.errors import SemillaError

    path = Path(cfg.into_adapter) if cfg.into_adapter else None
    if path is None or current_adapter(cfg) is None:
        if path is not None and path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise SemillaError(
                f"--into-adapter {path} exists and is not a LoRA adapter; name a new directory"
            )
        return cfg
    lora, raw = read_adapter_config(current_adapter(cfg))
    targets = raw.get("target_modules")
    named = isinstance(targets, list) and targets and all(t in LINEAR_MODULES for t in targets)
    return dataclasses.replace(cfg, lora_r=lora.r, lora_alpha=lora.alpha,
                               target_modules=",".join(targets) if named else cfg.target_modules)  # fmt: skip


def promote(journal: Journal, cfg: LearnConfig) -> None:
    """The candidate becomes current (an atomic swap; the old one is dropped): its weights
    RUN/learn/best, or with into_adapter its adapter that directory."""
    if cfg.into_adapter:
        source, dest, names = candidate_adapter(journal), Path(cfg.into_adapter), ADAPTER_FILES
    else:
        source, dest, names = candidate_checkpoint(journal), journal.best, CHECKPOINT_FILES
    with atomic_directory(dest) as tmp:
        for name in names:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)


def discard_candidate(journal: Journal) -> None:
    for path in (journal.candidate, journal.root / "candidate_data"):
        shutil.rmtree(path, ignore_errors=True)
