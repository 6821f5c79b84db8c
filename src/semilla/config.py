"""Typed configuration: model and training dataclasses, presets, file and environment overrides.

Precedence, later wins: preset < config file (YAML/JSON) < CLI flags < SEMILLA_* environment
variables. DataShark's variable names (BLOCK_SIZE, N_LAYER, ...) are accepted as aliases.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from semilla.errors import ConfigError

NORMS = ("rmsnorm", "layernorm")
POSITIONS = ("rope", "learned", "sinusoidal")
MLPS = ("swiglu", "gelu", "gelu_exact", "relu", "relu2")  # gelu: GPT-2 tanh form; gelu_exact: erf
ARCHS = ("transformer", "lstm")
SCHEDULES = ("cosine", "plateau", "constant")
OPTIMIZERS = ("auto", "muon", "adamw")
LOSS_ON = ("assistant", "all")
GROW_MODES = ("exact", "stack")
SHAPE_FIELDS = (
    "n_embd",
    "n_layer",
    "n_head",
    "n_kv_head",
    "intermediate_size",
    "block_size",
)  # what growth grows
TOKENIZERS = ("char", "bpe")
DTYPES = (
    "auto",
    "float32",
    "bfloat16",
)  # auto: bfloat16 where native (autocast when training), float32 elsewhere
DTYPE_HELP = (
    "float32 or bfloat16 weights (half the memory; with Intel AMX ~1.9x faster batches); "
    "auto: bfloat16 on CUDA, float32 on CPU"
)


@dataclass
class ModelConfig:
    """Shape of a model. The transformer switches cover the llama and gpt2 families."""

    arch: str = "transformer"  # model family
    vocab_size: int = 0  # 0: taken from the tokenizer at training time
    block_size: int = 128  # context length in tokens
    n_layer: int = 4  # transformer blocks (LSTM: stacked layers)
    n_head: int = 4  # attention heads per layer
    n_kv_head: int | None = None  # None: same as n_head; fewer gives grouped-query attention
    n_embd: int = 128  # width: the embedding and hidden size
    intermediate_size: int | None = None  # None: 4*n_embd, or ~8/3*n_embd for swiglu
    norm: str = "rmsnorm"  # normalization layer (rmsnorm: llama, layernorm: gpt2)
    pos: str = "rope"  # position encoding (rope: llama, learned: gpt2)
    mlp: str = "swiglu"  # feed-forward block (swiglu: llama, gelu: gpt2)
    bias: bool = False  # biases in the linear layers (gpt2 has them)
    tie_embeddings: bool = False  # share the input embedding and output head weights
    dropout: float = 0.0  # dropout probability while training
    norm_eps: float = 1e-5  # epsilon of the normalization layers
    rope_theta: float = 10000.0  # RoPE base frequency
    lstm_hidden: int = 256  # LSTM only: hidden units per layer (n_embd is the embedding size)

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def ffn_size(self) -> int:
        if self.intermediate_size:
            return self.intermediate_size
        if self.mlp == "swiglu":  # llama: 2/3 of 4*n_embd keeps the parameter count of a 4x MLP
            return 64 * math.ceil(8 * self.n_embd / 3 / 64)
        return 4 * self.n_embd

    @property
    def family(self) -> str | None:
        """'llama' or 'gpt2' when the switches match a Hugging Face architecture, else None."""
        if self.arch != "transformer":
            return None
        if (self.norm, self.pos, self.mlp) == ("rmsnorm", "rope", "swiglu") and not self.bias:
            return "llama"
        gelu = self.mlp in ("gelu", "gelu_exact")
        gpt2 = (self.norm, self.pos) == ("layernorm", "learned") and gelu and self.bias
        if gpt2 and self.kv_heads == self.n_head:
            return "gpt2"
        return None

    def problems(self) -> list[str]:
        p = []
        if self.arch not in ARCHS:
            p.append(f"arch must be one of {ARCHS}, got {self.arch!r}")
        if self.vocab_size < 0:
            p.append(f"vocab_size must be >= 0, got {self.vocab_size}")
        for name in ("block_size", "n_layer", "n_head", "n_embd", "lstm_hidden"):
            if getattr(self, name) < 1:
                p.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            p.append(f"dropout must be in [0, 1), got {self.dropout}")
        if self.arch == "transformer":
            if self.norm not in NORMS:
                p.append(f"norm must be one of {NORMS}, got {self.norm!r}")
            if self.pos not in POSITIONS:
                p.append(f"pos must be one of {POSITIONS}, got {self.pos!r}")
            if self.mlp not in MLPS:
                p.append(f"mlp must be one of {MLPS}, got {self.mlp!r}")
            if self.n_head >= 1 and self.n_embd % self.n_head:
                p.append(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
            elif self.pos == "rope" and self.head_dim % 2:
                p.append(f"rope needs an even head size, got n_embd/n_head = {self.head_dim}")
            if self.n_kv_head is not None and (self.n_kv_head < 1 or self.n_head % self.n_kv_head):
                p.append(f"n_kv_head ({self.n_kv_head}) must divide n_head ({self.n_head})")
        return p


@dataclass
class TrainConfig:
    """How to train. Every field is also a `semilla train` flag (--max-iters, ...)."""

    data: str = ""  # a prepared data dir, or raw text files/folders/globs (prepared on the fly); a weighted mixture: new:0.7,old:0.3
    out_dir: str = "runs/semilla"  # the run directory: last/, best/, metrics.jsonl, tb/
    init_from: str = ""  # a checkpoint: start from its weights and tokenizer (new optimizer, schedule)
    loss_on: str = "assistant"  # chat rows: loss on the assistant turns only, or on all tokens: all
    lora_r: int = 0  # LoRA rank: train only low-rank adapters on the --init-from model; 0 trains every weight
    lora_alpha: float = 16.0  # LoRA scale: the adapter's update is multiplied by lora_alpha / lora_r
    lora_dropout: float = 0.05  # dropout on the LoRA adapters' input
    target_modules: str = "q_proj,v_proj"  # layers LoRA adapts: comma-separated names, or all-linear
    lora_from: str = ""  # a PEFT adapter to train on from (same rank, alpha, modules); empty: a new one
    tokenizer: str = "char"  # tokenizer to train when --data is raw text
    vocab_size_bpe: int = 8192  # BPE vocabulary size when --data is raw text and --tokenizer bpe
    max_iters: int = 1600  # optimizer steps to train for
    batch_size: int = 8  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    learning_rate: float = 3e-3  # peak learning rate, reached after the warmup
    min_lr: float = 3e-4  # learning rate at the end of the cosine decay
    warmup_iters: int = 50  # steps of linear warmup
    lr_schedule: str = "cosine"  # learning-rate schedule after the warmup
    plateau_factor: float = 0.5  # plateau schedule: LR multiplier when validation stalls
    plateau_patience: int = 2  # evaluations without improvement before the LR drops
    plateau_min_lr: float = 1e-6  # plateau schedule: the LR never goes below this
    optimizer: str = "auto"  # muon: Muon for the transformer blocks' matrices, AdamW for the rest | adamw | auto: muon (adamw with --fsdp or LoRA)
    weight_decay: float = 0.1  # decoupled weight decay (matrices only)
    beta1: float = 0.9  # AdamW beta1
    beta2: float = 0.99  # AdamW beta2
    grad_clip: float = 1.0  # 0 disables clipping
    grad_spike_factor: float = 5.0  # flag a gradient norm over this x the running median (0: off)
    label_smoothing: float = 0.0  # cross-entropy label smoothing
    eval_interval: int = 100  # steps between validation runs (and best/ saves)
    eval_iters: int = 20  # batches per validation run
    log_interval: int = 10  # steps between training log lines
    save_interval: int = 500  # steps between resumable last/ checkpoints
    sample_interval: int = 500  # steps between text samples (terminal and TensorBoard)
    sample_tokens: int = 120  # length of each text sample in tokens
    early_stopping_patience: int = 0  # evaluations without val improvement; 0 = off
    ages: str = ""  # THAU ages to grow through in one run, e.g. 0,1,3 (ages 0 1 3 6 12 15)
    target_age: int | None = None  # every THAU age up to this one: 3 means --ages 0,1,3
    steps_per_age: int = 0  # training steps in each age; 0: max_iters shared evenly
    age_scale: float = 1.0  # THAU's widths and depths times this (0.25: a laptop's ages)
    age_schedule: str = ""  # YAML file of stages (shape and steps) instead of THAU's ages
    grow_mode: str = "exact"  # how the model grows between ages: exact (same function) | stack
    grow_warmup_iters: int = 20  # learning-rate re-warmup after each growth
    device: str = "auto"  # auto | cpu | cuda | mps
    dtype: str = "auto"  # auto: bf16 autocast where the device has native bf16 (CUDA, AVX512-BF16/AMX CPUs), fp32 elsewhere
    compile: bool | None = None  # torch.compile the model; unset: CPU runs of >= 2,500 steps, kernels off
    fsdp: bool = False  # shard weights, gradients, AdamW state over the processes (FSDP2); with --nproc
    seed: int = 1337  # seed of the weights, the batches and the samples
    deterministic: bool = False  # deterministic algorithms only (slower)
    progress: bool = True  # a progress bar

    def problems(self) -> list[str]:
        p = []
        for name in (
            "max_iters",
            "batch_size",
            "grad_accum",
            "eval_interval",
            "eval_iters",
            "log_interval",
            "save_interval",
            "sample_interval",
        ):
            if getattr(self, name) < 1:
                p.append(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup_iters < 0:
            p.append(f"warmup_iters must be >= 0, got {self.warmup_iters}")
        if not self.learning_rate > 0:
            p.append(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.min_lr < 0 or self.min_lr > self.learning_rate:
            p.append(f"min_lr must be in [0, learning_rate], got {self.min_lr}")
        if self.lr_schedule not in SCHEDULES:
            p.append(f"lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        if not 0 < self.plateau_factor < 1:
            p.append(f"plateau_factor must be in (0, 1), got {self.plateau_factor}")
        if self.grad_spike_factor < 0:
            p.append(f"grad_spike_factor must be >= 0 (0: off), got {self.grad_spike_factor}")
        if not 0.0 <= self.label_smoothing < 1.0:
            p.append(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if self.tokenizer not in TOKENIZERS:
            p.append(f"tokenizer must be 'char' or 'bpe', got {self.tokenizer!r}")
        if self.lora_r < 0:
            p.append(f"lora_r must be >= 1 for LoRA (0 trains every weight), got {self.lora_r}")
        elif self.lora_r and not self.init_from:
            p.append("lora_r needs init_from: a LoRA adapter is trained on a checkpoint's model")
        elif self.lora_r and (self.ages or self.target_age is not None or self.age_schedule):
            p.append("lora_r cannot be combined with ages: an adapter does not grow")
        if self.lora_from and not self.lora_r:
            p.append("lora_from needs lora_r: it continues a LoRA adapter")
        if self.lora_r > 0:
            from semilla.models.lora import AdapterError, LoraConfig

            try:
                LoraConfig(self.lora_r, self.lora_alpha, self.lora_dropout, self.target_modules)
            except AdapterError as e:
                p.append(str(e))
        if self.loss_on not in LOSS_ON:
            p.append(f"loss_on must be one of {', '.join(LOSS_ON)}, got {self.loss_on!r}")
        if self.device not in ("auto", "cpu", "cuda", "mps") and not self.device.startswith("cuda:"):
            p.append(f"device must be auto, cpu, cuda or mps, got {self.device!r}")
        if self.dtype not in DTYPES:
            p.append(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.early_stopping_patience < 0:
            p.append("early_stopping_patience must be >= 0")
        if self.steps_per_age < 0 or self.grow_warmup_iters < 0:
            p.append("steps_per_age and grow_warmup_iters must be >= 0")
        if not 0 < self.age_scale <= 1:
            p.append(f"age_scale must be in (0, 1], got {self.age_scale}")
        if self.optimizer not in OPTIMIZERS:
            p.append(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}")
        elif self.fsdp and self.optimizer == "muon":
            p.append("fsdp cannot use --optimizer muon: Muon orthogonalises whole matrices, FSDP shards them")
        elif self.lora_r and self.optimizer == "muon":
            p.append("LoRA adapters train with --optimizer adamw (or auto), not muon")
        if self.fsdp and (self.lora_r or self.ages or self.target_age is not None or self.age_schedule):
            p.append(
                "fsdp cannot be combined with LoRA or ages: it shards a whole model that keeps its shape"
            )
        if self.grow_mode not in GROW_MODES:
            p.append(f"grow_mode must be one of {', '.join(GROW_MODES)}, got {self.grow_mode!r}")
        return p


# Fields with a fixed set of values: their flags list them and refuse others.
FIELD_CHOICES: dict[str, tuple[str, ...]] = {
    "arch": ARCHS,
    "norm": NORMS,
    "pos": POSITIONS,
    "mlp": MLPS,
    "lr_schedule": SCHEDULES,
    "optimizer": OPTIMIZERS,
    "tokenizer": TOKENIZERS,
    "dtype": DTYPES,
    "truncate": ("left", "error"),
}

# --- presets ------------------------------------------------------------------------------

_GPT2 = dict(norm="layernorm", pos="learned", mlp="gelu", bias=True)
_LLAMA = dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False)


def _thau_age(n_embd: int, n_layer: int, **kw: Any) -> dict[str, Any]:
    base = dict(_LLAMA, vocab_size=32000, block_size=2048, n_embd=n_embd, n_layer=n_layer)
    return {**base, "n_head": n_embd // 64, **kw}


PRESETS: dict[str, dict[str, Any]] = {
    # tests: trains in seconds
    "tiny": dict(_LLAMA, vocab_size=256, block_size=64, n_layer=2, n_head=2, n_embd=32),
    # the DataShark beta model: 10,052,480 parameters with a 38-char vocab and 512 context
    "datashark-10m": dict(
        _GPT2,
        vocab_size=38,
        block_size=512,
        n_layer=8,
        n_head=8,
        n_embd=320,
        tie_embeddings=False,
    ),  # fmt: skip
    # robo-poet default: embedding 128, 2x LSTM 256, dropout 0.3, 10k vocab
    "robo-poet-lstm": dict(
        arch="lstm",
        vocab_size=10000,
        block_size=100,
        n_layer=2,
        n_embd=128,
        lstm_hidden=256,
        dropout=0.3,
    ),  # fmt: skip
    # robo-poet transformer: 6 layers, d 128, 4 heads, d_ff 512, sinusoidal, ReLU, pre-LN
    "robo-poet-transformer": dict(
        norm="layernorm",
        pos="sinusoidal",
        mlp="relu",
        bias=True,
        vocab_size=10000,
        block_size=512,
        n_layer=6,
        n_head=4,
        n_embd=128,
        intermediate_size=512,
        dropout=0.1,
    ),  # fmt: skip
    # THAU's ages (seed 004): d_model and layers from its table, llama family, 32k vocab
    "thau-age-0": _thau_age(256, 2),
    "thau-age-1": _thau_age(384, 3),
    "thau-age-3": _thau_age(512, 6),
    "thau-age-6": _thau_age(768, 12),
    "thau-age-12": _thau_age(1024, 24),
    # THAU-2B: 24 layers, 2560 wide, 32 heads, RoPE, 4096 context, 32k vocab (~2B parameters)
    "thau-age-15": _thau_age(2560, 24, block_size=4096, n_head=32),
}


def preset(name: str) -> ModelConfig:
    """The ModelConfig of a named preset."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return ModelConfig(**PRESETS[name])


