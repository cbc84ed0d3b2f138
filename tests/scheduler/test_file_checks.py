"""The scheduler's look at a job's files before queueing it (scheduler/file_checks.py): a job the worker
would refuse for its files fails here, before any GPU starts, with the error the worker would give
(checked against the worker's own data loaders), and a job it would train is queued untouched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gpu_worker.builtin import BUILTIN_MODELS, TINY
from gpu_worker.contract import DataFormat, DataOptions, Hyperparameters, JobSpec, Method, MethodParams, Reward, RewardKind, TrainingFile
from gpu_worker.storage import LocalStore
from gpu_worker.validation import validate_lines
from scheduler import file_checks
from scheduler.models import File, Job, JobEvent, JobStatus, new_id
from scheduler.settings import Settings


@pytest.fixture(scope="module")
def tokenizer_folder(tmp_path_factory) -> Path:
    """The built-in model's tokenizer files alone (what a scheduler has once a worker there built it)."""
    from gpu_worker.builtin import build_tokenizer

    out = tmp_path_factory.mktemp("tok")
    build_tokenizer(BUILTIN_MODELS[TINY].vocab_size).save_pretrained(out)
    return out


@pytest.fixture
def world(tmp_path, pg_url):
    settings = Settings(database_url=pg_url, data_dir=tmp_path / "data", storage_url=str(tmp_path / "objects"))
    return settings, LocalStore(tmp_path / "objects")


@pytest.fixture
def with_tokenizer(world, tokenizer_folder):
    """The scheduler's data dir holds the built-in model's tokenizer."""
    folder = world[0].data_dir / "models" / TINY
    folder.mkdir(parents=True)
    for f in tokenizer_folder.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


def _chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


class Jobs:
    def __init__(self, db_session, store, org):
        self.db, self.store, self.org = db_session, store, org

    def file(self, rows: list[dict]) -> File:
        """A stored file, as an upload stores it (its detected format)."""
        content = b"".join(json.dumps(r).encode() + b"\n" for r in rows)
        row = File(id=new_id("file-"), org_id=self.org.id, filename="f.jsonl", purpose="fine-tune", bytes=len(content), examples=len(rows),
                   format=validate_lines(content.splitlines(), min_examples=0).format)
        row.storage_key = f"orgs/{self.org.id}/files/{row.id}"
        self.store.put_bytes(row.storage_key, content)
        self.db.add(row)
        self.db.flush()
        return row

    def job(self, training: File, *, validation: File | None = None, model: str = TINY, **spec) -> Job:
        job_id = new_id("ftjob-")
        spec = JobSpec(job_id=job_id, org_id=self.org.id, base_model=model, seed=1, output_prefix=f"orgs/{self.org.id}/jobs/{job_id}",
                       hyperparameters=spec.pop("hyperparameters", Hyperparameters(n_epochs=2, batch_size=2, learning_rate=1e-3)),
                       training_file_key=training.storage_key, validation_file_key=validation.storage_key if validation else None, **spec)
        job = Job(id=job_id, org_id=self.org.id, model=model, training_file_id=training.id, validation_file_id=validation.id if validation else None,
                  seed=1, method={"type": spec.method.value}, spec=spec.model_dump(mode="json"), status=JobStatus.validating_files)
        self.db.add(job)
        self.db.flush()
        return job


@pytest.fixture
def made(db_session, world, make_org) -> Jobs:
    return Jobs(db_session, world[1], make_org()[0])


def _check(db_session, world, job):
    return file_checks.check_job(db_session, world[1], world[0], job)


def _events(db_session, job) -> list[str]:
    db_session.flush()
    return [e.message for e in db_session.query(JobEvent).filter(JobEvent.job_id == job.id).order_by(JobEvent.seq)]


