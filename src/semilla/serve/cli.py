"""`semilla serve` flags -> ServerSettings -> serve(). Flags win over SEMILLA_* variables and .env."""

from __future__ import annotations

import argparse

from semilla.config import DTYPE_HELP

FLAGS = (  # flag, settings field, type, help
    ("--host", "host", str, "address to bind (default: 127.0.0.1; $SEMILLA_HOST)"),
    ("--port", "port", int, "port (default: 8000, or $PORT / $SEMILLA_PORT)"),
    (
        "--grpc-port",
        "grpc_port",
        int,
        "also serve the gRPC API (chat, completions, models, grpc.health.v1) on this port, with the same "
        "keys, limits and metrics; needs semilla[grpc] (default: off; $SEMILLA_GRPC_PORT)",
    ),
    (
        "--models-dir",
        "models_dir",
        str,
        "serve the checkpoints found here when none is named (default: models)",
    ),
    (
        "--providers",
        "providers",
        str,
        "providers.yaml: remote OpenAI/Anthropic-compatible providers, named routes that fall back "
        "from one to the next (local -> deepseek -> templates), cooldown; see the README ($SEMILLA_PROVIDERS)",
    ),
    (
        "--default-model",
        "default_model",
        str,
        "the model or route of requests that name none (default: the providers file's, else the first model)",
    ),
    (
        "--max-loras",
        "max_loras",
        int,
        "LoRA adapters held in memory per model; the least recently used idle one leaves (default: 8)",
    ),
    (
        "--lora-max-domains",
        "lora_max_domains",
        int,
        "distinct domains conversations and LoRA jobs may use; the next is refused (default: 32)",
    ),
    (
        "--lora-jobs-per-user",
        "lora_jobs_per_user",
        int,
        "LoRA jobs (POST /v1/lora/generate) one caller may have queued or running; 429 beyond (default: 1)",
    ),
    (
        "--lora-job-queue",
        "lora_job_queue",
        int,
        "LoRA jobs queued or running on the server; 429 beyond (default: 8)",
    ),
    (
        "--lora-job-iters",
        "lora_job_iters",
        int,
        "fine-tuning steps of a LoRA job that names none (default: 100)",
    ),
    ("--data-dir", "data_dir", str, "where the database and logs live (default: semilla-data)"),
    ("--device", "device", str, "cpu, cuda, mps (default: cuda when available)"),
    ("--threads", "threads", int, "CPU threads for the model (default: all cores but one, left to HTTP)"),
    ("--dtype", "dtype", str, f"{DTYPE_HELP} (default: auto)"),
    ("--max-slots", "max_slots", int, "sequences decoded together per model (default: 16)"),
    ("--queue-size", "queue_size", int, "requests waiting for a slot before 503 (default: 64)"),
    ("--request-timeout", "request_timeout_s", float, "seconds before a generation is cut (default: 300)"),
    ("--max-body-bytes", "max_body_bytes", int, "largest request body; 413 beyond (default: 4 MiB)"),
    (
        "--default-max-tokens",
        "default_max_tokens",
        int,
        "max_tokens when a request gives none (default: 256)",
    ),
    (
        "--allowed-hosts",
        "allowed_hosts",
        str,
        "comma-separated host names the server answers to besides loopback names and IP addresses; "
        "checked while the server is open, always once set; '*' for any (default: none)",
    ),
    (
        "--forwarded-allow-ips",
        "forwarded_allow_ips",
        str,
        "comma-separated addresses of reverse proxies whose X-Forwarded-For/-Proto are believed "
        "(default: none, the peer's own address counts)",
    ),
    (
        "--header-timeout",
        "header_timeout_s",
        float,
        "seconds a client has to send a request's headers (default: 10)",
    ),
    (
        "--alert-rules",
        "alert_rules",
        str,
        "Prometheus alerting rules file the server evaluates itself (GET /admin/alerts, dashboard, log); "
        "default: the rules semilla ships (P95 latency, error rate, memory, drift, A/B variant down, health)",
    ),
    (
        "--alert-interval",
        "alert_interval_s",
        float,
        "seconds between two evaluations of the alerting rules (default: 15)",
    ),
    (
        "--alert-webhook",
        "alert_webhook_url",
        str,
        "URL POSTed an Alertmanager-style JSON body when an alert fires or resolves, retried with backoff "
        "($SEMILLA_ALERT_WEBHOOK_URL; default: none)",
    ),
    (
        "--drift-interval",
        "drift_interval_s",
        float,
        "seconds between two perplexity checks of each served model against its baseline; 0: off (default: 300)",
    ),
    (
        "--drift-reference",
        "drift_reference",
        str,
        "text file drift is measured on (default: the last 4,000 characters of the bundled demo text)",
    ),
    (
        "--price-prompt-per-1k",
        "price_prompt_per_1k",
        float,
        "cost of 1,000 prompt tokens, for /admin/usage (default: 0)",
    ),
    (
        "--price-completion-per-1k",
        "price_completion_per_1k",
        float,
        "cost of 1,000 generated tokens, for /admin/usage (default: 0)",
    ),
    (
        "--price-per-second",
        "price_per_second",
        float,
        "cost of one second of generation (the CPU or GPU a request held), for /admin/usage (default: 0)",
    ),
    (
        "--memory-limit",
        "memory_limit_bytes",
        int,
        "bytes the memory alert measures against (default: the cgroup's limit, else the machine's memory)",
    ),
)


