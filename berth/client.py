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
from collections.abc import Callable, Iterator

from berth.labels import GC_REF_CONTENT
from berth.version import VERSION
from bus.client import Connection
from bus.errors import AlreadyExists, BerthError, DeadlineExceeded, FailedPrecondition, InvalidArgument, NotFound

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
        self.tasks = Tasks(self)

    @property
    def conn(self) -> Connection:
        """This thread's connection (a connection belongs to one thread)."""
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

    def failpoints(self) -> list[dict]:
        """The failpoints set in berthd, [{name, term}], with the counts they have left."""
        return self.call("berth", "failpoints")

    def set_failpoint(self, name: str, term: str) -> dict:
        """Set failpoint `name` (docs/failpoints.md) in every berthd process, e.g. ("content.commit",
        "1*crash"); shims started from now on have it too."""
        return self.call("berth", "set_failpoint", {"name": name, "term": term})

    def clear_failpoints(self, name: str | None = None) -> list[str]:
        """Clear failpoint `name`, or all of them; the names cleared."""
        return self.call("berth", "clear_failpoints", {"name": name})["cleared"]

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

    def write(self, ref: str, reader: io.BufferedIOBase | bytes, total: int | None = None, expected: str | None = None,
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

    FSCK_TIMEOUT = 3600.0     # seconds to re-read every blob in the store

    def fsck(self, timeout: float | None = None) -> dict:
        """Every blob in the store (all namespaces) hashed again: {checked, bytes, corrupt,
        missing, orphans, unknown}. `corrupt`: blobs whose bytes no longer match their digest or
        recorded size ({digest, namespaces, problem, size, actual_size, actual_digest});
        `missing`: recorded blobs with no file; `orphans`: blob files no namespace sees (GC
        removes them); `unknown`: files in the blob directory that are not blobs."""
        return self.client.call("content", "fsck", idempotent=True,
                                timeout=self.FSCK_TIMEOUT if timeout is None else timeout)


def _credentials(credentials) -> str | None:
    """"user:password" from either that string or a (user, password) pair."""
    if credentials is None or isinstance(credentials, str):
        return credentials or None
    if isinstance(credentials, (tuple, list)) and len(credentials) == 2:
        return f"{credentials[0]}:{credentials[1]}"
    raise InvalidArgument("credentials must be 'user:password' or a (user, password) pair")


def _read_full(reader: io.BufferedIOBase, n: int) -> bytes:
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
               labels: dict | None = None, *, release_lease: bool = False) -> dict:
        """`release_lease`: delete the active lease with the record's creation (the record now
        holds what the lease guarded for it)."""
        runtime = {"name": runtime} if isinstance(runtime, str) else runtime
        args = {"id": id, "runtime": runtime, "spec": spec, "image": image, "snapshotter": snapshotter,
                "snapshot_key": snapshot_key, "labels": labels or {}}
        if release_lease:
            args["release_lease"] = True
        return self.client.call("metadata", "create_container", args)

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

    def new(self, id: str, image: dict | str | None = None, *, spec_opts: list | tuple = (),
            spec: dict | None = None, snapshotter: str = "overlayfs", runtime: str | dict = "runc",
            labels: dict | None = None, args: list[str] | None = None) -> "Container":
        """A container from an unpacked image: its snapshot (key = the id, on the image's top
        chainID), a spec from berth.oci (the image's config, then `spec_opts` in order), and its
        record; ctr's `run` makes the same three. `args`, when given, replace the image's Cmd
        (its Entrypoint stays), as ctr's do. With `spec`, that spec is used as it is."""
        from bus.checks import check_identifier
        check_identifier(id, "container id")
        client = self.client
        name, mounts = "", []
        config = None
        # A lease guards the snapshot from its prepare until the record references it; the
        # create deletes it in the same transaction. A client killed meanwhile leaves a lease
        # that lapses, and GC then takes the snapshot.
        lease = client.leases.create(expire=600)["id"]
        previous, client.active_lease = client.active_lease, lease
        released = False
        try:
            if image is not None:
                record = _get_image(client, image) if isinstance(image, str) else image
                name = record["name"]
                _, config = image_config(client, record)
                diff_ids = (config.get("rootfs") or {}).get("diff_ids") or []
                parent = top_chain_id(diff_ids)
                try:
                    mounts = client.snapshots.prepare(id, parent, snapshotter=snapshotter)
                except NotFound:
                    raise FailedPrecondition(f"image {name} is not unpacked for snapshotter {snapshotter}; "
                                             f"pull it again with that snapshotter") from None
            try:
                if spec is None:
                    spec = self._spec(id, config, spec_opts, mounts, args)
                made = self.create(id, runtime=runtime, spec=spec, image=name,
                                   snapshotter=snapshotter if image is not None else "",
                                   snapshot_key=id if image is not None else "", labels=labels,
                                   release_lease=True)
                released = True
            except BaseException as e:
                made = None
                if isinstance(e, BerthError):
                    made = self._made_anyway(id, spec, snapshotter if image is not None else "")
                if made is None:
                    if image is not None:
                        with contextlib.suppress(BerthError):
                            client.snapshots.remove(id, snapshotter=snapshotter)
                    raise
        finally:
            client.active_lease = previous
            if not released:                      # gone already if a create sent again made the record
                with contextlib.suppress(BerthError):
                    client.leases.delete(lease)
        return Container(client, made)

    def _made_anyway(self, id: str, spec: dict | None, snapshotter: str) -> dict | None:
        """After a create that failed: the record, if it is this create's all the same (berthd
        went away after making it, and the create sent again found it there)."""
        try:
            record = self.get(id)
        except BerthError:
            return None
        ours = (record.get("spec") == spec and record.get("snapshotter", "") == snapshotter
                and record.get("snapshot_key", "") == (id if snapshotter else ""))
        return record if ours else None

    def _spec(self, id: str, config: dict | None, spec_opts, mounts: list[dict], args: list[str] | None) -> dict:
        from berth import oci
        opts = ([oci.with_image_config(config, args=args or None)] if config is not None else []) + list(spec_opts)
        if config is None and args:
            opts.insert(0, oci.with_process_args(*args))
        if not mounts:
            return oci.generate(self.client.namespace, id, *opts, image_config=config)
        with _rootfs_mounted(mounts) as rootfs:
            return oci.generate(self.client.namespace, id, *opts, rootfs=rootfs, image_config=config)

    def load(self, id: str) -> "Container":
        return Container(self.client, self.get(id))


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

    def diff(self, key: str, labels: dict | None = None, *, snapshotter: str = "overlayfs") -> dict:
        """What snapshot `key` (active or committed) changes over its parent, as a gzip layer
        committed to the content store with `labels` (and its diffID as
        `containerd.io/uncompressed`); returns its descriptor {mediaType, digest, size, diff_id}.
        The blob is held by this thread's lease, if any, until a label or an image holds it."""
        return self._call("diff", {"key": key, "labels": labels or {}}, snapshotter, timeout=self.COPY_TIMEOUT)


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
        sub = zmq.Context.instance().socket(zmq.SUB)
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


