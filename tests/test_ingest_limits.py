"""The ingest service bounded under abuse: upload memory, same-book races, metadata and listing limits.

* Uploads are spooled to disk while they arrive and read into memory only within one of the
  ``max_concurrent_ingests`` slots: 30 concurrent maximal uploads cost about the slots' worth.
* Two ingests of one PDF are serialized; a cancelled one never removes what the other committed.
* IngestBook refuses over-long or control-character titles and file names; ListBooks pages.
"""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import psutil
import pytest
from fault_support import Service, book_pdf, client_settings, ingest_requests, start_ingest
from novelcrafter.ingest import service as ingest_service
from novelcrafter.ingest.params import IngestParams
from novelcrafter.ingest.pipeline import IngestResult, ingest

from novelcrafter import layout
from novelcrafter.errors import Aborted, ResourceExhausted
from novelcrafter.rpc import connect
from novelcrafter.store import LocalStore
from novelcrafter.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
LIMIT_MB = 16
SLOTS = 2  # NOVELCRAFTER_MAX_CONCURRENT_INGESTS, set explicitly below
UPLOADS = 30
# Peak RSS growth allowed over the warm baseline, with what each term pays for:
# * SLOT_FACTOR: each busy slot holds its upload about three times over (the bytes read from the
#   spool, and transient copies in the pipeline and the extraction's hand-off);
# * STREAM_MB: each open upload stream, whatever the server does with it, has a 1 MiB message
#   being parsed and at most about 1 MiB the transport read ahead of it (a bounded HTTP/2
#   receive window: the server must not let BDP probing grow it to a whole upload);
# * SLACK_MB: fixed, for 30 handler threads, their stacks and allocator fragmentation.
# Buffering each upload before waiting for a slot (the old behaviour) costs UPLOADS x LIMIT_MB x 2
# (a bytearray, then bytes): ~1 GB here.
SLOT_FACTOR = 3
STREAM_MB = 2
SLACK_MB = 32
SMALL = IngestParams(chunk_sentences=4, parts=2)
PIECE = 1 << 20  # bytes per upload message


# --- helpers ---------------------------------------------------------------------------------------


