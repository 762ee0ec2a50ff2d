"""A throwaway PostgreSQL server for the tests (the ``postgres`` fixture in conftest.py).

It runs Debian's server binaries (``/usr/lib/postgresql/<version>/bin``; elsewhere ``initdb`` and
``postgres`` on PATH): ``initdb`` into a temporary folder, then ``postgres`` as a child process
on a free loopback port, password authentication (scram-sha-256) over TCP only, and one
database, ``novelcrafter``. PostgreSQL refuses to run as root, so where the tests run as root
(CI) the server runs as Debian's ``postgres`` user (``nobody`` where there is none), which
owns the folder. ``stop()`` and ``start()`` take the same server down and up again on the same
port with the same data: a database outage, as the coordinator sees one.

Where no server binaries are installed the fixture skips with the reason; under CI (CI=true)
it fails instead, so that CI never passes without having run the PostgreSQL tests.
"""

from __future__ import annotations

import glob
import os
import pwd
import re
import secrets
import shutil
import subprocess
import tempfile
import time
from pathlib import Path
from typing import IO, Any

import pytest
from support import free_port

USER = "novelcrafter"
DATABASE = "novelcrafter"
SERVER_PROGRAMS = ("initdb", "postgres", "pg_ctl", "pg_isready", "createdb")


def find_binaries() -> Path | None:
    """The folder with PostgreSQL's server programs: the newest Debian version, else PATH."""

    def version(path: str) -> tuple[int, ...]:
        return tuple(int(n) for n in re.findall(r"\d+", Path(path).parent.name))

    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(str(Path(on_path).resolve().parent))
    for folder in candidates:
        if all((Path(folder) / name).is_file() for name in SERVER_PROGRAMS):
            return Path(folder)
    return None


def require_binaries() -> Path:
    """The server programs' folder; skip (fail under CI=true) with the reason when there is none."""
    found = find_binaries()
    if found is not None:
        return found
    reason = (
        "PostgreSQL's server programs (initdb, postgres, pg_ctl) are not installed: "
        "apt-get install postgresql (Debian), or put a PostgreSQL bin folder on PATH"
    )
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the PostgreSQL tests, but {reason}")
    pytest.skip(reason)


