"""The content store: blobs addressed by digest, and ingests (resumable writes verified on commit).

`ContentStore` is the logic (containerd's local content service, with its metadata layer's
namespaces folded in); `ContentActor` is the thin adapter that puts it on the bus.

On disk, under `<root>/content`:

    blobs/sha256/<hex>          committed blobs, 0444, one file whichever namespaces see it
    ingest/<sha256(ns/ref)>/    one write in progress: ref, data, startedat, updatedat,
                                total, expected, and `lock` (flock'ed by the writing process)
    meta.db                     SQLite (WAL): which namespace sees which blob, with its labels

Writes in progress are recorded only by their ingest directories: a directory names its owner by
its `ref` file and by being named after the hash of (namespace, ref), so after a crash there is no
second record to disagree with. Committed blobs are a file plus a row per namespace; the file is
renamed into place before the row is written and unlinked after the last row is gone, so a crash
can leave an unreferenced file (for GC) but never a row without its file.
"""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sqlite3
import stat
import threading
import time
import uuid
from typing import Annotated, Callable

from berth.labels import GC_PREFIX
from actors.durable import fsync_dir
from actors.transfer import PlatformMatcher, is_index
from bus import failpoints, filters as filter_syntax
from bus.errors import (AlreadyExists, FailedPrecondition, InvalidArgument, NotFound,
                        ResourceExhausted, Unavailable)
from bus.pubsub import Publisher
from bus.validate import Digest, Labels, check_digest, check_labels, check_name
from bus.worker import Actor, Bulk, Call, method

log = logging.getLogger("berth.content")

MAX_READ = 4 << 20          # bytes per read call; the caller loops
MAX_REF = 256
HASH_CHUNK = 1 << 20
STALE_WRITER = 120.0        # seconds idle after which another writer_open may take a ref over
TMP = ".tmp-"               # prefix of anything a crash may leave half-done; removed at startup
_HEX64 = re.compile(r"[0-9a-f]{64}")

SCHEMA = """
CREATE TABLE IF NOT EXISTS blobs (
    namespace  TEXT NOT NULL,
    digest     TEXT NOT NULL,
    size       INTEGER NOT NULL,
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    labels     TEXT NOT NULL DEFAULT '{}',
    PRIMARY KEY (namespace, digest)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS blobs_by_digest ON blobs (digest);
"""


def check_ref(value: str, what: str = "ref") -> str:
    return check_name(value, what, MAX_REF)


Ref = Annotated[str, check_ref]


@dataclasses.dataclass(eq=False)
class _Writer:
    """An open ingest. `mutex` serialises its operations; `closed` marks one no longer usable."""
    ns: str
    ref: str
    path: str
    lock_fd: int = -1
    fd: int = -1
    hasher: object = None
    offset: int = 0
    total: int | None = None
    expected: str | None = None
    started_at: float = 0.0
    updated_at: float = 0.0
    closed: bool = False
    owner: str | None = None       # the writing process, as process_identity() names it
    mutex: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def status(self) -> dict:
        return {"ref": self.ref, "offset": self.offset, "total": self.total, "expected": self.expected,
                "started_at": self.started_at, "updated_at": self.updated_at}


