"""The local service supervisor's process handling, with real (small) child processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from novelcrafter.errors import NovelCrafterError
from novelcrafter.run.services import Child, LocalServices

IGNORES_SIGTERM = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: print('term ignored', flush=True))\n"
    "print('up', flush=True)\n"
    "time.sleep(300)\n"
)
STOPS_ON_SIGTERM = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *a: (print('stopping', flush=True), sys.exit(0)))\n"
    "print('up', flush=True)\n"
    "time.sleep(300)\n"
)


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


def _wait(predicate, timeout: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


def _child(name: str, script: str, tmp_path: Path) -> Child:
    return Child(name, [sys.executable, "-c", script], dict(os.environ), tmp_path / f"{name}.log")


@pytest.mark.timeout(60)
def test_stop_terminates_in_order_and_kills_the_stubborn(tmp_path: Path) -> None:
    services = LocalServices(store=str(tmp_path / "store"), log_dir=tmp_path)
    services.children = [
        _child("trainer", IGNORES_SIGTERM, tmp_path),
        _child("inference", STOPS_ON_SIGTERM, tmp_path),
        _child("ingest", STOPS_ON_SIGTERM, tmp_path),
    ]
    for child in services.children:
        child.start()
    assert _wait(lambda: all("up" in c.log_tail() for c in services.children))
    stopped: list[str] = []
    started = time.monotonic()
    services.stop(grace=1.0, on_stop=stopped.append)
    assert stopped == ["trainer", "inference", "ingest"]  # the worker first, while its coordinator runs
    assert time.monotonic() - started < 15
    assert not any(c.alive for c in services.children)
    trainer, inference, ingest = services.children
    assert "term ignored" in trainer.log_tail() and trainer.popen.returncode == -9  # escalated to SIGKILL
    assert "stopping" in inference.log_tail() and inference.popen.returncode == 0
    assert ingest.popen.returncode == 0
    services.stop()  # idempotent


@pytest.mark.timeout(60)
def test_a_dead_service_is_reported_with_its_log(tmp_path: Path) -> None:
    services = LocalServices(store=str(tmp_path / "store"), log_dir=tmp_path)
    script = "print('cannot listen on 1.2.3.4:5'); raise SystemExit(3)"
    services.children = [_child("ingest", script, tmp_path)]
    services.children[0].start()
    services.children[0].popen.wait(30)
    with pytest.raises(NovelCrafterError, match=r"(?s)the ingest service exited with code 3 .*cannot listen"):
        services.check_alive()
    services.stop()


@pytest.mark.timeout(60)
def test_children_die_with_a_killed_parent() -> None:
    """The launcher arms a parent-death signal: SIGKILL of the supervisor leaves no orphan."""
    code = (
        "import os, subprocess, sys\n"
        "p = subprocess.Popen([sys.executable, '-m', 'novelcrafter.run.child', str(os.getpid()), '--',"
        " 'sleep', '300'])\n"
        "print(p.pid, flush=True)\n"
        "p.wait()\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())  # type: ignore[union-attr]
    assert _wait(lambda: b"sleep" in Path(f"/proc/{pid}/cmdline").read_bytes())  # exec'd
    parent.kill()
    parent.wait(10)
    assert _wait(lambda: not _alive(pid)), "the grandchild outlived its parent"


def test_launcher_usage() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "novelcrafter.run.child", "1"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 2 and "usage" in proc.stderr
