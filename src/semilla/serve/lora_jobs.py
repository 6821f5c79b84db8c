"""Background LoRA jobs: a conversation (or a user's conversations of a domain) becomes an
adapter, trained by `semilla finetune` in a child process and then served under its name.

    jobs = LoraJobs(state, Path("semilla-data/lora"), settings)
    job = jobs.submit(owner, [messages, ...], domain="medicina", base="tiny", adapter=None)
    jobs.get(job.id, owner)  ->  queued | running (step of max_iters) | succeeded | failed | cancelled

Jobs run one at a time (a queue and one worker thread); each has a directory holding its
training rows (data.jsonl), job.json and the fine-tune's run, whose top is the PEFT adapter
(adapter_config.json + adapter_model.safetensors: the file users download). A child process
keeps training's memory and threads apart from the server's, reports progress through the
run's metrics.jsonl, and is cancelled with SIGTERM (training saves and stops after its step).
Finished jobs are read back from their job.json at start-up and their adapters served again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from prometheus_client import Counter

from semilla.atomic import atomic_write_text
from semilla.serve import adapters
from semilla.serve.backends.adapter import AdapterBackend
from semilla.serve.errors import APIError

log = logging.getLogger(__name__)

LORA_FILES_GENERATED = Counter(
    "semilla_lora_files_generated", "LoRA adapter files produced by /v1/lora/generate jobs"
)
DOMAIN = re.compile(r"^\w[\w.-]{0,63}$")  # 'medicina', 'cardiología', 'legal-es'
ACTIVE = ("queued", "running")
# Training windows are the base model's context; a short conversation is repeated until its
# validation tenth holds a window (prepare keeps 10% for validation) with room to spare.
WINDOWS_OF_DATA = 30
MAX_ROWS = 100_000


@dataclass
class LoraJob:
    """One job as its owner sees it (and as job.json keeps it)."""

    id: str
    owner: str  # 'user:3', or 'anonymous' in open mode: who may see, cancel and download it
    domain: str
    base: str  # the served model the adapter is for
    adapter: str  # the name it is served under once trained
    max_iters: int
    lora_r: int
    conversations: int  # how many conversations it learns from
    status: str = "queued"
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    error: str | None = None
    metrics: dict = field(default_factory=dict)

    def view(self, directory: Path) -> dict:
        """The job for the API: progress read from the run while it trains."""
        out = asdict(self)
        out.pop("owner")
        out["object"] = "lora.job"
        out["step"] = latest_step(directory / "adapter" / "metrics.jsonl")
        if self.status == "succeeded":
            out["files"] = {
                "safetensors": f"/v1/lora/jobs/{self.id}/adapter.safetensors",
                "zip": f"/v1/lora/jobs/{self.id}/adapter.zip",
            }
        return out


def latest_step(metrics: Path) -> int:
    """The last step the run logged (0 before its first)."""
    step = 0
    try:
        with open(metrics, encoding="utf-8") as f:
            for line in f:
                try:
                    step = max(step, int(json.loads(line).get("step", 0)))
                except (ValueError, AttributeError, TypeError):
                    continue  # a line still being written
    except FileNotFoundError:
        pass
    return step


def normalize_domain(domain: str) -> str:
    """A domain as it is stored: stripped and case-folded ('Medicina' is 'medicina')."""
    name = domain.strip().casefold()
    if not DOMAIN.match(name):
        raise APIError(
            400, f"domain {domain!r} must be 1-64 letters, digits, '_', '.' or '-'", param="domain"
        )
    return name


def training_rows(
    conversations: list[list[dict]], tokens_of: Callable[[list[dict]], int], context: int
) -> list[dict]:
    """Chat rows for finetune: each conversation once, the lot repeated until it holds
    WINDOWS_OF_DATA windows of the base's context. A conversation with no assistant answer
    teaches nothing: a 400."""
    rows = []
    for messages in conversations:
        kept = [m for m in messages if m["role"] in ("system", "user", "assistant") and m["content"].strip()]
        if any(m["role"] == "assistant" for m in kept):
            rows.append({"messages": kept})
    if not rows:
        raise APIError(400, "the conversation has no assistant answer to learn from", param="conversation")
    tokens = sum(tokens_of(r["messages"]) for r in rows)
    copies = max(1, math.ceil(WINDOWS_OF_DATA * (context + 1) / max(tokens, 1)))
    return (rows * copies)[: max(MAX_ROWS, len(rows))]


class LoraJobs:
    """The server's LoRA jobs: submitted, run one at a time, their adapters served."""

    def __init__(
        self,
        state,
        directory: Path,
        max_domains: int = 32,
        per_owner: int = 1,
        queue_size: int = 8,
        default_iters: int = 100,
        known_domains: Callable[[], set[str]] = set,
    ):
        self.state, self.directory = state, Path(directory)
        self.max_domains, self.per_owner, self.queue_size = max_domains, per_owner, queue_size
        self.default_iters = default_iters
        self.known_domains = known_domains  # the domains conversations are tagged with
        self.jobs: dict[str, LoraJob] = {}
        self.lock = threading.Lock()
        self.pending: queue.Queue[str] = queue.Queue()
        self.running: subprocess.Popen | None = None
        self._restore()
        threading.Thread(target=self._work, name="semilla-lora-jobs", daemon=True).start()

    # --- what the routes call -------------------------------------------------------------

    def submit(
        self,
        owner: str,
        conversations: list[list[dict]],
        domain: str,
        base: str | None = None,
        adapter: str | None = None,
        max_iters: int | None = None,
        lora_r: int = 8,
    ) -> LoraJob:
        """Queue a job teaching `conversations` ([[{"role", "content"}, ...], ...]) to an
        adapter of `base` for `domain`; 429 past the owner's or the server's limit, 400 for a
        33rd domain, a bad name or nothing to learn."""
        domain = normalize_domain(domain)
        base = adapters.base_of(self.state, base)
        name = adapter or f"{base}-{domain}"
        self._check_name(name)
        served = self.state.models[base]
        tokenizer = served.lm.tokenizer
        rows = training_rows(
            conversations, lambda m: len(tokenizer.apply_chat_template(m)), served.lm.context_length or 256
        )
        with self.lock:
            active = [j for j in list(self.jobs.values()) if j.status in ACTIVE]
            if sum(j.owner == owner for j in active) >= self.per_owner:
                raise APIError(
                    429, f"you have {self.per_owner} LoRA job(s) queued or running; wait for it or cancel it",
                    code="too_many_jobs", headers={"Retry-After": "10"},
                )  # fmt: skip
            if len(active) >= self.queue_size:
                raise APIError(429, f"{len(active)} LoRA jobs are waiting; retry later", code="too_many_jobs",
                               headers={"Retry-After": "30"})  # fmt: skip
            self.admit_domain(domain)
            job = LoraJob(
                id="lorajob-" + uuid.uuid4().hex[:20], owner=owner, domain=domain, base=base, adapter=name,
                max_iters=max_iters or self.default_iters, lora_r=lora_r, conversations=len(conversations),
            )  # fmt: skip
            self.jobs[job.id] = job
        folder = self.directory / job.id
        folder.mkdir(parents=True)
        atomic_write_text(
            folder / "data.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
        )
        self._save(job)
        self.pending.put(job.id)
        return job

    def get(self, job_id: str, owner: str, admin: bool = False) -> LoraJob:
        """The job, when `owner` made it (or an admin asks); 404 otherwise, as for a job that
        does not exist."""
        job = self.jobs.get(job_id)
        if job is None or not (admin or job.owner == owner):
            raise APIError(404, f"no LoRA job {job_id!r}", param="job_id", code="not_found")
        return job

    def list(self, owner: str, admin: bool = False) -> list[LoraJob]:
        return [j for j in list(self.jobs.values()) if admin or j.owner == owner]

    def cancel(self, job: LoraJob) -> LoraJob:
        """Stop a queued or running job (a running one saves its step and stops); no adapter."""
        with self.lock:
            if job.status not in ACTIVE:
                raise APIError(409, f"job {job.id} is already {job.status}", code="conflict")
            was_running = job.status == "running"
            job.status = "cancelled"
            job.finished_at = time.time()
            process = self.running if was_running else None
        if process is not None:
            process.terminate()  # SIGTERM: training stops after the current step
        self._save(job)
        return job

    def admit_domain(self, domain: str) -> str:
        """`domain` normalized, when it is in use or one more fits (a 400 naming the limit)."""
        domain = normalize_domain(domain)
        domains = self.domains()
        if domain not in domains and len(domains) >= self.max_domains:
            raise APIError(
                400, f"at most {self.max_domains} domains; {domain!r} would be one more "
                f"(existing: {', '.join(sorted(domains))})", param="domain", code="too_many_domains",
            )  # fmt: skip
        return domain

    def domains(self) -> set[str]:
        """Every domain in use: those of jobs and those conversations are tagged with."""
        return {j.domain for j in list(self.jobs.values()) if j.status != "cancelled"} | set(
            self.known_domains()
        )

    def generated(self) -> int:
        """LoRA files generated: the jobs that produced an adapter."""
        return sum(j.status == "succeeded" for j in list(self.jobs.values()))

    def adapter_dir(self, job: LoraJob) -> Path:
        return self.directory / job.id / "adapter"

    # --- the worker ------------------------------------------------------------------------

    def _check_name(self, name: str) -> None:
        """An adapter name nothing else answers to (an earlier adapter of a job is replaced)."""
        if not adapters.NAME.match(name):
            raise APIError(400, f"adapter name {name!r} must be letters, digits, '.', '_' or '-'",
                           param="target_model")  # fmt: skip
        taken = name in self.state.router.names() and not isinstance(
            self.state.local.get(name), AdapterBackend
        )
        if taken or name in self.state.router.upstreams:
            raise APIError(409, f"{name!r} is already a model, route or provider name", param="target_model",
                           code="conflict")  # fmt: skip

    def _work(self) -> None:
        while True:
            job = self.jobs[self.pending.get()]
            with self.lock:
                if job.status != "queued":  # cancelled while it waited
                    continue
                job.status = "running"
            self._save(job)
            try:
                self._run(job)
            except APIError as e:  # its base was unloaded, or its name taken meanwhile
                self._finish(job, "failed", error=e.message)
            except Exception as e:  # a job's failure is the job's, never the server's
                log.exception("LoRA job %s failed", job.id)
                self._finish(job, "failed", error=f"{type(e).__name__}: {e}")

    def _run(self, job: LoraJob) -> None:
        folder = self.directory / job.id
        served = self.state.models.get(job.base)
        if served is None:
            raise APIError(404, f"model {job.base!r} was unloaded before the job began")
        n = job.max_iters
        command = [
            sys.executable, "-m", "semilla", "finetune", served.path, "--data", str(folder / "data.jsonl"),
            "-o", str(folder / "adapter"), "--lora-r", str(job.lora_r), "--max-iters", str(n),
            "--batch-size", "4", "--warmup-iters", str(max(1, n // 10)), "--eval-interval", str(max(1, n // 4)),
            "--eval-iters", "2", "--log-interval", "1", "--save-interval", str(n),
            "--sample-interval", str(10 * n), "--json",
        ]  # fmt: skip
        if self.state.settings.device:
            command += ["--device", self.state.settings.device]
        # one thread: the server's cores answer requests while a job trains beside them
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        with open(folder / "log.txt", "wb") as out:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=out, env=env)
            with self.lock:
                self.running = process
                if job.status == "cancelled":  # cancelled as it started
                    process.terminate()
            stdout, _ = process.communicate()
            with self.lock:
                self.running = None
        if job.status == "cancelled":
            return
        if process.returncode != 0:
            self._finish(job, "failed", error=last_error(folder / "log.txt"))
            return
        self._serve(job)
        self._finish(job, "succeeded", metrics=json.loads(stdout.splitlines()[-1]))  # --json's summary line
        LORA_FILES_GENERATED.inc()

    def _serve(self, job: LoraJob) -> None:
        """Serve the new adapter under the job's name, replacing an older one of that name."""
        if isinstance(self.state.local.get(job.adapter), AdapterBackend):
            adapters.unload_adapter(self.state, job.adapter)
        adapters.load_adapter(self.state, job.adapter, str(self.adapter_dir(job)), job.base)

    def _finish(
        self, job: LoraJob, status: str, error: str | None = None, metrics: dict | None = None
    ) -> None:
        with self.lock:
            if job.status == "cancelled":
                return
            job.status, job.error, job.finished_at = status, error, time.time()
            job.metrics = {k: v for k, v in (metrics or {}).items() if isinstance(v, int | float)}
        self._save(job)
        log.info("LoRA job %s %s%s", job.id, status, f": {error}" if error else "")

    def _save(self, job: LoraJob) -> None:
        atomic_write_text(self.directory / job.id / "job.json", json.dumps(asdict(job), indent=2) + "\n")

    def _restore(self) -> None:
        """Jobs of earlier runs of the server: finished ones as they ended (their adapters
        served again), unfinished ones failed (their process died with the server)."""
        if not self.directory.is_dir():
            return
        for path in sorted(self.directory.glob("*/job.json")):
            try:
                job = LoraJob(**json.loads(path.read_text(encoding="utf-8")))
            except (OSError, ValueError, TypeError):
                log.warning("skipping unreadable %s", path)
                continue
            self.jobs[job.id] = job
            if job.status in ACTIVE:
                job.status, job.error = "failed", "the server stopped while the job ran"
                self._save(job)
            elif job.status == "succeeded" and job.base in self.state.models:
                try:
                    self._serve(job)
                except APIError as e:
                    log.warning("adapter of LoRA job %s not served again: %s", job.id, e.message)


def last_error(log_file: Path) -> str:
    """The fine-tune's own one-line error, else its last line of output."""
    lines = [
        line for line in log_file.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()
    ]
    errors = [line for line in lines if line.startswith("semilla: error:")]
    return (errors or lines or ["the fine-tune failed without a message"])[-1].removeprefix(
        "semilla: error: "
    )
