"""Settings of the serving gateway: the shared control-plane settings plus where the inference engines
are and how long to wait for them (environment prefix ``TUNEFORGE_``).

``TUNEFORGE_ENGINES`` is JSON mapping a base model name to the base URLs of the engine replicas serving
it, e.g. ``{"tuneforge-tiny": ["http://127.0.0.1:8100", "http://127.0.0.1:8101"]}``.
"""

from __future__ import annotations

import functools
from typing import Literal

from pydantic import Field, field_validator, model_validator

from scheduler.settings import Settings


class ServingSettings(Settings):
    engines: dict[str, list[str]] = Field(default_factory=dict)
    # What the engines are. "builtin": the gateway loads an adapter on a replica before its first request
    # (the engine reads it from object storage). "vllm": vLLM's resolver plugin (deploy/vllm) loads an
    # ``ft:`` name from object storage when a request names it; the gateway never sends vLLM a path.
    engine_kind: Literal["builtin", "vllm"] = "builtin"
    # Connecting to an engine on the same network is quick; a replica that does not answer within a few
    # seconds is treated as down and the next replica is tried.
    engine_connect_timeout_s: float = 5.0
    # Longest silence between two bytes of an engine's answer. A long non-streamed generation sends
    # nothing until it is done, so this bounds a whole non-streamed completion.
    engine_read_timeout_s: float = 600.0
    # Loading a LoRA adapter means fetching it from object storage: allow for a slow store.
    adapter_load_timeout_s: float = 120.0
    # After a replica refuses a connection it is tried last for this long (it is likely restarting).
    replica_cooldown_s: float = 10.0
    # How often the gateway re-reads which adapters each replica holds (its /v1/models), so that
    # several gateways, or one that restarted, route to a replica that already has the adapter.
    replica_refresh_s: float = Field(10.0, gt=0)

    # How long an authenticated API key and a resolved fine-tuned model name are reused without asking
    # the database (serving.cache): a revoked key, or a registry change made through another gateway
    # replica, takes effect here within this bound. 0 disables the cache.
    auth_cache_ttl_s: float = Field(5.0, ge=0)
    model_cache_ttl_s: float = Field(5.0, ge=0)
    # Usage records are journaled to local disk on the response path and written to the database in
    # batches this often (serving.usage_writer). Empty: <data_dir>/usage-journal.
    usage_flush_interval_s: float = Field(0.1, gt=0)
    usage_journal_dir: str = ""
    # A stream's running token count is journaled at most this often, so that a gateway killed mid-stream
    # bills the stream (status gateway_restarted) with at most this much generation unaccounted.
    usage_progress_interval_s: float = Field(1.0, gt=0)
    # A request id that succeeded is answered from its stored response this long (a retry with the same
    # id and body is neither run nor billed again); afterwards the id runs as a new request.
    response_store_ttl_s: float = Field(86_400.0, gt=0)
    # A request id still running answers 409 to a retry; a claim whose gateway died without a restart on
    # its journal (which releases it) blocks its id this long. Longer than any request runs.
    request_lease_s: float = Field(3_600.0, gt=0)

    # How long the gateway keeps an idle client connection open (uvicorn's timeout_keep_alive; see
    # serving.server for why it exceeds the clients' own idle timeouts).
    http_keep_alive_s: int = Field(75, ge=1)
    # gc.freeze() after start-up (serving.server.tune_gc); off only to measure without it.
    gc_tuning: bool = True

    # Redis for the per-key rate-limit buckets shared by all gateway replicas; empty: in this process.
    rate_limit_url: str = ""
    # The platform's serving limit on LoRA rank: vLLM's --max-lora-rank and the registry's check use it.
    max_lora_rank: int = Field(64, ge=1, le=512)
    # Layers the engines serve LoRA on (vLLM's punica kernels: the linear projections of the decoder).
    supported_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj", "gate_up_proj"]
    )

    @field_validator("engines")
    @classmethod
    def _clean_engine_urls(cls, engines: dict[str, list[str]]) -> dict[str, list[str]]:
        cleaned: dict[str, list[str]] = {}
        for base, urls in engines.items():
            for url in urls:
                if not url.startswith(("http://", "https://")):
                    raise ValueError(f"engine URL {url!r} for {base!r} must start with http:// or https://")
            # A replica listed twice would be loaded and counted twice; keep the first.
            cleaned[base] = list(dict.fromkeys(url.rstrip("/") for url in urls))
        return cleaned

    @model_validator(mode="after")
    def _engines_in_production(self):
        if self.environment == "production" and not any(self.engines.values()):
            raise ValueError("production needs TUNEFORGE_ENGINES (base model -> engine URLs)")
        return self


@functools.lru_cache
def get_serving_settings() -> ServingSettings:
    return ServingSettings()
