"""Settings of the API deployable: the shared control-plane settings plus what only the API needs.

Same ``TUNEFORGE_`` environment prefix as the shared settings (one env file configures the platform):
``TUNEFORGE_MAX_UPLOAD_BYTES``, ``TUNEFORGE_SERVING_URL``, ...
"""

from __future__ import annotations

import functools

from pydantic import Field

from scheduler.settings import Settings


class ApiSettings(Settings):
    # OpenAI accepts fine-tuning files up to 512 MB; larger uploads are refused while streaming.
    max_upload_bytes: int = Field(512 * 1024 * 1024, ge=1)
    # OpenAI's Uploads (larger files, in parts): at most 64 MB a part and 8 GB a file.
    max_upload_part_bytes: int = Field(64 * 1024 * 1024, ge=1)
    max_chunked_upload_bytes: int = Field(8 * 1024 * 1024 * 1024, ge=1)
    # The serving gateway that inference routes (/v1/chat/completions, /v1/models, ...) go to.
    serving_url: str = "http://127.0.0.1:8001"
    # Generation can stream for minutes; connecting must not take long.
    proxy_connect_timeout_s: float = Field(5.0, gt=0)
    proxy_read_timeout_s: float = Field(600.0, gt=0)
    log_level: str = "INFO"
    json_logs: bool = True


@functools.lru_cache
def get_settings() -> ApiSettings:
    return ApiSettings()
