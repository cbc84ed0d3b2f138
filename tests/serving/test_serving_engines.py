"""The engine pool seen from the engines: an adapter is loaded once per replica (also when many first
requests race), replicas that hold it are preferred, a restarted engine gets it again, and engines
that are down or broken give the client a clear OpenAI-shaped error, never a traceback."""

from __future__ import annotations

import asyncio
import socket

import openai
import pytest

from scheduler.settings import BUILTIN_BASE_MODEL

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "hello there"}]


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


async def _concurrent_chats(client: openai.AsyncOpenAI, model: str, n: int) -> list[str]:
    async with client:
        answers = await asyncio.gather(*(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2) for _ in range(n)))
    return [a.choices[0].message.content for a in answers]


def test_concurrent_first_requests_load_the_adapter_once(engines, gateway, make_org, make_adapter):
    engine = engines(load_delay_s=0.3)  # a slow load keeps the race window open
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    org, key = make_org()
    model = make_adapter(org)

    contents = asyncio.run(_concurrent_chats(gw.async_client(key), model, 8))

    assert contents == [f"{model} hello"] * 8
    assert engine.state.load_calls == {model: 1}
    assert engine.state.served == [model] * 8


def test_concurrent_first_requests_load_at_most_once_per_replica(engines, gateway, make_org, make_adapter):
    replicas = [engines(load_delay_s=0.3), engines(load_delay_s=0.3)]
    gw = gateway({BUILTIN_BASE_MODEL: [r.url for r in replicas]})
    org, key = make_org()
    model = make_adapter(org)

    contents = asyncio.run(_concurrent_chats(gw.async_client(key), model, 8))

    assert contents == [f"{model} hello"] * 8
    assert all(r.state.load_calls[model] <= 1 for r in replicas)
    assert sum(len(r.state.served) for r in replicas) == 8


def test_a_replica_that_has_the_adapter_is_preferred(engines, gateway, make_org, make_adapter):
    replicas = [engines(), engines()]
    gw = gateway({BUILTIN_BASE_MODEL: [r.url for r in replicas]})
    org, key = make_org()
    model = make_adapter(org)
    client = gw.client(key)

    for _ in range(6):
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=1)

    holders = [r for r in replicas if r.state.load_calls[model]]
    assert len(holders) == 1 and holders[0].state.load_calls[model] == 1
    assert holders[0].state.served == [model] * 6


def test_a_fresh_gateway_finds_the_replica_that_already_holds_the_adapter(engines, gateway, make_org, make_adapter):
    """Another gateway (or this one before a restart) loaded it on the second replica: this gateway
    reads that from the engines' /v1/models and loads nothing."""
    replicas = [engines(), engines()]
    org, key = make_org()
    model = make_adapter(org)
    replicas[1].state.loaded[model] = "store:adapters/elsewhere"
    gw = gateway({BUILTIN_BASE_MODEL: [r.url for r in replicas]})

    for _ in range(4):
        gw.client(key).chat.completions.create(model=model, messages=MESSAGES, max_tokens=1)

    assert replicas[1].state.served == [model] * 4 and replicas[0].state.served == []
    assert sum(r.state.load_requests[model] for r in replicas) == 0


def test_base_model_requests_spread_over_replicas(engines, gateway, make_org):
    replicas = [engines(), engines()]
    gw = gateway({BUILTIN_BASE_MODEL: [r.url for r in replicas]})
    _, key = make_org()
    client = gw.client(key)

    for _ in range(6):
        client.completions.create(model=BUILTIN_BASE_MODEL, prompt="x", max_tokens=1)

    assert [len(r.state.served) for r in replicas] == [3, 3]


def test_the_adapter_is_reloaded_after_an_engine_restart(engines, gateway, make_org, make_adapter):
    engine = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    org, key = make_org()
    model = make_adapter(org)
    client = gw.client(key)
    client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=1)

    engine.restart()
    answer = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)

    assert answer.choices[0].message.content == f"{model} hello"
    assert engine.state.load_calls == {model: 1}  # the fresh engine's own count


