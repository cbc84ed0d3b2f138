"""Organizations, API keys and the principal a request acts as.

A ``Principal`` is what every service function receives: who is calling (an API key today, an OIDC
subject later), for which organization, with which roles. Routes never look at keys or tokens
themselves; they ask for the principal and pass it on.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass, field

from sqlalchemy import select
from sqlalchemy.orm import Session

from scheduler.models import ApiKey, Organization, Role, utcnow

KEY_PREFIX = "tf-"
DEFAULT_ORG = "default"
# An organization's name is part of its fine-tuned models' names (``ft:{base}:{org}:{suffix}:{job}``): no
# ":" (the separator), "/", space or control character (a model so named could not be asked for)
_ORG_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
ORG_NAME_RULE = "1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"


@dataclass(frozen=True)
class Principal:
    org_id: str
    subject: str  # "key:<id>" for API keys, "oidc:<iss>#<sub>" for OIDC users
    roles: frozenset[Role] = field(default_factory=frozenset)
    api_key_id: str | None = None

    def has(self, role: Role) -> bool:
        return Role.admin in self.roles or role in self.roles

    @property
    def can_write(self) -> bool:
        return self.has(Role.member)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def generate_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def create_api_key(session: Session, org: Organization, name: str, role: Role, key: str | None = None) -> tuple[ApiKey, str]:
    """Create a key; the plain key is returned once and never stored."""
    key = key or generate_key()
    row = ApiKey(org_id=org.id, name=name, key_hash=hash_key(key), key_hint=f"{key[:3]}…{key[-4:]}", role=role)
    session.add(row)
    session.flush()
    return row, key


def check_org_name(name: str) -> str:
    """``name`` if a new organization may be called so, else ``ValueError`` saying the rule."""
    if not _ORG_NAME.fullmatch(name):
        raise ValueError(f"invalid organization name {name!r}: {ORG_NAME_RULE} (it becomes part of fine-tuned model names)")
    return name


def get_or_create_org(session: Session, name: str) -> Organization:
    """The organization called ``name``, created if there is none (``check_org_name``'s rule)."""
    org = session.scalar(select(Organization).where(Organization.name == check_org_name(name)))
    if org is None:
        org = Organization(name=name)
        session.add(org)
        session.flush()
    return org


def authenticate_key(session: Session, key: str) -> Principal | None:
    if not key.startswith(KEY_PREFIX):
        return None
    row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key), ApiKey.revoked_at.is_(None)))
    if row is None:
        return None
    return Principal(org_id=row.org_id, subject=f"key:{row.id}", roles=frozenset({row.role}), api_key_id=row.id)


def ensure_bootstrap_key(session: Session, key: str) -> None:
    """Make ``key`` an admin key of the default organization, once (idempotent across restarts)."""
    if not key.startswith(KEY_PREFIX) or len(key) < 20:
        raise ValueError(f"TUNEFORGE_BOOTSTRAP_API_KEY must start with {KEY_PREFIX!r} and be at least 20 characters")
    if session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(key))) is not None:
        return
    org = get_or_create_org(session, DEFAULT_ORG)
    create_api_key(session, org, "bootstrap", Role.admin, key=key)


def revoke(session: Session, key_row: ApiKey) -> None:
    key_row.revoked_at = utcnow()
