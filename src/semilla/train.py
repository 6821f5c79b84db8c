"""Training: setup() wires data, model and optimizer; fit() is one flat loop.

A run directory holds `last/` (resumable checkpoint), `best/` (lowest validation loss),
`metrics.jsonl` (one JSON object per log line) and `tb/` (TensorBoard events).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import logging
import math
import os
import re
import resource
import shutil
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from semilla.ages import AGE_SETTINGS, Stage, check_growth, plan_stages, stage_end
from semilla.atomic import atomic_directory, atomic_write_text, existing_dir
from semilla.checkpoint import (
    OptimizerState,
    load_checkpoint,
    load_optimizer_state,
    optimizer_state_by_name,
    read_optimizer_tensors,
    save_checkpoint,
    write_optimizer_tensors,
)
from semilla.config import ModelConfig, TrainConfig, apply_overrides, model_config_from_dict
from semilla.data import IGNORE_INDEX, MixtureDataset, TokenDataset
from semilla.distributed import (
    World,
    any_rank,
    check_batch_split,
    check_sharding,
    data_parallel,
    full_model_state,
    full_optimizer_state,
    gather_to_main,
    join,
    leave,
    load_full_optimizer_state,
    lost_a_process,
    micro_steps,
    shard_model,
    sum_over_ranks,
    sync_gradients,
    world_from_env,
)
from semilla.errors import CheckpointError, ConfigError, DataError, SemillaError
from semilla.models import build_model, count_parameters
from semilla.models.grow import grow_model, plan_growth
from semilla.models.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraConfig,
    apply_lora,
    load_adapter,
    write_adapter,
)
from semilla.tokenizer import Tokenizer
from semilla.train_inputs import (
    changed_fields,
    checkpoint_model_config,
    init_checkpoint,
    load_data,
    open_split,
)

log = logging.getLogger(__name__)


@dataclass
class TrainState:
    """Everything besides weights and optimizer moments that an exact resume needs."""

    step: int = 0
    tokens_seen: int = 0
    best_val_loss: float = math.inf
    evals_since_best: int = 0
    lr_scale: float = 1.0  # ReduceLROnPlateau's running factor
    plateau_best: float = math.inf
    plateau_bad_evals: int = 0
    elapsed_s: float = 0.0
    stopped_early: bool = False
    stages: list[dict[str, Any]] = field(default_factory=list)  # the ages' schedule (Stage fields)
    stage: int = 0  # index of the age (schedule stage) being trained
    ages: list[dict[str, Any]] = field(default_factory=list)  # one row per finished age
    # base64 RNG states: torch and cuda per rank ("torch", "torch_1", ...), data per micro-batch
    # stream ("data", "data_1", ...: the j-th micro-batch of every step draws from stream j)
    rng: dict[str, str] = field(default_factory=dict)
    world_size: int = 1  # processes the run was last trained with


@dataclass
class Trainer:
    model: nn.Module
    tokenizer: Tokenizer
    model_config: ModelConfig
    config: TrainConfig
    optimizer: torch.optim.Optimizer
    train_data: TokenDataset | MixtureDataset
    val_data: TokenDataset | MixtureDataset
    device: torch.device
    autocast_dtype: torch.dtype | None
    run_dir: Path
    state: TrainState
    data_rngs: list[torch.Generator]  # one stream per micro-batch of a step (grad_accum of them)
    forward: Any = None  # the (optionally compiled) model call
    stages: list[Stage] = field(default_factory=list)  # ages: shapes the model grows through
    world: World = field(default_factory=World)  # this process's rank among the run's processes
    train_forward: Any = None  # forward, wrapped in DDP when the run has several processes


# --- setup --------------------------------------------------------------------------------


def pick_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device cuda was asked for but no CUDA GPU is available")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device mps was asked for but MPS is not available")
    return torch.device(name)


def pick_autocast(dtype: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast on CUDA by default; fp32 on CPU, where bf16 is slower without AMX."""
    if dtype == "bfloat16" or (dtype == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on norms or biases)."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # the fused kernel is one pass over all parameters: ~20% of a small model's step on CPU
    fused = device.type in ("cpu", "cuda")
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.beta1, cfg.beta2), fused=fused)


