"""Malformed and hostile requests on the client socket, spoken as raw ZeroMQ.

Each case sends something a careless or hostile client could send straight to `berth.sock`
(a DEALER socket and hand-made frames, no berth client in between), checks that the answer is
the documented error (docs/wire.md, "Limits" and "Error codes"), and then checks that berthd
still answers an ordinary request.
"""
from __future__ import annotations

import random
import time

import msgpack
import pytest
import zmq

from bus import codec
from bus.envelope import Reply
from tests.support import rss_kib

REPLY_TIMEOUT = 10.0
MiB = 1024


class RawClient:
    """One DEALER socket on berth.sock; sends frames as given and decodes what comes back."""

    def __init__(self, address: str):
        self.sock = zmq.Context.instance().socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.connect(f"ipc://{address}")

    def close(self) -> None:
        self.sock.close()

    def send(self, *frames: bytes) -> Reply:
        self.sock.send_multipart(list(frames))
        assert self.sock.poll(int(REPLY_TIMEOUT * 1000)), "no reply from berthd"
        reply_frames = self.sock.recv_multipart()
        body = codec.unpack(reply_frames[0])
        assert isinstance(body, dict) and set(body) >= {"id", "ok"}, f"not a reply envelope: {body!r}"
        return Reply.decode(reply_frames[0])

    def request(self, service, method, args=None, *, rid=1, namespace="default", deadline=None,
                extra: tuple[bytes, ...] = ()) -> Reply:
        body = {"id": rid, "service": service, "method": method, "namespace": namespace,
                "lease": None, "deadline": time.time() + 30 if deadline is None else deadline,
                "args": {} if args is None else args}
        return self.send(msgpack.packb(body, use_bin_type=True), *extra)


def error_code(reply: Reply) -> str:
    assert not reply.ok, f"expected an error, got a result: {reply.result!r}"
    assert isinstance(reply.error, dict), reply.error
    assert isinstance(reply.error.get("message"), str) and reply.error["message"], reply.error
    return reply.error["code"]


def assert_still_serving(daemon) -> None:
    client = daemon.client()
    try:
        assert client.version()["server"]
        assert isinstance(client.namespaces.list(), list)     # an actor, not just the router
    finally:
        client.close()


def namespace_names(daemon) -> list[str]:
    client = daemon.client()
    try:
        return [n["name"] for n in client.namespaces.list()]
    finally:
        client.close()


def events_head(daemon) -> int:
    client = daemon.client()
    try:
        return client.events.head()
    finally:
        client.close()


@pytest.fixture
def raw(daemon):
    client = RawClient(daemon.address)
    yield client
    client.close()


def valid_request(rid=7) -> bytes:
    return msgpack.packb({"id": rid, "service": "berth", "method": "version", "namespace": None,
                          "lease": None, "deadline": time.time() + 30, "args": {}}, use_bin_type=True)


def nested_args_request(depth: int) -> bytes:
    """A request whose args hold `depth` arrays inside each other, written by hand: msgpack's own
    packer stops at 511 levels, a hostile peer's need not."""
    head = {"id": 1, "service": "metadata", "method": "list_namespaces", "namespace": "default",
            "lease": None, "deadline": time.time() + 30}
    body = b"".join(codec.pack(k) + codec.pack(v) for k, v in head.items())
    args = b"\x81" + codec.pack("x") + b"\x91" * depth + b"\xc0"
    return bytes([0x80 | (len(head) + 1)]) + body + codec.pack("args") + args


WRONG_FIELD_TYPES = {
    "service_int": {"id": 1, "service": 5, "method": "version", "args": {}},
    "args_list": {"id": 1, "service": "berth", "method": "version", "args": [1, 2]},
    "deadline_string": {"id": 1, "service": "berth", "method": "version", "deadline": "soon", "args": {}},
    "id_map": {"id": {"a": 1}, "service": "berth", "method": "version", "args": {}},
    "method_list": {"id": 1, "service": "berth", "method": ["version"], "args": {}},
    "namespace_int": {"id": 1, "service": "metadata", "method": "list_namespaces", "namespace": 3, "args": {}},
    "args_int_keys": {"id": 1, "service": "berth", "method": "version", "args": {1: 2}},
    "id_too_long": {"id": "x" * 129, "service": "berth", "method": "version", "args": {}},
    "not_a_map": [1, "berth", "version"],
}


