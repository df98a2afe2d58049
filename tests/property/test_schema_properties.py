"""Every request schema on any arguments: bound, or a clean InvalidArgument.

A method's signature is its schema (bus/validate.py). Every `@method` of every actor in
actors/registry.py, and of the shim, gets arguments of the right names with right and wrong
types, unknown names, missing names, huge strings and nested junk. In process, the request goes
through the decoder and `Worker._bind`, the step that validates a request before the worker calls
the method. Over a real socket, malformed requests to every service must each get an error with
the code the in-process check predicts, and no actor may die of them.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import itertools
import string
import time
import types
import typing
from typing import Annotated, Any

import pytest
import zmq
from hypothesis import example, given, settings
from hypothesis import strategies as st

from actors import content, snapshot
from actors.registry import ACTORS
from bus import codec, validate
from bus.envelope import Reply, Request
from bus.errors import BerthError, Code, InvalidArgument
from bus.worker import Actor, Worker
from shimd.main import ShimActor

INT64_MIN, UINT64_MAX = -(1 << 63), (1 << 64) - 1
MAX_ERROR_MESSAGE = 1024          # an error names the bad input; it does not echo it whole


def actor_classes() -> list[type[Actor]]:
    found = []
    for spec in ACTORS:
        module = importlib.import_module(spec.module)
        classes = [c for c in vars(module).values()
                   if inspect.isclass(c) and issubclass(c, Actor) and c.__module__ == module.__name__]
        assert [c.name for c in classes] == [spec.name], f"{spec.module}: expected one actor named {spec.name}"
        found += classes
    return found + [ShimActor]


ACTOR_CLASSES = actor_classes()
SERVICES = {cls.name: cls for cls in ACTOR_CLASSES if cls is not ShimActor}
METHODS = [(cls, name) for cls in ACTOR_CLASSES for name in sorted(cls.methods)]


# --- values ------------------------------------------------------------------------------------------

scalars = (st.none() | st.booleans() | st.integers(INT64_MIN, UINT64_MAX) | st.floats()
           | st.text(max_size=12) | st.binary(max_size=8))
huge_strings = st.sampled_from([77, 257, 1025, 4097, 70_000]).map(lambda n: "x" * n)
junk = st.recursive(scalars | huge_strings,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
                    | st.dictionaries(st.integers(-3, 3) | st.binary(max_size=3), inner, max_size=2),
                    max_leaves=6)

words = st.text(string.ascii_letters + string.digits, min_size=1, max_size=8)
identifiers = st.tuples(words, st.lists(st.tuples(st.sampled_from("._-"), words), max_size=4)) \
    .map(lambda t: t[0] + "".join(sep + word for sep, word in t[1]))
digests = st.text("0123456789abcdef", min_size=64, max_size=64).map(lambda h: "sha256:" + h)
topics = st.lists(identifiers, min_size=1, max_size=4).map(lambda parts: "/" + "/".join(parts))
labels = st.dictionaries(st.text(min_size=1, max_size=30), st.text(max_size=60), max_size=5)


def names(limit: int):
    return st.text(st.characters(exclude_characters="\0"), min_size=1, max_size=min(limit, 40)) \
        | st.just("k" * limit)


# Strategies for values each check accepts. A new Annotated check needs a line here; the test
# below fails until it has one, so no schema goes unchecked.
CHECKED = {
    validate.check_identifier: identifiers,
    validate.check_digest: digests,
    validate.check_labels: labels,
    validate.check_topic: topics,
    content.check_ref: names(content.MAX_REF),
    snapshot.check_key: names(snapshot.MAX_KEY),
}
PLAIN = {
    str: st.text(max_size=20), int: st.integers(INT64_MIN, UINT64_MAX), float: st.floats(),
    bool: st.booleans(), bytes: st.binary(max_size=16),
    dict: st.dictionaries(st.text(max_size=8), junk, max_size=3), list: st.lists(junk, max_size=3),
}


@functools.cache
def valid(annotation) -> st.SearchStrategy:
    """Values that `annotation` accepts (as they arrive decoded from msgpack)."""
    if annotation in (Any, object, inspect.Parameter.empty):
        return junk
    origin = typing.get_origin(annotation)
    if origin is Annotated:
        _, *checks = typing.get_args(annotation)
        (check,) = checks
        if check not in CHECKED:
            raise LookupError(f"no strategy for values that {check.__qualname__} accepts: add one to CHECKED")
        return CHECKED[check]
    if origin in (types.UnionType, typing.Union):
        return st.one_of([st.none() if option is type(None) else valid(option)
                          for option in typing.get_args(annotation)])
    if origin is list:
        (item,) = typing.get_args(annotation)
        return st.lists(valid(item), max_size=3)
    if origin is dict:
        key, value = typing.get_args(annotation)
        return st.dictionaries(valid(key), valid(value), max_size=3)
    return PLAIN[annotation]


MISSING = object()


@functools.cache
def arguments(cls: type[Actor], method: str) -> st.SearchStrategy:
    """Args for one method's schema, and whether every one of them is valid (then it must bind):
    each parameter valid, junk or left out, and sometimes names the schema does not have."""
    params = cls.methods[method].schema.params
    choices = {name: st.one_of(valid(annotation).map(lambda v: (True, v)), junk.map(lambda v: (False, v)),
                               st.just((default is not inspect.Parameter.empty, MISSING)))
               for name, (annotation, default) in params.items()}
    extras = st.dictionaries(st.text(max_size=12), junk, max_size=2)

    def combine(drawn: tuple[dict, dict]) -> tuple[dict, bool]:
        chosen, extra = drawn
        args = {name: value for name, (_, value) in chosen.items() if value is not MISSING}
        unknown = {k: v for k, v in extra.items() if k not in params}
        return {**args, **unknown}, all(ok for ok, _ in chosen.values()) and not unknown

    return st.tuples(st.fixed_dictionaries(choices), extras).map(combine)


def bind(cls: type[Actor], method: str, args: dict, namespace: str | None = "default"):
    """The worker's own validation of a request, as it runs before dispatch."""
    frame = Request(1, cls.name, method, namespace, None, time.time() + 60, args).encode()
    req = Request.decode(frame)
    binder = types.SimpleNamespace(actor=cls)
    return Worker._bind(binder, req, [])


