"""Configuration: preset < file (YAML/JSON) < flags < environment, DataShark aliases, validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from semilla.config import (
    PRESETS,
    ModelConfig,
    TrainConfig,
    model_config_from_dict,
    preset,
    resolve_configs,
)
from semilla.errors import ConfigError


@pytest.fixture(params=["yaml", "json"])
def config_file(request, tmp_path: Path) -> Path:
    """A file in both shapes the docs allow: 'model'/'train' sections, and flat keys."""
    settings = {
        "model": {"n_layer": 3, "n_embd": 64},
        "train": {"max_iters": 77, "learning_rate": 0.005},
        "batch_size": 9,
    }
    if request.param == "yaml":
        path = tmp_path / "settings.yaml"
        path.write_text(yaml.safe_dump(settings), encoding="utf-8")
    else:
        path = tmp_path / "settings.json"
        path.write_text(json.dumps(settings), encoding="utf-8")
    return path


def test_defaults_and_preset() -> None:
    model, train = resolve_configs(environ={})
    assert model == ModelConfig() and train == TrainConfig()
    model, _ = resolve_configs("datashark-10m", environ={})
    assert model == preset("datashark-10m")
    assert (model.n_layer, model.n_embd, model.n_head, model.family) == (8, 320, 8, "gpt2")


def test_file_overrides_preset(config_file: Path) -> None:
    model, train = resolve_configs("tiny", str(config_file), environ={})
    assert (model.n_layer, model.n_embd) == (3, 64)
    assert model.n_head == PRESETS["tiny"]["n_head"]  # untouched preset values stay
    assert (train.max_iters, train.learning_rate, train.batch_size) == (77, 0.005, 9)


def test_flags_override_file(config_file: Path) -> None:
    model, train = resolve_configs("tiny", str(config_file), {"n_layer": 5, "max_iters": None}, environ={})
    assert model.n_layer == 5
    assert train.max_iters == 77  # an unset flag (None) does not override


def test_environment_overrides_flags(config_file: Path) -> None:
    env = {"SEMILLA_N_LAYER": "6", "SEMILLA_LEARNING_RATE": "3e-4", "SEMILLA_COMPILE": "yes"}
    model, train = resolve_configs("tiny", str(config_file), {"n_layer": 5}, environ=env)
    assert model.n_layer == 6 and train.learning_rate == 3e-4 and train.compile is True


def test_environment_can_name_the_preset() -> None:
    model, _ = resolve_configs("tiny", environ={"SEMILLA_PRESET": "robo-poet-lstm"})
    assert model.arch == "lstm" and model.lstm_hidden == 256


def test_datashark_aliases() -> None:
    env = {
        "BLOCK_SIZE": "48",
        "N_LAYER": "3",
        "N_HEAD": "4",
        "N_EMBD": "96",
        "MAX_ITERS": "1234",
        "LEARNING_RATE": "0.0007",
        "DATA_PATH": "corpus/",
        "MODEL_OUT": "runs/shark",
    }
    model, train = resolve_configs("tiny", environ=env)
    assert (model.block_size, model.n_layer, model.n_head, model.n_embd) == (48, 3, 4, 96)
    assert (train.max_iters, train.learning_rate) == (1234, 0.0007)
    assert (train.data, train.out_dir) == ("corpus/", "runs/shark")


def test_semilla_variables_win_over_datashark_aliases() -> None:
    model, _ = resolve_configs(environ={"N_LAYER": "3", "SEMILLA_N_LAYER": "7"})
    assert model.n_layer == 7


def test_unrelated_environment_is_ignored() -> None:
    model, train = resolve_configs(environ={"SEMILLA_NOT_A_FIELD": "1", "HOME": "/root", "PATH": "/bin"})
    assert model == ModelConfig() and train == TrainConfig()


def test_validation_lists_every_problem_in_one_error() -> None:
    flags = {"n_embd": 30, "n_head": 4, "dropout": 1.5, "max_iters": 0, "lr_schedule": "linear"}
    with pytest.raises(ConfigError) as err:
        resolve_configs("tiny", overrides=flags, environ={"SEMILLA_BATCH_SIZE": "many"})
    message = str(err.value)
    assert "\n" not in message
    for needle in (
        "n_embd (30) must be divisible by n_head (4)",
        "dropout must be in [0, 1), got 1.5",
        "max_iters must be >= 1, got 0",
        "lr_schedule must be one of",
        "environment: batch_size",
    ):
        assert needle in message, needle


def test_unknown_preset_lists_the_choices() -> None:
    with pytest.raises(ConfigError, match="unknown preset 'gpt5'.*datashark-10m"):
        resolve_configs("gpt5", environ={})


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        ("n_layers: 3\n", "unknown settings: n_layers"),
        ("model: [1, 2\n", "cannot be parsed"),
        ("- a list\n", "must hold a mapping"),
    ],
)
def test_bad_config_files(tmp_path: Path, content: str, problem: str) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ConfigError, match=problem):
        resolve_configs(config_file=str(path), environ={})
    with pytest.raises(ConfigError, match="not found"):
        resolve_configs(config_file=str(tmp_path / "missing.yaml"), environ={})


def test_model_config_round_trips_through_json() -> None:
    from dataclasses import asdict

    for name in PRESETS:
        cfg = preset(name)
        assert model_config_from_dict(json.loads(json.dumps(asdict(cfg)))) == cfg
    with pytest.raises(ConfigError, match="unknown fields: n_layers"):
        model_config_from_dict({"n_layers": 2})
