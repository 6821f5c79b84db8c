"""Serving under load: N concurrent streaming clients against `semilla serve`.

    python bench/serve_load.py                          # 1, 4, 16, 64 clients; open server
    python bench/serve_load.py --auth                   # accounts, rate limits and cache on
    python bench/serve_load.py --clients 16 --compare-auth --repeats 5   # the auth overhead
    python bench/serve_load.py --clients 1 --clients 16 --server-dtype bfloat16
    python bench/serve_load.py --grpc                   # HTTP and gRPC side by side, one server
    python bench/serve_load.py --replicas 2             # 1 server vs 2 replicas on PostgreSQL + Redis

The server runs in its own process (`python -m semilla serve`) on a loopback port, serving a
datashark-10m-shaped model (gpt2 family, 8 x 320, 38-token char vocabulary, 512 context) with
random weights: speed does not depend on the weights. Each client streams one chat completion
of exactly 128 new tokens (min_tokens = max_tokens = 128). Reports aggregate tokens/s, TTFT
and inter-token latency P50/P95, errors, and /health latency while the clients stream.
With --auth, every request carries an API key, passes the rate limiter and looks up the
response cache (a miss: sampled requests are not cached); the cache-hit figure is a
deterministic request answered from the cache. With --grpc the server also serves gRPC and
each round runs the same clients over HTTP, then over gRPC (ChatStream); with --replicas N,
N servers share a real PostgreSQL and Redis (started here, as tests/test_replicas.py does)
and each round runs the clients against the first alone, then round-robin over all N. The
variants alternate within each repeat (interleaved), medians are reported with each
variant's tokens/s against the first's (`vs_first`). Writes
bench/results/serve_load[-auth][-grpc][-replicasN].json.
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
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
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


async def one_grpc_client(stub, pb, headers: dict) -> dict:
    """one_client's request over gRPC: ChatStream with the same prompt and settings."""
    import grpc

    request = pb.ChatRequest(
        messages=[pb.Message(role="user", content="en un lugar de la mancha")],
        sampling=pb.Sampling(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=1.0),
    )
    metadata = [(k.lower(), v) for k, v in headers.items()]
    start = time.perf_counter()
    stamps: list[float] = []
    tokens = 0
    try:
        async for chunk in stub.ChatStream(request, metadata=metadata):
            if chunk.text:
                stamps.append(time.perf_counter())
            if chunk.HasField("usage"):
                tokens = chunk.usage.completion_tokens
    except grpc.aio.AioRpcError as e:
        return {"error": f"{e.code().name} {e.details()[:120]}"}
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


@dataclass
class Server:
    """One `semilla serve` process: its HTTP base URL and, with --grpc, its gRPC address."""

    proc: subprocess.Popen
    url: str
    grpc_address: str | None = None


@dataclass
class Variant:
    """What one round measures: a protocol, and the servers its clients take in turn."""

    name: str
    protocol: str  # 'http' | 'grpc'
    servers: list[Server]


async def load_round(variant: Variant, headers: dict, clients: int) -> dict:
    """`clients` streaming at once, client i on server i mod len(servers) (round-robin)."""
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    channels, stubs_ = [], []
    if variant.protocol == "grpc":
        import grpc

        from semilla.serve.rpc import stubs

        pb, services = stubs()
        channels = [grpc.aio.insecure_channel(s.grpc_address) for s in variant.servers]
        stubs_ = [services.SemillaStub(c) for c in channels]
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        stop, health = asyncio.Event(), []
        probe = asyncio.create_task(health_probe(client, variant.servers[0].url, stop, health))

        def one(i: int):
            if stubs_:
                return one_grpc_client(stubs_[i % len(stubs_)], pb, headers)
            return one_client(client, variant.servers[i % len(variant.servers)].url, headers)

        start = time.perf_counter()
        results = await asyncio.gather(*(one(i) for i in range(clients)))
        wall = time.perf_counter() - start
        stop.set()
        await probe
    for channel in channels:
        await channel.close()
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


def server_env(data_dir: Path, shared: dict[str, str]) -> dict[str, str]:
    # limits far above the load, so every variant measures the same work (with --auth every
    # request is still checked against its buckets)
    limits = json.dumps({"anonymous": 10**9, "user": 10**9, "admin": 10**9})
    return {**os.environ, "SEMILLA_DATA_DIR": str(data_dir), "PYTHONUNBUFFERED": "1",
            "SEMILLA_RATE_LIMIT_RPM": limits, "SEMILLA_RATE_LIMIT_TPM": limits, **shared}  # fmt: skip


def make_key(data_dir: Path, shared: dict[str, str]) -> dict[str, str]:
    """An admin and an API key (in the shared database when there is one): the request headers."""
    env = server_env(data_dir, shared) | {"SEMILLA_ADMIN_PASSWORD": "bench-password-1"}
    cli = [sys.executable, "-m", "semilla", "admin", "--data-dir", str(data_dir)]
    subprocess.run([*cli, "create-user", "bench"], env=env, check=True, capture_output=True)
    key = subprocess.run([*cli, "create-key", "bench"], env=env, check=True, capture_output=True, text=True)
    return {"Authorization": f"Bearer {key.stdout.strip()}"}


