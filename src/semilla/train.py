"""Training: setup() wires data, model and optimizer; fit() is one flat loop.

A run directory holds `last/` (resumable checkpoint), `best/` (lowest validation loss),
`metrics.jsonl` (one JSON object per log line) and `tb/` (TensorBoard events).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import signal
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semilla.ages import stage_end
from semilla.atomic import atomic_directory, atomic_write_text
from semilla.batches import IGNORE_INDEX, MixtureDataset, TokenDataset
from semilla.board import Board
from semilla.checkpoint import (
    OptimizerState,
    optimizer_state_by_name,
    save_checkpoint,
    write_optimizer_tensors,
)
from semilla.config import ModelConfig, TrainConfig
from semilla.distributed import (
    any_rank,
    full_model_state,
    full_optimizer_state,
    gather_to_main,
    leave,
    lost_a_process,
    micro_steps,
    sum_over_ranks,
    sync_gradients,
    world_from_env,
)
from semilla.errors import SemillaError
from semilla.models import count_parameters
from semilla.models.lora import (
    write_adapter,
)
from semilla.train_insight import TrainingInsight
from semilla.train_metrics import batch_metrics, loss_fn, mean_metrics, metric_sums, peak_memory_mb
from semilla.train_setup import (
    Trainer,
    grow_trainer,
    lora_config,
    pack_state,
    rng_key,
    setup,
)

log = logging.getLogger(__name__)


# --- the loop -----------------------------------------------------------------------------


def lr_at(step: int, cfg: TrainConfig, lr_scale: float, grown_at: int | None = None) -> float:
    """Linear warmup, then cosine decay to min_lr (or constant, or the plateau factor); after
    a growth (at step `grown_at`) a short linear re-warmup to that value."""
    if grown_at is not None and 0 <= step - grown_at < cfg.grow_warmup_iters:
        return lr_at(step, cfg, lr_scale) * (step - grown_at + 1) / (cfg.grow_warmup_iters + 1)
    if step < cfg.warmup_iters:
        return cfg.learning_rate * (step + 1) / (cfg.warmup_iters + 1)
    if cfg.lr_schedule == "constant":
        return cfg.learning_rate
    if cfg.lr_schedule == "plateau":
        return max(cfg.learning_rate * lr_scale, cfg.plateau_min_lr)
    progress = min(1.0, (step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters))
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.learning_rate - cfg.min_lr)


@torch.no_grad()
def evaluate_loss(t: Trainer, data: TokenDataset | MixtureDataset) -> dict[str, float]:
    """Metrics over the counted targets of eval_iters batches drawn with a fixed seed (same
    batches every time); the ranks of a distributed run share the batches and sum the metrics."""
    t.model.eval()
    gen = torch.Generator().manual_seed(t.config.seed + 1)
    totals = dict.fromkeys(("loss", "acc", "top5_acc", "count"), 0.0)
    for i in range(t.config.eval_iters):
        x, y = data.random_batch(t.config.batch_size, t.model_config.block_size, gen)
        mine = i % t.world.size == t.world.rank  # drawn all the same: every rank's generator moves alike
        if not (mine or t.config.fsdp):  # a sharded model's forward is a collective: all ranks run it
            continue
        x, y = x.to(t.device), y.to(t.device)
        with torch.autocast(t.device.type, dtype=t.autocast_dtype, enabled=t.autocast_dtype is not None):
            logits = t.forward(x)
        for k, v in metric_sums(logits, y).items():
            totals[k] += v if mine else 0.0
    t.model.train()
    return mean_metrics(
        dict(zip(totals, sum_over_ranks(t.world, list(totals.values()), t.device), strict=True))
    )


@torch.no_grad()
def sample_text(t: Trainer, n_tokens: int) -> str:
    """A short continuation of <bos> for the terminal and TensorBoard, with its own RNG
    (training is unaffected)."""
    t.model.eval()
    gen = torch.Generator(device=t.device).manual_seed(t.config.seed)
    n_tokens = min(n_tokens, t.model_config.block_size - 1)
    cache = t.model.new_cache(1, n_tokens + 1)
    ids = [t.tokenizer.bos_id]
    for pos in range(n_tokens):
        x = torch.tensor([[ids[-1]]], device=t.device)
        logits = t.model(x, torch.tensor([pos], device=t.device), cache)[0, -1].float()
        ids.append(int(torch.multinomial(torch.softmax(logits / 0.8, -1), 1, generator=gen)))
    t.model.train()
    return t.tokenizer.decode(ids[1:], skip_special_tokens=True)


def save(t: Trainer, name: str) -> None:
    """Save `name` (last/: resumable) from rank 0; every rank calls it, as last/ gathers every
    rank's RNG states."""
    resumable = name == "last"
    if resumable:
        t.state.rng = {k: v for states in gather_to_main(t.world, rank_rng(t)) for k, v in states.items()}
        t.state.world_size = t.world.size
    weights, optimizer_state = None, None
    if t.config.fsdp:  # gathered whole on rank 0: the checkpoint is the same single directory
        weights = full_model_state(t.model)
        if resumable:
            full = full_optimizer_state(t.model, t.optimizer)  # {} but on rank 0
            optimizer_state = OptimizerState(full["state"], full["param_groups"]) if full else None
    elif resumable and not t.config.lora_r:
        optimizer_state = optimizer_state_by_name(t.optimizer, t.model)
    if not t.world.main:
        return
    if t.config.lora_r:
        save_adapter_run(t, resumable)
        return
    save_checkpoint(
        t.run_dir / name, t.model, t.tokenizer, t.config,
        trainer_state=asdict(t.state) if resumable else None, optimizer_state=optimizer_state, weights=weights,
    )  # fmt: skip