# --- containers, tasks and their stdio -------------------------------------------------------------

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
CHECKPOINT_CONFIG_TYPE = "application/vnd.berth.checkpoint.config.v1+json"   # the container's OCI spec
CHECKPOINT_LAYER_TYPE = "application/vnd.containerd.container.criu.checkpoint.criu.tar"
WAIT_SLICE = 300.0            # seconds one wait request may block in berthd; the client asks again


def image_config(client: "Client", image: dict | str) -> tuple[dict, dict]:
    """(config descriptor, parsed config) of an image record or name, for berthd's platform
    where the image is an index (the entry a pull takes): the content store walks index and
    manifest, in one request."""
    import json
    record = _get_image(client, image) if isinstance(image, str) else image
    try:                                           # berthd's host platform: the one it runs containers on
        result, frames = client.call("content", "image_config", {"target": record["target"]}, with_frames=True)
    except (NotFound, InvalidArgument) as e:
        raise type(e)(f"image {record['name']}: {e}") from None
    config_desc = result["config"]
    data = frames[0] if frames else client.content.read_all(config_desc["digest"])
    return config_desc, json.loads(data)


def _write_json_blob(client: "Client", ref: str, media_type: str, doc: dict, labels: dict | None = None) -> dict:
    """`doc` as a JSON blob in the content store; its descriptor."""
    import json
    data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    info = client.content.write(ref, data, labels=labels)
    return {"mediaType": media_type, "digest": info["digest"], "size": len(data)}


