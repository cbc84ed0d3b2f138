"""POST /v1/fine_tuning/jobs/estimate through the stock openai SDK: the same body as job creation,
the plan the router makes for the app's fleet, tokens/time/GPU-hours/price consistent with each
other, nothing created; a job that fits nowhere is a 400 naming what would fit."""

from __future__ import annotations

import json

import openai
import pytest
from sqlalchemy import func, select

from api.services.estimates import BYTES_PER_TOKEN
from scheduler.fleet import parse_fleet
from scheduler.models import File, Job
from tests.api.conftest import chat_line

FLEET = parse_fleet({"classes": [
    {"name": "l4", "memory_gb": 24, "nodes": 2, "bf16_tflops": 121, "price_per_gpu_hour": 0.8},
    {"name": "h100", "memory_gb": 80, "gpus_per_node": 8, "bf16_tflops": 767, "price_per_gpu_hour": 2.5},
]})
SMALL = parse_fleet({"classes": [{"name": "t4", "memory_gb": 16, "price_per_gpu_hour": 0.35}]})
LLAMA_1B = "meta-llama/Llama-3.2-1B"


@pytest.fixture
def fleet(app):
    app.state.fleet = FLEET
    return FLEET


def _estimate(client: openai.OpenAI, **body) -> dict:
    return client.post("/fine_tuning/jobs/estimate", body=body, cast_to=object)


def _hp(**hp) -> dict:
    return {"type": "supervised", "supervised": {"hyperparameters": hp}}


