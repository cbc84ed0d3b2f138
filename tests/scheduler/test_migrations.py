"""Migrations: upgrade → downgrade → upgrade works, and the models match the migrated schema
(autogenerate would find nothing to add), on PostgreSQL and SQLite."""

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect

from scheduler.migrate import downgrade, upgrade
from scheduler.models import Base


@pytest.fixture(params=["postgresql", "sqlite"])
def empty_db(request, scratch_database, tmp_path):
    if request.param == "postgresql":
        return scratch_database("migrations")
    return f"sqlite:///{tmp_path / 'm.db'}"


@pytest.mark.integration
def test_upgrade_downgrade_upgrade_and_no_diff(empty_db):
    upgrade(empty_db)
    downgrade(empty_db)
    engine = create_engine(empty_db)
    assert set(inspect(engine).get_table_names()) <= {"alembic_version"}
    upgrade(empty_db)
    assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
    engine.dispose()
    assert diff == []
