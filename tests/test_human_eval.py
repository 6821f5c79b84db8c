"""Human evaluation: blind sheets out, raters' sheets in, means and kappa on hand-made ratings."""

from __future__ import annotations

import csv
import json

import pytest
from generation_helpers import char_tokenizer, tiny_lm, tiny_model
from helpers import run_cli

from semilla.checkpoint import save_checkpoint
from semilla.config import GenerateConfig
from semilla.errors import DataError
from semilla.human_eval import SCALES, cohen_kappa, export_sheet, fleiss_kappa, score_sheets

CFG = GenerateConfig(max_new_tokens=12, temperature=0.8, seed=0)


def read_csv(path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


# --- the blind sheet -----------------------------------------------------------------------


def test_export_writes_a_blind_shuffled_sheet_and_a_separate_key(tmp_path):
    models = {"runs/alpha": tiny_lm(seed=0), "runs/beta": tiny_lm(seed=1)}
    key_path = export_sheet(models, ["the", "En"], 2, CFG, str(tmp_path / "sheet.csv"))
    assert key_path == tmp_path / "sheet.csv.key.json"
    rows = read_csv(tmp_path / "sheet.csv")
    assert len(rows) == 2 * 2 * 2  # models x prompts x samples
    assert list(rows[0]) == ["id", "prompt", "text", *SCALES]
    assert all(row[s] == "" for row in rows for s in SCALES)  # for the raters to fill
    sheet = (tmp_path / "sheet.csv").read_text()
    assert "alpha" not in sheet and "beta" not in sheet  # the origin is hidden
    key = json.loads(key_path.read_text())
    assert sorted(key) == sorted(row["id"] for row in rows)
    assert sorted(key.values()) == ["runs/alpha"] * 4 + ["runs/beta"] * 4
    origins = [key[row["id"]] for row in rows]
    assert origins != sorted(origins)  # shuffled, not grouped by model


def test_export_writes_jsonl_by_extension(tmp_path):
    export_sheet({"a": tiny_lm()}, ["the"], 3, CFG, str(tmp_path / "sheet.jsonl"))
    rows = [json.loads(line) for line in (tmp_path / "sheet.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and set(rows[0]) == {"id", "prompt", "text", *SCALES}


# --- scoring -------------------------------------------------------------------------------


def write_sheets(tmp_path, ratings: dict[str, list[dict[str, int]]], key: dict[str, str]):
    """One CSV per rater; ratings[rater] lists each sample's scores in key order."""
    (tmp_path / "key.json").write_text(json.dumps(key))
    paths = []
    for rater, rows in ratings.items():
        path = tmp_path / f"{rater}.csv"
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["id", "prompt", "text", *SCALES])
            writer.writeheader()
            for sample_id, scores in zip(key, rows, strict=True):
                writer.writerow({"id": sample_id, "prompt": "", "text": "x", **scores})
        paths.append(str(path))
    return paths, str(tmp_path / "key.json")


def all_scales(value: int) -> dict[str, int]:
    return dict.fromkeys(SCALES, value)


KEY = {"s1": "A", "s2": "A", "s3": "B", "s4": "B"}


def test_scores_give_per_checkpoint_means_and_cohens_kappa(tmp_path):
    # overall: rater 1 gives 1 2 3 1, rater 2 gives 1 2 3 2.
    # p_o = 3/4; p_e = (2/4)(1/4) + (1/4)(2/4) + (1/4)(1/4) = 5/16; kappa = (3/4 - 5/16) / (11/16)
    first = [all_scales(v) for v in (1, 2, 3, 1)]
    second = [all_scales(v) for v in (1, 2, 3, 2)]
    files, key = write_sheets(tmp_path, {"r1": first, "r2": second}, KEY)
    result = score_sheets(files, key)
    assert result["means"]["A"]["overall"] == 1.5  # 1, 2, 1, 2
    assert result["means"]["B"]["overall"] == 2.25  # 3, 1, 3, 2
    assert result["means"]["A"]["ratings"] == 4
    agreement = result["agreement"]
    assert agreement["raters"] == 2
    assert agreement["cohen_kappa_overall"] == pytest.approx(7 / 11, abs=1e-4)
    # Fleiss with 2 raters: P_i = 1, 1, 1, 0 -> 3/4; p_j = 3/8, 3/8, 2/8 -> P_e = 22/64
    assert agreement["fleiss_kappa_overall"] == pytest.approx((0.75 - 22 / 64) / (1 - 22 / 64), abs=1e-4)


def test_perfect_agreement_is_kappa_one(tmp_path):
    rows = [all_scales(v) for v in (5, 4, 2, 1)]
    files, key = write_sheets(tmp_path, {"r1": rows, "r2": rows, "r3": rows}, KEY)
    agreement = score_sheets(files, key)["agreement"]
    assert agreement["raters"] == 3 and "cohen_kappa_overall" not in agreement  # 2 raters only
    assert all(agreement[f"fleiss_kappa_{s}"] == 1.0 for s in SCALES)
    assert cohen_kappa([5, 4, 2, 1], [5, 4, 2, 1]) == 1.0


def test_fleiss_kappa_of_the_textbook_example():
    # Fleiss (1971) as worked on Wikipedia: 10 subjects, 14 raters, 5 categories -> 0.210
    table = [
        [0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
        [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7],
    ]  # fmt: skip
    assert fleiss_kappa(table) == pytest.approx(0.20993, abs=1e-4)


def test_blank_ratings_are_skipped(tmp_path):
    rows = [all_scales(3), {**all_scales(4), "creativity": ""}, all_scales(5), all_scales(1)]
    files, key = write_sheets(tmp_path, {"r1": rows}, KEY)
    means = score_sheets(files, key)["means"]
    assert means["A"]["creativity"] == 3.0 and means["A"]["fluency"] == 3.5


@pytest.mark.parametrize("bad", ["6", "0", "abc", "3.5"])
def test_an_invalid_rating_is_a_data_error(tmp_path, bad):
    rows = [all_scales(3), {**all_scales(3), "fluency": bad}, all_scales(3), all_scales(3)]
    files, key = write_sheets(tmp_path, {"r1": rows}, KEY)
    with pytest.raises(DataError, match=f"row 3: fluency must be 1-5, got '{bad}'"):
        score_sheets(files, key)


def test_a_sample_missing_from_the_key_is_a_data_error(tmp_path):
    files, key = write_sheets(tmp_path, {"r1": [all_scales(3)] * 4}, KEY)
    (tmp_path / "key.json").write_text(json.dumps({"s1": "A"}))
    with pytest.raises(DataError, match="'s2' is not in"):
        score_sheets(files, key)


def test_missing_files_are_data_errors(tmp_path):
    files, key = write_sheets(tmp_path, {"r1": [all_scales(3)] * 4}, KEY)
    with pytest.raises(DataError, match="key file not found"):
        score_sheets(files, str(tmp_path / "nope.json"))
    with pytest.raises(DataError, match="rating sheet not found"):
        score_sheets([str(tmp_path / "nope.csv")], key)


# --- the command ---------------------------------------------------------------------------


def test_eval_human_exports_then_scores(tmp_path):
    tok = char_tokenizer()
    for name in ("a", "b"):
        save_checkpoint(tmp_path / name, tiny_model(tok, seed=len(name)), tok)
    (tmp_path / "prompts.txt").write_text("the\nEn\n")
    sheet = tmp_path / "sheet.csv"
    proc = run_cli(
        "eval", "human", tmp_path / "a", tmp_path / "b", "--prompts", tmp_path / "prompts.txt",
        "-n", "1", "--max-new-tokens", "8", "-o", sheet,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = read_csv(sheet)
    assert len(rows) == 4
    for row, value in zip(rows, (5, 4, 2, 1), strict=True):
        row.update(all_scales(value))
    with sheet.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    proc = run_cli("eval-human", "--score", sheet, sheet, "--key", f"{sheet}.key.json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert set(result["means"]) == {str(tmp_path / "a"), str(tmp_path / "b")}
    assert result["agreement"]["cohen_kappa_overall"] == 1.0
