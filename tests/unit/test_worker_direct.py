"""A Worker serving on a socket of its own (as a shim does), with a deferred answer."""
import os
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