# --- one test per case ------------------------------------------------------------------------

@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5, 6, 7, 8])
def test_random_bytes(daemon, raw, seed):
    rng = random.Random(seed)
    for _ in range(25):
        junk = rng.randbytes(rng.randint(1, 4096))
        reply = raw.send(junk)
        assert error_code(reply) == "InvalidArgument", junk[:32]
        assert reply.id is None
    assert_still_serving(daemon)


def test_truncated_msgpack(daemon, raw):
    whole = valid_request()
    assert raw.send(whole).ok                      # the untruncated request is fine
    for cut in range(0, len(whole)):
        reply = raw.send(whole[:cut])
        assert error_code(reply) == "InvalidArgument", f"cut at {cut}"
    assert_still_serving(daemon)


def test_100mb_frame(daemon, raw):
    reply = raw.send(b"\x00" * (100 * 1000 * 1000))
    assert error_code(reply) == "ResourceExhausted"
    assert reply.id is None
    assert raw.send(valid_request()).ok            # the same connection is still served
    assert_still_serving(daemon)


def test_oversized_bulk_frame(daemon, raw):
    reply = raw.request("berth", "version", extra=(b"\x00" * (codec.MAX_BULK_FRAME + 1),))
    assert error_code(reply) == "ResourceExhausted"
    assert_still_serving(daemon)


def test_deeply_nested_args(daemon, raw):
    reply = raw.send(nested_args_request(1000))
    assert error_code(reply) == "InvalidArgument"
    assert "nesting" in reply.error["message"]
    # Nesting within the documented limit is not what is refused.
    reply = raw.send(nested_args_request(codec.MAX_DEPTH - 3))
    assert error_code(reply) == "InvalidArgument"
    assert "unknown argument" in reply.error["message"]
    assert_still_serving(daemon)


@pytest.mark.parametrize("case", sorted(WRONG_FIELD_TYPES))
def test_wrong_field_types(daemon, raw, case):
    reply = raw.send(msgpack.packb(WRONG_FIELD_TYPES[case], use_bin_type=True))
    assert error_code(reply) == "InvalidArgument"
    assert reply.id is None
    assert_still_serving(daemon)


def test_unknown_service(daemon, raw):
    reply = raw.request("nosuchservice", "version", rid=41)
    assert error_code(reply) == "NotImplemented"
    assert reply.id == 41
    assert_still_serving(daemon)


def test_unknown_method(daemon, raw):
    reply = raw.request("metadata", "nope", rid=42)
    assert error_code(reply) == "NotImplemented"
    assert reply.id == 42
    assert error_code(raw.request("berth", "nope")) == "NotImplemented"
    assert_still_serving(daemon)


@pytest.mark.parametrize("name", ["_bind", "__init__", "__class__", "on_stop", "stats", "store"])
def test_private_method(daemon, raw, name):
    reply = raw.request("metadata", name, rid=43)
    assert error_code(reply) == "NotImplemented"
    assert reply.id == 43
    assert_still_serving(daemon)


@pytest.mark.parametrize("name", ["../x", "a/b", "a" * 77, "", "-a", "a..b", "a b", "ä"])
def test_bad_identifier(daemon, raw, name):
    reply = raw.request("metadata", "create_namespace", {"name": name})
    assert error_code(reply) == "InvalidArgument"
    assert name not in namespace_names(daemon)
    assert_still_serving(daemon)


def test_identifier_of_76_chars_is_accepted(daemon, raw):
    reply = raw.request("metadata", "create_namespace", {"name": "a" * 76})
    assert reply.ok, reply.error


def test_topic_without_leading_slash(daemon, raw):
    head = events_head(daemon)
    reply = raw.request("events", "forward", {"topic": "tasks/exit", "event": {}})
    assert error_code(reply) == "InvalidArgument"
    assert events_head(daemon) == head                  # nothing was appended
    assert raw.request("events", "forward", {"topic": "/tasks/exit", "event": {}}).ok
    assert_still_serving(daemon)


