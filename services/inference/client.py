"""A small client for ``InferenceService`` (used by the CLI, the benchmark and tests)."""

from __future__ import annotations

from collections.abc import Iterator

import grpc

from novelcrafter.config import Settings
from novelcrafter.errors import from_rpc_error
from novelcrafter.rpc import connect
from novelcrafter.v1 import inference_pb2, inference_pb2_grpc


def build_request(
    prompt: str,
    *,
    book_id: str = "",
    adapter: str = "latest",
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_p: float | None = None,
    top_k: int | None = None,
    repetition_penalty: float | None = None,
    seed: int | None = None,
    stop: list[str] | None = None,
    chat: bool = False,
) -> inference_pb2.GenerateRequest:
    """A request with only the given optional fields set (the server fills the defaults)."""
    request = inference_pb2.GenerateRequest(
        prompt=prompt, book_id=book_id, adapter=adapter, stop=stop or [], chat=chat
    )
    if max_new_tokens is not None:
        request.max_new_tokens = max_new_tokens
    for name, value in (
        ("temperature", temperature),
        ("top_p", top_p),
        ("top_k", top_k),
        ("repetition_penalty", repetition_penalty),
        ("seed", seed),
    ):
        if value is not None:
            setattr(request, name, value)
    return request


def generate_once(
    address: str, request: inference_pb2.GenerateRequest, settings: Settings, *, timeout: float = 600.0
) -> inference_pb2.GenerateResponse:
    with connect(address, settings) as channel:
        try:
            return inference_pb2_grpc.InferenceServiceStub(channel).Generate(request, timeout=timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None


def generate_stream(
    address: str, request: inference_pb2.GenerateRequest, settings: Settings, *, timeout: float = 600.0
) -> Iterator[inference_pb2.GenerateStreamResponse]:
    with connect(address, settings) as channel:
        call = inference_pb2_grpc.InferenceServiceStub(channel).GenerateStream(request, timeout=timeout)
        try:
            yield from call
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None
        finally:
            call.cancel()