# --- conversion helpers -------------------------------------------------------------------

ENV_PREFIX = "SEMILLA_"
DATASHARK_ALIASES = {
    "BLOCK_SIZE": "block_size",
    "N_LAYER": "n_layer",
    "N_HEAD": "n_head",
    "N_EMBD": "n_embd",
    "MAX_ITERS": "max_iters",
    "LEARNING_RATE": "learning_rate",
    "DATA_PATH": "data",
    "MODEL_OUT": "out_dir",
}


def field_types(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in fields(cls)}


def parse_value(typ: Any, raw: str) -> Any:
    """Parse a string (from a flag or the environment) into the field's type."""
    if typ is bool or typ == (bool | None):
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected a boolean, got {raw!r}")
    if raw.strip().lower() in ("none", "null", "") and type(None) in getattr(typ, "__args__", ()):
        return None
    base = typ
    if hasattr(typ, "__args__"):  # X | None
        base = next(a for a in typ.__args__ if a is not type(None))
    try:
        if base is int:
            return int(float(raw)) if raw.strip().lower().count("e") else int(raw)
        if base is float:
            return float(raw)
    except ValueError:
        raise ValueError(f"expected {'an integer' if base is int else 'a number'}, got {raw!r}") from None
    return raw


def apply_overrides(cfg: Any, values: dict[str, Any], source: str) -> list[str]:
    """Set fields of a dataclass from a dict; returns problems (unknown keys stay for others)."""
    problems = []
    types = field_types(type(cfg))
    for key, value in values.items():
        if key not in types:
            continue
        try:
            if isinstance(value, str) and types[key] is not str:
                value = parse_value(types[key], value)
            setattr(cfg, key, value)
        except ValueError as e:
            problems.append(f"{source}: {key}: {e}")
    return problems