def start_server(
    checkpoint: Path, data_dir: Path, port: int, grpc_port: int | None, args, shared: dict[str, str]
) -> Server:
    cmd = [sys.executable, "-m", "semilla", "serve", str(checkpoint), "--name", "datashark-10m",
           "--port", str(port), *(["--grpc-port", str(grpc_port)] if grpc_port else []),
           *(["--threads", str(args.server_threads)] if args.server_threads else []),
           *(["--dtype", args.server_dtype] if args.server_dtype else [])]  # fmt: skip
    env = server_env(data_dir, shared)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return Server(proc, url, f"127.0.0.1:{grpc_port}" if grpc_port else None)
        except httpx.HTTPError:
            pass
        if proc.poll() is not None:
            raise SystemExit(f"the server exited: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    proc.kill()
    raise SystemExit("the server did not become ready in 180 s")


@contextmanager
def shared_services(replicas: int) -> Iterator[dict[str, str]]:
    """With several replicas: a real PostgreSQL and Redis on loopback (as tests/test_replicas.py
    starts them) and the variables that make every replica use them."""
    if replicas == 1:
        yield {}
        return
    sys.path.insert(0, str(ROOT.parent / "tests"))
    from replica_helpers import running_postgres, running_redis

    with running_postgres() as pg, running_redis() as (redis_url, _):
        yield {"SEMILLA_DATABASE_URL": pg.url, "SEMILLA_REDIS_URL": redis_url, "SEMILLA_JWT_SECRET": "b" * 48}


def variants(servers: list[Server], grpc: bool) -> list[Variant]:
    """Side by side in each round: HTTP (and gRPC) on one server, and on every replica."""
    protocols = ["http", "grpc"] if grpc else ["http"]
    sets = [("1 server", servers[:1])] + ([(f"{len(servers)} replicas", servers)] if len(servers) > 1 else [])
    return [Variant(f"{name}, {p}" if grpc else name, p, chosen) for name, chosen in sets for p in protocols]


def run(auth: bool, clients: list[int], args) -> dict:
    with tempfile.TemporaryDirectory() as tmp, shared_services(args.replicas) as shared:
        checkpoint = make_checkpoint(Path(tmp))
        headers = make_key(Path(tmp) / "data-0", shared) if auth else {}
        servers = []
        try:
            for i in range(args.replicas):
                grpc_port = args.port + 100 + i if args.grpc else None
                servers.append(start_server(checkpoint, Path(tmp) / f"data-{i}", args.port + i, grpc_port, args,
                                            shared))  # fmt: skip
            compared = variants(servers, args.grpc)
            for v in compared:
                asyncio.run(load_round(v, headers, 2))  # warm-up
            rounds = []
            for n in clients:
                runs: dict[str, list[dict]] = {v.name: [] for v in compared}
                for _ in range(args.repeats):  # interleaved: each variant once per repeat
                    for v in compared:
                        runs[v.name].append(asyncio.run(load_round(v, headers, n)))
                for v in compared:
                    rounds.append({"variant": v.name, **medians(runs[v.name], n)})
                    print(json.dumps(rounds[-1]), flush=True)
                base = rounds[-len(compared)]["tokens_per_s"]
                for r in rounds[-len(compared) + 1 :]:
                    r["vs_first"] = round(r["tokens_per_s"] / base, 3)
                    print(json.dumps({"clients": n, "variant": r["variant"], "vs_first": r["vs_first"]}))
            result = {
                "auth": auth,
                "grpc": args.grpc,
                "replicas": args.replicas,
                "server_threads": args.server_threads,
                "server_dtype": args.server_dtype,
                "new_tokens": NEW_TOKENS,
                "repeats": args.repeats,
                "rounds": rounds,
            }
            if auth:
                result["cache_hit_ms"] = round(cache_hit_ms(servers[0].url, headers), 2)
            first = compared[0].name
            single = next((r for r in rounds if r["clients"] == 1 and r["variant"] == first), None)
            sixteen = next((r for r in rounds if r["clients"] == 16 and r["variant"] == first), None)
            if single and sixteen:
                result["scaling_16_vs_1"] = round(sixteen["tokens_per_s"] / single["tokens_per_s"], 2)
            return result
        finally:
            for server in servers:
                server.proc.terminate()
                server.proc.wait(timeout=30)


def medians(runs: list[dict], clients: int) -> dict:
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0] if isinstance(runs[0][k], float)}
    median.update(
        clients=clients,
        errors=sum(r["errors"] for r in runs),
        tokens_ok=all(r["tokens_ok"] for r in runs),
        error_samples=[e for r in runs for e in r["error_samples"]][:3],
    )
    return {k: round(v, 2) if isinstance(v, float) else v for k, v in median.items()}


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
    parser.add_argument(
        "--grpc", action="store_true", help="also serve gRPC; HTTP and gRPC rounds side by side"
    )
    parser.add_argument(
        "--replicas",
        type=int,
        default=1,
        help="N replicas on one PostgreSQL and Redis; 1 server and N round-robin side by side",
    )
    parser.add_argument("--port", type=int, default=8765, help="the first server's; replicas take the next")
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
        results[auth] = run(auth, clients, args)
        name = "serve_load" + ("-auth" if auth else "") + ("-grpc" if args.grpc else "")
        name += f"-replicas{args.replicas}" if args.replicas > 1 else ""
        (out / f"{name}.json").write_text(json.dumps(results[auth], indent=2) + "\n")
        print(json.dumps({k: v for k, v in results[auth].items() if k != "rounds"}))
    if args.compare_auth:
        for open_round, auth_round in zip(results[False]["rounds"], results[True]["rounds"], strict=True):
            overhead = 1 - auth_round["tokens_per_s"] / open_round["tokens_per_s"]
            print(
                json.dumps({"clients": open_round["clients"], "auth_overhead_pct": round(100 * overhead, 1)})
            )


if __name__ == "__main__":
    main()
