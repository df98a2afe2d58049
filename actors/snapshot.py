"""Snapshotters: the filesystem trees containers run on, built up in layers (containerd's
snapshots/overlay and snapshots/native, with its metadata layer's namespaces folded in).

A snapshot is a directory tree with a parent chain. It is *active* (writable, made by `prepare`),
a *view* (read-only, made by `view`) or *committed* (frozen by `commit`, the only kind that can be
a parent). Methods return mounts as data in containerd's shape -- the caller mounts them:

    overlay, active with parents   [{"type": "overlay", "source": "overlay", "options":
                                      ["index=off", "workdir=…", "upperdir=…", "lowerdir=p1:p2"]}]
    overlay, no parent             [{"type": "bind", "source": "<own fs>", "options": ["rw"|"ro", "rbind"]}]
    overlay, view of one layer     [{"type": "bind", "source": "<parent fs>", "options": ["ro", "rbind"]}]
    overlay, view of several       [{"type": "overlay", "source": "overlay", "options": ["index=off", "lowerdir=…"]}]
    native, always                 [{"type": "bind", "source": "<own fs>", "options": ["rw"|"ro", "rbind"]}]

`lowerdir` lists the nearest parent first. Native snapshots hold a full copy of their parent's tree
(`cp -a --reflink=auto`: owners, modes, xattrs, hard links, devices and times preserved).

Namespaces. A key names a snapshot within one namespace; the metastore maps (namespace, key) to a
backend snapshot with an integer id, and the id alone becomes a path. Parents are named by key in
the same namespace. A committed snapshot may be visible in several namespaces: the unpacker finds
a layer committed under its chainID anywhere (`find_committed`) and makes it visible in another
namespace (`link`) instead of applying the layer again. A backend snapshot and its directory go
when no key in any namespace refers to it and it has no children.

On disk, under `<berth root>/snapshots/<snapshotter>/`:

    metadata.db                 SQLite (WAL): backend snapshots, and the keys naming them
    snapshots/<id>/fs           the tree: overlay's upperdir, or native's whole copy
    snapshots/<id>/work         overlay's workdir (active snapshots only)
    snapshots/new-<random>/     a snapshot being built; renamed to <id> inside the transaction
                                that inserts its row, just before that transaction commits
    snapshots/rm-<random>/      a snapshot being deleted; renamed there after the transaction
                                that deleted its row has committed

So a crash leaves at most a directory with no row -- a `new-*` or `rm-*` directory, or an `<id>`
whose row never committed or was already deleted -- and `cleanup()`, run at startup, removes
those. It never leaves a row without its directory: the rename is made durable (fsync of the
directory) before the row is committed, and the row's deletion is durable before the rename.
"""
from __future__ import annotations

import contextlib
import ctypes
import gzip
import hashlib
import json
import logging
import os
import secrets
import shutil
import sqlite3
import stat
import subprocess
import tempfile
import threading
import time
import uuid
from typing import Annotated, Callable

from berth.labels import UNCOMPRESSED
from actors.differ import apply_layer, write_changes
from actors.durable import fsync_dir
from bus import failpoints, filters as filter_syntax
from bus.errors import (AlreadyExists, BerthError, FailedPrecondition, Internal, InvalidArgument, NotFound,
                        ResourceExhausted)
from bus.validate import Digest, Labels, check_digest, check_labels, check_name
from bus.worker import Actor, Call, method

log = logging.getLogger("berth.snapshot")

Publish = Callable[[str | None, str, dict], None]

MAX_KEY = 1024
ACTIVE, VIEW, COMMITTED = "active", "view", "committed"
NEW, RM = "new-", "rm-"           # prefixes of directories in flight; see the module docstring
INDEX_PARAM = "/sys/module/overlay/parameters/index"
DEFAULT = "overlayfs"

SCHEMA = """
CREATE TABLE IF NOT EXISTS snapshots (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,     -- never reused: a stray <id> dir is never adopted
    kind       TEXT NOT NULL,
    parent     INTEGER REFERENCES snapshots(id),
    size       INTEGER,                               -- usage, cached when committed
    inodes     INTEGER,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS snapshots_by_parent ON snapshots (parent);
CREATE TABLE IF NOT EXISTS keys (
    namespace  TEXT NOT NULL,
    key        TEXT NOT NULL,
    id         INTEGER NOT NULL REFERENCES snapshots(id),
    parent     TEXT NOT NULL DEFAULT '',               -- the parent's key in the same namespace
    labels     TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    PRIMARY KEY (namespace, key)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS keys_by_id ON keys (id);
CREATE INDEX IF NOT EXISTS keys_by_parent ON keys (namespace, parent);
CREATE INDEX IF NOT EXISTS keys_by_key ON keys (key);
"""


def check_key(value: str, what: str = "key") -> str:
    """Keys are client-chosen names (often `sha256:…` chain IDs); they never become paths."""
    return check_name(value, f"snapshot {what}", MAX_KEY)


Key = Annotated[str, check_key]


