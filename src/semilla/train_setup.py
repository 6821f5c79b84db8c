"""What a training run is and how one starts: the Trainer and its resumable state, the device,
the optimizer, the run directory (claimed, never silently reused), data, model and checkpoint
wired together by setup(), and the settings of a run being resumed."""

from __future__ import annotations

import base64
import dataclasses
import json
import logging
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semilla.ages import AGE_SETTINGS, Stage, check_growth, plan_stages, stage_end
from semilla.atomic import existing_dir
from semilla.batches import MixtureDataset, TokenDataset
from semilla.checkpoint import (
    load_checkpoint,
    load_optimizer_state,
    read_optimizer_tensors,
)
from semilla.config import ModelConfig, TrainConfig, apply_overrides, model_config_from_dict
from semilla.distributed import (
    World,
    any_rank,
    check_batch_split,
    check_sharding,
    data_parallel,
    join,
    load_full_optimizer_state,
    shard_model,
    world_from_env,
)
from semilla.errors import CheckpointError, ConfigError, DataError
from semilla.models import build_model, kernels
from semilla.models.grow import grow_model, plan_growth
from semilla.models.lora import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    LoraConfig,
    apply_lora,
    load_adapter,
)
from semilla.optim import make_optimizer, resolved_optimizer
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
    compiled: bool = False  # whether forward is torch.compile'd
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


def native_bf16(device: torch.device) -> bool:
    """Whether this device multiplies bfloat16 matrices natively: CUDA, or a CPU with AVX512-BF16
    or AMX (about twice its float32 rate there; emulated, bfloat16 is slower than float32)."""
    if device.type == "cuda":
        return True
    return device.type == "cpu" and (
        torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    )


def pick_autocast(dtype: str, device: torch.device) -> torch.dtype | None:
    """bf16 autocast (float32 weights and optimizer state) where the device has native bf16
    matrix math, by default; float32 elsewhere."""
    if dtype == "bfloat16" or (dtype == "auto" and native_bf16(device)):
        return torch.bfloat16
    return None


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
            if config.lora_from:
                continue_adapter(model, config)
            else:
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


# torch.compile's start for semilla's default model on one CPU thread: ~27 s the first time
# (model and evaluation graphs), ~6 s from PyTorch's cache, against ~12.5 ms off each 89 ms step
# run with PyTorch's operators: earned back after ~2,150 steps on a machine that never compiled
# it, ~500 after. With semilla's CPU kernels the eager step is about as fast as the compiled one
# (80 ms; 77 and 83 compiled), so unset compiles only where they are off (bench/README.md)
COMPILE_PAYS_BACK_STEPS = 2500


def compiles(t: Trainer) -> bool:
    """Whether the model's calls are compiled: as --compile / --no-compile say, and unset where
    it was measured to pay back (bench/README.md): a long run in one CPU process, with the C++
    compiler inductor needs, without semilla's CPU kernels (SEMILLA_KERNELS=0: with them eager
    is faster), and nothing that changes the model's graph as it goes (ages grow it, LoRA wraps
    it) or asks for deterministic algorithms."""
    cfg = t.config
    if cfg.compile is not None:
        return cfg.compile
    return (
        t.device.type == "cpu"
        and t.model_config.arch == "transformer"
        and cfg.max_iters >= COMPILE_PAYS_BACK_STEPS
        and not (t.stages or cfg.lora_r or cfg.deterministic or t.world.distributed)
        and shutil.which(os.environ.get("CXX", "g++")) is not None
        and kernels.compiled() is None
    )


def wrap_model(t: Trainer) -> None:
    """The model's calls: compiled (see compiles()), and in DDP for the training steps of a
    distributed run (evaluation and samples call the model alone: no collectives in them)."""
    t.compiled = compiles(t)
    if t.compiled and t.config.compile is None:
        torch._dynamo.config.suppress_errors = True  # chosen for the user: a failure runs eager
    t.forward = torch.compile(t.model) if t.compiled else t.model
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
        torch.set_rng_state(unpack_state(state.rng[torch_key]))
    if cuda_key in state.rng and device.type == "cuda":
        torch.cuda.set_rng_state(unpack_state(state.rng[cuda_key]))
    for j, gen in enumerate(data_rngs):
        if rng_key("data", j) in state.rng:
            gen.set_state(unpack_state(state.rng[rng_key("data", j)]))
    if state.world_size != world.size and world.main:
        log.info("resuming a run of %d process(es) on %d", state.world_size, world.size)


def rng_key(kind: str, index: int) -> str:
    """ "torch", "torch_1", ...: index 0 keeps a one-process run's plain name."""
    return kind if index == 0 else f"{kind}_{index}"


def lora_config(config: TrainConfig) -> LoraConfig:
    return LoraConfig(config.lora_r, config.lora_alpha, config.lora_dropout, config.target_modules)


def continue_adapter(model: nn.Module, config: TrainConfig) -> None:
    """Load the adapter `lora_from` onto `model` to train on; it is saved with the run's lora_*
    settings, so they must be the adapter's own."""
    loaded, wanted = load_adapter(model, config.lora_from), lora_config(config)
    if (loaded.r, loaded.alpha, loaded.target_modules) != (wanted.r, wanted.alpha, wanted.target_modules):
        raise ConfigError(
            f"lora_from {config.lora_from} has r={loaded.r}, alpha={loaded.alpha:g} and target modules "
            f"{','.join(loaded.target_modules)}: give the same lora_r, lora_alpha and target_modules"
        )


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
    # runs saved before --optimizer existed were trained with AdamW
    train_cfg = TrainConfig(**{"optimizer": "adamw", **saved["train"]})
    started = dataclasses.replace(train_cfg)
    problems += apply_overrides(
        train_cfg, {k: v for k, v in overrides.items() if k not in ("out_dir", "data")}, "flags"
    )
    problems += train_cfg.problems()
    if resolved_optimizer(train_cfg) != resolved_optimizer(started):  # the moments would not fit
        raise CheckpointError(
            f"cannot resume {run_dir} with another optimizer: it was trained with "
            f"{resolved_optimizer(started)}"
        )
    if plan_stages(started):  # the schedule (and so the length) of a run through ages is fixed
        changed = [k for k in (*AGE_SETTINGS, "max_iters") if getattr(train_cfg, k) != getattr(started, k)]
        if changed:
            raise CheckpointError(
                f"cannot resume {run_dir} with a changed age schedule: {', '.join(changed)}"
            )
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))
    return model_cfg, train_cfg


def pack_state(t: torch.Tensor) -> str:
    """An RNG state (a uint8 tensor) as base64 text for trainer_state.json."""
    return base64.b64encode(t.numpy().tobytes()).decode("ascii")


def unpack_state(s: str) -> torch.Tensor:
    """The RNG state that pack_state wrote."""
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)
