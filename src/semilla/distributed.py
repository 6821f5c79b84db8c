"""torchrun wiring: which process of a distributed run this is, its process group, and the few
collectives training needs (gloo on CPU, nccl on CUDA).

A process started without torchrun is a world of one: every function here is then a no-op, so
train.py reads the same for one process or many. `launch` is `semilla train --nproc N`: it runs
torchrun for the user on this machine.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import uuid
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from semilla.errors import ConfigError, SemillaError

# How long a rank waits in a collective for the others (a slow checkpoint on rank 0, a slow
# disk) before it gives up; a rank that died is noticed at once (its connections close).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class World:
    """This process's place in the run: torchrun's RANK, LOCAL_RANK and WORLD_SIZE."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one process that writes (checkpoints, metrics, TensorBoard, progress)."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def world_from_env(environ: dict[str, str] | None = None) -> World:
    """The World torchrun describes in the environment; one process without it."""
    env = os.environ if environ is None else environ
    if "WORLD_SIZE" not in env:
        return World()
    return World(int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]))


def join(world: World, device: torch.device) -> torch.device:
    """Join the run's process group; returns this rank's device (cuda:LOCAL_RANK on CUDA)."""
    if not world.distributed:
        return device
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    elif device.type == "cpu":
        backend = "gloo"
    else:
        raise ConfigError(f"distributed training runs on CPU (gloo) or CUDA (nccl), not on {device.type}")
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    return device


def leave() -> None:
    """Leave the process group (at the end of a run or on its failure)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def check_batch_split(world: World, grad_accum: int) -> None:
    """Each rank takes whole micro-batches of the global step: grad_accum must be a multiple of
    the number of processes."""
    if grad_accum % world.size:
        raise ConfigError(
            f"--grad-accum {grad_accum} cannot be shared by {world.size} processes: each takes whole "
            f"micro-batches of the step, so --grad-accum must be a multiple of {world.size} "
            f"(e.g. --grad-accum {world.size * max(1, grad_accum // world.size)}; the global batch is "
            "batch_size x grad_accum sequences)"
        )


def check_sharding(world: World, arch: str) -> None:
    """--fsdp needs several processes and a transformer (it shards decoder layers)."""
    if not world.distributed:
        raise ConfigError("--fsdp shards the model over several processes: use it with --nproc N or torchrun")
    if arch == "lstm":
        raise ConfigError("--fsdp shards transformer layers; an LSTM model trains with DDP (drop --fsdp)")


def micro_steps(world: World, grad_accum: int) -> range:
    """The micro-batches of every optimizer step that this rank computes: j = rank, rank + size, ..."""
    return range(world.rank, grad_accum, world.size)


def data_parallel(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """`model` wrapped in DDP (gradients averaged over ranks in backward); itself for one process."""
    if not world.distributed:
        return model
    # no buffer broadcast: the model's buffers (RoPE tables, masks) are constants on every rank
    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, broadcast_buffers=False)


def shard_model(model: nn.Module, world: World, device: torch.device) -> nn.Module:
    """FSDP2, in place: each decoder layer, then the rest of the model, sharded over the ranks
    (each holds 1/size of every weight, gradient and optimizer moment; a layer's weights are
    gathered just for its forward and backward)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world.size,))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A sharded model's whole weights on rank 0's CPU ({} on the others); every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """A sharded model's optimizer state, whole, on rank 0's CPU, keyed by parameter name
    ({"state": {name: {...}}, "param_groups": [{"params": [names], ...}]}); every rank calls it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(model, optimizer, options=options)


def load_full_optimizer_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """The inverse of full_optimizer_state: every rank passes the whole state and keeps its shard."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True)
    set_optimizer_state_dict(model, optimizer, optim_state_dict=state, options=options)


def sync_gradients(model: nn.Module, last: bool) -> AbstractContextManager:
    """DDP and FSDP reduce gradients only in the backward of the step's last micro-batch."""
    if is_sharded(model):
        model.set_requires_gradient_sync(last)
        return nullcontext()
    if last or not isinstance(model, DistributedDataParallel):
        return nullcontext()
    return model.no_sync()


def any_rank(world: World, flag: bool, device: torch.device) -> bool:
    """Whether `flag` is true on any rank (a Ctrl-C seen by one process stops all at one step)."""
    if not world.distributed:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def sum_over_ranks(world: World, values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums of `values` over all ranks (float64)."""
    if not world.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def lost_a_process(error: BaseException) -> bool:
    """Whether a collective failed because another rank is gone (gloo reports it as a plain
    RuntimeError naming the closed connection, nccl as a DistError)."""
    text = str(error)
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and ("closed by peer" in text or "reset by peer" in text)
    )


def gather_to_main(world: World, value: Any) -> list[Any]:
    """Every rank's `value` (any JSON-able object) on rank 0, in rank order; [] on the others."""
    if not world.distributed:
        return [value]
    out: list[Any] = [None] * world.size if world.main else []
    dist.gather_object(value, out if world.main else None, dst=0)
    return out


def launch(nproc: int, argv: list[str]) -> int:
    """Run `semilla ARGV` as `nproc` processes on this machine, as `torchrun --standalone
    --nproc-per-node NPROC -m semilla ARGV` does; returns the run's exit code."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    if "WORLD_SIZE" in os.environ:
        raise ConfigError("--nproc starts torchrun itself: drop it when running under torchrun")
    # the ranks say what went wrong; the agent's own lines would repeat it, less clearly
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    config = LaunchConfig(
        min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=uuid.uuid4().hex, rdzv_backend="c10d",
        rdzv_endpoint="localhost:0", max_restarts=0,
        # Ctrl-C reaches every process of the terminal's group: the ranks save and stop on their
        # own (exit 130), so the launcher ignores it rather than terminating them mid-save
        signals_to_handle="SIGTERM,SIGHUP,SIGQUIT",
    )  # fmt: skip
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        elastic_launch(config, sys.executable)("-m", "semilla", *argv)
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        if failure.exitcode > 0:  # the process said why (a one-line error) or was interrupted
            return failure.exitcode
        raise DistributedRunError(
            f"process {rank} of {nproc} was killed ({failure.signal_name()}); the others stopped"
        ) from None
    finally:
        signal.signal(signal.SIGINT, previous)
    return 0


class DistributedRunError(SemillaError):
    """A process of a run launched with --nproc died without saying why (killed by a signal)."""
