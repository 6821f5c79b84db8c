"""Self-learning: the model questions itself, a teacher fills its gaps, a gate keeps it honest.

import semilla
semilla.learn("runs/demo", teacher_url="http://localhost:11434/v1", teacher_model="llama3", rounds=3)
"""

from semilla.learn.config import LearnConfig
from semilla.learn.loop import learn
from semilla.learn.stats import learn_stats

__all__ = ["LearnConfig", "learn", "learn_stats"]
