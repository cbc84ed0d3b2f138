"""What job creation checks in a job's inputs before anything is stored, so that a job the worker would
refuse never reaches a GPU: the declared data format against the method and against the file, and a
GGUF export of a base whose architecture the exporter does not support."""

from __future__ import annotations

import json

import openai
import pytest
from sqlalchemy import select

from gpu_worker.contract import DataFormat, JobSpec
from scheduler.models import File, Job
from tests.api.conftest import chat_line


def _lines(rows) -> bytes:
    return b"".join(json.dumps(r).encode() + b"\n" for r in rows)


PREFERENCE = _lines({"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(10))
SHAREGPT = _lines({"conversations": [{"from": "human", "value": f"q{i}"}, {"from": "gpt", "value": f"a{i}"}]} for i in range(10))
KTO = _lines({"prompt": f"q{i}", "completion": f"a{i}", "label": i % 2 == 0} for i in range(10))
PROMPTS = _lines({"prompt": f"q{i}", "answer": f"a{i}"} for i in range(10))
GRPO = {"type": "grpo", "grpo": {"rewards": [{"kind": "exact_match"}]}}


def _refused(client, db_session, org, **kwargs) -> dict:
    with pytest.raises(openai.BadRequestError) as err:
        client.fine_tuning.jobs.create(model="tuneforge-tiny", **kwargs)
    assert db_session.scalars(select(Job).where(Job.org_id == org.id)).first() is None
    return err.value.body


def test_a_declared_format_the_method_cannot_train_is_a_400_naming_data_format(client_a, upload, org_a, db_session):
    # the worker failed it after queueing: "line 1: a preference file cannot train method 'supervised'"
    body = _refused(client_a, db_session, org_a[0], training_file=upload(), extra_body={"data": {"format": "preference"}})
    assert (body["param"], body["code"]) == ("data.format", "invalid_value")
    assert "a preference file cannot train method 'supervised'" in body["message"]
    # GRPO reads prompts (or chat): declaring kto for it is as wrong
    body = _refused(client_a, db_session, org_a[0], training_file=upload(PROMPTS), method=GRPO, extra_body={"data": {"format": "kto"}})
    assert body["param"] == "data.format" and "cannot train method 'grpo'" in body["message"]


def test_a_declared_format_the_file_is_not_in_is_a_400_naming_the_line(client_a, upload, org_a, db_session):
    chat = upload()  # detected chat
    body = _refused(client_a, db_session, org_a[0], training_file=chat, extra_body={"data": {"format": "sharegpt"}})
    assert (body["param"], body["code"]) == ("data.format", "invalid_value")
    assert f"file {chat} (training_file) is in 'chat' format" in body["message"]
    assert "line 1: missing 'conversations'" in body["message"] and "the file was declared sharegpt" in body["message"]
    # the same rule for the validation file, which data.format also describes
    body = _refused(client_a, db_session, org_a[0], training_file=upload(SHAREGPT), validation_file=chat, extra_body={"data": {"format": "sharegpt"}})
    assert body["param"] == "data.format" and "(validation_file)" in body["message"]


def test_an_extra_files_declared_format_is_checked_naming_its_field(client_a, upload, org_a, db_session):
    extra = {"file": upload(), "format": "alpaca"}
    body = _refused(client_a, db_session, org_a[0], training_file=upload(), extra_body={"data": {"extra_training_files": [extra]}})
    assert body["param"] == "data.extra_training_files[0].format" and "missing 'instruction'" in body["message"]
    extra["format"] = "preference"
    body = _refused(client_a, db_session, org_a[0], training_file=upload(), extra_body={"data": {"extra_training_files": [extra]}})
    assert body["param"] == "data.extra_training_files[0].format" and "cannot train method 'supervised'" in body["message"]


def test_a_declared_format_the_file_can_be_read_in_is_accepted(client_a, upload, db_session):
    same = client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=upload(SHAREGPT), extra_body={"data": {"format": "sharegpt"}})
    # a KTO file's prompt/completion lines are completion lines too: the supervised worker reads them so
    kto = upload(KTO)
    assert db_session.get(File, kto).format == "kto"
    read_as = client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=kto, extra_body={"data": {"format": "completion"}})
    assert JobSpec.model_validate(db_session.get(Job, read_as.id).spec).data.format == DataFormat.completion
    assert same.status == read_as.status == "validating_files"


