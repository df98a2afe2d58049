import msgpack
import pytest

from bus import codec
from bus.envelope import Reply, Request
from bus.errors import Code, InvalidArgument, NotFound, ResourceExhausted, from_wire


def test_roundtrip_keeps_bytes_and_strings_apart():
    obj = {"s": "text", "b": b"\x00\xff", "n": [1, 2.5, None, True]}
    assert codec.unpack(codec.pack(obj)) == obj


def test_truncated_msgpack_is_invalid_argument():
    with pytest.raises(InvalidArgument):
        codec.unpack(codec.pack({"a": "b" * 100})[:-10])


def test_deep_nesting_is_refused_before_it_recurses():
    deep = b"\x91" * 1000 + b"\x90"
    with pytest.raises(InvalidArgument, match="nesting"):
        codec.unpack(deep)


def test_nesting_just_within_the_limit_is_accepted():
    value: list = []
    for _ in range(codec.MAX_DEPTH - 1):
        value = [value]
    assert codec.unpack(codec.pack(value)) == value


def test_oversized_frame_is_resource_exhausted():
    with pytest.raises(ResourceExhausted):
        codec.unpack(b"\xc0" * (codec.MAX_HEADER + 1))


def test_too_many_frames_is_resource_exhausted():
    with pytest.raises(ResourceExhausted):
        codec.check_frames([b"h"] * (codec.MAX_FRAMES + 1))


def test_trailing_garbage_is_invalid_argument():
    with pytest.raises(InvalidArgument):
        codec.unpack(codec.pack(1) + b"\x01")


def test_ext_types_are_refused():
    with pytest.raises(InvalidArgument):
        codec.unpack(msgpack.packb(msgpack.ExtType(1, b"x")))


def test_request_roundtrip():
    req = Request(7, "metadata", "get_namespace", "default", None, 123.5, {"name": "x"})
    assert Request.decode(req.encode()) == req


@pytest.mark.parametrize("raw", [
    {"id": {}, "service": "a", "method": "b"},
    {"id": 1, "service": 3, "method": "b"},
    {"id": 1, "service": "a", "method": ""},
    {"id": 1, "service": "a", "method": "b", "args": []},
    {"id": 1, "service": "a", "method": "b", "deadline": "soon"},
    {"id": 1, "service": "a", "method": "b", "namespace": 5},
    {"id": True, "service": "a", "method": "b"},
    [1, 2, 3],
])
def test_malformed_requests_are_invalid_argument(raw):
    with pytest.raises(InvalidArgument):
        Request.decode(codec.pack(raw))


def test_reply_carries_the_error_code_back_to_its_class():
    reply = Reply.decode(Reply.failure(3, NotFound("image x not found")).encode())
    with pytest.raises(NotFound, match="image x not found"):
        reply.unwrap()


def test_unknown_error_code_from_a_peer_becomes_internal():
    assert from_wire({"code": "Bogus", "message": "m"}).code is Code.INTERNAL
    assert from_wire("nonsense").code is Code.INTERNAL
