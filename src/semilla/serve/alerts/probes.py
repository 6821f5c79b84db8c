"""What the server measures of itself for the alerting rules: memory against its limit, and a
health check of the engine and of what it serves."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_MEMORY_MAX = Path("/sys/fs/cgroup/memory.max")  # cgroup v2: a container's limit


def resident_bytes() -> float:
    """This process's resident memory (Linux /proc); NaN where unknown."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return math.nan
    return float(pages * os.sysconf("SC_PAGE_SIZE"))


def memory_limit_bytes() -> float:
    """The memory this process may use: its cgroup's limit, else the machine's memory."""
    try:
        text = CGROUP_MEMORY_MAX.read_text().strip()
        if text != "max":
            return float(text)
    except (OSError, ValueError):
        pass
    try:
        return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (OSError, ValueError):
        return math.nan


def memory_used_ratio(limit_bytes: float = 0.0) -> float:
    """Resident memory over `limit_bytes` (0: memory_limit_bytes())."""
    return resident_bytes() / (limit_bytes or memory_limit_bytes())


def health_problems(state) -> list[str]:
    """Why the server cannot answer right now (empty: healthy): the engine stopped, or no model,
    route or provider to serve. Also refreshes each A/B variant's semilla_ab_variant_up, so a
    variant unloaded while no request comes is seen too."""
    for split in state.router.splits().values():
        split.available()
    problems = []
    if not state.engine.alive:
        problems.append("the engine is not running")
    if not (state.models or state.router.routes or state.router.upstreams):
        problems.append("no model is served")
    return problems