class ContentStore:
    def __init__(self, root: str,
                 publish: Callable[[str, str, dict], None] = lambda ns, topic, event: None,
                 clock: Callable[[], float] = time.time, stale_writer: float = STALE_WRITER):
        self.root = root
        self.publish = publish
        self.clock = clock
        self.stale_writer = stale_writer
        self.blobs = os.path.join(root, "blobs", "sha256")
        self.ingests = os.path.join(root, "ingest")
        for path in (self.blobs, self.ingests):
            os.makedirs(path, mode=0o700, exist_ok=True)
        self._clean_temporaries()
        self.db = sqlite3.connect(os.path.join(root, "meta.db"), isolation_level=None,
                                  check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA synchronous=FULL")       # a commit's row must survive power loss too
        self.db.executescript(SCHEMA)
        # `_meta` guards the database and the blob files' existence together: a commit in one
        # namespace must not find a file on disk that a delete in another is about to unlink.
        self._meta = threading.RLock()
        self._writers_lock = threading.Lock()          # never held while waiting for a writer's mutex
        self._writers: dict[tuple[str, str], _Writer] = {}

    def close(self) -> None:
        with self._writers_lock:
            writers, self._writers = list(self._writers.values()), {}
        for w in writers:
            with w.mutex:
                _close(w)
        with self._meta:
            self.db.close()

    def stats(self) -> dict:
        with self._writers_lock:
            return {"writers": sum(not w.closed for w in self._writers.values())}

    # --- blobs ------------------------------------------------------------------------------

    def info(self, ns: str, digest: str) -> dict:
        check_digest(digest)
        info = self._row(ns, digest)
        if info is None:
            raise NotFound(f"content digest {digest}: not found")
        return info

    def list(self, ns: str, filters: list[str] = ()) -> list[dict]:
        matcher = filter_syntax.parse(filters)
        with self._meta:
            rows = self.db.execute("SELECT digest, size, created_at, updated_at, labels FROM blobs "
                                   "WHERE namespace = ? ORDER BY digest", (ns,)).fetchall()
        return [info for info in map(_info, rows) if matcher.match(info)]

    def delete(self, ns: str, digest: str) -> None:
        path = self._blob_path(digest)
        with self._meta:
            gone = self.db.execute("DELETE FROM blobs WHERE namespace = ? AND digest = ?", (ns, digest))
            if gone.rowcount == 0:
                raise NotFound(f"content digest {digest}: not found")
            if self.db.execute("SELECT 1 FROM blobs WHERE digest = ? LIMIT 1", (digest,)).fetchone() is None:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        self._publish(ns, "/content/delete", {"digest": digest})

    def update(self, ns: str, digest: str, labels: dict, fieldpaths: list[str] = ()) -> dict:
        """containerd's semantics: fieldpaths `labels.k` change only those keys (to "" or absent:
        removed), `labels` replaces them all; no fieldpaths replaces them all too."""
        check_digest(digest)
        check_labels(labels)
        with self._meta:
            info = self.info(ns, digest)
            new = dict(info["labels"]) if fieldpaths else dict(labels)
            for path in fieldpaths:
                if path == "labels":
                    new = dict(labels)
                elif isinstance(path, str) and path.startswith("labels."):
                    new[path[len("labels."):]] = labels.get(path[len("labels."):], "")
                else:
                    raise InvalidArgument(f"cannot update {str(path)[:100]!r} field on content info {digest}")
            info["labels"] = {k: v for k, v in new.items() if v}
            info["updated_at"] = self.clock()
            self.db.execute("UPDATE blobs SET labels = ?, updated_at = ? WHERE namespace = ? AND digest = ?",
                            (json.dumps(info["labels"], sort_keys=True), info["updated_at"], ns, digest))
        return info

    def read(self, ns: str, digest: str, offset: int = 0, size: int = -1) -> bytes:
        path = self._blob_path(digest)
        if offset < 0 or size < -1:
            raise InvalidArgument(f"read of {size} bytes at offset {offset}: offset must be non-negative, "
                                  "size non-negative or -1 (to the end)")
        self.info(ns, digest)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            raise NotFound(f"content digest {digest}: blob missing on disk") from None
        try:
            end = os.fstat(fd).st_size
            if offset > end:
                raise InvalidArgument(f"read at offset {offset} is beyond the blob's size {end}")
            return os.pread(fd, min(end - offset, MAX_READ, MAX_READ if size < 0 else size), offset)
        finally:
            os.close(fd)

    def image_config(self, ns: str, target: dict, platform: str = "") -> tuple[dict, bytes | None]:
        """The config descriptor an image's target leads to for `platform` (os/arch[/variant];
        "": berthd's host), through an index (of indexes) taking the entry a pull takes, and the
        config's bytes when they fit in one read: what `run` needs, in one request."""
        matcher = PlatformMatcher(platform or None)
        desc = target
        for _ in range(4):                         # an index of indexes is allowed, a loop is not
            doc = self._json_blob(ns, desc)
            media_type = desc.get("mediaType")
            if not (isinstance(media_type, str) and is_index(media_type)) and "manifests" not in doc:
                break
            desc = _best_entry(matcher, doc.get("manifests"))
            if desc is None:
                raise NotFound(f"no manifest for {matcher}")
        config = doc.get("config")
        if not isinstance(config, dict) or "digest" not in config:
            raise InvalidArgument("its manifest names no config")
        size = config.get("size")
        data = None
        if isinstance(size, int) and 0 < size <= MAX_READ:
            data = self.read(ns, check_digest(config["digest"], "config digest"), 0, size)
        return config, data

    def _json_blob(self, ns: str, desc: dict) -> dict:
        """A whole JSON blob (an index or a manifest) named by a descriptor."""
        digest = check_digest(desc.get("digest"), "descriptor digest")
        if self.info(ns, digest)["size"] > MAX_READ:     # registries refuse manifests this large too
            raise InvalidArgument(f"content {digest} is larger than {MAX_READ} bytes: not a manifest")
        try:
            doc = json.loads(self.read(ns, digest))
        except ValueError:
            raise InvalidArgument(f"content {digest} is not JSON") from None
        if not isinstance(doc, dict):
            raise InvalidArgument(f"content {digest} is not a JSON object")
        return doc

    # --- ingests ----------------------------------------------------------------------------

    def writer_open(self, ns: str, ref: str, total: int | None = None,
                    expected: str | None = None, owner: str | None = None) -> dict:
        """Lock `ref` for one writer and create or resume its ingest; the status's `offset` is
        where the next write goes. `owner` names the writing process (process_identity): once
        it is gone, its writer is taken over at once rather than after `stale_writer`."""
        check_ref(ref)
        if owner is not None and not _IDENTITY.fullmatch(owner):
            raise InvalidArgument(f"owner {owner[:40]!r} is not a process identity (pid:starttime)")
        if total is not None and total < 0:
            raise InvalidArgument(f"total {total} must not be negative")
        if expected is not None and self._row(ns, check_digest(expected)) is not None:
            raise AlreadyExists(f"content {expected}: already exists")
        return self._open(ns, ref, self._ingest_path(ns, ref), total, expected, create=True,
                          owner=owner).status()

    def write(self, ns: str, ref: str, offset: int, data: bytes) -> dict:
        """Append `data` at `offset`, which must be where the ingest ends. A resent chunk whose
        reply was lost overlaps what is already there; its identical part is skipped."""
        w = self._writer(ns, ref)
        with w.mutex:
            _check_usable(w)
            data = memoryview(data)
            if 0 <= offset < w.offset:
                overlap = min(len(data), w.offset - offset)
                if os.pread(w.fd, overlap, offset) == data[:overlap]:
                    data, offset = data[overlap:], offset + overlap
            if offset != w.offset:
                raise InvalidArgument(f"write at offset {offset}, ingest is at {w.offset}")
            if w.total is not None and offset + len(data) > w.total:
                raise InvalidArgument(f"write of {len(data)} bytes at offset {offset} "
                                      f"exceeds total {w.total}")
            failpoints.fail("content.write")
            try:
                done = 0
                while done < len(data):
                    done += os.pwrite(w.fd, data[done:], offset + done)
            except OSError as e:
                os.ftruncate(w.fd, w.offset)          # keep the file equal to what was hashed
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise ResourceExhausted(f"ref {ref}: {os.strerror(e.errno)}") from None
                raise
            w.hasher.update(data)
            w.offset += len(data)
            w.updated_at = self.clock()
            _write_text(w.path, "updatedat", repr(w.updated_at))
            return w.status()

    def commit(self, ns: str, ref: str, size: int, expected: str, labels: dict | None = None) -> dict:
        check_digest(expected)
        labels = {k: v for k, v in check_labels(labels or {}).items() if v}
        w = self._writer(ns, ref)
        with w.mutex:
            _check_usable(w)
            if size != w.offset:
                raise FailedPrecondition(f"unexpected commit size {w.offset}, expected {size}")
            digest = "sha256:" + w.hasher.hexdigest()
            for want in (expected, w.expected):
                if want is not None and digest != want:
                    raise FailedPrecondition(f"unexpected commit digest {digest}, expected {want}")
            os.fsync(w.fd)
            os.fchmod(w.fd, 0o444)
            failpoints.fail("content.commit")      # verified and synced, not yet visible
            target, now = self._blob_path(digest), self.clock()
            with self._meta:
                exists = self._row(ns, digest) is not None
                if not exists:
                    if not os.path.exists(target):     # else another namespace committed it: share it
                        os.rename(os.path.join(w.path, "data"), target)
                        fsync_dir(self.blobs)
                    self.db.execute("INSERT INTO blobs VALUES (?, ?, ?, ?, ?, ?)",
                                    (ns, digest, size, now, now, json.dumps(labels, sort_keys=True)))
            self._remove_ingest(w)
        self._forget(w)
        if exists:
            raise AlreadyExists(f"content {digest}: already exists")
        self._publish(ns, "/content/create", {"digest": digest, "size": size})
        return {"digest": digest, "size": size, "created_at": now, "updated_at": now, "labels": labels}

    def abort(self, ns: str, ref: str) -> None:
        path = self._ingest_path(ns, ref)
        with self._writers_lock:
            w = self._writers.pop((ns, ref), None)
        if w is not None:
            with w.mutex:
                if not w.closed:
                    self._remove_ingest(w)
                    return
        if _read_text(path, "ref") != ref:
            raise NotFound(f"ingest ref {ref!r}: not found")
        w = _Writer(ns, ref, path, lock_fd=_lock_ingest(path, ref))
        self._remove_ingest(w)

    def writer_close(self, ns: str, ref: str) -> None:
        """Release the lock of a writer whose client went away; its data stays for a resume."""
        check_ref(ref)
        with self._writers_lock:
            w = self._writers.pop((ns, ref), None)
        if w is not None:
            with w.mutex:
                _close(w)

    def status(self, ns: str, ref: str) -> dict:
        path = self._ingest_path(ns, ref)
        with self._writers_lock:
            w = self._writers.get((ns, ref))
        if w is not None and w.hasher is not None and not w.closed:
            return w.status()
        if _read_text(path, "ref") != ref:
            raise NotFound(f"ingest ref {ref!r}: not found")
        try:
            offset = os.stat(os.path.join(path, "data")).st_size
        except FileNotFoundError:
            offset = 0
        total, expected = _read_text(path, "total"), _read_text(path, "expected")
        return {"ref": ref, "offset": offset, "total": None if total is None else int(total),
                "expected": expected, "started_at": _read_time(path, "startedat"),
                "updated_at": _read_time(path, "updatedat")}

    def list_statuses(self, ns: str, filters: list[str] = ()) -> list[dict]:
        matcher = filter_syntax.parse(filters)
        statuses = []
        for name in sorted(os.listdir(self.ingests)):
            ref = None if name.startswith(".") else _read_text(os.path.join(self.ingests, name), "ref")
            if ref is None or _ingest_name(ns, ref) != name:
                continue                             # another namespace's, or half-made
            with contextlib.suppress(NotFound):
                status = self.status(ns, ref)
                if matcher.match(status):
                    statuses.append(status)
        return statuses

    # --- garbage collection: metadata marks, the content store reports and sweeps ---------------

    def gc_graph(self) -> dict:
        """Every namespace's blobs, each with only the labels GC follows: {ns: {digest: labels}}."""
        graph: dict[str, dict[str, dict]] = {}
        with self._meta:
            rows = self.db.execute("SELECT namespace, digest, labels FROM blobs").fetchall()
        for ns, digest, labels in rows:
            graph.setdefault(ns, {})[digest] = {k: v for k, v in json.loads(labels).items()
                                               if k.startswith(GC_PREFIX)}
        return graph

    def gc_sweep(self, remove: list[tuple[str, str]], leased_ingests: set[tuple[str, str]],
                 ingest_expiry: float) -> dict:
        """Drop the unmarked blobs; ingests idle past `ingest_expiry` that no lease holds; and
        blob files no namespace sees (a crash between rename and row leaves those)."""
        removed = 0
        for ns, digest in remove:
            with contextlib.suppress(NotFound):
                self.delete(ns, check_digest(digest))
                removed += 1
        with self._meta:
            visible = {row[0] for row in self.db.execute("SELECT DISTINCT digest FROM blobs")}
            orphans = [n for n in os.listdir(self.blobs)
                       if not n.startswith(TMP) and f"sha256:{n}" not in visible]
            for name in orphans:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.blobs, name))
        expired = 0
        now = self.clock()
        for name in os.listdir(self.ingests):
            path = os.path.join(self.ingests, name)
            ref = None if name.startswith(TMP) else _read_text(path, "ref")
            ns = _read_text(path, "namespace") if ref is not None else None
            if ref is None or (ns, ref) in leased_ingests or now - _read_time(path, "updatedat") < ingest_expiry:
                continue
            with self._writers_lock:
                busy = any(w.path == path and not w.closed for w in self._writers.values())
            if not busy:
                doomed = os.path.join(self.ingests, f"{TMP}{name}-{uuid.uuid4().hex[:8]}")
                os.rename(path, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
                expired += 1
        return {"removed": removed, "orphans": len(orphans), "ingests": expired}

    # --- checking what is on disk -------------------------------------------------------------

    def fsck(self) -> dict:
        """Hash every committed blob again and compare it with its name and recorded size: a blob
        is verified once, at commit, and a disk that rots it later is otherwise noticed only by
        whoever reads it next. Also lists blob files no namespace sees (a crash between rename and
        row leaves those, for GC) and files that are not blobs at all. One chunk in memory at a
        time; the database lock is held only while listing."""
        with self._meta:
            rows = self.db.execute("SELECT digest, size, namespace FROM blobs ORDER BY digest").fetchall()
            names = sorted(os.listdir(self.blobs))
        recorded: dict[str, tuple[set[int], list[str]]] = {}
        for digest, size, ns in rows:
            recorded.setdefault(digest, (set(), []))
            recorded[digest][0].add(size)
            recorded[digest][1].append(ns)
        report = {"checked": 0, "bytes": 0, "corrupt": [], "missing": [], "orphans": [], "unknown": []}
        buffer = bytearray(HASH_CHUNK)
        for digest, (sizes, namespaces) in recorded.items():
            try:
                actual, size = _hash_file(self._blob_path(digest), buffer)
            except FileNotFoundError:
                if self._row_anywhere(digest):          # else deleted since the listing
                    report["missing"].append({"digest": digest, "namespaces": namespaces})
                continue
            report["checked"] += 1
            report["bytes"] += size or 0
            problem = ("not a regular file" if actual is None else
                       "digest mismatch" if actual != digest else
                       "size mismatch" if sizes != {size} else None)
            if problem:
                report["corrupt"].append({"digest": digest, "namespaces": namespaces, "problem": problem,
                                          "size": max(sizes), "actual_size": size, "actual_digest": actual})
        for name in names:
            if name.startswith(TMP) or f"sha256:{name}" in recorded:
                continue
            path = os.path.join(self.blobs, name)
            if _HEX64.fullmatch(name) and os.path.isfile(path) and not os.path.islink(path):
                report["orphans"].append(f"sha256:{name}")
            elif os.path.lexists(path):
                report["unknown"].append(name)
        return report

    def _row_anywhere(self, digest: str) -> bool:
        with self._meta:
            return self.db.execute("SELECT 1 FROM blobs WHERE digest = ? LIMIT 1", (digest,)).fetchone() is not None

    # --- internals --------------------------------------------------------------------------

    def _open(self, ns: str, ref: str, path: str, total: int | None, expected: str | None,
              create: bool, owner: str | None = None) -> _Writer:
        """Claim (ns, ref) in the writer table, then lock and load the ingest outside the table
        lock: a resume rehashes the data file, which may take a while."""
        key = (ns, ref)
        w = _Writer(ns, ref, path, owner=owner)
        w.mutex.acquire()
        try:
            with self._writers_lock:
                old = self._writers.get(key)
                if old is not None and not self._evict(old):
                    raise Unavailable(f"ref {ref} locked")
                self._writers[key] = w
            self._load(w, total, expected, create)
            return w
        except BaseException:
            _close(w)
            self._forget(w)
            raise
        finally:
            w.mutex.release()

    def _evict(self, old: _Writer) -> bool:
        """A closed writer is gone; an idle one whose owner is gone, or idle past `stale_writer`,
        is taken over (its client vanished without writer_close); a busy or recently used one
        keeps its lock."""
        if old.closed:
            return True
        if not old.mutex.acquire(blocking=False):
            return False
        try:
            if old.closed or self.clock() - old.updated_at >= self.stale_writer or _gone(old.owner):
                log.info("ref %r: taking over a writer idle since %s", old.ref, old.updated_at)
                _close(old)
                return True
            return False
        finally:
            old.mutex.release()

    def _load(self, w: _Writer, total: int | None, expected: str | None, create: bool) -> None:
        if not create and _read_text(w.path, "ref") != w.ref:
            raise NotFound(f"ingest ref {w.ref!r}: not found; open a writer first")
        os.makedirs(w.path, mode=0o700, exist_ok=True)
        w.lock_fd = _lock_ingest(w.path, w.ref)
        stored = _read_text(w.path, "ref")
        if stored is None:                           # new, or a creation that a crash cut short
            if not create:
                raise NotFound(f"ingest ref {w.ref!r}: not found; open a writer first")
            w.started_at = w.updated_at = self.clock()
            for name, value in (("namespace", w.ns), ("startedat", repr(w.started_at)),
                                ("updatedat", repr(w.updated_at)), ("total", total), ("expected", expected)):
                if value is not None:
                    _write_text(w.path, name, str(value))
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(w.path, "data"))
            _write_text(w.path, "ref", w.ref)        # last: it marks the ingest complete
        elif stored != w.ref:
            raise FailedPrecondition(f"ingest {w.path} belongs to ref {stored!r}, not {w.ref!r}")
        else:
            for name, given in (("total", total), ("expected", expected)):
                have = _read_text(w.path, name)
                if given is not None and have is not None and str(given) != have:
                    raise FailedPrecondition(f"provided {name} differs from status: {given} != {have}")
                if given is not None and have is None:
                    _write_text(w.path, name, str(given))
            w.started_at = _read_time(w.path, "startedat")
            w.updated_at = _read_time(w.path, "updatedat")
        total_text = _read_text(w.path, "total")
        w.total = None if total_text is None else int(total_text)
        w.expected = _read_text(w.path, "expected")
        w.fd = os.open(os.path.join(w.path, "data"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        w.hasher, w.offset = hashlib.sha256(), 0
        while chunk := os.pread(w.fd, HASH_CHUNK, w.offset):
            w.hasher.update(chunk)
            w.offset += len(chunk)

    def _writer(self, ns: str, ref: str) -> _Writer:
        """The open writer of (ns, ref); one that an actor restart or writer_close let go is
        reopened from disk, so a client carries on after a restart by resending its chunk."""
        path = self._ingest_path(ns, ref)
        with self._writers_lock:
            w = self._writers.get((ns, ref))
        if w is None or w.closed:
            w = self._open(ns, ref, path, None, None, create=False)
        return w

    def _forget(self, w: _Writer) -> None:
        with self._writers_lock:
            if self._writers.get((w.ns, w.ref)) is w:
                del self._writers[(w.ns, w.ref)]

    def _remove_ingest(self, w: _Writer) -> None:
        """Rename the directory out of the way first, so a crash mid-removal leaves a temporary
        (cleaned at startup), never an ingest with half its files."""
        doomed = os.path.join(self.ingests, f"{TMP}{os.path.basename(w.path)}-{uuid.uuid4().hex[:8]}")
        os.rename(w.path, doomed)
        _close(w)
        shutil.rmtree(doomed, ignore_errors=True)

    def _clean_temporaries(self) -> None:
        for parent in (self.blobs, self.ingests):
            for name in os.listdir(parent):
                if name.startswith(TMP):
                    path = os.path.join(parent, name)
                    log.info("removing %s left by an interrupted operation", path)
                    if os.path.isdir(path) and not os.path.islink(path):
                        shutil.rmtree(path, ignore_errors=True)
                    else:
                        os.unlink(path)

    def _row(self, ns: str, digest: str) -> dict | None:
        with self._meta:
            row = self.db.execute("SELECT digest, size, created_at, updated_at, labels FROM blobs "
                                  "WHERE namespace = ? AND digest = ?", (ns, digest)).fetchone()
        return None if row is None else _info(row)

    def _blob_path(self, digest: str) -> str:
        check_digest(digest)
        return os.path.join(self.blobs, digest[len("sha256:"):])

    def _ingest_path(self, ns: str, ref: str) -> str:
        check_ref(ref)
        return os.path.join(self.ingests, _ingest_name(ns, ref))

    def _publish(self, ns: str, topic: str, event: dict) -> None:
        """The change is made by now; a failure to announce it must not report it as failed."""
        try:
            self.publish(ns, topic, event)
        except Exception:
            log.exception("publishing %s for namespace %s failed", topic, ns)


def _info(row: tuple) -> dict:
    digest, size, created_at, updated_at, labels = row
    return {"digest": digest, "size": size, "created_at": created_at, "updated_at": updated_at,
            "labels": json.loads(labels)}


def _hash_file(path: str, buffer: bytearray) -> tuple[str | None, int | None]:
    """(digest, size) of a regular file read through `buffer`; (None, None) for anything else
    (a symlink is not followed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return None, None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None, None
        hasher, size, view = hashlib.sha256(), 0, memoryview(buffer)
        while n := os.preadv(fd, [buffer], size):
            hasher.update(view[:n])
            size += n
        return "sha256:" + hasher.hexdigest(), size
    finally:
        os.close(fd)


def _ingest_name(ns: str, ref: str) -> str:
    return hashlib.sha256(f"{ns}/{ref}".encode()).hexdigest()


def _lock_ingest(path: str, ref: str) -> int:
    """flock the ingest's lock file, so a second process (an old actor not yet dead) cannot write
    it too. If the holder removed the ingest meanwhile, the file we locked is no longer the one
    at `path`: that counts as locked, and a retry finds the ingest gone."""
    lock_path = os.path.join(path, "lock")
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except FileNotFoundError:
        raise Unavailable(f"ref {ref} locked") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        if os.fstat(fd).st_ino != os.stat(lock_path).st_ino:
            raise FileNotFoundError(lock_path)
    except (BlockingIOError, FileNotFoundError):
        os.close(fd)
        raise Unavailable(f"ref {ref} locked") from None
    return fd


_IDENTITY = re.compile(r"[1-9][0-9]{0,9}:[0-9]{1,20}")


def process_identity(pid: int | None = None) -> str:
    """'pid:starttime': a process, as long as it lives (a pid alone may name a later one)."""
    pid = pid or os.getpid()
    return f"{pid}:{_start_time(pid)}"


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot; None if it is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rpartition(b")")[2].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] == b"Z" else fields[19].decode()


def _gone(owner: str | None) -> bool:
    if owner is None:
        return False
    pid, _, started = owner.partition(":")
    return _start_time(int(pid)) != started


def _close(w: _Writer) -> None:
    w.closed = True
    for fd in (w.fd, w.lock_fd):
        if fd >= 0:
            os.close(fd)
    w.fd = w.lock_fd = -1


def _check_usable(w: _Writer) -> None:
    if w.closed:
        raise Unavailable(f"ref {w.ref}: its writer was closed; open it again")


def _read_text(path: str, name: str) -> str | None:
    try:
        with open(os.path.join(path, name), encoding="utf-8") as f:
            return f.read()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _read_time(path: str, name: str) -> float:
    """A timestamp file, falling back to the data's mtime if a crash left it unreadable."""
    try:
        return float(_read_text(path, name) or "")
    except ValueError:
        with contextlib.suppress(OSError):
            return os.stat(os.path.join(path, "data")).st_mtime
        return 0.0


def _write_text(path: str, name: str, text: str) -> None:
    with open(os.path.join(path, name), "w", encoding="utf-8") as f:
        f.write(text)



class ContentActor(Actor):
    """The content store on the bus: each method validates its arguments and calls the store."""

    name = "content"

    def __init__(self, store: ContentStore, publisher: Publisher | None = None):
        self.store = store
        self.publisher = publisher

    def on_stop(self) -> None:
        self.store.close()
        if self.publisher is not None:
            self.publisher.close()

    def stats(self) -> dict:
        return self.store.stats()

    @method
    def info(self, ns: str, digest: Digest) -> dict:
        return self.store.info(ns, digest)

    @method
    def list(self, ns: str, filters: list[str] = ()) -> list[dict]:
        return self.store.list(ns, filters)

    @method
    def delete(self, ns: str, digest: Digest) -> None:
        return self.store.delete(ns, digest)

    @method
    def update(self, ns: str, digest: Digest, labels: Labels, fieldpaths: list[str] = ()) -> dict:
        return self.store.update(ns, digest, labels, fieldpaths)

    @method(blocking=True)
    def read(self, ns: str, digest: Digest, offset: int = 0, size: int = -1) -> Bulk:
        data = self.store.read(ns, digest, offset, size)
        return Bulk({"offset": offset, "size": len(data)}, [data])

    @method(blocking=True)
    def image_config(self, ns: str, target: dict, platform: str = "") -> Bulk:
        config, data = self.store.image_config(ns, target, platform)
        return Bulk({"config": config}, [] if data is None else [data])

    @method(blocking=True)
    def writer_open(self, ns: str, ref: Ref, call: Call, total: int | None = None,
                    expected: Digest | None = None, owner: str | None = None) -> dict:
        self._hold(call, ns, "ingests", ref)
        return self.store.writer_open(ns, ref, total, expected, owner)

    @method(blocking=True)
    def write(self, ns: str, ref: Ref, offset: int, call: Call) -> dict:
        if len(call.frames) != 1:
            raise InvalidArgument(f"write takes its data as one bulk frame, not {len(call.frames)}")
        return self.store.write(ns, ref, offset, call.frames[0])

    @method(blocking=True)
    def commit(self, ns: str, ref: Ref, size: int, expected: Digest, call: Call,
               labels: Labels | None = None) -> dict:
        self._hold(call, ns, "content", expected)
        return self.store.commit(ns, ref, size, expected, labels)

    def _hold(self, call: Call, ns: str, kind: str, resource: str) -> None:
        """Bring the namespace into being and put the resource in the request's lease before it
        exists, so GC can never see it unheld."""
        self.call("metadata", "ensure_namespace", {"name": ns})
        if call.lease:
            self.call("metadata", "add_lease_resource", {"lease": call.lease, "type": kind, "id": resource},
                      namespace=ns)

    @method
    def abort(self, ns: str, ref: Ref) -> None:
        return self.store.abort(ns, ref)

    @method
    def status(self, ns: str, ref: Ref) -> dict:
        return self.store.status(ns, ref)

    @method
    def list_statuses(self, ns: str, filters: list[str] = ()) -> list[dict]:
        return self.store.list_statuses(ns, filters)

    @method
    def writer_close(self, ns: str, ref: Ref) -> None:
        return self.store.writer_close(ns, ref)

    @method(blocking=True)
    def fsck(self) -> dict:
        return self.store.fsck()

    @method
    def gc_graph(self) -> dict:
        return self.store.gc_graph()

    @method(blocking=True)
    def gc_sweep(self, remove: list[list[str]], leased_ingests: list[list[str]], ingest_expiry: float) -> dict:
        return self.store.gc_sweep([tuple(r) for r in remove], {tuple(i) for i in leased_ingests}, ingest_expiry)


def build(config) -> ContentActor:
    publisher = Publisher(config.address, os.path.join(config.root, "spool", "content"))
    try:
        store = ContentStore(os.path.join(config.root, "content"), publish=publisher.publish)
    except BaseException:
        publisher.close(timeout=0)
        raise
    return ContentActor(store, publisher)


def _best_entry(matcher: PlatformMatcher, entries) -> dict | None:
    """The index entry the matcher ranks best (the first of equals); None when none fits."""
    ranked = []
    for i, entry in enumerate(entries if isinstance(entries, list) else []):
        platform = entry.get("platform") if isinstance(entry, dict) else False
        if platform is not None and not (isinstance(platform, dict) and all(
                isinstance(platform.get(key, ""), str) for key in ("os", "architecture", "variant"))):
            continue
        rank = matcher.rank(platform)
        if rank is not None:
            ranked.append((rank, i, entry))
    return min(ranked, key=lambda r: r[:2])[2] if ranked else None
