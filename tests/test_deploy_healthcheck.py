"""``python -m novelcrafter.healthcheck``: the Docker/compose health check, against real servers."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from support import Proc, base_env, free_port, wait_port

SERVER = str(Path(__file__).with_name("bootstrap_server.py"))


def healthcheck(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "novelcrafter.healthcheck", *args],
        env=base_env(**env),
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.fixture(scope="module")
def grpc_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real server built with the shared bootstrap, with bearer-token auth switched on."""
    port = free_port()
    log = tmp_path_factory.mktemp("healthcheck") / "server.log"
    proc = Proc(
        [sys.executable, SERVER, f"127.0.0.1:{port}"], base_env(NOVELCRAFTER_AUTH_TOKEN="s3cret"), log
    )
    try:
        wait_port(port, 60, proc.popen)
        yield f"127.0.0.1:{port}"
    finally:
        proc.stop()


@pytest.mark.timeout(120)
def test_serving_grpc_server_is_healthy_without_the_token(grpc_server: str) -> None:
    result = healthcheck(grpc_server)
    assert result.returncode == 0, result.stderr
    assert "healthy" in result.stdout
    named = healthcheck(grpc_server, "--service", "novelcrafter.v1.IngestService")
    assert named.returncode == 0, named.stderr


@pytest.mark.timeout(120)
def test_unknown_service_and_dead_port_are_unhealthy(grpc_server: str) -> None:
    unknown = healthcheck(grpc_server, "--service", "novelcrafter.v1.NoSuchService")
    assert unknown.returncode == 1
    assert "NOT_FOUND" in unknown.stderr
    dead = healthcheck(f"127.0.0.1:{free_port()}", "--timeout", "1")
    assert dead.returncode == 1
    assert dead.stderr.startswith("unhealthy:")


class _Metrics(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200 if self.path == "/metrics" else 404)
        self.end_headers()
        self.wfile.write(b"up 1\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.timeout(60)
def test_http_target_for_workers_without_a_grpc_server() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Metrics)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        assert healthcheck(f"{base}/metrics").returncode == 0
        missing = healthcheck(f"{base}/nope")
        assert missing.returncode == 1 and "HTTP 404" in missing.stderr
    finally:
        server.shutdown()
    refused = healthcheck(f"http://127.0.0.1:{free_port()}/metrics", "--timeout", "1")
    assert refused.returncode == 1
