"""Server settings: defaults < `.env` file < SEMILLA_* environment variables < `semilla serve` flags."""

from __future__ import annotations

from typing import Literal

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SEMILLA_", env_file=".env", extra="ignore", populate_by_name=True
    )

    # --- where and what to serve -------------------------------------------------------
    host: str = Field("127.0.0.1", validation_alias=AliasChoices("SEMILLA_HOST", "HOST"))  # $HOST: Render
    port: int = Field(
        8000, ge=0, le=65535, validation_alias=AliasChoices("SEMILLA_PORT", "PORT")
    )  # $PORT: Render; 0: any free port
    models: str = Field(
        "", validation_alias=AliasChoices("SEMILLA_MODELS", "BETA_MODEL_PATH")
    )  # comma-separated checkpoint dirs, NAME=PATH to choose the id; BETA_MODEL_PATH: DataShark
    models_dir: str = "models"  # served when no checkpoint is named
    providers: str = ""  # providers.yaml: remote providers, routes (fallback chains), templates
    default_model: str = (
        ""  # the model (or route) of requests that name none; empty: the file's, else the first
    )
    lora: str = ""  # comma-separated NAME=PATH: LoRA adapters served on the default model
    max_loras: int = Field(8, ge=1)  # LoRA adapters held in memory per model (least recently used leave)
    lora_max_domains: int = Field(32, ge=1)  # distinct conversation domains (and LoRA job domains)
    lora_jobs_per_user: int = Field(1, ge=1)  # LoRA jobs one caller may have queued or running
    lora_job_queue: int = Field(8, ge=1)  # LoRA jobs queued or running on the server; 429 beyond
    lora_job_iters: int = Field(100, ge=1)  # fine-tuning steps of a LoRA job that names none
    data_dir: str = "semilla-data"  # database and logs
    device: str | None = None  # None: cuda when available, else cpu
    threads: int | None = Field(None, ge=1)  # torch threads; None: all cores but one (HTTP needs one)
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bfloat16 on CUDA, float32 on CPU

    # --- HTTP -----------------------------------------------------------------------------
    allowed_hosts: str = ""  # comma-separated names the Host header may carry besides loopback and IPs
    forwarded_allow_ips: str = ""  # proxies whose X-Forwarded-For/-Proto are believed; empty: none
    header_timeout_s: float = Field(10.0, gt=0)  # a request's headers must arrive within this
    grpc_port: int | None = Field(None, ge=0, le=65535)  # also serve the gRPC API here; 0: any free port

    # --- engine -------------------------------------------------------------------------
    max_slots: int = Field(16, ge=1)  # sequences decoded together per model
    queue_size: int = Field(64, ge=1)  # requests waiting for a slot before 503
    request_timeout_s: float = Field(300.0, gt=0)  # longer: finish_reason 'length' (or 503 if queued)
    max_body_bytes: int = Field(4 * 1024 * 1024, ge=1024)  # 413 beyond
    max_messages: int = Field(1000, ge=1)
    default_max_tokens: int = Field(256, ge=1)

    # --- observability ------------------------------------------------------------------
    metrics_public: bool = False  # /metrics without a token even when accounts exist (else: an admin's)
    docs: bool | None = None  # /docs and /openapi.json; None: on, except in production

    # --- operations (semilla.serve.alerts) -----------------------------------------------
    alert_rules: str = ""  # Prometheus alerting rules evaluated in-process; empty: the ones semilla ships
    alert_interval_s: float = Field(15.0, gt=0)  # how often the rules are evaluated
    alert_webhook_url: str = ""  # POSTed Alertmanager-style when an alert fires or resolves; empty: none
    alert_webhook_timeout_s: float = Field(5.0, gt=0)  # per delivery try (5 tries, backoff 1, 2, 4, 8 s)
    memory_limit_bytes: int = Field(0, ge=0)  # what memory alerts measure against; 0: cgroup limit, else RAM
    drift_interval_s: float = Field(300.0, ge=0)  # perplexity checks against each model's baseline; 0: off
    drift_reference: str = ""  # the text drift is measured on; empty: the end of the bundled demo text
    drift_sample_prompts: bool = False  # also score the last prompts (in memory only, never stored)
    price_prompt_per_1k: float = Field(0.0, ge=0)  # cost per 1,000 prompt tokens (GET /admin/usage)
    price_completion_per_1k: float = Field(0.0, ge=0)  # cost per 1,000 generated tokens
    price_per_second: float = Field(0.0, ge=0)  # cost per second of generation (the compute a request held)
    price_currency: str = "USD"

    # --- accounts and safety (semilla.serve.accounts) ----------------------------------
    database_url: str = ""  # empty: SQLite at <data_dir>/semilla.db; postgresql+psycopg://... works too
    redis_url: str = ""  # redis://...: rate limits and the response cache shared by every replica
    jwt_secret: str = (
        ""  # >= 32 bytes; empty: jwt_secret_file, else a random one kept in <data_dir>/jwt_secret
    )
    jwt_secret_file: str = ""  # a file holding the secret (a mounted secret shared by replicas)
    jwt_expire_minutes: int = 24 * 60
    environment: str = "development"  # 'production': the session cookie is Secure
    insecure_no_auth: bool = False  # model routes open even off loopback or with accounts
    allow_registration: bool = True  # POST /auth/register open to anyone (the first account is admin)
    rate_limit_rpm: dict[str, int] = {"anonymous": 100, "user": 100, "admin": 1000}  # requests/minute
    rate_limit_tpm: dict[str, int] = {"anonymous": 20_000, "user": 20_000, "admin": 200_000}  # tokens/min
    auth_attempts_per_minute: int = 10  # login and register, per client IP
    cache_max_entries: int = 1024
    cache_max_bytes: int = 64 * 1024 * 1024
    cache_ttl_s: float = 3600.0
    retention_days: int = 30  # request logs and audit rows older than this are deleted
    scrub_pii: bool = True  # emails, phones, cards, IBANs, IPs masked in request logs and audit details
    content_filter_file: str = ""  # one word or `re:<regex>` per line, applied to prompts and outputs
    cors_origins: str = ""  # comma-separated origins allowed to call the API from a browser
    runs_dir: str = "runs"  # training run directories indexed for /training/*
