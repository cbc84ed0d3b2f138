import pytest

from gpu_worker.contract import Hyperparameters, JobSpec
from scheduler.models import File, Job, JobStatus, new_id


@pytest.fixture
def make_job(db_session):
    """make_job(org, status=queued) -> a Job row with a valid spec (its files need not exist)."""

    def make(org, status: JobStatus = JobStatus.queued, examples: int = 20) -> Job:
        f = File(org_id=org.id, filename="t.jsonl", purpose="fine-tune", bytes=1, storage_key=f"orgs/{org.id}/files/x", examples=examples)
        db_session.add(f)
        db_session.flush()
        job_id = new_id("ftjob-")
        spec = JobSpec(
            job_id=job_id, org_id=org.id, base_model="tuneforge-tiny",
            hyperparameters=Hyperparameters(n_epochs=1, batch_size=2, learning_rate=1e-3), seed=1,
            training_file_key=f.storage_key, output_prefix=f"orgs/{org.id}/jobs/{job_id}",
        )
        job = Job(id=job_id, org_id=org.id, model="tuneforge-tiny", training_file_id=f.id, seed=1, method={"type": "supervised"}, spec=spec.model_dump(mode="json"), status=status)
        db_session.add(job)
        db_session.flush()
        return job

    return make


@pytest.fixture
def tick_world(scratch_database, tmp_path):
    """(database url, settings, object store) of a migrated scratch database whose commits are real: what
    the scheduler's tick reads from its own sessions."""
    from gpu_worker.storage import LocalStore
    from scheduler.migrate import upgrade
    from scheduler.settings import Settings

    url = scratch_database("tick")
    upgrade(url)
    settings = Settings(database_url=url, data_dir=tmp_path, storage_url=str(tmp_path / "objects"))
    return url, settings, LocalStore(tmp_path / "objects")