def _worker_error(store, spec: JobSpec, tokenizer_folder) -> tuple[str, str]:
    """What the worker's data loading says about the same job: (param, message)."""
    from gpu_worker.data import DataError, load_sft_data
    from gpu_worker.data_preference import load_examples
    from gpu_worker.loading import load_tokenizer
    from gpu_worker.recipes.rewards import build_rewards

    tokenizer = load_tokenizer(str(tokenizer_folder), data_dir=tokenizer_folder)
    with pytest.raises(DataError) as err:
        if spec.method == Method.grpo:
            for key, param in ((spec.training_file_key, "training_file"), (spec.validation_file_key, "validation_file")):
                load_examples(store, key, tokenizer, DataFormat.prompt, max_seq_length=64, required_fields=build_rewards(spec.method_params).reference_fields, param=param)
        else:
            load_sft_data(store, spec, tokenizer)
    return err.value.param, str(err.value)


LONG_PROMPT = "please tell me a long story about the quick brown fox " * 2


def test_a_file_truncated_to_nothing_fails_as_the_worker_would(db_session, world, made, with_tokenizer):
    # every prompt fills max_seq_length=16: no answer token is left to train on
    job = made.job(made.file([_chat(LONG_PROMPT, f"answer {i}") for i in range(12)]),
                   hyperparameters=Hyperparameters(n_epochs=1, batch_size=2, learning_rate=1e-3, max_seq_length=16))
    problem = _check(db_session, world, job)
    assert (problem.code, problem.param, problem.message) == (
        "invalid_training_file", "training_file", "the file has no usable example (12 lost every trained token to max_seq_length=16)")
    assert _worker_error(world[1], JobSpec.model_validate(job.spec), with_tokenizer) == (problem.param, problem.message)


def test_a_validation_file_truncated_to_nothing_is_the_validation_files_problem(db_session, world, made, with_tokenizer):
    train = made.file([_chat(f"q{i}", f"a{i}") for i in range(12)])
    valid = made.file([_chat(LONG_PROMPT, f"answer {i}") for i in range(3)])
    job = made.job(train, validation=valid, hyperparameters=Hyperparameters(n_epochs=1, batch_size=2, learning_rate=1e-3, max_seq_length=16))
    problem = _check(db_session, world, job)
    assert (problem.code, problem.param) == ("invalid_validation_file", "validation_file")
    assert _worker_error(world[1], JobSpec.model_validate(job.spec), with_tokenizer) == (problem.param, problem.message)


def test_an_extra_file_that_dedupe_empties_fails_as_the_worker_would(db_session, world, made, with_tokenizer):
    rows = [_chat(f"q{i}", f"a{i}") for i in range(12)]
    train, extra = made.file(rows), made.file(rows[:10])
    job = made.job(train, data=DataOptions(extra_training_files=(TrainingFile(key=extra.storage_key),)))
    problem = _check(db_session, world, job)
    assert (problem.code, problem.param) == ("invalid_training_file", "extra_training_files[0]")
    assert _worker_error(world[1], JobSpec.model_validate(job.spec), with_tokenizer) == (problem.param, problem.message)
    # without dedupe the same files train
    kept = made.job(train, data=DataOptions(dedupe=False, extra_training_files=(TrainingFile(key=extra.storage_key),)))
    assert _check(db_session, world, kept) is None and kept.estimated_tokens > 0


GRPO = MethodParams(rewards=(Reward(kind=RewardKind.exact_match),))


def test_grpo_rows_without_the_reward_reference_fail_as_the_worker_would(db_session, world, made, with_tokenizer):
    rows = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(12)]
    rows[4] = {"prompt": "What is 4 + 4?", "solution": "8"}
    job = made.job(made.file(rows), method=Method.grpo, method_params=GRPO)
    problem = _check(db_session, world, job)
    assert (problem.code, problem.param, problem.message) == (
        "invalid_training_file", "training_file", "line 5: missing field 'answer' that the exact_match reward compares with")
    assert _worker_error(world[1], JobSpec.model_validate(job.spec), with_tokenizer) == (problem.param, problem.message)


