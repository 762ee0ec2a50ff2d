"""HTTP to a vLLM server (its OpenAI API and runtime LoRA endpoints), and the exact mapping of
our requests onto it. Standard library only: vLLM is never imported by the product.

Mapping (ours -> vLLM ``/v1/completions``):

* the prompt goes as token ids, tokenized by us (the limits and the chat template are ours);
* ``temperature``, ``top_p``, ``top_k`` (0 = off), ``repetition_penalty``, ``seed`` map one to
  one (HF semantics on both sides: the penalty covers prompt and output tokens);
* ``max_new_tokens`` is ``max_tokens``; ``stop`` strings are excluded from the text on both
  sides; our extra end-of-text tokens go as ``stop_token_ids``;
* finish: ``length`` -> length, ``stop`` with a string ``stop_reason`` -> stop, ``stop`` with a
  token id or none -> eos.
"""

from __future__ import annotations

import http.client
import json
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from novelcrafter.errors import InvalidArgument, Unavailable

from .lora import AdapterRejected
from .sampling import SamplingParams


@dataclass(frozen=True)
class StreamDelta:
    text: str


@dataclass(frozen=True)
class StreamEnd:
    finish_reason: str  # length | stop | eos
    prompt_tokens: int
    completion_tokens: int


def completion_body(
    model: str,
    prompt_ids: list[int],
    params: SamplingParams,
    max_new_tokens: int,
    stop: list[str],
    end_ids: set[int],
) -> dict[str, Any]:
    """The vLLM ``/v1/completions`` streaming request that means our request."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": list(prompt_ids),
        "max_tokens": max_new_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "top_k": params.top_k,  # 0 = off on both sides
        "repetition_penalty": params.repetition_penalty,
        "stop": list(stop),
        "stop_token_ids": sorted(end_ids),
        "include_stop_str_in_output": False,
        "skip_special_tokens": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if params.seed is not None:
        body["seed"] = params.seed
    return body


def finish_reason(choice: dict[str, Any]) -> str:
    reason = choice.get("finish_reason")
    if reason == "length":
        return "length"
    if reason == "stop":
        return "stop" if isinstance(choice.get("stop_reason"), str) else "eos"
    raise Unavailable(f"the vLLM server ended the generation with finish_reason {reason!r}")


def parse_stream(lines: Iterator[bytes]) -> Iterator[StreamDelta | StreamEnd]:
    """vLLM's server-sent events -> text deltas, then one :class:`StreamEnd` (usage included)."""
    reason: str | None = None
    usage: dict[str, Any] | None = None
    for raw in lines:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue  # blank separators, comments
        data = line[5:].strip()
        if data == b"[DONE]":
            break
        event = json.loads(data)
        if "error" in event and not event.get("choices"):
            error = event["error"]
            message = error.get("message", error) if isinstance(error, dict) else error
            raise Unavailable(f"the vLLM server failed the generation: {message}")
        for choice in event.get("choices") or []:
            if choice.get("text"):
                yield StreamDelta(choice["text"])
            if choice.get("finish_reason") is not None:
                reason = finish_reason(choice)
        if event.get("usage"):
            usage = event["usage"]
    if reason is None or usage is None:
        raise Unavailable("the vLLM server closed the stream before the generation finished")
    yield StreamEnd(reason, int(usage["prompt_tokens"]), int(usage["completion_tokens"]))


