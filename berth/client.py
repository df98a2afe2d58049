"""The berth client library: a `Client` bound to a daemon address and a namespace.

    client = Client("/run/berth/berth.sock", namespace="default")
    client.namespaces.create("builds", labels={"team": "ci"})
    for event in client.events.subscribe(since=0, filters=['topic=="/namespaces/create"']):
        print(event["seq"], event["topic"])
"""
from __future__ import annotations

import os
import threading
import time
from typing import Iterator

from berth.version import VERSION
from bus.client import Connection

DEFAULT_ADDRESS = "/run/berth/berth.sock"
DEFAULT_NAMESPACE = "default"


class Client:
    def __init__(self, address: str | None = None, namespace: str | None = None, *, timeout: float = 30.0):
        self.address = address or os.environ.get("BERTH_ADDRESS") or DEFAULT_ADDRESS
        self.namespace = namespace or os.environ.get("BERTH_NAMESPACE") or DEFAULT_NAMESPACE
        self.timeout = timeout
        self._local = threading.local()
        self.namespaces = Namespaces(self)
        self.events = Events(self)

    @property
    def conn(self) -> Connection:
        """This thread's connection (ZeroMQ sockets belong to one thread)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = Connection(self.address, timeout=self.timeout)
        return conn

    def with_namespace(self, namespace: str) -> "Client":
        return Client(self.address, namespace, timeout=self.timeout)

    def call(self, service: str, method: str, args: dict | None = None, **kw):
        kw.setdefault("namespace", self.namespace)
        return self.conn.call(service, method, args, **kw)

    def version(self) -> dict:
        return {"client": VERSION, "server": self.call("berth", "version")["version"]}

    def info(self) -> dict:
        return self.call("berth", "info")

    def actors(self) -> dict:
        return self.call("berth", "actors")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


class Namespaces:
    def __init__(self, client: Client):
        self.client = client

    def create(self, name: str, labels: dict | None = None) -> dict:
        return self.client.call("metadata", "create_namespace", {"name": name, "labels": labels or {}})

    def get(self, name: str) -> dict:
        return self.client.call("metadata", "get_namespace", {"name": name}, idempotent=True)

    def list(self) -> list[dict]:
        return self.client.call("metadata", "list_namespaces", idempotent=True)

    def update(self, name: str, labels: dict, fieldpaths: list[str] | None = None) -> dict:
        return self.client.call("metadata", "update_namespace",
                                {"name": name, "labels": labels, "fieldpaths": fieldpaths or []})

    def set_labels(self, name: str, labels: dict) -> dict:
        """Set (or, with an empty value, remove) the given labels, leaving others as they are."""
        return self.update(name, labels, [f"labels.{k}" for k in labels])

    def delete(self, name: str) -> None:
        self.client.call("metadata", "delete_namespace", {"name": name})


class Events:
    """The event bus: publish, replay, and subscribe with gap filling (docs/events.md)."""

    IDLE_CHECK = 1.0      # seconds without a live event before asking for the head

    def __init__(self, client: Client):
        self.client = client

    def publish(self, topic: str, event: dict, *, event_id: str | None = None) -> int:
        args = {"topic": topic, "event": event}
        if event_id:
            args["id"] = event_id
        return self.client.call("events", "forward", args)["seq"]

    def head(self) -> int:
        return self.client.call("events", "head", idempotent=True)["head"]

    def replay(self, since: int = 0, filters: list[str] | tuple = ()) -> Iterator[dict]:
        """Every event after `since` up to the head as it is now."""
        match = _matcher(filters)
        while True:
            batch = self.client.call("events", "replay", {"since": since}, idempotent=True)
            for envelope in batch["events"]:
                since = envelope["seq"]
                if match(envelope):
                    yield envelope
            if not batch["events"] or since >= batch["head"]:
                return

    def subscribe(self, since: int | None = None, filters: list[str] | tuple = (),
                  timeout: float | None = None) -> Iterator[dict]:
        """Events as they come, in order, none missed: those after `since` first (default: now).

        Live events come from the PUB socket; a jump in sequence numbers (a slow reader loses
        messages at the socket's high-water mark) or a quiet spell is filled in by replay.
        """
        import zmq
        from bus import codec
        head = self.client.call("events", "head", idempotent=True)
        sub = self.client.conn.ctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, 100_000)
        sub.setsockopt(zmq.SUBSCRIBE, b"")
        sub.connect(head["address"])
        match = _matcher(filters)
        last = head["head"] if since is None else since
        stop_at = None if timeout is None else time.monotonic() + timeout
        try:
            for envelope in self.replay(last):
                last = envelope["seq"]
                if match(envelope):
                    yield envelope
            while stop_at is None or time.monotonic() < stop_at:
                wait = self.IDLE_CHECK if stop_at is None else min(self.IDLE_CHECK, stop_at - time.monotonic())
                if not sub.poll(max(1, int(wait * 1000))):
                    for envelope in self.replay(last):
                        last = envelope["seq"]
                        if match(envelope):
                            yield envelope
                    continue
                _, data = sub.recv_multipart()
                envelope = codec.unpack(data)
                if envelope["seq"] <= last:
                    continue
                if envelope["seq"] > last + 1:
                    for missed in self.replay(last):
                        if missed["seq"] >= envelope["seq"]:
                            break
                        last = missed["seq"]
                        if match(missed):
                            yield missed
                last = envelope["seq"]
                if match(envelope):
                    yield envelope
        finally:
            sub.close()


def _matcher(filters):
    if not filters:
        return lambda envelope: True
    from bus.filters import parse
    return parse(list(filters)).match
