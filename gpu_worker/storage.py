"""Object storage: one small interface, a local-folder store (embedded default) and S3 (boto3).

Keys are '/'-separated relative paths. Every side of the platform reaches artifacts through this
module: the API stores uploaded files, workers write checkpoints and adapters, engines read adapters.
The store is chosen by a URL: ``file:///abs/path`` or a bare path for a folder, ``s3://bucket/prefix``
for S3 (endpoint and credentials come from the usual AWS environment variables, or ``AWS_ENDPOINT_URL``).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import BinaryIO, Iterator, Protocol
from urllib.parse import urlparse


log = logging.getLogger(__name__)


class ObjectNotFound(KeyError):
    pass


def _check_key(key: str) -> str:
    p = PurePosixPath(key)
    if not key or p.is_absolute() or ".." in p.parts or key.endswith("/"):
        raise ValueError(f"invalid object key: {key!r}")
    return str(p)


class ObjectStore(Protocol):
    url: str

    def put_file(self, key: str, path: str | os.PathLike) -> None: ...
    def put_bytes(self, key: str, data: bytes) -> None: ...
    def get_bytes(self, key: str) -> bytes: ...
    def get_file(self, key: str, path: str | os.PathLike) -> None: ...
    def open(self, key: str) -> BinaryIO: ...
    def exists(self, key: str) -> bool: ...
    def size(self, key: str) -> int: ...
    def list(self, prefix: str) -> list[str]: ...
    def delete(self, key: str) -> None: ...


def put_dir(store: ObjectStore, local_dir: str | os.PathLike, prefix: str) -> list[str]:
    """Upload every file under ``local_dir`` to ``prefix/``; returns the keys written, sorted."""
    root = Path(local_dir)
    keys = []
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        key = f"{prefix.rstrip('/')}/{path.relative_to(root).as_posix()}"
        store.put_file(key, path)
        keys.append(key)
    return keys


def get_dir(store: ObjectStore, prefix: str, local_dir: str | os.PathLike) -> list[Path]:
    """Download every object under ``prefix/`` into ``local_dir``; raises ObjectNotFound if none."""
    prefix = prefix.rstrip("/") + "/"
    keys = store.list(prefix)
    if not keys:
        raise ObjectNotFound(prefix)
    out = []
    for key in keys:
        dest = Path(local_dir) / key[len(prefix):]
        dest.parent.mkdir(parents=True, exist_ok=True)
        store.get_file(key, dest)
        out.append(dest)
    return out


def delete_orphans(store: ObjectStore, keys, what: str) -> None:
    """Delete objects whose rows are already gone or changed: a failure leaves an unreachable object,
    logged, never a row without its object; it does not stop the rest."""
    for key in keys:
        try:
            store.delete(key)
        except Exception:
            log.warning("could not delete %s %s; the object is orphaned", what, key, exc_info=True)


def delete_prefix(store: ObjectStore, prefix: str) -> int:
    keys = store.list(prefix.rstrip("/") + "/")
    for key in keys:
        store.delete(key)
    return len(keys)


class LocalStore:
    """A folder on disk. Writes go to a temporary file first and are renamed into place, so a reader
    never sees half an object and a crash never leaves one."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.url = self.root.as_uri()

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def _atomic_write(self, key: str, write) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                write(f)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def put_file(self, key, path):
        self._atomic_write(key, lambda f: shutil.copyfileobj(open(path, "rb"), f))

    def put_bytes(self, key, data):
        self._atomic_write(key, lambda f: f.write(data))

    def get_bytes(self, key):
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def get_file(self, key, path):
        try:
            shutil.copyfile(self._path(key), path)
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def open(self, key):
        try:
            return open(self._path(key), "rb")
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def exists(self, key):
        return self._path(key).is_file()

    def size(self, key):
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise ObjectNotFound(key) from None

    def list(self, prefix):
        base = self.root
        start = base / prefix if prefix else base
        search = start if start.is_dir() else start.parent
        if not search.is_dir():
            return []
        keys = (p.relative_to(base).as_posix() for p in search.rglob("*") if p.is_file())
        return sorted(k for k in keys if k.startswith(prefix) and not PurePosixPath(k).name.startswith(".tmp-"))

    def delete(self, key):
        path = self._path(key)
        path.unlink(missing_ok=True)
        # Tidy empty folders up to the root so listing stays cheap.
        for parent in path.parents:
            if parent == self.root or not parent.is_dir() or any(parent.iterdir()):
                break
            parent.rmdir()


class S3Store:
    """An S3 bucket (or any S3-protocol server) through boto3."""

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None, client=None):
        import boto3  # imported here: the local store must not need it

        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.url = f"s3://{bucket}/{self.prefix}".rstrip("/")
        self._s3 = client or boto3.client("s3", endpoint_url=endpoint_url or os.environ.get("AWS_ENDPOINT_URL"))

    def _k(self, key: str) -> str:
        key = _check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _missing(self, err) -> bool:
        return err.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}

    def put_file(self, key, path):
        self._s3.upload_file(str(path), self.bucket, self._k(key))

    def put_bytes(self, key, data):
        self._s3.put_object(Bucket=self.bucket, Key=self._k(key), Body=data)

    def get_bytes(self, key):
        with self.open(key) as body:
            return body.read()

    def get_file(self, key, path):
        from botocore.exceptions import ClientError

        try:
            self._s3.download_file(self.bucket, self._k(key), str(path))
        except ClientError as err:
            if self._missing(err):
                raise ObjectNotFound(key) from None
            raise

    def open(self, key):
        from botocore.exceptions import ClientError

        try:
            return self._s3.get_object(Bucket=self.bucket, Key=self._k(key))["Body"]
        except ClientError as err:
            if self._missing(err):
                raise ObjectNotFound(key) from None
            raise

    def exists(self, key):
        try:
            self.size(key)
            return True
        except ObjectNotFound:
            return False

    def size(self, key):
        from botocore.exceptions import ClientError

        try:
            return self._s3.head_object(Bucket=self.bucket, Key=self._k(key))["ContentLength"]
        except ClientError as err:
            if self._missing(err):
                raise ObjectNotFound(key) from None
            raise

    def list(self, prefix):
        full = f"{self.prefix}/{prefix}" if self.prefix else prefix
        strip = len(self.prefix) + 1 if self.prefix else 0
        keys: list[str] = []
        for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full):
            keys.extend(obj["Key"][strip:] for obj in page.get("Contents", []))
        return sorted(keys)

    def delete(self, key):
        self._s3.delete_object(Bucket=self.bucket, Key=self._k(key))


def open_store(url: str) -> ObjectStore:
    """Build the store a URL names: ``s3://bucket[/prefix]``, ``file:///path`` or a plain path."""
    parsed = urlparse(url)
    if parsed.scheme == "s3":
        return S3Store(parsed.netloc, parsed.path)
    if parsed.scheme == "file":
        return LocalStore(parsed.path)
    if parsed.scheme == "":
        return LocalStore(url)
    raise ValueError(f"unsupported storage URL {url!r}: use s3://bucket/prefix or a folder path")


def iter_lines(store: ObjectStore, key: str) -> Iterator[bytes]:
    """Stream an object line by line without holding it all in memory."""
    with store.open(key) as body:
        buf = b""
        while chunk := body.read(1 << 16):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            yield from lines
        if buf:
            yield buf
