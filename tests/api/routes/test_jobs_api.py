"""/v1/fine_tuning/jobs through the stock openai SDK: a created job carries a valid worker contract
with every "auto" resolved, bad input names the field, lists paginate newest first, cancel follows
the state machine."""

from __future__ import annotations

import json

import openai
import pytest
from sqlalchemy import select

from api.services.hyperparameters import BASE_LEARNING_RATES, auto_batch_size, auto_n_epochs
from gpu_worker.contract import ALL_TARGET_MODULES, AdapterType, ChatTemplate, GGUFType, JobSpec, LRScheduler, MemoryMode, Method
from scheduler.jobs import add_event, claim, fail, mark_queued
from scheduler.models import Checkpoint, File, Job, JobEvent

HP = "method.supervised.hyperparameters"
BASE_LORA_LEARNING_RATE = BASE_LEARNING_RATES[Method.supervised]


def _method(**hp) -> dict:
    return {"type": "supervised", "supervised": {"hyperparameters": hp}}


def test_create_resolves_auto_and_writes_job_spec_and_event(client_a, upload, org_a, db_session):
    file_id = upload()
    job = client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=file_id, suffix="my-model_1", seed=7)
    assert (job.object, job.status, job.model, job.training_file, job.suffix, job.seed) == (
        "fine_tuning.job", "validating_files", "tuneforge-tiny", file_id, "my-model_1", 7
    )
    assert job.organization_id == org_a[0].id and job.fine_tuned_model is None and job.error is None
    hp = job.method.supervised.hyperparameters
    # 10 examples: 3 epochs would show the model only 30 examples; auto aims for 100 (capped at 10 epochs).
    assert (hp.n_epochs, hp.batch_size, hp.learning_rate_multiplier) == (10, 1, 1.0)
    assert job.hyperparameters.n_epochs == 10

    row = db_session.get(Job, job.id)
    spec = JobSpec.model_validate(row.spec)
    training = db_session.get(File, file_id)
    assert spec.job_id == job.id and spec.org_id == org_a[0].id and spec.seed == 7
    assert spec.training_file_key == training.storage_key and spec.validation_file_key is None
    assert spec.output_prefix == f"orgs/{org_a[0].id}/jobs/{job.id}"
    assert spec.hyperparameters.learning_rate == pytest.approx(BASE_LORA_LEARNING_RATE)
    assert (spec.adapter.rank, spec.adapter.alpha, spec.adapter.target_modules) == (8, 16.0, ALL_TARGET_MODULES)
    events = list(db_session.scalars(select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.seq)))
    assert [e.message for e in events][0] == f"Created fine-tuning job: {job.id}"
    assert events[1].message.startswith("Planned for a single-gpu worker") and events[1].data["plan"]["worker_kind"] == "single-gpu"


def test_explicit_method_hyperparameters_and_lora_extras_reach_the_spec(client_a, upload, db_session):
    train, valid = upload(), upload()
    job = client_a.fine_tuning.jobs.create(
        model="meta-llama/Llama-3.2-1B",
        training_file=train,
        validation_file=valid,
        method=_method(n_epochs=2, batch_size=4, learning_rate_multiplier=0.5, lora_rank=16, lora_dropout=0.1, lora_target_modules=["q_proj", "v_proj"]),
    )
    spec = JobSpec.model_validate(db_session.get(Job, job.id).spec)
    assert (spec.hyperparameters.n_epochs, spec.hyperparameters.batch_size) == (2, 4)
    assert spec.hyperparameters.learning_rate == pytest.approx(0.5 * BASE_LORA_LEARNING_RATE)
    assert (spec.adapter.rank, spec.adapter.alpha, spec.adapter.dropout) == (16, 32.0, 0.1)
    assert [m.value for m in spec.adapter.target_modules] == ["q_proj", "v_proj"]
    assert spec.validation_file_key == db_session.get(File, valid).storage_key
    assert job.validation_file == valid


