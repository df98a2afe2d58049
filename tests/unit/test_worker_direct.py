"""A Worker serving on a socket of its own (as a shim does), with a deferred answer."""
import os
import threading
import time

import pytest

from bus.client import Connection
from bus.errors import NotFound
from bus.worker import Actor, Deferred, Worker, method


class Waiter(Actor):
    name = "waiter"

    def __init__(self):
        self.waiting: list[Deferred] = []

    @method
    def wait(self) -> Deferred:
        d = Deferred()
        self.waiting.append(d)
        return d

    @method
    def waiters(self) -> int:
        return len(self.waiting)

    @method
    def release(self, value: int) -> int:
        for d in self.waiting:
            self.worker.resolve(d, {"value": value})
        released, self.waiting = len(self.waiting), []
        return released

    @method
    def fail(self) -> None:
        raise NotFound("nothing here")

    @method
    def quit(self) -> None:
        self.worker.stop()


def test_direct_worker_answers_deferred_requests(tmp_path):
    address = f"ipc://{tmp_path}/w.sock"
    pid = os.fork()
    if pid == 0:                      # the server, in a process of its own as a shim is
        code = 1
        try:
            worker = Worker(Waiter(), bind=address)
            worker.run()
            worker.close()
            code = 0
        finally:
            os._exit(code)
    conn = Connection(address, check=False, timeout=10)
    waiter = Connection(address, check=False, timeout=10)
    try:
        rid = waiter._send("waiter", "wait", {}, None, None, 10, [])
        deadline = time.monotonic() + 10
        while conn.call("waiter", "waiters") == 0:
            assert time.monotonic() < deadline, "the wait never arrived"
        assert conn.call("waiter", "release", {"value": 7}) == 1
        assert waiter._recv(rid, time.monotonic() + 10, "wait")[0].unwrap() == {"value": 7}
        with pytest.raises(NotFound):
            conn.call("waiter", "fail")
        conn.call("waiter", "quit")
    finally:
        conn.close()
        waiter.close()
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


class Echo(Actor):
    name = "echo"

    def __init__(self, second_address: str):
        self.second_address = second_address

    def on_start(self) -> None:
        import zmq
        sock = self.worker.ctx.socket(zmq.ROUTER)
        sock.bind(self.second_address)
        self.worker.serve_direct(sock)

    @method
    def echo(self, value: int) -> int:
        return value

    @method(blocking=True)
    def pooled_echo(self, value: int) -> dict:
        return {"value": value, "on_loop": threading.current_thread() is threading.main_thread()}

    @method
    def in_flight(self) -> int:
        return self.worker.in_flight

    @method
    def quit(self) -> None:
        self.worker.stop()


def test_a_second_socket_is_served_and_each_reply_goes_back_on_its_own_socket(tmp_path):
    first, second = f"ipc://{tmp_path}/a.sock", f"ipc://{tmp_path}/b.sock"
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            worker = Worker(Echo(second), bind=first)
            worker.run()
            worker.close()
            code = 0
        finally:
            os._exit(code)
    conns = [Connection(first, check=False, timeout=10), Connection(second, check=False, timeout=10)]
    try:
        for i in range(20):
            conn = conns[i % 2]
            assert conn.call("echo", "echo", {"value": i}) == i
            # A pool thread's reply, queued with the end of its call: both reach the loop.
            assert conn.call("echo", "pooled_echo", {"value": i}) == {"value": i, "on_loop": False}
        assert conns[1].call("echo", "in_flight") == 0
        conns[0].call("echo", "quit")
    finally:
        for conn in conns:
            conn.close()
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