def checkpoint_layer(client: "Client", image: str) -> str:
    """The digest of the CRIU image in checkpoint image `image`."""
    import json
    record = _get_image(client, image)
    manifest = json.loads(_read_blob(client, record["target"]))
    for layer in manifest.get("layers") or []:
        if layer.get("mediaType") == CHECKPOINT_LAYER_TYPE:
            return layer["digest"]
    raise InvalidArgument(f"image {image} is not a checkpoint: it has no {CHECKPOINT_LAYER_TYPE} layer")


def _get_image(client: "Client", name: str) -> dict:
    # Not Images.get: on `run`'s path a retrying call would cost an import of tenacity.
    return client.call("metadata", "get_image", {"name": name})


def _read_blob(client: "Client", desc: dict) -> bytes:
    """A whole blob, in one request when its descriptor says it fits in one."""
    size = desc.get("size")
    if isinstance(size, int) and 0 < size <= Content.READ_CHUNK:
        _, frames = client.call("content", "read", {"digest": desc["digest"], "offset": 0, "size": size},
                                with_frames=True)
        data = frames[0] if frames else b""
        if len(data) == size:
            return data
    return client.content.read_all(desc["digest"])


def top_chain_id(diff_ids: list[str]) -> str:
    """The chainID of the whole layer stack (OCI image spec): the image's unpacked snapshot."""
    if len(diff_ids) == 1:
        return diff_ids[0]
    import hashlib                      # here: loading OpenSSL costs `run` of a one-layer image otherwise
    chain = ""
    for diff_id in diff_ids:
        chain = diff_id if not chain else "sha256:" + hashlib.sha256(f"{chain} {diff_id}".encode()).hexdigest()
    return chain


def _private_dir(prefix: str) -> str:
    """A new directory only we can enter, in $TMPDIR or /tmp: tempfile.mkdtemp without the
    import of tempfile, shutil and random that would cost every `run`."""
    base = os.environ.get("TMPDIR") or "/tmp"
    while True:
        path = os.path.join(base, prefix + os.urandom(6).hex())
        try:
            os.mkdir(path, 0o700)
            return path
        except FileExistsError:
            continue


def _rootfs_mounted(mounts: list[dict]):
    """A context manager: the snapshot's tree, read-only, on a private temporary directory, for
    reading the image's /etc/passwd and /etc/group; None where it cannot be mounted (this
    process is not root, or the mounts are of a kind not handled here): then only numeric users
    work. An overlay is mounted from its layers alone (upper first), which needs no workdir and
    cannot change the snapshot."""
    @contextlib.contextmanager
    def mounted():
        target = _private_dir("berth-rootfs-")
        try:
            if not _mount_read_only(mounts, target):
                yield None
                return
            try:
                yield target
            finally:
                _umount(target)
        finally:
            with contextlib.suppress(OSError):
                os.rmdir(target)
    return mounted()


_MS_RDONLY, _MS_REMOUNT, _MS_BIND, _MS_REC, _MNT_DETACH = 1, 32, 4096, 16384, 2