def load_config_file(path: str | os.PathLike) -> dict[str, Any]:
    """Read a YAML or JSON config file into a flat dict (sections 'model'/'train' merged)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file not found: {p}")
    try:
        text = p.read_text(encoding="utf-8")
        data = json.loads(text) if p.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {p} cannot be parsed: {str(e).splitlines()[0]}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of settings")
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("model", "train") and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    known = set(field_types(ModelConfig)) | set(field_types(TrainConfig)) | {"preset"}
    unknown = sorted(set(flat) - known)
    if unknown:
        raise ConfigError(f"config file {p}: unknown settings: {', '.join(unknown)}")
    return flat


def environment_overrides(environ: dict[str, str] | None = None) -> dict[str, str]:
    """SEMILLA_<FIELD> variables and DataShark's aliases, as raw strings keyed by field."""
    environ = dict(os.environ if environ is None else environ)
    known = set(field_types(ModelConfig)) | set(field_types(TrainConfig)) | {"preset"}
    out: dict[str, str] = {}
    for alias, name in DATASHARK_ALIASES.items():
        if alias in environ:
            out[name] = environ[alias]
    for key, value in environ.items():
        if key.startswith(ENV_PREFIX) and key[len(ENV_PREFIX) :].lower() in known:
            out[key[len(ENV_PREFIX) :].lower()] = value
    return out


