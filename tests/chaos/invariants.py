"""The invariants checked once the chaos is over. Each check returns its violations, one line each.

Checks of what is on disk are evaluated again until they find nothing or SETTLE seconds have
passed since the first began: a deleted task's directory and shim go a moment after the delete
returns (a shim that does not exit is killed after 10 s), and GC runs a second after a deletion,
so only what is still wrong after that is a violation.
"""
from __future__ import annotations

import collections
import dataclasses
import json
import os
import sqlite3
import time

from actors.transfer import INDEX_TYPES
from berth.client import Client, image_config, top_chain_id
from bus.errors import NotFound
from tests.chaos.workload import EXIT, Outcome, Subscriber
from tests.integration.test_run import mounts_under
from tests.support import pid_alive, proc_title

SETTLE = 30.0
SHIM_TITLE = "berth-shim: "


@dataclasses.dataclass
class Context:
    client: Client
    ns: str
    root: str
    state: str
    dir: str                                # the daemon's directory: root and state are in it
    since: int                              # the event log's head before the workload began
    outcomes: list[Outcome]
    subscribers: list[Subscriber]
    live: set[str]                          # containers that should still have a running task
    removed: set[str]                       # containers the workload removed (their snapshots with them)
    notes: list[str] = dataclasses.field(default_factory=list)


def settled(check, ctx: Context, deadline: float) -> list[str]:
    while True:
        found = check(ctx)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


# --- the workload's own account ------------------------------------------------------------------

def outcomes(ctx: Context) -> list[str]:
    """Every run and exec finished, with the exit status it was given."""
    found = []
    for o in ctx.outcomes:
        if o.cli_crash:
            found.append(f"{o.describe()}: berth run crashed:\n{o.cli_crash}")
        if not o.ended:
            found.append(f"{o.describe()} never ended: its client is stuck (status {o.status}); "
                         f"errors so far: {o.errors[-3:]}")
        elif not o.done:
            found.append(f"{o.describe()} was given up after {o.took:.0f}s (status {o.status}); "
                         f"last errors: {o.errors[-3:]}")
        elif o.status != o.expected:
            found.append(f"{o.describe()} exited {o.status}, expected {o.expected}; errors: {o.errors[-3:]}")
    return found


def _expected_exits(ctx: Context) -> dict[tuple[str, str], int]:
    return {o.key: o.expected for o in ctx.outcomes if o.done}


def exits_in_log(ctx: Context) -> list[str]:
    """A subscriber starting from the workload's first event sees each exit exactly once, with its
    status, and no exit of anything the workload did not run."""
    expected = _expected_exits(ctx)
    statuses: dict[tuple[str, str], list] = collections.defaultdict(list)
    for envelope in ctx.client.events.subscribe(since=ctx.since, filters=[f"topic=={EXIT}"], timeout=2):
        if envelope.get("namespace") == ctx.ns:
            event = envelope["event"]
            statuses[(event.get("container_id"), event.get("id"))].append(event.get("exit_status"))
    found = []
    for key, status in sorted(expected.items()):
        seen = statuses.get(key, [])
        if seen != [status]:
            found.append(f"exit of {_name(key)} in the log {len(seen)} times, statuses {seen}; expected once, {status}")
    for key in sorted(set(statuses) - set(expected)):
        found.append(f"the log has exits of {_name(key)}, which the workload never saw finish: {statuses[key]}")
    return found


def subscribers(ctx: Context) -> list[str]:
    """Every live subscriber, resuming with `since` after each disconnect, saw every exit once."""
    expected = _expected_exits(ctx)
    found = []
    for sub in ctx.subscribers:
        found += [f"{sub.name}: {a}" for a in sub.anomalies]
        wrong = [key for key, status in expected.items() if sub.statuses.get(key) != [status]]
        for key in sorted(wrong)[:20]:
            found.append(f"{sub.name} saw the exit of {_name(key)} with statuses {sub.statuses.get(key, [])}, "
                         f"expected [{expected[key]}]")
        if len(wrong) > 20:
            found.append(f"{sub.name}: and {len(wrong) - 20} more exits")
        extra = sorted(set(sub.exits) - set(expected))
        found += [f"{sub.name} saw exits of {_name(key)}, which the workload never saw finish" for key in extra]
    return found


def _name(key: tuple[str, str]) -> str:
    cid, id = key
    return f"run {cid}" if cid == id else f"exec {id} in {cid}"


