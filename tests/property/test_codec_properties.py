"""The codec and the envelopes on any input: a value, or a BerthError with the documented code.

A peer can put any bytes in any number of frames; the router runs `codec.check_frames` and
`Request.decode` on them before anything else (bus/router.py), the client runs `Reply.decode`.
"""
from __future__ import annotations

import msgpack
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from bus import codec
from bus.envelope import Reply, Request
from bus.errors import BerthError, Code, InvalidArgument, ResourceExhausted

INT64_MIN, UINT64_MAX = -(1 << 63), (1 << 64) - 1

scalars = (st.none() | st.booleans() | st.integers(INT64_MIN, UINT64_MAX)
           | st.floats() | st.text(max_size=20) | st.binary(max_size=20))
keys = st.text(max_size=10) | st.integers(-5, 5) | st.binary(max_size=4)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=6)
                      | st.dictionaries(keys, inner, max_size=6), max_leaves=16)


def nested(depth: int, kind: str) -> bytes:
    """`depth` containers inside each other, the innermost empty, written by hand."""
    if kind == "array":
        return b"\x91" * (depth - 1) + b"\x90"
    return b"\x81\xa1k" * (depth - 1) + b"\x80"


def accept(frames: list[bytes]) -> Request:
    """What the router does with a client's frames before routing them."""
    codec.check_frames(frames)
    return Request.decode(frames[0])