def rank_rng(t: Trainer) -> dict[str, str]:
    """This rank's RNG states: its torch (and CUDA) generator and the data streams it draws from."""
    rank = t.world.rank
    states = {rng_key("torch", rank): pack_state(torch.get_rng_state())}
    if t.device.type == "cuda":
        states[rng_key("cuda", rank)] = pack_state(torch.cuda.get_rng_state(t.device))
    for j in micro_steps(t.world, len(t.data_rngs)):
        states[rng_key("data", j)] = pack_state(t.data_rngs[j].get_state())
    return states


def save_adapter_run(t: Trainer, resumable: bool) -> None:
    """A LoRA run saves adapters, not models: the best one as the PEFT directory at the top of
    the run directory, and last/ (an adapter too) with what a resume needs."""
    cfg = lora_config(t.config)
    if not resumable:  # the config never changes within a run: replacing the weights file is atomic
        write_adapter(t.run_dir, t.model, cfg, t.config.init_from)
        return
    with atomic_directory(t.run_dir / "last") as tmp:
        write_adapter(tmp, t.model, cfg, t.config.init_from)
        config = {"model": asdict(t.model_config), "train": asdict(t.config)}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        (tmp / "trainer_state.json").write_text(
            json.dumps(asdict(t.state), indent=2) + "\n", encoding="utf-8"
        )
        write_optimizer_tensors(tmp, optimizer_state_by_name(t.optimizer, t.model))


