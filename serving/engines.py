"""The inference engine replicas behind the gateway and how a request reaches one.

Engines speak vLLM's OpenAI API. For a fine-tuned model the adapter must be loaded on the replica
first (``POST /v1/load_lora_adapter``). The pool remembers what each replica has loaded, loads an
adapter at most once per replica even when many first requests arrive together (a lock per
(replica, adapter)), prefers a replica that already has it, and reloads when an engine answers 404
for it (the engine restarted or evicted it). A replica that refuses connections is skipped for a
while and the next one is tried; when none answers the caller gets ``EngineUnavailable`` (503).

All replicas share one ``httpx.AsyncClient`` (one connection pool for the process).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import httpx
import structlog

from serving.errors import EngineError, EngineRejected, EngineTimeout, EngineUnavailable
from serving.registry import AdapterRef, ResolvedModel

log = structlog.get_logger(__name__)


@dataclass
class Replica:
    base: str
    url: str
    loaded: set[str] = field(default_factory=set)  # adapter ids this replica has (as far as we know)
    inflight: int = 0
    down_until: float = 0.0  # monotonic time; tried last until then


class _ReplicaUnavailable(Exception):
    """This replica cannot take the request now; the next one may. ``reachable`` is False when it
    refused the connection (restarting: whatever it had loaded is gone) and True when it answered
    503 (overloaded or still starting: its adapters are still there)."""

    def __init__(self, reachable: bool):
        super().__init__("reachable" if reachable else "unreachable")
        self.reachable = reachable


class Upstream:
    """An engine's answer whose status was OK; the caller reads or streams the body, then closes it."""

    def __init__(self, replica: Replica, response: httpx.Response):
        self.replica = replica
        self.response = response
        self._closed = False

    async def read(self) -> bytes:
        return await self.response.aread()

    def aiter_lines(self):
        return self.response.aiter_lines()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.replica.inflight -= 1
        # Closing a stream early drops the connection, which makes vLLM abort the generation.
        await self.response.aclose()


def engine_message(body: bytes) -> str:
    """The human message in an engine's error body (vLLM has used a few shapes over time)."""
    try:
        data = json.loads(body)
    except ValueError:
        return body[:300].decode(errors="replace") or "(empty response)"
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict) and error.get("message"):
            return str(error["message"])
        for key in ("message", "detail"):
            if data.get(key):
                return str(data[key])
    return str(data)[:300]