def _mount_read_only(mounts: list[dict], target: str) -> bool:
    import ctypes
    if len(mounts) != 1:
        return False
    m = mounts[0]
    options = list(m.get("options") or [])
    libc = ctypes.CDLL(None, use_errno=True)
    if m.get("type") == "bind":
        calls = [(m.get("source", ""), None, _MS_BIND | _MS_REC, None),
                 (None, None, _MS_BIND | _MS_REMOUNT | _MS_RDONLY, None)]
    elif m.get("type") == "overlay":
        lowers = [o[len("lowerdir="):] for o in options if o.startswith("lowerdir=")]
        upper = [o[len("upperdir="):] for o in options if o.startswith("upperdir=")]
        data = ",".join(["lowerdir=" + ":".join(upper + lowers), *(o for o in options if o == "index=off")])
        if not lowers or len(data) >= 4095:
            return False
        calls = [("overlay", "overlay", _MS_RDONLY, data)]
    else:
        return False
    for i, (source, fstype, flags, data) in enumerate(calls):
        enc = [None if v is None else v.encode() for v in (source, target, fstype, data)]
        if libc.mount(enc[0], enc[1], enc[2], ctypes.c_ulong(flags), enc[3]) != 0:
            if i:
                _umount(target)
            return False
    return True


def _umount(target: str) -> None:
    import ctypes
    ctypes.CDLL(None, use_errno=True).umount2(target.encode(), _MNT_DETACH)


class Container:
    """A container record and what is done with it: tasks, deletion with its snapshot."""

    def __init__(self, client: Client, record: dict):
        self.client = client
        self.record = record
        self.id = record["id"]

    @property
    def spec(self) -> dict:
        return self.record.get("spec") or {}

    def new_task(self, stdio: "Stdio | None" = None, *, stdin: str = "", stdout: str = "", stderr: str = "",
                 terminal: bool | None = None, checkpoint: str = "") -> "Task":
        """Create the container's task (its init created, not started). `stdio`: a Stdio (FIFOs it
        made), or give the paths; none means /dev/null. `terminal` defaults to the spec's.
        `checkpoint`: a checkpoint image (Task.checkpoint) the task is restored from when started."""
        if checkpoint:
            checkpoint = checkpoint_layer(self.client, checkpoint)
        if stdio is not None:
            stdin, stdout, stderr = stdio.stdin, stdio.stdout, stdio.stderr
            terminal = stdio.terminal if terminal is None else terminal
        if terminal is None:
            terminal = bool(self.spec.get("process", {}).get("terminal"))
        result = self.client.call("runtime", "create", {"container_id": self.id, "stdin": stdin, "stdout": stdout,
                                                        "stderr": stderr, "terminal": terminal,
                                                        "checkpoint": checkpoint}, timeout=120)
        return Task(self.client, self.id, result.get("pid", 0), stdio)

    def task(self) -> "Task":
        """The container's existing task."""
        state = self.client.tasks.state(self.id)
        return Task(self.client, self.id, state.get("pid", 0))

    def delete(self, snapshot: bool = True, check_task: bool = True) -> dict:
        """Delete the record, and with `snapshot` its snapshot (ctr's WithSnapshotCleanup). Refused
        while the container has a task."""
        if check_task:
            try:
                self.client.tasks.state(self.id)
            except NotFound:
                pass
            else:
                raise FailedPrecondition(f"container {self.id} has a task: delete the task first")
        if snapshot and self.record.get("snapshot_key"):
            with contextlib.suppress(NotFound):
                self.client.snapshots.remove(self.record["snapshot_key"], snapshotter=self.record["snapshotter"])
        return self.client.containers.delete(self.id)


