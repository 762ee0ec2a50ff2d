"""Start the real services as local processes on loopback, watch them, stop them cleanly.

``novelcrafter run`` and ``novelcrafter serve all`` share this: ingest (with the job
coordinator), one trainer worker and inference, each its own ``novelcrafter serve …``
process, exactly the commands a deployment runs. Children get their own session (a
terminal's Ctrl-C reaches only us, so we stop them in order) and a parent-death signal
(no orphans even if we are killed). Stopping: trainer first (it checkpoints and gives
its lease back to the still-running coordinator), then inference and ingest; each gets
SIGTERM, a grace period, then SIGKILL.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from novelcrafter.errors import NovelCrafterError, Unavailable

LOOPBACK = "127.0.0.1"
STOP_ORDER = (("console", "trainer"), ("inference", "ingest"))


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


@dataclass
class Child:
    """One service process."""

    name: str
    args: list[str]
    env: dict[str, str]
    log_path: Path | None
    health: str = ""  # gRPC address to health-check, or http://… for a metrics endpoint
    metrics: str = ""  # its Prometheus endpoint, if any
    popen: subprocess.Popen | None = None
    _log: IO[bytes] | None = None
    ready: bool = False

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def start(self) -> None:
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")
        launcher = [sys.executable, "-m", "novelcrafter.run.child", str(os.getpid()), "--"]
        self.popen = subprocess.Popen(
            [*launcher, *self.args],
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT if self._log else None,
            start_new_session=True,
        )

    def signal(self, sig: int) -> None:
        if self.alive:
            try:
                os.kill(self.popen.pid, sig)  # type: ignore[union-attr]
            except ProcessLookupError:
                pass

    def log_tail(self, lines: int = 12) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        if self._log is not None and not self._log.closed:
            self._log.flush()
        text = self.log_path.read_text(errors="replace").rstrip().splitlines()
        return "\n".join(text[-lines:])

    def close_log(self) -> None:
        if self._log is not None and not self._log.closed:
            self._log.close()


@dataclass
class LocalServices:
    """The three services on loopback, sharing one store.

    Ports: given addresses (``serve all``), or free loopback ports picked at start
    (``run``, so several runs and test suites never collide).
    """

    store: str
    log_dir: Path | None = None  # None: children write to our stdout/stderr
    ingest_listen: str | None = None
    inference_listen: str | None = None
    http_listen: str = "off"  # inference's OpenAI-compatible HTTP API (``run`` needs none)
    console_listen: str = "off"  # the web console (``serve all``, ``run --keep-services``)
    device: str | None = None
    metrics: bool = True
    extra_env: dict[str, str] = field(default_factory=dict)
    children: list[Child] = field(default_factory=list)
    _stopping: threading.Event = field(default_factory=threading.Event)

    # --- addresses ---------------------------------------------------------------------------

    @property
    def coordinator(self) -> str:
        return _client_address(self.ingest_listen or "")

    @property
    def inference(self) -> str:
        return _client_address(self.inference_listen or "")

    @property
    def console_url(self) -> str:
        return "" if self.console_listen == "off" else f"http://{_client_address(self.console_listen)}/"

    def child(self, name: str) -> Child:
        return next(c for c in self.children if c.name == name)

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        self.ingest_listen = self.ingest_listen or f"{LOOPBACK}:{free_port()}"
        self.inference_listen = self.inference_listen or f"{LOOPBACK}:{free_port()}"
        cli = [sys.executable, "-m", "novelcrafter.cli", "serve"]
        base_env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.extra_env}
        store = ["--store", self.store]
        specs = [
            ("ingest", ["ingest", "--listen", self.ingest_listen, *store], self.coordinator),
            ("trainer", ["trainer", "--coordinator", self.coordinator, *store], ""),
            (
                "inference",
                ["inference", "--listen", self.inference_listen, "--http-listen", self.http_listen, *store],
                self.inference,
            ),
        ]
        if self.device:
            specs[1][1].extend(["--device", self.device])
        if self.console_listen != "off":
            console = ["console", "--listen", self.console_listen, "--ingest", self.coordinator]
            specs.append(("console", [*console, "--inference", self.inference], f"{self.console_url}health"))
        for name, args, health in specs:
            env = dict(base_env)
            if self.metrics and name != "console":  # the console serves no /metrics
                port = free_port()
                env["NOVELCRAFTER_METRICS_LISTEN"] = f"{LOOPBACK}:{port}"
                if not health:  # a worker has no gRPC server: its metrics port answers for it
                    health = f"http://{LOOPBACK}:{port}/healthz"
            else:
                env["NOVELCRAFTER_METRICS_LISTEN"] = "off"
            log_path = self.log_dir / f"{name}.log" if self.log_dir else None
            metrics = (
                "" if env["NOVELCRAFTER_METRICS_LISTEN"] == "off" else env["NOVELCRAFTER_METRICS_LISTEN"]
            )
            self.children.append(Child(name, [*cli, *args], env, log_path, health, metrics))
        for child in self.children:
            child.start()

    def describe(self) -> dict[str, dict[str, object]]:
        """Addresses, pids, logs: written to the run directory so a user (or a test) can find them."""
        return {
            c.name: {
                "pid": c.popen.pid if c.popen else None,
                "address": c.health if c.health and not c.health.startswith("http") else "",
                "metrics": c.metrics,
                "log": str(c.log_path) if c.log_path else "",
                "command": c.args,
            }
            for c in self.children
        }

    def wait_ready(
        self,
        timeout: float = 300.0,
        on_ready: Callable[[Child, float], None] | None = None,
        abort: threading.Event | None = None,
    ) -> None:
        """Block until every service answers its health check (or ``abort`` is set);
        a child that exits → error."""
        start = time.monotonic()
        deadline = start + timeout
        while abort is None or not abort.is_set():
            self.check_alive()
            pending = [c for c in self.children if not c.ready]
            for child in pending:
                if not child.health or _healthy(child.health):
                    child.ready = True
                    if on_ready:
                        on_ready(child, time.monotonic() - start)
            if all(c.ready for c in self.children):
                return
            if time.monotonic() > deadline:
                names = ", ".join(c.name for c in self.children if not c.ready)
                raise Unavailable(f"services not ready after {timeout:.0f}s: {names}{self._log_hint()}")
            time.sleep(0.25)

    def check_alive(self) -> None:
        """Raise with the child's last log lines if a service has exited."""
        if self._stopping.is_set():
            return
        for child in self.children:
            if child.popen is not None and child.popen.poll() is not None:
                tail = child.log_tail()
                where = f" (log: {child.log_path})" if child.log_path else ""
                raise NovelCrafterError(
                    f"the {child.name} service exited with code {child.popen.returncode}{where}"
                    + (f"; last lines:\n{tail}" if tail else "")
                )

    def stop(self, grace: float = 30.0, on_stop: Callable[[str], None] | None = None) -> None:
        """Stop in order: SIGTERM, wait up to ``grace`` seconds, then SIGKILL. Idempotent.

        A second Ctrl-C while stopping skips the wait and kills what is left.
        """
        self._stopping.set()
        hurry = threading.Event()
        previous = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, lambda *_: hurry.set())
        try:
            for group in STOP_ORDER:
                members = [c for c in self.children if c.name in group and c.alive]
                for child in members:
                    if on_stop:
                        on_stop(child.name)
                    child.signal(signal.SIGTERM)
                deadline = time.monotonic() + grace
                while any(c.alive for c in members) and time.monotonic() < deadline and not hurry.is_set():
                    time.sleep(0.1)
                for child in members:
                    if child.alive:
                        child.signal(signal.SIGKILL)
                for child in members:
                    if child.popen is not None:
                        try:
                            child.popen.wait(10)
                        except subprocess.TimeoutExpired:
                            pass
        finally:
            for child in self.children:
                child.close_log()
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _log_hint(self) -> str:
        return f" (logs in {self.log_dir})" if self.log_dir else ""

    def __enter__(self) -> LocalServices:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _client_address(listen: str) -> str:
    """Where a local client reaches a server bound to ``listen`` (0.0.0.0 → loopback)."""
    host, _, port = listen.rpartition(":")
    if host in ("", "0.0.0.0", "[::]", "::"):
        host = LOOPBACK
    return f"{host}:{port}"


