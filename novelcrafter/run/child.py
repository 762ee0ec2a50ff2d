"""Launcher for service child processes: ``python -m novelcrafter.run.child PARENT_PID -- CMD…``.

It asks the kernel to send SIGTERM to the child when the parent dies (Linux
``PR_SET_PDEATHSIG``, kept across exec), then execs the real command. So even a
``novelcrafter run`` that is SIGKILLed leaves no orphan servers behind. Doing this in a
launcher instead of ``preexec_fn`` keeps ``subprocess`` fork-safe with threads running.
"""

from __future__ import annotations

import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def _set_parent_death_signal() -> None:
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> None:
    if len(argv) < 3 or argv[1] != "--":
        print("usage: python -m novelcrafter.run.child PARENT_PID -- COMMAND [ARGS…]", file=sys.stderr)
        raise SystemExit(2)
    parent = int(argv[0])
    _set_parent_death_signal()
    if os.getppid() != parent:  # the parent died before the death signal was armed
        raise SystemExit(1)
    os.execvp(argv[2], argv[2:])


if __name__ == "__main__":
    main(sys.argv[1:])
