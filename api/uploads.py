"""Reading a multipart file upload as it streams in.

FastAPI's ``UploadFile`` spools the whole body before the route runs, which would defeat both the
size limit (a 10 GB body would be read to the end before being refused) and line-by-line validation.
This reader parses the multipart stream itself: the file part goes chunk by chunk into a temporary
file and, split into lines, into a ``FileValidator``; reading stops the moment the file exceeds the
limit. The temporary file is removed when the ``receive_upload`` context exits, whatever happened.
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
    report: ValidationReport | None = None  # None when the request had no file part


def _clean_filename(raw: bytes) -> str:
    """The client's file name, made safe to store and to echo in a header: base name only (a path
    must never reach anything), no control characters (PostgreSQL refuses NUL), bounded length."""
    name = raw.decode("utf-8", "replace").replace("\\", "/").rsplit("/", 1)[-1]
    name = "".join(ch for ch in name if ch.isprintable())
    if len(name) > _MAX_FILENAME_CHARS:
        raise InvalidRequest(f"The file name is longer than {_MAX_FILENAME_CHARS} characters.", param="file", code="invalid_value")
    return name or "upload.jsonl"


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The file is larger than the maximum upload size of {limit} bytes.", param="file", code="file_too_large")


class _PartSink:
    """python-multipart callbacks: collect small fields, stream the file part to disk + validator."""

    def __init__(self, upload: Upload, out: BinaryIO, limit: int):
        self.upload, self.out, self.limit = upload, out, limit
        self.validator = FileValidator()
        self._pending = bytearray()  # the file's current, unfinished line
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
        self._is_file = b"filename" in options
        if self._is_file:
            if self._name != "file":
                raise InvalidRequest(f"Unexpected file field {self._name!r}: send the file as 'file'.", param=self._name, code="invalid_multipart")
            if self.upload.report is not None or self.upload.filename is not None:
                raise InvalidRequest("Send exactly one file per upload.", param="file", code="invalid_multipart")
            self.upload.filename = _clean_filename(options[b"filename"])

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        chunk = data[start:end]
        if not self._is_file:
            self._value += chunk
            if len(self._value) > _MAX_FIELD_BYTES:
                raise InvalidRequest(f"The field {self._name!r} is too long.", param=self._name, code="invalid_value")
            return
        self.upload.bytes += len(chunk)
        if self.upload.bytes > self.limit:
            raise _too_large(self.limit)
        self.out.write(chunk)
        # Grow the unfinished line in place: re-concatenating it per chunk would be quadratic in
        # the length of a long line.
        start = 0
        while (newline := chunk.find(b"\n", start)) != -1:
            self._pending += chunk[start:newline]
            self.validator.feed(bytes(self._pending))
            self._pending.clear()
            start = newline + 1
        self._pending += chunk[start:]

    def _part_end(self) -> None:
        if self._is_file:
            if self._pending:
                self.validator.feed(bytes(self._pending))
            self._pending.clear()
            self.upload.report = self.validator.finish()
        elif self._name:
            self.upload.fields[self._name] = self._value.decode("utf-8", "replace")


def _boundary(request: Request) -> bytes:
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or not params.get(b"boundary"):
        raise InvalidRequest("Expected a multipart/form-data body with 'file' and 'purpose' fields.", code="invalid_multipart")
    return params[b"boundary"]


@contextlib.asynccontextmanager
async def receive_upload(request: Request, limit: int) -> AsyncIterator[Upload]:
    """Parse the upload into a temporary file; yields the Upload, removes the file on exit."""
    boundary = _boundary(request)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + _ENVELOPE_SLACK:
        raise _too_large(limit)  # refused before reading a byte
    fd, tmp = tempfile.mkstemp(prefix="tuneforge-upload-", suffix=".jsonl")
    upload = Upload(path=Path(tmp))
    try:
        with os.fdopen(fd, "wb") as out:
            sink = _PartSink(upload, out, limit)
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