class Tasks:
    """The tasks service: what runs, in this namespace."""

    def __init__(self, client: Client):
        self.client = client

    def list(self) -> list[dict]:
        return self.client.call("runtime", "list", timeout=60)

    def state(self, container_id: str) -> dict:
        return self.client.call("runtime", "state", {"container_id": container_id})

    def get(self, container_id: str) -> "Task":
        state = self.state(container_id)
        return Task(self.client, container_id, state.get("pid", 0))


class Task:
    """A container's task: its init process, and the processes exec'd into it."""

    exec_id = ""

    def __init__(self, client: Client, container_id: str, pid: int = 0, stdio: "Stdio | None" = None):
        self.client = client
        self.container_id = container_id
        self.pid = pid
        self.stdio = stdio

    def _call(self, method: str, args: dict | None = None, **kw):
        return self.client.call("runtime", method, dict(args or {}, container_id=self.container_id), **kw)

    def _exec_args(self) -> dict:
        return {"exec_id": self.exec_id} if self.exec_id else {}

    def start(self) -> int:
        self.pid = self._call("start", self._exec_args(), timeout=120).get("pid", 0)
        return self.pid

    def wait_result(self, timeout: float | None = None) -> dict:
        """{id, pid, exit_status, exited_at} once the process has exited."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            slice_ = WAIT_SLICE if deadline is None else min(WAIT_SLICE, deadline - time.monotonic())
            if slice_ <= 0:
                raise DeadlineExceeded(f"{self._describe()} did not exit within {timeout}s")
            try:
                return self._call("wait", self._exec_args(), timeout=max(1.0, slice_))
            except DeadlineExceeded:
                continue

    def wait(self, timeout: float | None = None) -> int:
        """The exit status (the shell's convention: 128 + the signal that killed it)."""
        return self.wait_result(timeout)["exit_status"]

    def kill(self, signal: int = 15, all: bool = False) -> None:
        self._call("kill", dict(self._exec_args(), signal=int(signal), all=all))

    def delete(self, drain: float = 5.0) -> dict:
        """Delete the stopped process; its exit. The task's delete unmounts its rootfs. The
        process's Stdio, if it was given one, has its output copied to the end (for up to `drain`
        seconds: with a terminal, the shim ends its copy here) and is closed."""
        result = self._call("delete", self._exec_args(), timeout=120)
        if self.stdio is not None:
            self.stdio.drain(drain)
            self.stdio.close()
        return result

    def resize(self, width: int, height: int) -> None:
        self._call("resize_pty", dict(self._exec_args(), width=width, height=height))

    def close_io(self) -> None:
        self._call("close_io", self._exec_args())

    def _describe(self) -> str:
        return f"exec {self.exec_id} of {self.container_id}" if self.exec_id else f"task {self.container_id}"

    # --- the task as a whole -----------------------------------------------------------------

    def state(self) -> dict:
        return self.client.tasks.state(self.container_id)

    def status(self) -> str:
        return self.state()["status"]

    def pause(self) -> None:
        self._call("pause")

    def resume(self) -> None:
        self._call("resume")

    def pids(self) -> list[dict]:
        return self._call("pids")

    def metrics(self) -> dict:
        return self._call("metrics")

    def update(self, resources: dict) -> None:
        self._call("update", {"resources": resources})

    def checkpoint(self, image: str | None = None, exit: bool = False) -> dict:
        """Checkpoint the task with CRIU into the content store, as an image named `image`
        (default `checkpoint/<id>:<unix time>`); its record. The image's manifest has the
        container's spec as config and the CRIU image as its one layer (containerd's media type);
        `Container.new_task(checkpoint=...)` restores from it. `exit` stops the task after."""
        import json
        name = image or f"checkpoint/{self.container_id}:{int(time.time())}"
        container = self.client.containers.get(self.container_id)
        with self.client.lease(expire=3600):
            layer = self._call("checkpoint", {"exit": exit}, timeout=600)
            config = _write_json_blob(self.client, f"checkpoint-config-{self.container_id}",
                                      CHECKPOINT_CONFIG_TYPE, container.get("spec") or {})
            manifest = {"schemaVersion": 2, "mediaType": MANIFEST_TYPE, "config": config, "layers": [layer],
                        "annotations": {"io.berth.checkpoint.container": self.container_id,
                                        "io.berth.checkpoint.image": container.get("image", ""),
                                        "io.berth.checkpoint.runtime": json.dumps(container.get("runtime"))}}
            target = _write_json_blob(self.client, f"checkpoint-manifest-{self.container_id}", MANIFEST_TYPE,
                                      manifest, labels={f"{GC_REF_CONTENT}.config": config["digest"],
                                                        f"{GC_REF_CONTENT}.l.0": layer["digest"]})
            return self.client.images.put(name, target)

    def exec(self, exec_id: str, args: list[str] | None = None, *, spec: dict | None = None,
             stdio: "Stdio | None" = None, stdin: str = "", stdout: str = "", stderr: str = "",
             terminal: bool | None = None, env: list[str] | None = None, cwd: str | None = None,
             user: dict | None = None) -> "Process":
        """Add a process to the task (created, not started). What `spec` leaves out comes from
        the container's own process (env, user, cwd, capabilities...), as `ctr task exec`."""
        spec = dict(spec or {})
        if args is not None:
            spec["args"] = list(args)
        if env is not None:
            spec["env"] = list(env)
        if cwd is not None:
            spec["cwd"] = cwd
        if user is not None:
            spec["user"] = user
        if stdio is not None:
            stdin, stdout, stderr = stdio.stdin, stdio.stdout, stdio.stderr
            terminal = stdio.terminal if terminal is None else terminal
        self.client.call("runtime", "exec", {"container_id": self.container_id, "exec_id": exec_id, "spec": spec,
                                             "stdin": stdin, "stdout": stdout, "stderr": stderr,
                                             "terminal": bool(terminal)})
        return Process(self.client, self.container_id, exec_id, stdio)


class Process(Task):
    """A process exec'd into a task: start, wait, kill, resize, close_io, delete."""

    def __init__(self, client: Client, container_id: str, exec_id: str, stdio: "Stdio | None" = None):
        super().__init__(client, container_id, 0, stdio)
        self.exec_id = exec_id


class Stdio:
    """A task's stdio as FIFOs in a private directory, and the copying to and from them
    (containerd's cio: NewFIFOSet, then the copy goroutines).

        stdio = Stdio(stdin=True)                       # FIFOs made and opened
        task = container.new_task(stdio)
        stdio.attach(sys.stdin.fileno(), 1, 2, on_stdin_eof=task.close_io)
        task.start(); status = task.wait(); stdio.drain(); task.delete()

    Our ends are opened before the task is created: stdin read-write (so opening never blocks),
    stdout and stderr read-only and non-blocking. The copies start in `attach`, after the shim
    has opened its ends: a FIFO read with no writer yet would look like the end of the output.
    At the end of our input the FIFO is closed and `on_stdin_eof` called (the task's close_io),
    so the process reads EOF. With a terminal, stderr is the terminal too: there is no stderr FIFO.
    """

    def __init__(self, stdin: bool = False, stdout: bool = True, stderr: bool = True, terminal: bool = False):
        self.terminal = terminal
        self.dir = _private_dir("berth-io-")
        self.fds: dict[str, int] = {}
        self.pumps: list[_Pump] = []
        self.stdin_pump: _Pump | None = None
        self.stdin = self.stdout = self.stderr = ""
        try:
            for name, wanted, flags in (("stdin", stdin, os.O_RDWR), ("stdout", stdout, os.O_RDONLY | os.O_NONBLOCK),
                                        ("stderr", stderr and not terminal, os.O_RDONLY | os.O_NONBLOCK)):
                if not wanted:
                    continue
                path = os.path.join(self.dir, name)
                os.mkfifo(path, 0o600)
                self.fds[name] = os.open(path, flags | os.O_CLOEXEC)
                setattr(self, name, path)
        except BaseException:
            self.close()
            raise

    def attach(self, stdin: int | None = None, stdout: int | None = 1, stderr: int | None = 2,
               on_stdin_eof: Callable[[], None] | None = None) -> None:
        """Start copying: our `stdin` into the process, its output to `stdout` and `stderr`."""
        if "stdout" in self.fds:
            self.pumps.append(_Pump("stdout", self.fds["stdout"], stdout))
        if "stderr" in self.fds:
            self.pumps.append(_Pump("stderr", self.fds["stderr"], stderr))
        if "stdin" in self.fds and stdin is not None:
            fifo = self.fds.pop("stdin")
            os.set_blocking(fifo, False)
            self.stdin_pump = _Pump("stdin", stdin, fifo, close_dst=True, on_eof=on_stdin_eof)
            self.stdin_pump.start()
        for pump in self.pumps:
            pump.start()

    def drain(self, timeout: float = 5.0) -> None:
        """Wait (up to `timeout`) for the output to reach its end, once the process has exited."""
        deadline = time.monotonic() + timeout
        for pump in self.pumps:
            pump.join(max(0.0, deadline - time.monotonic()))

    def close(self) -> None:
        """Stop copying, close our ends and remove the FIFOs."""
        for pump in [*self.pumps, *([self.stdin_pump] if self.stdin_pump else [])]:
            pump.stop()
            pump.join(1.0)
        self.pumps, self.stdin_pump = [], None
        for fd in self.fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds = {}
        for name in ("stdin", "stdout", "stderr"):
            with contextlib.suppress(OSError):
                os.unlink(os.path.join(self.dir, name))
        with contextlib.suppress(OSError):
            os.rmdir(self.dir)


class _Pump:
    """One copy, src -> dst, on a thread of its own until EOF or `stop` (a stop pipe wakes its poll)."""

    CHUNK = 64 << 10

    def __init__(self, name: str, src: int, dst: int | None, close_dst: bool = False,
                 on_eof: Callable[[], None] | None = None):
        self.name, self.src, self.dst, self.close_dst, self.on_eof = name, src, dst, close_dst, on_eof
        self.stop_r, self.stop_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name=f"stdio-{name}", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self.stop_w, b"x")

    def join(self, timeout: float | None) -> bool:
        if self.thread.ident is not None:
            self.thread.join(timeout)
        return not self.thread.is_alive()

    def _run(self) -> None:
        import select
        poller = select.poll()
        poller.register(self.src, select.POLLIN)
        poller.register(self.stop_r, select.POLLIN)
        dst = self.dst
        try:
            while True:
                events = dict(poller.poll())
                if self.stop_r in events:
                    return
                try:
                    data = os.read(self.src, self.CHUNK)
                except BlockingIOError:
                    continue
                except OSError as e:
                    if e.errno == 5:              # EIO: a terminal whose other side has gone
                        data = b""
                    else:
                        raise
                if not data:
                    break
                if dst is not None and not self._write_all(dst, data):
                    dst = None                    # nobody reads any more: drain, drop
            if self.close_dst and self.dst is not None:
                os.close(self.dst)
                self.dst = None
            if self.on_eof is not None:
                self.on_eof()
        except BaseException as e:
            self.error = e
        finally:
            if self.close_dst and self.dst is not None:
                with contextlib.suppress(OSError):
                    os.close(self.dst)

    def _write_all(self, fd: int, data: bytes) -> bool:
        import select
        view = memoryview(data)
        while view:
            try:
                n = os.write(fd, view)
            except BlockingIOError:
                select.select([self.stop_r], [fd], [])
                if select.select([self.stop_r], [], [], 0)[0]:
                    return False
                continue
            except OSError:
                return False
            view = view[n:]
        return True
