"""THAU's "grows" (seed 004): when learning stops paying (the last `plateau_rounds` rounds the gate
decided were all rolled back), the current model grows to the next age's shape (ages.py, at the
run's age_scale) with the function-preserving growth of models/grow.py, and the rounds go on with
the grown model, which asks the next age's questions.

A growth is journaled before it is made ({"age", "after_round", "shape", "done"} in state.json),
so a crash mid-growth is finished on the next run, never made twice.
"""

from __future__ import annotations

import logging
from typing import Any

from semilla.ages import THAU_AGES, Stage, age_shape
from semilla.checkpoint import read_config, resolve_checkpoint
from semilla.learn.journal import Journal

log = logging.getLogger(__name__)


def plateaued(rounds: list[dict[str, Any]], since_round: int, patience: int) -> bool:
    """Whether the last `patience` gate decisions after round `since_round` were all rollbacks."""
    decided = [r for r in rounds if r["round"] > since_round and r["status"] in ("promoted", "rolled_back")]
    return len(decided) >= patience and all(r["status"] == "rolled_back" for r in decided[-patience:])


def next_age(age: int) -> int | None:
    later = [a for a in THAU_AGES if a > age]
    return later[0] if later else None


def grow_on_plateau(journal: Journal, age: int, patience: int, seed: int) -> dict[str, Any] | None:
    """Grow the current model into RUN/learn/best at the next age when the rounds plateaued (or
    finish a growth a crash interrupted); returns the growth's record, or None."""
    state = journal.state()
    growth = state.get("growth")
    if growth is None or growth["done"]:
        rounds = journal.rounds()
        since = growth["after_round"] if growth else 0
        if not rounds or not plateaued(rounds, since, patience):
            return None
        target_age = next_age(age)
        if target_age is None:
            if not state.get("last_age_logged"):
                log.info("the rounds plateaued at age %d, THAU's last: the model does not grow", age)
                state["last_age_logged"] = True
                journal.save_state(state)
            return None
        growth = {"age": target_age, "after_round": rounds[-1]["round"], "shape": target_shape(journal, target_age),
                  "done": False}  # fmt: skip
        state["growth"] = growth
        journal.save_state(state)  # the intent first: a crash from here on finishes this growth
    grow_current(journal, growth["shape"], seed)
    growth["done"] = True
    state["age"] = growth["age"]
    state.setdefault("growths", []).append(growth)
    journal.save_state(state)
    log.info("the rounds plateaued: grew the model to age %d (%s)", growth["age"], growth["shape"])
    return growth


def target_shape(journal: Journal, age: int) -> dict[str, int]:
    """The next age's shape at the scale the run trained its ages with."""
    scale = (read_config(resolve_checkpoint(journal.run)).get("train") or {}).get("age_scale") or 1.0
    return age_shape(age, scale)


def grow_current(journal: Journal, shape: dict[str, int], seed: int) -> None:
    """The current model grown to `shape` (exact: the same function) replaces RUN/learn/best; a
    model already of that shape (a crash after the swap) is left as it is."""
    from semilla.models.grow import grow_checkpoint
    from semilla.train_inputs import checkpoint_model_config

    current = journal.current_model()
    config = checkpoint_model_config(current)
    if all(getattr(config, k) == v for k, v in shape.items()):
        return
    target = Stage("next", shape, 1).config(config)  # the MLP width follows the new n_embd
    grow_checkpoint(str(current), str(journal.best), target=target, mode="exact", seed=seed, overwrite=True)