PREPARED_DATA = re.compile(r"data(_\d+)?")  # raw text prepared into a run: data/, data_N/
RUN_FILES = (
    "last",
    "best",
    ".last.old",
    ".best.old",
    "metrics.jsonl",
    "tb",
    "ages",
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
)
# (what a run writes; a LoRA run's best adapter lies at the top, a PEFT directory)


def claim_run_dir(run_dir: Path, data: str, overwrite: bool) -> None:
    """A new run may not silently replace a trained one: an `out_dir` holding a checkpoint is
    an error naming --resume and --overwrite; with `overwrite`, the old run's files go."""
    last, best = existing_dir(run_dir / "last"), existing_dir(run_dir / "best")
    best = best or (run_dir if (run_dir / ADAPTER_CONFIG).is_file() else None)
    if not (last or best):
        return
    if not overwrite:
        state = (last or best) / "trainer_state.json"
        step = json.loads(state.read_text())["step"] if state.is_file() else None
        trained = f" (trained to step {step})" if step is not None else ""
        raise CheckpointError(
            f"{run_dir} already holds a run{trained}; continue it with --resume {run_dir}, "
            "or start again there with --overwrite"
        )
    sources = [Path(part.rsplit(":", 1)[0]).resolve() for part in data.split(",") if part]
    if any(src.is_relative_to(run_dir.resolve()) for src in sources):  # training on data kept here
        names = RUN_FILES
    else:  # the old run's prepared copies of its raw text: data/, data_N/
        names = RUN_FILES + tuple(p.name for p in run_dir.iterdir() if PREPARED_DATA.fullmatch(p.name))
    for name in names:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    log.info("--overwrite: removed the run in %s", run_dir)


