"""One contract suite for both store backends: local directory and S3 (moto server process)."""

from __future__ import annotations

import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from novelcrafter.errors import InvalidArgument, NotFound, StoreError
from novelcrafter.store import LocalStore, Store, open_store


@pytest.fixture(params=["local", "s3"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "local":
        yield open_store(str(tmp_path / "store"))
    else:
        request.getfixturevalue("s3_settings")
        yield open_store(f"s3://contract-{uuid.uuid4().hex[:8]}/root/prefix")


def test_put_get_roundtrip(store: Store) -> None:
    store.put("books/abc/manifest.json", b'{"a": 1}')
    assert store.get("books/abc/manifest.json") == b'{"a": 1}'
    store.put_json("books/abc/x.json", {"k": [1, 2]})
    assert store.get_json("books/abc/x.json") == {"k": [1, 2]}
    store.put("books/abc/manifest.json", "replaced")
    assert store.get_text("books/abc/manifest.json") == "replaced"


def test_missing_is_not_found(store: Store) -> None:
    with pytest.raises(NotFound):
        store.get("nope/none")
    with pytest.raises(NotFound):
        store.stat("nope/none")
    assert not store.exists("nope/none")
    store.delete("nope/none")  # deleting a missing object is fine


def test_list_by_prefix_and_stat(store: Store) -> None:
    for key in ("a/1", "a/2", "a/b/3", "b/4", "ab/5"):
        store.put(key, key)
    assert store.list("a/") == ["a/1", "a/2", "a/b/3"]
    assert store.list("a/b/") == ["a/b/3"]
    assert store.list("") == ["a/1", "a/2", "a/b/3", "ab/5", "b/4"]
    assert store.list("zzz/") == []
    info = store.stat("a/b/3")
    assert info.size == len("a/b/3") and info.key == "a/b/3" and info.modified > 0


def test_stream_and_download_large(store: Store, tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    src = tmp_path / "big.bin"
    src.write_bytes(data)
    store.put_file("blobs/big.bin", src)
    assert b"".join(store.stream("blobs/big.bin", chunk_size=65536)) == data
    out = store.download("blobs/big.bin", tmp_path / "out" / "big.bin")
    assert out.read_bytes() == data
    with pytest.raises(NotFound):
        store.download("blobs/missing", tmp_path / "out" / "missing")
    assert not (tmp_path / "out" / "missing").exists()


def test_delete_and_delete_prefix(store: Store) -> None:
    store.put("d/1", "x")
    store.put("d/e/2", "y")
    store.delete("d/1")
    assert not store.exists("d/1")
    assert store.delete_prefix("d/") == 1
    assert store.list("d/") == []


def test_put_if_absent_is_write_once(store: Store) -> None:
    assert store.put_if_absent("ptr/claim", "first")
    assert not store.put_if_absent("ptr/claim", "second")
    assert store.get_text("ptr/claim") == "first"


def test_put_if_absent_race_has_one_winner(store: Store) -> None:
    wins: list[int] = []

    def claim(i: int) -> None:
        if store.put_if_absent("race/key", str(i)):
            wins.append(i)

    threads = [threading.Thread(target=claim, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1
    assert store.get_text("race/key") == str(wins[0])


@pytest.mark.parametrize(
    "key", ["../etc/passwd", "/abs/key", "a/../../b", "a//b", "a/./b", "", "a\\b", "a/\x00b", "x/.nc-tmp-1"]
)
def test_keys_are_validated(store: Store, key: str) -> None:
    with pytest.raises(InvalidArgument):
        store.put(key, "x")
    with pytest.raises(InvalidArgument):
        store.get(key)


def test_local_store_never_escapes_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    store = LocalStore(root)
    (tmp_path / "outside").mkdir()
    os.symlink(tmp_path / "outside", root / "link")
    with pytest.raises(InvalidArgument):
        store.put("link/x", "escape")
    assert not (tmp_path / "outside" / "x").exists()


def test_local_atomic_write_leaves_no_partial_object(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    store.put("k/v", "old")

    # A failure while writing keeps the old object and leaves no temporary file visible.
    with pytest.raises(TypeError):
        store.put("k/v", object())  # type: ignore[arg-type]
    assert store.get_text("k/v") == "old"
    assert store.list("") == ["k/v"]
    assert [p.name for p in (tmp_path / "s" / "k").iterdir()] == ["v"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_local_permission_denied_is_clear(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "s")
    (tmp_path / "s" / "ro").mkdir()
    os.chmod(tmp_path / "s" / "ro", 0o500)
    with pytest.raises(StoreError, match="permission denied"):
        store.put("ro/x", "data")


def test_store_url_selection(tmp_path: Path, s3_settings: dict[str, str]) -> None:
    assert open_store(str(tmp_path / "a")).url == f"file://{tmp_path / 'a'}"
    assert open_store(f"file://{tmp_path / 'b'}").url == f"file://{tmp_path / 'b'}"
    assert open_store("s3://sel-bucket/p/q").url == "s3://sel-bucket/p/q/"
    with pytest.raises(InvalidArgument, match="unsupported store URL"):
        open_store("ftp://x/y")
    with pytest.raises(InvalidArgument, match="bucket"):
        open_store("s3://Bad_Bucket/x")


def test_s3_without_endpoint_is_clear(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOVELCRAFTER_S3_ENDPOINT", raising=False)
    with pytest.raises(InvalidArgument, match="NOVELCRAFTER_S3_ENDPOINT"):
        open_store("s3://bucket/x")


def test_s3_unreachable_fails_after_bounded_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    from support import free_port

    monkeypatch.setenv("NOVELCRAFTER_S3_ENDPOINT", f"127.0.0.1:{free_port()}")
    with pytest.raises(StoreError, match="cannot"):
        open_store("s3://bucket/x", retry_seconds=1.0)
