"""Serving under load: N concurrent streaming clients against `semilla serve`.

    python bench/serve_load.py                          # 1, 4, 16, 64 clients; open server
    python bench/serve_load.py --auth                   # accounts, rate limits and cache on
    python bench/serve_load.py --clients 16 --compare-auth --repeats 5   # the auth overhead
    python bench/serve_load.py --clients 1 --clients 16 --server-dtype bfloat16

The server runs in its own process (`python -m semilla serve`) on a loopback port, serving a
datashark-10m-shaped model (gpt2 family, 8 x 320, 38-token char vocabulary, 512 context) with
random weights: speed does not depend on the weights. Each client streams one chat completion
of exactly 128 new tokens (min_tokens = max_tokens = 128). Reports aggregate tokens/s, TTFT
and inter-token latency P50/P95, errors, and /health latency while the clients stream.
With --auth, every request carries an API key, passes the rate limiter and looks up the
response cache (a miss: sampled requests are not cached); the cache-hit figure is a
deterministic request answered from the cache. Writes bench/results/serve_load[-auth].json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from semilla.checkpoint import save_checkpoint
from semilla.config import preset
from semilla.models import build_model
from semilla.tokenizer import Tokenizer

NEW_TOKENS = 128
ALPHABET = "abcdefghijklmnopqrstuvwxyz .,\n"  # 30 characters + 8 special tokens = DataShark's 38
ROOT = Path(__file__).resolve().parent


def make_checkpoint(root: Path) -> Path:
    torch.manual_seed(0)
    tok = Tokenizer.train_char([ALPHABET])
    cfg = preset("datashark-10m")
    cfg.vocab_size = tok.vocab_size
    return save_checkpoint(root / "datashark-10m", build_model(cfg), tok)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, round(q * (len(values) - 1)))]


async def one_client(client: httpx.AsyncClient, url: str, headers: dict) -> dict:
    body = {
        "messages": [{"role": "user", "content": "en un lugar de la mancha"}],
        "max_tokens": NEW_TOKENS,
        "min_tokens": NEW_TOKENS,
        "temperature": 1.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body, headers=headers) as r:
            if r.status_code != 200:
                await r.aread()
                return {"error": f"{r.status_code} {r.text[:120]}"}
            async for line in r.aiter_lines():
                if line.startswith("data: {") and '"content"' in line:
                    stamps.append(time.perf_counter())
                elif line.startswith("data: {") and '"error"' in line:
                    return {"error": line[:160]}
                elif line.startswith("data: {") and '"usage": {' in line:
                    tokens = json.loads(line[6:])["usage"]["completion_tokens"]
    except httpx.HTTPError as e:
        return {"error": repr(e)}
    return {
        "tokens": tokens,
        "ttft": stamps[0] - start if stamps else float("nan"),
        "itl": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
    }


async def health_probe(client: httpx.AsyncClient, url: str, stop: asyncio.Event, out: list[float]) -> None:
    while not stop.is_set():
        start = time.perf_counter()
        r = await client.get(url + "/health")
        if r.status_code == 200:
            out.append(time.perf_counter() - start)
        await asyncio.sleep(0.05)


async def load_round(url: str, headers: dict, clients: int) -> dict:
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        stop, health = asyncio.Event(), []
        probe = asyncio.create_task(health_probe(client, url, stop, health))
        start = time.perf_counter()
        results = await asyncio.gather(*(one_client(client, url, headers) for _ in range(clients)))
        wall = time.perf_counter() - start
        stop.set()
        await probe
    ok = [r for r in results if "error" not in r]
    tokens = sum(r["tokens"] for r in ok)
    itl = [x for r in ok for x in r["itl"]]
    return {
        "clients": clients,
        "tokens_per_s": tokens / wall,
        "ttft_p50_ms": 1000 * percentile([r["ttft"] for r in ok], 0.5),
        "ttft_p95_ms": 1000 * percentile([r["ttft"] for r in ok], 0.95),
        "itl_p50_ms": 1000 * percentile(itl, 0.5),
        "itl_p95_ms": 1000 * percentile(itl, 0.95),
        "errors": len(results) - len(ok),
        "error_samples": [r["error"] for r in results if "error" in r][:3],
        "health_p50_ms": 1000 * percentile(health, 0.5),
        "health_max_ms": 1000 * max(health) if health else float("nan"),
        "tokens_ok": all(r["tokens"] == NEW_TOKENS for r in ok),
    }


def cache_hit_ms(url: str, headers: dict, repeats: int = 20) -> float:
    body = {"messages": [{"role": "user", "content": "hola"}], "max_tokens": 64, "temperature": 0}
    with httpx.Client(timeout=60) as client:
        client.post(url + "/v1/chat/completions", json=body, headers=headers).raise_for_status()  # fill
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            client.post(url + "/v1/chat/completions", json=body, headers=headers).raise_for_status()
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def start_server(
    checkpoint: Path, data_dir: Path, port: int, auth: bool, threads: int | None, dtype: str | None
) -> tuple[subprocess.Popen, dict]:
    # limits far above the load, so both runs measure the same work (the auth run still checks
    # every request against its buckets)
    limits = json.dumps({"anonymous": 10**9, "user": 10**9, "admin": 10**9})
    env = {**os.environ, "SEMILLA_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1",
           "SEMILLA_RATE_LIMIT_RPM": limits, "SEMILLA_RATE_LIMIT_TPM": limits}  # fmt: skip
    headers: dict[str, str] = {}
    if auth:
        env["SEMILLA_ADMIN_PASSWORD"] = "bench-password-1"
        cli = [sys.executable, "-m", "semilla", "admin", "--data-dir", str(data_dir)]
        subprocess.run([*cli, "create-user", "bench"], env=env, check=True, capture_output=True)
        key = subprocess.run(
            [*cli, "create-key", "bench"], env=env, check=True, capture_output=True, text=True
        )
        headers["Authorization"] = f"Bearer {key.stdout.strip()}"
    cmd = [
        sys.executable,
        "-m",
        "semilla",
        "serve",
        str(checkpoint),
        "--name",
        "datashark-10m",
        "--port",
        str(port),
        *(["--threads", str(threads)] if threads else []),
        *(["--dtype", dtype] if dtype else []),
    ]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return proc, headers
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not become ready in 120 s")


def run(
    auth: bool, clients: list[int], repeats: int, port: int, threads: int | None, dtype: str | None
) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp))
        proc, headers = start_server(checkpoint, Path(tmp) / "data", port, auth, threads, dtype)
        url = f"http://127.0.0.1:{port}"
        try:
            asyncio.run(load_round(url, headers, 2))  # warm-up
            rounds = []
            for n in clients:
                runs = [asyncio.run(load_round(url, headers, n)) for _ in range(repeats)]
                median = {
                    k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], float)
                }
                median.update(
                    clients=n,
                    errors=sum(r["errors"] for r in runs),
                    tokens_ok=all(r["tokens_ok"] for r in runs),
                )
                median["error_samples"] = [e for r in runs for e in r["error_samples"]][:3]
                rounds.append({k: round(v, 2) if isinstance(v, float) else v for k, v in median.items()})
                print(json.dumps(rounds[-1]), flush=True)
            result = {
                "auth": auth,
                "server_threads": threads,
                "server_dtype": dtype,
                "new_tokens": NEW_TOKENS,
                "repeats": repeats,
                "rounds": rounds,
            }
            if auth:
                result["cache_hit_ms"] = round(cache_hit_ms(url, headers), 2)
            single = next((r for r in rounds if r["clients"] == 1), None)
            sixteen = next((r for r in rounds if r["clients"] == 16), None)
            if single and sixteen:
                result["scaling_16_vs_1"] = round(sixteen["tokens_per_s"] / single["tokens_per_s"], 2)
            return result
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--clients", type=int, action="append", help="concurrent clients (default: 1 4 16 64)"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="rounds per client count; medians are reported"
    )
    parser.add_argument("--auth", action="store_true", help="accounts, API key, rate limits and cache on")
    parser.add_argument(
        "--compare-auth", action="store_true", help="run open and with --auth, report the overhead"
    )
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--server-threads", type=int, help="semilla serve --threads (default: its own)")
    parser.add_argument(
        "--server-dtype", choices=("float32", "bfloat16"), help="semilla serve --dtype (default: its own)"
    )
    args = parser.parse_args()
    clients = args.clients or [1, 4, 16, 64]
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    modes = [False, True] if args.compare_auth else [args.auth]
    results = {}
    for auth in modes:
        results[auth] = run(auth, clients, args.repeats, args.port, args.server_threads, args.server_dtype)
        name = "serve_load-auth.json" if auth else "serve_load.json"
        (out / name).write_text(json.dumps(results[auth], indent=2) + "\n")
        print(json.dumps({k: v for k, v in results[auth].items() if k != "rounds"}))
    if args.compare_auth:
        for open_round, auth_round in zip(results[False]["rounds"], results[True]["rounds"], strict=True):
            overhead = 1 - auth_round["tokens_per_s"] / open_round["tokens_per_s"]
            print(
                json.dumps({"clients": open_round["clients"], "auth_overhead_pct": round(100 * overhead, 1)})
            )


if __name__ == "__main__":
    main()