def setup(
    model_config: ModelConfig, config: TrainConfig, resume: str | None = None, overwrite: bool = False
) -> Trainer:
    """Build a Trainer for a new run, or restore one from `resume` (a run directory). A new
    run in a directory that holds one needs `overwrite`."""
    run_dir = Path(resume or config.out_dir)
    state = TrainState()
    if resume:
        state = TrainState(**json.loads((last_checkpoint(run_dir) / "trainer_state.json").read_text()))
    # a run through ages keeps the schedule it started with; its length is the schedule's, and it
    # starts at the first age's shape, from scratch or from an --init-from checkpoint grown into it
    stages = [Stage(**s) for s in state.stages] if resume else plan_stages(config)
    stage_configs: list[ModelConfig] = []
    if stages:
        if config.early_stopping_patience:
            raise ConfigError("early stopping cannot be combined with ages: each age trains its steps")
        config = dataclasses.replace(config, max_iters=stage_end(stages, len(stages) - 1))
        state.stages = [dataclasses.asdict(s) for s in stages]
        if not resume:
            first = stages[0].config(model_config)
            stage_configs = check_growth(
                model_config if config.init_from else first, stages, config.grow_mode
            )
            model_config = model_config if config.init_from else first
    world = world_from_env()
    check_batch_split(world, config.grad_accum)
    if config.fsdp:
        check_sharding(world, model_config.arch)
    device = join(world, pick_device(config.device))
    if config.deterministic:
        torch.use_deterministic_algorithms(True)
    torch.manual_seed(config.seed)
    source = init_checkpoint(config.init_from) if config.init_from and not resume else None
    if not resume and world.main:  # after every check that can refuse the run: a refused run deletes nothing
        claim_run_dir(run_dir, config.data, overwrite)
    data = load_data_on_main_first(config, run_dir, source, world, device)
    # the run's config.json keeps absolute inputs, so `--resume` works from any directory
    config = dataclasses.replace(
        config,
        data=",".join(os.path.abspath(p) for p in config.data.split(",")),
        init_from=os.path.abspath(source) if source else config.init_from,
    )
    tokenizer = Tokenizer.load(source or data[0][0])
    if source and not Tokenizer.load(data[0][0]).same_encoding(tokenizer):
        raise DataError(
            f"{data[0][0]} was prepared with another tokenizer than the checkpoint {config.init_from}; "
            f"prepare the text with its tokenizer: semilla prepare ... --tokenizer-from {config.init_from}"
        )
    loss_mask = config.loss_on == "assistant"
    train_data = open_split(data, "train", loss_mask)
    val_data = open_split(data, "val", loss_mask)
    if not (resume or source):  # a new model: its vocabulary is the tokenizer's
        model_config = ModelConfig(**{**asdict(model_config), "vocab_size": tokenizer.vocab_size})
    if source:  # its shape and vocabulary (maybe padded past the tokenizer's) are the checkpoint's
        changed = changed_fields(checkpoint_model_config(source), model_config, ("dropout",))
        if changed:
            raise CheckpointError(
                f"--init-from {config.init_from}: the model differs from the checkpoint's "
                f"(semilla.train_inputs.init_model_config gives it): {', '.join(changed)}"
            )
    for block_size in {model_config.block_size, *(c.block_size for c in stage_configs)}:
        train_data.check_block_size(block_size)
        val_data.check_block_size(block_size)
    with torch.device(device):
        model = build_model(model_config)
    optimizer = make_optimizer(model, config, device)
    data_rngs = [torch.Generator().manual_seed(data_seed(config.seed, j)) for j in range(config.grad_accum)]
    if world.rank:  # the same weights everywhere, but each rank its own dropout
        torch.manual_seed(config.seed + world.rank)
    if resume:
        last = last_checkpoint(run_dir)
        if config.lora_r:  # an adapter run: the base model from init_from, the adapter from last/
            base, _, _ = load_checkpoint(config.init_from, device=device)
            model.load_state_dict(base.state_dict())
            load_adapter(model, last)
            optimizer = make_optimizer(model, config, device)
        else:
            restored, _, _ = load_checkpoint(last, device=device, prefer="last")
            model.load_state_dict(restored.state_dict())
        if not config.fsdp:  # a sharded model's optimizer is made and restored below
            load_optimizer_state(last, optimizer, model)
        restore_rng(state, world, device, data_rngs)
        log.info("resumed from step %d of %s", state.step, run_dir)
    elif source:  # weights only: the optimizer, schedule and step start fresh
        initial, _, _ = load_checkpoint(source, device=device)
        model.load_state_dict(initial.state_dict())
        if stages:  # ages from a checkpoint: grown into the first age's shape
            model = grow_model(model, stage_configs[0], mode=config.grow_mode, seed=config.seed).to(device)
            model_config, optimizer = model.config, make_optimizer(model.train(), config, device)
        if config.lora_r:  # the checkpoint's weights frozen; only the adapter trains
            apply_lora(model, lora_config(config))
            optimizer = make_optimizer(model, config, device)
    if config.fsdp:  # sharded once its weights are in place; the optimizer then holds shards too
        model = shard_model(model, world, device)
        optimizer = make_optimizer(model, config, device)
        if resume:
            saved = read_optimizer_tensors(last_checkpoint(run_dir))
            load_full_optimizer_state(
                model, optimizer, {"state": saved.state, "param_groups": saved.param_groups}
            )
    run_dir.mkdir(parents=True, exist_ok=True)
    t = Trainer(
        model, tokenizer, model_config, config, optimizer, train_data, val_data, device,
        pick_autocast(config.dtype, device), run_dir, state, data_rngs, stages=stages, world=world,
    )  # fmt: skip
    wrap_model(t)
    return t


def wrap_model(t: Trainer) -> None:
    """The model's calls: compiled if asked, and in DDP for the training steps of a
    distributed run (evaluation and samples call the model alone: no collectives in them)."""
    t.forward = torch.compile(t.model) if t.config.compile else t.model
    t.train_forward = t.forward if t.config.fsdp else data_parallel(t.forward, t.world, t.device)


def data_seed(seed: int, stream: int) -> int:
    """The seed of micro-batch stream `stream` (stream 0: the run's seed, as with one stream)."""
    return seed + 1_000_003 * stream


def load_data_on_main_first(
    config: TrainConfig, run_dir: Path, source: Path | None, world: World, device: torch.device
) -> list[tuple[Path, float]]:
    """load_data on rank 0 first (it may prepare raw text into the run), then on the others."""
    data = (
        load_data(config, run_dir, config.progress and world.main, tokenizer_from=source)
        if world.main
        else None
    )
    any_rank(world, False, device)  # a barrier: rank 0 has prepared the data
    return data or load_data(config, run_dir, False, tokenizer_from=source)


