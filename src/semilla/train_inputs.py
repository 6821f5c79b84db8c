"""What a training run starts from: its data (prepared, raw text, weighted mixtures of both)
and, for `--init-from`, the checkpoint whose weights, shape and tokenizer it takes."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

from semilla.batches import MixtureDataset, TokenDataset, is_prepared, parse_mixture
from semilla.checkpoint import infer_shapes, read_config, resolve_checkpoint, weight_shapes
from semilla.config import ModelConfig, TrainConfig, apply_overrides, model_config_from_dict
from semilla.data import prepare, train_tokenizer
from semilla.errors import CheckpointError, ConfigError, DataError
from semilla.tokenizer import Tokenizer

log = logging.getLogger(__name__)


def load_data(
    cfg: TrainConfig, run_dir: Path, progress: bool, tokenizer_from: Path | None
) -> list[tuple[Path, float]]:
    """Prepared dataset directories and their mixture weights (one, weight 1, for plain data).

    Raw text is prepared into the run (`data/`, or `data_N/` per mixture source) with the
    tokenizer of `tokenizer_from`, else of the mixture's first prepared source, else a new one
    trained on all the raw text.
    """
    if not cfg.data:
        raise ConfigError("no training data: give --data (text files, folders, globs or a prepared dir)")
    mixture = parse_mixture(cfg.data)
    if mixture is None:
        if is_prepared(cfg.data):
            return [(Path(cfg.data), 1.0)]
        return [(_prepare_into(cfg, cfg.data.split(","), run_dir / "data", tokenizer_from, progress), 1.0)]
    prepared = [Path(path) for path, _ in mixture if is_prepared(path)]
    raw = [(i, path) for i, (path, _) in enumerate(mixture) if not is_prepared(path)]
    unprepared = [i for i, _ in raw if not is_prepared(run_dir / f"data_{i}")]
    tokenizer: Path | Tokenizer | None = tokenizer_from or (prepared[0] if prepared else None)
    if tokenizer is None and unprepared:
        tokenizer = train_tokenizer([path for _, path in raw], cfg.tokenizer, cfg.vocab_size_bpe)
    sources = [(Path(path), weight) for path, weight in mixture]
    for i, path in raw:
        sources[i] = (_prepare_into(cfg, [path], run_dir / f"data_{i}", tokenizer, progress), mixture[i][1])
    first = Tokenizer.load(sources[0][0])
    for path, _ in sources[1:]:
        if not Tokenizer.load(path).same_encoding(first):
            raise DataError(
                f"--data mixture: {path} has another tokenizer than {sources[0][0]}; prepare every source "
                f"with one tokenizer (semilla prepare ... --tokenizer-from {sources[0][0]})"
            )
    return sources


def _prepare_into(
    cfg: TrainConfig, inputs: list[str], prepared: Path, tokenizer: Path | Tokenizer | None, progress: bool
) -> Path:
    if not is_prepared(prepared):
        log.info("preparing %s into %s", ",".join(inputs), prepared)
        prepare(
            inputs,
            str(prepared),
            tokenizer=cfg.tokenizer,
            vocab_size=cfg.vocab_size_bpe,
            tokenizer_from=str(tokenizer) if isinstance(tokenizer, Path) else tokenizer,
            progress=progress,
        )
    return prepared


def open_split(
    sources: list[tuple[Path, float]], split: str, loss_mask: bool
) -> TokenDataset | MixtureDataset:
    """One split of the data: a dataset, or a weighted mixture (a source without it gives its train split)."""
    datasets = []
    for path, _ in sources:
        data = TokenDataset(path, split, loss_mask)
        if not data.n_tokens:
            log.warning("%s has no %s split; using its training split", path, split)
            data = TokenDataset(path, "train", loss_mask)
        datasets.append(data)
    if len(sources) == 1:
        return datasets[0]
    return MixtureDataset(datasets, [w for _, w in sources])


def init_checkpoint(path: str) -> Path:
    """The checkpoint directory `--init-from` names; int8 checkpoints are for inference only."""
    directory = resolve_checkpoint(path)
    if read_config(directory).get("quantization"):
        raise CheckpointError(
            f"{path} is an int8 checkpoint, which cannot be trained: start from the float checkpoint it was exported from"
        )
    return directory


def checkpoint_model_config(directory: Path) -> ModelConfig:
    """A checkpoint's model config, every shape the weights pin down read from the weights."""
    return infer_shapes(model_config_from_dict(read_config(directory)["model"]), weight_shapes(directory))


def changed_fields(saved: ModelConfig, wanted: ModelConfig, ignored: tuple[str, ...]) -> list[str]:
    """'name old -> new' for every model setting that differs, but the `ignored` ones."""
    return [
        f"{f.name} {getattr(saved, f.name)} -> {getattr(wanted, f.name)}"
        for f in dataclasses.fields(ModelConfig)
        if f.name not in ignored and getattr(wanted, f.name) != getattr(saved, f.name)
    ]


def init_model_config(init_from: str, overrides: dict[str, Any]) -> ModelConfig:
    """The model of a run started `--init-from` a checkpoint: the checkpoint's own. Of the model
    settings in `overrides` (flags, file, environment) only dropout may differ."""
    saved = checkpoint_model_config(init_checkpoint(init_from))
    wanted = dataclasses.replace(saved)
    problems = apply_overrides(wanted, overrides, "flags")
    if problems:
        raise ConfigError("invalid configuration: " + "; ".join(problems))
    changed = changed_fields(saved, wanted, ("vocab_size", "dropout"))
    if changed:
        raise CheckpointError(
            f"--init-from {init_from} takes the model's shape from the checkpoint; "
            f"drop the flags that change it: {', '.join(changed)}"
        )
    return wanted
