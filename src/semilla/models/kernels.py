"""semilla's compiled CPU kernels (`cpu_kernels.cpp`). For inference: a decode step of attention
over the KV cache, the matmuls of a single stream (a few rows), RMSNorm, and a whole llama
layer of a decode step. For training and evaluation: RMSNorm, SwiGLU and RoPE, and causal
attention's scores and softmax, forward and backward (models/fused_ops.py).

They are built from source with the machine's C++ compiler the first time a model runs
(20-25 s, once per machine, PyTorch and Python; cached under
`~/.cache/semilla/kernels`, one directory per distinct source and PyTorch installation, which
holds its own copy of the source: each virtual environment builds once, as the link step names its
own PyTorch's libraries; two venvs sharing one build would rebuild over each other in turn). Processes take turns
with a lock that dies with its holder, so a killed build never blocks the next. Where they cannot be built (no compiler) or `SEMILLA_KERNELS=0`,
the model runs PyTorch's own operators instead, with the same results up to float rounding.
The functions below return a kernel where it applies to the given tensors, else None.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]  # OpenMP: PyTorch's own threads
DTYPES = (torch.float32, torch.bfloat16)
BUILD_LOCK = threading.Lock()
LAYOUT = "source-copy+flock"  # how a build directory is used: its own source copy, build.lock

log = logging.getLogger(__name__)


def cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "semilla" / "kernels"


def cpuinfo(*fields: str) -> str:
    """The value of the first of these /proc/cpuinfo fields present ('' where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(
                (line.split(":", 1)[1].strip() for line in f if line.split(":")[0].strip() in fields), ""
            )
    except OSError:  # not Linux
        return ""


def build_name() -> str:
    """One build per source, PyTorch installation, Python and CPU: `-march=native` code must not
    travel to another machine through a shared home directory, and a build links against one
    PyTorch installation's libraries (another venv's link command differs, so ninja would redo it)."""
    cpu = cpuinfo("flags", "Features")  # x86, ARM
    # LAYOUT keeps apart the directories of older semilla versions, which built differently
    key = "|".join(
        [
            LAYOUT,
            SOURCE.read_text(),
            torch.__version__,
            torch.__file__,
            sys.version,
            platform.machine(),
            cpu,
            *FLAGS,
        ]
    )
    return "semilla_kernels_" + hashlib.sha256(key.encode()).hexdigest()[:16]


@functools.cache
def compiled():
    """The built extension module, or None where it is disabled or cannot be built. One build
    at a time in a process (a server's engine and a request may ask at once), and in a build
    directory (`build_lock`)."""
    if os.environ.get("SEMILLA_KERNELS", "1") == "0":
        return None
    with BUILD_LOCK:
        return _build()


def _build():
    name = build_name()
    directory = cache_dir() / name
    try:
        from torch.utils.cpp_extension import load

        if shutil.which("ninja") is None:  # PyTorch runs `ninja` from PATH: the pip package's
            import ninja  # binary sits beside the venv's python, which is not always on PATH

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        with build_lock(directory):
            # compile the copy in the build directory: its path, which ninja keys the build
            # on, is then the same from every clone, so two clones never rebuild in turn
            source = directory / SOURCE.name
            if not source.is_file():
                source.write_text(SOURCE.read_text())
            if not any(directory.glob(f"{name}*.so")):
                log.info("building the CPU kernels (once per machine, 20-25 s)")
            return load(
                name,
                [str(source)],
                extra_cflags=FLAGS,
                extra_ldflags=["-fopenmp"],
                build_directory=str(directory),
            )
    except Exception as e:  # no compiler, no ninja, a read-only cache: PyTorch's operators instead
        log.warning("CPU kernels not built (%s); using PyTorch's operators", build_failure(e))
        return None


@contextlib.contextmanager
def build_lock(directory: Path) -> Iterator[None]:
    """Hold `directory/build.lock` (an flock, released by the kernel when its holder dies, even
    by kill -9), saying whose build we wait for. Under it no other semilla process builds
    here, so a PyTorch `lock` file found is a killed build's: PyTorch would wait for it forever."""
    directory.mkdir(parents=True, exist_ok=True)
    fd = os.open(directory / "build.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "another process"
            log.info("waiting for the CPU kernel build held by PID %s", holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        (directory / "lock").unlink(missing_ok=True)
        yield
    finally:
        os.close(fd)  # releases the lock


def build_failure(e: Exception) -> str:
    """One short line for what went wrong (PyTorch's message holds the whole compiler command)."""
    text = str(e).strip()
    if text.startswith("Error building extension"):
        return "the C++ compiler failed on cpu_kernels.cpp"
    first = text.splitlines()[0] if text else type(e).__name__
    return first if len(first) <= 160 else first[:157] + "..."


_FUNCTORCH_WRAPPED = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)  # private


def plain(t: torch.Tensor) -> bool:
    """A tensor with its own memory: not a subclass (quantized weights, fake tensors) nor a
    torch.func (vmap, grad) wrapper, whose data a kernel cannot read."""
    if type(t) not in (torch.Tensor, nn.Parameter):
        return False
    return _FUNCTORCH_WRAPPED is None or not _FUNCTORCH_WRAPPED(t)


def inference_on_cpu(t: torch.Tensor) -> bool:
    """Whether this forward may call a kernel: a plain CPU tensor, no autograd, no autocast, not
    under torch.compile, torch.export or the ONNX exporters (they see only PyTorch operators).
    Called by every layer of every decode step: the cheapest checks first."""
    return not (
        torch.is_grad_enabled()
        or torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or torch.is_autocast_enabled("cpu")
        or t.device.type != "cpu"
        or not plain(t)
    )


def elementwise(name: str, *tensors: torch.Tensor):
    """The named kernel of models/fused_ops.py (RMSNorm, SwiGLU, RoPE, attention; forward or
    backward) where these tensors may use it, else None: plain CPU tensors, not under torch.compile or a
    tracer (the compiler fuses these operators itself; exporters see only PyTorch's)."""
    if (
        torch.compiler.is_compiling()
        or torch.jit.is_tracing()
        or not all(t.device.type == "cpu" and plain(t) for t in tensors)
    ):
        return None
    return kernel(name)


def decode_attention(cache: torch.Tensor, head_dim: int, positions: torch.Tensor):
    """The decode-attention kernel where a decode step over this cache may use it, else None:
    a cache laid out (B, nkv, S, hs) with real rows (not expanded), plain tensors."""
    if (
        cache.dtype not in DTYPES
        or head_dim % 8
        or head_dim > 256
        or not inference_on_cpu(cache)
        or not plain(positions)
        or cache.stride(3) != 1
        or cache.stride(2) != head_dim
        or cache.stride(1) != cache.size(2) * head_dim
        or (cache.stride(0) == 0 and cache.size(0) > 1)
    ):
        return None
    return kernel("decode_attention")


def rms_norm(x: torch.Tensor, weight: torch.Tensor):
    """The RMSNorm kernel: float32 inference on CPU, contiguous tensors."""
    if (
        x.dtype != torch.float32
        or weight.dtype != torch.float32
        or not x.is_contiguous()
        or not weight.is_contiguous()
        or not plain(weight)
        or not inference_on_cpu(x)
    ):
        return None
    return kernel("rms_norm")


def linear_rows(x: torch.Tensor, weights: list[torch.Tensor]):
    """The few-rows matmul kernel where it applies to x against these weights, else None: 1 to
    4 rows (a single stream's decode step), K a multiple of 16, contiguous plain tensors of one
    dtype. It reads the weights stacked and packed by `pack_rows`."""
    K = x.size(-1)
    if (
        not 0 < x.numel() <= 4 * K
        or K % 16
        or x.dtype not in DTYPES
        or not x.is_contiguous()
        or not inference_on_cpu(x)
        or not all(w.dtype == x.dtype and w.size(-1) == K and plain(w) for w in weights)
    ):
        return None
    return kernel("linear_rows")


def decode_layer(x: torch.Tensor, norms: list[torch.Tensor]):
    """The whole-layer decode kernel (a llama layer: RMSNorm, attention, SwiGLU) where it
    applies to x and the norms' weights, else None: x (1 to 4 rows, 1, C) and the norms float32
    and contiguous. Its matmuls take float32 weights packed by `pack_rows` (the caller's part).
    Called by every layer of every decode step: one inference check for the whole layer."""
    if (
        x.dtype != torch.float32
        or x.dim() != 3
        or not 0 < x.size(0) <= 4
        or not x.is_contiguous()
        or not all(w.dtype == torch.float32 and w.is_contiguous() and plain(w) for w in norms)
        or not inference_on_cpu(x)
    ):
        return None
    return kernel("decode_layer")


PACK = 4  # weight rows per packed group: cpu_kernels.cpp's PACK


def pack_rows(weight: torch.Tensor) -> torch.Tensor:
    """A weight (N, K) in the few-rows kernel's reading order, as a new (N, K) tensor: each group
    of PACK rows as (K / 16, PACK, 16) (the group's 16 values of each column block side by side),
    then the N % PACK last rows as they are."""
    N, K = weight.shape
    full = N - N % PACK
    groups = weight[:full].reshape(full // PACK, PACK, K // 16, 16).transpose(1, 2)
    return torch.cat([groups.reshape(full, K), weight[full:]])


def kernel(name: str):
    module = compiled()
    return getattr(module, name) if module is not None else None
