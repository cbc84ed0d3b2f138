"""``python -m gpu_worker.engine`` as its own process on the built-in model, the way the platform runs
it: an adapter trained on ``tuneforge-tiny`` elsewhere is loaded from the object store (``store:``) and
answers like the PEFT model; bad command lines fail fast with a message."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
import openai
import pytest
import torch

from gpu_worker.storage import LocalStore, put_dir
from tests.gpu_worker.engine.conftest import free_port


def _adapter_for_builtin(data_dir, out):
    """A LoRA on the built-in model as a trainer would save it (its config names the model's folder)."""
    from peft import LoraConfig, get_peft_model

    from gpu_worker.loading import load_base_model

    model, tokenizer = load_base_model("tuneforge-tiny", data_dir=data_dir, device="cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.5)
    peft_model.save_pretrained(out)
    return peft_model.eval(), tokenizer


@pytest.mark.slow
def test_engine_process_serves_the_builtin_model_and_store_adapters(tmp_path):
    trainer_dir, engine_dir = tmp_path / "trainer", tmp_path / "engine"
    reference, tokenizer = _adapter_for_builtin(trainer_dir, tmp_path / "adapter")
    store = LocalStore(tmp_path / "objects")
    put_dir(store, tmp_path / "adapter", "orgs/acme/jobs/ftjob-1/adapter")

    port = free_port()
    env = {**os.environ, "TUNEFORGE_STORAGE_URL": str(tmp_path / "objects"), "TUNEFORGE_DATA_DIR": str(engine_dir)}
    log = open(tmp_path / "engine.log", "w+")
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "gpu_worker.engine", "--port", str(port), "--model", "tuneforge-tiny", "--log-level", "info",
            "--lora-modules", f"local={tmp_path / 'adapter'}",
        ],  # fmt: skip
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "engine exited"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "engine did not become healthy"
            time.sleep(0.2)

        resp = httpx.post(url + "/v1/load_lora_adapter", json={"lora_name": "ft:tuneforge-tiny:acme::1", "lora_path": "store:orgs/acme/jobs/ftjob-1/adapter"}, timeout=60)
        assert resp.status_code == 200, resp.text
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
        assert {m.id for m in client.models.list().data} == {"tuneforge-tiny", "local", "ft:tuneforge-tiny:acme::1"}

        messages = [{"role": "user", "content": "Classify the sentiment of this review: the food was great"}]
        answer = client.chat.completions.create(model="ft:tuneforge-tiny:acme::1", messages=messages, max_tokens=8, temperature=0)
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        prompt = torch.tensor([tokenizer(ids, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            expected = reference.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
        new = expected[0, prompt.shape[1] :].tolist()
        assert answer.choices[0].message.content == tokenizer.decode(new, skip_special_tokens=True)
        assert answer.usage.prompt_tokens == prompt.shape[1] and answer.usage.completion_tokens == len(new)
        assert (engine_dir / "adapter-cache").is_dir()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)
    # uvicorn shuts down gracefully, then re-raises the signal it caught.
    assert proc.returncode in (0, -signal.SIGTERM)
    output = (tmp_path / "engine.log").read_text()
    assert "Application shutdown complete" in output and "Traceback" not in output


def test_bad_command_line_fails_fast_with_a_message(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "gpu_worker.engine", "--model", str(tmp_path / "no-such-model"), "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2
    assert "no-such-model" in out.stderr and "no such local folder" in out.stderr
