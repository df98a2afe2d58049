"""Validation at the boundary: schemas from signatures, over the checks of bus.checks.

A method's type annotations are its message schema: `Schema.of(fn)` reads them once, and
`schema.bind(args)` checks a request's args against them before the method runs. The checks of
single values (identifiers, digests, labels, topics) are in bus.checks, which does not need
typing or inspect; they are named here too, so that an actor has one module to import from.
"""
from __future__ import annotations

import inspect
import types
import typing
from typing import Annotated, Any

from bus.checks import (DIGEST_RE, IDENTIFIER_RE, MAX_IDENTIFIER, MAX_LABEL, check_digest, check_identifier,
                        check_labels, check_name, check_topic)
from bus.errors import InvalidArgument

__all__ = [
    "DIGEST_RE", "IDENTIFIER_RE", "MAX_IDENTIFIER", "MAX_LABEL", "check_digest", "check_identifier",
    "check_labels", "check_name", "check_topic", "Identifier", "Digest", "Labels", "Topic",
    "check_value", "Schema",
]

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
