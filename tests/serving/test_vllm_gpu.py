"""The gateway in front of a real vLLM OpenAI server on a GPU, with Tuneforge's resolver plugin inside it.

Skipped unless CUDA and vllm are present (CI has neither; on the GPU machine vLLM and its requirements
travel as files, bench/serving/vllm_device.sh). Everything else is real: a tiny Llama built from a config
with a locally trained tokenizer (no hub), a PEFT adapter with non-zero weights and its training-side
reference log-probabilities (``gpu_worker.engine.compat.write_reference``, fp32 on the CPU), vLLM started
with the platform's own arguments and environment (``serving.vllm_plugin.config``), the gateway on SQLite
(the GPU machine has no PostgreSQL) with ``engine_kind="vllm"``, and the stock ``openai`` SDK.

What it shows: the adapter's first request runs the compatibility check, in which vLLM's resolver loads
the adapter from object storage by name and vLLM's prompt_logprobs reproduce the training side; vLLM's
greedy answers equal the PEFT model's; usage is billed with vLLM's counts; a delete unloads the adapter
from vLLM and withdraws it from the index, so vLLM cannot resolve it again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.integration]
pytest.importorskip("vllm")

BASE = "tiny-vllm"
PROMPT = "The food was great and"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_model(folder: Path) -> Path:
    """A Llama vLLM runs as it is (head_dim 64 for its flash-attention kernels), tokenizer trained here."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from gpu_worker.builtin import build_tokenizer

    tokenizer = build_tokenizer(400)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, initializer_range=0.2, tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def _adapter(model_dir: Path, folder: Path) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaForCausalLM

    from gpu_worker.engine.compat import write_reference

    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    torch.manual_seed(1)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    for name, param in peft_model.named_parameters():
        if "lora_" in name:
            torch.nn.init.normal_(param, std=0.05)
    peft_model.save_pretrained(folder)
    write_reference(peft_model, AutoTokenizer.from_pretrained(model_dir), folder)
    return folder


