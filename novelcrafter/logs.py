"""Structured logging, configured once per process.

JSON lines when stderr is not a terminal (containers, CI) or with
``NOVELCRAFTER_LOG_FORMAT=json``; a compact ``key=value`` text format otherwise
(``Settings.log_level`` and ``Settings.log_format``).
Extra fields go through ``logger.info("msg", extra={"fields": {...}})`` or :func:`kv`.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Any

_CONFIGURED = False


def kv(**fields: Any) -> dict[str, Any]:
    """``log.info("claimed part", extra=kv(job=job_id, part=3))``"""
    return {"fields": fields}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(getattr(record, "fields", {}) or {})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        ts = time.strftime("%H:%M:%S", time.localtime(record.created))
        fields = getattr(record, "fields", {}) or {}
        extra = "".join(f" {k}={v}" for k, v in fields.items())
        line = f"{ts} {record.levelname[0]} {record.name}: {record.getMessage()}{extra}"
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


def configure_logging(level: str | None = None, fmt: str | None = None, *, default_level: str = "") -> None:
    """Idempotent: the first call wins unless ``force`` semantics are needed by tests.

    ``level``/``fmt`` win over the settings; ``default_level`` replaces the settings' default
    level when ``NOVELCRAFTER_LOG_LEVEL`` is not set (commands whose output is the result)."""
    global _CONFIGURED
    if _CONFIGURED:
        return
    from novelcrafter.config import get_settings

    settings = get_settings()
    if not level:
        given = settings.log_level if "log_level" in settings.model_fields_set else ""
        level = given or default_level or "INFO"
    level = level.upper()
    fmt = fmt or settings.log_format or "auto"
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Libraries that are chatty at INFO.
    for noisy in ("urllib3", "botocore", "filelock", "httpx", "werkzeug"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    _CONFIGURED = True


def get_logger(name: str) -> logging.Logger:
    return logging.getLogger(name)