# --- what berthd holds ---------------------------------------------------------------------------

def tasks_and_containers(ctx: Context) -> list[str]:
    """Exactly the containers that should be running have a task and a record."""
    found = []
    tasks = {t["container_id"]: t for t in ctx.client.tasks.list()}
    for cid in sorted(set(tasks) - ctx.live):
        found.append(f"task {cid} is left ({tasks[cid]['status']})")
    for cid in sorted(ctx.live - set(tasks)):
        found.append(f"task {cid} should be running, and is gone")
    for cid in sorted(ctx.live & set(tasks)):
        if tasks[cid]["status"] != "running":
            found.append(f"task {cid} should be running, and is {tasks[cid]['status']}")
    records = {c["id"] for c in ctx.client.containers.list()}
    found += [f"container record {cid} is left" for cid in sorted(records - ctx.live)]
    found += [f"container record {cid} is gone" for cid in sorted(ctx.live - records)]
    return found


def mounts(ctx: Context) -> list[str]:
    """Nothing is mounted under the daemon's directories but the running containers' root filesystems."""
    allowed = {os.path.realpath(os.path.join(ctx.state, "tasks", ctx.ns, cid, "rootfs")) for cid in ctx.live}
    return [f"{point} is mounted" for point in sorted(set(mounts_under(ctx.dir)) - allowed)]


def shims(ctx: Context) -> list[str]:
    """A shim of this namespace runs only for a container that should be running. Shims are found
    by the pid in each task directory and by their title in /proc, never signalled here."""
    prefix = f"{SHIM_TITLE}{ctx.ns}/"
    running: dict[int, str] = {}
    tasks_dir = os.path.join(ctx.state, "tasks", ctx.ns)
    for cid in _listdir(tasks_dir):
        pid = _read_int(os.path.join(tasks_dir, cid, "shim.pid"))
        if pid and _alive(pid) and proc_title(pid) == prefix + cid:
            running[pid] = cid
    for entry in _listdir("/proc"):
        if entry.isdigit():
            title = proc_title(int(entry))
            if title.startswith(prefix) and _alive(int(entry)):
                running[int(entry)] = title[len(prefix):]
    found = [f"shim pid {pid} ({prefix}{cid}) runs without a task" for pid, cid in sorted(running.items())
             if cid not in ctx.live]
    found += [f"container {cid} has no shim" for cid in sorted(ctx.live - set(running.values()))]
    return found


def runtime_state(ctx: Context) -> list[str]:
    """No runtime state (<state>/runc/<ns>/<id>) and no task directory without a task."""
    found = []
    for kind in ("runc", "crun", "tasks"):
        where = os.path.join(ctx.state, kind, ctx.ns)
        found += [f"{os.path.join(where, cid)} is left" for cid in sorted(set(_listdir(where)) - ctx.live)]
    return found


def snapshot_directories(ctx: Context) -> list[str]:
    """Every snapshot directory has its record in the snapshotter's metastore, and every record its
    directory (actors/snapshot.py: <root>/snapshots/<snapshotter>/{metadata.db,snapshots/<id>})."""
    found = []
    base = os.path.join(ctx.root, "snapshots")
    for snapshotter in sorted(_listdir(base)):
        db_path = os.path.join(base, snapshotter, "metadata.db")
        if not os.path.exists(db_path):
            continue
        db = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, timeout=10)
        try:
            ids = {str(row[0]) for row in db.execute("SELECT id FROM snapshots")}
        finally:
            db.close()
        dirs = set(_listdir(os.path.join(base, snapshotter, "snapshots")))
        found += [f"{snapshotter}: snapshot directory {d} has no record" for d in sorted(dirs - ids)]
        found += [f"{snapshotter}: snapshot {i} has a record and no directory" for i in sorted(ids - dirs, key=int)]
    return found


def content(ctx: Context) -> list[str]:
    """Every blob hashes to its digest and has its recorded size (`berth content fsck`). A blob
    file no namespace sees is what a crash between rename and row leaves by design: noted, for GC."""
    report = ctx.client.content.fsck()
    found = [f"blob {d['digest']}: {d['problem']} (size {d['actual_size']}, digest {d['actual_digest']})"
             for d in report["corrupt"]]
    found += [f"blob {d['digest']} is recorded and has no file" for d in report["missing"]]
    found += [f"{name} in the blob directory is not a blob" for name in report["unknown"]]
    ctx.notes += [f"blob {digest} has no record (GC removes it)" for digest in report["orphans"]]
    ctx.notes.append(f"fsck: {report['checked']} blobs, {report['bytes']} bytes verified")
    return found


