"""Who may reach a service: listen addresses, the token and secrets, checked once at start.

The anchors are Redis's protected mode, Jupyter's token and Ollama's loopback default:

* Without ``NOVELCRAFTER_AUTH_TOKEN`` every listener binds loopback (the defaults do), and a
  listener anywhere else refuses to start unless the operator says so explicitly
  (``--allow-unauthenticated`` / ``NOVELCRAFTER_ALLOW_UNAUTHENTICATED=1``), which is logged as
  a warning.
* A token or S3 secret that is a documented placeholder (``.env.example``, the Kubernetes
  ``credentials.env``, MinIO's default) or shorter than :data:`MIN_SECRET_CHARS` stops the
  service with one line saying what to set. The console's session key is derived from the
  token, so the token is its secret too.

Every gRPC server, HTTP API, console and ``/metrics`` endpoint binds through :func:`bind_tcp`
or :func:`check_listen`; every ``serve`` command calls :func:`check_secrets`.
"""

from __future__ import annotations

import hmac
import ipaddress
import socket
from urllib.parse import unquote, urlsplit

from novelcrafter.config import Settings
from novelcrafter.errors import FailedPrecondition, InvalidArgument
from novelcrafter.logs import get_logger, kv

log = get_logger(__name__)

MIN_SECRET_CHARS = 16
# Values our own files document as "replace me", and the well-known defaults of our peers.
PLACEHOLDERS = frozenset(
    {
        "change-me-auth-token",
        "change-me-minio-secret",
        "minioadmin",
        "changeme",
        "change-me",
        "password",
        "secret",
        "testing",
    }
)
PLACEHOLDER_PREFIXES = ("change-me", "changeme", "replace-me", "your-", "<")
MAKE_SECRET = "python3 -c 'import secrets; print(secrets.token_hex(24))'"
ALLOW_VARIABLE = "NOVELCRAFTER_ALLOW_UNAUTHENTICATED"


UNAUTHORIZED = "missing or invalid bearer token (set NOVELCRAFTER_AUTH_TOKEN)"


class BearerCheck:
    """``Authorization: Bearer <token>``, compared in constant time: the one check every
    listener (gRPC, the HTTP API, ``/metrics``) makes."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}".encode()

    def __call__(self, supplied: str | bytes) -> bool:
        if isinstance(supplied, str):
            supplied = supplied.encode("utf-8", "surrogateescape")
        return hmac.compare_digest(supplied, self._expected)


def split_listen(listen: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::]:PORT`` for IPv6) as (host, port); an empty host is every interface."""
    host, sep, port = listen.strip().rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise InvalidArgument(
            f"cannot listen on {listen[:80]!r} ({what}): expected HOST:PORT, e.g. 127.0.0.1:8080"
        )
    return host.strip("[]") or "0.0.0.0", int(port)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any interface


def check_listen(listen: str, what: str, settings: Settings) -> None:
    """Refuse to listen beyond loopback without a token, unless explicitly allowed (then warn)."""
    if listen.startswith("unix:"):
        return  # a socket file: reachable only through the file system's permissions
    host, _port = split_listen(listen, what)
    if settings.auth_token or is_loopback(host):
        return
    if settings.allow_unauthenticated:
        log.warning(
            "listening beyond loopback WITHOUT authentication: anyone who reaches this address can use it",
            extra=kv(service=what, listen=listen, allowed_by=ALLOW_VARIABLE),
        )
        return
    raise FailedPrecondition(
        f"refusing to listen on {listen} ({what}) without NOVELCRAFTER_AUTH_TOKEN: set "
        f"NOVELCRAFTER_AUTH_TOKEN to a random secret of at least {MIN_SECRET_CHARS} characters "
        f"(e.g. `{MAKE_SECRET}`), listen on 127.0.0.1, or pass --allow-unauthenticated "
        f"({ALLOW_VARIABLE}=1) to serve this address to anyone"
    )


def bind_tcp(listen: str, what: str, settings: Settings, *, backlog: int = 256) -> socket.socket:
    """A listening socket for ``HOST:PORT``, checked by :func:`check_listen` and bound now, so
    that a refused or busy address is an error at start, not a log line in a thread."""
    check_listen(listen, what, settings)
    return bind_socket(listen, what, backlog=backlog)


def bind_socket(listen: str, what: str, *, backlog: int = 256) -> socket.socket:
    """Bind and listen on ``HOST:PORT`` (already checked); a busy address is FailedPrecondition."""
    host, port = split_listen(listen, what)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise FailedPrecondition(f"cannot listen on {listen} ({what}): {exc.strerror or exc}") from None
    return sock


def weakness(value: str) -> str | None:
    """Why ``value`` is not a secret, or None."""
    lowered = value.strip().lower()
    if lowered in PLACEHOLDERS or lowered.startswith(PLACEHOLDER_PREFIXES):
        return "a documented placeholder"
    if len(value) < MIN_SECRET_CHARS:
        return f"shorter than {MIN_SECRET_CHARS} characters"
    return None


def check_secrets(settings: Settings) -> None:
    """Stop a service whose token or S3 secret is a placeholder or too short (one clear error)."""
    secrets = [("NOVELCRAFTER_AUTH_TOKEN", settings.auth_token)]
    if settings.store.startswith("s3://"):
        secrets.append(("AWS_SECRET_ACCESS_KEY", settings.aws_secret_access_key))
    db_password = urlsplit(settings.db).password if settings.db else None
    if db_password is not None:
        secrets.append(("the password in NOVELCRAFTER_DB", unquote(db_password)))
    for variable, value in secrets:
        if value and (why := weakness(value)):
            raise FailedPrecondition(
                f"{variable} is {why}: set it to a random secret of at least {MIN_SECRET_CHARS} "
                f"characters, e.g. `{MAKE_SECRET}` (`make env` writes a .env with new secrets)"
            )