def restore_rng(
    state: TrainState, world: World, device: torch.device, data_rngs: list[torch.Generator]
) -> None:
    """Put back this rank's torch (and CUDA) RNG and its data streams. Resuming on another
    number of processes is supported: the data streams belong to micro-batches, not ranks, so
    the batches go on exactly; a rank the run did not have before starts a fresh dropout stream."""
    torch_key, cuda_key = rng_key("torch", world.rank), rng_key("cuda", world.rank)
    if torch_key in state.rng:
        torch.set_rng_state(_unpack(state.rng[torch_key]))
    if cuda_key in state.rng and device.type == "cuda":
        torch.cuda.set_rng_state(_unpack(state.rng[cuda_key]))
    for j, gen in enumerate(data_rngs):
        if rng_key("data", j) in state.rng:
            gen.set_state(_unpack(state.rng[rng_key("data", j)]))
    if state.world_size != world.size and world.main:
        log.info("resuming a run of %d process(es) on %d", state.world_size, world.size)


def rng_key(kind: str, index: int) -> str:
    """ "torch", "torch_1", ...: index 0 keeps a one-process run's plain name."""
    return kind if index == 0 else f"{kind}_{index}"


def lora_config(config: TrainConfig) -> LoraConfig:
    return LoraConfig(config.lora_r, config.lora_alpha, config.lora_dropout, config.target_modules)


def grow_trainer(t: Trainer, stage: Stage) -> None:
    """Grow the model to `stage`'s shape and its AdamW state with it (new moments zero, the step
    count kept), so training goes on where it was."""
    plan = plan_growth(t.model_config, stage.config(t.model_config), t.config.grow_mode)
    seed = t.config.seed + 1000 * (t.state.stage + 1)  # new weights: the same on every resume
    model = plan.grow_weights(t.model.state_dict(), seed).to(t.device).train()
    names = {p: n for n, p in t.model.named_parameters()}
    state = plan.grow_optimizer_state({names[p]: s for p, s in t.optimizer.state.items()})
    optimizer = make_optimizer(model, t.config, t.device)
    for name, p in model.named_parameters():
        if name in state:
            optimizer.state[p] = {k: v.to(p) if k != "step" else v for k, v in state[name].items()}
    t.train_data.check_block_size(model.config.block_size)
    t.model, t.model_config, t.optimizer = model, model.config, optimizer
    wrap_model(t)


def last_checkpoint(run_dir: Path) -> Path:
    """`run_dir/last`, or its previous version if a crash interrupted the last save's swap."""
    return existing_dir(run_dir / "last") or run_dir / "last"


def resume_configs(run_dir: str, overrides: dict[str, Any]) -> tuple[ModelConfig, TrainConfig]:
    """The configs a run was started with, with `overrides` applied to the training ones.

    Model shape cannot change on resume: an override of a model field that differs is an error.
    """
    if (Path(run_dir) / "config.json").is_file() and not existing_dir(Path(run_dir) / "last"):
        raise CheckpointError(
            f"{run_dir} is a checkpoint, not a run: pass the run directory that holds last/ "
            f"(--resume {Path(run_dir).parent})"
        )
    last = last_checkpoint(Path(run_dir))
    try:
        saved = json.loads((last / "config.json").read_text(encoding="utf-8"))
        (last / "trainer_state.json").stat()
    except FileNotFoundError as e:
        raise CheckpointError(
            f"{run_dir} has no resumable checkpoint (missing {Path(e.filename).name} in last/)"
        ) from e
    model_cfg = model_config_from_dict(saved["model"])
    wanted = dataclasses.replace(model_cfg)
    problems = apply_overrides(wanted, overrides, "flags")  # parses strings from the environment
    changed = changed_fields(model_cfg, wanted, ("vocab_size",))
    if changed:
        raise CheckpointError(f"cannot resume {run_dir} with a changed model shape: {', '.join(changed)}")
    train_cfg = TrainConfig(**saved["train"])
    started = dataclasses.replace(train_cfg)
    problems += apply_overrides(
        train_cfg, {k: v for k, v in overrides.items() if k not in ("out_dir", "data")}, "flags"
    )
    problems += train_cfg.problems()
    if plan_stages(started):  # the schedule (and so the length) of a run through ages is fixed
        changed = [k for k in (*AGE_SETTINGS, "max_iters") if getattr(train_cfg, k) != getattr(started, k)]
        if changed:
            raise CheckpointError(
                f"cannot resume {run_dir} with a changed age schedule: {', '.join(changed)}"
            )
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))
    return model_cfg, train_cfg


