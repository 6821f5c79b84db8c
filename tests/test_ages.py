"""Ages: one run that grows its model through a schedule of shapes, resumable across a growth."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from helpers import assert_one_line_error, run_cli, tiny_configs, tiny_train_flags
from test_train import assert_same_training

import semilla.train as training
from semilla.ages import THAU_AGES, age_shape, plan_stages
from semilla.checkpoint import load_checkpoint
from semilla.config import TrainConfig
from semilla.errors import CheckpointError, ConfigError
from semilla.train import train
from semilla.train_setup import resume_configs

# THAU's ages 0 -> 1 at 1/8 scale: 4 heads of 8 (width 32, 1 layer) -> 6 heads of 8 (48, 1 layer)
AGES = dict(ages="0,1", age_scale=0.125, steps_per_age=4, grow_warmup_iters=2, deterministic=True, seed=3)


def test_thau_ages_scale_and_keep_their_head_size() -> None:
    assert age_shape(3) == {"n_embd": 512, "n_layer": 6, "n_head": 8}
    assert age_shape(15) == {"n_embd": 2560, "n_layer": 24, "n_head": 40}  # heads of 64: exact growth
    quarter = [age_shape(a, 0.25) for a in THAU_AGES]
    assert [s["n_embd"] // s["n_head"] for s in quarter] == [16] * len(THAU_AGES)
    widths, layers = [s["n_embd"] for s in quarter], [s["n_layer"] for s in quarter]
    assert widths == sorted(widths) and layers == sorted(layers)


def test_target_age_means_every_age_up_to_it() -> None:
    stages = plan_stages(TrainConfig(target_age=3, max_iters=30))
    assert [s.name for s in stages] == ["age_0", "age_1", "age_3"]
    assert [s.steps for s in stages] == [10, 10, 10]
    assert [s.steps for s in plan_stages(TrainConfig(ages="1,6", steps_per_age=7))] == [7, 7]
    assert plan_stages(TrainConfig()) == []


@pytest.mark.parametrize(
    "settings, needle",
    [
        (dict(ages="0,2"), "unknown age 2"),
        (dict(ages="0,x"), "comma-separated"),
        (dict(ages="3,1"), "increasing"),
        (dict(target_age=4), "unknown age 4"),
        (dict(ages="0,1", target_age=3), "not both"),
    ],
)
def test_bad_ages_are_refused(settings: dict, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        plan_stages(TrainConfig(**settings))


def test_a_run_through_two_ages_keeps_each_age_and_grows_in_place(tmp_path: Path, prepared_dir: Path) -> None:
    run = tmp_path / "ages"
    result = train(*tiny_configs(prepared_dir, run, **AGES))
    assert result["step"] == 8
    small, _, _ = load_checkpoint(run / "ages" / "age_0_final")
    large, _, _ = load_checkpoint(run / "ages" / "age_1_final")
    assert (small.config.n_embd, small.config.n_head) == (32, 4)
    assert (large.config.n_embd, large.config.n_head) == (48, 6)
    last, _, _ = load_checkpoint(run / "last")
    assert last.config.n_embd == 48
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    grows = [r for r in rows if r["kind"] == "grow"]
    assert [(r["step"], r["stage"]) for r in grows] == [(4, 1)]
    history = json.loads((run / "last" / "trainer_state.json").read_text())["ages"]
    assert [(h["age"], h["step"], h["n_embd"]) for h in history] == [("age_0", 4, 32), ("age_1", 8, 48)]
    assert history[1]["parameters"] > history[0]["parameters"]
    # the learning rate re-warms after the growth: step 5 (the first grown step) is below step 4
    lrs = {r["step"]: r["lr"] for r in rows if r["kind"] == "train"}
    assert lrs[5] < lrs[4]


class StopAt(training.StopFlag):
    """A Ctrl-C before step `at`: the loop reads `requested` once before each step."""

    at = 0

    def __init__(self) -> None:
        super().__init__()
        self.reads = 0

    @property
    def requested(self) -> bool:
        self.reads += 1
        return self.reads > self.at

    @requested.setter
    def requested(self, value: bool) -> None:
        pass


@pytest.mark.parametrize("stop_at", [3, 4, 6])
def test_resume_across_an_age_boundary_equals_a_straight_run(
    tmp_path: Path, prepared_dir: Path, monkeypatch: pytest.MonkeyPatch, stop_at: int
) -> None:
    """Stopped before, exactly at, or after the growth at step 4, then resumed: bit-identical."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    train(*tiny_configs(prepared_dir, straight, **AGES))
    with monkeypatch.context() as patch:
        patch.setattr(StopAt, "at", stop_at)
        patch.setattr(training, "StopFlag", StopAt)
        assert train(*tiny_configs(prepared_dir, stopped, **AGES))["step"] == stop_at
    model_cfg, train_cfg = resume_configs(str(stopped), {})
    assert train(model_cfg, train_cfg, resume=str(stopped))["step"] == 8
    assert_same_training(straight, stopped, 8)


