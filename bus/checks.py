"""The checks of single values at the boundary: identifiers, names, digests, labels, topics.

Kept apart from bus.validate, whose request schemas need typing and inspect, so that the CLI and
the client library can check what they send without importing those.
"""
from __future__ import annotations

import re

from bus.errors import InvalidArgument

IDENTIFIER_RE = re.compile(r"[A-Za-z0-9]+(?:[._-][A-Za-z0-9]+)*\Z")
MAX_IDENTIFIER = 76
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}\Z")
MAX_LABEL = 4096


def check_identifier(value: str, what: str = "identifier") -> str:
    if not isinstance(value, str):
        raise InvalidArgument(f"{what} must be a string")
    if len(value) > MAX_IDENTIFIER:
        raise InvalidArgument(f"{what} {value[:80]!r}… is longer than {MAX_IDENTIFIER} characters")
    if not IDENTIFIER_RE.match(value):
        raise InvalidArgument(f"{what} {value!r} is not valid: use letters, digits and single . _ - between them")
    return value


def check_name(value: str, what: str, limit: int) -> str:
    """A client-chosen name that never becomes a path (an ingest ref, a snapshot key): only its
    type, size and the absence of NUL are checked."""
    if not isinstance(value, str) or not value:
        raise InvalidArgument(f"{what} must be a non-empty string")
    if len(value) > limit:
        raise InvalidArgument(f"{what} {value[:64]!r}… is longer than {limit} characters")
    if "\0" in value:
        raise InvalidArgument(f"{what} {value[:64]!r} contains a NUL character")
    return value


def check_digest(value: str, what: str = "digest") -> str:
    if not isinstance(value, str) or not DIGEST_RE.match(value):
        raise InvalidArgument(f"{what} {str(value)[:100]!r} is not sha256: followed by 64 lower-case hex digits")
    return value


def check_labels(value: dict, what: str = "labels") -> dict:
    if not isinstance(value, dict):
        raise InvalidArgument(f"{what} must be a map of strings")
    for key, val in value.items():
        if not isinstance(key, str) or not isinstance(val, str):
            raise InvalidArgument(f"{what} must map strings to strings")
        if not key:
            raise InvalidArgument(f"{what}: empty label key")
        if len(key.encode()) + len(val.encode()) > MAX_LABEL:
            raise InvalidArgument(f"label {key[:64]!r}: key and value exceed {MAX_LABEL} bytes")
    return value


def check_topic(value: str, what: str = "topic") -> str:
    if not isinstance(value, str) or not value.startswith("/") or len(value) > 256:
        raise InvalidArgument(f"{what} {str(value)[:100]!r} must start with '/'")
    for part in value[1:].split("/"):
        if not IDENTIFIER_RE.match(part):
            raise InvalidArgument(f"{what} {value!r}: component {part!r} is not a valid identifier")
    return value
