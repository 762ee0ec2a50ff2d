"""Sessions, login and CSRF for the console, with the standard library only.

The session is a signed cookie (HMAC-SHA256), HttpOnly and SameSite=Strict. It carries a
CSRF token that every POST must echo (form field ``csrf`` or header ``X-CSRF-Token``), and,
when ``NOVELCRAFTER_AUTH_TOKEN`` is set, whether the visitor has logged in with that token.
The signing key is derived from the token, so every console replica accepts the same
sessions and changing the token logs everyone out; the token itself is never stored in the
cookie, a page, a URL or a log.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import os
import secrets
import time
from dataclasses import dataclass

COOKIE = "nc_session"
SESSION_SECONDS = 12 * 3600


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass
class Session:
    csrf: str
    authenticated: bool
    issued: float
    fresh: bool = False  # not yet sent to the browser: set the cookie on the response


class Guard:
    """Signs and checks sessions; knows whether a token is required at all."""

    def __init__(self, auth_token: str | None, *, secure_cookie: bool = False) -> None:
        self._token = auth_token or None
        self.secure_cookie = secure_cookie
        seed = self._token.encode() if self._token else os.urandom(32)  # no token: per-process key
        self._key = hmac.new(seed, b"novelcrafter-console-session-v1", hashlib.sha256).digest()

    @property
    def required(self) -> bool:
        return self._token is not None

    def check_token(self, supplied: str) -> bool:
        if self._token is None:
            return True
        return hmac.compare_digest(supplied.encode(), self._token.encode())  # constant time

    def new_session(self, authenticated: bool = False) -> Session:
        return Session(secrets.token_urlsafe(24), authenticated or not self.required, time.time(), True)

    def dump(self, session: Session) -> str:
        body = _b64(json.dumps({"c": session.csrf, "a": session.authenticated, "t": session.issued}).encode())
        return f"{body}.{_b64(self._sign(body))}"

    def load(self, cookie: str | None) -> Session:
        """The session in ``cookie``, or a new anonymous one if it is missing, forged or old."""
        if cookie and "." in cookie:
            body, _, signature = cookie.partition(".")
            try:
                valid = hmac.compare_digest(_unb64(signature), self._sign(body))
                data = json.loads(_unb64(body)) if valid else None
            except (ValueError, json.JSONDecodeError):
                data = None
            if isinstance(data, dict) and time.time() - float(data.get("t", 0)) < SESSION_SECONDS:
                return Session(
                    str(data.get("c", "")), bool(data.get("a")) or not self.required, float(data["t"])
                )
        return self.new_session()

    def csrf_ok(self, session: Session, supplied: str | None) -> bool:
        return bool(supplied) and hmac.compare_digest(str(supplied).encode(), session.csrf.encode())

    def cookie_header(self, session: Session) -> str:
        parts = [
            f"{COOKIE}={self.dump(session)}",
            "Path=/",
            f"Max-Age={SESSION_SECONDS}",
            "HttpOnly",
            "SameSite=Strict",
        ]
        if self.secure_cookie:
            parts.append("Secure")
        return "; ".join(parts)

    def _sign(self, body: str) -> bytes:
        return hmac.new(self._key, body.encode(), hashlib.sha256).digest()


def safe_next(target: str | None) -> str:
    """Where to go after login: a local path only (no open redirect to another site)."""
    if target and target.startswith("/") and not target.startswith(("//", "/\\")):
        return target
    return "/books"


class LoginThrottle:
    """Login attempts of all clients together, at most ``per_second``: parallel guesses wait
    their turn like sequential ones. An attempt that would wait over ``max_wait`` seconds is
    refused at once (HTTP 429), so waiting attempts stay bounded too. The event loop is
    single-threaded, so no lock is needed."""

    def __init__(self, per_second: float = 5.0, max_wait: float = 5.0) -> None:
        self.interval = 1.0 / per_second
        self.max_wait = max_wait
        self._next = 0.0

    def reserve(self) -> float | None:
        """Seconds to wait before this attempt may be checked, or None: refuse it."""
        now = time.monotonic()
        start = max(now, self._next)
        if start - now > self.max_wait:
            return None
        self._next = start + self.interval
        return start - now