def test_ages_from_the_command_line_and_a_schedule_file(tmp_path: Path, prepared_dir: Path) -> None:
    schedule = tmp_path / "stages.yaml"
    schedule.write_text(
        yaml.safe_dump(
            {
                "stages": [
                    {"name": "seedling", "steps": 3, "n_embd": 16, "n_layer": 1, "n_head": 2},
                    {"name": "sapling", "steps": 3, "n_embd": 32, "n_layer": 2, "n_head": 4},
                ]
            }
        )
    )
    run = tmp_path / "cli"
    flags = tiny_train_flags(age_schedule=str(schedule))
    done = run_cli("train", "--data", prepared_dir, "--out-dir", run, *flags)
    assert done.returncode == 0, done.stderr
    assert (run / "ages" / "seedling_final").is_dir() and (run / "ages" / "sapling_final").is_dir()
    info = run_cli("info", run, "--json")
    assert info.returncode == 0, info.stderr
    report = json.loads(info.stdout)
    assert [a["age"] for a in report["ages"]] == ["seedling", "sapling"]
    assert report["layers"] == 2


@pytest.mark.parametrize(
    "flags, needle",
    [
        (["--ages", "0,5"], "unknown age 5"),
        (["--target-age", "7"], "unknown age 7"),
        (["--ages", "0,1", "--age-scale", "2"], "age_scale"),
        (["--ages", "0,1", "--grow-mode", "magic"], "grow_mode"),
    ],
)
def test_bad_age_flags_are_one_line(
    tmp_path: Path, prepared_dir: Path, flags: list, needle: str, cli_in_process
) -> None:
    proc = cli_in_process(
        "train", "--data", prepared_dir, "--out-dir", tmp_path / "x", *tiny_train_flags(), *flags
    )
    assert_one_line_error(proc, needle)
    assert not (tmp_path / "x" / "last").exists()


def test_a_schedule_that_shrinks_is_refused_before_training(
    tmp_path: Path, prepared_dir: Path, cli_in_process
) -> None:
    schedule = tmp_path / "shrink.yaml"
    schedule.write_text(
        yaml.safe_dump(
            {
                "stages": [
                    {"steps": 2, "n_embd": 32, "n_layer": 2, "n_head": 4},
                    {"steps": 2, "n_embd": 16, "n_layer": 2, "n_head": 2},
                ]
            }
        )
    )
    proc = cli_in_process(
        "train",
        "--data",
        prepared_dir,
        "--out-dir",
        tmp_path / "x",
        *tiny_train_flags(age_schedule=str(schedule)),
    )
    assert_one_line_error(proc, "n_embd")
    assert not (tmp_path / "x" / "last").exists()


