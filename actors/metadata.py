"""The metadata service: namespaces, images, containers and leases.

`MetadataStore` is the logic over one SQLite database in WAL mode, every change a transaction;
`MetadataActor` is its wire adapter. Events go out through the publisher after each commit.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import secrets
import sqlite3
import threading
import time
from typing import Callable

import logging

import msgpack

from berth.labels import GC_EXPIRE, GC_REF_CONTENT, GC_REF_SNAPSHOT, GC_ROOT
from bus import failpoints
from bus.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from bus.filters import parse as parse_filters
from bus.validate import Identifier, Labels, check_digest, check_identifier, check_labels
from bus.worker import Actor, Call, method

log = logging.getLogger("berth.metadata")

Publish = Callable[[str | None, str, dict], None]

SCHEMA = """
CREATE TABLE IF NOT EXISTS namespaces (
    name TEXT PRIMARY KEY,
    labels TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS images (
    namespace TEXT NOT NULL REFERENCES namespaces(name),
    name TEXT NOT NULL,
    target TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (namespace, name)
);
CREATE TABLE IF NOT EXISTS containers (
    namespace TEXT NOT NULL REFERENCES namespaces(name),
    id TEXT NOT NULL,
    image TEXT NOT NULL DEFAULT '',
    runtime TEXT NOT NULL,
    spec BLOB,
    snapshotter TEXT NOT NULL DEFAULT '',
    snapshot_key TEXT NOT NULL DEFAULT '',
    labels TEXT NOT NULL DEFAULT '{}',
    extensions BLOB,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (namespace, id)
);
CREATE TABLE IF NOT EXISTS leases (
    namespace TEXT NOT NULL REFERENCES namespaces(name),
    id TEXT NOT NULL,
    labels TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    PRIMARY KEY (namespace, id)
);
CREATE TABLE IF NOT EXISTS lease_resources (
    namespace TEXT NOT NULL,
    lease TEXT NOT NULL,
    type TEXT NOT NULL,
    resource TEXT NOT NULL,
    PRIMARY KEY (namespace, lease, type, resource),
    FOREIGN KEY (namespace, lease) REFERENCES leases(namespace, id) ON DELETE CASCADE
);
"""

# Tables whose rows belong to a namespace; a namespace holding any of them cannot be deleted.
NAMESPACED_TABLES = ["images", "containers", "leases"]
EXPIRE_LABEL = GC_EXPIRE
INGEST_EXPIRY = 24 * 3600.0       # an unleased ingest idle this long is swept
RESOURCE_TYPES = re.compile(r"(content|ingests|snapshots/[a-z0-9]+)\Z")


def apply_fieldpaths(current: dict, labels: dict, fieldpaths: list[str]) -> dict:
    """containerd's update rule: named `labels.k` paths change alone (empty deletes); none, replace all."""
    if not fieldpaths:
        return {k: v for k, v in labels.items() if v != ""}
    merged = dict(current)
    for path in fieldpaths:
        if path == "labels":
            merged = dict(labels)
            continue
        key = path.removeprefix("labels.")
        if labels.get(key, ""):
            merged[key] = labels[key]
        else:
            merged.pop(key, None)
    return merged


class MetadataStore:
    def __init__(self, path: str, publish: Publish = lambda ns, topic, event: None, clock=time.time):
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        self.publish = publish
        self.clock = clock
        self.lock = threading.RLock()

    @contextlib.contextmanager
    def tx(self):
        """One transaction; the lock keeps the GC's thread and the loop out of each other's."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                failpoints.fail("metadata.commit")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise
            self.db.execute("COMMIT")

    def close(self) -> None:
        self.db.close()

    # --- namespaces ----------------------------------------------------------------------

    def create_namespace(self, name: str, labels: dict | None = None) -> dict:
        labels = check_labels(labels or {})
        now = self.clock()
        with self.tx() as db:
            if db.execute("SELECT 1 FROM namespaces WHERE name=?", (name,)).fetchone():
                raise AlreadyExists(f"namespace {name} already exists")
            db.execute("INSERT INTO namespaces VALUES (?,?,?,?)", (name, json.dumps(labels), now, now))
        self.publish(name, "/namespaces/create", {"name": name, "labels": labels})
        return self.get_namespace(name)

    @contextlib.contextmanager
    def tx_in(self, ns: str):
        """A transaction that first brings namespace `ns` into being if needed, as containerd does
        when an object is created in it."""
        with self.tx() as db:
            created = db.execute("SELECT 1 FROM namespaces WHERE name=?", (ns,)).fetchone() is None
            if created:
                now = self.clock()
                db.execute("INSERT INTO namespaces VALUES (?,?,?,?)", (ns, "{}", now, now))
            yield db
        if created:
            self.publish(ns, "/namespaces/create", {"name": ns, "labels": {}})

    def ensure_namespace(self, name: str) -> None:
        """What content and snapshots call before writing into a namespace, so it exists."""
        with self.tx_in(name):
            pass

    def get_namespace(self, name: str) -> dict:
        row = self.db.execute("SELECT name, labels, created_at, updated_at FROM namespaces WHERE name=?",
                              (name,)).fetchone()
        if row is None:
            raise NotFound(f"namespace {name} not found")
        return _namespace(row)

    def list_namespaces(self) -> list[dict]:
        rows = self.db.execute("SELECT name, labels, created_at, updated_at FROM namespaces ORDER BY name")
        return [_namespace(r) for r in rows]

    def update_namespace(self, name: str, labels: dict, fieldpaths: list[str] = ()) -> dict:
        check_labels(labels)
        with self.tx() as db:
            current = self.get_namespace(name)["labels"]
            merged = apply_fieldpaths(current, labels, list(fieldpaths))
            db.execute("UPDATE namespaces SET labels=?, updated_at=? WHERE name=?",
                       (json.dumps(merged), self.clock(), name))
        self.publish(name, "/namespaces/update", {"name": name, "labels": merged})
        return self.get_namespace(name)

    def delete_namespace(self, name: str) -> None:
        with self.tx() as db:
            self.get_namespace(name)
            for table in NAMESPACED_TABLES:
                if db.execute(f"SELECT 1 FROM {table} WHERE namespace=? LIMIT 1", (name,)).fetchone():
                    raise FailedPrecondition(f"namespace {name} must be empty, but it still has {table}")
            db.execute("DELETE FROM namespaces WHERE name=?", (name,))
        self.publish(name, "/namespaces/delete", {"name": name})


    # --- images -------------------------------------------------------------------------

    def create_image(self, ns: str, name: str, target: dict, labels: dict | None = None) -> dict:
        check_image_name(name)
        target, labels = check_descriptor(target), check_labels(labels or {})
        now = self.clock()
        with self.tx_in(ns) as db:
            if self._image_row(ns, name):
                raise AlreadyExists(f"image {name} already exists")
            db.execute("INSERT INTO images VALUES (?,?,?,?,?,?)",
                       (ns, name, json.dumps(target), json.dumps(labels), now, now))
        self.publish(ns, "/images/create", {"name": name, "labels": labels})
        return self.get_image(ns, name)

    def get_image(self, ns: str, name: str) -> dict:
        row = self._image_row(ns, name)
        if row is None:
            raise NotFound(f"image {name} not found")
        return _image(row)

    def list_images(self, ns: str, filters: list[str] = ()) -> list[dict]:
        match = parse_filters(filters).match
        rows = self.db.execute("SELECT * FROM images WHERE namespace=? ORDER BY name", (ns,))
        return [image for image in map(_image, rows) if match(image)]

    def update_image(self, ns: str, name: str, target: dict | None = None, labels: dict | None = None,
                     fieldpaths: list[str] = ()) -> dict:
        """Change the target and/or labels; with fieldpaths only those (`target`, `labels.k`) change."""
        with self.tx() as db:
            image = self.get_image(ns, name)
            paths = list(fieldpaths)
            if target is not None and (not paths or "target" in paths):
                image["target"] = check_descriptor(target)
            label_paths = [p for p in paths if p.startswith("labels")]
            if labels is not None and (label_paths or not paths):
                image["labels"] = apply_fieldpaths(image["labels"], check_labels(labels), label_paths)
            db.execute("UPDATE images SET target=?, labels=?, updated_at=? WHERE namespace=? AND name=?",
                       (json.dumps(image["target"]), json.dumps(image["labels"]), self.clock(), ns, name))
        self.publish(ns, "/images/update", {"name": name, "labels": image["labels"]})
        return self.get_image(ns, name)

    def put_image(self, ns: str, name: str, target: dict, labels: dict | None = None) -> dict:
        """Create the image, or point an existing one at a new target (what a pull does)."""
        try:
            return self.create_image(ns, name, target, labels)
        except AlreadyExists:
            return self.update_image(ns, name, target, labels, ["target"] + [f"labels.{k}" for k in labels or {}])

    def delete_image(self, ns: str, name: str) -> None:
        with self.tx() as db:
            if db.execute("DELETE FROM images WHERE namespace=? AND name=?", (ns, name)).rowcount == 0:
                raise NotFound(f"image {name} not found")
        self.publish(ns, "/images/delete", {"name": name})

    def _image_row(self, ns: str, name: str):
        return self.db.execute("SELECT * FROM images WHERE namespace=? AND name=?", (ns, name)).fetchone()

    # --- containers ---------------------------------------------------------------------

    def create_container(self, ns: str, id: str, runtime: dict, spec: dict | None = None, image: str = "",
                         snapshotter: str = "", snapshot_key: str = "", labels: dict | None = None,
                         extensions: dict | None = None, release_lease: str = "") -> dict:
        """With `release_lease`, that lease is deleted in the same transaction: the record now
        holds what the lease held for it (its snapshot), and GC sees one or the other."""
        check_identifier(id, "container id")
        labels = check_labels(labels or {})
        if not isinstance(runtime.get("name"), str) or not runtime["name"]:
            raise InvalidArgument("container runtime needs a name")
        if snapshot_key and not snapshotter:
            raise InvalidArgument("a snapshot key needs a snapshotter")
        now = self.clock()
        with self.tx_in(ns) as db:
            if self._container_row(ns, id):
                raise AlreadyExists(f"container {id} already exists")
            db.execute("INSERT INTO containers VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                       (ns, id, image, json.dumps(runtime), _pack(spec), snapshotter, snapshot_key,
                        json.dumps(labels), _pack(extensions or {}), now, now))
            if release_lease:
                db.execute("DELETE FROM leases WHERE namespace=? AND id=?", (ns, release_lease))
        self.publish(ns, "/containers/create", {"id": id, "image": image, "runtime": runtime})
        return self.get_container(ns, id)

    def get_container(self, ns: str, id: str) -> dict:
        row = self._container_row(ns, id)
        if row is None:
            raise NotFound(f"container {id} not found")
        return _container(row)

    def list_containers(self, ns: str, filters: list[str] = ()) -> list[dict]:
        match = parse_filters(filters).match
        rows = self.db.execute("SELECT * FROM containers WHERE namespace=? ORDER BY id", (ns,))
        return [c for c in map(_container, rows) if match(c)]

    def update_container(self, ns: str, id: str, labels: dict | None = None, spec: dict | None = None,
                         extensions: dict | None = None, fieldpaths: list[str] = ()) -> dict:
        """Labels, spec and extensions may change; image, runtime and snapshot may not (as containerd)."""
        with self.tx() as db:
            c = self.get_container(ns, id)
            label_paths = [p for p in fieldpaths if p.startswith("labels")]
            if labels is not None:
                c["labels"] = apply_fieldpaths(c["labels"], check_labels(labels), label_paths)
            if spec is not None:
                c["spec"] = spec
            if extensions is not None:
                c["extensions"].update(extensions)
            db.execute("UPDATE containers SET labels=?, spec=?, extensions=?, updated_at=? WHERE namespace=? AND id=?",
                       (json.dumps(c["labels"]), _pack(c["spec"]), _pack(c["extensions"]), self.clock(), ns, id))
        self.publish(ns, "/containers/update", {"id": id, "image": c["image"], "labels": c["labels"]})
        return self.get_container(ns, id)

    def delete_container(self, ns: str, id: str) -> dict:
        with self.tx() as db:
            c = self.get_container(ns, id)
            db.execute("DELETE FROM containers WHERE namespace=? AND id=?", (ns, id))
        self.publish(ns, "/containers/delete", {"id": id})
        return c

    def _container_row(self, ns: str, id: str):
        return self.db.execute("SELECT * FROM containers WHERE namespace=? AND id=?", (ns, id)).fetchone()

    # --- leases -------------------------------------------------------------------------

    def create_lease(self, ns: str, id: str | None = None, labels: dict | None = None,
                     expire: float | None = None) -> dict:
        """A lease keeps what it holds from GC; with `expire` (seconds from now) it lapses by itself."""
        id = check_identifier(id, "lease id") if id else f"berth-{secrets.token_hex(8)}"
        labels = check_labels(dict(labels or {}))
        if expire is not None:
            labels[EXPIRE_LABEL] = _rfc3339(self.clock() + expire)
        elif EXPIRE_LABEL in labels:
            _parse_rfc3339(labels[EXPIRE_LABEL])
        with self.tx_in(ns) as db:
            if db.execute("SELECT 1 FROM leases WHERE namespace=? AND id=?", (ns, id)).fetchone():
                raise AlreadyExists(f"lease {id} already exists")
            db.execute("INSERT INTO leases VALUES (?,?,?,?)", (ns, id, json.dumps(labels), self.clock()))
        return {"id": id, "labels": labels, "created_at": self.clock()}

    def list_leases(self, ns: str, filters: list[str] = ()) -> list[dict]:
        match = parse_filters(filters).match
        rows = self.db.execute("SELECT id, labels, created_at FROM leases WHERE namespace=? ORDER BY id", (ns,))
        leases = [{"id": r[0], "labels": json.loads(r[1]), "created_at": r[2]} for r in rows]
        return [lease for lease in leases if match(lease)]

    def delete_lease(self, ns: str, id: str) -> None:
        with self.tx() as db:
            if db.execute("DELETE FROM leases WHERE namespace=? AND id=?", (ns, id)).rowcount == 0:
                raise NotFound(f"lease {id} not found")

    def add_lease_resource(self, ns: str, lease: str, type: str, resource: str) -> None:
        _check_resource(type, resource)
        with self.tx() as db:
            self._lease_exists(db, ns, lease)
            db.execute("INSERT OR IGNORE INTO lease_resources VALUES (?,?,?,?)", (ns, lease, type, resource))

    def delete_lease_resource(self, ns: str, lease: str, type: str, resource: str) -> None:
        with self.tx() as db:
            self._lease_exists(db, ns, lease)
            db.execute("DELETE FROM lease_resources WHERE namespace=? AND lease=? AND type=? AND resource=?",
                       (ns, lease, type, resource))

    def list_lease_resources(self, ns: str, lease: str) -> list[dict]:
        self._lease_exists(self.db, ns, lease)
        rows = self.db.execute("SELECT type, resource FROM lease_resources WHERE namespace=? AND lease=? "
                               "ORDER BY type, resource", (ns, lease))
        return [{"type": r[0], "id": r[1]} for r in rows]

    # --- garbage collection roots ---------------------------------------------------------

    def gc_roots(self) -> dict:
        """Drop expired leases, then name every namespace's roots:
        {ns: {"content": {digest}, "ingests": {ref}, "snapshots": {(snapshotter, key)}}}."""
        roots: dict[str, dict[str, set]] = {}

        def of(ns: str) -> dict[str, set]:
            return roots.setdefault(ns, {"content": set(), "ingests": set(), "snapshots": set()})
        with self.tx() as db:
            now = self.clock()
            for ns, id, labels in db.execute("SELECT namespace, id, labels FROM leases").fetchall():
                if lease_expired(json.loads(labels), now):
                    db.execute("DELETE FROM leases WHERE namespace=? AND id=?", (ns, id))
            for ns, target in db.execute("SELECT namespace, target FROM images"):
                of(ns)["content"].add(json.loads(target)["digest"])
            for ns, snapshotter, key, labels in db.execute(
                    "SELECT namespace, snapshotter, snapshot_key, labels FROM containers"):
                if key:
                    of(ns)["snapshots"].add((snapshotter, key))
                of(ns)["content"].update(gc_refs(json.loads(labels)))
            for ns, kind, resource in db.execute("SELECT namespace, type, resource FROM lease_resources"):
                if kind == "content":
                    of(ns)["content"].add(resource)
                elif kind == "ingests":
                    of(ns)["ingests"].add(resource)
                else:
                    of(ns)["snapshots"].add((kind.removeprefix("snapshots/"), resource))
        return roots

    def _lease_exists(self, db, ns: str, lease: str) -> None:
        if db.execute("SELECT 1 FROM leases WHERE namespace=? AND id=?", (ns, lease)).fetchone() is None:
            raise NotFound(f"lease {lease} not found")


def _namespace(row) -> dict:
    return {"name": row[0], "labels": json.loads(row[1]), "created_at": row[2], "updated_at": row[3]}


def _image(row) -> dict:
    return {"name": row[1], "target": json.loads(row[2]), "labels": json.loads(row[3]),
            "created_at": row[4], "updated_at": row[5]}


def _container(row) -> dict:
    return {"id": row[1], "image": row[2], "runtime": json.loads(row[3]), "spec": _unpack(row[4]),
            "snapshotter": row[5], "snapshot_key": row[6], "labels": json.loads(row[7]),
            "extensions": _unpack(row[8]) or {}, "created_at": row[9], "updated_at": row[10]}


def _pack(value) -> bytes | None:
    return None if value is None else msgpack.packb(value, use_bin_type=True)


def _unpack(blob):
    return None if blob is None else msgpack.unpackb(blob, raw=False, strict_map_key=False)


def check_image_name(name: str) -> str:
    if not isinstance(name, str) or not name or len(name) > 512 or any(c.isspace() or ord(c) < 32 for c in name):
        raise InvalidArgument(f"image name {str(name)[:100]!r} is not valid")
    return name


def check_descriptor(desc: dict) -> dict:
    """An OCI descriptor: mediaType, digest and size are required and checked."""
    if not isinstance(desc, dict):
        raise InvalidArgument("descriptor must be a map")
    media_type, size = desc.get("mediaType"), desc.get("size")
    if not isinstance(media_type, str) or not media_type or len(media_type) > 256:
        raise InvalidArgument("descriptor mediaType must be a non-empty string")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise InvalidArgument("descriptor size must be a non-negative integer")
    check_digest(desc.get("digest"), "descriptor digest")
    out = {"mediaType": media_type, "digest": desc["digest"], "size": size}
    if desc.get("annotations"):
        out["annotations"] = check_labels(desc["annotations"], "annotations")
    if desc.get("platform"):
        out["platform"] = desc["platform"]
    return out


def _check_resource(type: str, resource: str) -> None:
    if not isinstance(type, str) or not RESOURCE_TYPES.match(type):
        raise InvalidArgument(f"lease resource type {str(type)[:64]!r} is not content, ingests or snapshots/<name>")
    if type == "content":
        check_digest(resource)
    elif not isinstance(resource, str) or not resource or len(resource) > 1024:
        raise InvalidArgument("lease resource id must be a non-empty string")


def _rfc3339(ts: float) -> str:
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse_rfc3339(text: str) -> float:
    try:
        return datetime.datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        raise InvalidArgument(f"{EXPIRE_LABEL} {text!r} is not an RFC 3339 time") from None


def gc_refs(labels: dict) -> set[str]:
    """The digests a set of labels holds on to (`containerd.io/gc.ref.content…` values)."""
    return {v for k, v in labels.items() if k.startswith(GC_REF_CONTENT)}


def union_roots(*reads: dict[str, dict[str, set]]) -> dict[str, dict[str, set]]:
    """The roots of several reads of `gc_roots`, together."""
    roots: dict[str, dict[str, set]] = {}
    for read in reads:
        for ns, kinds in read.items():
            mine = roots.setdefault(ns, {kind: set() for kind in kinds})
            for kind, members in kinds.items():
                mine[kind] |= members
    return roots


def mark(graph: dict[str, dict[str, dict]], roots: dict[str, dict[str, set]]) -> dict[str, set[str]]:
    """Everything reachable, per namespace: from the roots and `gc.root`-labelled blobs, along
    the blobs' `gc.ref.content` labels (index -> manifests, manifest -> config and layers)."""
    live: dict[str, set[str]] = {}
    for ns, blobs in graph.items():
        seen: set[str] = set()
        stack = [d for d in roots.get(ns, {}).get("content", ()) if d in blobs]
        stack += [d for d, labels in blobs.items() if GC_ROOT in labels]
        while stack:
            digest = stack.pop()
            if digest in seen:
                continue
            seen.add(digest)
            stack.extend(d for d in gc_refs(blobs[digest]) if d in blobs and d not in seen)
        live[ns] = seen
    return live


def snapshot_roots(live_blobs: dict[str, set[str]], graph: dict[str, dict[str, dict]],
                   roots: dict[str, dict[str, set]]) -> set[tuple[str, str, str]]:
    """(snapshotter, ns, key) held by records and leases, or named by a live blob's
    `containerd.io/gc.ref.snapshot.<snapshotter>` label (an image config -> its top chainID)."""
    held = {(snapshotter, ns, key) for ns, r in roots.items() for snapshotter, key in r["snapshots"]}
    for ns, digests in live_blobs.items():
        for digest in digests:
            for label, value in graph[ns][digest].items():
                if label.startswith(GC_REF_SNAPSHOT):
                    held.add((label[len(GC_REF_SNAPSHOT):], ns, value))
    return held


def mark_snapshots(snapshots: dict[str, list[dict]], held: set[tuple[str, str, str]]) -> set[tuple[str, str, str]]:
    """The held snapshots and `gc.root`-labelled ones, and every parent up their chains."""
    live: set[tuple[str, str, str]] = set()
    for snapshotter, rows in snapshots.items():
        by_key = {(r["namespace"], r["key"]): r for r in rows}
        stack = [(ns, key) for name, ns, key in held if name == snapshotter and (ns, key) in by_key]
        stack += [k for k, r in by_key.items() if GC_ROOT in r["labels"]]
        while stack:
            ns, key = stack.pop()
            if (snapshotter, ns, key) in live:
                continue
            live.add((snapshotter, ns, key))
            parent = by_key[(ns, key)]["parent"]
            if parent and (ns, parent) in by_key:
                stack.append((ns, parent))
    return live


def lease_expired(labels: dict, now: float) -> bool:
    expire = labels.get(EXPIRE_LABEL)
    return expire is not None and _parse_rfc3339(expire) <= now


class MetadataActor(Actor):
    """Also the GC coordinator: it marks from its own records and the graph of labels the
    content store reports, then has the content store sweep what is unmarked."""

    name = "metadata"
    GC_DELAY = 1.0                   # a GC runs this long after the last deletion

    def __init__(self, store: MetadataStore, publisher=None):
        self.store = store
        self.publisher = publisher
        self.gc_lock = threading.Lock()
        self.gc_due: float | None = None
        self.gc_runs = 0

    def on_start(self) -> None:
        self.worker.every(0.25, self._gc_if_due)

    def stats(self) -> dict:
        return {"gc_runs": self.gc_runs, "gc_due": self.gc_due is not None}

    def _schedule_gc(self) -> None:
        self.gc_due = time.monotonic() + self.GC_DELAY

    def _gc_if_due(self) -> None:
        if self.gc_due is not None and time.monotonic() >= self.gc_due and not self.gc_lock.locked():
            self.gc_due = None
            self.worker.pool.submit(self._collect_logged)

    def _collect_logged(self) -> None:
        try:
            self.collect()
        except Exception:
            log.exception("scheduled GC failed; it runs again after the next deletion")

    def collect(self) -> dict:
        """One whole GC: mark here, sweep in the content store. Runs on a pool thread."""
        with self.gc_lock:
            started = time.monotonic()
            roots = self.store.gc_roots()
            failpoints.fail("metadata.gc")
            graph = self.call("content", "gc_graph")
            snapshots = self.call("snapshot", "gc_graph")
            # A blob or snapshot made while the graphs were read is in its lease before it
            # exists, so the roots read again now hold it; the first read keeps what was
            # released meanwhile.
            roots = union_roots(roots, self.store.gc_roots())
            live = mark(graph, roots)
            remove = [[ns, d] for ns, blobs in graph.items() for d in blobs if d not in live[ns]]
            leased = [[ns, ref] for ns, r in roots.items() for ref in r["ingests"]]
            live_snapshots = mark_snapshots(snapshots, snapshot_roots(live, graph, roots))
            removed_snapshots = 0
            for snapshotter, rows in snapshots.items():
                doomed = [[r["namespace"], r["key"]] for r in rows
                          if (snapshotter, r["namespace"], r["key"]) not in live_snapshots]
                if doomed:
                    removed_snapshots += self.call("snapshot", "gc_sweep",
                                                   {"snapshotter": snapshotter, "remove": doomed}, timeout=600)
            swept = self.call("content", "gc_sweep", {"remove": remove, "leased_ingests": leased,
                                                       "ingest_expiry": INGEST_EXPIRY}, timeout=300)
            self.gc_runs += 1
            return {"content": swept, "snapshots": removed_snapshots,
                    "seconds": round(time.monotonic() - started, 3)}

    @method(blocking=True)
    def gc(self) -> dict:
        return self.collect()

    def on_stop(self) -> None:
        if self.publisher is not None:
            self.publisher.close()
        self.store.close()

    @method
    def create_namespace(self, name: Identifier, labels: Labels | None = None) -> dict:
        return self.store.create_namespace(name, labels)

    @method
    def ensure_namespace(self, name: Identifier) -> None:
        self.store.ensure_namespace(name)

    @method
    def get_namespace(self, name: Identifier) -> dict:
        return self.store.get_namespace(name)

    @method
    def list_namespaces(self) -> list[dict]:
        return self.store.list_namespaces()

    @method
    def update_namespace(self, name: Identifier, labels: Labels, fieldpaths: list[str] | None = None) -> dict:
        return self.store.update_namespace(name, labels, fieldpaths or [])

    @method(blocking=True)
    def delete_namespace(self, name: Identifier) -> None:
        """Refused while the namespace holds records here, or content or snapshots elsewhere."""
        self.store.get_namespace(name)
        if self.call("content", "list", namespace=name):
            raise FailedPrecondition(f"namespace {name} must be empty, but it still has content")
        for backend in self.call("snapshot", "snapshotters"):
            if self.call("snapshot", "list", {"snapshotter": backend["name"]}, namespace=name):
                raise FailedPrecondition(f"namespace {name} must be empty, but it still has "
                                         f"{backend['name']} snapshots")
        self.store.delete_namespace(name)

    @method
    def create_image(self, ns, name: str, target: dict, labels: Labels | None = None) -> dict:
        return self.store.create_image(ns, name, target, labels)

    @method
    def get_image(self, ns, name: str) -> dict:
        return self.store.get_image(ns, name)

    @method
    def list_images(self, ns, filters: list[str] | None = None) -> list[dict]:
        return self.store.list_images(ns, filters or [])

    @method
    def update_image(self, ns, name: str, target: dict | None = None, labels: Labels | None = None,
                     fieldpaths: list[str] | None = None) -> dict:
        return self.store.update_image(ns, name, target, labels, fieldpaths or [])

    @method
    def put_image(self, ns, name: str, target: dict, labels: Labels | None = None) -> dict:
        return self.store.put_image(ns, name, target, labels)

    @method(blocking=True)
    def delete_image(self, ns, name: str, sync: bool = False) -> None:
        self.store.delete_image(ns, name)
        self._collect_or_schedule(sync)

    def _collect_or_schedule(self, sync: bool) -> None:
        if sync:
            self.collect()
        else:
            self._schedule_gc()

    @method
    def create_container(self, ns, id: Identifier, runtime: dict, call: Call, spec: dict | None = None,
                         image: str = "", snapshotter: str = "", snapshot_key: str = "",
                         labels: Labels | None = None, extensions: dict | None = None,
                         release_lease: bool = False) -> dict:
        """`release_lease`: the request's lease only guarded what this record now references
        (the snapshot made for it): delete it with the record's creation, a request saved."""
        return self.store.create_container(ns, id, runtime, spec, image, snapshotter, snapshot_key, labels,
                                           extensions, release_lease=(call.lease or "") if release_lease else "")

    @method
    def get_container(self, ns, id: Identifier) -> dict:
        return self.store.get_container(ns, id)

    @method
    def list_containers(self, ns, filters: list[str] | None = None) -> list[dict]:
        return self.store.list_containers(ns, filters or [])

    @method
    def update_container(self, ns, id: Identifier, labels: Labels | None = None, spec: dict | None = None,
                         extensions: dict | None = None, fieldpaths: list[str] | None = None) -> dict:
        return self.store.update_container(ns, id, labels, spec, extensions, fieldpaths or [])

    @method
    def delete_container(self, ns, id: Identifier) -> dict:
        container = self.store.delete_container(ns, id)
        self._schedule_gc()
        return container

    @method
    def create_lease(self, ns, id: Identifier | None = None, labels: Labels | None = None,
                     expire: float | None = None) -> dict:
        return self.store.create_lease(ns, id, labels, expire)

    @method
    def list_leases(self, ns, filters: list[str] | None = None) -> list[dict]:
        return self.store.list_leases(ns, filters or [])

    @method(blocking=True)
    def delete_lease(self, ns, id: Identifier, sync: bool = False) -> None:
        self.store.delete_lease(ns, id)
        self._collect_or_schedule(sync)

    @method
    def add_lease_resource(self, ns, lease: Identifier, type: str, id: str) -> None:
        self.store.add_lease_resource(ns, lease, type, id)

    @method
    def delete_lease_resource(self, ns, lease: Identifier, type: str, id: str) -> None:
        self.store.delete_lease_resource(ns, lease, type, id)

    @method
    def list_lease_resources(self, ns, lease: Identifier) -> list[dict]:
        return self.store.list_lease_resources(ns, lease)


def build(config) -> MetadataActor:
    from bus.pubsub import Publisher
    publisher = Publisher(config.address, config.path("spool", "metadata"))
    return MetadataActor(MetadataStore(config.path("metadata", "meta.db"), publisher.publish), publisher)