def resolve_configs(
    preset_name: str | None = None,
    config_file: str | None = None,
    overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> tuple[ModelConfig, TrainConfig]:
    """Build (ModelConfig, TrainConfig): preset < file < overrides (CLI) < environment."""
    layers: list[tuple[str, dict[str, Any]]] = []
    if config_file:
        layers.append((f"config file {config_file}", load_config_file(config_file)))
    layers.append(("flags", {k: v for k, v in (overrides or {}).items() if v is not None}))
    layers.append(("environment", environment_overrides(environ)))
    for _, values in layers:  # the last layer naming a preset wins
        if values.get("preset"):
            preset_name = values["preset"]
    model = preset(preset_name) if preset_name else ModelConfig()
    train = TrainConfig()
    problems: list[str] = []
    for source, values in layers:
        problems += apply_overrides(model, values, source)
        problems += apply_overrides(train, values, source)
    problems += model.problems() + train.problems()
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))
    return model, train


def model_config_from_dict(d: dict[str, Any]) -> ModelConfig:
    known = {f.name for f in fields(ModelConfig)}
    unknown = set(d) - known
    if unknown:
        raise ConfigError(f"model config has unknown fields: {', '.join(sorted(unknown))}")
    cfg = ModelConfig(**d)
    problems = cfg.problems()
    if problems:
        raise ConfigError("invalid model config: " + "; ".join(problems))
    return cfg


