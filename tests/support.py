"""Helpers shared by the tests: ports, real server processes, the shared corpus."""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared"
BOOKS = SHARED / "corpus" / "books"
BAD = SHARED / "corpus" / "bad"
VENV_BIN = Path(sys.executable).parent
NOVELCRAFTER = str(VENV_BIN / "novelcrafter")


def require_shared(path: Path = SHARED) -> Path:
    """Skip (with the reason) when ../shared is not beside the checkout."""
    if not path.exists():
        pytest.skip(f"{path} is absent: the shared corpus lives beside the checkout, not in it")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on 127.0.0.1:{port} after {timeout}s")


def base_env(**extra: str) -> dict[str, str]:
    """A clean environment for child processes: no inherited NOVELCRAFTER_* settings, and the
    inference service's HTTP API and ``serve all``'s console off (their defaults, :8000 and :8080,
    are fixed ports for the whole machine); a test that wants one passes its address."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOVELCRAFTER_", "AWS_"))}
    env.update(
        PYTHONUNBUFFERED="1",
        NOVELCRAFTER_LOG_FORMAT="text",
        NOVELCRAFTER_HTTP_LISTEN="off",
        NOVELCRAFTER_CONSOLE_LISTEN="off",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"),
        TOKENIZERS_PARALLELISM="false",
    )
    env.update(extra)
    return env


class Proc:
    """A real child process with its output captured to a log file."""

    def __init__(
        self, args: Sequence[str], env: dict[str, str], log_path: Path, cwd: Path | None = None
    ) -> None:
        self.args = list(args)
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(
            self.args,
            env=env,
            cwd=cwd or ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.popen.pid

    def output(self) -> str:
        if not self._log.closed:
            self._log.flush()
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        if self.popen.poll() is None:
            os.kill(self.popen.pid, sig)

    def stop(self, timeout: float = 30.0) -> int:
        if self.popen.poll() is None:
            self.signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.popen.wait(10)
        self._log.close()
        return self.popen.returncode

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.popen.wait(10)


def run_cli(
    *args: str,
    env: dict[str, str] | None = None,
    timeout: float = 300,
    input: bytes | None = None,
    cwd: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run the installed ``novelcrafter`` command as a subprocess."""
    return subprocess.run(
        [NOVELCRAFTER, *args],
        env=env or base_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        input=input,
        cwd=cwd or ROOT,
    )


def readme_block(marker: str) -> list[list[str]]:
    """The commands of the first ```bash block after ``marker`` in README.md, comments dropped."""
    text = (ROOT / "README.md").read_text()
    assert marker in text, f"no {marker!r} in README.md"
    block = re.search(r"```bash\n(.*?)```", text.split(marker, 1)[1], re.S)
    assert block, f"no bash block after {marker!r}"
    return [shlex.split(line, comments=True) for line in block.group(1).splitlines() if line.strip()]
