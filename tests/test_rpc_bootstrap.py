"""The shared gRPC bootstrap, against a real server process on a socket."""

from __future__ import annotations

import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from support import Proc, base_env, free_port, wait_port

from novelcrafter.rpc import connect
from novelcrafter.v1 import ingest_pb2, ingest_pb2_grpc

SCRIPT = str(Path(__file__).with_name("bootstrap_server.py"))


def _start(tmp_path: Path, **env: str) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc([sys.executable, SCRIPT, f"127.0.0.1:{port}"], base_env(**env), tmp_path / "server.log")
    wait_port(port, 30, proc.popen)
    return proc, f"127.0.0.1:{port}"


@pytest.fixture
def server(tmp_path: Path) -> Iterator[str]:
    proc, addr = _start(tmp_path, SLOW_SECONDS="0")
    yield addr
    proc.stop()


def test_reflection_lists_services_and_health(server: str) -> None:
    with grpc.insecure_channel(server) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")])
        )
        names = {svc.name for resp in responses for svc in resp.list_services_response.service}
    assert "novelcrafter.v1.IngestService" in names
    assert "grpc.health.v1.Health" in names


def test_health_serving(server: str) -> None:
    with grpc.insecure_channel(server) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        assert stub.Check(health_pb2.HealthCheckRequest()).status == health_pb2.HealthCheckResponse.SERVING
        resp = stub.Check(health_pb2.HealthCheckRequest(service="novelcrafter.v1.IngestService"))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_domain_errors_map_to_status_codes(server: str) -> None:
    with connect(server) as channel:
        stub = ingest_pb2_grpc.IngestServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.GetBook(ingest_pb2.GetBookRequest(book_id="missing"))
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
        assert err.value.details() == "no book missing"
        with pytest.raises(grpc.RpcError) as err:
            stub.GetBook(ingest_pb2.GetBookRequest(book_id="bad"))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.RpcError) as err:
            stub.GetBook(ingest_pb2.GetBookRequest(book_id="crash"))
        assert err.value.code() == grpc.StatusCode.INTERNAL
        assert "secret internal detail" not in err.value.details()  # details stay in the log
        assert "incident" in err.value.details()


def test_sigterm_lets_in_flight_rpc_finish(tmp_path: Path) -> None:
    proc, addr = _start(tmp_path, SLOW_SECONDS="3")
    result: dict[str, object] = {}

    def call() -> None:
        with connect(addr) as channel:
            try:
                result["resp"] = ingest_pb2_grpc.IngestServiceStub(channel).ListBooks(
                    ingest_pb2.ListBooksRequest(), timeout=20
                )
            except grpc.RpcError as exc:
                result["error"] = exc

    thread = threading.Thread(target=call)
    thread.start()
    time.sleep(1.0)  # the RPC is now in flight
    proc.signal(signal.SIGTERM)
    thread.join(20)
    assert "error" not in result, result.get("error")
    assert result["resp"].books[0].book_id == "0123456789abcdef"
    assert proc.popen.wait(20) == 0
    # After shutdown the port refuses new calls.
    with connect(addr) as channel, pytest.raises(grpc.RpcError):
        ingest_pb2_grpc.IngestServiceStub(channel).ListBooks(ingest_pb2.ListBooksRequest(), timeout=2)
    assert "shutting down" in proc.output()


def test_bearer_token_auth(tmp_path: Path) -> None:
    proc, addr = _start(tmp_path, NOVELCRAFTER_AUTH_TOKEN="s3cret-token")
    try:
        with grpc.insecure_channel(addr) as channel:  # health stays open
            status = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest()).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        for token in (None, "wrong"):
            with connect(addr, token=token or "") as channel, pytest.raises(grpc.RpcError) as err:
                ingest_pb2_grpc.IngestServiceStub(channel).ListBooks(ingest_pb2.ListBooksRequest(), timeout=5)
            assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED
        with connect(addr, token="s3cret-token") as channel:
            resp = ingest_pb2_grpc.IngestServiceStub(channel).ListBooks(
                ingest_pb2.ListBooksRequest(), timeout=5
            )
            assert len(resp.books) == 1
    finally:
        proc.stop()
    assert "s3cret-token" not in proc.output()