def test_the_adapter_is_reloaded_after_the_engine_forgot_it(engines, gateway, make_org, make_adapter):
    engine = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]})
    org, key = make_org()
    model = make_adapter(org)
    client = gw.client(key)
    client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=1)
    with gw.http() as http:  # the engine evicts the adapter behind the gateway's back
        assert http.post(engine.url + "/v1/unload_lora_adapter", json={"lora_name": model}).status_code == 200

    chunks = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2, stream=True))

    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == f"{model} hello"
    assert engine.state.load_calls == {model: 2}


def test_engine_down_is_503_in_openai_shape(gateway, make_org):
    gw = gateway({BUILTIN_BASE_MODEL: [_closed_port_url()]})
    _, key = make_org()

    with pytest.raises(openai.InternalServerError) as err:
        gw.client(key).chat.completions.with_raw_response.create(
            model=BUILTIN_BASE_MODEL, messages=MESSAGES, extra_headers={"x-request-id": "down-1"}
        )

    response = err.value.response
    assert response.status_code == 503
    assert response.headers["x-request-id"] == "down-1"
    assert response.headers["retry-after"] == "1"
    error = response.json()["error"]
    assert error["code"] == "engine_unavailable" and BUILTIN_BASE_MODEL in error["message"]
    assert "127.0.0.1" not in error["message"]  # the engines' addresses are not the client's business


def test_a_base_model_without_engines_is_503(gateway, make_org):
    gw = gateway({})
    _, key = make_org()

    with pytest.raises(openai.InternalServerError) as err:
        gw.client(key).completions.create(model=BUILTIN_BASE_MODEL, prompt="x")

    assert err.value.status_code == 503 and err.value.body["code"] == "engine_unavailable"


def test_a_dead_replica_is_skipped_for_a_live_one(engines, gateway, make_org, make_adapter):
    live = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [_closed_port_url(), live.url]})
    org, key = make_org()
    model = make_adapter(org)
    client = gw.client(key)

    for _ in range(3):
        assert client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=1).choices[0].message.content == model

    assert live.state.served == [model] * 3


def test_an_overloaded_replica_is_skipped_and_a_broken_one_is_502(engines, gateway, make_org):
    overloaded, healthy = engines(fail_status=503), engines()
    _, key = make_org()
    assert gateway({BUILTIN_BASE_MODEL: [overloaded.url, healthy.url]}).client(key).completions.create(
        model=BUILTIN_BASE_MODEL, prompt="x", max_tokens=1
    ).choices[0].text == BUILTIN_BASE_MODEL

    broken = engines(fail_status=500)
    with pytest.raises(openai.APIStatusError) as err:
        gateway({BUILTIN_BASE_MODEL: [broken.url]}).client(key).completions.create(model=BUILTIN_BASE_MODEL, prompt="x")

    assert err.value.status_code == 502
    assert err.value.body["code"] == "engine_error"
    assert "injected" not in err.value.body["message"]



def test_an_overloaded_replica_keeps_its_adapters(engines, gateway, make_org, make_adapter):
    replicas = [engines(), engines()]
    gw = gateway({BUILTIN_BASE_MODEL: [r.url for r in replicas]}, replica_cooldown_s=0)
    org, key = make_org()
    model = make_adapter(org)
    client = gw.client(key)
    client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=1)
    [holder] = [r for r in replicas if r.state.load_calls[model]]
    [other] = [r for r in replicas if r is not holder]

    holder.state.fail_status = 503  # overloaded: it answers, just not now
    client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=1)
    holder.state.fail_status, other.state.fail_status = None, 503
    client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=1)

    assert other.state.served == [model]  # the overloaded replica's request went elsewhere
    assert holder.state.served == [model, model]
    assert holder.state.load_requests[model] == 1  # the gateway knew it still had the adapter


def test_a_replica_that_refused_connections_gets_its_adapters_again_before_use(engines, gateway, make_org, make_adapter):
    engine = engines()
    gw = gateway({BUILTIN_BASE_MODEL: [engine.url]}, replica_cooldown_s=0)
    org, key = make_org()
    model = make_adapter(org)
    client = gw.client(key)
    client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=1)

    engine.stop()
    with pytest.raises(openai.InternalServerError):
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=1)
    engine.start()
    answer = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=1)

    assert answer.choices[0].message.content == model
    # Loaded before the first request: the gateway knew the replica had been gone.
    assert engine.state.load_calls == {model: 1} and engine.state.not_found == 0
