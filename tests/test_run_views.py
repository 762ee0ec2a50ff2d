"""The run's progress views, fed the kind of WatchJob event stream a job produces."""

from __future__ import annotations

import io

from novelcrafter.run.views import BarView, LineView
from novelcrafter.v1 import jobs_pb2

JOB = "j-0123456789ab"


def _events() -> list[jobs_pb2.JobEvent]:
    seq = iter(range(1, 1000))

    def ev(part: int = -1, **kw: object) -> jobs_pb2.JobEvent:
        return jobs_pb2.JobEvent(job_id=JOB, sequence=next(seq), part_index=part, **kw)

    events = [ev(job_state=jobs_pb2.JOB_STATE_RUNNING)]
    for part in (0, 1):
        events.append(ev(part, part_state=jobs_pb2.PART_STATE_RUNNING))
        events.append(ev(part, message=f"part {part:02d} claimed by worker w1 (cpu)"))
        for step in range(1, 4):
            progress = jobs_pb2.ProgressUpdate(
                step=step, total_steps=3, loss=3.5 - 0.1 * step, tokens_per_second=250.0, phase="train"
            )
            events.append(ev(part, progress=progress))
        events.append(ev(part, progress=jobs_pb2.ProgressUpdate(step=3, total_steps=3, phase="eval")))
        metrics = jobs_pb2.PartMetrics(
            train_loss=3.2, base_perplexity=40.0, adapter_perplexity=30.0, steps=3, train_tokens=900
        )
        events.append(ev(part, metrics=metrics))
        events.append(ev(part, part_state=jobs_pb2.PART_STATE_SUCCEEDED))
    events.append(ev(job_state=jobs_pb2.JOB_STATE_SUCCEEDED))
    return events


def test_line_view_prints_states_results_and_final_steps() -> None:
    out = io.StringIO()
    view = LineView(out, every=3600)
    for event in _events():
        view.on_event(event)
    text = out.getvalue()
    assert f"job {JOB}: running" in text and f"job {JOB}: succeeded" in text
    assert "part 00 claimed by worker w1 (cpu)" in text and "part 00: part 00" not in text
    assert "part 01 done: train loss 3.200, held-out perplexity base 40.00 → adapter 30.00 (-25.0%)" in text
    assert "part 00: step 1/3" in text and "part 00: step 3/3 loss 3.200 250 tok/s" in text
    assert "part 00: step 2/3" not in text  # throttled


def test_quiet_line_view_has_no_step_lines() -> None:
    out = io.StringIO()
    view = LineView(out, quiet=True)
    for event in _events():
        view.on_event(event)
    assert "step" not in out.getvalue().replace("steps", "")
    assert "part 01 done" in out.getvalue()


def test_bar_view_draws_on_a_terminal() -> None:
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=120)
    view = BarView(console, parts=2)
    for event in _events():
        view.on_event(event)
    view.close()
    text = out.getvalue()
    assert "part 00 done: train loss 3.200" in text and "part 01 done" in text
    assert "part 01 train" in text and "loss 3.200 · 250 tok/s" in text and "ETA" in text
    assert "2/2" in text  # the overall bar over parts completed
    assert not view.train and not view.eval  # finished parts' bars are removed


def test_part_lines_show_memorization_and_style_when_measured() -> None:
    from novelcrafter.progress import format_metrics
    from novelcrafter.run.views import metrics_line

    m = jobs_pb2.PartMetrics(train_loss=3.2, base_perplexity=40.0, adapter_perplexity=30.0, steps=3)
    assert "memorization" not in metrics_line(0, m) and "style" not in format_metrics(m)
    m.memorization.prompts = 16
    m.memorization.base.CopyFrom(jobs_pb2.Extraction(extraction_rate=0.0, longest_copied_tokens=2))
    m.memorization.adapter.CopyFrom(jobs_pb2.Extraction(extraction_rate=0.25, longest_copied_tokens=40))
    m.style.CopyFrom(jobs_pb2.Style(metric="burrows_delta_mfw100+punct+sentlen", base=0.9, adapter=0.6))
    for line in (metrics_line(0, m), format_metrics(m)):
        assert "memorization on 16 training prompts base 0% extracted (longest run 2)" in line
        assert "→ adapter 25% extracted (longest run 40)" in line
        assert "style burrows_delta_mfw100+punct+sentlen base 0.900 → adapter 0.600 (lower = closer)" in line
