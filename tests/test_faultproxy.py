"""The S3 backend rides out a real network outage (FaultProxy in front of a moto S3 server)."""

from __future__ import annotations

import threading
import time

import pytest
from faultproxy import FaultProxy

from novelcrafter.errors import StoreError
from novelcrafter.store import open_store


def test_store_retries_through_an_outage(
    moto_server: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    port = int(moto_server["NOVELCRAFTER_S3_ENDPOINT"].rsplit(":", 1)[1])
    proxy = FaultProxy(port)
    try:
        monkeypatch.setenv("NOVELCRAFTER_S3_ENDPOINT", proxy.address)
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", moto_server["AWS_ACCESS_KEY_ID"])
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", moto_server["AWS_SECRET_ACCESS_KEY"])
        store = open_store("s3://outage-bucket/x", retry_seconds=30)
        store.put("before", "1")
        proxy.cut()
        threading.Timer(4.0, proxy.restore).start()
        started = time.monotonic()
        store.put("during", "2")  # blocks, retrying with backoff, until the network is back
        assert time.monotonic() - started >= 3.5
        assert proxy.refused > 0
        assert store.get_text("during") == "2" and store.get_text("before") == "1"
        proxy.cut()  # an outage longer than the retry budget ends in a clear error
        store.retry_seconds = 1.5
        with pytest.raises(StoreError, match="cannot read before"):
            store.get("before")
    finally:
        proxy.close()
