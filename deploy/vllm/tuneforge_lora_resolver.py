"""A vLLM LoRA resolver plugin (``vllm.lora.resolver.LoRAResolver``): when a request names an ``ft:``
adapter that the replica does not have, vLLM asks the registered resolvers; this one finds the name in
the adapter index in object storage (``serving.vllm_plugin.index``), downloads the PEFT folder into a
local cache and returns the ``LoRARequest``. vLLM then loads it into its LRU of ``--max-loras`` slots.

Runs inside vLLM's process, so it lives outside the ``serving`` package (which must never import
vllm): install this folder into the vLLM image next to Tuneforge (``pip install deploy/vllm``; its
pyproject declares the ``vllm.general_plugins`` entry point) and run vLLM with
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=true VLLM_PLUGINS=tuneforge_lora_resolver`` (``serving.vllm_plugin.
config.vllm_env``). Settings: ``TUNEFORGE_STORAGE_URL`` (the object store), ``TUNEFORGE_LORA_CACHE_DIR``
and ``TUNEFORGE_BASE_MODEL`` (the platform's name of the base this replica serves, when vLLM's
``--model`` is a local path). The CPU tests exercise ``TuneforgeResolver.find``; inside a real vLLM it
runs in ``tests/serving/test_vllm_gpu.py``.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os

from gpu_worker.storage import open_store
from serving.vllm_plugin import index

log = logging.getLogger(__name__)
RESOLVER_NAME = "tuneforge"


def lora_int_id(name: str) -> int:
    """A stable positive id per name (vLLM keys its adapter slots by it; Python's hash() is salted)."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:7], "big") + 1


class TuneforgeResolver:
    def __init__(self, storage_url: str, cache_dir: str, served_base: str | None = None):
        self.store = open_store(storage_url)
        self.cache_dir = cache_dir
        # vLLM names the base by its --model (often a local path); the index by the platform's base model
        # name, which this replica serves as --served-model-name (TUNEFORGE_BASE_MODEL).
        self.served_base = served_base

    async def find(self, base_model_name: str, lora_name: str) -> tuple[str, int, str] | None:
        """(lora_name, lora_int_id, local path) for an adapter of ``base_model_name``, or None."""
        entry = await asyncio.to_thread(index.lookup, self.store, lora_name)
        if entry is None or entry.base_model not in (base_model_name, self.served_base):
            return None
        try:
            path = await asyncio.to_thread(index.fetch, self.store, entry, self.cache_dir)
        except (ValueError, OSError, KeyError) as err:
            log.warning("tuneforge resolver: cannot fetch %s: %s", lora_name, err)
            return None
        return lora_name, lora_int_id(lora_name), str(path)


def register() -> None:
    """vLLM's general-plugin entry point: register the resolver (imports vllm, so only vLLM calls it)."""
    from vllm.lora.request import LoRARequest
    from vllm.lora.resolver import LoRAResolver, LoRAResolverRegistry

    storage_url = os.environ.get("TUNEFORGE_STORAGE_URL")
    if not storage_url:
        log.warning("TUNEFORGE_STORAGE_URL is not set: the tuneforge LoRA resolver is not registered")
        return

    class _Resolver(LoRAResolver):
        def __init__(self):
            self._impl = TuneforgeResolver(
                storage_url, os.environ.get("TUNEFORGE_LORA_CACHE_DIR", "/tmp/tuneforge-loras"), os.environ.get("TUNEFORGE_BASE_MODEL") or None
            )

        async def resolve_lora(self, base_model_name: str, lora_name: str):
            found = await self._impl.find(base_model_name, lora_name)
            if found is None:
                return None
            name, int_id, path = found
            return LoRARequest(lora_name=name, lora_int_id=int_id, lora_path=path)

    LoRAResolverRegistry.register_resolver(RESOLVER_NAME, _Resolver())
