"""The settings of the self-learning loop: teacher, questions, gap signals, limits, training, gate.

Every field is a `semilla learn` flag (--questions-per-hour, ...). The limits default to the
seed's (10 questions an hour, 100 a day, 30 s apart) and change only when a setting says so.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from semilla.errors import ConfigError

UNCERTAINTY_MARKERS = (
    "no estoy seguro",
    "no sé",
    "no lo sé",
    "no tengo información",
    "i'm not sure",
    "i am not sure",
    "i don't know",
    "i do not know",
)


@dataclass
class LearnConfig:
    """How `semilla learn` questions a model, asks its teacher, trains and gates."""

    teacher_url: str = ""  # base URL: http://localhost:11434/v1 (Ollama), https://api.anthropic.com
    teacher_model: str = ""  # the teacher's model name at that URL
    teacher_api: str = "openai"  # the teacher's protocol: openai (chat completions) | anthropic (Messages)
    teacher_api_key_env: str = "SEMILLA_TEACHER_API_KEY"  # environment variable holding the API key
    teacher_timeout: float = 60.0  # seconds to wait for one teacher reply
    topics: str = ""  # a file of concepts, one a line; empty: frequent words of the training corpus
    templates: str = ""  # a file of question templates ({concept}, {concept1}, {concept2}), one a line
    language: str = "auto"  # question language: es | en | auto (from the corpus)
    age: int | None = None  # THAU age of the questions (>= 3 adds relations, advantages); None: the run's
    n_concepts: int = 50  # concepts taken from the corpus when there is no topics file
    questions_per_round: int = 10  # questions asked in one round (the limits may end a round sooner)
    questions_per_hour: int = 10  # the seed's limit: questions asked in any hour
    questions_per_day: int = 100  # the seed's limit: questions asked in any 24 hours
    min_question_spacing_s: float = 30.0  # the seed's limit: seconds between two questions
    num_samples: int = 3  # sampled answers next to the greedy one (disagreement signal)
    max_answer_tokens: int = 48  # tokens of each student answer
    min_answer_chars: int = 20  # a shorter answer is a gap
    min_confidence: float = 0.6  # a lower mean token probability of the greedy answer is a gap
    max_disagreement: float = 0.5  # 1 - mean ROUGE-L of samples vs greedy; more is a gap
    require_concept: bool = True  # an answer that names no word of the question's concept is a gap
    uncertainty_markers: list[str] = field(default_factory=lambda: list(UNCERTAINTY_MARKERS))
    examples_per_gap: int = 8  # question/answer examples asked of the teacher for each gap (5-10)
    max_similarity: float = 0.7  # ROUGE-L above this against a kept question: a near-duplicate, dropped
    replay_fraction: float = 0.5  # share of each training batch drawn from the original data (>= 0.5)
    train_steps: int = 200  # optimizer steps of each round's training
    learning_rate: float = 3e-4  # peak learning rate of each round's training
    batch_size: int = 16  # sequences per training step
    into_adapter: str = ""  # a LoRA adapter dir (PEFT) the rounds train, the base kept; empty: all weights
    lora_r: int = 8  # --into-adapter: the rank of a new adapter
    lora_alpha: float = 16.0  # --into-adapter: a new adapter's scale (alpha / r)
    target_modules: str = "all-linear"  # --into-adapter: the layers a new adapter adapts
    grow_on_plateau: bool = False  # grow the model to the next THAU age when rounds stop being promoted
    plateau_rounds: int = 2  # --grow-on-plateau: this many rolled-back rounds in a row are a plateau
    gate: bool = True  # promote only a candidate that passes the gate; off: every candidate
    max_ppl_rise: float = 0.01  # original validation perplexity may rise at most this (0.01: one percent)
    max_fact_drop: float = 0.0  # facts learned in earlier rounds: recall may drop at most this
    val_tokens: int = 20000  # tokens of the original validation split the gate scores
    seed: int = 1337  # seed of the samples and of the training
    device: str = "auto"  # auto | cpu | cuda | mps

    def problems(self) -> list[str]:
        """Every invalid value, each named (empty: the config is valid)."""
        p = []
        if not self.teacher_url:
            p.append("teacher_url is required (an OpenAI- or Anthropic-compatible base URL)")
        if not self.teacher_model:
            p.append("teacher_model is required")
        if self.teacher_api not in ("openai", "anthropic"):
            p.append(f"teacher_api must be openai or anthropic, got {self.teacher_api!r}")
        if self.language not in ("auto", "es", "en"):
            p.append(f"language must be auto, es or en, got {self.language!r}")
        for name in ("questions_per_round", "questions_per_hour", "questions_per_day", "n_concepts",
                     "max_answer_tokens", "train_steps", "batch_size", "val_tokens", "plateau_rounds"):  # fmt: skip
            if getattr(self, name) < 1:
                p.append(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("min_question_spacing_s", "teacher_timeout", "min_answer_chars", "num_samples"):
            if getattr(self, name) < 0:
                p.append(f"{name} must be >= 0, got {getattr(self, name)}")
        if not 1 <= self.examples_per_gap <= 10:
            p.append(f"examples_per_gap must be in [1, 10], got {self.examples_per_gap}")
        for name in ("min_confidence", "max_disagreement", "max_similarity", "max_fact_drop"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                p.append(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if not 0.5 <= self.replay_fraction < 1.0:
            p.append(
                f"replay_fraction must be in [0.5, 1): at least half original data, got {self.replay_fraction}"
            )
        if self.max_ppl_rise < 0:
            p.append(f"max_ppl_rise must be >= 0, got {self.max_ppl_rise}")
        if not self.learning_rate > 0:
            p.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.into_adapter:
            from semilla.models.lora import AdapterError, LoraConfig

            try:
                LoraConfig(self.lora_r, self.lora_alpha, 0.0, self.target_modules)
            except AdapterError as e:
                p.append(str(e))
        if self.grow_on_plateau and self.into_adapter:
            p.append("grow_on_plateau cannot be combined with into_adapter: an adapter does not grow")
        if self.age is not None and self.age < 0:
            p.append(f"age must be >= 0, got {self.age}")
        return p

    def validate(self) -> LearnConfig:
        problems = self.problems()
        if problems:
            raise ConfigError("invalid learn settings: " + "; ".join(problems))
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
