"""Domain errors. Raised anywhere; mapped to gRPC status codes in one interceptor
(``novelcrafter.rpc``) and to one ``error: …`` line in the CLI."""

from __future__ import annotations

import grpc


class NovelCrafterError(Exception):
    """Base of all errors a user or client can act on. The message is shown as is."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(NovelCrafterError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(NovelCrafterError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(NovelCrafterError):
    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(NovelCrafterError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class ResourceExhausted(NovelCrafterError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(NovelCrafterError):
    code = grpc.StatusCode.UNAVAILABLE


class Aborted(NovelCrafterError):
    code = grpc.StatusCode.ABORTED


class Unauthenticated(NovelCrafterError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(NovelCrafterError):
    code = grpc.StatusCode.PERMISSION_DENIED


class DeadlineExceeded(NovelCrafterError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class StoreError(Unavailable):
    """The object store failed (unreachable, disk full, permission denied)."""


_BY_CODE = {cls.code: cls for cls in NovelCrafterError.__subclasses__() if cls is not StoreError}


def from_rpc_error(err: grpc.RpcError) -> NovelCrafterError:
    """Turn a client-side gRPC error back into the matching domain error."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else str(err)
    cls = _BY_CODE.get(code, NovelCrafterError)
    if code == grpc.StatusCode.UNAVAILABLE and not details:
        details = "service unavailable"
    return cls(details or code.name.lower())
