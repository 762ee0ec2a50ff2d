"""`novelcrafter run` input checks and schedules (no services started)."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import run_cli

from novelcrafter.run.runner import QUICK_TRAINING, RunOptions, make_run_dir, training_config


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["/nonexistent/book.pdf"], "error: book file not found: /nonexistent/book.pdf"),
        (["README.md"], "error: README.md is not a PDF"),
        (["--parts", "0"], "error: --parts must be in 1..1000 (got 0)"),
        (["--max-length", "8"], "error: --max-length must be in 16..131072 (got 8)"),
        (["--prompt", " "], "error: --prompt must not be empty"),
        (["--device", "tpu"], "error: --device must be cpu or cuda (got 'tpu')"),
        (["--replay-fraction", "1"], "error: --replay-fraction must be in [0, 1) (got 1.0)"),
    ],
)
def test_bad_input_is_one_clear_line(args: list[str], message: str, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    proc = run_cli("run", *args, "--run-dir", str(run_dir), timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == message
    assert not run_dir.exists()  # refused before anything was created or started


def test_empty_and_directory_books(tmp_path: Path) -> None:
    empty = tmp_path / "empty.pdf"
    empty.write_bytes(b"")
    assert run_cli("run", str(empty)).stderr.strip() == f"error: {empty} is empty"
    assert run_cli("run", str(tmp_path)).stderr.strip() == f"error: not a file: {tmp_path}"


def test_quick_and_full_schedules() -> None:
    quick = training_config(RunOptions())
    assert quick == QUICK_TRAINING and quick["max_steps_per_part"] > 0
    # --full: every field left to the coordinator's model-card defaults (5e-5, 1024, 3 epochs…)
    assert training_config(RunOptions(full=True)) == {}
    tuned = training_config(RunOptions(full=True, max_steps_per_part=50, learning_rate=1e-4))
    assert tuned == {"max_steps_per_part": 50, "learning_rate": 1e-4}
    assert training_config(RunOptions(max_length=512))["max_length"] == 512
    assert "replay_fraction" not in quick  # unset: the coordinator's default, no replay
    assert training_config(RunOptions(replay_fraction=0.1))["replay_fraction"] == 0.1


def test_run_dirs_are_unique(tmp_path: Path) -> None:
    first, second = make_run_dir(None, tmp_path), make_run_dir(None, tmp_path)
    assert first != second and first.is_dir() and second.is_dir()
    assert make_run_dir(tmp_path / "given") == (tmp_path / "given").resolve()


def test_keep_services_prints_where_the_console_is(capsys: pytest.CaptureFixture[str]) -> None:
    """`run --keep-services` keeps the services up and says where to open the console."""
    from novelcrafter.run.runner import Terminal, _serve_until_interrupted
    from novelcrafter.run.services import LocalServices

    class UntilCtrlC(LocalServices):
        def check_alive(self) -> None:
            raise KeyboardInterrupt  # the user's Ctrl-C, right after the message

    services = UntilCtrlC(
        store="unused",
        ingest_listen="127.0.0.1:5",
        inference_listen="127.0.0.1:6",
        console_listen="0.0.0.0:7",
    )
    _serve_until_interrupted(Terminal(tty=False, quiet=False), services)
    out = capsys.readouterr().out
    assert "console: open http://127.0.0.1:7/ in a browser" in out
    assert "stopping the services" in out
