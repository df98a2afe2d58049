"""Publishing events with acknowledgement, and the spool that keeps them while nobody listens.

A publisher writes each event to its spool directory before returning, then a sender thread
forwards spooled events to the events actor in order and deletes each one once it is
acknowledged. The events actor accepts an event id once, so a resend after a crash is harmless.

Events go to the events actor's own socket (`forward`), which spares the router two hops per
event: a publisher that knows it (a shim is told it by the zygote, see `forward_address`) sends
there from the first event, one that does not sends its first through the router, whose answer
names it. When a send there fails (the actor died or is restarting), the next try goes through the
router again, which holds a request until the actor is back, and its answer leads the sender back
to the short way.

The spool is not fsync'd: it outlives the publisher's crash (the page cache keeps it), and what
must outlive the machine's is kept elsewhere (a shim fsyncs each exit record before publishing).
"""
from __future__ import annotations

import logging
import os
import threading
import time
import uuid

from bus import codec, failpoints
from bus.errors import BerthError

log = logging.getLogger("berth.publisher")

DIRECT_TIMEOUT = 1.0       # a forward is an append: slower than this, the router's way is as good


def forward_address(state: str) -> str:
    """The events actor's own socket for `forward`, under berthd's state directory."""
    return f"ipc://{os.path.join(state, 'events-forward.sock')}"


class Publisher:
    def __init__(self, address: str, spool_dir: str, forward: str = ""):
        """`address`: berthd's client socket; `forward`: the events actor's own, if known."""
        self.address = address
        self.forward = forward or None
        self.spool_dir = spool_dir
        os.makedirs(spool_dir, mode=0o700, exist_ok=True)
        self.counter = 0
        self.wake = threading.Condition()
        self.closing = False
        self.thread = threading.Thread(target=self._send_loop, name="publisher", daemon=True)
        self.thread.start()

    def publish(self, namespace: str | None, topic: str, event: dict) -> str:
        """Spool one event for delivery; returns its id."""
        event_id = uuid.uuid4().hex
        with self.wake:
            self.counter += 1
            name = f"{time.time_ns():020d}-{self.counter:08d}"
        record = codec.pack({"id": event_id, "namespace": namespace, "topic": topic,
                             "event": event, "timestamp": time.time()})
        tmp = os.path.join(self.spool_dir, f".{name}")
        with open(tmp, "wb") as f:
            f.write(record)
        os.rename(tmp, os.path.join(self.spool_dir, name))
        with self.wake:
            self.wake.notify()
        return event_id

    def pending(self) -> int:
        return sum(1 for n in os.listdir(self.spool_dir) if not n.startswith("."))

    def close(self, timeout: float = 2.0) -> None:
        """Give queued events a moment to go out; what remains stays spooled for next time."""
        deadline = time.monotonic() + timeout
        while self.pending() and time.monotonic() < deadline and self.thread.is_alive():
            time.sleep(0.01)
        with self.wake:
            self.closing = True
            self.wake.notify()
        self.thread.join(timeout)

    def _send_loop(self) -> None:
        from bus.client import Connection
        conn, direct = None, False
        forward = self.forward              # the events actor's own socket, as its answers say
        backoff = 0.05
        while True:
            names = sorted(n for n in os.listdir(self.spool_dir) if not n.startswith("."))
            if not names:
                with self.wake:
                    if self.closing:
                        break
                    self.wake.wait(1.0)
                continue
            path = None
            try:
                if conn is None:
                    direct = forward is not None
                    # No probe of the actor's socket: it named it a moment ago.
                    conn = (Connection(forward, timeout=DIRECT_TIMEOUT, check=False) if direct
                            else Connection(self.address, timeout=5.0))
                for name in names:
                    path = os.path.join(self.spool_dir, name)
                    with open(path, "rb") as f:
                        record = codec.unpack(f.read())
                    failpoints.fail("events.publish", record.get("topic") or "")
                    answer = conn.call("events", "forward", record, namespace=record.get("namespace"))
                    os.unlink(path)
                    path = None
                    if not direct and isinstance(answer, dict) and isinstance(answer.get("forward"), str):
                        forward = answer["forward"] or None
                backoff = 0.05
                if not direct and forward is not None:      # the next events take the short way
                    conn.close()
                    conn = None
            except BerthError as e:
                if e.code.value == "InvalidArgument" and path is not None:
                    log.error("dropping an event the events actor refused: %s", e)
                    os.unlink(path)
                    continue
                log.debug("events actor not reachable (%s); retrying", e)
                if conn is not None:
                    conn.close()
                    conn = None
                if direct:                  # its own socket failed: through the router, at once
                    forward = None
                    continue
                with self.wake:
                    if self.closing:
                        break
                    self.wake.wait(backoff)
                backoff = min(backoff * 2, 2.0)
        if conn is not None:
            conn.close()