def add_parser(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve models over OpenAI-, Anthropic- and Ollama-compatible HTTP APIs",
        description="Serve checkpoints over OpenAI's API (/v1/chat/completions, /v1/completions, /v1/models, "
        "/v1/responses), Anthropic's /v1/messages, Ollama's /api/chat, /api/generate, /api/tags, /api/show and "
        "/api/embed, robo-poet's /v1/generate and simpleIA's /predict, with continuous batching, /health, /ready and "
        "Prometheus /metrics; with --grpc-port, chat, completions and models over gRPC too. With --providers, a request's model may also be PROVIDER/MODEL of a remote "
        "OpenAI- or Anthropic-compatible service or a named route that falls back from one provider to the "
        "next, or an A/B route that splits traffic between variants by weight; admins switch models at run "
        "time (semilla admin model). Operations: alerting rules evaluated in-process (/admin/alerts, an "
        "optional webhook), drift checks (/admin/drift), A/B reports (/admin/ab) and usage and cost "
        "(/admin/usage); see the README's Operations section. "
        "Settings: defaults < .env < SEMILLA_* variables < flags.",
    )
    p.add_argument(
        "checkpoints",
        nargs="*",
        metavar="CHECKPOINT",
        help="checkpoint or run directories, optionally NAME=PATH (default: $SEMILLA_MODELS, "
        "$BETA_MODEL_PATH, or every checkpoint in --models-dir)",
    )
    p.add_argument(
        "--name", action="append", help="model id for the checkpoint in the same position (repeatable)"
    )
    for flag, _, typ, text in FLAGS:
        p.add_argument(flag, type=typ, help=text)
    p.add_argument(
        "--lora",
        action="append",
        metavar="NAME=PATH",
        help="serve the PEFT adapter directory PATH (semilla finetune's output) as model NAME on the default "
        "model; /v1/models lists it with its parent (repeatable; $SEMILLA_LORA: comma-separated)",
    )
    p.add_argument(
        "--insecure-no-auth",
        action="store_true",
        default=None,
        help="serve the model routes without authentication even off loopback or with accounts",
    )
    p.add_argument(
        "--drift-sample-prompts",
        action="store_true",
        default=None,
        help="also measure drift on the last prompts each model answered: held in memory only, PII-scrubbed, "
        "dropped after each check (default: off)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pydantic import ValidationError

    from semilla.errors import SemillaError
    from semilla.serve.server import serve
    from semilla.serve.settings import ServerSettings

    overrides = {field: getattr(args, field_attr(flag)) for flag, field, _, _ in FLAGS}
    overrides["insecure_no_auth"] = args.insecure_no_auth
    overrides["drift_sample_prompts"] = args.drift_sample_prompts
    overrides["lora"] = ",".join(args.lora) if args.lora else None
    try:
        settings = ServerSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as e:  # flags, SEMILLA_* variables or .env: name every bad one
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
        raise SemillaError(f"invalid server settings: {problems}") from None
    serve(args.checkpoints, settings, args.name)
    return 0


def field_attr(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")
