"""IngestService against a real ``novelcrafter serve ingest`` process, and the ``ingest`` CLI.

Every broken file in ../shared/corpus/bad and every hostile file built here ends in one
clear error (gRPC status + message; CLI ``error: …``), nothing is written for it, and the
server keeps answering health checks with its memory bounded.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import psutil
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from novelcrafter.ingest import manifest as manifest_codec
from pdfs import (
    Book,
    Heading,
    bomb_pdf,
    book_pdf,
    many_pages_pdf,
    page_tree_cycle_pdf,
    prose,
    xobject_explosion_pdf,
)
from support import BAD, NOVELCRAFTER, Proc, base_env, free_port, require_shared, run_cli

from novelcrafter import layout
from novelcrafter.rpc import connect, wait_for_health
from novelcrafter.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc, jobs_pb2, jobs_pb2_grpc

pytestmark = pytest.mark.integration

INVALID = grpc.StatusCode.INVALID_ARGUMENT
PRECONDITION = grpc.StatusCode.FAILED_PRECONDITION
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED

# What each file of the shared bad corpus must end in: (code, fragments of the message).
BAD_FILES: dict[str, tuple[grpc.StatusCode, tuple[str, ...]]] = {
    "corrupted-zen.pdf": (PRECONDITION, ("too little text: found", "damaged compressed stream")),
    "empty.pdf": (INVALID, ("not a PDF: the file is empty",)),
    "encrypted-aes128-password-foo.pdf": (PRECONDITION, ("the PDF is encrypted", "--password")),
    "evil-xobjects.pdf": (PRECONDITION, ("too little text: found 1 sentence,", "call each other in a loop")),
    "image-only-jbig2.pdf": (PRECONDITION, ("no extractable text (scanned?)",)),
    "not-a-pdf.pdf": (INVALID, ("not a PDF",)),
    "truncated-robin-hood.pdf": (INVALID, ("damaged or truncated", "no page could be recovered")),
}
SERVER_ENV = {
    "NOVELCRAFTER_METRICS_LISTEN": "off",
    "NOVELCRAFTER_MAX_UPLOAD_MB": "8",
    "NOVELCRAFTER_EXTRACT_MEMORY_MB": "512",
    "NOVELCRAFTER_EXTRACT_PAGE_TIMEOUT": "8",
    "NOVELCRAFTER_EXTRACT_TIMEOUT": "60",
}


@dataclass
class Server:
    address: str
    store: Path
    proc: Proc

    def stub(self) -> ingest_pb2_grpc.IngestServiceStub:
        return ingest_pb2_grpc.IngestServiceStub(connect(self.address))

    def serving(self) -> bool:
        with connect(self.address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    def book_exists(self, pdf: bytes) -> bool:
        return (self.store / layout.book_prefix(layout.book_id_for(pdf))).exists()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("ingest-server")
    port = free_port()
    proc = Proc(
        [NOVELCRAFTER, "serve", "ingest", "--listen", f"127.0.0.1:{port}", "--store", str(tmp / "store")],
        base_env(**SERVER_ENV),
        tmp / "server.log",
    )
    try:
        wait_for_health(f"127.0.0.1:{port}", 60)
    except TimeoutError:
        proc.kill()
        raise AssertionError("ingest server did not start:\n" + proc.output()[-3000:])
    yield Server(f"127.0.0.1:{port}", tmp / "store", proc)
    assert proc.popen.poll() is None, "the ingest server died:\n" + proc.output()[-3000:]
    assert proc.stop() == 0, "SIGTERM did not stop the server cleanly:\n" + proc.output()[-3000:]


def _requests(data: bytes, chunk: int = 64 * 1024, **meta: object) -> Iterator[ingest_pb2.IngestBookRequest]:
    params = meta.pop("params", common_pb2.IngestParams(chunk_sentences=2, parts=2))
    yield ingest_pb2.IngestBookRequest(
        metadata=ingest_pb2.IngestMetadata(filename="book.pdf", params=params, **meta)  # type: ignore[arg-type]
    )
    for start in range(0, len(data), chunk):
        yield ingest_pb2.IngestBookRequest(chunk=data[start : start + chunk])


def _call(server: Server, data: bytes, **meta: object) -> tuple[grpc.StatusCode, str]:
    try:
        server.stub().IngestBook(_requests(data, **meta), timeout=120)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _small_book(seed: int = 0) -> bytes:
    return book_pdf(Book([Heading("CHAPTER I"), *prose(12, start=seed * 100)]))


@pytest.mark.timeout(120)
def test_ingest_get_and_list_books_over_grpc(server: Server) -> None:
    pdf = _small_book(1)
    stub = server.stub()
    first = stub.IngestBook(_requests(pdf, title="The Keeper"), timeout=60)
    manifest = first.manifest
    assert not first.already_existed and manifest.book_id == layout.book_id_for(pdf)
    assert manifest.title == "The Keeper" and manifest.sentences == 48 and len(manifest.parts) == 2
    assert manifest.cleaning["running_headers"] > 0 and manifest.cleaning["page_numbers"] > 0
    stored = json.loads((server.store / layout.manifest_key(manifest.book_id)).read_text())
    assert manifest_codec.from_proto(manifest) == stored
    again = stub.IngestBook(_requests(pdf, chunk=1000), timeout=60)  # same bytes, other chunking
    assert again.already_existed and again.manifest == manifest
    got = stub.GetBook(ingest_pb2.GetBookRequest(book_id=manifest.book_id), timeout=10).manifest
    assert got == manifest
    listed = stub.ListBooks(ingest_pb2.ListBooksRequest(), timeout=10).books
    assert manifest.book_id in [b.book_id for b in listed]
    with pytest.raises(grpc.RpcError) as missing:
        stub.GetBook(ingest_pb2.GetBookRequest(book_id="0123456789abcdef"), timeout=10)
    assert missing.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.RpcError) as bad:
        stub.GetBook(ingest_pb2.GetBookRequest(book_id="../../etc"), timeout=10)
    assert bad.value.code() == INVALID
    assert not stub.GetBook(ingest_pb2.GetBookRequest(book_id=manifest.book_id), timeout=10).preview


@pytest.mark.timeout(120)
def test_get_book_previews_the_first_training_chunks_in_order(server: Server) -> None:
    manifest = server.stub().IngestBook(_requests(_small_book(3)), timeout=60).manifest
    stored = (server.store / manifest.parts[0].train_key).read_text().splitlines()
    first = [json.loads(line)["text"] for line in stored]
    stub = server.stub()
    two = stub.GetBook(ingest_pb2.GetBookRequest(book_id=manifest.book_id, preview_chunks=2), timeout=10)
    assert list(two.preview) == first[:2] and two.manifest.book_id == manifest.book_id
    every = stub.GetBook(ingest_pb2.GetBookRequest(book_id=manifest.book_id, preview_chunks=1000), timeout=10)
    assert list(every.preview) == first[:20]  # capped: a look at the text, not a download
    with pytest.raises(grpc.RpcError) as negative:
        stub.GetBook(ingest_pb2.GetBookRequest(book_id=manifest.book_id, preview_chunks=-1), timeout=10)
    assert negative.value.code() == INVALID and "preview_chunks" in (negative.value.details() or "")
    # Not trained yet: no adapter card or export, with the reason.
    card = ingest_pb2.GetAdapterCardRequest(book_id=manifest.book_id)
    export = ingest_pb2.ExportAdapterRequest(book_id=manifest.book_id, adapter="part-0")
    for call in (
        lambda: stub.GetAdapterCard(card, timeout=10),
        lambda: list(stub.ExportAdapter(export, timeout=10)),
    ):
        with pytest.raises(grpc.RpcError) as untrained:
            call()
        assert untrained.value.code() == grpc.StatusCode.NOT_FOUND
        assert "has no published adapter yet" in (untrained.value.details() or "")


@pytest.mark.timeout(120)
def test_ingest_can_create_the_training_job(server: Server) -> None:
    pdf = _small_book(2)
    response = server.stub().IngestBook(_requests(pdf, create_job=True), timeout=60)
    assert response.HasField("job") and response.job.book_id == response.manifest.book_id
    with connect(server.address) as channel:
        job = jobs_pb2_grpc.JobServiceStub(channel).GetJob(
            jobs_pb2.GetJobRequest(job_id=response.job.job_id), timeout=10
        )
    assert len(job.parts) == len(response.manifest.parts) == 2


@pytest.mark.timeout(120)
def test_upload_protocol_and_size_limit(server: Server) -> None:
    stub = server.stub()
    # A book no other test of this module ingests: the PDF's bytes carry the creation second, so
    # another test's _small_book(3) made within the same second is this very book, already stored.
    pdf = _small_book(6)

    def chunks_first() -> Iterator[ingest_pb2.IngestBookRequest]:
        yield ingest_pb2.IngestBookRequest(chunk=pdf)

    def metadata_twice() -> Iterator[ingest_pb2.IngestBookRequest]:
        yield from _requests(pdf)
        yield ingest_pb2.IngestBookRequest(metadata=ingest_pb2.IngestMetadata())

    for requests, code, fragment in (
        (chunks_first(), INVALID, "first message must carry the metadata"),
        (metadata_twice(), INVALID, "metadata may only be sent once"),
        (_requests(b"%PDF-1.4\n" + b"0" * (9 << 20)), EXHAUSTED, "8 MB limit"),
        (_requests(b"", size_bytes=9 << 20), EXHAUSTED, "NOVELCRAFTER_MAX_UPLOAD_MB"),
    ):
        with pytest.raises(grpc.RpcError) as info:
            stub.IngestBook(requests, timeout=60)
        assert info.value.code() == code and fragment in (info.value.details() or "")
    assert not server.book_exists(pdf) and server.serving()


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_every_bad_corpus_file_is_one_clear_grpc_error(server: Server, name: str) -> None:
    require_shared(BAD)
    path = BAD / name
    if not path.exists():
        pytest.skip(f"{path} is absent")
    data = path.read_bytes()
    expected_code, fragments = BAD_FILES[name]
    started = time.monotonic()
    code, message = _call(server, data, params=common_pb2.IngestParams())  # the defaults, as the CLI
    assert time.monotonic() - started < 60
    assert code == expected_code, f"{code.name}: {message}"
    assert all(f in message for f in fragments), message
    assert "\n" not in message and "Traceback" not in message
    assert not server.book_exists(data)
    assert server.serving()


@pytest.mark.timeout(120)
def test_the_password_opens_the_encrypted_file(server: Server) -> None:
    require_shared(BAD)
    data = (BAD / "encrypted-aes128-password-foo.pdf").read_bytes()
    assert _call(server, data, password="bar") == (PRECONDITION, "wrong password for the encrypted PDF")
    code, message = _call(server, data, password="foo")
    # Decrypted: its one sentence ("Secret!") is read, and is too little for a book.
    assert code == PRECONDITION and message.startswith("too little text: found 1 sentence,"), message


@pytest.mark.timeout(120)
def test_a_damaged_file_with_enough_text_is_recovered_with_a_warning(server: Server) -> None:
    require_shared(BAD)
    data = (BAD / "corrupted-zen.pdf").read_bytes()
    manifest = server.stub().IngestBook(_requests(data), timeout=60).manifest
    assert manifest.sentences >= 15
    assert any("damaged compressed stream" in w for w in manifest.warnings)


def test_the_bad_corpus_is_covered() -> None:
    require_shared(BAD)
    assert sorted(p.name for p in BAD.iterdir()) == sorted(BAD_FILES)


def _rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def _workers(pid: int) -> list[psutil.Process]:
    found = []
    for child in psutil.Process(pid).children(recursive=True):
        try:
            if "novelcrafter.ingest.extract_sandbox" in " ".join(child.cmdline()):
                found.append(child)
        except psutil.NoSuchProcess:
            continue
    return found


@pytest.mark.timeout(300)
def test_hostile_pdfs_end_within_limits_and_the_server_keeps_serving(server: Server) -> None:
    hostile = [
        ("decompression bomb", bomb_pdf(3.0), EXHAUSTED, "more than 512 MB of memory"),
        ("20,000 pages", many_pages_pdf(20_000), EXHAUSTED, "more than 5000 pages"),
        ("xobject explosion", xobject_explosion_pdf(40), EXHAUSTED, "took longer than 8 s"),
        ("page-tree cycle", page_tree_cycle_pdf(), PRECONDITION, "too little text: found 1 sentence,"),
    ]
    pid = server.proc.pid
    for name, data, expected, fragment in hostile:
        started = time.monotonic()
        code, message = _call(server, data)
        elapsed = time.monotonic() - started
        assert code == expected and fragment in message, f"{name}: {code.name} {message}"
        assert elapsed < 60, f"{name} took {elapsed:.0f} s"
        assert server.serving(), name
        assert _rss_mb(pid) < 1024, f"server memory after {name}: {_rss_mb(pid):.0f} MB"
        assert not server.book_exists(data)
    deadline = time.monotonic() + 10
    while _workers(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _workers(pid), "extraction workers outlived their request"
    # And real work still goes through.
    assert server.stub().IngestBook(_requests(_small_book(4)), timeout=60).manifest.sentences == 48


# --- CLI -------------------------------------------------------------------------------------------


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_every_bad_corpus_file_is_one_clear_cli_error(tmp_path: Path, name: str) -> None:
    require_shared(BAD)
    path = BAD / name
    if not path.exists():
        pytest.skip(f"{path} is absent")
    store = tmp_path / "store"
    out = run_cli("ingest", str(path), "--store", str(store), timeout=90)
    assert out.returncode != 0
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), out.stderr
    assert all(f in lines[-1] for f in BAD_FILES[name][1]), lines[-1]
    assert "Traceback" not in out.stderr and out.stdout == ""
    assert not (store / "books").exists() or not any((store / "books").iterdir())


@pytest.mark.timeout(120)
def test_cli_ingests_locally_and_through_a_server(server: Server, tmp_path: Path) -> None:
    pdf_path = tmp_path / "keeper.pdf"
    pdf_path.write_bytes(_small_book(5))
    store = tmp_path / "store"
    args = ("ingest", str(pdf_path), "--parts", "3", "--chunk-sentences", "4", "--seed", "5")
    local = run_cli(*args, "--store", str(store), "--json")
    assert local.returncode == 0, local.stderr
    manifest = json.loads(local.stdout)
    assert manifest["params"] == {
        "auto_reduce_parts": False,
        "chunk_sentences": 4,
        "parts": 3,
        "requested_parts": 3,
        "seed": 5,
        "test_fraction": 0.1,
    }
    assert (store / manifest["parts"][2]["test_key"]).exists()
    assert local.stderr == ""  # quiet when not on a terminal: no progress bar, no log lines
    again = run_cli(*args, "--store", str(store))
    assert again.returncode == 0 and "(already ingested)" in again.stdout
    remote = run_cli(*args, "--server", server.address, "--json")
    assert remote.returncode == 0, remote.stderr
    assert json.loads(remote.stdout)["book_id"] == manifest["book_id"]
    assert (server.store / layout.manifest_key(manifest["book_id"])).exists()
    too_many = run_cli("ingest", str(pdf_path), "--store", str(tmp_path / "other"), "--parts", "30")
    assert too_many.returncode != 0
    assert (
        too_many.stderr.strip()
        .splitlines()[-1]
        .startswith("error: too little text: found 48 sentences, need at least 600")
    )
    reduced = run_cli(
        "ingest", str(pdf_path), "--store", str(tmp_path / "other"), "--parts", "30", "--auto-reduce-parts"
    )
    assert reduced.returncode == 0 and "reduced to 2" in reduced.stdout
    # Locally into the server's store, then the job is registered with its coordinator.
    env = base_env(NOVELCRAFTER_COORDINATOR=server.address)
    with_job = run_cli(*args, "--store", str(server.store), "--create-job", env=env)
    assert with_job.returncode == 0, with_job.stderr
    assert "(already ingested)" in with_job.stdout  # the remote ingest above put it there
    assert re.search(r"job j-[0-9a-f]{12} created", with_job.stdout), with_job.stdout
    missing = run_cli("ingest", str(tmp_path / "nope.pdf"), "--store", str(store))
    assert (
        missing.returncode != 0 and missing.stderr.strip() == f"error: no such file: {tmp_path / 'nope.pdf'}"
    )
