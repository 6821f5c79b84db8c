"""Real PostgreSQL and Redis servers for the replica tests (Debian's `postgresql` and
`redis-server`, installed by `make services`), each started on loopback in a temporary
directory, and `semilla serve` replicas in their own processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from helpers import clean_env
from server_helpers import free_port


def postgres_bin() -> Path:
    """The newest installed PostgreSQL's bin directory (initdb and pg_ctl are not on PATH)."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    assert found, "PostgreSQL is not installed: make services"
    return found[-1].parent


class Postgres:
    """A PostgreSQL cluster in a temporary directory: `url` while running; stop() and start()
    restart it on the same port. initdb refuses root, so root runs it as the postgres user."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="semilla-pg-"))
        self.data, self.port = self.root / "data", free_port()
        self.as_user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.as_user:
            shutil.chown(self.root, "postgres")
        self._run("initdb", "-D", str(self.data), "-A", "trust", "-U", "semilla", "-E", "UTF8")
        self.url = f"postgresql+psycopg://semilla@127.0.0.1:{self.port}/postgres"

    def _run(self, tool: str, *args: str) -> None:
        subprocess.run(
            [*self.as_user, str(postgres_bin() / tool), *args], check=True, capture_output=True, timeout=120
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._run("pg_ctl", "-D", str(self.data), "-l", str(self.root / "log"), "-w", "-o", options, "start")

    def stop(self) -> None:
        self._run("pg_ctl", "-D", str(self.data), "-m", "fast", "-w", "stop")

    def new_database(self, name: str) -> str:
        """Create database `name`; its URL."""
        from sqlalchemy import create_engine

        engine = create_engine(self.url, isolation_level="AUTOCOMMIT")
        with engine.connect() as c:
            c.exec_driver_sql(f'CREATE DATABASE "{name}"')
        engine.dispose()
        return self.url.rsplit("/", 1)[0] + "/" + name


@contextmanager
def running_postgres() -> Iterator[Postgres]:
    pg = Postgres()
    pg.start()
    try:
        yield pg
    finally:
        subprocess.run([*pg.as_user, str(postgres_bin() / "pg_ctl"), "-D", str(pg.data), "-m", "immediate",
                        "stop"], capture_output=True)  # fmt: skip
        shutil.rmtree(pg.root, ignore_errors=True)


@contextmanager
def running_redis() -> Iterator[tuple[str, subprocess.Popen]]:
    """redis-server on a free loopback port, nothing saved to disk; yields its URL and process."""
    import redis

    port = free_port()
    root = tempfile.mkdtemp(prefix="semilla-redis-")
    cmd = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen([*cmd, "--dir", root], stdout=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None and time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        yield url, proc
    finally:
        proc.kill()
        proc.wait()
        shutil.rmtree(root, ignore_errors=True)


@contextmanager
def replica(checkpoint: Path, data_dir: Path, **env: str) -> Iterator[tuple[subprocess.Popen, str]]:
    """`semilla serve CHECKPOINT` in its own process with SEMILLA_* `env`; yields it and its URL
    once it answers. Its output goes to data_dir/log."""
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    log = open(data_dir / "log", "w")  # noqa: SIM115
    cmd = [sys.executable, "-m", "semilla", "serve", f"tiny={checkpoint}", "--data-dir", str(data_dir)]
    proc = subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=clean_env(PORT=str(port), SEMILLA_KERNELS="0", **env)
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180  # imports torch and loads the model on a busy machine
        while True:
            try:
                httpx.get(base + "/health", timeout=1)
                break
            except httpx.HTTPError:
                if proc.poll() is not None:
                    raise AssertionError(
                        f"the replica exited: {(data_dir / 'log').read_text()[-2000:]}"
                    ) from None
                assert time.monotonic() < deadline, "the replica did not answer within 180 s"
                time.sleep(0.05)
        yield proc, base
    finally:
        proc.kill()
        proc.wait()
        log.close()
