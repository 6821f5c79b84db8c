"""Self-learning: the model questions itself, a teacher fills its gaps, a gate keeps it honest.

import semilla
semilla.learn("runs/demo", teacher_url="http://localhost:11434/v1", teacher_model="llama3", rounds=3)
"""

import sys
import types

from semilla.learn.config import LearnConfig
from semilla.learn.loop import learn
from semilla.learn.stats import learn_stats

__all__ = ["LearnConfig", "learn", "learn_stats"]


class _CallablePackage(types.ModuleType):
    """Once imported, this package is the attribute `semilla.learn` (Python sets a subpackage on
    its parent), which would hide the function of the same name: calling the package calls it."""

    def __call__(self, *args, **kwargs):
        return learn(*args, **kwargs)


sys.modules[__name__].__class__ = _CallablePackage