def _greedy(model_dir: Path, adapter: Path | None, prompt: str, tokens: int) -> list[int]:
    from peft import PeftModel
    from transformers import AutoTokenizer, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = LlamaForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    ids = torch.tensor([tokenizer(prompt)["input_ids"]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from gpu_worker.storage import LocalStore, put_dir
    from scheduler.models import Adapter, Base, Job, JobStatus, Role
    from scheduler.jobs import fine_tuned_model_name
    from scheduler.tenancy import create_api_key, get_or_create_org
    from serving.app import create_app
    from serving.settings import ServingSettings
    from serving.vllm_plugin.config import vllm_args, vllm_env
    from tests.serving.conftest import LiveServer

    root = tmp_path_factory.mktemp("vllm")
    model_dir = _tiny_model(root / "model")
    adapter_dir = _adapter(model_dir, root / "adapter")
    objects = root / "objects"
    put_dir(LocalStore(str(objects)), adapter_dir, "adapters/a")

    port = _free_port()
    log = open(root / "vllm.log", "w")
    env = {**os.environ, **vllm_env(str(objects), BASE, cache_dir=str(root / "lora-cache"))}
    args = vllm_args(str(model_dir), max_lora_rank=8, max_loras=4, served_name=BASE)
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", *args, "--port", str(port), "--dtype", "float16",
               "--enforce-eager", "--gpu-memory-utilization", "0.2", "--max-model-len", "512"]
    engine = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 400
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if engine.poll() is not None or time.monotonic() > deadline:
            engine.kill()
            pytest.fail("vLLM did not start:\n" + (root / "vllm.log").read_text()[-6000:])
        time.sleep(1)

    database_url = f"sqlite:///{root / 'gateway.db'}"
    Base.metadata.create_all(create_engine(database_url))
    with Session(create_engine(database_url)) as session:
        org = get_or_create_org(session, "acme")
        _, key = create_api_key(session, org, "test", Role.admin)
        job = Job(org_id=org.id, model=BASE, training_file_id="file-test", seed=0, method={"type": "supervised"}, spec={}, status=JobStatus.succeeded)
        session.add(job)
        session.flush()
        model = fine_tuned_model_name(BASE, org.name, "demo", job.id)
        session.add(Adapter(id=model, org_id=org.id, job_id=job.id, base_model=BASE, storage_key="adapters/a", manifest={}))
        session.commit()
    settings = ServingSettings(
        data_dir=root / "gateway", database_url=database_url, storage_url=str(objects), engines={BASE: [url]},
        engine_kind="vllm", base_models=[BASE], max_lora_rank=8, engine_read_timeout_s=120.0,
    )
    app = create_app(settings)
    gateway = LiveServer(app).start()
    yield {"gateway": gateway, "app": app, "key": key, "model": model, "vllm": url, "model_dir": model_dir,
           "adapter_dir": adapter_dir, "objects": objects, "database_url": database_url}
    gateway.stop()
    engine.terminate()
    engine.wait(60)
    log.close()
    print((root / "vllm.log").read_text()[-3000:])


def _client(stack) -> openai.OpenAI:
    return openai.OpenAI(api_key=stack["key"], base_url=stack["gateway"].url + "/v1", max_retries=0, timeout=120)


def _versions(stack) -> list[dict]:
    answer = httpx.get(stack["gateway"].url + "/v1/adapters", headers={"Authorization": f"Bearer {stack['key']}"})
    return [v for a in answer.json()["data"] for v in a["versions"]]


def test_first_request_checks_the_adapter_on_vllm_and_answers_as_peft(stack):
    answer = _client(stack).completions.create(model=stack["model"], prompt=PROMPT, max_tokens=6, temperature=0)
    [version] = _versions(stack)
    report = version["compatibility"]
    print("compatibility report:", json.dumps(report))
    assert version["status"] == "active", report
    assert report["logits"]["status"] == "match" and report["logits"]["top1_agreement"] >= 0.9
    # vLLM lists the adapter its resolver loaded from object storage
    models = httpx.get(stack["vllm"] + "/v1/models").json()["data"]
    assert [m["id"] for m in models if m.get("parent")] == [stack["model"]]

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(stack["model_dir"])
    expected = _greedy(stack["model_dir"], stack["adapter_dir"], PROMPT, 6)
    base = _greedy(stack["model_dir"], None, PROMPT, 6)
    assert expected != base  # the adapter changes the answer, so matching it means vLLM applied it
    assert answer.choices[0].text == tokenizer.decode(expected, skip_special_tokens=True)
    assert answer.usage.completion_tokens == len(expected) and answer.usage.prompt_tokens == len(tokenizer(PROMPT)["input_ids"])


def test_base_model_and_streams_are_billed_with_vllm_counts(stack):
    client = _client(stack)
    plain = client.chat.completions.create(model=BASE, messages=[{"role": "user", "content": "hello"}], max_tokens=5, temperature=0)
    chunks = list(client.chat.completions.create(model=stack["model"], messages=[{"role": "user", "content": "hello"}], max_tokens=7, temperature=0, stream=True))
    assert all(c.usage is None for c in chunks)  # not asked for: stripped, yet billed
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    again = client.chat.completions.create(model=stack["model"], messages=[{"role": "user", "content": "hello"}], max_tokens=7, temperature=0)
    assert again.choices[0].message.content == text

    from sqlalchemy import create_engine, select
    from sqlalchemy.orm import Session

    from scheduler.models import UsageRecord

    stack["app"].state.usage_writer.flush_blocking()
    with Session(create_engine(stack["database_url"])) as session:
        rows = session.scalars(select(UsageRecord).order_by(UsageRecord.id)).all()
    billed = [(r.adapter, r.prompt_tokens, r.completion_tokens) for r in rows][-3:]
    assert billed == [
        (None, plain.usage.prompt_tokens, plain.usage.completion_tokens),
        (stack["model"], again.usage.prompt_tokens, again.usage.completion_tokens),
        (stack["model"], again.usage.prompt_tokens, again.usage.completion_tokens),
    ]


def test_delete_unloads_from_vllm_and_it_cannot_resolve_again(stack):
    from gpu_worker.storage import LocalStore
    from serving.vllm_plugin import index

    answer = httpx.delete(stack["gateway"].url + f"/v1/adapters/{stack['model']}", headers={"Authorization": f"Bearer {stack['key']}"})
    assert answer.status_code == 200, answer.text
    models = httpx.get(stack["vllm"] + "/v1/models").json()["data"]
    assert [m["id"] for m in models if m.get("parent")] == []
    assert index.lookup(LocalStore(str(stack["objects"])), stack["model"]) is None
    with pytest.raises(openai.NotFoundError):
        _client(stack).completions.create(model=stack["model"], prompt=PROMPT, max_tokens=2)
    # asked directly, vLLM's resolver no longer finds it either
    direct = httpx.post(stack["vllm"] + "/v1/completions", json={"model": stack["model"], "prompt": PROMPT, "max_tokens": 2})
    assert direct.status_code == 404
