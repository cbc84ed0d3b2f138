"""Reading a multipart file upload as it streams in.

FastAPI's ``UploadFile`` spools the whole body before the route runs, which would defeat both the
size limit (a 10 GB body would be read to the end before being refused) and line-by-line validation.
This reader parses the multipart stream itself: the file part goes chunk by chunk into a temporary
file and, split into lines, into a ``FileValidator`` (``LineValidator``; a part of a chunked upload is
not validated alone: services.uploads validates the parts joined); reading stops the moment the file
exceeds the limit. The temporary file is removed when the ``receive_upload`` context exits, whatever
happened.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator, BinaryIO

from python_multipart import MultipartParser
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import parse_options_header
from starlette.requests import ClientDisconnect, Request

from api.errors import InvalidRequest, PayloadTooLarge
from gpu_worker.validation import FileValidator, ValidationReport

_MAX_FIELD_BYTES = 1024  # purpose and friends are short words
_MAX_PARTS = 16
_MAX_FILENAME_CHARS = 255
_ENVELOPE_SLACK = 1 << 20  # boundaries, part headers and small fields around the file


@dataclass
class Upload:
    path: Path
    fields: dict[str, str] = field(default_factory=dict)
    filename: str | None = None
    bytes: int = 0
    received: bool = False  # whether the request had its file part
    report: ValidationReport | None = None  # the file part's validation, when asked for


def clean_filename(raw: bytes, param: str = "file") -> str:
    """The client's file name, made safe to store and to echo in a header: base name only (a path
    must never reach anything), no control characters (PostgreSQL refuses NUL), bounded length."""
    name = raw.decode("utf-8", "replace").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable())
    if len(name) > _MAX_FILENAME_CHARS:
        raise InvalidRequest(f"The file name is longer than {_MAX_FILENAME_CHARS} characters.", param=param, code="invalid_value")
    return name or "upload.jsonl"


def _too_large(limit: int, field: str = "file") -> PayloadTooLarge:
    return PayloadTooLarge(f"The {field} is larger than the maximum upload size of {limit} bytes.", param=field, code="file_too_large")


class LineValidator:
    """A training file's bytes, fed in chunks of any size, split into lines for a ``FileValidator``."""

    def __init__(self):
        self.validator = FileValidator()
        self._pending = bytearray()  # the file's current, unfinished line

    def feed(self, chunk: bytes) -> None:
        # Grow the unfinished line in place: re-concatenating it per chunk would be quadratic in
        # the length of a long line.
        start = 0
        while (newline := chunk.find(b"\n", start)) != -1:
            self._pending += chunk[start:newline]
            self.validator.feed(bytes(self._pending))
            self._pending.clear()
            start = newline + 1
        self._pending += chunk[start:]

    def finish(self) -> ValidationReport:
        if self._pending:
            self.validator.feed(bytes(self._pending))
        self._pending.clear()
        return self.validator.finish()


class _PartSink:
    """python-multipart callbacks: collect small fields, stream the file part to disk (and to a
    ``LineValidator`` when asked)."""

    def __init__(self, upload: Upload, out: BinaryIO, limit: int, file_field: str, validate: bool):
        self.upload, self.out, self.limit, self.file_field = upload, out, limit, file_field
        self.lines = LineValidator() if validate else None
        self._parts = 0
        self._header_name = b""
        self._header_value = b""
        self._headers: dict[bytes, bytes] = {}
        self._name: str | None = None
        self._is_file = False
        self._value = bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_header_field": lambda d, s, e: setattr(self, "_header_name", self._header_name + d[s:e]),
            "on_header_value": lambda d, s, e: setattr(self, "_header_value", self._header_value + d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
        }

    def _part_begin(self) -> None:
        self._parts += 1
        if self._parts > _MAX_PARTS:
            raise InvalidRequest("Too many parts in the multipart body.", code="invalid_multipart")
        self._headers, self._name, self._is_file, self._value = {}, None, False, bytearray()

    def _header_end(self) -> None:
        self._headers[self._header_name.lower()] = self._header_value
        self._header_name, self._header_value = b"", b""

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        self._name = options.get(b"name", b"").decode("utf-8", "replace")
        # the file field itself, with or without a file name (a part's ``data`` may come without one)
        self._is_file = b"filename" in options or self._name == self.file_field
        if self._is_file:
            field = self.file_field
            if self._name != field:
                raise InvalidRequest(f"Unexpected file field {self._name!r}: send the file as {field!r}.", param=self._name, code="invalid_multipart")
            if self.upload.received or self.upload.filename is not None:
                raise InvalidRequest("Send exactly one file per upload.", param=field, code="invalid_multipart")
            self.upload.filename = clean_filename(options.get(b"filename", b""), field)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if not self._is_file:
            self._value += chunk
            if len(self._value) > _MAX_FIELD_BYTES:
                raise InvalidRequest(f"The field {self._name!r} is too long.", param=self._name, code="invalid_value")
            return
        self.upload.bytes += len(chunk)
        if self.upload.bytes > self.limit:
            raise _too_large(self.limit, self.file_field)
        self.out.write(chunk)
        if self.lines is not None:
            self.lines.feed(chunk)

    def _part_end(self) -> None:
        if self._is_file:
            self.upload.received = True
            if self.lines is not None:
                self.upload.report = self.lines.finish()
        elif self._name:
            self.upload.fields[self._name] = self._value.decode("utf-8", "replace")


def _boundary(request: Request, expected: str) -> bytes:
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or not params.get(b"boundary"):
        raise InvalidRequest(f"Expected a multipart/form-data body with {expected}.", code="invalid_multipart")
    return params[b"boundary"]


@contextlib.asynccontextmanager
async def receive_upload(request: Request, limit: int, *, file_field: str = "file", validate: bool = True) -> AsyncIterator[Upload]:
    """Parse the upload into a temporary file; yields the Upload, removes the file on exit. A file
    upload (``/v1/files``) validates its file part as a training file; an upload's part (``data``) is
    validated when the parts are joined."""
    boundary = _boundary(request, "'file' and 'purpose' fields" if file_field == "file" else f"a {file_field!r} field")
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + _ENVELOPE_SLACK:
        raise _too_large(limit, file_field)  # refused before reading a byte
    fd, tmp = tempfile.mkstemp(prefix="tuneforge-upload-", suffix=".jsonl")
    upload = Upload(path=Path(tmp))
    try:
        with os.fdopen(fd, "wb") as out:
            sink = _PartSink(upload, out, limit, file_field, validate)
            parser = MultipartParser(boundary, sink.callbacks())
            try:
                async for chunk in request.stream():
                    parser.write(chunk)
                parser.finalize()
            except MultipartParseError as err:
                raise InvalidRequest(f"Malformed multipart body: {err}", code="invalid_multipart") from None
            except ClientDisconnect:
                raise InvalidRequest("The client disconnected during the upload.", code="upload_incomplete") from None
        yield upload
    finally:
        upload.path.unlink(missing_ok=True)
