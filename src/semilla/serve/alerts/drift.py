"""Model drift: each served model's perplexity, checked every `interval_s` against a baseline.

The baseline of a model name is its perplexity on the reference text the first time it is
checked (kept in `<data_dir>/drift-baselines.json`, so a restart compares against the same
number; an admin re-measures it after a deliberate change: POST /admin/drift/{model}/baseline).
A checkpoint swapped in under the same name, or weights changed in place, move the ratio
`semilla_model_drift_ratio{model, source="reference"}`.

With `sample_prompts` (opt-in) the last `sample_size` prompts each model answered are also
scored (`source="prompts"`, baseline: the first sample): what users ask drifting away from what
the model knows. They are held in memory only, PII-scrubbed when scrub_pii is on, and dropped
after each check: nothing is written.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
from collections import deque
from pathlib import Path

from starlette.concurrency import run_in_threadpool

from semilla.atomic import atomic_write_text
from semilla.evaluate import likelihood_metrics, text_tokens
from semilla.privacy import scrub_pii
from semilla.serve import metrics

log = logging.getLogger("semilla.drift")

REFERENCE = Path(__file__).resolve().parents[2] / "demo" / "quijote.txt"  # default: its last 4,000 characters
REFERENCE_CHARS = 4000
MAX_TOKENS = 2048  # scored per check and source: a bounded cost
FIRST_CHECK_S = 10.0


class DriftMonitor:
    def __init__(
        self,
        reference: str,
        baselines_file: Path,
        interval_s: float = 300.0,
        sample_prompts: bool = False,
        scrub: bool = True,
        sample_size: int = 32,
    ):
        self.reference, self.baselines_file, self.interval_s = reference, baselines_file, interval_s
        self.reference_sha = hashlib.sha256(reference.encode()).hexdigest()[:16]
        self.sample_prompts, self.scrub, self.sample_size = sample_prompts, scrub, sample_size
        self.baselines: dict[str, dict] = self._read_baselines()
        self.latest: dict[str, dict] = {}  # model -> source -> {perplexity, ratio, checked_at}
        self.prompts: dict[str, deque[str]] = {}
        self._lock = threading.Lock()  # the prompt sample
        self._checking = threading.Lock()  # one check at a time (periodic, or an admin's re-baseline)

    def _read_baselines(self) -> dict[str, dict]:
        try:
            saved = json.loads(self.baselines_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        # baselines measured on another reference text compare nothing: measure again
        return {
            m: b
            for m, b in saved.items()
            if isinstance(b, dict) and b.get("reference_sha") == self.reference_sha
        }

    def _save_baselines(self) -> None:
        self.baselines_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.baselines_file, json.dumps(self.baselines, indent=2, sort_keys=True))

    def observe(self, model: str, text: str) -> None:
        """A prompt `model` answered (kept in memory for the next check only when opted in)."""
        if not self.sample_prompts or not text.strip():
            return
        with self._lock:
            sample = self.prompts.setdefault(model, deque(maxlen=self.sample_size))
            sample.append(scrub_pii(text) if self.scrub else text)

    def check(self, models: dict) -> None:
        """Score every served model (`models`: id -> ServedModel) now; blocking (run it in a thread)."""
        with self._checking:
            self.forget([name for name in self.latest if name not in models])  # unloaded
            self._score(models)

    def forget(self, names: list[str]) -> None:
        """Drop these models' latest figures and gauges (unloaded, or the server stopping)."""
        for name in names:
            for source in self.latest.pop(name, {}):
                metrics.MODEL_DRIFT_RATIO.remove(name, source)

    def _score(self, models: dict) -> None:
        for name, served in list(models.items()):
            with self._lock:
                prompts = list(self.prompts.pop(name, ()))
            texts = {"reference": self.reference}
            if prompts:
                texts["prompts"] = "\n".join(prompts)
            for source, text in texts.items():
                ppl = self._perplexity(served.lm, text)
                self._record(name, source, ppl, served.path)

    @staticmethod
    def _perplexity(lm, text: str) -> float:
        return likelihood_metrics(lm, text_tokens(lm, text), len(text), max_tokens=MAX_TOKENS)["perplexity"]

    def _record(self, name: str, source: str, ppl: float, path: str) -> None:
        baseline = self.baselines.setdefault(name, {"reference_sha": self.reference_sha})
        if source not in baseline:
            baseline[source] = ppl
            baseline[f"{source}_path"] = path
            if source == "reference":
                self._save_baselines()
            log.info("drift baseline of %s (%s): perplexity %.3f", name, source, ppl)
        ratio = ppl / baseline[source]
        self.latest.setdefault(name, {})[source] = {
            "perplexity": ppl, "baseline": baseline[source], "ratio": ratio, "checked_at": time.time(),
        }  # fmt: skip
        metrics.MODEL_DRIFT_RATIO.labels(name, source).set(ratio)

    def reset_baseline(self, name: str, models: dict) -> dict:
        """Measure `name`'s baseline again now (after a deliberate change of model); blocking."""
        with self._checking:
            self.baselines.pop(name, None)
            self._save_baselines()
            self._score({name: models[name]})
        return self.state()["models"][name]

    async def run(self, state) -> None:
        """Check every interval until cancelled; the first check (the baselines) comes soon
        after start, out of the way of start-up itself."""
        await asyncio.sleep(min(self.interval_s, FIRST_CHECK_S))
        while True:
            try:
                await run_in_threadpool(self.check, dict(state.models))
            except Exception:  # a failed check must not end drift monitoring for good
                log.exception("drift check failed")
            await asyncio.sleep(self.interval_s)

    def state(self) -> dict:
        return {
            "object": "drift",
            "interval_s": self.interval_s,
            "sample_prompts": self.sample_prompts,
            "models": {name: dict(sources) for name, sources in self.latest.items()},
        }


def reference_text(path: str) -> str:
    """The reference text: a file's, or the last REFERENCE_CHARS of the bundled demo text."""
    if path:
        return Path(path).read_text(encoding="utf-8")
    text = REFERENCE.read_text(encoding="utf-8")
    return text[-REFERENCE_CHARS:]
