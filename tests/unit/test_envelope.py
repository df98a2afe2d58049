"""Request and Reply as values: construction, defaults, equality and repr, as callers and test
failures rely on them."""
import pytest

from bus.envelope import Reply, Request


def test_request_defaults_and_fields():
    req = Request(1, "metadata", "get_namespace")
    assert (req.id, req.service, req.method, req.namespace, req.lease, req.deadline, req.args) == \
        (1, "metadata", "get_namespace", None, None, None, {})
    assert Request(1, "a", "b").args is not req.args          # a fresh map each time
    kw = Request(id="x", service="s", method="m", namespace="ns", lease="l", deadline=2.5, args={"k": 1})
    assert (kw.namespace, kw.lease, kw.deadline, kw.args) == ("ns", "l", 2.5, {"k": 1})


def test_reply_defaults():
    reply = Reply(3)
    assert (reply.id, reply.ok, reply.result, reply.error, reply.more) == (3, True, None, None, False)
    assert Reply(3, result=[1], more=True).encode() != reply.encode()


def test_equality_is_by_value_and_class():
    assert Request(1, "a", "b", args={"x": 1}) == Request(1, "a", "b", args={"x": 1})
    assert Request(1, "a", "b") != Request(2, "a", "b")
    assert Reply(1) == Reply(1, True, None, None, False)
    assert Reply(1) != Reply(1, ok=False)
    assert Request(1, "a", "b") != (1, "a", "b", None, None, None, {})
    with pytest.raises(TypeError):
        hash(Reply(1))                                         # mutable, so not hashable


def test_repr_names_every_field():
    assert repr(Request(7, "metadata", "get", "default", None, 1.5, {"name": "x"})) == \
        "Request(id=7, service='metadata', method='get', namespace='default', lease=None, deadline=1.5, " \
        "args={'name': 'x'})"
    assert repr(Reply(1, ok=False, error={"code": "NotFound", "message": "m"})) == \
        "Reply(id=1, ok=False, result=None, error={'code': 'NotFound', 'message': 'm'}, more=False)"


def test_fields_are_fixed():
    req = Request(1, "a", "b")
    with pytest.raises(AttributeError):
        req.other = 1