def test_ages_can_start_from_a_checkpoint_grown_into_the_first_age(
    tmp_path: Path, prepared_dir: Path
) -> None:
    first = tmp_path / "first"
    train(*tiny_configs(prepared_dir, first, **AGES))
    source = first / "ages" / "age_0_final"  # 4 heads of 8: width 32, THAU's age 0 at 1/8
    run = tmp_path / "from-age-0"
    done = run_cli(
        "train", "--data", prepared_dir, "--out-dir", run, "--init-from", source,
        *[f for f in tiny_train_flags() if f not in ("--preset", "tiny")],
        "--ages", "1", "--age-scale", "0.125", "--steps-per-age", "3",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    grown, _, _ = load_checkpoint(run / "ages" / "age_1_final")
    assert (grown.config.n_embd, grown.config.n_head) == (48, 6)


def test_a_crash_while_growing_resumes_into_the_grown_model(
    tmp_path: Path, prepared_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """last/ saved at the boundary step, then a kill before the growth is saved: the resume ends
    the age and grows, as the straight run did."""
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    train(*tiny_configs(prepared_dir, straight, **AGES))

    def crash(*args, **kwargs):
        raise RuntimeError("killed while growing")

    with monkeypatch.context() as patch:
        patch.setattr(training, "grow_trainer", crash)
        with pytest.raises(RuntimeError, match="killed while growing"):
            train(*tiny_configs(prepared_dir, crashed, **AGES))  # save_interval 4: last/ at step 4
    assert json.loads((crashed / "last" / "trainer_state.json").read_text())["step"] == 4
    model_cfg, train_cfg = resume_configs(str(crashed), {})
    train(model_cfg, train_cfg, resume=str(crashed))
    assert_same_training(straight, crashed, 8)
    assert load_checkpoint(crashed / "last")[0].config.n_embd == 48


def test_a_run_through_ages_keeps_its_schedule_on_resume(tmp_path: Path, prepared_dir: Path) -> None:
    run = tmp_path / "ages"
    train(*tiny_configs(prepared_dir, run, **AGES))
    for overrides in ({"max_iters": 20}, {"steps_per_age": 9}, {"age_scale": 0.25}, {"ages": "0,1,3"}):
        with pytest.raises(CheckpointError, match="changed age schedule"):
            resume_configs(str(run), overrides)


def test_a_refused_new_run_leaves_the_old_one_alone(
    tmp_path: Path, prepared_dir: Path, cli_in_process
) -> None:
    run = tmp_path / "run"
    train(*tiny_configs(prepared_dir, run))
    (run / "database_backup").mkdir()
    proc = cli_in_process(
        "train", "--data", prepared_dir, "--out-dir", run, *tiny_train_flags(), "--ages", "0,5", "--overwrite"
    )
    assert_one_line_error(proc, "unknown age 5")
    assert (run / "last").is_dir() and (run / "database_backup").is_dir()
    done = run_cli("train", "--data", prepared_dir, "--out-dir", run, *tiny_train_flags(), "--overwrite")
    assert done.returncode == 0, done.stderr
    assert (run / "database_backup").is_dir()  # only the run's own files go


@pytest.mark.parametrize(
    "settings, needle",
    [
        (dict(ages=","), "at least one age"),
        (dict(ages="0,1", early_stopping_patience=2), "early stopping"),
    ],
)
def test_settings_that_cannot_run_through_ages(
    tmp_path: Path, prepared_dir: Path, settings: dict, needle: str
) -> None:
    with pytest.raises(ConfigError, match=needle):
        train(*tiny_configs(prepared_dir, tmp_path / "x", **{**AGES, **settings}))


@pytest.mark.parametrize("name", ["../escape", "two words"])
def test_stage_names_name_directories_safely(tmp_path: Path, name: str) -> None:
    schedule = tmp_path / "s.yaml"
    schedule.write_text(yaml.safe_dump({"stages": [{"name": name, "steps": 2, "n_embd": 32, "n_head": 4}]}))
    with pytest.raises(ConfigError, match="must be unique"):
        plan_stages(TrainConfig(age_schedule=str(schedule)))
    twice = tmp_path / "twice.yaml"
    twice.write_text(yaml.safe_dump({"stages": [{"name": "a", "steps": 2}, {"name": "a", "steps": 2}]}))
    with pytest.raises(ConfigError, match="must be unique"):
        plan_stages(TrainConfig(age_schedule=str(twice)))


def test_a_schedule_that_grows_the_context_trains_on_the_longer_windows(
    tmp_path: Path, prepared_dir: Path
) -> None:
    schedule = tmp_path / "longer.yaml"
    schedule.write_text(
        yaml.safe_dump(
            {
                "stages": [
                    {"name": "short", "steps": 3, "n_embd": 32, "n_head": 4, "n_layer": 1, "block_size": 16},
                    {"name": "long", "steps": 3, "n_embd": 32, "n_head": 4, "n_layer": 1, "block_size": 32},
                ]
            }
        )
    )
    run = tmp_path / "ctx"
    train(*tiny_configs(prepared_dir, run, age_schedule=str(schedule), deterministic=True))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    tokens = {r["step"]: r["tokens_per_s"] for r in rows if r["kind"] == "train"}
    state = json.loads((run / "last" / "trainer_state.json").read_text())
    assert state["tokens_seen"] == 3 * 4 * 16 + 3 * 4 * 32  # batch 4: three short steps, three long
    assert len(tokens) == 6
