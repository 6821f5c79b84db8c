"""The self-learning loop (THAU's cycle, seed 004), one round at a time:

    1. pick questions: templates x concepts, never-asked first, settled ones never again
    2. ask: the student answers each (within the limits); gap signals logged per question
    3. teach: the teacher's lesson for each gap (an unreachable teacher: the round waits)
    4. write: the lessons as a chat JSONL dataset under RUN/datasets/auto_generated/DATE/
    5. train: a candidate from the current model, this and earlier promoted data + replay
    6. gate: promote the candidate or roll it back; both logged

Every step saves the round (journal.py) before the next starts, so a restart resumes it without
asking a question or the teacher twice.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from semilla.api import LanguageModel, load
from semilla.batches import is_prepared
from semilla.checkpoint import read_config, resolve_checkpoint
from semilla.errors import SemillaError
from semilla.evaluate import prepared_split_ids
from semilla.learn import gate
from semilla.learn.config import LearnConfig
from semilla.learn.dataset import NearDuplicates, example_text, lesson_rows, read_rows, write_round_dataset
from semilla.learn.gaps import ask
from semilla.learn.growth import grow_on_plateau
from semilla.learn.journal import Journal
from semilla.learn.limits import Clock, Limiter, Stopped
from semilla.learn.questions import (
    corpus_concepts,
    detect_language,
    make_questions,
    read_lines,
    templates_for,
)
from semilla.learn.teacher import Teacher, TeacherInvalid, TeacherUnreachable
from semilla.tokenizer import Tokenizer

log = logging.getLogger(__name__)

CORPUS_TOKENS = 200_000  # tokens of the training corpus read for its language and concepts
RETRY_AFTER_S = 300.0  # --forever: wait before asking an unreachable teacher again


class LimitReached(SemillaError):
    """No question may be asked now; the message says when one may."""


@dataclass
class Learner:
    """Everything one `learn` call works with."""

    run: Path
    cfg: LearnConfig
    journal: Journal
    limiter: Limiter
    teacher: Teacher
    clock: Clock
    original: Path  # the run's prepared training data: replayed, and its val split gates
    wait: bool = False  # wait for the limits rather than end the round
    _student: LanguageModel | None = field(default=None, repr=False)

    def student(self) -> LanguageModel:
        """The current model (with --into-adapter: the base plus the current adapter), loaded
        once until a promotion replaces it."""
        if self._student is None:
            adapter = gate.current_adapter(self.cfg)
            self._student = load(str(self.journal.current_model()), device=device_name(self.cfg.device),
                                 adapter=str(adapter) if adapter else None)  # fmt: skip
        return self._student

    def forget_student(self) -> None:
        self._student = None


def device_name(device: str) -> str | None:
    return None if device == "auto" else device


def original_data(run: Path) -> Path:
    """The prepared data `run` was trained on: its data/, or the prepared dir its config names."""
    if is_prepared(run / "data"):
        return run / "data"
    data = (read_config(resolve_checkpoint(run)).get("train") or {}).get("data") or ""
    if data and "," not in data and is_prepared(data):
        return Path(data)
    raise SemillaError(
        f"{run}: cannot find the prepared data it was trained on (data/ or the data of its config.json); "
        "learn replays it and gates on its validation split"
    )


def corpus_sample(original: Path) -> str:
    ids = prepared_split_ids(original, "train")[:CORPUS_TOKENS].tolist()
    return Tokenizer.load(original).decode(ids, skip_special_tokens=True)


def run_age(run: Path) -> int:
    """The THAU age the run trained to (its last age's number), else 0."""
    import json

    state = resolve_checkpoint(run) / "trainer_state.json"
    ages = json.loads(state.read_text()).get("ages") if state.is_file() else None
    digits = "".join(c for c in str(ages[-1]["age"]) if c.isdigit()) if ages else ""
    return int(digits) if digits else 0


def current_age(learner: Learner) -> int:
    """The age the loop grew its model to, else the run's own."""
    return learner.journal.state().get("age", run_age(learner.run))


def question_pool(learner: Learner) -> tuple[list[dict[str, str]], str]:
    """Every question the loop may ask, and their language."""
    cfg = learner.cfg
    sample = corpus_sample(learner.original) if cfg.language == "auto" or not cfg.topics else ""
    language = detect_language(sample) if cfg.language == "auto" else cfg.language
    concepts = (
        read_lines(cfg.topics, "topics") if cfg.topics else corpus_concepts(sample, language, cfg.n_concepts)
    )
    if not concepts:
        raise SemillaError(
            f"no concepts: the corpus of {learner.run} has no frequent content words; give --topics"
        )
    age = cfg.age if cfg.age is not None else current_age(learner)
    return make_questions(concepts, templates_for(language, age, cfg.templates)), language


def new_round(learner: Learner, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Round N+1 with its questions: never-asked ones first, then those whose last answer was a
    gap (least recently asked first); a question whose last answer was no gap is settled."""
    pool, language = question_pool(learner)
    last = {}  # question -> (round it was last asked in, was it a gap)
    for r in rounds:
        for q in r["questions"]:
            if "answer" in q:
                last[q["question"]] = (r["round"], q["gap"])
    open_questions = [q for q in pool if last.get(q["question"], (0, True))[1]]
    open_questions.sort(key=lambda q: last.get(q["question"], (0, True))[0])
    number = rounds[-1]["round"] + 1 if rounds else 1
    chosen = open_questions[: learner.cfg.questions_per_round]
    return {
        "round": number,
        "status": "asking",
        "language": language,
        "started": learner.clock.now(),
        "questions": [{"id": f"{number}-{i}", **q} for i, q in enumerate(chosen)],
    }


def ask_questions(learner: Learner, record: dict[str, Any]) -> None:
    """The student answers each question not yet answered, one limiter slot each; a limit that
    would make the round wait longer than one spacing ends it, unless the learner waits."""
    cfg, clock, limiter = learner.cfg, learner.clock, learner.limiter
    for i, q in enumerate(record["questions"]):
        if "answer" in q:
            continue
        if not limiter.holds(q["id"]):
            now = clock.now()
            slot = limiter.next_slot(now)
            if slot > now and not (learner.wait or slot - now <= cfg.min_question_spacing_s):
                del record["questions"][i:]  # asked another round
                if not record["questions"]:
                    raise LimitReached(
                        f"question limit reached ({limiter.describe(now)}); the next question may be asked "
                        f"at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(slot))}"
                    )
                break
            clock.sleep(max(0.0, slot - now))
            limiter.grant(q["id"], max(slot, clock.now()))
        q.update(ask(learner.student(), q["question"], q["concept"], cfg, seed=cfg.seed + i))
        q["asked_at"] = clock.now()
        learner.journal.save_round(record)
    record["status"] = "teaching" if any(q["gap"] for q in record["questions"]) else "no_gaps"
    learner.journal.save_round(record)


def teach(learner: Learner, record: dict[str, Any]) -> bool:
    """The teacher's lesson for every gap without one; False when the teacher cannot be reached
    (the round stays open: a later run asks again for the lessons still missing)."""
    for q in record["questions"]:
        if not q["gap"] or "lesson" in q:
            continue
        try:
            lesson = learner.teacher.teach(q["concept"], q["question"], record["language"])
            q["lesson"] = {"status": "ok", "answer": lesson.answer, "key": lesson.key,
                           "examples": lesson.examples, "provenance": learner.teacher.provenance(q["concept"])}  # fmt: skip
        except TeacherInvalid as e:
            log.warning("round %d: %s: %s", record["round"], q["question"], e)
            q["lesson"] = {"status": "invalid", "error": str(e)}
        except TeacherUnreachable as e:
            record["teacher_error"] = str(e)
            learner.journal.save_round(record)
            return False
        learner.journal.save_round(record)
    record.pop("teacher_error", None)
    record["status"] = "writing"
    learner.journal.save_round(record)
    return True


def promoted_datasets(learner: Learner, rounds: list[dict[str, Any]]) -> list[Path]:
    return [learner.run / r["dataset"] for r in rounds if r["status"] == "promoted" and r.get("dataset")]


def write_dataset(learner: Learner, record: dict[str, Any], rounds: list[dict[str, Any]]) -> None:
    """This round's new examples, near-duplicates of kept ones dropped, as one JSONL file."""
    seen = NearDuplicates(learner.cfg.max_similarity)
    for path in promoted_datasets(learner, rounds):
        for row in read_rows(path):
            seen.add(example_text(row))
    rows = []
    for q in record["questions"]:
        lesson = q.get("lesson")
        if not lesson or lesson["status"] != "ok":
            continue
        provenance = {**lesson["provenance"], "round": record["round"]}
        candidates = lesson_rows(lesson, q["question"], provenance)
        kept = [row for row in candidates if seen.add(example_text(row))]
        lesson["examples_kept"], lesson["examples_dropped"] = len(kept), len(candidates) - len(kept)
        rows += kept
    if rows:
        day = time.strftime("%Y%m%d", time.gmtime(learner.clock.now()))
        path = write_round_dataset(learner.journal.datasets / day, record["round"], rows)
        record["dataset"] = str(path.relative_to(learner.run))
        record["examples"] = len(rows)
    # facts taught before (all their examples near-duplicates) still train: on the kept data
    has_data = rows or promoted_datasets(learner, rounds)
    record["status"] = "training" if facts_of(record) and has_data else "no_data"
    learner.journal.save_round(record)


def facts_of(record: dict[str, Any]) -> list[dict[str, str]]:
    """The round's gap questions the teacher answered, with the key string a right answer holds."""
    return [
        {"question": q["question"], "key": q["lesson"]["key"]}
        for q in record["questions"]
        if q.get("lesson", {}).get("status") == "ok"
    ]


def train_and_judge(learner: Learner, record: dict[str, Any], rounds: list[dict[str, Any]]) -> None:
    """Train the candidate and let the gate decide; the decision is saved before it is carried out."""
    cfg, journal = learner.cfg, learner.journal
    current = journal.current_model()
    datasets = promoted_datasets(learner, rounds) + (
        [learner.run / record["dataset"]] if record.get("dataset") else []
    )
    record["compute"] = gate.train_candidate(journal, current, datasets, learner.original, cfg)
    state = journal.state()
    if "baseline_ppl" not in state:  # the run's own model: the perplexity no round may raise past
        own = load(str(resolve_checkpoint(learner.run)), device=device_name(cfg.device))
        state["baseline_ppl"] = gate.validation_ppl(own, learner.original, cfg.val_tokens)
        journal.save_state(state)
    facts = facts_of(record)
    asked_now = {f["question"] for f in facts}  # a gap asked again is judged by its new lesson
    held_out = [
        f for r in rounds if r["status"] == "promoted" for f in facts_of(r) if f["question"] not in asked_now
    ]
    before = gate.measure(learner.student(), facts, held_out, learner.original, cfg)
    if cfg.into_adapter:  # the base with the candidate adapter
        candidate = load(
            str(current), device=device_name(cfg.device), adapter=str(gate.candidate_adapter(journal))
        )
    else:
        candidate = load(str(gate.candidate_checkpoint(journal)), device=device_name(cfg.device))
    after = gate.measure(candidate, facts, held_out, learner.original, cfg)
    record["gate"] = gate.judge(before, after, state["baseline_ppl"], cfg)
    record["status"] = "promoting" if record["gate"]["promote"] else "rolling_back"
    journal.save_round(record)


def finish(learner: Learner, record: dict[str, Any]) -> None:
    if record["status"] == "promoting":
        gate.promote(learner.journal, learner.cfg)
        learner.forget_student()  # the next round questions the promoted model
        record["status"] = "promoted"
        log.info("round %d: promoted (recall %.2f -> %.2f)", record["round"],
                 record["gate"]["before"]["recall"], record["gate"]["after"]["recall"])  # fmt: skip
    else:
        record["status"] = "rolled_back"
        log.info("round %d: rolled back: %s", record["round"], "; ".join(record["gate"]["reasons"]))
    record["finished"] = learner.clock.now()
    learner.journal.save_round(record)
    gate.discard_candidate(learner.journal)


def run_round(learner: Learner) -> dict[str, Any]:
    """One round, from where the journal says it stopped; returns its record."""
    rounds = learner.journal.rounds()
    record = learner.journal.open_round()
    if record is None:
        record = new_round(learner, rounds)
        if not record["questions"]:
            raise SemillaError("every question is settled: the model answers all of them well; add --topics")
        learner.journal.save_round(record)
    earlier = [r for r in rounds if r["round"] < record["round"]]
    if record["status"] == "asking":
        ask_questions(learner, record)
    if record["status"] == "teaching" and not teach(learner, record):
        return record
    if record["status"] == "writing":
        write_dataset(learner, record, earlier)
    if record["status"] == "training":
        train_and_judge(learner, record, earlier)
    if record["status"] in ("promoting", "rolling_back"):
        finish(learner, record)
    return record


def learn(
    run: str | Path,
    rounds: int = 1,
    forever: bool = False,
    wait: bool | None = None,
    clock: Clock | None = None,
    stop: threading.Event | None = None,
    on_round: Callable[[dict[str, Any]], None] | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Run `rounds` rounds of self-learning on a run directory (or `forever`); returns
    {"rounds": [summary of each round run], "current": the current model's path, and with
    into_adapter once one was promoted "adapter": the adapter's}.

    A question limit reached ends the round (none asked: LimitReached) unless `wait` (the default
    with `forever`): then the loop sleeps until the limits allow the next question.
    settings are LearnConfig fields (teacher_url, teacher_model, questions_per_hour, ...).
    `clock` replaces wall time and sleeping (tests simulate days with it). A set `stop` event
    ends the loop after the round in flight, or at once while it waits; `on_round` is told
    each round's summary as it ends (the server's job counts them)."""
    cfg = gate.adapter_settings(LearnConfig(**settings).validate())
    run = Path(run)
    resolve_checkpoint(run)
    journal = Journal(run)
    stop = stop or threading.Event()
    clock = clock or Clock(stop)
    limiter = Limiter(journal.limits_path, cfg.questions_per_hour, cfg.questions_per_day,
                      cfg.min_question_spacing_s)  # fmt: skip
    wait = forever if wait is None else wait
    learner = Learner(run, cfg, journal, limiter, Teacher(cfg), clock, original_data(run), wait)
    done: list[dict[str, Any]] = []
    while (forever or len(done) < rounds) and not stop.is_set():
        grown = (
            cfg.grow_on_plateau
            and journal.open_round() is None
            and grow_on_plateau(journal, current_age(learner), cfg.plateau_rounds, cfg.seed)
        )
        if grown:
            learner.forget_student()  # the next round questions the grown model
        try:
            record = run_round(learner)
        except Stopped:  # waiting for a limit or a teacher: the round resumes on the next run
            break
        done.append(summary(record))
        if on_round is not None:
            on_round(done[-1])
        if record.get("teacher_error"):
            log.warning("round %d: teacher unreachable (%s); nothing trained, the round resumes on the next try",
                        record["round"], record["teacher_error"])  # fmt: skip
            if not forever:
                break
            try:
                clock.sleep(RETRY_AFTER_S)
            except Stopped:
                break
    adapter = gate.current_adapter(cfg)
    return {
        "rounds": done,
        "current": str(journal.current_model()),
        **({"adapter": str(adapter)} if adapter else {}),
    }


def summary(record: dict[str, Any]) -> dict[str, Any]:
    """One line's worth of a round: its status, questions, gaps, examples and gate figures."""
    questions = [q for q in record["questions"] if "answer" in q]
    out = {
        "round": record["round"],
        "status": record["status"] if not record.get("teacher_error") else "teacher_unreachable",
        "questions": len(questions),
        "gaps": sum(q["gap"] for q in questions),
        "examples": record.get("examples", 0),
    }
    if record.get("gate"):
        out["recall"] = record["gate"]["after"]["recall"]
        out["val_ppl"] = record["gate"]["after"]["val_ppl"]
    return out