@pytest.mark.parametrize("topic", ["/tasks/../exit", "/tasks//exit", "/tasks/", "/", "/" + "a" * 300, "/tasks/ex it"])
def test_bad_topic(daemon, raw, topic):
    head = events_head(daemon)
    reply = raw.request("events", "forward", {"topic": topic, "event": {}})
    assert error_code(reply) == "InvalidArgument"
    assert events_head(daemon) == head
    assert_still_serving(daemon)


def test_too_many_entries(daemon, raw):
    reply = raw.request("metadata", "list_namespaces", {"x": [0] * (codec.MAX_ITEMS + 1)})
    assert error_code(reply) == "InvalidArgument"
    reply = raw.request("metadata", "list_namespaces", {"x": {str(i): 0 for i in range(codec.MAX_ITEMS + 1)}})
    assert error_code(reply) == "InvalidArgument"
    assert_still_serving(daemon)


@pytest.mark.parametrize("deadline", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_deadline(daemon, raw, deadline):
    # The router bounds every wait by the deadline; NaN never compares as passed.
    for service, method in (("berth", "version"), ("metadata", "list_namespaces")):
        reply = raw.request(service, method, deadline=deadline)
        assert error_code(reply) == "InvalidArgument"
    assert_still_serving(daemon)


@pytest.mark.parametrize("timestamp", [float("nan"), float("inf"), float("-inf"), -1.0, 1e300])
def test_event_timestamp_out_of_range(daemon, raw, timestamp):
    # Such a timestamp, once in the log, broke `berth events` for every later reader.
    head = events_head(daemon)
    reply = raw.request("events", "forward", {"topic": "/test/a", "event": {}, "timestamp": timestamp})
    assert error_code(reply) == "InvalidArgument"
    assert events_head(daemon) == head
    assert raw.request("events", "forward", {"topic": "/test/a", "event": {}, "timestamp": 1.5e9}).ok
    assert_still_serving(daemon)


@pytest.mark.parametrize("event", [{1: "a", "b": 2}, {b"k": 1}, {"a": {1: 2, "x": 3}}, {"a": [{"b": {2.5: 1}}]}],
                         ids=["int_key", "bytes_key", "nested_int_key", "key_in_list"])
def test_event_with_non_string_keys(daemon, raw, event):
    # Event fields are named by strings; anything else could not be printed as JSON by readers.
    head = events_head(daemon)
    reply = raw.request("events", "forward", {"topic": "/test/a", "event": event})
    assert error_code(reply) == "InvalidArgument"
    assert events_head(daemon) == head
    assert_still_serving(daemon)


def test_oversized_event(daemon, raw):
    head = events_head(daemon)
    reply = raw.request("events", "forward", {"topic": "/test/a", "event": {"pad": "x" * (64 << 10)}})
    assert error_code(reply) == "InvalidArgument"
    assert events_head(daemon) == head
    assert_still_serving(daemon)


@pytest.mark.parametrize("args", [{"namespace": "../x"}, {"id": ""}, {"id": "i" * 129}, {"event": [1]}],
                         ids=["namespace", "empty_id", "long_id", "event_list"])
def test_bad_event_fields(daemon, raw, args):
    head = events_head(daemon)
    reply = raw.request("events", "forward", {"topic": "/test/a", "event": {}, **args})
    assert error_code(reply) == "InvalidArgument"
    assert events_head(daemon) == head
    assert_still_serving(daemon)


def test_too_many_frames(daemon, raw):
    header = valid_request()
    reply = raw.send(header, *[b"x"] * codec.MAX_FRAMES)
    assert error_code(reply) == "ResourceExhausted"
    assert raw.send(header, *[b"x"] * (codec.MAX_FRAMES - 1)).ok     # at the limit: fine
    assert_still_serving(daemon)


def test_missing_argument(daemon, raw):
    reply = raw.request("metadata", "create_namespace", {})
    assert error_code(reply) == "InvalidArgument"
    assert "name" in reply.error["message"]
    assert_still_serving(daemon)


def test_unknown_argument(daemon, raw):
    reply = raw.request("metadata", "create_namespace", {"name": "fine", "colour": "red"})
    assert error_code(reply) == "InvalidArgument"
    assert "colour" in reply.error["message"]
    assert "fine" not in namespace_names(daemon)
    assert_still_serving(daemon)


def test_wrong_argument_type(daemon, raw):
    reply = raw.request("metadata", "create_namespace", {"name": "fine", "labels": ["a"]})
    assert error_code(reply) == "InvalidArgument"
    reply = raw.request("events", "replay", {"since": "0"})
    assert error_code(reply) == "InvalidArgument"
    assert_still_serving(daemon)


# --- all of it, many times ----------------------------------------------------------------------

def bad_inputs(round_: int) -> list[tuple[tuple[bytes, ...], str]]:
    """Every case above as (frames, expected code); names vary by round so nothing is cached."""
    rng = random.Random(round_)
    whole = valid_request()

    def req(service, method, args=None):
        return (msgpack.packb({"id": round_, "service": service, "method": method, "namespace": "default",
                               "deadline": time.time() + 30, "args": args or {}}, use_bin_type=True),)

    cases = [((rng.randbytes(rng.randint(1, 4096)),), "InvalidArgument"),
             ((whole[:rng.randint(1, len(whole) - 1)],), "InvalidArgument"),
             ((nested_args_request(1000),), "InvalidArgument"),
             ((whole, *[b"x"] * codec.MAX_FRAMES), "ResourceExhausted"),
             (req(f"nosuch{round_}", "version"), "NotImplemented"),
             (req("metadata", f"nope{round_}"), "NotImplemented"),
             (req("metadata", "_bind"), "NotImplemented"),
             (req("metadata", "create_namespace", {"name": "../x"}), "InvalidArgument"),
             (req("metadata", "create_namespace", {"name": "a/b"}), "InvalidArgument"),
             (req("metadata", "create_namespace", {"name": "n" * 77}), "InvalidArgument"),
             (req("events", "forward", {"topic": "tasks/exit", "event": {}}), "InvalidArgument"),
             (req("events", "forward", {"topic": "/t/a", "event": {}, "timestamp": float("nan")}), "InvalidArgument"),
             (req("events", "forward", {"topic": "/t/a", "event": {"a": {1: 2}}}), "InvalidArgument"),
             (req("metadata", "create_namespace"), "InvalidArgument"),
             (req("metadata", "create_namespace", {"name": f"n{round_}", f"x{round_}": 1}), "InvalidArgument")]
    cases += [((msgpack.packb(body, use_bin_type=True),), "InvalidArgument")
              for body in WRONG_FIELD_TYPES.values()]
    if round_ % 10 == 0:                 # 16 MiB a time: often enough to leak, not to crawl
        cases.append((req("berth", "version") + (b"\x00" * (codec.MAX_BULK_FRAME + 1),), "ResourceExhausted"))
    return cases


def test_repeated_bad_input_does_not_grow_memory(daemon, raw):
    actors = daemon.actor_pids()
    pids = {"supervisor": daemon.proc.pid, "metadata": actors["metadata"], "events": actors["events"]}
    assert_still_serving(daemon)
    baseline = {name: rss_kib(pid) for name, pid in pids.items()}
    for round_ in range(200):
        if round_ < 3:
            assert error_code(raw.send(b"\x00" * (100 * 1000 * 1000))) == "ResourceExhausted"
        for frames, expected in bad_inputs(round_):
            assert error_code(raw.send(*frames)) == expected, (round_, expected, frames[0][:64])
    assert_still_serving(daemon)
    actors = daemon.actor_pids()
    assert (actors["metadata"], actors["events"]) == (pids["metadata"], pids["events"]), "an actor was restarted"
    after = {name: rss_kib(pid) for name, pid in pids.items()}
    for name in pids:
        assert after[name] <= baseline[name] + 64 * MiB, \
            f"{name} RSS grew from {baseline[name]} KiB to {after[name]} KiB"