def test_tuneforge_extensions_reach_the_spec(client_a, upload, db_session):
    """Adapter type, schedule, data, evaluation, export, runtime and integrations options travel
    from the request (the SDK's extra_body) into the worker contract, resolved and shown on the job."""
    train, extra = upload(), upload()
    job = client_a.fine_tuning.jobs.create(
        model="tuneforge-tiny",
        training_file=train,
        method=_method(adapter_type="dora", use_rslora=True, lr_scheduler="cosine", warmup_ratio=0.1, max_seq_length=1024),
        integrations=[{"type": "wandb", "wandb": {"project": "p", "name": "run", "tags": ["a", "b"]}},
                      {"type": "mlflow", "mlflow": {"tracking_uri": "https://user:secret@mlflow.example:5000/x"}}],
        extra_body={
            "data": {"chat_template": "llama-3", "packing": True, "validation_split": 0.1, "extra_training_files": [{"file": extra, "weight": 2}]},
            "evaluation": {"early_stopping_patience": 3, "fail_on_regression": True},
            "export": {"merged": True, "gguf": ["q8_0"]},
            "runtime": {"memory_mode": "checkpointing", "checkpoint_every_steps": 10, "cuda_graphs": False, "fp8": True,
                        "attention": "fa4"},
        },
    )
    spec = JobSpec.model_validate(db_session.get(Job, job.id).spec)
    assert spec.adapter.type == AdapterType.dora and spec.adapter.use_rslora
    assert spec.hyperparameters.lr_scheduler == LRScheduler.cosine and spec.hyperparameters.warmup_ratio == 0.1
    assert spec.data.chat_template == ChatTemplate.llama3 and spec.data.packing and spec.data.validation_split == 0.1
    assert [(f.key, f.weight) for f in spec.data.extra_training_files] == [(db_session.get(File, extra).storage_key, 2.0)]
    assert spec.evaluation.early_stopping_patience == 3 and spec.evaluation.fail_on_regression
    assert spec.export.merged and spec.export.gguf == (GGUFType.q8_0,)
    assert spec.runtime.memory_mode == MemoryMode.checkpointing and spec.runtime.checkpoint_every_steps == 10
    assert spec.runtime.cuda_graphs is False and spec.runtime.fp8 is True and spec.runtime.attention.value == "fa4"
    assert (spec.integrations.wandb_project, spec.integrations.wandb_name, spec.integrations.wandb_tags) == ("p", "run", ("a", "b"))
    # shown on the job as OpenAI shows them (the MLflow URI without its credentials)
    assert [i.model_dump(exclude_none=True) for i in client_a.fine_tuning.jobs.retrieve(job.id).integrations] == [
        {"type": "wandb", "wandb": {"project": "p", "name": "run", "tags": ["a", "b"]}},
        {"type": "mlflow", "mlflow": {"tracking_uri": "https://mlflow.example:5000/x"}},
    ]
    hp = job.method.supervised.hyperparameters
    assert (hp.adapter_type, hp.lr_scheduler, hp.use_rslora) == ("dora", "cosine", True)


def test_full_fine_tuning_uses_a_tenth_of_the_learning_rate(client_a, upload, db_session):
    job = client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=upload(), method=_method(adapter_type="full"))
    spec = JobSpec.model_validate(db_session.get(Job, job.id).spec)
    assert spec.adapter.type == AdapterType.full
    assert spec.hyperparameters.learning_rate == pytest.approx(0.1 * BASE_LORA_LEARNING_RATE)
    assert "lora_rank" not in job.method.supervised.hyperparameters.model_extra


def test_legacy_top_level_hyperparameters(client_a, upload, db_session):
    job = client_a.fine_tuning.jobs.create(
        model="tuneforge-tiny", training_file=upload(), hyperparameters={"n_epochs": 4, "batch_size": "auto"}
    )
    assert job.hyperparameters.n_epochs == 4 and job.hyperparameters.batch_size == 1
    assert JobSpec.model_validate(db_session.get(Job, job.id).spec).hyperparameters.n_epochs == 4