class EnginePool:
    def __init__(
        self,
        engines: dict[str, list[str]],
        *,
        timeout: httpx.Timeout,
        load_timeout: float,
        cooldown_s: float,
        on_adapter_load: Callable[[str], None] = lambda base: None,
    ):
        self._replicas = {base: [Replica(base, url) for url in urls] for base, urls in engines.items()}
        self._timeout = timeout
        self._load_timeout = load_timeout
        self._cooldown_s = cooldown_s
        self._on_adapter_load = on_adapter_load
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._turn = itertools.count()
        self._client: httpx.AsyncClient | None = None

    @property
    def client(self) -> httpx.AsyncClient:
        # Created on first use so that it belongs to the server's event loop.
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self._timeout, limits=httpx.Limits(max_connections=None, max_keepalive_connections=100))
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def replicas(self, base: str) -> list[Replica]:
        return list(self._replicas.get(base, ()))

    def _candidates(self, target: ResolvedModel) -> list[Replica]:
        replicas = self._replicas.get(target.base, [])
        if not replicas:
            return []
        # Rotate the starting point so that ties spread over replicas, then prefer: reachable, already
        # holding the adapter (a load costs seconds), least busy.
        start = next(self._turn) % len(replicas)
        rotated = replicas[start:] + replicas[:start]
        now = time.monotonic()
        adapter_id = target.adapter.id if target.adapter else None
        return sorted(rotated, key=lambda r: (r.down_until > now, adapter_id is not None and adapter_id not in r.loaded, r.inflight))

    async def open(self, target: ResolvedModel, path: str, payload: dict[str, Any], *, request_id: str) -> Upstream:
        """Send the request to the best replica (the next one if it is unreachable) and return the
        engine's answer once its status line is in. Raises a ServingError for any failure."""
        candidates = self._candidates(target)
        if not candidates:
            raise EngineUnavailable(f"No inference engine is configured for model `{target.base}`.")
        for replica in candidates:
            replica.inflight += 1
            try:
                return await self._open_on(replica, target, path, payload, request_id)
            except _ReplicaUnavailable as exc:
                replica.inflight -= 1
                replica.down_until = time.monotonic() + self._cooldown_s
                if not exc.reachable:
                    replica.loaded.clear()
            except BaseException:
                replica.inflight -= 1
                raise
        raise EngineUnavailable(f"No inference engine for model `{target.base}` is reachable right now; try again shortly.")

    async def _open_on(self, replica: Replica, target: ResolvedModel, path: str, payload: dict[str, Any], request_id: str) -> Upstream:
        for attempt in range(2):
            if target.adapter is not None:
                await self._ensure_adapter(replica, target.adapter)
            request = self.client.build_request("POST", replica.url + path, json=payload, headers={"X-Request-Id": request_id})
            response = await self._send(replica, request)
            if response.is_success:
                replica.down_until = 0.0
                return Upstream(replica, response)
            body = await response.aread()
            await response.aclose()
            if response.status_code == 404 and target.adapter is not None and attempt == 0:
                # The engine does not know the adapter although we loaded it: it restarted or evicted
                # it. Load it again and retry once.
                log.info("engine forgot the adapter; reloading", engine=replica.url, adapter=target.adapter.id)
                replica.loaded.discard(target.adapter.id)
                continue
            raise self._rejection(replica, target, response.status_code, body)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def _send(self, replica: Replica, request: httpx.Request) -> httpx.Response:
        try:
            return await self.client.send(request, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            log.warning("engine unreachable", engine=replica.url, error=repr(exc))
            raise _ReplicaUnavailable(reachable=False) from exc
        except httpx.TimeoutException as exc:
            raise EngineTimeout("The inference engine did not answer in time.") from exc
        except httpx.HTTPError as exc:
            log.warning("engine connection failed", engine=replica.url, error=repr(exc))
            raise EngineError("The inference engine closed the connection unexpectedly.") from exc

    def _rejection(self, replica: Replica, target: ResolvedModel, status: int, body: bytes) -> Exception:
        message = engine_message(body)
        if status == 503:
            log.warning("engine overloaded or starting", engine=replica.url, message=message)
            return _ReplicaUnavailable(reachable=True)
        if 400 <= status < 500 and status not in (401, 403, 404):
            return EngineRejected(400 if status == 422 else status, message)
        # 404 for a base model, 401/403 or a 5xx: the deployment is wrong or the engine broke; that
        # is not the client's fault, and the engine's internals are not the client's business.
        log.error("engine failed", engine=replica.url, status=status, model=target.name, message=message)
        return EngineError(f"The inference engine failed to serve model `{target.name}`.")

    async def _ensure_adapter(self, replica: Replica, adapter: AdapterRef) -> None:
        if adapter.id in replica.loaded:
            return
        lock = self._locks.setdefault((replica.url, adapter.id), asyncio.Lock())
        async with lock:
            if adapter.id in replica.loaded:  # a concurrent request loaded it while we waited
                return
            await self._load(replica, adapter)
            replica.loaded.add(adapter.id)

    async def _load(self, replica: Replica, adapter: AdapterRef) -> None:
        request = self.client.build_request(
            "POST",
            replica.url + "/v1/load_lora_adapter",
            json={"lora_name": adapter.id, "lora_path": adapter.lora_path},
            timeout=httpx.Timeout(self._timeout.connect, read=self._load_timeout, write=self._load_timeout, pool=self._timeout.pool),
        )
        started = time.monotonic()
        response = await self._send(replica, request)
        body = await response.aread()
        await response.aclose()
        if response.is_success:
            self._on_adapter_load(replica.base)
            log.info("adapter loaded", engine=replica.url, adapter=adapter.id, duration_ms=round((time.monotonic() - started) * 1000))
            return
        message = engine_message(body)
        # vLLM refuses a second load of a name it already has (we restarted, it did not): fine.
        if response.status_code == 400 and "already" in message.lower():
            return
        if response.status_code == 503:
            raise _ReplicaUnavailable(reachable=True)
        log.error("adapter load failed", engine=replica.url, adapter=adapter.id, status=response.status_code, message=message)
        raise EngineError(f"The inference engine could not load model `{adapter.id}`.")

    async def check_adapter(self, base: str, lora_path: str) -> tuple[int, Any]:
        """Ask a replica of ``base`` to verify an adapter (``/v1/tuneforge/check_adapter``, built-in engine
        only): (status, JSON body). 404 means the engine has no such route (vLLM)."""
        for replica in self._candidates(ResolvedModel(name=base, base=base)):
            request = self.client.build_request(
                "POST",
                replica.url + "/v1/tuneforge/check_adapter",
                json={"lora_path": lora_path},
                timeout=httpx.Timeout(self._timeout.connect, read=self._load_timeout, write=self._load_timeout, pool=self._timeout.pool),
            )
            try:
                response = await self._send(replica, request)
            except _ReplicaUnavailable:
                continue
            body = await response.aread()
            await response.aclose()
            if response.status_code == 503:
                continue
            try:
                return response.status_code, json.loads(body)
            except ValueError:
                return response.status_code, {"error": {"message": engine_message(body)}}
        raise EngineUnavailable(f"No inference engine for model `{base}` is reachable to check the adapter.")

    async def unload_everywhere(self, base: str, adapter_id: str) -> list[str]:
        """Tell every replica of ``base`` to drop ``adapter_id`` (deleted or demoted); the replicas that
        could not be told (down: they lose it on restart anyway). Unknown-to-the-engine is fine."""
        missed = []
        for replica in self.replicas(base):
            replica.loaded.discard(adapter_id)
            try:
                response = await self.client.post(replica.url + "/v1/unload_lora_adapter", json={"lora_name": adapter_id})
            except httpx.HTTPError as exc:
                log.warning("could not unload adapter", engine=replica.url, adapter=adapter_id, error=repr(exc))
                missed.append(replica.url)
                continue
            if response.status_code not in (200, 404) and not (response.status_code == 400 and "not" in engine_message(response.content).lower()):
                log.warning("engine refused to unload adapter", engine=replica.url, adapter=adapter_id, status=response.status_code)
                missed.append(replica.url)
        return missed