def _pack(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def _unpack(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


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


def loss_fn(
    logits: torch.Tensor, targets: torch.Tensor, label_smoothing: float = 0.0, count: int | None = None
) -> torch.Tensor:
    """Mean cross-entropy over the targets that count (not IGNORE_INDEX), or their sum over
    `count` (a whole step's counted targets, when it spans micro-batches); 0 if none counts."""
    total = F.cross_entropy(
        logits.view(-1, logits.size(-1)).float(),
        targets.view(-1),
        ignore_index=IGNORE_INDEX,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
    return total / (count if count is not None else (targets != IGNORE_INDEX).sum().clamp(min=1))


def metric_sums(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Summed cross-entropy, token accuracy and top-5 accuracy over the targets that count."""
    flat, y = logits.detach().float().view(-1, logits.size(-1)), targets.reshape(-1)
    counted = y != IGNORE_INDEX
    flat, y = flat[counted], y[counted]
    top5 = flat.topk(min(5, flat.size(-1)), dim=-1).indices
    return {
        "loss": F.cross_entropy(flat, y, reduction="sum").item(),
        "acc": (top5[:, 0] == y).sum().item(),
        "top5_acc": (top5 == y[:, None]).any(-1).sum().item(),
        "count": len(y),
    }


def mean_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Cross-entropy, perplexity, token accuracy and top-5 accuracy from metric_sums."""
    n = max(1, sums["count"])
    loss = sums["loss"] / n
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50)),
        "acc": sums["acc"] / n,
        "top5_acc": sums["top5_acc"] / n,
    }


def batch_metrics(logits: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """Cross-entropy, perplexity, token accuracy and top-5 accuracy of one batch."""
    return mean_metrics(metric_sums(logits, targets))


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
    states = {rng_key("torch", rank): _pack(torch.get_rng_state())}
    if t.device.type == "cuda":
        states[rng_key("cuda", rank)] = _pack(torch.cuda.get_rng_state(t.device))
    for j in micro_steps(t.world, len(t.data_rngs)):
        states[rng_key("data", j)] = _pack(t.data_rngs[j].get_state())
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


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


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
    from tensorboardX import SummaryWriter
    from tqdm import tqdm

    cfg, st, main = t.config, t.state, t.world.main
    if main:
        # a resume drops the events a killed run logged past its checkpoint (those at its step stay)
        writer = SummaryWriter(str(t.run_dir / "tb"), purge_step=st.step + 1 if st.step else None)
        keep_metrics_until(t.run_dir / "metrics.jsonl", st.step)
        metrics_log = open(t.run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115
    bar = tqdm(
        total=cfg.max_iters,
        initial=st.step,
        disable=not (cfg.progress and main),
        desc="training",
        unit="it",
        dynamic_ncols=True,
    )

    def record(kind: str, values: dict[str, float]) -> None:
        if not main:
            return
        row = {
            "kind": kind,
            "step": st.step,
            "time": round(time.time(), 3),
            **{k: round(v, 6) for k, v in values.items()},
        }
        metrics_log.write(json.dumps(row) + "\n")
        metrics_log.flush()
        for k, v in values.items():
            writer.add_scalar(f"{kind}/{k}", v, st.step)
        line = " ".join(f"{k} {v:.4g}" for k, v in values.items())
        say(f"step {st.step} {kind}: {line}")

    def say(text: str) -> None:  # above the progress bar, or to the log without one
        if main:
            (bar.write if cfg.progress else log.info)(text)

    t.model.train()
    last: dict[str, float] = {}
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
            t.optimizer.step()
            t.optimizer.zero_grad(set_to_none=True)
            st.step += 1
            st.tokens_seen += tokens_per_step
            st.elapsed_s += time.perf_counter() - step_start
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
                bar.set_postfix(loss=f"{last['loss']:.3f}", lr=f"{lr:.2e}")
                window_start, window_tokens = time.perf_counter(), 0
            # 5. evaluate: best/, plateau schedule, early stopping
            if st.step % cfg.eval_interval == 0 or st.step == cfg.max_iters:
                val = evaluate_loss(t, t.val_data)
                record("val", val)
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
        return fit(t)
    except RuntimeError as e:  # another rank died (killed, out of memory) or hung
        if not (world.distributed and lost_a_process(e)):
            raise
        raise TrainingAborted(
            f"process {world.rank} of {world.size} stopped: another process of the run is gone; "
            f"the last checkpoint is intact: semilla train --resume {resume or config.out_dir}"
        ) from e
    finally:
        leave()