@pytest.mark.parametrize(
    ("examples", "epochs", "batch"),
    [(10, 10, 1), (34, 3, 1), (100, 3, 1), (1000, 3, 2), (9000, 2, 8), (30000, 1, 8)],
)
def test_auto_rules_stay_within_bounds(examples, epochs, batch):
    assert auto_n_epochs(examples) == epochs
    assert auto_batch_size(examples) == batch


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"method": _method(n_epochs=-1)}, f"{HP}.n_epochs"),
        ({"method": _method(n_epochs="lots")}, f"{HP}.n_epochs"),
        ({"method": _method(batch_size=0)}, f"{HP}.batch_size"),
        ({"method": _method(learning_rate_multiplier=0)}, f"{HP}.learning_rate_multiplier"),
        ({"method": _method(lora_rank=0)}, f"{HP}.lora_rank"),
        ({"method": _method(lora_rank=257)}, f"{HP}.lora_rank"),
        ({"method": _method(lora_dropout=1.0)}, f"{HP}.lora_dropout"),
        ({"method": _method(lora_target_modules=["q_proj", "lm_head"])}, f"{HP}.lora_target_modules.1"),
        ({"method": _method(lora_target_modules=[])}, f"{HP}.lora_target_modules"),
        ({"method": _method(mystery=1)}, f"{HP}.mystery"),
        ({"method": {"type": "reinforcement"}}, "method.type"),
        ({"method": {"type": "dpo"}}, "training_file"),  # a chat file cannot train DPO
        ({"method": _method(beta=0.1)}, f"{HP}.beta"),  # beta is not a supervised knob
        ({"method": _method(adapter_type="full", quantization="nf4")}, "quantization"),
        ({"method": _method(warmup_ratio=1.0)}, f"{HP}.warmup_ratio"),
        ({"method": {"type": "grpo", "grpo": {"hyperparameters": {}}}}, "method.grpo.rewards"),
        ({"method": {"type": "grpo", "grpo": {"rewards": [{"kind": "regex_match", "pattern": "("}]}}}, "method.grpo.rewards[0]"),
        ({"method": {"type": "grpo", "grpo": {"rewards": [{"kind": "json_schema", "json_schema": {"type": 5}}]}}}, "method.grpo.rewards[0]"),
        ({"method": {"type": "grpo", "grpo": {"rewards": [{"kind": "length_penalty"}]}}}, "method.grpo.rewards[0]"),
        ({"method": {"type": "grpo", "grpo": {"rewards": [{"kind": "python", "code": "x"}]}}}, "method.grpo.rewards.0.kind"),
        ({"hyperparameters": {"n_epochs": 0}}, "hyperparameters.n_epochs"),
        ({"hyperparameters": {"n_epochs": 2}, "method": _method(n_epochs=3)}, "hyperparameters"),
        ({"suffix": "x" * 65}, "suffix"),
        ({"suffix": "bad suffix!"}, "suffix"),
        ({"seed": -1}, "seed"),
        ({"model": "gpt-4o"}, "model"),
        ({"training_file": "file-doesnotexist"}, "training_file"),
        ({"validation_file": "file-doesnotexist"}, "validation_file"),
        ({"integrations": [{"type": "wandb"}]}, "integrations[0].wandb"),
        ({"integrations": [{"type": "slack"}]}, "integrations.0.type"),
        # a tracking URI is checked before the job is stored: "http://[::1" was stored, then failed every read
        ({"integrations": [{"type": "tensorboard"}, {"type": "mlflow", "mlflow": {"tracking_uri": "http://[::1"}}]},
         "integrations[1].mlflow.tracking_uri"),
        ({"integrations": [{"type": "mlflow", "mlflow": {"tracking_uri": "https://u:p@[::1/x"}}]}, "integrations[0].mlflow.tracking_uri"),
        ({"integrations": [{"type": "mlflow", "mlflow": {"tracking_uri": "http://mlflow:port"}}]}, "integrations[0].mlflow.tracking_uri"),
        ({"integrations": [{"type": "mlflow", "mlflow": {"tracking_uri": "ftp://mlflow.example"}}]}, "integrations[0].mlflow.tracking_uri"),
        ({"integrations": [{"type": "mlflow", "mlflow": {"tracking_uri": "mlflow.example:5000"}}]}, "integrations[0].mlflow.tracking_uri"),
        ({"integrations": [{"type": "mlflow", "mlflow": {"tracking_uri": "http://mlflow.example/a b"}}]}, "integrations[0].mlflow.tracking_uri"),
        # JSON booleans are not numbers (n_epochs: true trained one epoch)
        ({"method": _method(n_epochs=True)}, f"{HP}.n_epochs"),
        ({"method": _method(batch_size=False)}, f"{HP}.batch_size"),
        ({"method": _method(learning_rate_multiplier=True)}, f"{HP}.learning_rate_multiplier"),
        ({"method": _method(lora_rank=True)}, f"{HP}.lora_rank"),
        ({"method": _method(lora_alpha=True)}, f"{HP}.lora_alpha"),
        ({"method": _method(gradient_accumulation_steps=True)}, f"{HP}.gradient_accumulation_steps"),
        ({"method": _method(max_seq_length=True)}, f"{HP}.max_seq_length"),
        ({"hyperparameters": {"n_epochs": True}}, "hyperparameters.n_epochs"),
        ({"seed": True}, "seed"),
        ({"extra_body": {"runtime": {"checkpoint_every_steps": True}}}, "runtime.checkpoint_every_steps"),
        ({"extra_body": {"runtime": {"fp8": "sometimes"}}}, "runtime.fp8"),
        ({"extra_body": {"runtime": {"attention": "flash9"}}}, "runtime.attention"),
    ],
)
def test_invalid_input_is_400_naming_the_field_and_creates_nothing(client_a, upload, org_a, db_session, kwargs, param):
    args = {"model": "tuneforge-tiny", "training_file": upload(), **kwargs}
    with pytest.raises(openai.BadRequestError) as err:
        client_a.fine_tuning.jobs.create(**args)
    assert err.value.body["param"] == param, err.value.body
    assert err.value.body["type"] == "invalid_request_error" and err.value.body["message"]
    assert db_session.scalars(select(Job).where(Job.org_id == org_a[0].id)).first() is None


