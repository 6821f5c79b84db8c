"""One exported model, five runtimes: single-stream greedy decoding of 256 tokens on the CPU.

semilla (KV cache), Hugging Face transformers `generate`, llama.cpp (F32 and Q8_0 GGUF, via
llama-cpp-python) and ONNX Runtime (the exported graph has no KV cache: every step runs the
whole sequence). The model is a llama-family transformer with random weights (speed does not
depend on what was learned) and the tinyshakespeare character vocabulary.

    .venv/bin/python bench/inference_compare.py [--threads 1] [--repeats 3] [--shape 50m]
    python bench/inference_compare.py --device cuda [--dtype bfloat16]   # semilla and transformers on a GPU

Shapes: `10m` (6 layers x 384, DataShark-sized) and `50m` (8 layers x 640, 10 heads).
Each repeat is one round of every runtime (a slow spell of a shared machine hits them all);
medians. Prints tokens/s side by side and writes bench/results/inference_compare[-SHAPE].json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
SHAPES = {
    "10m": dict(n_layer=6, n_head=6, n_embd=384, block_size=512),  # ~10.7M parameters, DataShark-sized
    "50m": dict(n_layer=8, n_head=10, n_embd=640, block_size=512),  # ~40M parameters
}
SHAPE = dict(SHAPES["10m"])
NEW_TOKENS = 256


def build(workdir: Path, threads: int, cpu_runtimes: bool = True) -> dict:
    """Save a checkpoint and export it to every format (on a GPU, to Hugging Face's only);
    returns the paths."""
    import torch

    from semilla.checkpoint import save_checkpoint
    from semilla.config import ModelConfig
    from semilla.export.hf import export_hf
    from semilla.models import build_model
    from semilla.tokenizer import Tokenizer

    torch.manual_seed(0)
    tok = Tokenizer.train_char([CORPUS.read_text(encoding="utf-8")])
    model = build_model(ModelConfig(vocab_size=tok.vocab_size, **SHAPE)).eval()
    ckpt = save_checkpoint(workdir / "ckpt", model, tok)
    if not cpu_runtimes:
        return {"ckpt": ckpt, "hf": export_hf(ckpt, workdir / "hf")}
    from semilla.export.gguf import export_gguf
    from semilla.export.onnx import export_onnx

    return {
        "ckpt": ckpt,
        "hf": export_hf(ckpt, workdir / "hf"),
        "f32": export_gguf(ckpt, workdir / "f32.gguf", "f32"),
        "q8_0": export_gguf(ckpt, workdir / "q8_0.gguf", "q8_0"),
        "onnx": export_onnx(ckpt, workdir / "onnx") / "model.onnx",
    }


def runners(
    paths: dict, threads: int, prompt: list[int], device: str = "cpu", dtype: str = "float32"
) -> dict:
    """name -> a function that decodes NEW_TOKENS greedily and returns the token count; on a
    GPU, semilla's and transformers' only (llama.cpp and ONNX Runtime run on the CPU here)."""
    import torch
    from transformers import AutoModelForCausalLM, GenerationConfig

    from semilla.checkpoint import load_checkpoint
    from semilla.config import GenerateConfig
    from semilla.generate import generate

    torch.set_num_threads(threads)
    weights = getattr(torch, dtype)
    model, _, _ = load_checkpoint(paths["ckpt"])
    model = model.to(device, weights)
    hf = AutoModelForCausalLM.from_pretrained(paths["hf"], local_files_only=True).to(device, weights).eval()
    no_stop = GenerationConfig(
        do_sample=False, max_new_tokens=NEW_TOKENS, max_length=None, eos_token_id=None, pad_token_id=0
    )

    def semilla_run() -> int:
        cfg = GenerateConfig(max_new_tokens=NEW_TOKENS, temperature=0.0)
        return len(generate(model, [prompt], cfg, stop_ids=())[0].tokens)

    def transformers_run() -> int:
        with torch.no_grad():
            out = hf.generate(torch.tensor([prompt], device=device), generation_config=no_stop)
        return out.shape[1] - len(prompt)

    ours = {"semilla (KV cache)": semilla_run, "transformers generate": transformers_run}
    if device != "cpu":
        return ours
    import numpy as np
    import onnxruntime as ort
    from llama_cpp import Llama

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(paths["onnx"]), options, providers=["CPUExecutionProvider"])

    def llama_cpp_run(llm: Llama) -> int:
        llm.reset()
        n = 0
        for _ in llm.generate(prompt, top_k=1, temp=0.0, reset=True):
            n += 1
            if n == NEW_TOKENS:
                break
        return n

    def onnx_run() -> int:
        ids = list(prompt)
        for _ in range(NEW_TOKENS):
            (logits,) = session.run(None, {"input_ids": np.array([ids], dtype=np.int64)})
            ids.append(int(logits[0, -1].argmax()))
        return len(ids) - len(prompt)

    f32, q8 = (
        Llama(str(paths[k]), n_ctx=SHAPE["block_size"], n_threads=threads, verbose=False)
        for k in ("f32", "q8_0")
    )
    return {
        **ours,
        "llama.cpp F32": lambda: llama_cpp_run(f32),
        "llama.cpp Q8_0": lambda: llama_cpp_run(q8),
        "onnxruntime (no KV cache)": onnx_run,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="CPU threads for every runtime (default: 1)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per runtime; the median counts")
    parser.add_argument("--shape", choices=sorted(SHAPES), default="10m", help="model shape (default: 10m)")
    parser.add_argument(
        "--device", default="cpu", help="cpu (every runtime) or cuda (semilla and transformers)"
    )
    parser.add_argument(
        "--dtype", choices=("float32", "bfloat16"), default="float32", help="weights (default: float32)"
    )
    args = parser.parse_args()
    SHAPE.update(SHAPES[args.shape])
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    with tempfile.TemporaryDirectory(prefix="semilla-bench-") as tmp:
        paths = build(Path(tmp), args.threads, cpu_runtimes=args.device == "cpu")
        prompt = [2] + list(range(10, 26))  # <bos> and 16 characters
        runs = runners(paths, args.threads, prompt, args.device, args.dtype)
        for run in runs.values():
            run()  # warm-up: first-call allocations, lazy initialization
        rates = {name: [] for name in runs}
        for _ in range(args.repeats):  # rounds of every runtime: a slow spell hits them all
            for name, run in runs.items():
                start = time.perf_counter()
                n = run()
                rates[name].append(n / (time.perf_counter() - start))
        results = {}
        for name, r in rates.items():
            results[name] = {"tokens_per_s": statistics.median(r), "runs": r}
            print(f"{name:<28} {statistics.median(r):8.1f} tokens/s", flush=True)
    ours = results["semilla (KV cache)"]["tokens_per_s"]
    summary = {"semilla_vs_transformers": ours / results["transformers generate"]["tokens_per_s"]}
    if "llama.cpp F32" in results:
        summary["semilla_vs_llama_cpp_f32"] = ours / results["llama.cpp F32"]["tokens_per_s"]
    print("; ".join(f"{k.replace('_vs_', ' / ').replace('_', ' ')} = {v:.2f}x" for k, v in summary.items()))
    report = {
        "model": SHAPE,
        "new_tokens": NEW_TOKENS,
        "threads": args.threads,
        "device": args.device,
        "dtype": args.dtype,
        "repeats": args.repeats,
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count()},
        "results": results,
        "summary": summary,
    }
    suffix = ("" if args.shape == "10m" else f"-{args.shape}") + (
        "" if args.device == "cpu" else f"-{args.device}-{args.dtype}"
    )
    out = ROOT / "bench" / "results" / f"inference_compare{suffix}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
