"""``tuneforge create-key``: a key for an organization, created if new; a name that could not be part of a
fine-tuned model's name (``ft:{base}:{org}:{suffix}:{job}``) is refused naming the argument, creating
nothing."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from scheduler import cli
from scheduler.db import session_scope
from scheduler.models import ApiKey, Organization, Role
from scheduler.settings import get_settings
from scheduler.tenancy import authenticate_key


@pytest.fixture
def embedded(tmp_path, monkeypatch):
    monkeypatch.setenv("TUNEFORGE_DATA_DIR", str(tmp_path))
    for name in ("TUNEFORGE_DATABASE_URL", "TUNEFORGE_BROKER_URL"):
        monkeypatch.delenv(name, raising=False)
    get_settings.cache_clear()
    yield get_settings().database_url
    get_settings.cache_clear()


def test_a_key_for_a_new_organization_authenticates(embedded, capsys):
    cli.main(["create-key", "--org", "acme.labs_2", "--role", "member"])
    key = capsys.readouterr().out.strip()
    with session_scope(embedded) as session:
        principal = authenticate_key(session, key)
        assert session.get(Organization, principal.org_id).name == "acme.labs_2" and not principal.has(Role.admin)


@pytest.mark.parametrize("name", ["", "a:b", "a/b", "a b", "a\x00", "a\x01", ".lead", "x" * 65])
def test_a_name_that_cannot_be_in_a_model_name_is_refused_naming_the_argument(embedded, capsys, name):
    cli.main(["create-key", "--org", "default"])  # the schema exists: nothing below may be added to it
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        cli.main(["create-key", "--org", name])
    assert exit_.value.code == 2 and "argument --org: invalid organization name" in capsys.readouterr().err
    with session_scope(embedded) as session:
        assert session.scalar(select(func.count()).select_from(Organization)) == 1
        assert session.scalar(select(func.count()).select_from(ApiKey)) == 1