def test_a_boolean_hyperparameter_is_refused_as_not_a_number(client_a, upload):
    with pytest.raises(openai.BadRequestError) as err:
        client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=upload(), method=_method(n_epochs=True))
    assert err.value.body["code"] == "invalid_value" and "not a boolean" in err.value.body["message"]


@pytest.mark.parametrize("uri", ["https://mlflow.example:5000/x", "http://[::1]:5000", "file:///tmp/mlruns"])
def test_well_formed_tracking_uris_are_accepted_as_given(client_a, upload, uri):
    job = client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=upload(),
                                           integrations=[{"type": "mlflow", "mlflow": {"tracking_uri": uri}}])
    assert job.integrations[0].model_dump(exclude_none=True)["mlflow"] == {"tracking_uri": uri}


@pytest.mark.parametrize(("stored", "shown"), [
    ("http://user:secret@[::1", "http://[::1"),  # urlsplit refuses it: "Invalid IPv6 URL"
    ("http://[::1/a@b", "http://b"),  # credentials or not, nothing before an "@" is shown
    ("user:secret@mlflow.example", "mlflow.example"),
    ("https://user:secret@mlflow.example:5000/x", "https://mlflow.example:5000/x"),
])
def test_a_stored_malformed_tracking_uri_never_breaks_reads_nor_shows_credentials(client_a, upload, db_session, stored, shown):
    """A job stored before tracking URIs were checked lists, retrieves and cancels: rendering it used to
    raise, a 500 on every list of the org's jobs."""
    job = client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=upload(), integrations=[{"type": "tensorboard"}])
    row = db_session.get(Job, job.id)
    row.spec = {**row.spec, "integrations": {**row.spec["integrations"], "mlflow_tracking_uri": stored}}
    db_session.flush()
    listed = [j for j in client_a.fine_tuning.jobs.list() if j.id == job.id]
    for seen in (listed[0], client_a.fine_tuning.jobs.retrieve(job.id), client_a.fine_tuning.jobs.cancel(job.id)):
        mlflow = [i.model_dump(exclude_none=True) for i in seen.integrations if i.type == "mlflow"]
        assert mlflow == [{"type": "mlflow", "mlflow": {"tracking_uri": shown}}]
        assert "secret" not in json.dumps(seen.model_dump())


def test_training_file_must_exist_in_org_with_fine_tune_purpose(client_a, upload, org_a, db_session):
    deleted = upload()
    client_a.files.delete(deleted)
    other = File(org_id=org_a[0].id, filename="a.jsonl", purpose="assistants", bytes=1, storage_key="k", examples=20)
    db_session.add(other)
    db_session.flush()
    for file_id in (deleted, other.id):
        with pytest.raises(openai.BadRequestError) as err:
            client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=file_id)
        assert err.value.body["param"] == "training_file"