class VllmClient:
    """One vLLM server. Every transport failure is UNAVAILABLE naming the server's URL."""

    def __init__(self, url: str, timeout: float = 30.0, stream_timeout: float = 600.0) -> None:
        parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise InvalidArgument(f"the vLLM URL must be http(s)://HOST:PORT, got {url[:80]!r}")
        self.url = f"{parsed.scheme}://{parsed.netloc}"
        self._https = parsed.scheme == "https"
        self._host, self._port = parsed.hostname, parsed.port
        self.timeout, self.stream_timeout = timeout, stream_timeout

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        return cls(self._host, self._port, timeout=timeout)

    def _unreachable(self, exc: BaseException) -> Unavailable:
        return Unavailable(f"the vLLM server at {self.url} is unreachable: {exc}")

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        """(status, decoded JSON body or text)."""
        conn = self._connection(self.timeout)
        try:
            payload = None if body is None else json.dumps(body).encode()
            headers = {"Content-Type": "application/json"} if payload is not None else {}
            conn.request(method, path, body=payload, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        except (OSError, http.client.HTTPException) as exc:
            raise self._unreachable(exc) from exc
        finally:
            conn.close()
        try:
            return response.status, json.loads(raw) if raw else None
        except ValueError:
            return response.status, raw.decode(errors="replace")

    def models(self) -> list[dict[str, Any]]:
        status, body = self.request("GET", "/v1/models")
        if status != 200 or not isinstance(body, dict):
            raise Unavailable(f"the vLLM server at {self.url} answered /v1/models with {status}")
        return list(body.get("data") or [])

    def load_lora(self, name: str, path: str) -> None:
        status, body = self.request("POST", "/v1/load_lora_adapter", {"lora_name": name, "lora_path": path})
        if status == 200:
            return
        message = _message(body)
        if status == 404:  # vLLM cannot read our folder: a deployment fault, not this version's
            raise Unavailable(
                f"the vLLM server cannot find the adapter at {path} ({message}); the adapter folder "
                "(NOVELCRAFTER_VLLM_ADAPTER_DIR) must be readable by vLLM at the same path"
            )
        if status == 503:
            raise Unavailable(f"the vLLM server at {self.url} is not ready: {message}")
        # vLLM refused this adapter: 400 (name taken, bad request) or 500 from its engine
        # (rank over --max-lora-rank, unsupported modules, ...).
        raise AdapterRejected(f"the vLLM server refused the adapter ({status}): {message}")

    def unload_lora(self, name: str) -> bool:
        """True when unloaded; False when vLLM did not hold it (already gone)."""
        status, body = self.request("POST", "/v1/unload_lora_adapter", {"lora_name": name})
        if status == 200:
            return True
        if status in (400, 404):
            return False
        raise Unavailable(
            f"the vLLM server at {self.url} failed to unload {name} ({status}): {_message(body)}"
        )

    def stream(
        self, body: dict[str, Any], cancelled: Callable[[], bool]
    ) -> Iterator[StreamDelta | StreamEnd]:
        """Stream one completion. Leaving the iterator (or ``cancelled()`` turning true) closes
        the connection, which makes vLLM abort the request."""
        conn = self._connection(self.stream_timeout)
        try:
            try:
                conn.request(
                    "POST",
                    "/v1/completions",
                    body=json.dumps(body).encode(),
                    headers={"Content-Type": "application/json", "Accept": "text/event-stream"},
                )
                response = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                raise self._unreachable(exc) from exc
            if response.status != 200:
                detail = _message(_json_or_text(response.read()))
                if response.status == 404:  # the adapter's name is not (or no longer) loaded there
                    raise Unavailable(f"the vLLM server does not hold the model {body['model']}: {detail}")
                if 400 <= response.status < 500:
                    raise InvalidArgument(f"the vLLM server refused the request: {detail}")
                raise Unavailable(f"the vLLM server failed the request ({response.status}): {detail}")
            try:
                yield from parse_stream(_lines(response, cancelled))
            except (OSError, http.client.HTTPException) as exc:
                raise self._unreachable(exc) from exc
        finally:
            conn.close()


def _lines(response: http.client.HTTPResponse, cancelled: Callable[[], bool]) -> Iterator[bytes]:
    while not cancelled():
        try:
            line = response.readline()
        except TimeoutError as exc:
            raise Unavailable("the vLLM server stopped sending mid-generation (read timed out)") from exc
        if not line:
            return
        yield line


def _json_or_text(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def _message(body: Any) -> str:
    """vLLM's error text: ``{"error": {"message": ...}}``, ``{"message": ...}`` or plain text."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return str(inner.get("message") or inner.get("detail") or inner)[:500]
        return str(inner)[:500]
    return str(body)[:500]
