"""Engine settings: pydantic-settings, environment prefix ``TUNEFORGE_ENGINE_``, overridden by the CLI.

The data folder and object store are the platform-wide ``TUNEFORGE_DATA_DIR`` and
``TUNEFORGE_STORAGE_URL`` (the engine materialises ``store:`` adapters from the same store the
trainers write to). Runtime adapter loading honours vLLM's ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` too,
so a deployment script can treat both engines alike.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import AliasChoices, Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from gpu_worker.contract import DType


class EngineSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="TUNEFORGE_ENGINE_", extra="ignore")

    models: list[str] = Field(default_factory=lambda: ["tuneforge-tiny"])
    data_dir: Path = Field(Path("./.tuneforge"), validation_alias=AliasChoices("TUNEFORGE_DATA_DIR", "data_dir"))
    storage_url: str = Field("", validation_alias=AliasChoices("TUNEFORGE_STORAGE_URL", "storage_url"))
    device: str | None = None  # default: CUDA if available, else CPU
    dtype: DType = DType.auto
    allow_runtime_lora_updating: bool = Field(
        True,
        validation_alias=AliasChoices(
            "TUNEFORGE_ENGINE_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_ALLOW_RUNTIME_LORA_UPDATING", "allow_runtime_lora_updating"
        ),
    )
    # vLLM's --max-lora-rank: adapters of a larger rank are refused at load time.
    max_lora_rank: int = Field(64, ge=1, le=1024)
    # Adapters resident per base model (vLLM's --max-cpu-loras): loading one more evicts the least
    # recently used; the gateway reloads an evicted adapter when a request for it gets 404.
    max_loras: int = Field(32, ge=1)
    # Sequences decoded together; also the number of requests admitted before others queue.
    max_batch_size: int = Field(16, ge=1)
    # Prompt tokens prefilled in one forward pass when admitting new requests (at least one request
    # is always admitted, however long), so a burst of long prompts cannot stall running decodes.
    max_prefill_tokens: int = Field(4096, ge=1)
    max_model_len: int | None = Field(None, ge=1)  # default: the model's max_position_embeddings
    # Downloaded adapter folders kept on disk (gpu_worker.engine.adapters): one is read only while it is
    # loaded or checked, so a few of the largest served rank (a rank-64 LoRA on every projection of an 8B
    # model is ~340 MB in bf16) with room for concurrent loads.
    adapter_cache_max_bytes: int = Field(2 * 2**30, ge=1)

    @model_validator(mode="after")
    def _resolve(self):
        self.data_dir = self.data_dir.resolve()
        if not self.storage_url:
            self.storage_url = str(self.data_dir / "objects")
        if not self.models:
            raise ValueError("at least one --model is required")
        return self

    @property
    def adapter_cache_dir(self) -> Path:
        return self.data_dir / "adapter-cache"