def test_list_is_newest_first_with_cursor_pagination(client_a, upload):
    file_id = upload()
    ids = [client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=file_id).id for _ in range(5)]
    first = client_a.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in first.data] == ids[::-1][:2] and first.has_more
    second = client_a.fine_tuning.jobs.list(limit=2, after=first.data[-1].id)
    assert [j.id for j in second.data] == ids[::-1][2:4] and second.has_more
    last = client_a.fine_tuning.jobs.list(limit=2, after=second.data[-1].id)
    assert [j.id for j in last.data] == ids[:1] and not last.has_more
    assert [j.id for j in client_a.fine_tuning.jobs.list(limit=2)] == ids[::-1]  # the SDK follows the cursor
    for bad in ({"limit": 0}, {"limit": 101}, {"after": "ftjob-nope"}):
        with pytest.raises(openai.BadRequestError):
            client_a.fine_tuning.jobs.list(**bad)


def test_metadata_is_kept_returned_and_filters_the_list(client_a, upload):
    file_id = upload()

    def create(**kwargs):
        return client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=file_id, **kwargs).id

    def listed(**kwargs) -> list[str]:
        return [j.id for j in client_a.fine_tuning.jobs.list(**kwargs)]

    a, b = create(metadata={"team": "search", "run": "1"}), create(metadata={"team": "search", "run": "2"})
    plain = create()
    assert client_a.fine_tuning.jobs.retrieve(a).metadata == {"team": "search", "run": "1"}
    assert client_a.fine_tuning.jobs.retrieve(plain).metadata is None
    assert listed(metadata={"team": "search"}) == [b, a]  # the SDK sends metadata[team]=search
    assert listed(metadata={"team": "search", "run": "1"}) == [a]
    assert listed(metadata={"team": "ads"}) == []
    assert listed(extra_query={"metadata": "null"}) == [plain]
    assert listed() == [plain, b, a]
    with pytest.raises(openai.BadRequestError) as err:
        client_a.fine_tuning.jobs.list(extra_query={"metadata": "team"})
    assert err.value.body["param"] == "metadata"


@pytest.mark.parametrize("metadata", [{f"k{i}": "v" for i in range(17)}, {"k" * 65: "v"}, {"": "v"}, {"k": "v" * 513}, {"k": 1}])
def test_metadata_beyond_openais_limits_is_400(client_a, upload, org_a, db_session, metadata):
    with pytest.raises(openai.BadRequestError) as err:
        client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=upload(), metadata=metadata)
    assert err.value.body["param"].startswith("metadata"), err.value.body
    assert db_session.scalars(select(Job).where(Job.org_id == org_a[0].id)).first() is None


def test_cancel_while_queued_cancels_at_once_and_twice_is_400(client_a, upload, db_session):
    job = client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=upload())
    row = db_session.get(Job, job.id)
    assert mark_queued(db_session, row)
    cancelled = client_a.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.finished_at is not None
    assert client_a.fine_tuning.jobs.retrieve(job.id).status == "cancelled"
    with pytest.raises(openai.BadRequestError) as err:
        client_a.fine_tuning.jobs.cancel(job.id)
    assert err.value.body["code"] == "invalid_job_status"


def test_cancel_running_job_flags_it_for_its_worker(client_a, upload, db_session):
    job = client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=upload())
    row = db_session.get(Job, job.id)
    mark_queued(db_session, row)
    assert claim(db_session, row, "worker-1", 30)
    assert client_a.fine_tuning.jobs.cancel(job.id).status == "running"
    db_session.refresh(row)
    assert row.cancel_requested


def test_pause_and_resume_through_the_sdk(client_a, upload, db_session):
    """OpenAI's pause and resume: a queued job pauses at once; a running one shows "pausing" until its
    worker stops it (scheduler.jobs); a paused job resumes into the queue; anything else is a 400."""
    job = client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=upload())
    row = db_session.get(Job, job.id)
    with pytest.raises(openai.BadRequestError) as err:
        client_a.fine_tuning.jobs.pause(job.id)  # still validating its files
    assert err.value.body["code"] == "invalid_job_status"
    mark_queued(db_session, row)
    assert client_a.fine_tuning.jobs.pause(job.id).status == "paused"
    assert client_a.fine_tuning.jobs.retrieve(job.id).status == "paused"
    assert client_a.fine_tuning.jobs.resume(job.id).status == "queued"
    with pytest.raises(openai.BadRequestError):
        client_a.fine_tuning.jobs.resume(job.id)  # not paused

    db_session.refresh(row)
    assert claim(db_session, row, "worker-1", 30)
    assert client_a.fine_tuning.jobs.pause(job.id).status == "pausing"
    assert client_a.fine_tuning.jobs.list().data[0].status == "pausing"
    messages = [e.message for e in client_a.fine_tuning.jobs.list_events(job.id, limit=50)]
    assert "Pause requested; stopping the running job at a checkpoint" in messages and "Job resumed; it continues from its last checkpoint" in messages
    with pytest.raises(openai.NotFoundError):
        client_a.fine_tuning.jobs.pause("ftjob-nope")


