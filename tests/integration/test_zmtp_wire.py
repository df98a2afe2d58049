"""The client's own ZMTP (bus/zmtp.py) against libzmq: a pyzmq ROUTER set up as berthd's front
socket is, strangers that are no ZMTP peer, and a real berthd that is killed and restarted."""
import concurrent.futures
import hashlib
import os
import random
import socket
import subprocess
import sys
import time
import types

import pytest
import zmq

from bus import zmtp
from bus.client import Connection
from bus.codec import MAX_BULK_FRAME
from bus.envelope import Reply, Request
from bus.errors import DeadlineExceeded, NotFound, ResourceExhausted, Unavailable
from tests.support import REPO, wait_until

MiB = 1 << 20


@pytest.fixture
def router(tmp_path):
    """A libzmq ROUTER with berthd's front-socket options (bus/router.py)."""
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    sock.setsockopt(zmq.MAXMSGSIZE, 128 * MiB)
    sock.setsockopt(zmq.LINGER, 0)
    address = f"ipc://{tmp_path}/front.sock"
    sock.bind(address)
    yield types.SimpleNamespace(sock=sock, address=address)
    sock.close()
    ctx.term()


@pytest.fixture
def pool():
    with concurrent.futures.ThreadPoolExecutor(2) as executor:
        yield executor


def next_request(sock: zmq.Socket, timeout: float = 10.0) -> tuple[bytes, Request, list[bytes]]:
    assert sock.poll(int(timeout * 1000)), "no request reached the router"
    client, header, *bulk = sock.recv_multipart()
    return client, Request.decode(header), bulk


def test_multipart_and_large_bulk_frames_both_ways(router):
    peer = zmtp.connect(router.address, "the router", 5)
    try:
        assert peer.peer_type == b"ROUTER"
        big = random.Random(1).randbytes(MAX_BULK_FRAME)
        peer.send([b"head", b"", b"s" * 255, b"l" * 256, big], time.monotonic() + 30)
        assert router.sock.poll(30_000)
        client, *frames = router.sock.recv_multipart()
        assert frames == [b"head", b"", b"s" * 255, b"l" * 256, big]

        router.sock.send_multipart([client, b"reply", big, *[bytes([i]) * i for i in range(60)]])
        got = peer.recv(time.monotonic() + 30)
        assert got[:2] == [b"reply", big]
        assert got[2:] == [bytes([i]) * i for i in range(60)]
    finally:
        peer.close()


def test_a_call_and_its_bulk_frames_through_a_connection(router, pool):
    conn = Connection(router.address, timeout=10)
    try:
        pending = pool.submit(conn.call, "content", "write", {"n": 1}, frames=[b"x" * (3 * MiB), b"y"],
                              with_frames=True)
        client, req, bulk = next_request(router.sock)
        assert (req.service, req.method, req.args) == ("content", "write", {"n": 1})
        assert bulk == [b"x" * (3 * MiB), b"y"]
        # An answer to an older request comes first: it is not this call's.
        router.sock.send_multipart([client, Reply(req.id - 1, result="stale").encode()])
        router.sock.send_multipart([client, Reply(req.id, result={"ok": 1}).encode(), b"z" * (2 * MiB)])
        assert pending.result(timeout=10) == ({"ok": 1}, [b"z" * (2 * MiB)])
    finally:
        conn.close()


def test_a_stream_of_replies(router, pool):
    conn = Connection(router.address, timeout=10)
    try:
        pending = pool.submit(lambda: list(conn.stream("transfer", "pull", {})))
        client, req, _ = next_request(router.sock)
        for i in range(3):
            router.sock.send_multipart([client, Reply(req.id, result=i, more=True).encode()])
        router.sock.send_multipart([client, Reply(req.id, result="done").encode(), b"tail"])
        assert pending.result(timeout=10) == [(0, []), (1, []), (2, []), ("done", [b"tail"])]
    finally:
        conn.close()


def test_an_error_reply_is_raised_as_its_class(router, pool):
    conn = Connection(router.address, timeout=10)
    try:
        pending = pool.submit(conn.call, "metadata", "get", {})
        client, req, _ = next_request(router.sock)
        router.sock.send_multipart([client, Reply.failure(req.id, NotFound("no such thing")).encode()])
        with pytest.raises(NotFound, match="no such thing"):
            pending.result(timeout=10)
    finally:
        conn.close()


def test_no_answer_is_a_deadline_and_the_late_answer_is_dropped(router, pool):
    conn = Connection(router.address, timeout=10)
    try:
        started = time.monotonic()
        with pytest.raises(DeadlineExceeded, match="no answer from berthd"):
            conn.call("metadata", "slow", timeout=0.2)
        assert time.monotonic() - started < 2
        client, late, _ = next_request(router.sock)
        router.sock.send_multipart([client, Reply(late.id, result="late").encode()])

        pending = pool.submit(conn.call, "metadata", "fast")
        client, req, _ = next_request(router.sock)
        router.sock.send_multipart([client, Reply(req.id, result="fast").encode()])
        assert pending.result(timeout=10) == "fast"
    finally:
        conn.close()


