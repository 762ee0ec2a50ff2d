"""Starting the web console as a real process next to real services, for the console tests."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from support import NOVELCRAFTER, Proc, base_env, free_port, wait_port


@dataclass
class ConsoleProc:
    proc: Proc
    url: str

    def output(self) -> str:
        return self.proc.output()

    def stop(self) -> int:
        return self.proc.stop()


def start_console(
    log_dir: Path, ingest: str, inference: str, env: dict[str, str] | None = None
) -> ConsoleProc:
    """``novelcrafter serve console`` on a free loopback port, answering /health."""
    port = free_port()
    argv = [NOVELCRAFTER, "serve", "console", "--listen", f"127.0.0.1:{port}", "--ingest", ingest,
            "--inference", inference]  # fmt: skip
    proc = Proc(argv, base_env(**(env or {})), log_dir / "console.log")
    try:
        wait_port(port, 60, proc.popen)
    except (RuntimeError, TimeoutError) as exc:
        raise AssertionError(f"the console did not start: {exc}\n{proc.output()[-3000:]}")
    return ConsoleProc(proc, f"http://127.0.0.1:{port}")


def csrf_of(html: str) -> str:
    match = re.search(r'<meta name="csrf-token" content="([^"]+)">', html)
    assert match, "the page carries no CSRF token"
    return match.group(1)


def login(session: requests.Session, url: str, token: str) -> str:
    """Log in through the form, as a browser would; return the new CSRF token."""
    page = session.get(f"{url}/login")
    answer = session.post(
        f"{url}/login",
        data={"csrf": csrf_of(page.text), "token": token, "next": "/books"},
        allow_redirects=False,
    )
    assert answer.status_code == 303, answer.text
    return csrf_of(session.get(f"{url}/books").text)


def artifacts_dir(tmp_path: Path) -> Path:
    """Screenshots go to $NOVELCRAFTER_TEST_ARTIFACTS when set (CI keeps it), else the test's tmp dir."""
    root = os.environ.get("NOVELCRAFTER_TEST_ARTIFACTS")
    path = Path(root) / "console" if root else tmp_path / "screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


def chromium_path() -> str:
    """The system Chromium (Debian's ``chromium``), or skip with the reason."""
    for candidate in (
        os.environ.get("NOVELCRAFTER_CHROMIUM"),
        "/usr/bin/chromium",
        "/usr/bin/chromium-browser",
    ):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    pytest.skip(
        "no Chromium found (apt-get install chromium, or set NOVELCRAFTER_CHROMIUM): browser tests skipped"
    )