def test_failed_job_exposes_its_error(client_a, upload, db_session):
    job = client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=upload())
    fail(db_session, db_session.get(Job, job.id), "invalid_training_file", "line 3 is bad", "training_file")
    got = client_a.fine_tuning.jobs.retrieve(job.id)
    assert got.status == "failed"
    assert (got.error.code, got.error.message, got.error.param) == ("invalid_training_file", "line 3 is bad", "training_file")
    with pytest.raises(openai.BadRequestError):
        client_a.fine_tuning.jobs.cancel(job.id)


def test_events_newest_first_with_metrics_and_pagination(client_a, upload, db_session):
    job = client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=upload())
    row = db_session.get(Job, job.id)
    mark_queued(db_session, row)
    for step in (1, 2, 3):
        add_event(db_session, row, f"Step {step}", type="metrics", data={"step": step, "train_loss": 2.0 / step, "valid_loss": None, "tokens": 100 * step})
    events = client_a.fine_tuning.jobs.list_events(job.id, limit=2)
    assert [e.message for e in events.data] == ["Step 3", "Step 2"] and events.has_more
    assert events.data[0].type == "metrics" and events.data[0].data == {"step": 3, "train_loss": 2.0 / 3, "valid_loss": None, "tokens": 300}
    everything = [e.message for e in client_a.fine_tuning.jobs.list_events(job.id, limit=2)]
    assert everything[:4] == ["Step 3", "Step 2", "Step 1", "Validated training file; job queued"]
    assert everything[-1] == f"Created fine-tuning job: {job.id}" and len(everything) == 6  # and the plan


def test_checkpoints_are_named_after_the_fine_tuned_model(client_a, upload, org_a, db_session):
    job = client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=upload(), suffix="bot")
    for step in (10, 20, 30):
        db_session.add(Checkpoint(job_id=job.id, org_id=org_a[0].id, step=step, storage_key=f"k/{step}", metrics={"train_loss": 1.0 / step}))
    db_session.flush()
    page = client_a.fine_tuning.jobs.checkpoints.list(job.id, limit=2)
    assert [c.step_number for c in page.data] == [30, 20] and page.has_more
    first = page.data[0]
    assert first.object == "fine_tuning.job.checkpoint" and first.fine_tuning_job_id == job.id
    assert first.fine_tuned_model_checkpoint == f"ft:tuneforge-tiny:{org_a[0].name}:bot:{job.id}:ckpt-step-30"
    assert first.metrics.step == 30 and first.metrics.train_loss == pytest.approx(1 / 30)
    assert [c.step_number for c in client_a.fine_tuning.jobs.checkpoints.list(job.id, limit=2)] == [30, 20, 10]


def test_job_and_its_first_event_are_written_together(client_a, upload, org_a, db_session, monkeypatch):
    import api.services.jobs as job_service

    def broken_add_event(*args, **kwargs):
        raise RuntimeError("event table unavailable")

    file_id = upload()
    monkeypatch.setattr(job_service, "add_event", broken_add_event)
    with pytest.raises(openai.InternalServerError):
        client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=file_id)
    assert db_session.scalars(select(Job).where(Job.org_id == org_a[0].id)).first() is None


PREFERENCE_ROWS = b"".join(json.dumps({"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"}).encode() + b"\n" for i in range(10))