def _padded(base: bytes, size: int, tag: int) -> Iterator[bytes]:
    """``size`` bytes in 1 MiB pieces, made as they are sent (30 uploads never sit in this test's
    memory): ``base`` (a whole PDF), a trailing comment, and the PDF's own ``startxref`` trailer
    again so a reader finds its cross-reference table at the end as usual."""
    head = base + b"%" + f"upload {tag} ".encode()
    tail = b"\n" + base[base.rindex(b"startxref") :]
    yield head
    filler = size - len(head) - len(tail)
    block = b"x" * PIECE
    for _ in range(filler // PIECE):
        yield block
    yield block[: filler % PIECE] + tail


class RssSampler:
    """Samples a process's resident memory every 10 ms in a background thread."""

    def __init__(self, pid: int) -> None:
        self.proc = psutil.Process(pid)
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(0.01)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _spool_files(pid: int, spool: Path) -> list[int]:
    """Sizes of the files under ``spool`` that ``pid`` holds open (unnamed ones included)."""
    sizes = []
    fds = Path(f"/proc/{pid}/fd")
    for fd in fds.iterdir():
        try:
            if os.readlink(fd).startswith(str(spool)):
                sizes.append(os.stat(fd).st_size)
        except OSError:
            continue  # closed meanwhile
    return sizes


def _wait(what: str, predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def _requests(data: bytes | Iterator[bytes], **meta: Any) -> Iterator[ingest_pb2.IngestBookRequest]:
    """The metadata, then the PDF in 1 MiB messages (as ``novelcrafter ingest --server`` sends it)."""
    params = common_pb2.IngestParams(chunk_sentences=4, parts=1)
    yield ingest_pb2.IngestBookRequest(
        metadata=ingest_pb2.IngestMetadata(filename=meta.pop("filename", "book.pdf"), params=params, **meta)
    )
    pieces = (data[i : i + PIECE] for i in range(0, len(data), PIECE)) if isinstance(data, bytes) else data
    for piece in pieces:
        yield ingest_pb2.IngestBookRequest(chunk=piece)


def _upload(address: str, data: bytes | Iterator[bytes], **meta: Any) -> tuple[grpc.StatusCode, str]:
    with connect(address, client_settings()) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        try:
            stub.IngestBook(_requests(data, **meta), timeout=120)
        except grpc.RpcError as exc:
            return exc.code(), exc.details() or ""
    return OK, ""


@pytest.fixture
def upload_server(tmp_path: Path) -> Iterator[tuple[Service, Path]]:
    """An ingest server with an 8 MB upload limit, two slots, and its own temp dir (the spool)."""
    spool = tmp_path / "tmp"
    spool.mkdir()
    env = {
        "NOVELCRAFTER_MAX_UPLOAD_MB": str(LIMIT_MB),
        "NOVELCRAFTER_MAX_CONCURRENT_INGESTS": str(SLOTS),
        "NOVELCRAFTER_EXTRACT_WORKERS": "1",
        "TMPDIR": str(spool),
    }
    server = start_ingest(str(tmp_path / "store"), tmp_path, env=env)
    yield server, spool
    assert server.alive(), "the ingest server died:\n" + server.output()[-3000:]
    server.stop()


# --- upload memory -----------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_concurrent_maximal_uploads_cost_at_most_the_slots_in_memory(
    upload_server: tuple[Service, Path],
) -> None:
    server, spool = upload_server
    size = LIMIT_MB * 1024 * 1024 - 4096
    base = book_pdf(40, seed=77)
    assert _upload(server.address, _padded(base, size, -1)) == (OK, "")  # warm up
    proc = psutil.Process(server.proc.pid)
    baseline = proc.memory_info().rss
    results: list[tuple[grpc.StatusCode, str]] = []
    started = time.monotonic()
    with RssSampler(server.proc.pid) as sampler:
        send = lambda i: results.append(_upload(server.address, _padded(base, size, i)))  # noqa: E731
        threads = [threading.Thread(target=send, args=(i,)) for i in range(UPLOADS)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    elapsed = time.monotonic() - started
    growth_mb = (sampler.peak - baseline) / 2**20
    bound_mb = SLOTS * LIMIT_MB * SLOT_FACTOR + UPLOADS * STREAM_MB + SLACK_MB
    print(
        f"\n{UPLOADS} concurrent {size / 2**20:.1f} MB uploads in {elapsed:.1f} s: server RSS baseline "
        f"{baseline / 2**20:.0f} MB, peak {sampler.peak / 2**20:.0f} MB, growth {growth_mb:.0f} MB "
        f"(bound {bound_mb} MB)"
    )
    assert results == [(OK, "")] * UPLOADS, results
    assert growth_mb <= bound_mb, (
        "more than the slots' worth of uploads in memory: are uploads buffered before their slot, "
        "or does gRPC read ahead whole uploads (HTTP/2 BDP probing on the server: grpc.http2.bdp_probe)?"
    )
    assert not _spool_files(server.proc.pid, spool) and not list(spool.iterdir())


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_an_upload_is_spooled_to_disk_and_the_spool_goes_in_every_outcome(
    upload_server: tuple[Service, Path],
) -> None:
    server, spool = upload_server
    pid = server.proc.pid
    release = threading.Event()

    def stalled() -> Iterator[ingest_pb2.IngestBookRequest]:
        yield from ingest_requests(b"%PDF-1.4\n" + b"0" * (2 << 20))  # 2 MB, then the client stalls
        release.wait(30)

    with connect(server.address, client_settings()) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        call = stub.IngestBook.future(stalled(), timeout=60)
        # While it arrives, the upload is on disk (an unnamed temp file), not in memory.
        _wait("the upload spooled to disk", lambda: any(s >= 2 << 20 for s in _spool_files(pid, spool)))
        call.cancel()
        _wait("the cancelled upload's spool to go", lambda: not _spool_files(pid, spool))
        release.set()
    over = b"%PDF-1.4\n" + b"0" * ((LIMIT_MB << 20) + 1)
    assert _upload(server.address, over)[0] == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert _upload(server.address, b"not a pdf" * 1000)[0] == INVALID
    assert _upload(server.address, book_pdf(40, seed=78)) == (OK, "")
    _wait("every spool to go", lambda: not _spool_files(pid, spool))
    assert not list(spool.iterdir())


def test_a_full_temp_folder_is_resource_exhausted_with_the_reason() -> None:
    class Full(io.BytesIO):
        def write(self, data: Any) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    requests = iter([ingest_pb2.IngestBookRequest(chunk=b"%PDF-1.4\n")])
    with pytest.raises(
        ResourceExhausted, match=r"\(TMPDIR\) is not writable or full \(No space left on device\)"
    ):
        ingest_service._spool(requests, Full())


# --- the same book twice at once ------------------------------------------------------------------


def _whole(store: LocalStore, book_id: str) -> dict[str, Any]:
    """The stored manifest, after checking that everything it names is there and readable."""
    manifest = store.get_json(layout.manifest_key(book_id))
    assert store.get(manifest["source_key"])[:5] == b"%PDF-"
    assert store.get_text(manifest["text_key"]).strip()
    for part in manifest["parts"]:
        for key, count in (
            (part["train_key"], part["train_chunks"]),
            (part["test_key"], part["test_chunks"]),
        ):
            lines = store.get_text(key).splitlines()
            assert len(lines) == count and all(json.loads(line)["text"] for line in lines), key
    return manifest


class HookedStore(LocalStore):
    """A local store that calls ``on_manifest`` (in the writing thread) just before a manifest is
    written, whichever primitive writes it, ``on_put`` before any other write, and ``on_delete``
    before each delete."""

    on_manifest: Any = None
    on_put: Any = None
    on_delete: Any = None

    def _hook(self, key: str) -> None:
        if layout.is_manifest_key(key):
            if self.on_manifest:
                self.on_manifest()
        elif self.on_put:
            self.on_put(key)

    def put(self, key: str, data: bytes | str) -> None:
        self._hook(key)
        super().put(key, data)

    def put_if_absent(self, key: str, data: bytes | str) -> bool:
        self._hook(key)
        return super().put_if_absent(key, data)

    def delete(self, key: str) -> None:
        if self.on_delete:
            self.on_delete(key)
        super().delete(key)


def _run(name: str, fn: Any, results: dict[str, Any]) -> threading.Thread:
    def target() -> None:
        try:
            results[name] = fn()
        except BaseException as exc:  # the test looks at what each thread ended in
            results[name] = exc

    thread = threading.Thread(target=target, name=name)
    thread.start()
    return thread


@pytest.mark.timeout(120)
def test_a_cancelled_ingest_never_removes_what_a_concurrent_ingest_of_the_same_book_wrote(
    tmp_path: Path,
) -> None:
    """A is cancelled after its first write; B ingests the same PDF meanwhile. Before the fix both
    ran at once and A's clean-up deleted keys B's manifest names. Now B waits for A (same book),
    so B's book is whole."""
    store = HookedStore(tmp_path / "store")
    pdf = book_pdf(60, seed=5)
    b_at_manifest = threading.Event()
    a_done = threading.Event()
    a_wrote: list[str] = []

    def b_manifest() -> None:
        if threading.current_thread().name == "B":
            b_at_manifest.set()
            a_done.wait(3)  # let A clean up first (it can't while B waits for the book's lock)

    def a_writes(key: str) -> None:
        if threading.current_thread().name == "A":
            a_wrote.append(key)

    store.on_manifest = b_manifest
    store.on_put = a_writes

    def a_cancelled() -> bool:
        # Cancelled once it has written something and B is about to commit (or 3 s have passed:
        # B cannot get there while A holds the book).
        return bool(a_wrote) and (b_at_manifest.wait(3) or True)

    results: dict[str, Any] = {}

    def run_a() -> IngestResult:
        try:
            return ingest(store, pdf, params=SMALL, cancelled=a_cancelled)
        finally:
            a_done.set()

    a = _run("A", run_a, results)
    time.sleep(0.2)  # A first
    b = _run("B", lambda: ingest(store, pdf, params=SMALL), results)
    a.join(60)
    b.join(60)
    assert isinstance(results["A"], Aborted), results["A"]
    assert isinstance(results["B"], IngestResult), results["B"]
    manifest = _whole(store, layout.book_id_for(pdf))
    assert manifest == results["B"].manifest


@pytest.mark.timeout(120)
def test_a_second_ingest_of_the_same_book_waits_and_finds_it_already_there(tmp_path: Path) -> None:
    store = HookedStore(tmp_path / "store")
    pdf = book_pdf(60, seed=6)
    a_writing = threading.Event()

    def slow_commit() -> None:
        if threading.current_thread().name == "A":
            a_writing.set()
            time.sleep(1.0)  # B arrives while A is about to commit

    store.on_manifest = slow_commit
    results: dict[str, Any] = {}
    a = _run("A", lambda: ingest(store, pdf, params=SMALL), results)
    assert a_writing.wait(60)
    b = _run("B", lambda: ingest(store, pdf, params=SMALL), results)
    a.join(60)
    b.join(60)
    assert not results["A"].already_existed
    assert results["B"].already_existed and results["B"].manifest == results["A"].manifest
    _whole(store, layout.book_id_for(pdf))


@pytest.mark.timeout(120)
def test_a_manifest_committed_by_another_process_first_wins(tmp_path: Path) -> None:
    """Another process (not serialized by this one's lock) commits the book just before this
    ingest would: this one keeps the other's manifest (put-if-absent) and removes nothing."""
    pdf = book_pdf(60, seed=7)
    other = ingest(LocalStore(tmp_path / "other"), pdf, params=SMALL).manifest
    other["title"] = "Written by the other process"
    store = HookedStore(tmp_path / "store")
    key = layout.manifest_key(other["book_id"])
    store.on_manifest = lambda: LocalStore.put(store, key, json.dumps(other).encode())
    result = ingest(store, pdf, params=SMALL)
    assert result.already_existed and result.manifest == other
    assert _whole(store, other["book_id"]) == other


@pytest.mark.timeout(120)
def test_a_failed_ingest_puts_back_what_it_removed_from_under_another_process_commit(
    tmp_path: Path,
) -> None:
    """A fails after writing everything but the manifest; while it removes its keys another
    process commits the same book (same bytes, same cut). A restores what it removed."""
    pdf = book_pdf(60, seed=8)
    reference = tmp_path / "other"
    ingest(LocalStore(reference), pdf, params=SMALL)
    store = HookedStore(tmp_path / "store")
    book_id = layout.book_id_for(pdf)
    committed = threading.Event()

    def other_commits(key: str) -> None:
        if not committed.is_set():  # at A's first delete: the other writer's objects and manifest
            committed.set()
            shutil.copytree(reference / "books", tmp_path / "store" / "books", dirs_exist_ok=True)

    def fail_at_commit() -> None:
        store.on_delete = other_commits
        raise OSError("disk gone")  # A fails just when it would commit

    store.on_manifest = fail_at_commit
    with pytest.raises(Exception, match="disk gone"):
        ingest(store, pdf, params=SMALL)
    assert committed.is_set()
    _whole(store, book_id)


# --- metadata limits over gRPC --------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Service, Path]]:
    tmp = tmp_path_factory.mktemp("ingest-limits")
    server = start_ingest(str(tmp / "store"), tmp, env={"NOVELCRAFTER_EXTRACT_WORKERS": "1"})
    yield server, tmp / "store"
    assert server.alive(), "the ingest server died:\n" + server.output()[-3000:]
    server.stop()


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_titles_and_file_names_over_the_limits_are_invalid_argument(server: tuple[Service, Path]) -> None:
    service, store = server
    pdf = book_pdf(40, seed=9)
    max_title, max_name = layout.MAX_TITLE_CHARS, layout.MAX_FILENAME_BYTES
    refused = {
        "title one over": ({"title": "t" * (max_title + 1)}, "title too long"),
        "file name one byte over": ({"filename": "f" * (max_name - 3) + ".pdf"}, "filename too long"),
        "file name over in UTF-8 bytes": ({"filename": "é" * 128 + ".pdf"}, "filename too long: 260 bytes"),
        "NUL in the title": ({"title": "The\x00Book"}, "title contains a control character (U+0000)"),
        "newline in the title": ({"title": "The\nforged log line"}, "control character (U+000A)"),
        "escape in the file name": ({"filename": "\x1b[31mred.pdf"}, "filename contains a control"),
        "C1 control in the file name": ({"filename": "a\x85b.pdf"}, "control character (U+0085)"),
    }
    wrong = {}
    for name, (meta, fragment) in refused.items():
        code, message = _upload(service.address, pdf, **meta)
        if code != INVALID or fragment not in message or "\n" in message:
            wrong[name] = (code.name, message)
    assert not wrong, wrong
    assert not (store / layout.book_prefix(layout.book_id_for(pdf))).exists()
    # At the limits: accepted, and stored as sent.
    title, filename = "T" * max_title, "é" * 125 + ".pdf"  # 254 bytes
    assert _upload(service.address, pdf, title=title, filename=filename) == (OK, "")
    manifest = json.loads((store / layout.manifest_key(layout.book_id_for(pdf))).read_text())
    assert manifest["title"] == title and manifest["filename"] == filename


# --- ListBooks pages ------------------------------------------------------------------------------


def _fake_manifest(book_id: str, parts: int, created_at: float) -> dict[str, Any]:
    return {
        "version": 1,
        "book_id": book_id,
        "title": f"Book {book_id}",
        "source_sha256": "0" * 64,
        "pages": 10,
        "sentences": 1000,
        "chunks": 100,
        "words": 10000,
        "params": {"chunk_sentences": 10, "parts": parts, "seed": 0, "test_fraction": 0.1},
        "cleaning": {"page_numbers": 3},
        "parts": [
            {
                "index": i,
                "train_key": layout.part_train_key(book_id, i),
                "test_key": layout.part_test_key(book_id, i),
                "train_chunks": 9,
                "test_chunks": 1,
            }
            for i in range(parts)
        ],
        "warnings": [],
        "created_at": created_at,
    }


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_list_books_pages_stay_bounded_however_many_books(server: tuple[Service, Path]) -> None:
    service, store = server
    count, parts = 1200, 60  # ~24 KB per listed book: ~29 MB if answered at once
    for i in range(count):
        book_id = f"{i:016x}"
        path = store / layout.manifest_key(book_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(_fake_manifest(book_id, parts, 1e9 + i)))
    expected = sorted(p.parent.name for p in (store / "books").glob("*/manifest.json"))
    budget = ingest_service.LIST_PAGE_BYTES
    with connect(service.address, client_settings()) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)

        def page(**kw: Any) -> ingest_pb2.ListBooksResponse:
            return stub.ListBooks(ingest_pb2.ListBooksRequest(**kw), timeout=30)

        first = page()
        assert len(first.books) == ingest_service.LIST_PAGE_SIZE and first.next_page_token
        seen: list[str] = []
        largest, token, pages = 0, "", 0
        while True:
            answer = page(page_size=5000, page_token=token)  # more than the most: 1000 at most
            pages += 1
            assert 0 < len(answer.books) <= ingest_service.MAX_LIST_PAGE_SIZE
            book_size = max(b.ByteSize() for b in answer.books)
            assert answer.ByteSize() <= budget + book_size + 1024  # the budget, passed by one book at most
            largest = max(largest, answer.ByteSize())
            seen += [b.book_id for b in answer.books]
            token = answer.next_page_token
            if not token:
                break
        print(f"\nListBooks: {len(seen)} books in {pages} pages, the largest {largest / 2**20:.1f} MB")
        assert seen == expected and pages > 1
        for bad in ({"page_size": -1}, {"page_token": "../../etc"}, {"page_token": "x" * 100}):
            with pytest.raises(grpc.RpcError) as info:
                page(**bad)
            assert info.value.code() == INVALID, bad