class Snapshotter:
    """One backend's snapshots and metastore. Subclasses say how a directory is populated and
    what mounts it gives; everything else -- keys, namespaces, crash safety -- is here.

    Thread-safe: `_lock` guards the database and the renames that go with its rows. Slow work
    (copying a parent tree, walking a tree for its usage, deleting one) runs outside it; a parent
    being copied is pinned so that it cannot be removed meanwhile.
    """

    name = ""
    mode = ""                          # the differ's mode for this backend: "overlay" or "native"

    def __init__(self, root: str, publish: Publish = lambda ns, topic, event: None,
                 clock: Callable[[], float] = time.time):
        self.root = root
        self.publish = publish
        self.clock = clock
        self.dir = os.path.join(root, "snapshots")
        os.makedirs(self.dir, mode=0o700, exist_ok=True)
        os.chmod(root, 0o700)
        self.db = sqlite3.connect(os.path.join(root, "metadata.db"), isolation_level=None,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")    # a removal's commit must be durable before its rename
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        self._lock = threading.RLock()
        self._pinned: dict[int, int] = {}             # id -> copies in progress reading its tree
        self._in_flight: set[str] = set()             # new-*/rm-* names this process is working on
        self.cleanup()

    def close(self) -> None:
        with self._lock:
            self.db.close()

    def stats(self) -> dict:
        with self._lock:
            count = self.db.execute("SELECT count(*) FROM snapshots").fetchone()[0]
            return {"snapshots": count, "in_flight": len(self._in_flight)}

    # --- creating ---------------------------------------------------------------------------

    def prepare(self, ns: str, key: str, parent: str = "", labels: dict | None = None) -> list[dict]:
        """A new active (writable) snapshot on top of committed `parent` (or empty)."""
        mounts = self._create(ns, key, parent, ACTIVE, labels)
        self._publish(ns, "/snapshot/prepare", {"key": key, "parent": parent, "snapshotter": self.name})
        return mounts

    def view(self, ns: str, key: str, parent: str = "", labels: dict | None = None) -> list[dict]:
        """A new read-only snapshot of committed `parent` (or empty)."""
        return self._create(ns, key, parent, VIEW, labels)

    def _create(self, ns: str, key: str, parent: str, kind: str, labels: dict | None) -> list[dict]:
        check_key(key)
        if parent:
            check_key(parent, "parent")
        labels = _clean_labels(labels)
        with self._lock:
            if self._key_row(ns, key) is not None:
                raise AlreadyExists(f"snapshot {key}: already exists")
            parent_id = self._committed_parent(ns, parent) if parent else None
            temp = self._claim(NEW)
            if parent_id is not None:
                self._pinned[parent_id] = self._pinned.get(parent_id, 0) + 1
        path = os.path.join(self.dir, temp)
        renamed = None
        try:
            os.mkdir(path, 0o700)
            self._populate(path, kind, parent_id)
            now = self.clock()
            with self._tx() as db:
                if self._key_row(ns, key) is not None:
                    raise AlreadyExists(f"snapshot {key}: already exists")
                if parent and self._committed_parent(ns, parent) != parent_id:
                    raise NotFound(f"parent snapshot {parent}: not found")
                id = db.execute("INSERT INTO snapshots (kind, parent, created_at) VALUES (?, ?, ?)",
                                (kind, parent_id, now)).lastrowid
                db.execute("INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?, ?)",
                           (ns, key, id, parent, _dump(labels), now, now))
                renamed = self._path(id)
                os.rename(path, renamed)
                fsync_dir(self.dir)
        except BaseException:
            # Not committed: nothing refers to the directory, wherever it got to.
            shutil.rmtree(renamed if renamed and os.path.exists(renamed) else path, ignore_errors=True)
            raise
        finally:
            with self._lock:
                self._in_flight.discard(temp)
                if parent_id is not None:
                    self._pinned[parent_id] -= 1
                    if not self._pinned[parent_id]:
                        del self._pinned[parent_id]
        return self._mounts(id, kind, self._chain(parent_id))

    def _committed_parent(self, ns: str, parent: str) -> int:
        row = self._key_row(ns, parent)
        if row is None:
            raise NotFound(f"parent snapshot {parent}: not found")
        if row["kind"] != COMMITTED:
            raise InvalidArgument(f"parent snapshot {parent} is {_a(row['kind'])} snapshot; "
                                  "only committed snapshots can be parents")
        return row["id"]

    def _populate(self, path: str, kind: str, parent_id: int | None) -> None:
        raise NotImplementedError

    # --- committing -------------------------------------------------------------------------

    def commit(self, ns: str, name: str, key: str, labels: dict | None = None) -> dict:
        """Freeze active snapshot `key` as committed `name` (same tree, same id; `key` is gone).
        Labels are replaced by `labels`, as containerd does; usage is measured and kept."""
        check_key(name, "name")
        check_key(key)
        labels = _clean_labels(labels)
        row = self._active(ns, key)
        if self._key_row(ns, name) is not None:
            raise AlreadyExists(f"snapshot {name}: already exists")
        usage = disk_usage(self._fs(row["id"]))
        now = self.clock()
        with self._tx() as db:
            again = self._active(ns, key)
            if again["id"] != row["id"]:
                raise NotFound(f"snapshot {key}: not found")
            if self._key_row(ns, name) is not None:
                raise AlreadyExists(f"snapshot {name}: already exists")
            db.execute("UPDATE snapshots SET kind = ?, size = ?, inodes = ? WHERE id = ?",
                       (COMMITTED, usage["size"], usage["inodes"], row["id"]))
            db.execute("DELETE FROM keys WHERE namespace = ? AND key = ?", (ns, key))
            db.execute("INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (ns, name, row["id"], row["parent"], _dump(labels), now, now))
            failpoints.fail("snapshot.commit")
        self._publish(ns, "/snapshot/commit", {"key": key, "name": name, "snapshotter": self.name})
        return self.stat(ns, name)

    def _active(self, ns: str, key: str) -> dict:
        row = self._require(ns, key)
        if row["kind"] != ACTIVE:
            raise FailedPrecondition(f"snapshot {key} is {_a(row['kind'])} snapshot; "
                                     "only active snapshots can be committed")
        return row

    # --- sharing across namespaces ----------------------------------------------------------

    def find_committed(self, name: str) -> int | None:
        """The id of a snapshot committed as `name` in any namespace (chain IDs name the same
        tree wherever they are), or None."""
        check_key(name, "name")
        with self._lock:
            row = self.db.execute("SELECT k.id FROM keys k JOIN snapshots s ON s.id = k.id "
                                  "WHERE k.key = ? AND s.kind = ? ORDER BY k.id LIMIT 1",
                                  (name, COMMITTED)).fetchone()
        return None if row is None else row[0]

    def link(self, ns: str, name: str, id: int, labels: dict | None = None) -> dict:
        """Make committed snapshot `id` visible in `ns` as `name`, which must be a name it is
        committed under elsewhere. Its parent must be visible in `ns` already (link a chain
        bottom up). Linking the same id under the same name again is a no-op."""
        check_key(name, "name")
        labels = _clean_labels(labels)
        if not isinstance(id, int) or isinstance(id, bool):
            raise InvalidArgument("snapshot id must be an integer")
        now = self.clock()
        with self._tx() as db:
            existing = self._key_row(ns, name)
            if existing is not None:
                if existing["id"] == id:
                    return self._info(existing)
                raise AlreadyExists(f"snapshot {name}: already exists")
            snap = db.execute("SELECT kind, parent FROM snapshots WHERE id = ?", (id,)).fetchone()
            named = db.execute("SELECT 1 FROM keys WHERE key = ? AND id = ? LIMIT 1", (name, id)).fetchone()
            if snap is None or snap[0] != COMMITTED or named is None:
                raise NotFound(f"no snapshot committed as {name} with id {id}")
            parent = ""
            if snap[1] is not None:
                found = db.execute("SELECT key FROM keys WHERE namespace = ? AND id = ? ORDER BY key LIMIT 1",
                                   (ns, snap[1])).fetchone()
                if found is None:
                    raise FailedPrecondition(f"snapshot {name}: its parent is not in namespace {ns}; "
                                             "link the parent first")
                parent = found[0]
            db.execute("INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (ns, name, id, parent, _dump(labels), now, now))
        return self.stat(ns, name)

    # --- removing ---------------------------------------------------------------------------

    def remove(self, ns: str, key: str) -> None:
        """Drop `key` from `ns`; the backend snapshot goes with its last key. Refused while a
        snapshot in `ns` names it as parent."""
        check_key(key)
        doomed: list[int] = []
        moved: list[str] = []
        with self._tx() as db:
            row = self._require(ns, key)
            child = db.execute("SELECT key FROM keys WHERE namespace = ? AND parent = ? ORDER BY key LIMIT 1",
                               (ns, key)).fetchone()
            if child is not None:
                raise FailedPrecondition(f"cannot remove snapshot {key}: snapshot {child[0]} is its child; "
                                         "remove the children first")
            others = db.execute("SELECT 1 FROM keys WHERE id = ? AND NOT (namespace = ? AND key = ?) LIMIT 1",
                                (row["id"], ns, key)).fetchone()
            if others is None and self._pinned.get(row["id"]):
                raise FailedPrecondition(f"cannot remove snapshot {key}: a new snapshot is being copied from it")
            db.execute("DELETE FROM keys WHERE namespace = ? AND key = ?", (ns, key))
            id = row["id"]
            while id is not None and self._unreferenced(id):
                parent = db.execute("SELECT parent FROM snapshots WHERE id = ?", (id,)).fetchone()[0]
                db.execute("DELETE FROM snapshots WHERE id = ?", (id,))
                doomed.append(id)
                id = parent
        try:
            with self._lock:
                for id in doomed:                    # the rows are gone for good; now the trees
                    name = self._claim(RM)
                    with contextlib.suppress(FileNotFoundError):
                        os.rename(self._path(id), os.path.join(self.dir, name))
                    moved.append(name)
            for name in moved:
                _remove_tree(os.path.join(self.dir, name))
        finally:
            with self._lock:
                self._in_flight.difference_update(moved)
        self._publish(ns, "/snapshot/remove", {"key": key, "snapshotter": self.name})

    def gc_sweep(self, remove: list[tuple[str, str]]) -> int:
        """Remove the keys GC left unmarked, children before parents (the unmarked keys of a
        namespace form whole subtrees: a marked child marks its parent)."""
        pending = {(ns, key) for ns, key in remove}
        removed = 0
        while pending:
            parents = {(r["namespace"], r["parent"]) for r in self.walk_all() if r["parent"]}
            ready = [k for k in pending if k not in parents]
            if not ready:
                log.warning("GC: %d snapshots still have children; left for the next run", len(pending))
                break
            for ns, key in ready:
                pending.discard((ns, key))
                with contextlib.suppress(NotFound, FailedPrecondition):
                    self.remove(ns, key)
                    removed += 1
        return removed

    def _unreferenced(self, id: int) -> bool:
        return (self.db.execute("SELECT 1 FROM keys WHERE id = ? LIMIT 1", (id,)).fetchone() is None
                and self.db.execute("SELECT 1 FROM snapshots WHERE parent = ? LIMIT 1", (id,)).fetchone() is None
                and not self._pinned.get(id))

    def cleanup(self) -> list[str]:
        """Remove every directory with no row: what a crash left in flight, or a tree whose row
        is gone. Anything mounted beneath one is detached first. Returns the names removed."""
        moved: list[str] = []
        with self._lock:
            ids = {str(r[0]) for r in self.db.execute("SELECT id FROM snapshots")}
            present = os.listdir(self.dir)
            stray = [n for n in present if n not in ids and n not in self._in_flight]
            for name in stray:
                log.info("%s: removing %s, which has no snapshot row", self.name, name)
                doomed = self._claim(RM)
                os.rename(os.path.join(self.dir, name), os.path.join(self.dir, doomed))
                moved.append(doomed)
        try:
            for name in moved:
                _remove_tree(os.path.join(self.dir, name))
        finally:
            with self._lock:
                self._in_flight.difference_update(moved)
        for id in sorted(ids - set(present), key=int):
            log.error("%s: snapshot %s has a row but no directory", self.name, id)
        return stray

    # --- reading ----------------------------------------------------------------------------

    def stat(self, ns: str, key: str) -> dict:
        check_key(key)
        return self._info(self._require(ns, key))

    def list(self, ns: str, filters: list[str] = ()) -> list[dict]:
        matcher = filter_syntax.parse(filters)
        with self._lock:
            rows = self.db.execute(_SELECT + " WHERE k.namespace = ? ORDER BY k.key", (ns,)).fetchall()
        return [info for info in map(self._info, map(_row, rows)) if matcher.match(info)]

    def mounts(self, ns: str, key: str) -> list[dict]:
        """The mounts of an active snapshot or a view, again."""
        check_key(key)
        row = self._require(ns, key)
        if row["kind"] == COMMITTED:
            raise FailedPrecondition(f"snapshot {key} is committed: only active snapshots and views "
                                     "have mounts; make a view of it")
        return self._mounts(row["id"], row["kind"], self._chain(self._parent_id(row["id"])))

    def usage(self, ns: str, key: str) -> dict:
        """{size, inodes} of the snapshot's own tree (for overlay, its upper directory): measured
        at commit for committed snapshots, walked now for the others."""
        check_key(key)
        row = self._require(ns, key)
        if row["kind"] == COMMITTED and row["size"] is not None:
            return {"size": row["size"], "inodes": row["inodes"]}
        return disk_usage(self._fs(row["id"]))

    def update(self, ns: str, key: str, labels: dict, fieldpaths: list[str] = ()) -> dict:
        """containerd's rule: `labels.k` fieldpaths change only those keys (empty or absent
        removes), `labels` or no fieldpaths at all replaces them all."""
        check_key(key)
        check_labels(labels)
        with self._tx() as db:
            row = self._require(ns, key)
            new = dict(row["labels"]) if fieldpaths else dict(labels)
            for path in fieldpaths:
                if path == "labels":
                    new = dict(labels)
                elif isinstance(path, str) and path.startswith("labels.") and len(path) > len("labels."):
                    new[path[len("labels."):]] = labels.get(path[len("labels."):], "")
                else:
                    raise InvalidArgument(f"cannot update {str(path)[:100]!r} field on snapshot {key}")
            row["labels"] = {k: v for k, v in new.items() if v}
            row["updated_at"] = self.clock()
            db.execute("UPDATE keys SET labels = ?, updated_at = ? WHERE namespace = ? AND key = ?",
                       (_dump(row["labels"]), row["updated_at"], ns, key))
        return self._info(row)

    def walk_all(self) -> list[dict]:
        """Every key in every namespace, for GC: {namespace, key, id, kind, parent, labels}."""
        with self._lock:
            rows = self.db.execute(_SELECT + " ORDER BY k.namespace, k.key").fetchall()
        return [{"namespace": r["namespace"], "key": r["key"], "id": r["id"], "kind": r["kind"],
                 "parent": r["parent"], "labels": r["labels"]} for r in map(_row, rows)]

    def upper_dir(self, ns: str, key: str) -> str:
        """The snapshot's own tree: where a layer is applied (overlay: the upperdir; native: the
        whole copy)."""
        check_key(key)
        return self._fs(self._require(ns, key)["id"])

    def lower_dirs(self, ns: str, key: str) -> list[str]:
        """The trees under this one, nearest first: overlay's lowerdir, the whole parent chain;
        native's, just the parent, whose tree is complete ([] for a snapshot with no parent).
        That is what the differ takes as `lowers` (overlay) and `lower` (write_changes)."""
        check_key(key)
        chain = self._chain(self._parent_id(self._require(ns, key)["id"]))
        return [self._fs(id) for id in (chain if self.mode == "overlay" else chain[:1])]

    # --- internals --------------------------------------------------------------------------

    def _mounts(self, id: int, kind: str, chain: list[int]) -> list[dict]:
        raise NotImplementedError

    @contextlib.contextmanager
    def _tx(self):
        with self._lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
                self.db.execute("COMMIT")
            except BaseException:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                raise

    def _claim(self, prefix: str) -> str:
        """A fresh in-flight directory name; the caller holds `_lock`."""
        while True:
            name = prefix + secrets.token_hex(8)
            if name not in self._in_flight and not os.path.lexists(os.path.join(self.dir, name)):
                self._in_flight.add(name)
                return name

    def _key_row(self, ns: str, key: str) -> dict | None:
        with self._lock:
            row = self.db.execute(_SELECT + " WHERE k.namespace = ? AND k.key = ?", (ns, key)).fetchone()
        return None if row is None else _row(row)

    def _require(self, ns: str, key: str) -> dict:
        row = self._key_row(ns, key)
        if row is None:
            raise NotFound(f"snapshot {key}: not found")
        return row

    def _parent_id(self, id: int) -> int | None:
        with self._lock:
            row = self.db.execute("SELECT parent FROM snapshots WHERE id = ?", (id,)).fetchone()
        return None if row is None else row[0]

    def _chain(self, parent_id: int | None) -> list[int]:
        """`parent_id` and its ancestors, nearest first."""
        chain: list[int] = []
        with self._lock:
            while parent_id is not None:
                chain.append(parent_id)
                row = self.db.execute("SELECT parent FROM snapshots WHERE id = ?", (parent_id,)).fetchone()
                parent_id = None if row is None else row[0]
        return chain

    def _info(self, row: dict) -> dict:
        return {"name": row["key"], "parent": row["parent"], "kind": row["kind"], "labels": row["labels"],
                "created_at": row["created_at"], "updated_at": row["updated_at"]}

    def _path(self, id: int) -> str:
        return os.path.join(self.dir, str(id))

    def _fs(self, id: int) -> str:
        return os.path.join(self.dir, str(id), "fs")

    def _publish(self, ns: str, topic: str, event: dict) -> None:
        """The change is made by now; a failure to announce it must not report it as failed."""
        try:
            self.publish(ns, topic, event)
        except Exception:
            log.exception("publishing %s for namespace %s failed", topic, ns)


class OverlaySnapshotter(Snapshotter):
    """Each snapshot holds only its own changes; mounts stack the parent chain under it."""

    name = "overlayfs"
    mode = "overlay"

    def __init__(self, root: str, *args, **kw):
        super().__init__(root, *args, **kw)
        self.index_off = os.path.exists(INDEX_PARAM)     # the module is loaded: the probe mounted

    def _populate(self, path: str, kind: str, parent_id: int | None) -> None:
        fs = os.path.join(path, "fs")
        os.mkdir(fs, 0o755)
        if kind == ACTIVE:
            os.mkdir(os.path.join(path, "work"), 0o711)
        if parent_id is not None:
            # The upper directory's root is the merged root: give it the owner of the layer below.
            st = os.lstat(self._fs(parent_id))
            os.lchown(fs, st.st_uid, st.st_gid)
            os.chmod(fs, stat.S_IMODE(st.st_mode))

    def _mounts(self, id: int, kind: str, chain: list[int]) -> list[dict]:
        if not chain:
            return [_bind(self._fs(id), kind == ACTIVE)]
        options = ["index=off"] if self.index_off else []
        if kind == ACTIVE:
            options += [f"workdir={self._path(id)}/work", f"upperdir={self._fs(id)}"]
        elif len(chain) == 1:
            return [_bind(self._fs(chain[0]), False)]
        options.append("lowerdir=" + ":".join(self._fs(p) for p in chain))
        return [{"type": "overlay", "source": "overlay", "options": options}]


class NativeSnapshotter(Snapshotter):
    """Each snapshot is a full copy of its parent's tree: slow to prepare, works anywhere."""

    name = "native"
    mode = "native"

    def _populate(self, path: str, kind: str, parent_id: int | None) -> None:
        fs = os.path.join(path, "fs")
        if parent_id is None:
            os.mkdir(fs, 0o755)
            return
        done = subprocess.run(["cp", "-a", "--reflink=auto", "--", self._fs(parent_id), fs],
                              capture_output=True, text=True)
        if done.returncode != 0:
            message = (done.stderr.strip().splitlines() or ["cp failed"])[-1]
            if "No space left" in message or "quota" in message.lower():
                raise ResourceExhausted(f"copying the parent snapshot: {message}")
            raise Internal(f"copying the parent snapshot: {message}")

    def _mounts(self, id: int, kind: str, chain: list[int]) -> list[dict]:
        return [_bind(self._fs(id), kind == ACTIVE)]


BACKENDS: dict[str, type[Snapshotter]] = {"overlayfs": OverlaySnapshotter, "native": NativeSnapshotter}


def open_snapshotters(root: str, publish: Publish = lambda ns, topic, event: None,
                      clock: Callable[[], float] = time.time) -> dict[str, Snapshotter]:
    """Every backend this machine supports, under `root` (`<berth root>/snapshots`). overlayfs is
    offered only if a test mount of it works here."""
    os.makedirs(root, mode=0o700, exist_ok=True)
    snapshotters: dict[str, Snapshotter] = {}
    why = probe_overlay(root)
    if why is None:
        snapshotters["overlayfs"] = OverlaySnapshotter(os.path.join(root, "overlayfs"), publish, clock)
    else:
        log.warning("overlayfs snapshotter unavailable: %s", why)
    snapshotters["native"] = NativeSnapshotter(os.path.join(root, "native"), publish, clock)
    return snapshotters


# --- filesystem helpers -----------------------------------------------------------------------

_SELECT = ("SELECT k.namespace, k.key, k.id, k.parent, k.labels, k.created_at, k.updated_at, "
           "s.kind, s.size, s.inodes FROM keys k JOIN snapshots s ON s.id = k.id")
_COLUMNS = ("namespace", "key", "id", "parent", "labels", "created_at", "updated_at", "kind", "size", "inodes")


def _row(values: tuple) -> dict:
    row = dict(zip(_COLUMNS, values))
    row["labels"] = json.loads(row["labels"])
    return row


def _dump(labels: dict) -> str:
    return json.dumps(labels, sort_keys=True)


def _clean_labels(labels: dict | None) -> dict:
    return {k: v for k, v in check_labels(labels or {}).items() if v}


def _a(kind: str) -> str:
    return f"an {kind}" if kind[0] in "aeiou" else f"a {kind}"


def _bind(source: str, writable: bool) -> dict:
    return {"type": "bind", "source": source, "options": ["rw" if writable else "ro", "rbind"]}


def disk_usage(path: str) -> dict:
    """Bytes allocated (st_blocks) and inodes under `path`, each inode counted once (hard
    links), staying on its filesystem; what vanishes during the walk is not counted."""
    try:
        top = os.lstat(path)
    except FileNotFoundError:
        return {"size": 0, "inodes": 0}
    seen = {top.st_ino}
    size = top.st_blocks * 512
    stack = [path]
    while stack:
        try:
            entries = os.scandir(stack.pop())
        except (FileNotFoundError, NotADirectoryError):
            continue
        with entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                if st.st_dev != top.st_dev:
                    continue
                if st.st_ino not in seen:
                    seen.add(st.st_ino)
                    size += st.st_blocks * 512
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
    return {"size": size, "inodes": len(seen)}


_libc = ctypes.CDLL(None, use_errno=True)
MNT_DETACH = 2


def _mount(source: str, target: str, fstype: str, flags: int = 0, data: str = "") -> None:
    if _libc.mount(source.encode(), target.encode(), fstype.encode(), ctypes.c_ulong(flags),
                   data.encode()) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def _unmount(target: str, flags: int = 0) -> None:
    if _libc.umount2(target.encode(), flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err), target)


def mounts_under(path: str) -> list[str]:
    """Mount points at or below `path` in this mount namespace, deepest first."""
    path = os.path.realpath(path)
    found = []
    with open("/proc/self/mountinfo", encoding="utf-8", errors="surrogateescape") as f:
        for line in f:
            point = _unescape_mountinfo(line.split()[4])
            if point == path or point.startswith(path + "/"):
                found.append(point)
    return sorted(found, key=len, reverse=True)


def _unescape_mountinfo(field: str) -> str:
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 3 < len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _remove_tree(path: str) -> None:
    """Delete a tree that nothing refers to any more; anything mounted in it is detached first,
    so the deletion stays on this tree."""
    for point in mounts_under(path):
        log.warning("detaching %s, left mounted inside %s", point, path)
        with contextlib.suppress(OSError):
            _unmount(point, MNT_DETACH)
    shutil.rmtree(path, ignore_errors=True)



def probe_overlay(root: str) -> str | None:
    """None if an overlay mount (two lowers, an upper) works under `root`, else why not. The
    probe lives in `root/.probe-*`; one a crash left behind is removed (and unmounted) first."""
    for name in os.listdir(root):
        if name.startswith(".probe-"):
            _remove_tree(os.path.join(root, name))
    if any(c in root for c in ",:"):
        return f"{root} contains ',' or ':', which overlay mount options cannot carry"
    path = os.path.join(root, f".probe-{secrets.token_hex(4)}")
    os.mkdir(path, 0o700)
    try:
        dirs = {name: os.path.join(path, name) for name in ("l1", "l2", "upper", "work", "merged")}
        for d in dirs.values():
            os.mkdir(d)
        options = f"lowerdir={dirs['l1']}:{dirs['l2']},upperdir={dirs['upper']},workdir={dirs['work']}"
        try:
            _mount("overlay", dirs["merged"], "overlay", 0, options)
        except OSError as e:
            return f"a test mount failed: {e.strerror}"
        _unmount(dirs["merged"])
        return None
    finally:
        _remove_tree(path)


# --- the actor --------------------------------------------------------------------------------

class SnapshotActor(Actor):
    """The snapshotters on the bus. Every method takes `snapshotter` (default overlayfs); one the
    machine does not offer is NotFound. Methods that copy, walk or delete trees are blocking."""

    name = "snapshot"

    def __init__(self, snapshotters: dict[str, Snapshotter], publisher=None, blobs: str = ""):
        self.backends = snapshotters
        self.publisher = publisher
        self.blobs = blobs               # the content store's blobs/sha256, read directly: they never change
        self.applied = 0

    def on_stop(self) -> None:
        for s in self.backends.values():
            s.close()
        if self.publisher is not None:
            self.publisher.close()

    def stats(self) -> dict:
        return dict({name: s.stats() for name, s in self.backends.items()}, applied=self.applied)

    def _get(self, snapshotter: str) -> Snapshotter:
        found = self.backends.get(snapshotter)
        if found is None:
            offered = ", ".join(sorted(self.backends))
            if snapshotter in BACKENDS:
                raise NotFound(f"snapshotter {snapshotter} is not available on this machine (offered: {offered})")
            raise NotFound(f"snapshotter {str(snapshotter)[:64]!r} not found (offered: {offered})")
        return found

    def _hold(self, call: Call, ns: str, snapshotter: str, key: str) -> None:
        """Put the snapshot in the request's lease before it exists, so GC never sees it unheld,
        and make sure its namespace exists: a lease is a row of its namespace, so one that holds
        the snapshot says the namespace is there, and only an unleased request asks for that."""
        if call.lease:
            self.call("metadata", "add_lease_resource",
                      {"lease": call.lease, "type": f"snapshots/{snapshotter}", "id": key}, namespace=ns)
        else:
            self.call("metadata", "ensure_namespace", {"name": ns})

    @method(blocking=True)
    def unpack_layer(self, ns: str, call: Call, chain_id: Digest, layer: dict, diff_id: Digest,
                     parent: str = "", snapshotter: str = DEFAULT) -> dict:
        """Make committed snapshot `chain_id` = `parent` + `layer`: reuse it if this namespace has
        it, share it if another has, else apply the layer (read straight from the content store)
        and check its diffID. `applied` says which."""
        s = self._get(snapshotter)
        self._hold(call, ns, snapshotter, chain_id)
        with contextlib.suppress(NotFound):
            s.stat(ns, chain_id)
            return {"chain_id": chain_id, "applied": False}
        shared = s.find_committed(chain_id)
        if shared is not None:
            s.link(ns, chain_id, shared)
            return {"chain_id": chain_id, "applied": False}
        digest = check_digest(layer.get("digest"), "layer digest")
        self.call("content", "info", {"digest": digest}, namespace=ns)     # visible in this namespace?
        key = f"extract-{uuid.uuid4().hex[:12]} {chain_id}"
        self._hold(call, ns, snapshotter, key)
        s.prepare(ns, key, parent)
        try:
            with open(os.path.join(self.blobs, digest[len("sha256:"):]), "rb") as blob:
                result = apply_layer(blob, s.upper_dir(ns, key), mode=s.mode,
                                     media_type=str(layer.get("mediaType", "")),
                                     lowers=s.lower_dirs(ns, key) if s.mode == "overlay" else None)
            failpoints.fail("snapshot.apply")       # applied, neither checked nor committed
            if result["diff_id"] != diff_id:
                raise InvalidArgument(f"layer {digest}: its content has diffID {result['diff_id']}, "
                                      f"but the image config says {diff_id}")
            s.commit(ns, chain_id, key, {"containerd.io/snapshot.ref": chain_id})
        except AlreadyExists:                       # applied meanwhile by another unpack
            s.remove(ns, key)
            return {"chain_id": chain_id, "applied": False}
        except BaseException:
            with contextlib.suppress(BerthError):
                s.remove(ns, key)
            raise
        self.applied += 1
        return {"chain_id": chain_id, "applied": True, "diff_id": diff_id}

    @method(blocking=True)
    def diff(self, ns: str, call: Call, key: Key, snapshotter: str = DEFAULT,
             labels: Labels | None = None) -> dict:
        """A gzip layer of what snapshot `key` changes over its parent, committed to the content
        store (labelled with its diffID); returns its descriptor."""
        s = self._get(snapshotter)
        lower = s.lower_dirs(ns, key) if s.mode == "native" else None
        scratch = os.path.join(s.root, "tmp")
        os.makedirs(scratch, mode=0o700, exist_ok=True)
        with tempfile.TemporaryFile(dir=scratch) as layer:
            with gzip.GzipFile(fileobj=layer, mode="wb", compresslevel=1, mtime=0) as compressed:
                changes = write_changes(lower, s.upper_dir(ns, key), compressed, mode=s.mode)
            size = layer.tell()
            layer.seek(0)
            hasher = hashlib.sha256()
            for chunk in iter(lambda: layer.read(1 << 20), b""):
                hasher.update(chunk)
            digest = "sha256:" + hasher.hexdigest()
            ref = f"diff-{uuid.uuid4().hex}"
            content = {"namespace": ns, "lease": call.lease}
            labels = dict(labels or {}, **{UNCOMPRESSED: changes["diff_id"]})
            with contextlib.suppress(AlreadyExists):        # the same changes were stored before
                self.call("content", "writer_open", {"ref": ref, "total": size, "expected": digest}, **content)
                layer.seek(0)
                offset = 0
                for chunk in iter(lambda: layer.read(1 << 20), b""):
                    self.call("content", "write", {"ref": ref, "offset": offset}, frames=[chunk], **content)
                    offset += len(chunk)
                self.call("content", "commit", {"ref": ref, "size": size, "expected": digest, "labels": labels},
                          **content)
        return {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest, "size": size,
                "diff_id": changes["diff_id"]}

    @method
    def gc_graph(self) -> dict:
        """Every snapshotter's keys, for metadata's GC: {snapshotter: [{namespace, key, parent, labels}]}."""
        return {name: [{k: r[k] for k in ("namespace", "key", "parent", "labels")} for r in s.walk_all()]
                for name, s in self.backends.items()}

    @method(blocking=True)
    def gc_sweep(self, snapshotter: str, remove: list[list[str]]) -> int:
        return self._get(snapshotter).gc_sweep([tuple(r) for r in remove])

    @method
    def snapshotters(self) -> list[dict]:
        return [{"name": name, "mode": s.mode, "root": s.root} for name, s in sorted(self.backends.items())]

    @method(blocking=True)
    def prepare(self, ns: str, key: Key, call: Call, parent: str = "", labels: Labels | None = None,
                snapshotter: str = DEFAULT) -> list[dict]:
        s = self._get(snapshotter)
        self._hold(call, ns, snapshotter, key)
        return s.prepare(ns, key, parent, labels)

    @method(blocking=True)
    def view(self, ns: str, key: Key, call: Call, parent: str = "", labels: Labels | None = None,
             snapshotter: str = DEFAULT) -> list[dict]:
        s = self._get(snapshotter)
        self._hold(call, ns, snapshotter, key)
        return s.view(ns, key, parent, labels)

    @method
    def mounts(self, ns: str, key: Key, snapshotter: str = DEFAULT) -> list[dict]:
        return self._get(snapshotter).mounts(ns, key)

    @method(blocking=True)
    def commit(self, ns: str, name: Key, key: Key, call: Call, labels: Labels | None = None,
               snapshotter: str = DEFAULT) -> dict:
        s = self._get(snapshotter)
        self._hold(call, ns, snapshotter, name)
        return s.commit(ns, name, key, labels)

    @method(blocking=True)
    def remove(self, ns: str, key: Key, snapshotter: str = DEFAULT) -> None:
        self._get(snapshotter).remove(ns, key)

    @method
    def stat(self, ns: str, key: Key, snapshotter: str = DEFAULT) -> dict:
        return self._get(snapshotter).stat(ns, key)

    @method
    def update(self, ns: str, key: Key, labels: Labels, fieldpaths: list[str] = (),
               snapshotter: str = DEFAULT) -> dict:
        return self._get(snapshotter).update(ns, key, labels, fieldpaths)

    @method
    def list(self, ns: str, filters: list[str] = (), snapshotter: str = DEFAULT) -> list[dict]:
        return self._get(snapshotter).list(ns, filters)

    @method(blocking=True)
    def usage(self, ns: str, key: Key, snapshotter: str = DEFAULT) -> dict:
        return self._get(snapshotter).usage(ns, key)

    @method(blocking=True)
    def cleanup(self, snapshotter: str = DEFAULT) -> list[str]:
        return self._get(snapshotter).cleanup()

    @method
    def walk_all(self, snapshotter: str = DEFAULT) -> list[dict]:
        return self._get(snapshotter).walk_all()

    @method
    def find_committed(self, name: Key, snapshotter: str = DEFAULT) -> int | None:
        return self._get(snapshotter).find_committed(name)

    @method(blocking=True)
    def link(self, ns: str, name: Key, id: int, call: Call, labels: Labels | None = None,
             snapshotter: str = DEFAULT) -> dict:
        s = self._get(snapshotter)
        self._hold(call, ns, snapshotter, name)
        return s.link(ns, name, id, labels)

    @method
    def upper_dir(self, ns: str, key: Key, snapshotter: str = DEFAULT) -> str:
        return self._get(snapshotter).upper_dir(ns, key)

    @method
    def lower_dirs(self, ns: str, key: Key, snapshotter: str = DEFAULT) -> list[str]:
        return self._get(snapshotter).lower_dirs(ns, key)


def build(config) -> SnapshotActor:
    from bus.pubsub import Publisher
    publisher = Publisher(config.address, config.path("spool", "snapshot"))
    try:
        snapshotters = open_snapshotters(config.path("snapshots"), publish=publisher.publish)
    except BaseException:
        publisher.close(timeout=0)
        raise
    return SnapshotActor(snapshotters, publisher, config.path("content", "blobs", "sha256"))
