"""The berth client library: a `Client` bound to a daemon address and a namespace.

    client = Client("/run/berth/berth.sock", namespace="default")
    client.namespaces.create("builds", labels={"team": "ci"})
    for event in client.events.subscribe(since=0, filters=['topic=="/namespaces/create"']):
        print(event["seq"], event["topic"])

    with client.lease():                          # nothing created in this block is GC'd meanwhile
        with open("manifest.json", "rb") as f:
            info = client.content.write("manifest-1", f)
        client.images.create("example.com/app:1", {"mediaType": "application/vnd.oci.image.manifest.v1+json",
                                                   "digest": info["digest"], "size": info["size"]})
"""
from __future__ import annotations

import contextlib
import io
import os
import threading
import time
from typing import BinaryIO, Callable, Iterator

from berth.version import VERSION
from bus.client import Connection
from bus.errors import AlreadyExists, BerthError, FailedPrecondition, InvalidArgument, NotFound

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
        self.content = Content(self)
        self.leases = Leases(self)
        self.images = Images(self)
        self.containers = Containers(self)
        self.snapshots = Snapshots(self)

    @property
    def conn(self) -> Connection:
        """This thread's connection (ZeroMQ sockets belong to one thread)."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = Connection(self.address, timeout=self.timeout)
        return conn

    def with_namespace(self, namespace: str) -> "Client":
        return Client(self.address, namespace, timeout=self.timeout)

    @property
    def active_lease(self) -> str | None:
        """The lease this thread's calls carry (in the request's `lease` field), if any."""
        return getattr(self._local, "lease", None)

    @active_lease.setter
    def active_lease(self, lease_id: str | None) -> None:
        self._local.lease = lease_id

    def call(self, service: str, method: str, args: dict | None = None, **kw):
        kw.setdefault("namespace", self.namespace)
        kw.setdefault("lease", self.active_lease)
        return self.conn.call(service, method, args, **kw)

    @contextlib.contextmanager
    def lease(self, expire: float | None = 3600, labels: dict | None = None) -> Iterator[dict]:
        """A new lease that every call this thread makes through this client carries until the
        block ends, when it is deleted: what those calls create is safe from GC meanwhile (and,
        should the process die, until `expire` seconds have passed)."""
        lease = self.leases.create(labels=labels, expire=expire)
        previous, self.active_lease = self.active_lease, lease["id"]
        try:
            yield lease
        except BaseException:
            self.active_lease = previous
            with contextlib.suppress(BerthError):
                self.leases.delete(lease["id"])
            raise
        self.active_lease = previous
        with contextlib.suppress(NotFound):       # already deleted inside the block
            self.leases.delete(lease["id"])

    def gc(self) -> dict:
        """Collect garbage now; what was removed, by kind, and how long it took."""
        return self.call("metadata", "gc")

    # --- transfers ---------------------------------------------------------------------------

    TRANSFER_TIMEOUT = 3600.0     # seconds a whole pull or push may take (ctr sets none)

    def pull(self, ref: str, platform: str | None = None, plain_http: bool = False, credentials=None,
             progress: Callable[[dict], None] | None = None, timeout: float | None = None, *,
             unpack: bool | None = None, snapshotter: str | None = None) -> dict:
        """Fetch `ref` for `platform` (`os/arch[/variant]`; default: berthd's host) from its
        registry into the content store and create or update its image record; returns the record.

        `credentials` is "user:password" or (user, password). `progress(report)` is called for each
        report the transfer streams: {"ref", "digest", "status", "offset", "total"}, with `ref` the
        blob's ingest ref (`layer-sha256:…`) or the image name, and status one of resolving,
        waiting, downloading, exists, done (and the unpack's, for `unpack-…` refs). The pull holds
        this thread's lease if there is one (see `lease()`), else one of berthd's own for as long as
        it runs. `unpack` and `snapshotter`, when given, say whether and where berthd unpacks the
        layers (its defaults otherwise)."""
        args = {"ref": ref, "platform": platform, "plain_http": plain_http,
                "credentials": _credentials(credentials)}
        if unpack is not None:
            args["unpack"] = unpack
        if snapshotter is not None:
            args["snapshotter"] = snapshotter
        return self._transfer("pull", args, "image", progress, timeout)

    def push(self, ref: str, image: str | None = None, plain_http: bool = False, credentials=None,
             progress: Callable[[dict], None] | None = None, timeout: float | None = None) -> dict:
        """Push the local image `image` (default: the one named `ref`) to the registry reference
        `ref`: blobs the registry lacks, then manifests, then indexes; returns the pushed target
        descriptor. Progress reports are as for `pull`, with statuses waiting, uploading, exists
        and done."""
        args = {"ref": ref, "image": image, "plain_http": plain_http, "credentials": _credentials(credentials)}
        return self._transfer("push", args, "pushed", progress, timeout)

    def _transfer(self, method: str, args: dict, key: str, progress, timeout: float | None) -> dict:
        from bus.errors import Internal
        result = None
        for item, _ in self.conn.stream("transfer", method, args, namespace=self.namespace,
                                        lease=self.active_lease,
                                        timeout=self.TRANSFER_TIMEOUT if timeout is None else timeout):
            if not isinstance(item, dict):
                continue
            if "progress" in item:
                if progress is not None:
                    progress(item["progress"])
            elif key in item:
                result = item[key]
        if result is None:
            raise Internal(f"transfer.{method} ended without a result")
        return result

    # --- archives (berth.archive) ------------------------------------------------------------

    def import_archive(self, source, **options) -> list[dict]:
        """Import the images of an OCI layout or `docker save` tar (a path, "-" for stdin, or a
        binary file); returns the image records made. Options: see berth.archive.import_archive."""
        from berth import archive
        return archive.import_archive(self, source, **options)

    def export_archive(self, dest, names: list[str], **options) -> dict:
        """Write the named images as an OCI layout tar (a path, "-" for stdout, or a binary file).
        Options: see berth.archive.export_archive."""
        from berth import archive
        return archive.export_archive(self, dest, names, **options)

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


class Content:
    """The content store: blobs by digest, and ingests (resumable writes verified on commit)."""

    READ_CHUNK = 4 << 20      # bytes asked for per read call (the store's limit)
    WRITE_CHUNK = 1 << 20     # bytes sent per write call, as one bulk frame

    def __init__(self, client: Client):
        self.client = client

    def list(self, filters: list[str] | tuple = ()) -> list[dict]:
        return self.client.call("content", "list", {"filters": list(filters)}, idempotent=True)

    def info(self, digest: str) -> dict:
        return self.client.call("content", "info", {"digest": digest}, idempotent=True)

    def delete(self, digest: str) -> None:
        self.client.call("content", "delete", {"digest": digest})

    def update(self, digest: str, labels: dict, fieldpaths: list[str] | None = None) -> dict:
        return self.client.call("content", "update",
                                {"digest": digest, "labels": labels, "fieldpaths": fieldpaths or []})

    def set_labels(self, digest: str, labels: dict) -> dict:
        """Set (or, with an empty value, remove) the given labels, leaving others as they are."""
        if not labels:
            return self.info(digest)
        return self.update(digest, labels, [f"labels.{k}" for k in labels])

    def read(self, digest: str, offset: int = 0, size: int = -1) -> Iterator[bytes]:
        """The blob's bytes from `offset`, `size` of them (-1: to the end), a chunk at a time."""
        remaining = size
        while remaining != 0:
            want = self.READ_CHUNK if remaining < 0 else min(remaining, self.READ_CHUNK)
            _, frames = self.client.call("content", "read", {"digest": digest, "offset": offset, "size": want},
                                         idempotent=True, with_frames=True)
            data = frames[0] if frames else b""
            if not data:
                return
            yield data
            offset += len(data)
            if remaining > 0:
                remaining -= len(data)

    def read_all(self, digest: str) -> bytes:
        return b"".join(self.read(digest))

    def write(self, ref: str, reader: BinaryIO | bytes, total: int | None = None, expected: str | None = None,
              labels: dict | None = None) -> dict:
        """Stream `reader` into the store under `ref` and commit it; the committed blob's info.

        If an ingest of `ref` exists (an earlier attempt was cut off), the write resumes at its
        offset: that many bytes of `reader` are read past (and hashed) rather than sent again. The
        digest committed is `expected`, or else the one computed while streaming; the store checks
        it and the size against what it holds. Content that is already there is not an error: its
        info is returned. When the store rejects the data, the ingest is aborted (the same bytes
        would be rejected again); when the transfer is cut off, it is kept for a resume.
        """
        import hashlib                  # here: loading OpenSSL costs every CLI start otherwise
        if isinstance(reader, (bytes, bytearray, memoryview)):
            reader = io.BytesIO(reader)
        try:
            status = self.client.call("content", "writer_open",
                                      {"ref": ref, "total": total, "expected": expected})
        except AlreadyExists:
            if expected is None:
                raise
            return self.info(expected)
        offset = status["offset"]
        hasher = None if expected else hashlib.sha256()
        try:
            skipped = 0
            while skipped < offset:                       # resuming: these bytes are stored already
                chunk = _read_full(reader, min(self.WRITE_CHUNK, offset - skipped))
                if not chunk:
                    raise FailedPrecondition(f"ref {ref}: the stream ended at {skipped} bytes, but "
                                             f"{offset} are stored already; abort the ingest to start over")
                if hasher is not None:
                    hasher.update(chunk)
                skipped += len(chunk)
            while chunk := _read_full(reader, self.WRITE_CHUNK):
                try:
                    self.client.call("content", "write", {"ref": ref, "offset": offset}, frames=[chunk])
                except (InvalidArgument, FailedPrecondition):
                    self._abort_quietly(ref)
                    raise
                if hasher is not None:
                    hasher.update(chunk)
                offset += len(chunk)
            if total is not None and offset != total:
                raise FailedPrecondition(f"ref {ref}: the stream ended at {offset} bytes, expected {total}")
            digest = expected or "sha256:" + hasher.hexdigest()
            try:
                return self.client.call("content", "commit", {"ref": ref, "size": offset, "expected": digest,
                                                              "labels": labels or {}})
            except AlreadyExists:
                return self.info(digest)
            except NotFound:
                # A commit redelivered after the content actor died answering it finds its ingest
                # gone: the first delivery committed it.
                if not self._exists(digest):
                    raise
                return self.info(digest)
            except (InvalidArgument, FailedPrecondition):
                self._abort_quietly(ref)
                raise
        except BaseException:
            with contextlib.suppress(BerthError):        # release the ref; its data stays for a resume
                self.client.call("content", "writer_close", {"ref": ref})
            raise

    def _exists(self, digest: str) -> bool:
        try:
            self.info(digest)
            return True
        except NotFound:
            return False

    def _abort_quietly(self, ref: str) -> None:
        with contextlib.suppress(BerthError):
            self.abort(ref)

    def status(self, ref: str) -> dict:
        return self.client.call("content", "status", {"ref": ref}, idempotent=True)

    def list_statuses(self, filters: list[str] | tuple = ()) -> list[dict]:
        return self.client.call("content", "list_statuses", {"filters": list(filters)}, idempotent=True)

    def abort(self, ref: str) -> None:
        self.client.call("content", "abort", {"ref": ref})


def _credentials(credentials) -> str | None:
    """"user:password" from either that string or a (user, password) pair."""
    if credentials is None or isinstance(credentials, str):
        return credentials or None
    if isinstance(credentials, (tuple, list)) and len(credentials) == 2:
        return f"{credentials[0]}:{credentials[1]}"
    raise InvalidArgument("credentials must be 'user:password' or a (user, password) pair")


def _read_full(reader: BinaryIO, n: int) -> bytes:
    """Up to n bytes, fewer only at the end of the stream (pipes and sockets return short reads)."""
    data = reader.read(n)
    if not data or len(data) == n:
        return data or b""
    parts = [data]
    got = len(data)
    while got < n:
        more = reader.read(n - got)
        if not more:
            break
        parts.append(more)
        got += len(more)
    return b"".join(parts)


class Leases:
    """Leases hold content, ingests and snapshots against GC; see `Client.lease()`."""

    def __init__(self, client: Client):
        self.client = client

    def create(self, id: str | None = None, labels: dict | None = None, expire: float | None = None) -> dict:
        """A lease; `expire` is seconds from now (None: until deleted)."""
        return self.client.call("metadata", "create_lease", {"id": id, "labels": labels or {}, "expire": expire})

    def list(self, filters: list[str] | tuple = ()) -> list[dict]:
        return self.client.call("metadata", "list_leases", {"filters": list(filters)}, idempotent=True)

    def delete(self, id: str, sync: bool = False) -> None:
        """Delete the lease; with sync, collect what it alone held before returning."""
        self.client.call("metadata", "delete_lease", {"id": id, "sync": sync})

    def resources(self, id: str) -> list[dict]:
        return self.client.call("metadata", "list_lease_resources", {"lease": id}, idempotent=True)


class Images:
    """Image records: a name and the descriptor of its target (a manifest or an index)."""

    def __init__(self, client: Client):
        self.client = client

    def list(self, filters: list[str] | tuple = ()) -> list[dict]:
        return self.client.call("metadata", "list_images", {"filters": list(filters)}, idempotent=True)

    def get(self, name: str) -> dict:
        return self.client.call("metadata", "get_image", {"name": name}, idempotent=True)

    def create(self, name: str, target: dict, labels: dict | None = None) -> dict:
        return self.client.call("metadata", "create_image", {"name": name, "target": target, "labels": labels or {}})

    def update(self, name: str, target: dict | None = None, labels: dict | None = None,
               fieldpaths: list[str] | None = None) -> dict:
        return self.client.call("metadata", "update_image", {"name": name, "target": target, "labels": labels,
                                                             "fieldpaths": fieldpaths or []})

    def put(self, name: str, target: dict, labels: dict | None = None) -> dict:
        """Create the image, or point an existing one at `target`."""
        return self.client.call("metadata", "put_image", {"name": name, "target": target, "labels": labels or {}})

    def set_labels(self, name: str, labels: dict) -> dict:
        """Set (or, with an empty value, remove) the given labels, leaving others as they are."""
        if not labels:
            return self.get(name)
        return self.update(name, labels=labels, fieldpaths=[f"labels.{k}" for k in labels])

    def delete(self, name: str, sync: bool = False) -> None:
        """Delete the record; with sync, collect the content only it held before returning."""
        self.client.call("metadata", "delete_image", {"name": name, "sync": sync})

    def tag(self, src: str, dst: str, force: bool = False) -> dict:
        """A new image `dst` with `src`'s target and labels; AlreadyExists if `dst` exists, unless
        `force`, which points it at `src`'s target."""
        image = self.get(src)
        if force:
            return self.put(dst, image["target"], image["labels"])
        return self.create(dst, image["target"], image["labels"])


class Containers:
    """Container records: what a task is started from (image, runtime, spec, snapshot)."""

    def __init__(self, client: Client):
        self.client = client

    def create(self, id: str, runtime: str | dict = "io.containerd.runc.v2", spec: dict | None = None,
               image: str = "", snapshotter: str = "", snapshot_key: str = "",
               labels: dict | None = None) -> dict:
        runtime = {"name": runtime} if isinstance(runtime, str) else runtime
        return self.client.call("metadata", "create_container",
                                {"id": id, "runtime": runtime, "spec": spec, "image": image,
                                 "snapshotter": snapshotter, "snapshot_key": snapshot_key,
                                 "labels": labels or {}})

    def list(self, filters: list[str] | tuple = ()) -> list[dict]:
        return self.client.call("metadata", "list_containers", {"filters": list(filters)}, idempotent=True)

    def get(self, id: str) -> dict:
        return self.client.call("metadata", "get_container", {"id": id}, idempotent=True)

    def update(self, id: str, labels: dict | None = None, spec: dict | None = None,
               fieldpaths: list[str] | None = None) -> dict:
        return self.client.call("metadata", "update_container",
                                {"id": id, "labels": labels, "spec": spec, "fieldpaths": fieldpaths or []})

    def set_labels(self, id: str, labels: dict) -> dict:
        """Set (or, with an empty value, remove) the given labels, leaving others as they are."""
        if not labels:
            return self.get(id)
        return self.update(id, labels=labels, fieldpaths=[f"labels.{k}" for k in labels])

    def delete(self, id: str) -> dict:
        return self.client.call("metadata", "delete_container", {"id": id})


class Snapshots:
    """Snapshots: the layered trees containers run on. Every method takes `snapshotter=`
    (default overlayfs; `available()` lists what berthd offers). Mounts come back as data,
    [{"type", "source", "options"}], for the caller to mount (see berth.cli.snapshots)."""

    COPY_TIMEOUT = 600.0      # seconds for calls that may copy or walk a whole tree (native)

    def __init__(self, client: Client):
        self.client = client

    def _call(self, method: str, args: dict, snapshotter: str, **kw):
        return self.client.call("snapshot", method, dict(args, snapshotter=snapshotter), **kw)

    def available(self) -> list[dict]:
        return self.client.call("snapshot", "snapshotters", idempotent=True)

    def prepare(self, key: str, parent: str = "", labels: dict | None = None, *,
                snapshotter: str = "overlayfs") -> list[dict]:
        return self._call("prepare", {"key": key, "parent": parent, "labels": labels or {}}, snapshotter,
                          timeout=self.COPY_TIMEOUT)

    def view(self, key: str, parent: str = "", labels: dict | None = None, *,
             snapshotter: str = "overlayfs") -> list[dict]:
        return self._call("view", {"key": key, "parent": parent, "labels": labels or {}}, snapshotter,
                          timeout=self.COPY_TIMEOUT)

    def mounts(self, key: str, *, snapshotter: str = "overlayfs") -> list[dict]:
        return self._call("mounts", {"key": key}, snapshotter, idempotent=True)

    def commit(self, name: str, key: str, labels: dict | None = None, *, snapshotter: str = "overlayfs") -> dict:
        return self._call("commit", {"name": name, "key": key, "labels": labels or {}}, snapshotter,
                          timeout=self.COPY_TIMEOUT)

    def remove(self, key: str, *, snapshotter: str = "overlayfs") -> None:
        self._call("remove", {"key": key}, snapshotter, timeout=self.COPY_TIMEOUT)

    def stat(self, key: str, *, snapshotter: str = "overlayfs") -> dict:
        return self._call("stat", {"key": key}, snapshotter, idempotent=True)

    def update(self, key: str, labels: dict, fieldpaths: list[str] | None = None, *,
               snapshotter: str = "overlayfs") -> dict:
        return self._call("update", {"key": key, "labels": labels, "fieldpaths": fieldpaths or []}, snapshotter)

    def set_labels(self, key: str, labels: dict, *, snapshotter: str = "overlayfs") -> dict:
        """Set (or, with an empty value, remove) the given labels, leaving others as they are."""
        if not labels:
            return self.stat(key, snapshotter=snapshotter)
        return self.update(key, labels, [f"labels.{k}" for k in labels], snapshotter=snapshotter)

    def list(self, filters: list[str] | tuple = (), *, snapshotter: str = "overlayfs") -> list[dict]:
        return self._call("list", {"filters": list(filters)}, snapshotter, idempotent=True)

    def usage(self, key: str, *, snapshotter: str = "overlayfs") -> dict:
        return self._call("usage", {"key": key}, snapshotter, idempotent=True, timeout=self.COPY_TIMEOUT)


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
