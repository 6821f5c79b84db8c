"""Server settings: defaults < `.env` file < SEMILLA_* environment variables < `semilla serve` flags."""

from __future__ import annotations

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class ServerSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="SEMILLA_", env_file=".env", extra="ignore")

    # --- where and what to serve -------------------------------------------------------
    host: str = "127.0.0.1"
    port: int = Field(8000, validation_alias=AliasChoices("SEMILLA_PORT", "PORT"))  # $PORT: Render
    models: str = Field(
        "", validation_alias=AliasChoices("SEMILLA_MODELS", "BETA_MODEL_PATH")
    )  # comma-separated checkpoint dirs, NAME=PATH to choose the id; BETA_MODEL_PATH: DataShark
    models_dir: str = "models"  # served when no checkpoint is named
    data_dir: str = "semilla-data"  # database and logs
    device: str | None = None  # None: cuda when available, else cpu

    # --- engine -------------------------------------------------------------------------
    max_slots: int = 16  # sequences decoded together per model
    queue_size: int = 64  # requests waiting for a slot before 503
    request_timeout_s: float = 300.0  # a request running longer ends with finish_reason 'length'
    max_body_bytes: int = 4 * 1024 * 1024  # 413 beyond
    max_messages: int = 1000
    default_max_tokens: int = 256

    # --- observability ------------------------------------------------------------------
    metrics_public: bool = True  # /metrics without a token

    # --- accounts and safety (semilla.serve.accounts) ----------------------------------
