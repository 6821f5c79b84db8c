"""robo-poet's human evaluation: blind sample sheets out, raters' sheets in, means and kappa.

`export_sheet` shuffles samples from several checkpoints under opaque ids (the id -> checkpoint
key goes to a separate file the raters never see). `score_sheets` merges the filled sheets and
reports per-checkpoint means and inter-annotator agreement (Cohen's kappa for two raters,
Fleiss' kappa for any number).
"""

from __future__ import annotations

import csv
import json
import math
import random
import secrets
from collections import defaultdict
from pathlib import Path
from typing import Any

from semilla.api import LanguageModel
from semilla.config import GenerateConfig
from semilla.errors import DataError

SCALES = ("fluency", "coherence", "creativity", "relevance", "overall")
RATINGS = (1, 2, 3, 4, 5)


def export_sheet(
    models: dict[str, LanguageModel],
    prompts: list[str],
    samples_per_prompt: int,
    cfg: GenerateConfig,
    out: str,
    seed: int = 0,
) -> Path:
    """Write the blind sheet (CSV or JSONL by extension) and `<out>.key.json` beside it."""
    rows, key = [], {}
    for name, lm in models.items():
        for prompt in prompts:
            seeds = [None if cfg.seed is None else cfg.seed + i for i in range(samples_per_prompt)]
            for c in lm.complete([prompt] * samples_per_prompt, cfg, seeds):
                sample_id = secrets.token_hex(4)
                key[sample_id] = name
                rows.append({"id": sample_id, "prompt": prompt, "text": c.text, **dict.fromkeys(SCALES, "")})
    random.Random(seed).shuffle(rows)
    path = Path(out)
    if path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    else:
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["id", "prompt", "text", *SCALES])
            writer.writeheader()
            writer.writerows(rows)
    key_path = path.with_name(path.name + ".key.json")
    key_path.write_text(json.dumps(key, indent=2) + "\n", encoding="utf-8")
    return key_path


def read_sheet(path: str) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise DataError(f"rating sheet not found: {p}")
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".jsonl":
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    else:
        rows = list(csv.DictReader(text.splitlines()))
    if not rows:
        raise DataError(f"rating sheet {p} is empty")
    for i, row in enumerate(rows, start=2):
        for scale in SCALES:
            value = str(row.get(scale, "") or "").strip()
            if value == "":
                row[scale] = None
                continue
            try:
                number = float(value)
            except ValueError:
                number = math.nan
            if number not in RATINGS:  # 3.5 is no rating: never round it silently
                raise DataError(f"{p} row {i}: {scale} must be 1-5, got {value!r}")
            row[scale] = int(number)
    return rows


def cohen_kappa(a: list[int], b: list[int]) -> float:
    """Agreement of two raters beyond chance: (p_o - p_e) / (1 - p_e)."""
    n = len(a)
    observed = sum(x == y for x, y in zip(a, b, strict=True)) / n
    expected = sum((a.count(r) / n) * (b.count(r) / n) for r in RATINGS)
    return 1.0 if expected == 1 else (observed - expected) / (1 - expected)


def fleiss_kappa(table: list[list[int]]) -> float:
    """table[i][j] = raters who gave item i category j; every item has the same rater count."""
    n_items, raters = len(table), sum(table[0])
    p_j = [sum(row[j] for row in table) / (n_items * raters) for j in range(len(table[0]))]
    p_i = [(sum(c * c for c in row) - raters) / (raters * (raters - 1)) for row in table]
    p_bar, p_e = sum(p_i) / n_items, sum(p * p for p in p_j)
    return 1.0 if p_e == 1 else (p_bar - p_e) / (1 - p_e)


def score_sheets(files: list[str], key_file: str) -> dict[str, Any]:
    """Per-checkpoint mean of every scale, and agreement on each scale across the raters."""
    if not Path(key_file).is_file():
        raise DataError(f"key file not found: {key_file}")
    key = json.loads(Path(key_file).read_text(encoding="utf-8"))
    sheets = [read_sheet(f) for f in files]
    sums: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    per_item: dict[str, dict[str, list[int]]] = defaultdict(
        lambda: defaultdict(list)
    )  # scale -> id -> ratings
    for rows in sheets:
        for row in rows:
            origin = key.get(row.get("id"))
            if origin is None:
                raise DataError(f"sample id {row.get('id')!r} is not in {key_file}")
            for scale in SCALES:
                if row[scale] is not None:
                    sums[origin][scale].append(row[scale])
                    per_item[scale][row["id"]].append(row[scale])
    means = {
        name: {s: round(sum(v) / len(v), 3) for s, v in scales.items() if v}
        | {"ratings": len(scales["overall"])}
        for name, scales in sums.items()
    }
    agreement: dict[str, Any] = {"raters": len(sheets)}
    if len(sheets) >= 2:
        for scale in SCALES:
            items = [r for r in per_item[scale].values() if len(r) == len(sheets)]  # rated by all
            if not items:
                continue
            if len(sheets) == 2:
                agreement[f"cohen_kappa_{scale}"] = round(
                    cohen_kappa([r[0] for r in items], [r[1] for r in items]), 4
                )
            table = [[r.count(c) for c in RATINGS] for r in items]
            agreement[f"fleiss_kappa_{scale}"] = round(fleiss_kappa(table), 4)
    return {"means": means, "agreement": agreement}