class StopFlag:
    """Ctrl-C / SIGTERM ask the loop to save and stop after the current step; twice aborts."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopFlag:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: signals stay as they are
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def keep_metrics_until(path: Path, step: int) -> None:
    """Drop the rows past `step` (logged after the checkpoint a resume starts from, and logged
    again now) and any line a kill cut short, so each (kind, step) appears once."""
    if not path.is_file():
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                kept.append(line if line.endswith("\n") else line + "\n")
    atomic_write_text(path, "".join(kept))


def fit(t: Trainer) -> dict[str, Any]:
    """Train until max_iters, early stopping or Ctrl-C; returns the final metrics. In a
    distributed run every rank steps together and rank 0 alone writes and reports."""
    from tqdm import tqdm

    cfg, st, main = t.config, t.state, t.world.main
    if main:
        # a resume drops the events a killed run logged past its checkpoint (those at its step stay)
        writer = Board(t.run_dir / "tb", purge_step=st.step + 1 if st.step else None)
        keep_metrics_until(t.run_dir / "metrics.jsonl", st.step)
        metrics_log = open(t.run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
    # histograms, projector, gradient-norm spikes (train_insight.py); none in a sharded run
    insight = TrainingInsight(t, writer) if main and not cfg.fsdp else None
    bar = tqdm(
        total=cfg.max_iters,
        initial=st.step,
        disable=not (cfg.progress and main),
        desc="training",
        unit="it",
        dynamic_ncols=True,
    )

    def record(kind: str, values: dict[str, float], step: int | None = None) -> None:
        if not main:
            return
        step = st.step if step is None else step
        row = {
            "kind": kind,
            "step": step,
            "time": round(time.time(), 3),
            **{k: round(v, 6) for k, v in values.items()},
        }
        metrics_log.write(json.dumps(row) + "\n")
        metrics_log.flush()
        for k, v in values.items():
            writer.add_scalar(f"{kind}/{k}", v, step)
        line = " ".join(f"{k} {v:.4g}" for k, v in values.items())
        say(f"step {step} {kind}: {line}")

    def say(text: str) -> None:  # above the progress bar, or to the log without one
        if main:
            (bar.write if cfg.progress else log.info)(text)

    t.model.train()
    last: dict[str, float] = {}
    compiling = t.compiled
    window_start, window_tokens = time.perf_counter(), 0
    stopped = False  # a Ctrl-C or SIGTERM, seen by any rank
    with StopFlag() as stop:
        while st.step < cfg.max_iters:
            if any_rank(t.world, stop.requested, t.device):  # every rank stops at the same step
                stopped = True
                break
            # 0. an age just ended (here, or before the checkpoint a resume starts from): grow
            if age_ended(t):
                end_age(t, record)
            step_start = time.perf_counter()
            block = t.model_config.block_size  # ages may grow the context
            tokens_per_step = cfg.batch_size * cfg.grad_accum * block  # over all ranks
            # 1. learning rate for this step
            grown_at = stage_end(t.stages, st.stage - 1) if st.stage else None
            lr = lr_at(st.step, cfg, st.lr_scale, grown_at)
            for group in t.optimizer.param_groups:
                group["lr"] = lr
            # 2. forward and backward over this rank's share of the grad_accum micro-batches
            # (micro-batch j draws from stream j, whichever rank computes it): the loss is the
            # mean over the step's counted targets on all ranks (chat masks leave micro-batches
            # unequal), times the world size as DDP averages the ranks' gradients
            batches = [
                t.train_data.random_batch(cfg.batch_size, block, t.data_rngs[j])
                for j in micro_steps(t.world, cfg.grad_accum)
            ]
            counted = sum(int((y != IGNORE_INDEX).sum()) for _, y in batches)
            counted = max(1, int(sum_over_ranks(t.world, [counted], t.device)[0])) / t.world.size
            for i, (x, y) in enumerate(batches):
                x, y = x.to(t.device, non_blocking=True), y.to(t.device, non_blocking=True)
                with sync_gradients(t.train_forward, last=i == len(batches) - 1):
                    with torch.autocast(
                        t.device.type, dtype=t.autocast_dtype, enabled=t.autocast_dtype is not None
                    ):
                        logits = t.train_forward(x)
                        loss = loss_fn(logits, y, cfg.label_smoothing, counted)
                    loss.backward()
            # 3. clip, step
            grad_norm = nn.utils.clip_grad_norm_(
                t.model.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf
            )
            if insight:  # the step's norm, and its gradients when an evaluation follows it
                insight.after_clip(st.step + 1, grad_norm)
            t.optimizer.step()
            t.optimizer.zero_grad(set_to_none=True)
            st.step += 1
            st.tokens_seen += tokens_per_step
            st.elapsed_s += time.perf_counter() - step_start
            if compiling:  # the first step of a compiled model waits for the compilation
                compiling = False
                say(f"compiled the model in {time.perf_counter() - step_start:.1f} s (torch.compile; "
                    "its cache makes the next run's shorter; --no-compile trains without it)")  # fmt: skip
            window_tokens += tokens_per_step
            bar.update(1)
            # 4. log
            if st.step % cfg.log_interval == 0:
                now = time.perf_counter()
                last = batch_metrics(logits, y)
                last.update(
                    lr=lr,
                    grad_norm=float(
                        grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
                    ),
                    tokens_per_s=window_tokens / max(now - window_start, 1e-9),
                    memory_mb=peak_memory_mb(t.device),
                )
                record("train", last)
                if insight:
                    insight.flag_spikes(record)
                bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{lr:.2e}")
                window_start, window_tokens = time.perf_counter(), 0
            # 5. evaluate: best/, plateau schedule, early stopping
            if st.step % cfg.eval_interval == 0 or st.step == cfg.max_iters:
                val = evaluate_loss(t, t.val_data)
                record("val", val)
                if insight:
                    insight.histograms(st.step)
                last.update({f"val_{k}": v for k, v in val.items()})
                if val["loss"] < st.best_val_loss:
                    st.best_val_loss, st.evals_since_best = val["loss"], 0
                    save(t, "best")
                else:
                    st.evals_since_best += 1
                if val["ppl"] < st.plateau_best:
                    st.plateau_best, st.plateau_bad_evals = val["ppl"], 0
                else:
                    st.plateau_bad_evals += 1
                    if cfg.lr_schedule == "plateau" and st.plateau_bad_evals > cfg.plateau_patience:
                        st.lr_scale *= cfg.plateau_factor
                        st.plateau_bad_evals = 0
                if cfg.early_stopping_patience and st.evals_since_best >= cfg.early_stopping_patience:
                    st.stopped_early = True
                    if main:
                        log.info(
                            "early stopping: no validation improvement in %d evaluations",
                            st.evals_since_best,
                        )
                    break
                window_start = time.perf_counter()
            # 6. a text sample, in the terminal and in TensorBoard
            if st.step % cfg.sample_interval == 0 and (main or cfg.fsdp):  # sharded: every rank samples
                sample = sample_text(t, cfg.sample_tokens)
                if main:
                    writer.add_text("sample", sample, st.step)
                    say(f"step {st.step} sample: " + sample.replace("\n", "\n    "))
            # 7. periodic checkpoint
            if st.step % cfg.save_interval == 0:
                save(t, "last")
        if age_ended(t):  # the last age, or one whose end a Ctrl-C met
            end_age(t, record)
        save(t, "last")
    bar.close()
    if insight:
        insight.flag_spikes(record)
        insight.embeddings(st.step)
    if main:
        writer.close()
        metrics_log.close()
    if stopped and main:
        log.warning("interrupted at step %d; resume with: semilla train --resume %s", st.step, t.run_dir)
    return {
        "step": st.step,
        "run_dir": str(t.run_dir),
        "best_val_loss": st.best_val_loss,
        "interrupted": stopped,
        **last,
    }


def age_ended(t: Trainer) -> bool:
    """Whether the age being trained has had all its steps but was not ended (kept, grown) yet."""
    st = t.state
    return bool(t.stages) and st.step == stage_end(t.stages, st.stage) and len(st.ages) <= st.stage


def end_age(t: Trainer, record) -> None:
    """Save `ages/NAME_final/`, note the age in the run's history, and grow into the next age."""
    st, stage = t.state, t.stages[t.state.stage]
    val = evaluate_loss(t, t.val_data)
    save(t, f"ages/{stage.name}_final")
    cfg = t.model_config
    st.ages.append({
        "age": stage.name, "step": st.step, "parameters": count_parameters(t.model),
        "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "val_loss": round(val["loss"], 6),
    })  # fmt: skip
    if st.stage + 1 == len(t.stages):
        return
    st.stage += 1
    grow_trainer(t, t.stages[st.stage])
    record("grow", {"stage": st.stage, "parameters": count_parameters(t.model)})
    save(t, "last")  # a resume after this point starts from the grown model


