"""The inference engine replicas behind the gateway and how a request reaches one.

Engines speak vLLM's OpenAI API. For a fine-tuned model the adapter must be loaded on the replica
first (``POST /v1/load_lora_adapter``). The pool remembers what each replica has loaded (and
re-reads it from the engines' ``/v1/models``, so a restarted gateway or one of several knows too),
loads an adapter at most once per replica even when many first requests arrive together (a lock per
(replica, adapter)), prefers a replica that already has it, and reloads when an engine answers 404
for it (the engine restarted or evicted it). A replica that refuses connections is skipped for a
while and the next one is tried; when none answers the caller gets ``EngineUnavailable`` (503).

All replicas share one ``aiohttp.ClientSession`` (one keep-alive connection pool for the process).
aiohttp rather than httpx on this hop: measured on the 2-core dev machine, an engine round trip cost
the gateway 1.2 ms of CPU through httpx's connection pool and 0.09 ms through aiohttp
(``bench/results/serving-results.md``), and this hop is on every request.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import aiohttp
import structlog

from serving.errors import EngineError, EngineRejected, EngineTimeout, EngineUnavailable
from serving.registry import AdapterRef, ResolvedModel

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class Timeouts:
    connect_s: float
    read_s: float  # longest silence between two reads of an answer
    load_s: float  # an adapter load or check (fetching from object storage)


class UpstreamBroken(Exception):
    """The engine's answer broke off (connection lost, malformed framing) after its status line."""


class UpstreamTimeout(UpstreamBroken):
    """The engine went silent for longer than the read timeout."""


# An SSE line longer than this (a chunk with huge logprobs) is an engine error, not a gateway crash.
_MAX_LINE = 1 << 22


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
    """An engine's answer whose status was OK; the caller reads or streams the body, then closes it.
    Read failures surface as ``UpstreamBroken``/``UpstreamTimeout`` whatever the HTTP client."""

    def __init__(self, replica: Replica, response: aiohttp.ClientResponse):
        self.replica = replica
        self.response = response
        self._closed = False

    async def read(self) -> bytes:
        try:
            return await self.response.read()
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout("the engine went silent") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamBroken(repr(exc)) from exc

    async def aiter_lines(self):
        """The body's lines, without their line endings."""
        try:
            async for line in self.response.content:
                yield line.decode().rstrip("\r\n")
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout("the engine went silent") from exc
        except (aiohttp.ClientError, ValueError, UnicodeDecodeError) as exc:  # ValueError: a line over the limit
            raise UpstreamBroken(repr(exc)) from exc

    async def read_some(self) -> bytes:
        """What the engine sent since the last read (b"" at the end). ``readany`` consumes nothing until it
        returns, so a read cancelled by a leaving client loses no byte."""
        try:
            return await self.response.content.readany()
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise UpstreamTimeout("the engine went silent") from exc
        except aiohttp.ClientError as exc:
            raise UpstreamBroken(repr(exc)) from exc

    def half_close(self) -> bool:
        """Tell the engine the client is gone while still reading its answer: end our side of the
        connection (uvicorn, vLLM's server, treats it as a disconnect). True when the rest of the answer
        can then be read without waiting for the whole generation: also when the engine's answer has
        already ended (it arrived whole and waits unread in the buffer, where aiohttp has let the
        connection go, or the connection is closing). False if the engine cannot be told."""
        if self.response.content.is_eof():
            return True
        transport = getattr(getattr(self.response, "connection", None), "transport", None)
        if transport is not None and transport.is_closing():
            return True
        if transport is None or not transport.can_write_eof():
            return False
        try:
            transport.write_eof()
        except (OSError, RuntimeError):
            return False
        return True

    @property
    def closed(self) -> bool:
        return self._closed

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.replica.inflight -= 1
        if self.response.content.at_eof():
            self.response.release()  # fully read: the connection goes back to the pool
        else:
            # Closing a stream early drops the connection, which makes vLLM abort the generation.
            self.response.close()


