"""Settings shared by every control-plane deployable (environment prefix ``TUNEFORGE_``).

Each deployable (api, serving) subclasses ``Settings`` with its own fields; ``get_settings()`` is
cached and tests override it. Embedded defaults need no setup: SQLite and a storage folder in the data
dir, an in-process queue. Production sets ``TUNEFORGE_DATABASE_URL`` (PostgreSQL),
``TUNEFORGE_BROKER_URL`` (Redis) and ``TUNEFORGE_STORAGE_URL`` (s3://...).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

BUILTIN_BASE_MODEL = "tuneforge-tiny"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEFORGE_", extra="ignore")

    environment: Literal["development", "production"] = "development"
    data_dir: Path = Path("./.tuneforge")
    database_url: str = ""  # default: sqlite in data_dir
    storage_url: str = ""  # default: data_dir/objects
    broker_url: str = ""  # empty: in-process queue (embedded mode); redis://... for Celery
    bootstrap_api_key: str | None = None
    # Base models tenants may fine-tune and call: built-in names, hub ids or local paths.
    base_models: list[str] = Field(default_factory=lambda: [BUILTIN_BASE_MODEL])
    # The base models an organization may call unless it has an entitlement entry of its own for them
    # (a grant or a revocation: scheduler.entitlements). Unset: every base model, as before entitlements
    # existed (the embedded demo needs no setup); a JSON list (possibly empty): only those.
    default_base_models: list[str] | None = None
    # Worker lease: a claimed job must be heartbeated within this many seconds or the reaper
    # returns it to the queue.
    lease_seconds: float = 30.0
    heartbeat_seconds: float = 5.0
    max_attempts: int = 3
    # How queued jobs reach workers in production: Celery queues consumed by long-lived worker pools,
    # or one Kubernetes Job per training job (scheduler.kube).
    scheduler_backend: Literal["queue", "kube"] = "queue"
    # Fair share: at most this many running jobs per organization (0: no limit), per-org overrides
    # (0 there pauses the org), and priorities added to every job of an org (higher runs first).
    max_running_per_org: int = Field(0, ge=0)
    org_concurrency_limits: dict[str, int] = Field(default_factory=dict)
    org_priorities: dict[str, int] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _fill_defaults(self):
        self.data_dir = self.data_dir.resolve()
        if not self.database_url:
            self.database_url = f"sqlite:///{self.data_dir / 'tuneforge.db'}"
        if not self.storage_url:
            self.storage_url = str(self.data_dir / "objects")
        unknown = sorted(set(self.default_base_models or ()) - set(self.base_models))
        if unknown:
            raise ValueError(f"default_base_models names {unknown}, which are not in base_models")
        if self.environment == "production":
            if self.database_url.startswith("sqlite"):
                raise ValueError("production needs TUNEFORGE_DATABASE_URL (PostgreSQL), not SQLite")
            if not self.broker_url:
                raise ValueError("production needs TUNEFORGE_BROKER_URL (Redis)")
        return self

    @property
    def embedded(self) -> bool:
        return not self.broker_url


@functools.lru_cache
def get_settings() -> Settings:
    return Settings()