class TrainingAborted(SemillaError):
    """A distributed run lost one of its processes; the others stop and keep last/."""


def train(
    model_config: ModelConfig, config: TrainConfig, resume: str | None = None, overwrite: bool = False
) -> dict[str, Any]:
    """Train a model (or resume a run) and return its final metrics. The Python API of `semilla
    train`. A new run in an `out_dir` that holds one needs `overwrite`. Under torchrun, each
    process trains its share of every step and rank 0 writes the run."""
    world = world_from_env()
    try:
        t = setup(model_config, config, resume, overwrite)
        if world.main:
            log.info(
                "model: %s parameters; data: %s train tokens; %s; run dir: %s",
                f"{count_parameters(t.model):,}",
                f"{t.train_data.n_tokens:,}",
                f"{world.size} processes" if world.distributed else "one process",
                t.run_dir,
            )
        result = fit(t)
        # no rank tears the process group down while another still works in it (rank 0
        # writing the last checkpoint): a rank leaving early was seen to abort in gloo's teardown
        any_rank(world, False, t.device)
        return result
    except RuntimeError as e:  # another rank died (killed, out of memory) or hung
        if not (world.distributed and lost_a_process(e)):
            raise
        raise TrainingAborted(
            f"process {world.rank} of {world.size} stopped: another process of the run is gone; "
            f"the last checkpoint is intact: semilla train --resume {resume or config.out_dir}"
        ) from e
    finally:
        leave()
