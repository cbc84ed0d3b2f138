"""The streaming multipart reader: however the body is chunked, the file arrives byte for byte, its
lines are validated with the right numbers, and the temporary file is gone afterwards."""

from __future__ import annotations

import asyncio
import json
import tempfile

import pytest
from starlette.requests import Request

from api.errors import PayloadTooLarge
from api.multipart import receive_upload
from tests.api.conftest import chat_line, jsonl

BOUNDARY = b"XyZ"


def _body(content: bytes, purpose: bytes = b"fine-tune") -> bytes:
    return (
        b"--XyZ\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\n" + purpose + b"\r\n"
        b"--XyZ\r\nContent-Disposition: form-data; name=\"file\"; filename=\"dir/t.jsonl\"\r\n"
        b"Content-Type: application/jsonl\r\n\r\n" + content + b"\r\n--XyZ--\r\n"
    )


def _request(body: bytes, chunk: int) -> Request:
    parts = [body[i : i + chunk] for i in range(0, len(body), chunk)]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(parts) - 1} for i, p in enumerate(parts)]

    async def receive():
        return messages.pop(0)

    headers = [(b"content-type", b"multipart/form-data; boundary=" + BOUNDARY)]  # no length: chunked
    return Request({"type": "http", "method": "POST", "path": "/v1/files", "headers": headers}, receive)


async def _read(body: bytes, chunk: int, limit: int = 1 << 20):
    async with receive_upload(_request(body, chunk), limit) as upload:
        return upload, upload.path.read_bytes(), upload.path


@pytest.mark.parametrize("chunk", [1, 7, 64, 1 << 16])
def test_any_chunking_gives_the_same_file_and_line_numbers(chunk):
    lines = jsonl(10).splitlines(keepends=True)
    lines.insert(4, json.dumps({"messages": [{"role": "bot", "content": "x"}]}).encode() + b"\n")
    content = b"".join(lines) + json.dumps(chat_line()).encode()  # last line without a newline
    upload, stored, path = asyncio.run(_read(_body(content), chunk))
    assert stored == content and upload.bytes == len(content)
    assert upload.fields == {"purpose": "fine-tune"} and upload.filename == "t.jsonl"
    assert upload.report.examples == 11
    assert [(e.line, e.reason.split(" ")[0]) for e in upload.report.errors] == [(5, "unknown")]
    assert not path.exists()


def test_over_the_limit_stops_and_cleans_up(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = []

    async def run():
        async with receive_upload(_request(_body(jsonl(50)), 1000), limit=2000) as upload:
            seen.append(upload.path)

    with pytest.raises(PayloadTooLarge):
        asyncio.run(run())
    assert seen == []  # the body never reached the caller
    assert list(tmp_path.iterdir()) == []  # nor stayed on disk
