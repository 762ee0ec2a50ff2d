"""Benchmark: our ingest pipeline vs. plain single-process pdfminer, same books, one run.

    .venv/bin/python -m bench.ingest                     # the real books in ../shared (skips without it)
    .venv/bin/python -m bench.ingest BOOK.pdf ... [--repeat 3] [--workers N]

Baseline = ``pdfminer.high_level.extract_text(path)``: what the original project did, one
process, text only. Ours = :func:`novelcrafter.ingest.pipeline.ingest` end to end: pdfminer
in sandboxed worker processes over page blocks (all cores), then cleaning, Punkt sentences,
chunking and the store writes (to a temporary directory). Pages per second of each, their
ratio, and what cleaning removed: every class of furniture counted (zero included), and the
share of the body text kept, measured against the baseline's own text (interior lines of the
pages between 10% and 90% of the book, whose middle words must be in our text), so that a
cleaning rule that eats prose shows as a number. With ``--repeat`` the runs alternate
(baseline, ours, …) and the best time of each is kept: on a shared machine both then see
similar load.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHARED_BOOKS = ROOT.parent / "shared" / "corpus" / "books"


# Every class of edition furniture the cleaner removes, printed even when zero.
FURNITURE = (
    "boilerplate_lines",
    "toc_lines",
    "illustration_list_lines",
    "glossary_lines",
    "footnote_lines",
    "footnote_marks",
    "front_matter_lines",
    "captions",
    "running_headers",
    "running_footers",
    "page_numbers",
    "lead_ins_joined",
)
_LIGATURES = str.maketrans({"\ufb01": "fi", "\ufb02": "fl", "\ufb00": "ff", "\ufb03": "ffi", "\ufb04": "ffl"})


def body_kept(raw_pages: Mapping[int, list[str]], page_count: int, text: str) -> tuple[int, int]:
    """(body words kept, body words) by an oracle independent of our cleaning.

    ``raw_pages``: page index -> text lines from plain pdfminer. Body words are those of the
    interior lines (not the first or last three of a page, where heads, folios and notes sit)
    of pages between 10% and 90% of the book (no front or back matter), with at least six
    words and not all capitals (captions); a line is kept when its middle words are in ``text``.
    """
    flat = re.sub(r"\s+", " ", text.translate(_LIGATURES))
    kept = total = 0
    for index, lines in raw_pages.items():
        if not 0.1 * page_count <= index < 0.9 * page_count:
            continue
        for line in lines[3:-3]:
            words = line.translate(_LIGATURES).split()
            if len(words) < 6 or line.upper() == line:
                continue
            total += len(words)
            kept += len(words) if " ".join(words[1:-1]) in flat else 0
    return kept, total


def baseline(path: Path) -> tuple[float, dict[int, list[str]]]:
    """Seconds for plain pdfminer, and its text (the body oracle)."""
    from pdfminer.high_level import extract_text

    started = time.perf_counter()
    text = extract_text(str(path))
    seconds = time.perf_counter() - started
    pages = {
        index: [line.strip() for line in page.splitlines() if line.strip()]
        for index, page in enumerate(text.split("\x0c"))
    }
    return seconds, pages


def ours_seconds(path: Path) -> tuple[float, dict, str]:
    from novelcrafter.ingest.pipeline import ingest

    from novelcrafter import layout
    from novelcrafter.store import open_store

    data = path.read_bytes()
    with tempfile.TemporaryDirectory(prefix="nc-bench-ingest-") as tmp:
        store = open_store(tmp)
        started = time.perf_counter()
        manifest = ingest(store, data, filename=path.name).manifest
        seconds = time.perf_counter() - started
        return seconds, manifest, store.get_text(layout.text_key(manifest["book_id"]))


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
            bases.append(baseline(path))
            runs.append(ours_seconds(path))
        base, raw_pages = min(bases, key=lambda run: run[0])
        ours, manifest, text = min(runs, key=lambda run: run[0])
        pages = manifest["pages"]
        total_pages += pages
        total_base += base
        total_ours += ours
        print(
            f"{path.stem[:27]:<28}{pages:>6}{base:>12.2f}{ours:>9.2f}"
            f"{pages / base:>14.1f}{pages / ours:>10.1f}{base / ours:>7.2f}"
        )
        cleaning_rows.append((path.stem, manifest, body_kept(raw_pages, pages, text)))
    print(
        f"{'all books':<28}{int(total_pages):>6}{total_base:>12.2f}{total_ours:>9.2f}"
        f"{total_pages / total_base:>14.1f}{total_pages / total_ours:>10.1f}{total_base / total_ours:>7.2f}"
    )
    print(f"\nspeed ratio (ours / single-process pdfminer, pages per second): {total_base / total_ours:.2f}")
    print("\ncleaning (what was removed or changed, per book):")
    for name, manifest, (body, body_total) in cleaning_rows:
        cleaning = manifest["cleaning"]
        furniture = ", ".join(f"{k}={cleaning.get(k, 0)}" for k in FURNITURE)
        other = ", ".join(f"{k}={v}" for k, v in sorted(cleaning.items()) if v and k not in FURNITURE)
        kept = manifest["words"] / max(1, manifest["extracted_words"])
        print(f"  {name}:")
        print(f"    furniture: {furniture}")
        print(f"    other: {other}")
        print(
            f"    body text kept: {body} of {body_total} body words ({body / max(1, body_total):.2%}); "
            f"{manifest['words']} of {manifest['extracted_words']} extracted words kept ({kept:.1%}), "
            f"{manifest['sentences']} sentences, {manifest['chunks']} chunks"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
