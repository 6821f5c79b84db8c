"""The load probe: 64 streaming clients for 60 s, three times, against one `semilla serve`.

    python bench/serve_soak.py                       # 64 clients, 3 runs of 60 s
    python bench/serve_soak.py --clients 16 --seconds 20 --runs 2

The server and model are `serve_load.py`'s (a datashark-10m-shaped model with random weights,
its own process on a loopback port, rate limits far above the load). Each client streams chat
completions of 128 tokens back to back until the run's time is up; `/health` is polled every
50 ms meanwhile, from a process of its own. After each run the server's resident memory (VmRSS) is read. Passes when every
run has zero errors, `/health` P99 and max under 100 ms, and the RSS after the last run is
within 5% of the RSS after the first. Writes bench/results/serve_soak.json.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import multiprocessing
import tempfile
import time
from pathlib import Path

import httpx
from serve_load import ROOT, make_checkpoint, one_client, percentile, start_server

HEALTH_LIMIT_MS = 100.0
RSS_GROWTH_LIMIT = 0.05


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


async def client_loop(client: httpx.AsyncClient, url: str, deadline: float, out: dict) -> None:
    while time.perf_counter() < deadline:
        result = await one_client(client, url, {})
        if "error" in result:
            out["errors"].append(result["error"])
        else:
            out["completions"] += 1
            out["tokens"] += result["tokens"]


def probe_health(url: str, seconds: float, results) -> None:
    """Poll /health every 50 ms for `seconds` from a process of its own (so the clients' event
    loop, busy with 64 streams, does not add its own delays); send [(s into the run, ms)].

    The process is a fork of this one, which holds ~190k objects (torch, httpx, the clients'
    state): frozen out of its collector's sight first, or about once every three minutes a full
    pass over them (220 ms on the loaded VM) lands inside a poll and is counted as the server's."""
    gc.freeze()
    out = []
    with httpx.Client(timeout=30) as client:
        start = time.perf_counter()
        while (sent := time.perf_counter()) - start < seconds:
            if client.get(url + "/health").status_code == 200:
                out.append((sent - start, 1000 * (time.perf_counter() - sent)))
            time.sleep(0.05)
    results.send(out)


async def soak(url: str, clients: int, seconds: float) -> dict:
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    receive, send = multiprocessing.Pipe(duplex=False)
    prober = multiprocessing.Process(target=probe_health, args=(url, seconds, send))
    prober.start()
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        deadline = time.perf_counter() + seconds
        stats: dict = {"errors": [], "completions": 0, "tokens": 0}
        await asyncio.gather(*(client_loop(client, url, deadline, stats) for _ in range(clients)))
    health = receive.recv()
    prober.join()
    latencies = [ms for _, ms in health]
    return {
        "completions": stats["completions"],
        "tokens_per_s": round(stats["tokens"] / seconds, 1),
        "errors": len(stats["errors"]),
        "error_samples": stats["errors"][:3],
        "health_polls": len(latencies),
        "health_p50_ms": round(percentile(latencies, 0.5), 2),
        "health_p99_ms": round(percentile(latencies, 0.99), 2),
        "health_max_ms": round(max(latencies), 2),
        "health_slow": [(round(t, 1), round(ms, 1)) for t, ms in health if ms > 50][
            :20
        ],  # (s into the run, ms)
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--port", type=int, default=8766)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_checkpoint(Path(tmp))
        defaults = argparse.Namespace(server_threads=None, server_dtype=None)  # serve's own defaults
        proc = start_server(checkpoint, Path(tmp) / "data", args.port, None, defaults, shared={}).proc
        url = f"http://127.0.0.1:{args.port}"
        try:
            runs = []
            for i in range(args.runs):
                result = asyncio.run(soak(url, args.clients, args.seconds))
                result["server_rss_mib"] = round(rss_mib(proc.pid), 1)
                runs.append(result)
                print(json.dumps({"run": i + 1, **result}), flush=True)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    growth = runs[-1]["server_rss_mib"] / runs[0]["server_rss_mib"] - 1
    verdict = {
        "zero_errors": all(r["errors"] == 0 for r in runs),
        "health_p99_and_max_under_100_ms": all(r["health_max_ms"] < HEALTH_LIMIT_MS for r in runs),
        "rss_growth_first_to_last_pct": round(100 * growth, 2),
        "rss_within_5_pct": abs(growth) <= RSS_GROWTH_LIMIT,
    }
    print(json.dumps(verdict))
    out = ROOT / "results"
    out.mkdir(exist_ok=True)
    summary = {"clients": args.clients, "seconds": args.seconds, "runs": runs, "verdict": verdict}
    (out / "serve_soak.json").write_text(json.dumps(summary, indent=2) + "\n")


if __name__ == "__main__":
    main()
