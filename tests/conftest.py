"""Shared fixtures: real PostgreSQL (one fresh database per test run, one rolled-back transaction per
test), isolated settings, and helpers to make an organization with an API key."""

from __future__ import annotations

import os
import socket
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.orm import Session

PG_ADMIN_URL = os.environ.get("TUNEFORGE_TEST_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("TUNEFORGE_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    if not has_cuda:
        skip = pytest.mark.skip(reason="needs a CUDA GPU")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


def _scratch_database(name_hint: str) -> str:
    """Create an empty PostgreSQL database and return its URL (dropped by the caller)."""
    name = f"tf_{name_hint}_{uuid.uuid4().hex[:8]}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'CREATE DATABASE "{name}"'))
    admin.dispose()
    return PG_ADMIN_URL.rsplit("/", 1)[0] + "/" + name


def _drop_database(url: str) -> None:
    name = url.rsplit("/", 1)[1]
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    admin.dispose()


@pytest.fixture(scope="session")
def scratch_database():
    """Factory for empty PostgreSQL databases, all dropped at the end of the run."""
    made: list[str] = []

    def make(hint: str = "db") -> str:
        made.append(_scratch_database(hint))
        return made[-1]

    yield make
    for url in made:
        _drop_database(url)


@pytest.fixture(scope="session")
def pg_url(scratch_database) -> str:
    """A PostgreSQL database with the current schema, shared by the whole run."""
    from scheduler.models import Base

    url = scratch_database("run")
    engine = create_engine(url)
    Base.metadata.create_all(engine)
    engine.dispose()
    return url


@pytest.fixture
def db_session(pg_url):
    """A session inside one transaction that is rolled back after the test: no state leaks.
    Code under test may commit; its commits become savepoints of the outer transaction."""
    from scheduler.db import get_engine

    engine = get_engine(pg_url)
    conn = engine.connect()
    outer = conn.begin()
    session = Session(bind=conn, join_transaction_mode="create_savepoint", expire_on_commit=False)
    try:
        yield session
    finally:
        session.close()
        outer.rollback()
        conn.close()


@pytest.fixture
def data_dir(tmp_path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
def make_org(db_session):
    """make_org(name, role=admin) -> (org, plain_api_key)."""
    from scheduler.models import Role
    from scheduler.tenancy import create_api_key, get_or_create_org

    def make(name: str | None = None, role: Role = Role.admin):
        org = get_or_create_org(db_session, name or f"org-{uuid.uuid4().hex[:6]}")
        _, key = create_api_key(db_session, org, "test", role)
        db_session.flush()
        return org, key

    return make


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3-protocol server (moto's) on loopback, for the whole run."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint, monkeypatch) -> tuple[str, dict[str, str]]:
    """A fresh bucket; returns (name, the AWS environment that reaches it)."""
    import boto3

    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": s3_endpoint}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    bucket = f"tf-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=s3_endpoint).create_bucket(Bucket=bucket)
    return bucket, env
