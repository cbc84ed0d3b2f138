"""The object store interface behaves the same on a folder and on S3 (a real S3-protocol server,
moto's, started on loopback by the test)."""

import pytest

from gpu_worker.storage import LocalStore, ObjectNotFound, S3Store, delete_prefix, get_dir, iter_lines, open_store, put_dir


@pytest.fixture(params=["local", "s3"])
def store(request, tmp_path):
    if request.param == "local":
        return LocalStore(tmp_path / "objects")
    bucket, env = request.getfixturevalue("s3_bucket")
    return S3Store(bucket, prefix="tenant-data", endpoint_url=env["AWS_ENDPOINT_URL"])


@pytest.mark.integration
def test_round_trip(store, tmp_path):
    store.put_bytes("a/b/c.txt", b"hello")
    assert store.get_bytes("a/b/c.txt") == b"hello"
    assert store.exists("a/b/c.txt") and store.size("a/b/c.txt") == 5
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 300_000)
    store.put_file("a/big.bin", src)
    store.get_file("a/big.bin", tmp_path / "dst.bin")
    assert (tmp_path / "dst.bin").read_bytes() == src.read_bytes()
    assert store.list("a/") == ["a/b/c.txt", "a/big.bin"]
    store.delete("a/b/c.txt")
    assert not store.exists("a/b/c.txt")
    store.delete("no/such/folder/key")  # deleting what is not there is a no-op
    with pytest.raises(ObjectNotFound):
        store.get_bytes("a/b/c.txt")


@pytest.mark.integration
def test_dirs_and_lines(store, tmp_path):
    folder = tmp_path / "adapter"
    (folder / "sub").mkdir(parents=True)
    (folder / "adapter_config.json").write_text("{}")
    (folder / "sub" / "w.safetensors").write_bytes(b"\0" * 10)
    keys = put_dir(store, folder, "jobs/1/adapter")
    assert keys == ["jobs/1/adapter/adapter_config.json", "jobs/1/adapter/sub/w.safetensors"]
    got = get_dir(store, "jobs/1/adapter", tmp_path / "copy")
    assert sorted(p.name for p in got) == ["adapter_config.json", "w.safetensors"]
    store.put_bytes("f.jsonl", b'{"a":1}\n{"a":2}\n\n{"a":3}')
    assert list(iter_lines(store, "f.jsonl")) == [b'{"a":1}', b'{"a":2}', b"", b'{"a":3}']
    assert delete_prefix(store, "jobs/1") == 2
    assert store.list("jobs/") == []


def test_keys_cannot_escape(tmp_path):
    store = LocalStore(tmp_path)
    for bad in ("../x", "/etc/passwd", "", "a/"):
        with pytest.raises(ValueError):
            store.put_bytes(bad, b"")


def test_open_store_by_url(tmp_path):
    assert isinstance(open_store(str(tmp_path)), LocalStore)
    assert isinstance(open_store(tmp_path.as_uri()), LocalStore)
    with pytest.raises(ValueError):
        open_store("ftp://x")
