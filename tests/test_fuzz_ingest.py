"""Fuzzing the ingest path: mutated PDFs against a real ingest server process.

Every input ends in a clean answer — a manifest, or INVALID_ARGUMENT /
FAILED_PRECONDITION / RESOURCE_EXHAUSTED with a readable message — within the
extraction limits, and the server keeps answering health checks. Never INTERNAL.

Bounded by default (NOVELCRAFTER_FUZZ_EXAMPLES, default 30); a longer run is one
variable away: ``NOVELCRAFTER_FUZZ_EXAMPLES=2000 make test ARGS=tests/test_fuzz_ingest.py``.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from fault_support import client_settings, start_ingest
from fpdf import FPDF
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import BAD

from novelcrafter.rpc import connect
from novelcrafter.v1 import common_pb2, ingest_pb2, ingest_pb2_grpc

EXAMPLES = int(os.environ.get("NOVELCRAFTER_FUZZ_EXAMPLES", "30"))
CLEAN_CODES = {
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}


def _seed_pdf(*, compress: bool = True) -> bytes:
    """A small, valid, multi-page book-like PDF that the project makes itself. Uncompressed,
    its content streams and text operators are plain bytes the mutations can reach."""
    pdf = FPDF()
    pdf.set_compression(compress)
    pdf.set_font("Helvetica", size=11)
    for page in range(3):
        pdf.add_page()
        pdf.cell(0, 8, "THE LIGHTHOUSE KEEPER", align="C", new_x="LMARGIN", new_y="NEXT")
        text = " ".join(
            f"The lamp burned on night {page * 20 + i}, and Mr. Hale watched the sea without a word."
            for i in range(20)
        )
        pdf.multi_cell(0, 6, text)
        pdf.set_y(-15)
        pdf.cell(0, 8, str(page + 1), align="C")
    return bytes(pdf.output())


def _seeds() -> list[bytes]:
    """Generated books, plus the small broken PDFs of the shared corpus that still look like PDFs
    (the empty file and the non-PDF are refused before parsing: nothing to mutate there)."""
    seeds = [_seed_pdf(), _seed_pdf(compress=False)]
    if BAD.exists():
        for path in sorted(BAD.glob("*.pdf")):
            data = path.read_bytes()
            if 0 < len(data) < 64_000 and data.startswith(b"%PDF"):
                seeds.append(data)
    return seeds


SEEDS = _seeds()
HEADER = 9  # "%PDF-1.x\n": kept intact, or almost every input would stop at the format sniff
NUMBER = re.compile(rb"-?\d+")
HOSTILE_NUMBERS = [b"0", b"-1", b"2147483648", b"99999999", b"7", b"1e308", b"3.5"]


@st.composite
def mutated_pdf(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "truncate", "insert", "delete", "splice", "number", "number"]))
        pos = draw(st.integers(HEADER, max(len(data) - 1, HEADER)))
        if op == "flip" and pos < len(data):
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            del data[pos:]
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=64))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 256))]
        elif op == "splice":
            other = draw(st.sampled_from(SEEDS))
            start = draw(st.integers(0, max(len(other) - 1, 0)))
            data[pos:pos] = other[start : start + draw(st.integers(1, 512))]
        elif op == "number":  # corrupt a real length, offset, object number, count or coordinate
            found = NUMBER.search(data, pos) or NUMBER.search(data, HEADER)
            if found:
                data[found.start() : found.end()] = draw(st.sampled_from(HOSTILE_NUMBERS))
    return bytes(data)


@pytest.fixture(scope="module")
def ingest_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    store = tmp / "store"
    # Tighter extraction limits than production, so a hostile input ends fast.
    env = {"NOVELCRAFTER_EXTRACT_TIMEOUT": "20", "NOVELCRAFTER_EXTRACT_PAGE_TIMEOUT": "10"}
    server = start_ingest(str(store), tmp, env=env)
    yield server.address, store
    assert server.alive(), "the ingest server died during fuzzing:\n" + server.output()[-3000:]
    server.stop()


def _upload(stub: ingest_pb2_grpc.IngestServiceStub, data: bytes) -> ingest_pb2.IngestBookResponse:
    def requests() -> Iterator[ingest_pb2.IngestBookRequest]:
        yield ingest_pb2.IngestBookRequest(
            metadata=ingest_pb2.IngestMetadata(
                filename="fuzz.pdf",
                params=common_pb2.IngestParams(chunk_sentences=2, parts=1, auto_reduce_parts=True),
            )
        )
        for i in range(0, len(data), 32 * 1024):
            yield ingest_pb2.IngestBookRequest(chunk=data[i : i + 32 * 1024])

    return stub.IngestBook(requests(), timeout=90)


def _assert_no_half_written_books(store: Path) -> None:
    """A failed ingest leaves nothing behind: every book folder has its manifest (the commit
    point) and every key the manifest names; no temporary file is left over."""
    assert not [p for p in store.rglob("*") if ".nc-tmp-" in p.name]
    books = store / "books"
    for folder in books.iterdir() if books.exists() else []:
        manifest = folder / "manifest.json"
        assert manifest.exists(), f"half-written book {folder.name}: {sorted(folder.rglob('*'))}"
        listed = json.loads(manifest.read_text())
        for part in listed["parts"]:
            assert (store / part["train_key"]).exists() and (store / part["test_key"]).exists()


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_mutated_pdfs_end_cleanly(ingest_server: tuple[str, Path]) -> None:
    address, store = ingest_server
    channel = connect(address, client_settings())
    stub = ingest_pb2_grpc.IngestServiceStub(channel)
    health = health_pb2_grpc.HealthStub(channel)
    outcomes: Counter[str] = Counter()

    @settings(
        max_examples=EXAMPLES,
        deadline=None,
        database=None,
        derandomize=bool(os.environ.get("CI")),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(mutated_pdf())
    def check(data: bytes) -> None:
        try:
            # The deadline bounds a hang: past the extraction limits it would end DEADLINE_EXCEEDED.
            resp = _upload(stub, data)
            assert resp.manifest.book_id
            outcomes["ok"] += 1
        except grpc.RpcError as exc:
            assert exc.code() in CLEAN_CODES, f"{exc.code().name}: {exc.details()}"
            assert exc.details() and "\n" not in exc.details() and "Traceback" not in exc.details()
            outcomes[exc.code().name] += 1
        status = health.Check(health_pb2.HealthCheckRequest(), timeout=10).status
        assert status == health_pb2.HealthCheckResponse.SERVING

    check()
    channel.close()
    print(f"fuzz outcomes over {EXAMPLES} inputs: {dict(outcomes)}")
    assert outcomes.total() >= EXAMPLES
    _assert_no_half_written_books(store)


def test_seed_corpus_is_meaningful() -> None:
    assert len(SEEDS[0]) > 1000 and SEEDS[0].startswith(b"%PDF")
    if not BAD.exists():
        pytest.skip(f"{BAD} absent: fuzzing uses only the generated seed PDF")
    assert len(SEEDS) >= 4