def replace(cfg: Any, **changes: Any) -> Any:
    return dataclasses.replace(cfg, **changes)


MAX_NEW_TOKENS_LIMIT = 1_000_000  # beyond this a request is a mistake, not a long generation

# The sampling `semilla chat` and `semilla eval` use where their flags say nothing else (their
# --help prints these); other commands and the API start from GenerateConfig's own defaults.
CHAT_SAMPLING: dict[str, Any] = {"temperature": 0.8, "top_k": 40}
EVAL_SAMPLING: dict[str, Any] = {"max_new_tokens": 100, "temperature": 0.8, "top_k": 40, "seed": 0}


@dataclass
class GenerateConfig:
    """Sampling settings of one generation (OpenAI semantics where OpenAI has the knob)."""

    max_new_tokens: int = 256
    min_new_tokens: int = 0
    temperature: float = 1.0  # 0 means greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # nucleus: keep the smallest set of tokens whose probability >= top_p
    min_p: float = 0.0  # drop tokens less likely than min_p * p(most likely)
    repetition_penalty: float = 1.0  # CTRL/HF: >1 discourages any token already seen
    frequency_penalty: float = 0.0  # OpenAI: logit -= count * frequency_penalty
    presence_penalty: float = 0.0  # OpenAI: logit -= presence_penalty if count > 0
    stop: list[str] = dataclasses.field(default_factory=list)  # stop strings (not emitted)
    stop_token_ids: list[int] = dataclasses.field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    logprobs: int | None = None  # None: off; N: also return the top-N alternatives per token
    truncate: str = "left"  # prompt longer than the context: 'left' (drop oldest) or 'error'
    use_cache: bool = True

    def problems(self) -> list[str]:
        p = []
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_LIMIT:
            p.append(f"max_new_tokens must be in [1, {MAX_NEW_TOKENS_LIMIT}], got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            p.append(f"min_new_tokens must be in [0, max_new_tokens], got {self.min_new_tokens}")
        if not self.temperature >= 0 or math.isinf(self.temperature):
            p.append(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            p.append(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            p.append(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p < 1:
            p.append(f"min_p must be in [0, 1), got {self.min_p}")
        if not self.repetition_penalty > 0:
            p.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                p.append(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if self.num_beams < 1:
            p.append(f"num_beams must be >= 1, got {self.num_beams}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            p.append(f"logprobs must be in [0, 20], got {self.logprobs}")
        if self.truncate not in ("left", "error"):
            p.append(f"truncate must be 'left' or 'error', got {self.truncate!r}")
        return p

    def validate(self) -> GenerateConfig:
        problems = self.problems()
        if problems:
            raise ConfigError("invalid generation settings: " + "; ".join(problems))
        return self
