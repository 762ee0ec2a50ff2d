"""Container health check: ``python -m novelcrafter.healthcheck ADDRESS``.

Exit 0 when the target is healthy, 1 otherwise, with one line saying why. Docker's
``HEALTHCHECK`` and compose's ``healthcheck`` use it (Kubernetes uses its native
``grpc:`` probes instead), so images need no ``grpc_health_probe`` binary.

* ``HOST:PORT`` asks the server's ``grpc.health.v1.Health/Check`` (TLS settings from the
  environment apply; health needs no auth token). ``--service NAME`` checks one service.
* ``http://HOST:PORT/PATH`` expects a 2xx answer, for processes that are not gRPC servers
  (a trainer worker's ``/metrics`` endpoint).

Imports stay light (no torch): it runs every few seconds in every container.
"""

from __future__ import annotations

import argparse
import sys
import urllib.error
import urllib.request


def check_grpc(address: str, service: str, timeout: float) -> str | None:
    """None when SERVING, else the reason."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    from novelcrafter.rpc import connect

    with connect(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            resp = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return f"{exc.code().name}: {exc.details()}"
    if resp.status != health_pb2.HealthCheckResponse.SERVING:
        return health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return None


def check_http(url: str, timeout: float) -> str | None:
    """None on a 2xx answer, else the reason."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            status = resp.status
    except urllib.error.HTTPError as exc:
        return f"HTTP {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        return str(getattr(exc, "reason", exc))
    return None if 200 <= status < 300 else f"HTTP {status}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m novelcrafter.healthcheck", description="Exit 0 when the target is healthy."
    )
    parser.add_argument("target", help="HOST:PORT of a gRPC server, or an http:// URL")
    parser.add_argument("--service", default="", help="gRPC service name to check (default: the server)")
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")
    args = parser.parse_args(argv)
    if args.target.startswith(("http://", "https://")):
        problem = check_http(args.target, args.timeout)
    else:
        problem = check_grpc(args.target, args.service, args.timeout)
    if problem:
        print(f"unhealthy: {args.target}: {problem}", file=sys.stderr)
        return 1
    print(f"healthy: {args.target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