def server_account() -> pwd.struct_passwd | None:
    """Whom the server runs as: None (this process's user) unless that is root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise RuntimeError("running as root, and there is neither a postgres nor a nobody user to run PostgreSQL")


class PostgresServer:
    """One PostgreSQL server in a temporary folder; ``url`` reaches its ``novelcrafter`` database.

    ``start()`` initialises the data folder the first time; ``stop()`` is a fast shutdown
    (``pg_ctl stop -m fast``: clients are disconnected, committed data stays); ``close()`` stops
    it and removes the folder. The port and password stay the same for the server's life.
    """

    def __init__(self, bindir: Path, *, user: str = USER, database: str = DATABASE) -> None:
        self.bindir = bindir
        self.user = user
        self.database = database
        self.password = secrets.token_urlsafe(18)  # URL-safe: goes into the URL as it is
        self.port = 0
        self.account = server_account()
        # Not under pytest's tmp_path: /tmp/pytest-of-root is root's alone (mode 0700), and the
        # server's user must reach its folder. The socket folder's path must stay short too.
        self.root = Path(tempfile.mkdtemp(prefix="novelcrafter-pg-"))
        self.data = self.root / "data"
        self.log_path = self.root / "postgres.log"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        if self.account is not None:
            os.chown(self.root, self.account.pw_uid, self.account.pw_gid)

    # --- addresses -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return self.url_for(self.database)

    def url_for(self, database: str) -> str:
        """The URL of another database of this server (see ``create_database``)."""
        if not self.port:
            raise RuntimeError("the PostgreSQL server has not been started")
        return f"postgresql://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> None:
        """Start the server (initdb and the database the first time); no-op when it runs."""
        if self.running:
            return
        first = not (self.data / "PG_VERSION").exists()
        if first:
            self._initdb()
        attempts = 3 if not self.port else 1  # a new port only before anyone has the URL
        for attempt in range(attempts):
            if not self.port or attempt:
                self.port = free_port()
            self._spawn()
            try:
                self._wait_ready(timeout)
                break
            except RuntimeError:
                if attempt + 1 == attempts or "could not bind" not in self.log_tail():
                    raise
        if first:
            self._client("createdb", "--owner", self.user, self.database)

    def stop(self, timeout: float = 60.0) -> None:
        """Fast shutdown (``pg_ctl stop -m fast``); the data stays for the next ``start()``."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            result = self._as_server(
                [
                    self._bin("pg_ctl"),
                    "stop",
                    "-D",
                    str(self.data),
                    "-m",
                    "fast",
                    "-w",
                    "-t",
                    str(int(timeout)),
                ],
                timeout=timeout + 10,
            )
            if result.returncode != 0:
                self._proc.kill()
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait(10)
        self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def close(self) -> None:
        """Stop the server and remove its folder."""
        try:
            self.stop()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- databases ---------------------------------------------------------------------------

    def create_database(self, name: str | None = None) -> str:
        """A new, empty database on this server (for tests that want one of their own); its URL."""
        name = name or f"t_{secrets.token_hex(6)}"
        self._client("createdb", "--owner", self.user, name)
        return self.url_for(name)

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    # --- internals ---------------------------------------------------------------------------

    def _bin(self, name: str) -> str:
        return str(self.bindir / name)

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C", PGPASSWORD=self.password, PGCONNECT_TIMEOUT="5")
        if self.account is not None:
            env.update(HOME=self.account.pw_dir, USER=self.account.pw_name, LOGNAME=self.account.pw_name)
        return env

    def _user_kwargs(self) -> dict[str, Any]:
        """Popen arguments that run a program as the server's user (the setuid of setpriv)."""
        if self.account is None:
            return {}
        return {"user": self.account.pw_uid, "group": self.account.pw_gid, "extra_groups": []}

    def _as_server(self, argv: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            env=self._env(),
            cwd=self.root,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            **self._user_kwargs(),
        )

    def _initdb(self) -> None:
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if self.account is not None:
            os.chown(pwfile, self.account.pw_uid, self.account.pw_gid)
        try:
            result = self._as_server(
                [
                    self._bin("initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    self.user,
                    f"--pwfile={pwfile}",
                    "-A",
                    "scram-sha-256",
                    "-E",
                    "UTF8",
                    "--no-locale",
                    "--no-sync",
                ],
                timeout=180,
            )
        finally:
            pwfile.unlink(missing_ok=True)
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")

    def _spawn(self) -> None:
        if self._log is None:
            self._log = open(self.log_path, "ab")
        self._proc = subprocess.Popen(
            [
                self._bin("postgres"),
                "-D",
                str(self.data),
                "-p",
                str(self.port),
                "-c",
                "listen_addresses=127.0.0.1",
                "-c",
                f"unix_socket_directories={self.root}",
                # A test server: no fsync (a fast shutdown still checkpoints), little memory.
                "-c",
                "fsync=off",
                "-c",
                "shared_buffers=32MB",
            ],
            env=self._env(),
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            **self._user_kwargs(),
        )

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        ping = [self._bin("pg_isready"), "-q", "-h", "127.0.0.1", "-p", str(self.port), "-t", "2"]
        while True:
            assert self._proc is not None
            if self._proc.poll() is not None:
                code = self._proc.returncode
                self._proc = None
                raise RuntimeError(f"postgres exited with {code} on port {self.port}:\n{self.log_tail()}")
            if subprocess.run(ping, env=self._env(), capture_output=True, timeout=30).returncode == 0:
                return
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"postgres did not accept connections in {timeout:.0f} s:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def _client(self, program: str, *args: str) -> None:
        """A client program (createdb, …) against this server over TCP, with the password."""
        argv = [self._bin(program), "-h", "127.0.0.1", "-p", str(self.port), "-U", self.user, *args]
        result = subprocess.run(
            argv, env=self._env(), capture_output=True, text=True, timeout=60, check=False
        )
        if result.returncode != 0:
            raise RuntimeError(f"{program} {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}")
