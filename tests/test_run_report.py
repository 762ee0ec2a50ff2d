"""The run report: table, book perplexity, side-by-side text, plot and report files."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from novelcrafter.run.report import (
    PLOT_NAME,
    Continuation,
    PartRow,
    RunSummary,
    book_perplexity,
    format_table,
    markdown_table,
    rows_from_job,
    side_by_side,
    write_report,
)
from novelcrafter.v1 import jobs_pb2

JOB = "j-0123456789ab"


def _job() -> jobs_pb2.Job:
    job = jobs_pb2.Job(job_id=JOB, book_id="0123456789abcdef", state=jobs_pb2.JOB_STATE_SUCCEEDED)
    for i, (base, adapter, tokens) in enumerate([(40.0, 30.0, 200), (50.0, 45.0, 600)]):
        part = job.parts.add(index=i, state=jobs_pb2.PART_STATE_SUCCEEDED, adapter_version=f"{JOB}-p0{i}")
        part.metrics.CopyFrom(
            jobs_pb2.PartMetrics(
                train_loss=3.5 - i,
                base_perplexity=base,
                adapter_perplexity=adapter,
                train_tokens=1000 + i,
                eval_tokens=tokens,
                train_seconds=10.0,
                eval_seconds=2.5,
                steps=4,
                loss_curve=[4.0 - i, 3.8 - i, 3.6 - i, 3.5 - i],
            )
        )
    # Part 0 was judged for memorization and style (as the trainer reports it).
    m = job.parts[0].metrics
    m.memorization.prompts = 16
    m.memorization.base.CopyFrom(jobs_pb2.Extraction(extraction_rate=0.0, longest_copied_tokens=3))
    m.memorization.adapter.CopyFrom(jobs_pb2.Extraction(extraction_rate=0.25, longest_copied_tokens=48))
    m.memorization.control_prompts = 4
    m.memorization.control_adapter.CopyFrom(jobs_pb2.Extraction(extraction_rate=0.0, longest_copied_tokens=5))
    m.style.CopyFrom(
        jobs_pb2.Style(metric="burrows_delta_mfw100+punct+sentlen", base=0.9, adapter=0.6, prompts=8)
    )
    job.parts.add(index=2, state=jobs_pb2.PART_STATE_PENDING)  # not trained (e.g. a failed job)
    return job


def test_rows_from_job_and_book_perplexity() -> None:
    rows = rows_from_job(_job())
    assert [r.index for r in rows] == [0, 1, 2]
    assert rows[0].adapter_version == "j-0123456789ab-p00"
    assert math.isnan(rows[2].base_perplexity) and rows[2].state == "PENDING"
    assert rows[0].change == pytest.approx(30 / 40 - 1)
    ppl = book_perplexity(rows)
    # exp of the token-weighted mean NLL: each part's perplexity is exp(its mean NLL).
    assert ppl.base == pytest.approx(math.exp((200 * math.log(40) + 600 * math.log(50)) / 800))
    assert ppl.adapter == pytest.approx(math.exp((200 * math.log(30) + 600 * math.log(45)) / 800))
    assert ppl.parts == 2 and ppl.eval_tokens == 800 and ppl.improved


def test_book_perplexity_not_improved_and_empty() -> None:
    worse = [PartRow(0, base_perplexity=10.0, adapter_perplexity=11.0, eval_tokens=5)]
    assert not book_perplexity(worse).improved
    assert book_perplexity([PartRow(0)]).parts == 0


def test_plain_and_markdown_tables() -> None:
    rows = rows_from_job(_job())
    table = format_table(rows).splitlines()
    assert table[0].split()[:4] == ["part", "steps", "train", "loss"]
    assert table[2].split()[:6] == ["00", "4", "3.500", "40.00", "30.00", "-25.0%"]
    assert table[4].startswith("02 (pending)")
    assert table[-1].startswith("book")
    md = markdown_table(rows)
    assert md.splitlines()[0].startswith("| part | steps | train loss | ppl base | ppl adapter |")
    assert "| 01 | 4 | 2.500 | 50.00 | 45.00 | -10.0% | - | - | 1001 | 12.5 |" in md
    # 4 of 16 training prompts extracted by the adapter (0 by the base); style base → adapter.
    assert "| 00 | 4 | 3.500 | 40.00 | 30.00 | -25.0% | 0/16 (3) → 4/16 (48) | 0.900 → 0.600 | 1000 |" in md


def test_side_by_side_columns() -> None:
    left = Continuation("base model", "base", " the sea was calm and nothing happened at all " * 3)
    right = Continuation("tuned adapter", f"{JOB}-p01", " Mrs. Pellow lit the lamp by the church door")
    text = side_by_side(left, right, width=80, prompt="Prompt:")
    lines = text.splitlines()
    assert lines[0].startswith("base model [base]") and "tuned adapter [j-0123456789ab-p01]" in lines[0]
    assert all(len(line) <= 80 for line in lines)
    assert all(" | " in line or line.endswith(" |") for line in lines)
    assert "Pellow" in text and "nothing" in text


def test_write_report_files(tmp_path: Path) -> None:
    rows = rows_from_job(_job())
    summary = RunSummary(
        title="The Ledger of Saltmarrow",
        book_id="0123456789abcdef",
        book_path="/tmp/book.pdf",
        job_id="j-0123456789ab",
        job_state="SUCCEEDED",
        rows=rows,
        prompt="The lamp",
        continuations=[
            Continuation("base model", "base", " went out."),
            Continuation("tuned adapter", "j-0123456789ab-p01", " of Saltmarrow burned on."),
        ],
        config={"training": {"learning_rate": 0.001}},
        timings={"startup": 20.0, "training": 300.0},
    )
    paths = write_report(tmp_path, summary)
    png = paths["plot"].read_bytes()
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and len(png) > 10_000
    import matplotlib.image

    height, width = matplotlib.image.imread(paths["plot"]).shape[:2]
    assert width > 1000 and height > 400
    md = paths["report"].read_text()
    assert f"]({PLOT_NAME})" in md
    assert "| 00 | 4 | 3.500 | 40.00 | 30.00 |" in md
    assert "> The lamp went out." in md and "> The lamp of Saltmarrow burned on." in md
    metrics = json.loads(paths["metrics"].read_text())  # NaN of the untrained part → null, valid JSON
    assert metrics["parts"][2]["base_perplexity"] is None
    assert metrics["book_perplexity"]["improved"] is True
    assert metrics["continuations"][1]["version"] == "j-0123456789ab-p01"
    part0 = metrics["parts"][0]
    assert part0["memorization"]["base"] == {"extraction_rate": 0.0, "longest_copied_tokens": 3}
    assert part0["memorization"]["adapter"] == {"extraction_rate": 0.25, "longest_copied_tokens": 48}
    assert part0["memorization"]["prompts"] == 16 and part0["memorization"]["control"]["prompts"] == 4
    assert part0["style"] == {
        "metric": "burrows_delta_mfw100+punct+sentlen",
        "base": 0.9,
        "adapter": 0.6,
        "prompts": 8,
    }
    assert metrics["parts"][1]["memorization"] is None and metrics["parts"][1]["style"] is None
    assert "burrows_delta_mfw100+punct+sentlen" in md
    assert not list(tmp_path.glob("*.tmp*"))
