"""msgpack with hard limits: a peer can send anything, and nothing it sends may crash or bloat us."""
from __future__ import annotations

import msgpack

from bus.errors import InvalidArgument, ResourceExhausted

MAX_HEADER = 1 << 20          # one msgpack envelope frame
MAX_BULK_FRAME = 16 << 20     # one extra frame of raw bytes (blob chunks)
MAX_FRAMES = 64               # frames in one message
MAX_DEPTH = 32                # nesting of maps and arrays
MAX_ITEMS = 100_000           # entries in one map or array


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def unpack(data: bytes, *, limit: int = MAX_HEADER) -> object:
    """Decode one frame; malformed, oversized or too deep input raises InvalidArgument."""
    if len(data) > limit:
        raise ResourceExhausted(f"frame of {len(data)} bytes exceeds the limit of {limit}")
    try:
        obj = msgpack.unpackb(
            data, raw=False, strict_map_key=False, use_list=True,
            max_str_len=limit, max_bin_len=limit,
            max_array_len=MAX_ITEMS, max_map_len=MAX_ITEMS, max_ext_len=0,
        )
    except msgpack.StackError:
        raise InvalidArgument(f"msgpack nesting deeper than {MAX_DEPTH}") from None
    except (ValueError, TypeError, msgpack.UnpackException, msgpack.ExtraData, UnicodeDecodeError) as e:
        raise InvalidArgument(f"malformed msgpack: {type(e).__name__}") from None
    check_depth(obj)
    return obj


def check_depth(obj: object, limit: int = MAX_DEPTH) -> None:
    stack = [(obj, 0)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict):
            children = list(value.keys()) + list(value.values())
        elif isinstance(value, list):
            children = value
        else:
            continue
        if depth >= limit:
            raise InvalidArgument(f"msgpack nesting deeper than {limit}")
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))


def check_frames(frames: list) -> None:
    """Bounds on a multipart message as received, before anything is decoded."""
    if len(frames) > MAX_FRAMES:
        raise ResourceExhausted(f"{len(frames)} frames exceed the limit of {MAX_FRAMES}")
    for frame in frames[1:]:
        if len(frame) > MAX_BULK_FRAME:
            raise ResourceExhausted(f"frame of {len(frame)} bytes exceeds the limit of {MAX_BULK_FRAME}")
