"""The request and reply envelopes (docs/wire.md), checked as they are decoded.

Plain classes with __slots__ rather than dataclasses: every `berth` command loads this module,
and dataclasses (with the inspect module it imports) cost more of its start-up than the rest of
the envelope code does.
"""
from __future__ import annotations

import math
import time

from bus import codec
from bus.errors import BerthError, InvalidArgument, from_wire


class _Record:
    """Equality and repr from `__slots__`, in order, as a dataclass has them."""

    __slots__ = ()

    def _values(self) -> tuple:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is not self.__class__:
            return NotImplemented
        return self._values() == other._values()

    __hash__ = None     # mutable, as a dataclass with eq and without frozen

    def __repr__(self) -> str:
        fields = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.__slots__)
        return f"{type(self).__qualname__}({fields})"


class Request(_Record):
    __slots__ = ("id", "service", "method", "namespace", "lease", "deadline", "args")

    def __init__(self, id: int | str, service: str, method: str, namespace: str | None = None,
                 lease: str | None = None, deadline: float | None = None, args: dict | None = None):
        self.id = id
        self.service = service
        self.method = method
        self.namespace = namespace
        self.lease = lease
        self.deadline = deadline      # absolute, seconds since the epoch
        self.args = {} if args is None else args

    def encode(self) -> bytes:
        return codec.pack({"id": self.id, "service": self.service, "method": self.method,
                           "namespace": self.namespace, "lease": self.lease,
                           "deadline": self.deadline, "args": self.args})

    @classmethod
    def decode(cls, frame: bytes) -> "Request":
        raw = codec.unpack(frame)
        if not isinstance(raw, dict):
            raise InvalidArgument("request must be a msgpack map")
        rid = raw.get("id")
        if not isinstance(rid, (int, str)) or isinstance(rid, bool) or (isinstance(rid, str) and len(rid) > 128):
            raise InvalidArgument("request id must be an integer or a short string")
        req = cls(id=rid, service=_name(raw, "service"), method=_name(raw, "method"))
        for key in ("namespace", "lease"):
            value = raw.get(key)
            if value is not None and not isinstance(value, str):
                raise InvalidArgument(f"request {key} must be a string")
            setattr(req, key, value or None)
        deadline = raw.get("deadline")
        if deadline is not None and (isinstance(deadline, bool) or not isinstance(deadline, (int, float))
                                     or not math.isfinite(deadline)):
            raise InvalidArgument("request deadline must be a finite number")   # NaN never expires
        req.deadline = deadline
        args = raw.get("args", {})
        if args is None:
            args = {}
        if not isinstance(args, dict) or not all(isinstance(k, str) for k in args):
            raise InvalidArgument("request args must be a map with string keys")
        req.args = args
        return req

    def expired(self, now: float | None = None) -> bool:
        return self.deadline is not None and (now or time.time()) > self.deadline


def _name(raw: dict, key: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value or len(value) > 64:
        raise InvalidArgument(f"request {key} must be a non-empty string")
    return value


class Reply(_Record):
    __slots__ = ("id", "ok", "result", "error", "more")

    def __init__(self, id: int | str | None, ok: bool = True, result: object = None,
                 error: dict | None = None, more: bool = False):
        self.id = id
        self.ok = ok
        self.result = result
        self.error = error
        self.more = more

    def encode(self) -> bytes:
        body: dict = {"id": self.id, "ok": self.ok}
        if self.ok:
            body["result"] = self.result
        else:
            body["error"] = self.error
        if self.more:
            body["more"] = True
        return codec.pack(body)

    @classmethod
    def failure(cls, rid: int | str | None, exc: BerthError) -> "Reply":
        return cls(id=rid, ok=False, error=exc.to_wire())

    @classmethod
    def decode(cls, frame: bytes) -> "Reply":
        raw = codec.unpack(frame)
        if not isinstance(raw, dict) or "ok" not in raw:
            raise InvalidArgument("reply must be a msgpack map with 'ok'")
        return cls(id=raw.get("id"), ok=bool(raw["ok"]), result=raw.get("result"),
                   error=raw.get("error"), more=bool(raw.get("more", False)))

    def unwrap(self) -> object:
        if not self.ok:
            raise from_wire(self.error)
        return self.result