def test_estimate_returns_plan_tokens_time_and_price_and_creates_nothing(client_a, upload, fleet, db_session):
    file_id = upload(b"".join(json.dumps(chat_line(f"question {i}", f"answer {i}")).encode() + b"\n" for i in range(40)))
    jobs_before = db_session.scalar(select(func.count()).select_from(Job))
    est = _estimate(client_a, model=LLAMA_1B, training_file=file_id, method=_hp(n_epochs=3, batch_size=8))
    assert db_session.scalar(select(func.count()).select_from(Job)) == jobs_before
    plan = est["plan"]
    assert (est["object"], est["model"]) == ("fine_tuning.job.estimate", LLAMA_1B)
    assert (plan["worker_kind"], plan["gpu_class"], plan["gpu_count"], plan["zero_stage"]) == ("single-gpu", "l4", 1, None)
    assert plan["uses_kernels"] and any("supported by the Triton kernels" in r for r in plan["reasons"])
    assert plan["micro_batch_size"] * plan["gradient_accumulation_steps"] == 8
    assert plan["predicted_memory_gb"] == pytest.approx(sum(plan["memory_breakdown_gb"].values()), abs=0.05)
    size = db_session.get(File, file_id).bytes
    assert (est["estimated_tokens"], est["tokens_source"]) == (3 * -(-size // BYTES_PER_TOKEN), "file_size")  # no tokenizer here
    assert est["estimated_seconds"] == pytest.approx(est["estimated_tokens"] / est["tokens_per_second"], abs=1)
    hours = est["estimated_tokens"] / est["tokens_per_second"] / 3600
    assert est["gpu_hours"] == pytest.approx(hours, rel=0.01, abs=1e-4)
    assert est["estimated_price"] == pytest.approx(hours * 0.8, rel=0.01, abs=1e-4)


def test_grpo_counts_every_generation(client_a, upload, fleet, db_session):
    prompts = b"".join(json.dumps({"prompt": f"What is {i} + {i}?", "answer": str(2 * i)}).encode() + b"\n" for i in range(20))
    file_id = upload(prompts)
    method = {"type": "grpo", "grpo": {"hyperparameters": {"n_epochs": 1}, "rewards": [{"kind": "exact_match"}]}}
    est = _estimate(client_a, model=LLAMA_1B, training_file=file_id, method=method)
    row = db_session.get(File, file_id)
    prompt_tokens = -(-row.bytes // BYTES_PER_TOKEN)
    assert est["estimated_tokens"] == 4 * (prompt_tokens + row.examples * 64)  # default 4 generations × 64 tokens


def test_full_fine_tuning_is_planned_on_deepspeed(client_a, upload, fleet):
    est = _estimate(client_a, model=LLAMA_1B, training_file=upload(), method=_hp(adapter_type="full", batch_size=4))
    plan = est["plan"]
    assert (plan["worker_kind"], plan["zero_stage"]) == ("multi-gpu", 3)
    hours = est["estimated_tokens"] / est["tokens_per_second"] / 3600
    assert est["gpu_hours"] == pytest.approx(hours * plan["gpu_count"], rel=0.01, abs=1e-4)
    assert not plan["uses_kernels"] and any("stock HF modules" in r for r in plan["reasons"])


def test_a_job_that_fits_nowhere_is_a_400_saying_what_would(client_a, upload, app):
    app.state.fleet = SMALL
    with pytest.raises(openai.BadRequestError) as e:
        _estimate(client_a, model=LLAMA_1B, training_file=upload(), method=_hp(adapter_type="full", batch_size=8, max_seq_length=8192))
    err = e.value.body
    assert (err["param"], err["code"]) == ("model", "unplaceable")
    assert "needs" in err["message"] and "fleet has 1×16 GB (t4)" in err["message"] and "try LoRA" in err["message"]


def test_creating_a_job_that_fits_nowhere_is_refused_and_writes_nothing(client_a, upload, app, org_a, db_session):
    app.state.fleet = SMALL
    with pytest.raises(openai.BadRequestError) as e:
        client_a.fine_tuning.jobs.create(model=LLAMA_1B, training_file=upload(), method=_hp(adapter_type="full", batch_size=8, max_seq_length=8192))
    assert (e.value.body["param"], e.value.body["code"]) == ("model", "unplaceable")
    assert db_session.scalars(select(Job).where(Job.org_id == org_a[0].id)).first() is None


@pytest.mark.parametrize("body,param", [
    ({"model": "acme/unknown"}, "model"),
    ({"training_file": "file-doesnotexist"}, "training_file"),
    ({"method": _hp(batch_size=0)}, "method.supervised.hyperparameters.batch_size"),
])
def test_bad_input_names_the_field(client_a, upload, fleet, body, param):
    request = {"model": LLAMA_1B, "training_file": upload(), **body}
    with pytest.raises(openai.BadRequestError) as e:
        _estimate(client_a, **request)
    assert e.value.body["param"] == param


def test_another_orgs_file_reads_as_missing(client_a, sdk, make_org, fleet):
    other = sdk(make_org("org-b")[1])
    theirs = other.files.create(file=("t.jsonl", b"".join(json.dumps(chat_line()).encode() + b"\n" for _ in range(10))), purpose="fine-tune").id
    with pytest.raises(openai.BadRequestError) as e:
        _estimate(client_a, model=LLAMA_1B, training_file=theirs)
    assert e.value.body["param"] == "training_file"


def test_estimate_needs_a_key(http, fleet):
    assert http.post("/v1/fine_tuning/jobs/estimate", json={"model": LLAMA_1B, "training_file": "file-x"}).status_code == 401


@pytest.mark.parametrize("fragment,param", [
    ('"method": {"type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": 1e-320}}}', "method.supervised.hyperparameters.learning_rate_multiplier"),
    ('"hyperparameters": {"learning_rate_multiplier": 5e-324}', "hyperparameters.learning_rate_multiplier"),
])
def test_a_multiplier_that_rounds_the_learning_rate_to_zero_is_400_not_500(http, upload, org_a, fleet, db_session, fragment, param):
    jobs_before = db_session.scalar(select(func.count()).select_from(Job))
    body = f'{{"model": "{LLAMA_1B}", "training_file": "{upload()}", {fragment}}}'
    response = http.post("/v1/fine_tuning/jobs/estimate", content=body, headers={"Authorization": f"Bearer {org_a[1]}", "Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["type"], error["code"]) == (param, "invalid_request_error", "invalid_value")
    assert db_session.scalar(select(func.count()).select_from(Job)) == jobs_before


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory):
    from gpu_worker.builtin import BUILTIN_MODELS, TINY, build_tokenizer

    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(BUILTIN_MODELS[TINY].vocab_size).save_pretrained(out)
    return out


@pytest.fixture
def tiny_tokenizer(settings, tokenizer_folder):
    """The built-in model's tokenizer in the API's data dir, as a worker on this machine leaves it."""
    folder = settings.data_dir / "models" / "tuneforge-tiny"
    folder.mkdir(parents=True)
    for f in tokenizer_folder.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def _chat_file(n: int, user: str = "question") -> bytes:
    return b"".join(json.dumps(chat_line(f"{user} {i}", f"answer {i}")).encode() + b"\n" for i in range(n))


def test_with_the_tokenizer_here_tokens_are_counted_as_the_trainer_counts(client_a, upload, fleet, db_session, store, tiny_tokenizer):
    from gpu_worker.tokencount import count_tokens

    file_id = upload(_chat_file(12))
    est = _estimate(client_a, model="tuneforge-tiny", training_file=file_id, method=_hp(n_epochs=3))
    counted = count_tokens(store.get_bytes(db_session.get(File, file_id).storage_key).splitlines(), tokenizer_dir=tiny_tokenizer, max_seq_length=512)
    assert (est["tokens_source"], est["estimated_tokens"]) == ("tokenizer", 3 * counted.tokens)
    assert est["estimated_tokens"] != 3 * -(-db_session.get(File, file_id).bytes // BYTES_PER_TOKEN)
    # GRPO: each prompt once per generation, with the generated tokens
    prompts = b"".join(json.dumps({"prompt": f"What is {i} + {i}?", "answer": str(2 * i)}).encode() + b"\n" for i in range(20))
    grpo = upload(prompts)
    method = {"type": "grpo", "grpo": {"hyperparameters": {"n_epochs": 1}, "rewards": [{"kind": "exact_match"}]}}
    est = _estimate(client_a, model="tuneforge-tiny", training_file=grpo, method=method)
    prompt_tokens = count_tokens(prompts.splitlines(), tokenizer_dir=tiny_tokenizer, max_seq_length=512).tokens
    assert (est["tokens_source"], est["estimated_tokens"]) == ("tokenizer", 4 * (prompt_tokens + 20 * 64))


def test_without_the_tokenizer_or_past_the_count_limit_tokens_come_from_file_size(client_a, upload, fleet, db_session, tiny_tokenizer, monkeypatch):
    from api.services import token_counts

    file_id = upload(_chat_file(12))
    by_size = 3 * -(-db_session.get(File, file_id).bytes // BYTES_PER_TOKEN)
    # a hub model whose tokenizer is not on this machine
    est = _estimate(client_a, model=LLAMA_1B, training_file=file_id, method=_hp(n_epochs=3))
    assert (est["tokens_source"], est["estimated_tokens"]) == ("file_size", by_size)
    # files too large to count within the request
    monkeypatch.setattr(token_counts, "COUNT_MAX_BYTES", db_session.get(File, file_id).bytes - 1)
    est = _estimate(client_a, model="tuneforge-tiny", training_file=file_id, method=_hp(n_epochs=3))
    assert (est["tokens_source"], est["estimated_tokens"]) == ("file_size", by_size)


def test_a_file_truncated_to_nothing_is_a_400_when_counted(client_a, upload, fleet, tiny_tokenizer):
    # every prompt fills max_seq_length=16: the worker would find no usable example
    file_id = upload(_chat_file(12, user="please tell me a long story about the quick brown fox " * 2))
    with pytest.raises(openai.BadRequestError) as e:
        _estimate(client_a, model="tuneforge-tiny", training_file=file_id, method=_hp(max_seq_length=16))
    assert (e.value.body["param"], e.value.body["code"]) == ("training_file", "invalid_file")
    assert "the file has no usable example (12 lost every trained token to max_seq_length=16)" in e.value.body["message"]
    # an extra file is named by its request field
    with pytest.raises(openai.BadRequestError) as e:
        _estimate(client_a, model="tuneforge-tiny", training_file=upload(_chat_file(12)), method=_hp(max_seq_length=16),
                  data={"extra_training_files": [{"file": file_id}]})
    assert e.value.body["param"] == "data.extra_training_files[0].file"


def test_a_tokenizer_here_that_cannot_be_read_falls_back_to_file_size(client_a, upload, fleet, tiny_tokenizer):
    (tiny_tokenizer / "tokenizer.json").write_text("{not json")
    est = _estimate(client_a, model="tuneforge-tiny", training_file=upload(_chat_file(12)))
    assert est["tokens_source"] == "file_size"


def test_a_spec_the_worker_would_refuse_is_a_400_for_the_estimate_too(client_a, upload, fleet):
    """10 examples, no validation file: the automatic split holds out nothing, so a gate on validation
    results could never run; the estimate says so as creation does."""
    with pytest.raises(openai.BadRequestError) as e:
        _estimate(client_a, model=LLAMA_1B, training_file=upload(), evaluation={"early_stopping_patience": 2})
    assert (e.value.body["param"], e.value.body["code"]) == ("evaluation.early_stopping_patience", "invalid_value")
    assert "validation_file" in e.value.body["message"]
