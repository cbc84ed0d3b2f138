"""The gateway in front of vLLM engines (``engine_kind="vllm"``), with the fake vLLM behaving as vLLM with
Tuneforge's resolver plugin: adapters are loaded by the engine from object storage when a request names
them, never from a path the gateway sends; the compatibility check scores the training-side reference
prompts through vLLM's ``prompt_logprobs``; a restarted replica finds its adapters again by itself.
The same flow inside a real vLLM on a GPU: tests/serving/test_vllm_gpu.py."""

from __future__ import annotations

import json

import openai
import pytest
import torch
from safetensors.torch import save_file

from gpu_worker.storage import LocalStore
from scheduler.settings import BUILTIN_BASE_MODEL
from serving.vllm_plugin import index

pytestmark = pytest.mark.integration

MESSAGES = [{"role": "user", "content": "hi there"}]


def _put_adapter_with_reference(store: LocalStore, prefix: str, tmp_path) -> None:
    config = {"peft_type": "LORA", "r": 8, "target_modules": ["q_proj", "v_proj"], "base_model_name_or_path": BUILTIN_BASE_MODEL}
    store.put_bytes(f"{prefix}/adapter_config.json", json.dumps(config).encode())
    weights = {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.zeros(8, 64),
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.zeros(64, 8),
    }
    save_file(weights, str(tmp_path / "w.safetensors"))
    store.put_bytes(f"{prefix}/adapter_model.safetensors", (tmp_path / "w.safetensors").read_bytes())
    gen = torch.Generator().manual_seed(0)
    reference = {}
    for i, length in enumerate((5, 3)):
        logits = torch.randn(length, 50, generator=gen)
        values, indices = torch.log_softmax(logits, -1).topk(32, dim=-1)
        reference |= {f"ids_{i}": torch.arange(length, dtype=torch.int64) + 1, f"top_ids_{i}": indices, f"top_logprobs_{i}": values}
    save_file(reference, str(tmp_path / "ref.safetensors"))
    store.put_bytes(f"{prefix}/reference_logits.safetensors", (tmp_path / "ref.safetensors").read_bytes())


@pytest.fixture
def vllm_stack(engines, gateway, make_org, make_adapter, data_dir, tmp_path):
    def start(replicas: int = 1, shift: float = 0.0):
        store = LocalStore(data_dir / "objects")
        _put_adapter_with_reference(store, "adapters/a", tmp_path)
        fleet = [engines(resolver_store=str(data_dir / "objects"), logprob_shift=shift) for _ in range(replicas)]
        gw = gateway({BUILTIN_BASE_MODEL: [e.url for e in fleet]}, engine_kind="vllm")
        org, key = make_org()
        model = make_adapter(org, checked=False, storage_key="adapters/a")
        return gw, fleet, store, key, model

    return start


def test_check_scores_the_reference_through_prompt_logprobs(vllm_stack):
    gw, [engine], store, key, model = vllm_stack()
    assert gw.client(key).chat.completions.create(model=model, messages=MESSAGES).choices
    versions = gw.http().get("/v1/adapters", headers={"Authorization": f"Bearer {key}"}).json()["data"][0]["versions"]
    logits = versions[0]["compatibility"]["logits"]
    assert versions[0]["status"] == "active"
    # 8 positions over the two prompts; vLLM returns its top 20 of the reference's 32 at each
    assert (logits["status"], logits["max_abs_diff"], logits["top1_agreement"], logits["compared_logprobs"]) == ("match", 0.0, 1.0, 8 * 20)
    assert engine.state.load_calls == {model: 1} and sum(engine.state.load_requests.values()) == 0
    assert engine.state.served == [model]  # the check's scoring requests are not billed completions
    assert index.lookup(store, model).key == "adapters/a"


def test_check_refuses_an_adapter_vllm_does_not_reproduce(vllm_stack):
    gw, [engine], store, key, model = vllm_stack(shift=0.5)
    with pytest.raises(openai.BadRequestError) as err:
        gw.client(key).chat.completions.create(model=model, messages=MESSAGES)
    assert err.value.code == "adapter_incompatible" and "log-probabilities" in err.value.message
    assert index.lookup(store, model) is None  # withdrawn: no replica can resolve it any more
    assert model not in engine.state.loaded  # and unloaded where the check loaded it
    with pytest.raises(openai.BadRequestError):  # the stored verdict stands; no second check
        gw.client(key).chat.completions.create(model=model, messages=MESSAGES)
    assert engine.state.load_calls == {model: 1}


def test_replicas_resolve_by_name_and_requests_follow_the_holder(vllm_stack):
    gw, fleet, store, key, model = vllm_stack(replicas=3)
    client = gw.client(key)
    for _ in range(6):
        client.chat.completions.create(model=model, messages=MESSAGES)
    holders = [e for e in fleet if e.state.load_calls[model]]
    assert len(holders) == 1 and holders[0].state.load_calls[model] == 1
    assert holders[0].state.served.count(model) == 6

    holders[0].restart()  # a restarted vLLM has nothing loaded: its resolver finds the adapter again
    client.chat.completions.create(model=model, messages=MESSAGES)
    assert sum(e.state.load_calls[model] for e in fleet) == 1
    assert sum(sum(e.state.load_requests.values()) for e in fleet) == 0


def test_a_checkpoint_model_is_found_by_the_resolver_after_its_adapters_check(vllm_stack, db_session, tmp_path):
    from scheduler.models import Adapter, Checkpoint

    gw, [engine], store, key, model = vllm_stack()
    _put_adapter_with_reference(store, "adapters/a-step-10", tmp_path)
    adapter = db_session.get(Adapter, model)
    db_session.add(Checkpoint(job_id=adapter.job_id, org_id=adapter.org_id, step=10, storage_key="adapters/a-step-10"))
    db_session.flush()
    ckpt = f"{model}:ckpt-step-10"
    gw.client(key).chat.completions.create(model=ckpt, messages=MESSAGES)  # checks the final adapter first
    assert index.lookup(store, ckpt).key == "adapters/a-step-10" and engine.state.load_calls[ckpt] == 1
    assert engine.state.served[-1] == ckpt and engine.state.load_requests[ckpt] == 0  # by name, no path sent


def test_an_adapter_missing_from_the_index_is_a_server_error(vllm_stack):
    gw, [engine], store, key, model = vllm_stack()
    gw.client(key).chat.completions.create(model=model, messages=MESSAGES)
    index.withdraw(store, model)  # the index lost it behind the registry's back
    engine.restart()
    with pytest.raises(openai.InternalServerError) as err:
        gw.client(key).chat.completions.create(model=model, messages=MESSAGES)
    assert "could not load" in err.value.message
