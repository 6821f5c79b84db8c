"""Peak memory and throughput of `semilla prepare` as the corpus grows (issue 15, item 3).

Builds corpora of the given sizes in a temporary directory by repeating the shared texts
(`../shared/data/*.txt`), runs `semilla prepare` on each in its own process and reports the
peak resident memory of that process (ru_maxrss of a wrapper's only child) and MB/s.

    .venv/bin/python bench/prepare_memory.py                         # 10 MB, 200 MB, 1 GB; char
    .venv/bin/python bench/prepare_memory.py --sizes 10 200 --tokenizer bpe
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"

# runs one command as its only child and prints that child's peak RSS in KB
MEASURE = (
    "import resource, subprocess, sys; r = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL); "
    "print(r.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
)


def build_corpus(path: Path, size_mb: int, sources: list[Path]) -> int:
    """Repeat the source texts into `path` up to `size_mb` MB (cut at a line); returns bytes."""
    seed = b"".join(p.read_bytes() for p in sources)
    target = size_mb << 20
    with open(path, "wb") as f:
        written = 0
        while written + len(seed) <= target:
            f.write(seed)
            written += len(seed)
        tail = seed[: target - written]
        tail = tail[: tail.rfind(b"\n") + 1]
        f.write(tail)
        return written + len(tail)


def measure(corpus: Path, out: Path, tokenizer: str) -> dict:
    cmd = [sys.executable, "-c", MEASURE, sys.executable, "-m", "semilla", "prepare", str(corpus)]
    cmd += ["-o", str(out), "-q", "--tokenizer", tokenizer]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, check=True)
    seconds = time.perf_counter() - start
    code, maxrss_kb = proc.stdout.split()
    if code != "0":
        raise SystemExit(f"semilla prepare failed: {proc.stderr}")
    size = corpus.stat().st_size
    return {
        "corpus_mb": round(size / 2**20, 1),
        "tokenizer": tokenizer,
        "peak_rss_mb": round(int(maxrss_kb) / 1024, 1),
        "seconds": round(seconds, 1),
        "mb_per_s": round(size / 2**20 / seconds, 2),
        "log": [line for line in proc.stderr.splitlines() if "sample" in line],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 200, 1024], help="corpus sizes in MB")
    parser.add_argument("--tokenizer", choices=("char", "bpe"), default="char")
    parser.add_argument("--data", type=Path, default=SHARED, help="folder of .txt files to repeat")
    args = parser.parse_args()
    sources = sorted(args.data.glob("*.txt"))
    results = []
    with tempfile.TemporaryDirectory(prefix="semilla-prepare-bench-") as tmp:
        for size in args.sizes:
            corpus = Path(tmp) / f"corpus-{size}mb.txt"
            build_corpus(corpus, size, sources)
            row = measure(corpus, Path(tmp) / f"out-{size}", args.tokenizer)
            print(json.dumps(row), flush=True)
            results.append(row)
            corpus.unlink()
            shutil.rmtree(Path(tmp) / f"out-{size}")
    out = ROOT / "bench" / "results" / f"prepare_memory_{args.tokenizer}.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