def mutate(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    buf = bytearray(data)
    for pos, value in flips:
        if buf:
            buf[pos % len(buf)] = value
    return bytes(buf)


# --- unpack --------------------------------------------------------------------------------------

@given(st.binary(max_size=2048))
@example(b"")
@example(b"\xc1")                                  # the one byte msgpack never uses
@example(b"\xdd\xff\xff\xff\xff")                  # array32 claiming four billion entries
@example(b"\xd4\x01\x00")                          # fixext 1
@example(b"\xd6\xff\x00\x00\x00\x00")              # the timestamp extension
@example(b"\x81\x91\x00\x00")                      # a map keyed by an array (unhashable)
@example(b"\xa3\xff\xfe\xfd")                      # str that is not UTF-8
def test_unpack_any_bytes_is_a_value_or_invalid_argument(data):
    try:
        value = codec.unpack(data)
    except InvalidArgument:
        return
    codec.check_depth(value)                       # whatever came out is within the limits
    assert codec.pack(codec.unpack(codec.pack(value))) == codec.pack(value)


@given(values, st.lists(st.tuples(st.integers(0, 1 << 16), st.integers(0, 255)), max_size=4))
def test_unpack_mutated_msgpack_is_a_value_or_invalid_argument(value, flips):
    data = mutate(codec.pack(value), flips)
    for cut in (len(data), len(data) // 2, max(len(data) - 1, 0)):
        try:
            codec.unpack(data[:cut])
        except InvalidArgument:
            pass


@given(values)
def test_pack_unpack_round_trip(value):
    packed = codec.pack(value)
    # NaN is not equal to itself: compare the encodings of the value and of its decoding
    assert codec.pack(codec.unpack(packed)) == packed


@given(st.integers(1, codec.MAX_DEPTH), st.sampled_from(["array", "map"]))
def test_nesting_up_to_the_limit_is_accepted(depth, kind):
    codec.unpack(nested(depth, kind))


@given(st.integers(codec.MAX_DEPTH + 1, 5000), st.sampled_from(["array", "map"]))
@example(codec.MAX_DEPTH + 1, "array")
def test_nesting_past_the_limit_is_refused(depth, kind):
    with pytest.raises(InvalidArgument, match="nesting"):
        codec.unpack(nested(depth, kind))


@given(st.sampled_from(["array", "map"]), st.integers(0, 3))
def test_entries_limit(kind, over):
    count = codec.MAX_ITEMS + over
    value = [0] * count if kind == "array" else {i: 0 for i in range(count)}
    if over:
        with pytest.raises(InvalidArgument):
            codec.unpack(codec.pack(value))
    else:
        assert len(codec.unpack(codec.pack(value))) == count


@given(st.integers(-2, 2))
def test_header_size_limit(delta):
    payload = codec.MAX_HEADER + delta - 5          # one bin32 value filling the frame
    data = b"\xc6" + payload.to_bytes(4, "big") + bytes(payload)
    if len(data) > codec.MAX_HEADER:
        with pytest.raises(ResourceExhausted):
            codec.unpack(data)
    else:
        assert codec.unpack(data) == bytes(payload)


# --- frames and the request envelope ----------------------------------------------------------------

frame_lists = st.lists(st.binary(max_size=256), min_size=1, max_size=codec.MAX_FRAMES + 8)


@given(frame_lists)
def test_any_frames_are_a_request_or_a_clean_error(frames):
    try:
        req = accept(frames)
    except BerthError as e:
        assert e.code in (Code.INVALID_ARGUMENT, Code.RESOURCE_EXHAUSTED)
        if len(frames) > codec.MAX_FRAMES:
            assert e.code == Code.RESOURCE_EXHAUSTED
        assert e.to_wire()["message"]
        return
    assert len(frames) <= codec.MAX_FRAMES
    assert isinstance(req.service, str) and isinstance(req.method, str)
    assert isinstance(req.args, dict)


@given(st.integers(1, codec.MAX_FRAMES + 8), st.sampled_from([0, codec.MAX_BULK_FRAME, codec.MAX_BULK_FRAME + 1]))
def test_frame_count_and_bulk_size_limits(count, bulk_size):
    header = Request(1, "berth", "version").encode()
    big = bytes(bulk_size)
    frames = [header] + [b"x"] * (count - 2) + ([big] if count > 1 else [])
    if count > codec.MAX_FRAMES or (count > 1 and bulk_size > codec.MAX_BULK_FRAME):
        with pytest.raises(ResourceExhausted):
            accept(frames)
    else:
        assert accept(frames).method == "version"


envelope_fields = st.fixed_dictionaries({}, optional={
    "id": values, "service": values | st.text(max_size=70), "method": values | st.text(max_size=70),
    "namespace": values, "lease": values, "deadline": values | st.floats(), "args": values,
    "extra": values,
})


@given(envelope_fields | values)
@example({"id": True, "service": "a", "method": "b"})
@example({"id": 1, "service": "a", "method": "b", "deadline": float("nan")})
@example({"id": 1, "service": "a", "method": "b", "args": {1: 2}})
def test_any_map_is_a_request_or_invalid_argument(raw):
    try:
        req = Request.decode(codec.pack(raw))
    except InvalidArgument:
        return
    assert isinstance(raw, dict)
    assert isinstance(req.id, (int, str)) and not isinstance(req.id, bool)
    assert req.service == raw["service"] and 0 < len(req.service) <= 64
    assert req.method == raw["method"] and 0 < len(req.method) <= 64
    assert req.namespace is None or isinstance(req.namespace, str)
    assert all(isinstance(k, str) for k in req.args)


names = st.text(min_size=1, max_size=64)
requests = st.builds(
    Request,
    id=st.integers(INT64_MIN, UINT64_MAX) | st.text(max_size=128),
    service=names, method=names,
    namespace=st.none() | st.text(min_size=1, max_size=80),
    lease=st.none() | st.text(min_size=1, max_size=80),
    deadline=st.none() | st.integers(0, 1 << 40) | st.floats(allow_nan=False, allow_infinity=False),
    args=st.dictionaries(st.text(max_size=20), values, max_size=3),
)


@given(requests)
def test_request_round_trip(req):
    decoded = Request.decode(req.encode())
    assert decoded.encode() == req.encode()


@given(st.builds(Reply, id=st.none() | st.integers(0, 1 << 32) | st.text(max_size=20),
                 ok=st.booleans(), result=values,
                 error=st.none() | st.fixed_dictionaries({"code": st.sampled_from(list(Code)).map(str),
                                                           "message": st.text(max_size=40)}),
                 more=st.booleans()))
def test_reply_round_trip(reply):
    decoded = Reply.decode(reply.encode())
    assert decoded.encode() == reply.encode()


@given(values)
def test_any_reply_frame_decodes_or_is_invalid_argument(raw):
    try:
        reply = Reply.decode(codec.pack(raw))
    except InvalidArgument:
        return
    if reply.ok:
        return
    with pytest.raises(BerthError) as raised:      # an error from a peer always becomes a BerthError
        reply.unwrap()
    assert raised.value.code in set(Code)


def test_hand_written_nesting_matches_msgpack():
    # the helper above writes the same bytes msgpack would, so the limits are measured right
    value: list = []
    for _ in range(4):
        value = [value]
    assert nested(5, "array") == msgpack.packb(value)