def test_grpo_reference_fields_are_checked_without_a_tokenizer_in_every_file(db_session, world, made):
    # a reward naming another field, and a validation file lacking it
    params = MethodParams(rewards=(Reward(kind=RewardKind.exact_match, reference_field="final"),))
    train = made.file([{"prompt": f"q{i}", "final": f"a{i}"} for i in range(12)])
    valid = made.file([{"prompt": f"q{i}", "answer": f"a{i}"} for i in range(3)])
    problem = _check(db_session, world, made.job(train, validation=valid, method=Method.grpo, method_params=params))
    assert (problem.code, problem.param) == ("invalid_validation_file", "validation_file")
    assert problem.message == "line 1: missing field 'final' that the exact_match reward compares with"


def test_grpo_rows_that_carry_their_reference_are_queued(db_session, world, made):
    # "answer" from the row, or from a trailing assistant message (the worker reads it as the answer)
    rows = [{"prompt": f"q{i}", "answer": f"a{i}"} for i in range(6)] + [_chat(f"q{i}", f"a{i}") for i in range(6)]
    assert _check(db_session, world, made.job(made.file(rows), method=Method.grpo, method_params=GRPO)) is None
    # a regex reward reads no field
    regex = MethodParams(rewards=(Reward(kind=RewardKind.regex_match, pattern="[0-9]+"),))
    no_answer = made.file([{"prompt": f"q{i}"} for i in range(12)])
    assert _check(db_session, world, made.job(no_answer, method=Method.grpo, method_params=regex)) is None


def test_a_declared_format_is_checked_on_every_line(db_session, world, made):
    # a KTO file reads as prompt/completion lines until line 4, whose completion is a message, not a string
    rows = [{"prompt": f"q{i}", "completion": f"a{i}", "label": True} for i in range(12)]
    rows[3]["completion"] = [{"role": "assistant", "content": "a3"}]
    kto = made.file(rows)
    assert kto.format == "kto"
    problem = _check(db_session, world, made.job(kto, data=DataOptions(format=DataFormat.completion)))
    assert (problem.code, problem.param) == ("invalid_training_file", "training_file")
    assert problem.message.startswith("line 4: 'completion' must be a string")
    fine = made.file([{"prompt": f"q{i}", "completion": f"a{i}", "label": True} for i in range(12)])
    assert _check(db_session, world, made.job(fine, data=DataOptions(format=DataFormat.completion))) is None


def test_without_a_tokenizer_no_estimate_is_made_and_the_event_says_so(db_session, world, made):
    job = made.job(made.file([_chat(f"q{i}", f"a{i}") for i in range(12)]), model="meta-llama/Llama-3.2-1B")
    assert _check(db_session, world, job) is None and job.estimated_tokens is None
    (event,) = _events(db_session, job)
    assert "no token estimate is made before training" in event and "from the worker" not in event


def test_a_hub_tokenizer_in_the_hugging_face_cache_is_counted_with(db_session, world, made, tokenizer_folder, tmp_path, monkeypatch):
    snapshot = tmp_path / "hub" / "models--meta-llama--Llama-3.2-1B" / "snapshots" / "abc123"
    snapshot.mkdir(parents=True)
    for f in tokenizer_folder.iterdir():
        (snapshot / f.name).write_bytes(f.read_bytes())
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    hub = made.job(made.file([_chat(f"q{i}", f"a{i}") for i in range(12)]), model="meta-llama/Llama-3.2-1B")
    assert _check(db_session, world, hub) is None
    assert hub.estimated_tokens > 0 and _events(db_session, hub) == [f"Estimated trained tokens: {hub.estimated_tokens:,} (all epochs)"]