def _chat_rows(n: int) -> bytes:
    return b"".join(json.dumps({"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}).encode() + b"\n"
                    for i in range(n))


@pytest.mark.parametrize("rows,kwargs,param", [
    # a loss on the prompt is no part of DPO: the worker failed these with invalid_job_spec once queued
    (PREFERENCE_ROWS, {"method": {"type": "dpo"}, "extra_body": {"data": {"train_on_inputs": True}}}, "data.train_on_inputs"),
    # no validation file and the automatic split needs 100 training examples: 10 can have no validation data
    (None, {"extra_body": {"evaluation": {"fail_on_regression": True}}}, "evaluation.fail_on_regression"),
    (None, {"extra_body": {"evaluation": {"early_stopping_patience": 2}}}, "evaluation.early_stopping_patience"),
    (None, {"extra_body": {"data": {"validation_split": 0}, "evaluation": {"early_stopping_patience": 2}}}, "evaluation.early_stopping_patience"),
])
def test_a_spec_the_worker_would_refuse_is_400_naming_the_field_and_creates_nothing(client_a, upload, org_a, db_session, rows, kwargs, param):
    with pytest.raises(openai.BadRequestError) as err:
        client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=upload(rows), **kwargs)
    assert (err.value.body["param"], err.value.body["code"]) == (param, "invalid_value"), err.value.body
    assert param.split(".", 1)[1] in err.value.body["message"]
    assert db_session.scalars(select(Job).where(Job.org_id == org_a[0].id)).first() is None


@pytest.mark.parametrize("extra,param", [
    ({"metadata": {"team": "a\x00b"}}, "metadata"),
    ({"integrations": [{"type": "wandb", "wandb": {"project": "p\x00"}}]}, "integrations.0.wandb.project"),
])
def test_a_nul_character_in_any_field_is_400_naming_it_and_creates_nothing(client_a, upload, org_a, db_session, extra, param):
    # PostgreSQL's text and jsonb refuse NUL characters: every request model checks its strings
    with pytest.raises(openai.BadRequestError) as err:
        client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=upload(), extra_body=extra)
    assert err.value.body["param"] == param and "NUL" in err.value.body["message"], err.value.body
    assert db_session.scalars(select(Job).where(Job.org_id == org_a[0].id)).first() is None


@pytest.mark.parametrize("metadata", [b'{"k": "\\ud800"}', b'{"\\udfff": "v"}'])
def test_a_lone_surrogate_in_metadata_is_400_naming_it_and_creates_nothing(http, upload, org_a, db_session, metadata):
    # valid JSON, no character: storing it was a 500 (sent as bytes: no client library encodes such a str)
    body = b'{"model": "tuneforge-tiny", "training_file": "%s", "metadata": %s}' % (upload().encode(), metadata)
    answer = http.post("/v1/fine_tuning/jobs", content=body, headers={"Authorization": f"Bearer {org_a[1]}", "Content-Type": "application/json"})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "metadata", answer.text
    assert db_session.scalars(select(Job).where(Job.org_id == org_a[0].id)).first() is None


def test_a_nul_character_in_a_query_is_400(client_a, http, org_a):
    # a metadata filter holding one was a 500 from the failed query (PostgreSQL refuses NUL characters)
    answer = http.get("/v1/fine_tuning/jobs?metadata[k]=%00", headers={"Authorization": f"Bearer {org_a[1]}"})
    assert answer.status_code == 400 and answer.json()["error"]["param"] == "metadata"


def test_exact_repeats_the_trainer_drops_do_not_count_toward_the_automatic_split(client_a, upload, db_session):
    """90 examples and 30 exact repeats of them: the trainer keeps 90 (it dedupes by default), under the
    automatic split's 100, so a validation gate is refused at creation; with ``data.dedupe`` off the 120
    are kept and the gate is accepted."""
    rows = _chat_rows(90) + b"".join(_chat_rows(90).splitlines(keepends=True)[:30])
    gate = {"evaluation": {"fail_on_regression": True}}
    with pytest.raises(openai.BadRequestError) as err:
        client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=upload(rows), extra_body=gate)
    assert err.value.body["param"] == "evaluation.fail_on_regression" and "has 90)" in err.value.body["message"]
    job = client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=upload(rows),
                                           extra_body={**gate, "data": {"dedupe": False}})
    assert not JobSpec.model_validate(db_session.get(Job, job.id).spec).data.dedupe


def test_the_automatic_split_counts_every_training_files_examples(client_a, upload, db_session):
    """60 + 60 examples: neither file alone reaches the automatic split's 100, together they do (the
    trainer holds out from the pooled files), so a validation gate is accepted; one file alone is not."""
    gate = {"evaluation": {"fail_on_regression": True}}
    with pytest.raises(openai.BadRequestError):
        client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=upload(_chat_rows(60)), extra_body=gate)
    job = client_a.fine_tuning.jobs.create(model="tuneforge-tiny", training_file=upload(_chat_rows(60)),
                                           extra_body={**gate, "data": {"extra_training_files": [{"file": upload(_chat_rows(60))}]}})
    assert JobSpec.model_validate(db_session.get(Job, job.id).spec).evaluation.fail_on_regression