def references(ctx: Context) -> list[str]:
    """Every reference in the metadata resolves: images to their content (index, manifest, config,
    layers) and their unpacked snapshot, containers to their image and snapshot, leases to what they
    hold (but a snapshot the workload removed on purpose, and ingests, which go when committed)."""
    client, found = ctx.client, []
    for image in client.images.list():
        found += _image_references(client, image)
    for container in client.containers.list():
        key, snapshotter = container.get("snapshot_key"), container.get("snapshotter") or "overlayfs"
        if key and not _exists(lambda: client.snapshots.stat(key, snapshotter=snapshotter)):
            found.append(f"container {container['id']}: its snapshot {key} does not exist")
        if container.get("image") and not _exists(lambda: client.images.get(container["image"])):
            found.append(f"container {container['id']}: its image {container['image']} does not exist")
    for lease in client.leases.list():
        try:
            resources = client.leases.resources(lease["id"])
        except NotFound:
            continue                                    # expired and collected meanwhile
        for r in resources:
            kind, id = r["type"], r["id"]
            if kind == "content" and not _exists(lambda: client.content.info(id)):
                found.append(f"lease {lease['id']} holds blob {id}, which does not exist")
            elif kind.startswith("snapshots/") and id not in ctx.removed and not _exists(
                    lambda: client.snapshots.stat(id, snapshotter=kind.split("/", 1)[1])):
                found.append(f"lease {lease['id']} holds snapshot {id}, which does not exist")
    return found


def _image_references(client: Client, image: dict) -> list[str]:
    name, found = image["name"], []
    pending = [image["target"]]
    while pending:
        desc = pending.pop()
        try:
            info = client.content.info(desc["digest"])
        except NotFound:
            found.append(f"image {name}: {desc.get('mediaType')} {desc['digest']} is not in the content store")
            continue
        if info["size"] != desc.get("size"):
            found.append(f"image {name}: {desc['digest']} is {info['size']} bytes, its descriptor says {desc.get('size')}")
        if desc.get("mediaType") in INDEX_TYPES:
            doc = json.loads(client.content.read_all(desc["digest"]))
            present = [m for m in doc.get("manifests") or [] if _exists(lambda: client.content.info(m["digest"]))]
            if not present:
                found.append(f"image {name}: none of the manifests of index {desc['digest']} is in the content store")
            pending += present                  # a pull fetches one platform's: the others may be absent
        elif "manifest" in (desc.get("mediaType") or ""):
            doc = json.loads(client.content.read_all(desc["digest"]))
            pending += [doc["config"], *(doc.get("layers") or [])]
    if not found:
        _, config = image_config(client, image)
        chain = top_chain_id((config.get("rootfs") or {}).get("diff_ids") or [])
        if not _exists(lambda: client.snapshots.stat(chain)):
            found.append(f"image {name}: its unpacked snapshot {chain} does not exist")
    return found


def _exists(lookup) -> bool:
    try:
        lookup()
        return True
    except NotFound:
        return False


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except (FileNotFoundError, NotADirectoryError):
        return []


def _read_int(path: str) -> int:
    try:
        with open(path) as f:
            return int(f.read().strip() or 0)
    except (FileNotFoundError, ValueError):
        return 0


def _alive(pid: int) -> bool:
    try:
        return pid_alive(pid)
    except ProcessLookupError:
        return False


# The checks in the order they run; the second list is run again once the long-running
# containers are gone too.
WHILE_RUNNING = [outcomes, exits_in_log, subscribers, tasks_and_containers, mounts, shims, runtime_state,
                 snapshot_directories, content, references]
ONCE_EMPTY = [exits_in_log, tasks_and_containers, mounts, shims, runtime_state, snapshot_directories, references]
ON_DISK = {tasks_and_containers, mounts, shims, runtime_state, snapshot_directories, exits_in_log}


def check(ctx: Context, checks) -> list[str]:
    """Run `checks` in order; those of ON_DISK are given SETTLE seconds between them all to pass."""
    deadline = time.monotonic() + SETTLE
    found = []
    for fn in checks:
        found += [f"{fn.__name__}: {line}" for line in (settled(fn, ctx, deadline) if fn in ON_DISK else fn(ctx))]
    return found
