"""THAU's ages: one run that starts with a small model and grows it through a schedule of shapes.

A schedule is a list of stages, each a model shape and a number of training steps; between two
stages the model is grown (models/grow.py) and training goes on in the same run directory.
THAU's ages (seed 004: 0, 1, 3, 6, 12, 15) are the built-in schedule, `age_scale` shrinks them
proportionally for a smaller machine, and a YAML file (`age_schedule`) gives any other:

    stages:
      - {name: small, n_embd: 64, n_layer: 2, n_head: 4, steps: 500}
      - {name: large, n_embd: 128, n_layer: 4, n_head: 8, steps: 1500}
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from semilla.config import SHAPE_FIELDS, ModelConfig, TrainConfig
from semilla.errors import ConfigError
from semilla.models.grow import plan_growth

# age -> (width, layers) from THAU's table. Heads keep THAU's head size of 64 at every age so each
# growth is exact; THAU-2B's own preset (thau-age-15) has 32 heads of 80, which no exact growth
# reaches from age 12's heads of 64 (RoPE's frequencies depend on the head size).
THAU_AGES: dict[int, tuple[int, int]] = {
    0: (256, 2),
    1: (384, 3),
    3: (512, 6),
    6: (768, 12),
    12: (1024, 24),
    15: (2560, 24),
}
THAU_HEAD_SIZE = 64
AGE_SETTINGS = ("ages", "target_age", "steps_per_age", "age_scale", "age_schedule", "grow_mode")
STAGE_NAME = re.compile(r"[A-Za-z0-9_.-]+")  # it names a directory: ages/NAME_final


@dataclass(frozen=True)
class Stage:
    """A model shape trained for `steps` steps; `name` labels its checkpoint (ages/NAME_final)."""

    name: str
    shape: dict[str, Any]
    steps: int

    def config(self, base: ModelConfig) -> ModelConfig:
        """`base` in this stage's shape. The MLP width follows n_embd unless the stage sets it,
        and so do the key/value heads of a model without grouped-query attention."""
        follow = {"intermediate_size": None, **({"n_kv_head": None} if base.kv_heads == base.n_head else {})}
        return dataclasses.replace(base, **{**follow, **self.shape})


def check_age(age: int) -> None:
    if age not in THAU_AGES:
        raise ConfigError(f"unknown age {age}; THAU's ages are {', '.join(map(str, THAU_AGES))}")


def age_shape(age: int, scale: float = 1.0) -> dict[str, int]:
    """THAU's shape of one age with widths and depths times `scale` (head count kept)."""
    check_age(age)
    width, layers = THAU_AGES[age]
    heads = width // THAU_HEAD_SIZE
    head_size = max(8, 8 * round(THAU_HEAD_SIZE * scale / 8))  # a multiple of 8 (RoPE, kernels)
    return {"n_embd": heads * head_size, "n_layer": max(1, round(layers * scale)), "n_head": heads}


def parse_ages(text: str) -> list[int]:
    try:
        ages = [int(a) for a in text.split(",") if a.strip()]
    except ValueError:
        raise ConfigError(f"ages must be comma-separated numbers like 0,1,3, got {text!r}") from None
    if not ages:
        raise ConfigError(f"ages must name at least one age, like 0,1,3, got {text!r}")
    for age in ages:
        check_age(age)
    if ages != sorted(set(ages)):
        raise ConfigError(f"ages must be distinct and increasing, got {text!r}")
    return ages


def load_schedule(path: str) -> list[Stage]:
    """Stages from a YAML file: `stages: [{name, steps, n_embd, n_layer, ...}, ...]`."""
    p = Path(path)
    try:
        data = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"age schedule {path}: {e.strerror}") from None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"age schedule {path} cannot be parsed: {str(e).splitlines()[0]}") from None
    rows = data.get("stages") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not rows:
        raise ConfigError(f"age schedule {path} needs a non-empty list under 'stages'")
    stages = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ConfigError(f"age schedule {path}: stage {i + 1} is not a mapping")
        unknown = set(row) - {"name", "steps", *SHAPE_FIELDS}
        if unknown:
            raise ConfigError(
                f"age schedule {path}: stage {i + 1} has unknown keys: {', '.join(sorted(unknown))}"
            )
        steps = row.get("steps")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ConfigError(f"age schedule {path}: stage {i + 1} needs steps >= 1, got {steps!r}")
        shape = {k: row[k] for k in SHAPE_FIELDS if k in row}
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in shape.values()):
            raise ConfigError(f"age schedule {path}: stage {i + 1} shape values must be integers")
        name = str(row.get("name", f"stage_{i}"))
        if not STAGE_NAME.fullmatch(name) or name in {s.name for s in stages}:
            raise ConfigError(
                f"age schedule {path}: stage {i + 1}'s name {name!r} must be unique and made of letters, "
                "digits, '_', '.' or '-' (it names ages/NAME_final)"
            )
        stages.append(Stage(name, shape, steps))
    return stages


def plan_stages(cfg: TrainConfig) -> list[Stage]:
    """The run's stages from `ages`/`target_age` (THAU) or `age_schedule` (a file); [] for a
    plain run. THAU stages share max_iters evenly unless steps_per_age is given."""
    if cfg.age_schedule:
        if cfg.ages or cfg.target_age is not None:
            raise ConfigError("give either --age-schedule or --ages/--target-age, not both")
        return load_schedule(cfg.age_schedule)
    if cfg.ages and cfg.target_age is not None:
        raise ConfigError("give either --ages or --target-age, not both")
    if cfg.target_age is not None:
        check_age(cfg.target_age)
        ages = [a for a in THAU_AGES if a <= cfg.target_age]
    elif cfg.ages:
        ages = parse_ages(cfg.ages)
    else:
        return []
    steps = cfg.steps_per_age or math.ceil(cfg.max_iters / len(ages))
    return [Stage(f"age_{a}", age_shape(a, cfg.age_scale), steps) for a in ages]


def stage_end(stages: list[Stage], index: int) -> int:
    """The step count at which stage `index` is finished."""
    return sum(s.steps for s in stages[: index + 1])


def check_growth(start: ModelConfig, stages: list[Stage], mode: str) -> list[ModelConfig]:
    """The model config of every stage, grown from `start` (the first stage's shape, or an
    --init-from checkpoint's); refuses a schedule that cannot grow through, before training."""
    problems = start.problems()
    if problems:
        raise ConfigError("invalid model: " + "; ".join(problems))
    configs, cfg = [], start
    for stage in stages:
        try:
            cfg = plan_growth(cfg, stage.config(cfg), mode).target
        except ConfigError as e:
            raise ConfigError(f"age {stage.name}: {e}") from None
        configs.append(cfg)
    return configs