@pytest.mark.integration
def test_the_tick_fails_the_bad_job_with_the_workers_error_and_queues_the_good_one(tick_world):
    from scheduler.db import session_scope
    from scheduler.loop import validate_files
    from scheduler.tenancy import get_or_create_org

    url, settings, store = tick_world
    with session_scope(url) as session:
        made = Jobs(session, store, get_or_create_org(session, "acme"))
        bad = made.job(made.file([{"prompt": f"q{i}"} for i in range(12)]), method=Method.grpo, method_params=GRPO).id
        good = made.job(made.file([_chat(f"q{i}", f"a{i}") for i in range(12)])).id
    assert validate_files(settings) == 1
    with session_scope(url) as session:
        failed, queued = session.get(Job, bad), session.get(Job, good)
        assert failed.status == JobStatus.failed and failed.error == {
            "code": "invalid_training_file", "param": "training_file",
            "message": "line 1: missing field 'answer' that the exact_match reward compares with"}
        assert queued.status == JobStatus.queued and queued.error is None


def test_grpo_files_are_counted_as_the_prompts_the_recipe_reads_whatever_is_declared(db_session, world, made, with_tokenizer):
    # data.format "chat" is a format GRPO takes, but its recipe reads every file as prompts: a prompt
    # file declared chat trains, so it must not fail as chat lines without a reply
    prompts = made.file([{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(12)])
    job = made.job(prompts, method=Method.grpo, method_params=GRPO, data=DataOptions(format=DataFormat.chat))
    assert _check(db_session, world, job) is None
    assert job.estimated_tokens == 2 * 12 * 4 * 64  # epochs x prompts x generations x max completion


def test_a_line_the_chat_template_refuses_fails_as_the_worker_would(db_session, world, made, with_tokenizer):
    (with_tokenizer / "chat_template.jinja").write_text("{{ raise_exception('roles must alternate') }}")
    job = made.job(made.file([_chat(f"q{i}", f"a{i}") for i in range(12)]))
    problem = _check(db_session, world, job)
    assert (problem.code, problem.param) == ("invalid_training_file", "training_file")
    param, message = _worker_error(world[1], JobSpec.model_validate(job.spec), with_tokenizer)
    assert problem.message == f"{param}: {message}" and "roles must alternate" in message


def test_a_tokenizer_here_that_cannot_be_read_leaves_the_estimate_to_nobody_and_says_so(db_session, world, made, with_tokenizer):
    (with_tokenizer / "tokenizer.json").write_text("{not json")
    job = made.job(made.file([_chat(f"q{i}", f"a{i}") for i in range(12)]))
    assert _check(db_session, world, job) is None and job.estimated_tokens is None
    (event,) = _events(db_session, job)
    assert "failed" in event and "no token estimate is made before training" in event


def test_duplicates_that_bring_the_examples_under_the_automatic_split_fail_the_gate_as_the_worker_would(db_session, world, made, with_tokenizer):
    """120 uploaded examples pass the API's check (the automatic split needs 100), but 30 are exact
    repeats the trainer drops: 90 are left, no held-out split, nothing for fail_on_regression to compare."""
    from gpu_worker.contract import EvalOptions

    rows = [_chat(f"q{i}", f"a{i}") for i in range(90)]
    job = made.job(made.file(rows + rows[:30]), evaluation=EvalOptions(fail_on_regression=True))
    problem = _check(db_session, world, job)
    assert (problem.code, problem.param) == ("invalid_job_spec", "evaluation.fail_on_regression")
    assert "(the training data has 90)" in problem.message
    assert job.estimated_tokens is None
    # the same file without repeats keeps its split: queued, with its estimate
    kept = made.job(made.file(rows + [_chat(f"q{i}", f"b{i}") for i in range(30)]), evaluation=EvalOptions(fail_on_regression=True))
    assert _check(db_session, world, kept) is None and kept.estimated_tokens > 0


def test_a_stored_spec_the_worker_refuses_fails_without_a_tokenizer(db_session, world, made):
    """A DPO job stored with train_on_inputs (before the API refused it) fails here with the worker's
    code, not on a GPU."""
    rows = [{"prompt": f"q{i}", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(12)]
    job = made.job(made.file(rows), method=Method.dpo, data=DataOptions(train_on_inputs=True))
    problem = _check(db_session, world, job)
    assert (problem.code, problem.param) == ("invalid_job_spec", "data.train_on_inputs")