def check_rejection(e: BerthError) -> None:
    assert e.code == Code.INVALID_ARGUMENT, e
    assert e.message and len(e.message) <= MAX_ERROR_MESSAGE, e.message[:200]
    codec.pack(e.to_wire())                        # the reply can be sent


# --- in process --------------------------------------------------------------------------------------

def test_every_annotation_has_a_strategy():
    for cls, name in METHODS:
        for param, (annotation, _) in cls.methods[name].schema.params.items():
            valid(annotation)                      # raises for an annotation nobody taught us


@pytest.mark.parametrize("cls", ACTOR_CLASSES, ids=lambda c: c.__name__)
def test_every_method_binds_or_refuses_cleanly(cls):
    methods = sorted(cls.methods)

    @given(st.one_of([st.tuples(st.just(m), arguments(cls, m)) for m in methods]))
    @settings(max_examples=len(methods) * settings.default.max_examples // 25)
    def check(drawn):
        method, (args, all_valid) = drawn
        spec = cls.methods[method]
        try:
            bound_spec, kwargs, _ = bind(cls, method, args)
        except InvalidArgument as e:
            check_rejection(e)
            assert not all_valid, f"{cls.__name__}.{method} refused valid arguments: {e}"
            return
        assert bound_spec is spec
        params = spec.schema.params
        assert set(kwargs) - {"ns", "call"} <= set(params)
        for name, (_, default) in params.items():
            assert name in kwargs or default is not inspect.Parameter.empty
        assert set(args) <= set(params)            # nothing unknown slipped through

    check()


@given(st.sampled_from(METHODS), st.dictionaries(st.text(max_size=12), junk, max_size=6),
       st.none() | st.text(max_size=80) | identifiers)
@example((SERVICES["metadata"], "create_namespace"), {"name": "ok", "labels": {"k" * 4096: "v"}}, "default")
@example((SERVICES["content"], "gc_sweep"), {"remove": [[1]], "leased_ingests": [], "ingest_expiry": 1}, None)
def test_any_args_and_namespace_bind_or_refuse_cleanly(method, args, namespace):
    cls, name = method
    try:
        _, kwargs, call = bind(cls, name, args, namespace)
    except InvalidArgument as e:
        check_rejection(e)
        return
    if cls.methods[name].wants_ns:
        assert validate.IDENTIFIER_RE.match(kwargs["ns"])
    assert call.namespace == (namespace or None)


# --- over a real socket ------------------------------------------------------------------------------

@st.composite
def malformed_requests(draw) -> tuple[str, str, dict]:
    """(service, method, args) that the in-process check refuses: an argument of a wrong type,
    one missing or one unknown; sometimes a method that does not exist."""
    service = draw(st.sampled_from(sorted(SERVICES) + ["berth"]))
    cls = SERVICES.get(service)
    if cls is None or draw(st.integers(0, 9)) == 0:
        method = draw(st.sampled_from(["nope", "_bind", "__init__", "on_start", "x" * 64]))
        return service, method, draw(st.dictionaries(st.text(max_size=8), junk, max_size=3))
    method = draw(st.sampled_from(sorted(cls.methods)))
    params = cls.methods[method].schema.params
    args, _ = draw(arguments(cls, method))
    required = [n for n, (_, default) in params.items() if default is inspect.Parameter.empty]
    how = draw(st.sampled_from(["unknown", "wrong", "missing"]))
    if how == "missing" and required:
        args.pop(draw(st.sampled_from(required)), None)
    elif how == "wrong" and params:
        args[draw(st.sampled_from(sorted(params)))] = draw(junk)
    else:
        args[draw(st.sampled_from(["colour", "x" * 300, ""]))] = draw(junk)
    return service, method, args


def expected_code(service: str, method: str, args: dict) -> str | None:
    """What the in-process check answers, or None where it would let the request run."""
    cls = SERVICES.get(service)
    if cls is None or method not in cls.methods:
        return Code.NOT_IMPLEMENTED.value
    try:
        bind(cls, method, args)
    except BerthError as e:
        return e.code.value
    return None


class Socket:
    """A DEALER on berth.sock speaking raw frames, as any client in any language could."""

    def __init__(self, address: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"ipc://{address}")
        self.ids = itertools.count(1)

    def request(self, service: str, method: str, args: dict) -> tuple[int, Reply]:
        rid = next(self.ids)
        self.sock.send(Request(rid, service, method, "default", None, time.time() + 30, args).encode())
        assert self.sock.poll(10_000), f"no reply to {service}.{method}"
        return rid, Reply.decode(self.sock.recv_multipart()[0])

    def close(self) -> None:
        self.sock.close()


def test_malformed_requests_to_every_service_of_a_real_berthd(daemon):
    before = daemon.actor_pids()
    assert set(before) == set(SERVICES)
    sock = Socket(daemon.address)
    seen_services: set[str] = set()

    @given(malformed_requests())
    @settings(max_examples=2 * settings.default.max_examples)
    def check(request):
        service, method, args = request
        want = expected_code(service, method, args)
        if want is None:
            return                                 # a junk value that happens to be valid: not sent
        rid, reply = sock.request(service, method, args)
        assert not reply.ok, f"{service}.{method}({args!r:.200}) succeeded"
        assert reply.id == rid
        assert reply.error["code"] == want, (service, method, reply.error)
        assert reply.error["message"]
        seen_services.add(service)

    try:
        check()
    finally:
        sock.close()
    assert seen_services == set(SERVICES) | {"berth"}
    assert daemon.actor_pids() == before, "an actor was restarted"
    client = daemon.client()
    try:
        assert client.namespaces.list() is not None
    finally:
        client.close()
