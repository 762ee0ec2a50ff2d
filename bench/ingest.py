"""Benchmark: our ingest pipeline vs. plain single-process pdfminer, same books, one run.

    .venv/bin/python -m bench.ingest                     # the real books in ../shared (skips without it)
    .venv/bin/python -m bench.ingest BOOK.pdf ... [--repeat 3] [--workers N]

Baseline = ``pdfminer.high_level.extract_text(path)``: what the original project did, one
process, text only. Ours = :func:`novelcrafter.ingest.pipeline.ingest` end to end: pdfminer
in sandboxed worker processes over page blocks (all cores), then cleaning, Punkt sentences,
chunking and the store writes (to a temporary directory). Pages per second of each, their
ratio, and what cleaning removed. With ``--repeat`` the runs alternate (baseline, ours, …)
and the best time of each is kept: on a shared machine both then see similar load.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED_BOOKS = ROOT.parent / "shared" / "corpus" / "books"


def baseline_seconds(path: Path) -> float:
    from pdfminer.high_level import extract_text

    started = time.perf_counter()
    extract_text(str(path))
    return time.perf_counter() - started


def ours_seconds(path: Path) -> tuple[float, dict]:
    from novelcrafter.ingest.pipeline import ingest

    from novelcrafter.store import open_store

    data = path.read_bytes()
    with tempfile.TemporaryDirectory(prefix="nc-bench-ingest-") as tmp:
        store = open_store(tmp)
        started = time.perf_counter()
        manifest = ingest(store, data, filename=path.name).manifest
        return time.perf_counter() - started, manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("books", nargs="*", type=Path, help="PDFs (default: ../shared/corpus/books/*.pdf)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each; the best time is kept")
    parser.add_argument("--workers", type=int, default=0, help="extraction workers (default: all cores)")
    args = parser.parse_args(argv)

    books = args.books or sorted(SHARED_BOOKS.glob("*.pdf"))
    if not books:
        print(f"bench.ingest skipped: no books given and {SHARED_BOOKS} is absent or empty", file=sys.stderr)
        return 0
    if args.workers:
        import os

        os.environ["NOVELCRAFTER_EXTRACT_WORKERS"] = str(args.workers)

    from novelcrafter.ingest.extract import Limits

    print(f"ingest benchmark: {Limits.from_env().workers} extraction workers, best of {args.repeat}")
    columns = (
        ("pages", 6),
        ("pdfminer s", 12),
        ("ours s", 9),
        ("pdfminer p/s", 14),
        ("ours p/s", 10),
        ("ratio", 7),
    )
    print(f"{'book':<28}" + "".join(f"{name:>{width}}" for name, width in columns))
    total_pages = total_base = total_ours = 0.0
    cleaning_rows = []
    for path in books:
        # Interleaved, so both see the same load on a shared machine; the best of each is kept.
        bases, runs = [], []
        for _ in range(args.repeat):
            bases.append(baseline_seconds(path))
            runs.append(ours_seconds(path))
        base = min(bases)
        ours, manifest = min(runs, key=lambda run: run[0])
        pages = manifest["pages"]
        total_pages += pages
        total_base += base
        total_ours += ours
        print(
            f"{path.stem[:27]:<28}{pages:>6}{base:>12.2f}{ours:>9.2f}"
            f"{pages / base:>14.1f}{pages / ours:>10.1f}{base / ours:>7.2f}"
        )
        cleaning_rows.append((path.stem, manifest))
    print(
        f"{'all books':<28}{int(total_pages):>6}{total_base:>12.2f}{total_ours:>9.2f}"
        f"{total_pages / total_base:>14.1f}{total_pages / total_ours:>10.1f}{total_base / total_ours:>7.2f}"
    )
    print(f"\nspeed ratio (ours / single-process pdfminer, pages per second): {total_base / total_ours:.2f}")
    print("\ncleaning (what was removed or changed, per book):")
    for name, manifest in cleaning_rows:
        counts = ", ".join(f"{k}={v}" for k, v in sorted(manifest["cleaning"].items()) if v)
        kept = manifest["words"] / max(1, manifest["extracted_words"])
        print(f"  {name}: {counts}")
        print(
            f"    {manifest['words']} of {manifest['extracted_words']} extracted words kept ({kept:.1%}), "
            f"{manifest['sentences']} sentences, {manifest['chunks']} chunks"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