def test_a_kto_file_without_a_declared_format_still_cannot_train_supervised(client_a, upload, org_a, db_session):
    body = _refused(client_a, db_session, org_a[0], training_file=upload(KTO))
    assert (body["param"], body["code"]) == ("training_file", "invalid_file")


def test_other_methods_read_their_own_format_whatever_is_declared(client_a, upload, org_a, db_session):
    # the preference recipe reads preference pairs; a chat file declared preference is still a chat file
    body = _refused(client_a, db_session, org_a[0], training_file=upload(), method={"type": "dpo"}, extra_body={"data": {"format": "preference"}})
    assert body["param"] == "training_file" and "'chat' format" in body["message"]
    job = client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=upload(PREFERENCE), method={"type": "dpo"},
                                           extra_body={"data": {"format": "preference"}})
    assert job.status == "validating_files"


@pytest.fixture
def qwen(settings, monkeypatch):
    monkeypatch.setattr(settings, "base_models", [*settings.base_models, "Qwen/Qwen2.5-0.5B", "someone/unknown-model"])


def test_gguf_export_of_a_base_the_exporter_does_not_support_is_a_400(client_a, upload, org_a, db_session, qwen):
    # Qwen2 (the estimator's catalog knows it) is not a Llama: the job succeeded with a warning and no file
    with pytest.raises(openai.BadRequestError) as err:
        client_a.fine_tuning.jobs.create(model="Qwen/Qwen2.5-0.5B", training_file=upload(), extra_body={"export": {"gguf": ["q8_0"]}})
    body = err.value.body
    assert (body["param"], body["code"]) == ("export.gguf", "unsupported_export") and "'qwen2'" in body["message"]
    assert db_session.scalars(select(Job).where(Job.org_id == org_a[0].id)).first() is None
    # the estimate refuses it the same way
    with pytest.raises(openai.BadRequestError) as err:
        client_a.post("/fine_tuning/jobs/estimate", cast_to=object,
                      body={"model": "Qwen/Qwen2.5-0.5B", "training_file": upload(), "export": {"gguf": ["f16"]}})
    assert err.value.body["param"] == "export.gguf"
    # a merged export of it is fine
    merged = client_a.fine_tuning.jobs.create(model="Qwen/Qwen2.5-0.5B", training_file=upload(), extra_body={"export": {"merged": True}})
    assert merged.status == "validating_files"


@pytest.mark.parametrize("model", ["tuneforge-tiny", "meta-llama/Llama-3.2-1B", "someone/unknown-model"])
def test_gguf_export_of_a_llama_or_an_unknown_base_is_accepted(client_a, upload, qwen, model):
    # Llama bases are exported; an unknown hub model keeps the worker's path (a warning if it is not a Llama)
    job = client_a.fine_tuning.jobs.create(model=model, training_file=upload(), extra_body={"export": {"gguf": ["q4_k_m"]}})
    assert job.status == "validating_files"


def test_a_file_truncated_to_nothing_is_a_400_at_creation_where_the_tokenizer_is_here(client_a, upload, org_a, db_session, settings):
    from gpu_worker.builtin import BUILTIN_MODELS, TINY, build_tokenizer

    long = "please tell me a long story about the quick brown fox " * 2
    file_id = upload(_lines(chat_line(long, f"answer {i}") for i in range(12)))
    method = {"type": "supervised", "supervised": {"hyperparameters": {"max_seq_length": 16}}}
    # without the tokenizer the API cannot know: the scheduler counts before queueing
    assert client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=file_id, method=method).status == "validating_files"
    build_tokenizer(BUILTIN_MODELS[TINY].vocab_size).save_pretrained(settings.data_dir / "models" / TINY)
    db_session.query(Job).delete()
    body = _refused(client_a, db_session, org_a[0], training_file=file_id, method=method)
    assert (body["param"], body["code"]) == ("training_file", "invalid_file")
    assert "the file has no usable example (12 lost every trained token to max_seq_length=16)" in body["message"]
    # the same file trains with room for its answers
    assert client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=file_id).status == "validating_files"
