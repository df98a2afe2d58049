"""Validation at the boundary: identifiers, digests, labels, topics, and schemas from signatures.

A method's type annotations are its message schema: `Schema.of(fn)` reads them once, and
`schema.bind(args)` checks a request's args against them before the method runs.
"""
from __future__ import annotations

import inspect
import re
import types
import typing
from typing import Annotated, Any

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


Identifier = Annotated[str, check_identifier]
Digest = Annotated[str, check_digest]
Labels = Annotated[dict, check_labels]
Topic = Annotated[str, check_topic]

_PLAIN = {str: "a string", int: "an integer", float: "a number", bool: "a boolean",
          bytes: "bytes", dict: "a map", list: "an array"}


def check_value(value: object, annotation: Any, what: str) -> object:
    """Check `value` against a type annotation; returns the (possibly converted) value."""
    if annotation in (Any, object, inspect.Parameter.empty):
        return value
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        base, *checks = typing.get_args(annotation)
        value = check_value(value, base, what)
        for check in checks:
            value = check(value, what)
        return value
    if origin in (types.UnionType, typing.Union):
        options = typing.get_args(annotation)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return check_value(value, option, what)
            except InvalidArgument as e:
                errors.append(str(e))
        raise InvalidArgument(errors[0] if len(errors) == 1 else f"{what} has the wrong type")
    if origin is list:
        if not isinstance(value, list):
            raise InvalidArgument(f"{what} must be an array")
        (item,) = typing.get_args(annotation) or (Any,)
        return [check_value(v, item, f"{what}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise InvalidArgument(f"{what} must be a map")
        key_t, val_t = typing.get_args(annotation) or (Any, Any)
        return {check_value(k, key_t, f"{what} key"): check_value(v, val_t, f"{what}[{k!r}]")
                for k, v in value.items()}
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in _PLAIN:
        if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
            raise InvalidArgument(f"{what} must be {_PLAIN[annotation]}")
        return value
    raise TypeError(f"unsupported annotation {annotation!r}")


class Schema:
    """The argument schema of one method, read from its signature (minus context parameters)."""

    CONTEXT = frozenset({"self", "call", "ns"})

    def __init__(self, params: dict[str, tuple[Any, object]]):
        self.params = params

    @classmethod
    def of(cls, fn) -> "Schema":
        hints = typing.get_type_hints(fn, include_extras=True)
        params = {}
        for name, p in inspect.signature(fn).parameters.items():
            if name in cls.CONTEXT:
                continue
            params[name] = (hints.get(name, Any), p.default)
        return cls(params)

    def bind(self, args: dict) -> dict:
        unknown = set(args) - set(self.params)
        if unknown:
            raise InvalidArgument(f"unknown argument {sorted(unknown)[0]!r}")
        bound = {}
        for name, (annotation, default) in self.params.items():
            if name not in args:
                if default is inspect.Parameter.empty:
                    raise InvalidArgument(f"missing argument {name!r}")
                continue
            bound[name] = check_value(args[name], annotation, name)
        return bound