def test_a_router_that_closes_mid_request_is_unavailable_at_once(router, pool):
    conn = Connection(router.address, timeout=60)
    try:
        pending = pool.submit(conn.call, "metadata", "held")
        next_request(router.sock)
        closed_at = time.monotonic()
        router.sock.close()
        with pytest.raises(Unavailable, match="went away with the request"):
            pending.result(timeout=30)
        assert time.monotonic() - closed_at < 5          # not the 60 s deadline
    finally:
        conn.close()


def test_a_request_over_the_limits_is_refused_before_it_is_sent(router):
    conn = Connection(router.address, timeout=10)
    try:
        with pytest.raises(ResourceExhausted):
            conn.call("content", "write", {}, frames=[b"\0" * (MAX_BULK_FRAME + 1)])
        with pytest.raises(ResourceExhausted):
            conn.call("content", "write", {}, frames=[b""] * 64)
        assert not router.sock.poll(100), "the router saw a request that should not have left"
    finally:
        conn.close()


def test_tcp(pool):
    ctx = zmq.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    try:
        port = sock.bind_to_random_port("tcp://127.0.0.1")
        conn = Connection(f"tcp://127.0.0.1:{port}", timeout=10)
        pending = pool.submit(conn.call, "berth", "version")
        client, req, _ = next_request(sock)
        sock.send_multipart([client, Reply(req.id, result={"version": "x"}).encode()])
        assert pending.result(timeout=10) == {"version": "x"}
        conn.close()
    finally:
        sock.close()
        ctx.term()


# --- strangers ----------------------------------------------------------------------------------------

@pytest.fixture
def stranger(tmp_path, pool):
    """A unix socket server that greets whoever connects with `greeting` and keeps them open."""
    path = str(tmp_path / "stranger.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(8)
    accepted = []

    def serve(greeting: bytes, count: int):
        def loop():
            listener.settimeout(10)
            for _ in range(count):
                conn, _ = listener.accept()
                accepted.append(conn)
                conn.sendall(greeting)
        return pool.submit(loop)
    yield path, serve
    listener.close()
    for conn in accepted:
        conn.close()


def test_a_server_sending_garbage_instead_of_a_greeting_is_unavailable_without_a_hang(stranger):
    path, serve = stranger
    serve(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n", 2)
    started = time.monotonic()
    with pytest.raises(Unavailable, match=f"berthd at {path}: does not speak ZMTP"):
        Connection(path, timeout=30)
    conn = Connection(path, timeout=30, check=False)
    with pytest.raises(Unavailable, match="does not speak ZMTP"):
        conn.call("berth", "version")
    assert time.monotonic() - started < 5


def test_a_server_that_says_nothing_is_bounded_by_the_deadline(stranger):
    path, serve = stranger
    serve(b"", 1)
    started = time.monotonic()
    with pytest.raises(DeadlineExceeded, match="sent no ZMTP greeting in time"):
        Connection(path, timeout=0.3)
    assert time.monotonic() - started < 3


def test_nothing_listening_is_said_plainly(tmp_path):
    with pytest.raises(Unavailable, match=r"cannot reach berthd at .*missing.sock \(no such socket; is it running\?\)"):
        Connection(str(tmp_path / "missing.sock"))


# --- a real berthd -----------------------------------------------------------------------------------

def test_blobs_larger_than_a_frame_go_both_ways_with_berthd(daemon):
    client = daemon.client(timeout=60)
    data = random.Random(7).randbytes(9 * MiB + 123)           # 1 MiB frames out, 4 MiB frames back
    info = client.content.write("big-blob", data)
    assert info["digest"] == "sha256:" + hashlib.sha256(data).hexdigest()
    assert client.content.read_all(info["digest"]) == data
    client.close()


def test_the_client_library_does_not_load_pyzmq(daemon):
    script = ("import sys; from berth.client import Client; "
              f"c = Client({daemon.address!r}); v = c.version(); "
              "print(bool(v['server']), 'zmq' in sys.modules)")
    out = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=":".join([REPO, *sys.path[1:]])), cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "False"]


def test_a_call_after_berthd_restarted_goes_to_the_new_one(daemon, make_daemon):
    conn = Connection(daemon.address, timeout=30)
    try:
        first = conn.call("berth", "info")["pid"]
        daemon.kill9()
        again = make_daemon(dir=daemon.dir).start()
        # Not idempotent: sent once, on a new connection, since the old one was seen to be gone.
        assert conn.call("berth", "info")["pid"] == again.proc.pid != first
    finally:
        conn.close()


def test_a_request_held_by_a_killed_berthd_fails_at_once(daemon):
    client = daemon.client(timeout=10)
    client.set_failpoint("worker.dispatch.metadata.list_namespaces", "1*delay(60000)")
    with concurrent.futures.ThreadPoolExecutor(1) as held:
        conn = Connection(daemon.address, timeout=120)
        try:
            pending = held.submit(conn.call, "metadata", "list_namespaces")
            wait_until(lambda: client.actors()["router"]["in_flight"] >= 1, 15, what="the request to be held")
            killed_at = time.monotonic()
            daemon.kill9()
            with pytest.raises(Unavailable, match="went away with the request"):
                pending.result(timeout=60)
            assert time.monotonic() - killed_at < 5
        finally:
            conn.close()
