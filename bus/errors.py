"""The one table of error codes and the one place exceptions are mapped to and from the wire."""
from __future__ import annotations

import enum


class Code(enum.StrEnum):
    INVALID_ARGUMENT = "InvalidArgument"
    NOT_FOUND = "NotFound"
    ALREADY_EXISTS = "AlreadyExists"
    FAILED_PRECONDITION = "FailedPrecondition"
    UNAVAILABLE = "Unavailable"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    PERMISSION_DENIED = "PermissionDenied"
    RESOURCE_EXHAUSTED = "ResourceExhausted"
    NOT_IMPLEMENTED = "NotImplemented"
    INTERNAL = "Internal"


class BerthError(Exception):
    """Base of every error that crosses the wire; `code` names it there."""

    code = Code.INTERNAL

    def __init__(self, message: str = ""):
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message or self.code.value

    def to_wire(self) -> dict:
        return {"code": self.code.value, "message": self.message}


class InvalidArgument(BerthError):
    code = Code.INVALID_ARGUMENT


class NotFound(BerthError):
    code = Code.NOT_FOUND


class AlreadyExists(BerthError):
    code = Code.ALREADY_EXISTS


class FailedPrecondition(BerthError):
    code = Code.FAILED_PRECONDITION


class Unavailable(BerthError):
    code = Code.UNAVAILABLE


class DeadlineExceeded(BerthError):
    code = Code.DEADLINE_EXCEEDED


class PermissionDenied(BerthError):
    code = Code.PERMISSION_DENIED


class ResourceExhausted(BerthError):
    code = Code.RESOURCE_EXHAUSTED


class NotImplementedErr(BerthError):
    code = Code.NOT_IMPLEMENTED


class Internal(BerthError):
    code = Code.INTERNAL


BY_CODE: dict[str, type[BerthError]] = {
    cls.code.value: cls
    for cls in (InvalidArgument, NotFound, AlreadyExists, FailedPrecondition, Unavailable,
                DeadlineExceeded, PermissionDenied, ResourceExhausted, NotImplementedErr, Internal)
}


def from_wire(error: object) -> BerthError:
    """Rebuild the exception a peer sent; an unknown or malformed error becomes Internal."""
    if not isinstance(error, dict):
        return Internal(f"malformed error from peer: {error!r:.200}")
    cls = BY_CODE.get(error.get("code"), Internal)
    message = error.get("message")
    return cls(message if isinstance(message, str) else "")