def _healthy(target: str) -> bool:
    """One quick probe: gRPC health SERVING, or a 2xx from an HTTP endpoint."""
    if target.startswith("http"):
        import urllib.request

        try:
            with urllib.request.urlopen(target, timeout=1.0) as resp:
                return 200 <= resp.status < 300
        except OSError:
            return False
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from novelcrafter.rpc import connect

    with connect(target) as channel:
        try:
            resp = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=1.0)
        except grpc.RpcError:
            return False
    return resp.status == health_pb2.HealthCheckResponse.SERVING


def _say(text: str) -> None:
    print(text, flush=True)


def serve_forever(services: LocalServices, out: Callable[[str], None] = _say) -> None:
    """``serve all``: start, report readiness, then wait for Ctrl-C/SIGTERM or a dead child."""
    stop = threading.Event()

    def handler(_signum: int, _frame: object) -> None:
        stop.set()

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        services.start()
        services.wait_ready(
            on_ready=lambda c, s: out(
                f"{c.name} ready (pid {c.popen.pid if c.popen else '?'}, {s:.0f} s)"
                + (f"; metrics http://{c.metrics}/metrics" if c.metrics else "")
            ),
            abort=stop,
        )
        if stop.is_set():
            return
        http = (
            ""
            if services.http_listen == "off"
            else f" (HTTP http://{_client_address(services.http_listen)}/v1)"
        )
        out(
            f"serving: ingest + coordinator {services.coordinator}, inference {services.inference}{http}, "
            f"store {services.store}; Ctrl-C stops"
        )
        if services.console_url:
            out(f"console: open {services.console_url} in a browser")
        while not stop.wait(1.0):
            services.check_alive()
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
        out("stopping the services ...")
        services.stop()
        out("stopped")
