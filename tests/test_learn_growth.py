"""--grow-on-plateau: rounds the gate keeps rolling back grow the model to the next THAU age, the
same function in a larger shape, and learning goes on with it; a crash mid-growth finishes it once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import DEMO_TEXT, run_cli, tiny_configs
from learn_helpers import FACTS, Teacher, teacher_server

import semilla
import semilla.models.grow
from semilla.ages import age_shape
from semilla.data import prepare
from semilla.learn import learn, learn_stats
from semilla.learn.gate import validation_ppl

SCALE = 0.125  # THAU's age 0 at this scale: 4 heads of 8 (n_embd 32), one layer; age 1: 6 heads


@pytest.fixture(scope="module")
def aged_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A run trained through age 0 at SCALE on the bundled Quijote."""
    from semilla.train import train

    root = tmp_path_factory.mktemp("aged")
    (root / "quijote.txt").write_text(DEMO_TEXT.read_text(encoding="utf-8"), encoding="utf-8")
    prepare([str(root / "quijote.txt")], str(root / "data"))
    train(*tiny_configs(root / "data", root / "run", block_size=64, batch_size=8, ages="0", age_scale=SCALE,
                        max_iters=40, eval_interval=40, save_interval=40, sample_interval=400))  # fmt: skip
    return root / "run"


def settings(root: Path, url: str) -> dict:
    """Rounds that cannot improve (one step at a learning rate of 1e-6): each is rolled back."""
    (root / "topics.txt").write_text("\n".join(list(FACTS)[:8]) + "\n", encoding="utf-8")
    (root / "templates.txt").write_text("¿Qué es {concept}?\n", encoding="utf-8")
    return dict(teacher_url=url, teacher_model="t", topics=str(root / "topics.txt"),
                templates=str(root / "templates.txt"), questions_per_round=2, questions_per_hour=100,
                questions_per_day=100, min_question_spacing_s=0, num_samples=1, train_steps=1,
                learning_rate=1e-6, val_tokens=2000, device="cpu", grow_on_plateau=True, plateau_rounds=2)  # fmt: skip


def shape(checkpoint: Path) -> tuple[int, int, int]:
    model = json.loads((checkpoint / "config.json").read_text())["model"]
    return model["n_embd"], model["n_head"], model["n_layer"]


def test_a_plateau_grows_the_model_to_the_next_age_once_even_after_a_crash(
    aged_run: Path, tmp_path: Path, monkeypatch
):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(aged_run, run)
    data = aged_run.parent / "data"
    assert shape(run / "best") == (32, 4, 1)
    before = validation_ppl(semilla.load(str(run), device="cpu"), data, 2000)
    with teacher_server(Teacher("facts")) as url:
        cfg = settings(tmp_path, url)
        first = learn(run, rounds=2, **cfg)["rounds"]
        assert [r["status"] for r in first] == ["rolled_back", "rolled_back"]
        assert not (run / "learn" / "best").exists()  # nothing grows before the next round starts

        def disk_full(*args, **kwargs):
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(semilla.models.grow, "grow_checkpoint", disk_full)
        with pytest.raises(OSError, match="No space left"):
            learn(run, rounds=1, **cfg)
        pending = json.loads((run / "learn" / "state.json").read_text())["growth"]
        assert pending == {"age": 1, "after_round": 2, "shape": age_shape(1, SCALE), "done": False}
        monkeypatch.undo()
        [third] = learn(run, rounds=1, **cfg)["rounds"]  # the growth is finished, then round 3 runs
        assert third["round"] == 3 and third["status"] == "rolled_back"
        [fourth] = learn(run, rounds=1, **cfg)["rounds"]  # one rollback since the growth: no plateau yet
    assert fourth["round"] == 4
    stats = learn_stats(run)
    assert [(g["age"], g["after_round"]) for g in stats["growths"]] == [(1, 2)]
    assert shape(run / "learn" / "best") == (48, 6, 1) and shape(run / "best") == (32, 4, 1)
    grown = semilla.load(str(run / "learn" / "best"), device="cpu")
    assert validation_ppl(grown, data, 2000) == pytest.approx(before, rel=1e-4)  # the same function
    shown = run_cli("learn", "stats", run)
    assert shown.returncode == 0 and "growths              1 (age 1 after round 2)" in shown.stdout, (
        shown.stdout
    )


def test_grow_on_plateau_with_an_adapter_is_refused():
    from semilla.errors import ConfigError
    from semilla.learn.config import LearnConfig

    with pytest.raises(ConfigError, match="an adapter does not grow"):
        LearnConfig(teacher_url="u", teacher_model="m", grow_on_plateau=True, into_adapter="a").validate()
