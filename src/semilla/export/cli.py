"""`semilla export FORMAT CHECKPOINT OUT` and `semilla import hf DIR OUT`: parsing and
printing only; the work is in the format modules."""

from __future__ import annotations

import argparse
import json

from semilla.export import ExportError
from semilla.export.gguf import TYPES


def cmd_export(args: argparse.Namespace) -> int:
    fmt, out = args.format, args.out
    if args.adapter and fmt not in ("hf", "gguf", "ollama"):
        raise ExportError(f"--adapter is for export hf, gguf and ollama, not {fmt}")
    if fmt == "hf":
        from semilla.export.hf import export_hf

        print(
            f"wrote {export_hf(args.checkpoint, out, args.overwrite, args.adapter)} "
            "(load with AutoModelForCausalLM.from_pretrained)"
        )
    elif fmt == "peft":
        from semilla.models.lora import export_peft

        print(
            f"wrote {export_peft(args.checkpoint, out, args.overwrite)} (load with peft.PeftModel.from_pretrained)"
        )
    elif fmt == "gguf" and args.adapter:
        from semilla.export.gguf_lora import export_gguf_adapter

        kind = args.type or "f32"
        path = export_gguf_adapter(args.checkpoint, args.adapter, out, kind, args.name, args.overwrite)
        print(f"wrote {path} ({kind.upper()} LoRA adapter: llama.cpp --lora {path} over the base's GGUF)")
    elif fmt == "gguf":
        from semilla.export.gguf import export_gguf

        kind = args.type or "f32"
        print(f"wrote {export_gguf(args.checkpoint, out, kind, args.name, args.overwrite)} ({kind.upper()})")
    elif fmt == "ollama":
        from semilla.export.ollama import OllamaOptions, export_ollama

        options = OllamaOptions(args.system, args.temperature, args.top_p, args.num_ctx)
        path, command = export_ollama(
            args.checkpoint, out, options, args.type or "q8_0", args.name, args.overwrite, args.adapter
        )
        files = "model.gguf, adapter.gguf" if args.adapter else "model.gguf"
        print(f"wrote {path}: {files} and Modelfile; now run:\n{command}")
    elif fmt == "onnx":
        from semilla.export.onnx import export_onnx

        print(
            f"wrote {export_onnx(args.checkpoint, out, overwrite=args.overwrite)}/model.onnx (input_ids -> logits)"
        )
    else:  # int8
        from semilla.export.quantize import compare_int8, quantize_int8

        path = quantize_int8(args.checkpoint, out, args.overwrite)
        report = compare_int8(args.checkpoint, path, args.data, args.split, args.max_tokens)
        if args.json:
            print(json.dumps(report, indent=2))
            return 0
        print(f"wrote {path}: {report['int8_bytes']:,} bytes of weights ({report['size_ratio']:.0%} of fp32)")
        if "perplexity_change" in report:
            print(
                f"perplexity {report['fp32_perplexity']:.4f} -> {report['int8_perplexity']:.4f} "
                f"({report['perplexity_change']:+.2%})"
            )
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from semilla.export.importer import import_hf

    print(f"wrote {import_hf(args.directory, args.out, args.overwrite)} (a semilla checkpoint)")
    return 0


def add_parsers(sub) -> None:
    """Add the `export` and `import` subcommands to semilla's argparse subparsers."""
    p = sub.add_parser(
        "export",
        help="write a checkpoint as a Hugging Face dir, GGUF, Ollama model, ONNX or int8",
        description="Export a checkpoint. hf: transformers directory; gguf: llama.cpp file; ollama: GGUF + "
        "Modelfile; onnx: ONNX Runtime model; int8: quantized checkpoint for CPU inference; peft: a LoRA "
        "adapter directory (semilla finetune's output) as a PEFT adapter.",
    )
    p.add_argument("format", choices=("hf", "gguf", "ollama", "onnx", "int8", "peft"), help="target format")
    p.add_argument("checkpoint", help="checkpoint or run directory (peft: the adapter directory)")
    p.add_argument("out", help="output directory (gguf: the .gguf file)")
    p.add_argument(
        "--type",
        choices=TYPES,
        help="gguf/ollama tensor type (default: f32 for gguf, q8_0 for ollama); q4_k_m needs llama-cpp-python",
    )
    p.add_argument("--name", help="gguf/ollama model name (default: the output's name)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument(
        "--adapter",
        metavar="DIR",
        help="a LoRA adapter of the checkpoint (semilla finetune's output). hf: merged into the weights; "
        "gguf: OUT is the adapter as a GGUF LoRA file (llama.cpp --lora; f32 or f16); ollama: adapter.gguf "
        "beside the model and an ADAPTER line in the Modelfile",
    )
    g = p.add_argument_group("ollama")
    g.add_argument("--system", help="SYSTEM prompt of the Modelfile")
    g.add_argument("--temperature", type=float, default=0.8, help="default temperature (default: 0.8)")
    g.add_argument("--top-p", type=float, default=0.95, help="default top_p (default: 0.95)")
    g.add_argument("--num-ctx", type=int, help="context window (default: the model's context length)")
    g = p.add_argument_group("int8")
    g.add_argument("--data", help="prepared dataset or text file: report fp32 vs int8 perplexity on it")
    g.add_argument(
        "--split", default="val", choices=("train", "val", "test"), help="split of --data (default: val)"
    )
    g.add_argument("--max-tokens", type=int, help="score at most this many tokens")
    g.add_argument("--json", action="store_true", help="print the size/perplexity report as JSON")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "import",
        help="turn a local Hugging Face Llama/GPT-2 directory into a semilla checkpoint",
        description="Import a LlamaForCausalLM or GPT2LMHeadModel directory (safetensors weights, tokenizer.json).",
    )
    p.add_argument("source", choices=("hf",), help="source format")
    p.add_argument("directory", help="the Hugging Face model directory")
    p.add_argument("out", help="checkpoint directory to write")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.set_defaults(func=cmd_import)
