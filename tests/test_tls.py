"""TLS for gRPC (server certificate, optional client-certificate verification) and for S3,
with certificates the test generates."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from certs import make_pki
from support import Proc, base_env, free_port, wait_port

from novelcrafter.config import get_settings
from novelcrafter.errors import StoreError
from novelcrafter.rpc import connect
from novelcrafter.store import open_store
from novelcrafter.v1 import ingest_pb2, ingest_pb2_grpc

SCRIPT = str(Path(__file__).with_name("bootstrap_server.py"))


def _list(addr: str, **tls: str) -> int:
    settings = get_settings(**tls)
    with connect(addr, settings) as channel:
        return len(
            ingest_pb2_grpc.IngestServiceStub(channel)
            .ListBooks(ingest_pb2.ListBooksRequest(), timeout=5)
            .books
        )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory):
    return make_pki(tmp_path_factory.mktemp("pki"))


def _server(tmp_path: Path, **env: str) -> tuple[Proc, str]:
    port = free_port()
    proc = Proc([sys.executable, SCRIPT, f"127.0.0.1:{port}"], base_env(**env), tmp_path / "tls-server.log")
    wait_port(port, 30, proc.popen)
    return proc, f"localhost:{port}"


def test_grpc_server_tls(pki, tmp_path: Path) -> None:
    proc, addr = _server(
        tmp_path, NOVELCRAFTER_TLS_CERT=str(pki.server_cert), NOVELCRAFTER_TLS_KEY=str(pki.server_key)
    )
    try:
        assert _list(addr, tls_ca=str(pki.ca)) == 1
        with pytest.raises(grpc.RpcError) as err:  # plaintext client against a TLS server
            _list(addr)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError):  # a client that trusts another CA
            _list(addr, tls_ca=str(pki.other_ca))
    finally:
        proc.stop()


def test_grpc_mutual_tls(pki, tmp_path: Path) -> None:
    proc, addr = _server(
        tmp_path,
        NOVELCRAFTER_TLS_CERT=str(pki.server_cert),
        NOVELCRAFTER_TLS_KEY=str(pki.server_key),
        NOVELCRAFTER_TLS_CLIENT_CA=str(pki.ca),
    )
    try:
        assert (
            _list(
                addr,
                tls_ca=str(pki.ca),
                tls_client_cert=str(pki.client_cert),
                tls_client_key=str(pki.client_key),
            )
            == 1
        )
        with pytest.raises(grpc.RpcError):  # no client certificate
            _list(addr, tls_ca=str(pki.ca))
    finally:
        proc.stop()


def test_s3_over_tls(pki, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    port = free_port()
    log = open(tmp_path / "moto-tls.log", "wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moto.server",
            "-H",
            "127.0.0.1",
            "-p",
            str(port),
            "-c",
            str(pki.server_cert),
            "-k",
            str(pki.server_key),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=base_env(),
    )
    try:
        wait_port(port, 60, proc)
        monkeypatch.setenv("NOVELCRAFTER_S3_ENDPOINT", f"https://localhost:{port}")
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        monkeypatch.setenv("NOVELCRAFTER_S3_CA_FILE", str(pki.ca))
        store = open_store("s3://tls-bucket/p")
        store.put("k", "over tls")
        assert store.get_text("k") == "over tls"
        monkeypatch.setenv("NOVELCRAFTER_S3_CA_FILE", str(pki.other_ca))  # untrusted → refused, clearly
        with pytest.raises(StoreError, match="cannot"):
            open_store("s3://tls-bucket/p", retry_seconds=1).get("k")
    finally:
        proc.terminate()
        proc.wait(10)
        log.close()