def engine_param_and_code(body: bytes) -> tuple[str | None, str | None]:
    """The field and the error code an engine's error body names (``{"error": {"param", "code"}}``).
    Only string codes: vLLM puts the HTTP status there, which is not an OpenAI code."""
    try:
        error = json.loads(body).get("error")
    except (ValueError, AttributeError):
        return None, None
    if not isinstance(error, dict):
        return None, None
    param, code = error.get("param"), error.get("code")
    return (param if isinstance(param, str) and param else None), (code if isinstance(code, str) and code else None)


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
        timeouts: Timeouts,
        cooldown_s: float,
        refresh_s: float = 10.0,
        on_adapter_load: Callable[[str], None] = lambda base: None,
        resolves_adapters: bool = False,
    ):
        self._replicas = {base: [Replica(base, url) for url in urls] for base, urls in engines.items()}
        self._timeouts = timeouts
        self._cooldown_s = cooldown_s
        self._on_adapter_load = on_adapter_load
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._turn = itertools.count()
        self._client: aiohttp.ClientSession | None = None
        self._refresh_s = refresh_s
        self._refreshed: dict[str, float] = {}  # base -> monotonic time of the last look at its replicas
        self._refreshing: dict[str, asyncio.Task] = {}
        # vLLM: the engine loads an ``ft:`` name itself, from object storage, when a request names it
        # (the resolver plugin, deploy/vllm); the gateway never sends it a path. The built-in engine:
        # the gateway loads the adapter first (``/v1/load_lora_adapter`` with a ``store:`` path).
        self.resolves_adapters = resolves_adapters

    @property
    def client(self) -> aiohttp.ClientSession:
        # Created on first use so that it belongs to the server's event loop.
        if self._client is None or self._client.closed:
            self._client = aiohttp.ClientSession(
                # No cap on connections (back-pressure is the engines' 503); idle ones kept for reuse.
                # Idle connections are dropped before the engine drops them (vLLM's uvicorn closes an idle
                # keep-alive connection after 5 s): a request never goes out on one closing under it.
                connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=4),
                timeout=self._timeout(self._timeouts.read_s),
                read_bufsize=_MAX_LINE,
                max_line_size=_MAX_LINE,
                max_field_size=_MAX_LINE,
                auto_decompress=False,  # relayed as sent
                raise_for_status=False,
            )
        return self._client

    def _timeout(self, read_s: float) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=None, connect=self._timeouts.connect_s, sock_read=read_s)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
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
        if target.adapter is not None:
            await self._know_loaded(target.base)
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
            response = await self._send(replica, replica.url + path, payload, headers={"X-Request-Id": request_id})
            if 200 <= response.status < 300:
                replica.down_until = 0.0
                if target.adapter is not None and self.resolves_adapters and target.adapter.id not in replica.loaded:
                    replica.loaded.add(target.adapter.id)  # the engine resolved and loaded it
                    self._on_adapter_load(replica.base)
                return Upstream(replica, response)
            body = await self._drain(response)
            if response.status == 404 and target.adapter is not None and self.resolves_adapters:
                # The engine's resolver did not find the name in the adapter index: the registry and
                # the index disagree, which is the platform's fault, not the caller's.
                replica.loaded.discard(target.adapter.id)
                log.error("engine could not resolve the adapter", engine=replica.url, adapter=target.adapter.id, message=engine_message(body))
                raise EngineError(f"The inference engine could not load model `{target.adapter.id}`.")
            if response.status == 404 and target.adapter is not None and attempt == 0:
                # The engine does not know the adapter although we loaded it: it restarted or evicted
                # it. Load it again and retry once.
                log.info("engine forgot the adapter; reloading", engine=replica.url, adapter=target.adapter.id)
                replica.loaded.discard(target.adapter.id)
                continue
            raise self._rejection(replica, target, response.status, body, path)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    async def _know_loaded(self, base: str) -> None:
        """Keep each replica's ``loaded`` set close to the engine's own list, so that a gateway that
        restarted, or one of several, routes a fine-tuned model to a replica that already holds it
        instead of loading it on another. The first request for an adapter of ``base`` waits for the
        first look; later looks run in the background every ``refresh_s``."""
        last = self._refreshed.get(base)
        if last is not None and time.monotonic() - last < self._refresh_s:
            return
        task = self._refreshing.get(base)
        if task is None or task.done():
            self._refreshed[base] = time.monotonic()
            task = self._refreshing[base] = asyncio.create_task(self._refresh_loaded(base))
        if last is None:
            await asyncio.shield(task)

    async def _refresh_loaded(self, base: str) -> None:
        """GET /v1/models on every replica of ``base``: vLLM and the built-in engine list each loaded
        adapter with its ``parent``. A replica that does not answer keeps what we knew."""
        for replica in self._replicas.get(base, []):
            try:
                async with self.client.get(replica.url + "/v1/models", timeout=self._timeout(self._timeouts.connect_s)) as response:
                    if response.status != 200:
                        continue
                    data = await response.json(content_type=None)
            except (asyncio.TimeoutError, aiohttp.ClientError, ValueError):
                continue
            cards = data.get("data") if isinstance(data, dict) else None
            if isinstance(cards, list):
                replica.loaded = {c["id"] for c in cards if isinstance(c, dict) and c.get("parent") and isinstance(c.get("id"), str)}

    async def _send(self, replica: Replica, url: str, payload: Any, *, headers: dict | None = None, read_s: float | None = None) -> aiohttp.ClientResponse:
        """POST ``payload`` as JSON; the response once its status line and headers are in."""
        options = {"timeout": self._timeout(read_s)} if read_s is not None else {}
        try:
            return await self.client.post(url, json=payload, headers=headers, **options)
        except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
            log.warning("engine unreachable", engine=replica.url, error=repr(exc))
            raise _ReplicaUnavailable(reachable=False) from exc
        except (asyncio.TimeoutError, aiohttp.ServerTimeoutError) as exc:
            raise EngineTimeout("The inference engine did not answer in time.") from exc
        except aiohttp.ClientError as exc:
            log.warning("engine connection failed", engine=replica.url, error=repr(exc))
            raise EngineError("The inference engine closed the connection unexpectedly.") from exc

    async def _drain(self, response: aiohttp.ClientResponse) -> bytes:
        """The (short) body of an answer that is not relayed; the connection goes back to the pool."""
        try:
            return await response.read()
        except (asyncio.TimeoutError, aiohttp.ClientError) as exc:
            raise EngineError("The inference engine closed the connection unexpectedly.") from exc
        finally:
            response.release()

    def _rejection(self, replica: Replica, target: ResolvedModel, status: int, body: bytes, path: str) -> Exception:
        message = engine_message(body)
        if path == "/v1/embeddings" and status in (404, 405, 501):
            # vLLM serves /v1/embeddings only for a model run as a pooling model; a generative one has no
            # such route. Only a model's engine knows, so this is the client's 400, not a broken engine.
            return EngineRejected(400, f"The model `{target.name}` does not support embeddings.")
        if status == 503:
            log.warning("engine overloaded or starting", engine=replica.url, message=message)
            return _ReplicaUnavailable(reachable=True)
        if 400 <= status < 500 and status not in (401, 403, 404):
            return EngineRejected(400 if status == 422 else status, message, *engine_param_and_code(body))
        # 404 for a base model, 401/403 or a 5xx: the deployment is wrong or the engine broke; that
        # is not the client's fault, and the engine's internals are not the client's business.
        log.error("engine failed", engine=replica.url, status=status, model=target.name, message=message)
        return EngineError(f"The inference engine failed to serve model `{target.name}`.")

    async def _ensure_adapter(self, replica: Replica, adapter: AdapterRef) -> None:
        if adapter.id in replica.loaded or self.resolves_adapters:
            return
        lock = self._locks.setdefault((replica.url, adapter.id), asyncio.Lock())
        async with lock:
            if adapter.id in replica.loaded:  # a concurrent request loaded it while we waited
                return
            await self._load(replica, adapter)
            replica.loaded.add(adapter.id)

    async def _load(self, replica: Replica, adapter: AdapterRef) -> None:
        started = time.monotonic()
        payload = {"lora_name": adapter.id, "lora_path": adapter.lora_path}
        response = await self._send(replica, replica.url + "/v1/load_lora_adapter", payload, read_s=self._timeouts.load_s)
        body = await self._drain(response)
        if 200 <= response.status < 300:
            self._on_adapter_load(replica.base)
            log.info("adapter loaded", engine=replica.url, adapter=adapter.id, duration_ms=round((time.monotonic() - started) * 1000))
            return
        message = engine_message(body)
        # vLLM refuses a second load of a name it already has (we restarted, it did not): fine.
        if response.status == 400 and "already" in message.lower():
            return
        if response.status == 503:
            raise _ReplicaUnavailable(reachable=True)
        log.error("adapter load failed", engine=replica.url, adapter=adapter.id, status=response.status, message=message)
        raise EngineError(f"The inference engine could not load model `{adapter.id}`.")

    async def check_adapter(self, base: str, lora_path: str) -> tuple[int, Any]:
        """Ask a replica of ``base`` to verify an adapter (``/v1/tuneforge/check_adapter``, built-in engine
        only): (status, JSON body). 404 means the engine has no such route (vLLM)."""
        return await self.post_json(base, "/v1/tuneforge/check_adapter", {"lora_path": lora_path}, what="check the adapter")

    async def post_json(self, base: str, path: str, payload: dict[str, Any], *, what: str, adapter_id: str | None = None) -> tuple[int, Any]:
        """POST to the first replica of ``base`` that takes it and return (status, JSON body); for the
        registry's own requests (checks), not relayed to a client. 503 or unreachable: the next one.
        ``adapter_id``: the request names that adapter (vLLM loads it for it): prefer a replica that has
        it, and remember the one that answered as holding it."""
        target = ResolvedModel(name=base, base=base, adapter=AdapterRef(adapter_id, storage_key="") if adapter_id else None)
        for replica in self._candidates(target):
            try:
                response = await self._send(replica, replica.url + path, payload, read_s=self._timeouts.load_s)
            except _ReplicaUnavailable:
                continue
            body = await self._drain(response)
            if response.status == 503:
                continue
            if adapter_id and self.resolves_adapters and response.status == 200:
                replica.loaded.add(adapter_id)
            try:
                return response.status, json.loads(body)
            except ValueError:
                return response.status, {"error": {"message": engine_message(body)}}
        raise EngineUnavailable(f"No inference engine for model `{base}` is reachable to {what}.")

    async def unload_everywhere(self, base: str, adapter_id: str) -> list[str]:
        """Tell every replica of ``base`` to drop ``adapter_id`` (deleted or demoted); the replicas that
        could not be told (down: they lose it on restart anyway). Unknown-to-the-engine is fine."""
        missed = []
        for replica in self.replicas(base):
            replica.loaded.discard(adapter_id)
            try:
                response = await self._send(replica, replica.url + "/v1/unload_lora_adapter", {"lora_name": adapter_id})
                body = await self._drain(response)
            except (_ReplicaUnavailable, EngineError, EngineTimeout) as exc:
                log.warning("could not unload adapter", engine=replica.url, adapter=adapter_id, error=repr(exc))
                missed.append(replica.url)
                continue
            if response.status not in (200, 404) and not (response.status == 400 and "not" in engine_message(body).lower()):
                log.warning("engine refused to unload adapter", engine=replica.url, adapter=adapter_id, status=response.status)
                missed.append(replica.url)
        return missed
