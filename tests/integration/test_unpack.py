"""Unpacking on pull, as users see it: a real berthd, a real docker-registry, images built by umoci.

- What berth mounts for an image (`images mount`) is checked file by file against an independent
  unpacker, `umoci unpack`, for both snapshotters: type, mode (setuid included), owner, size,
  content, symlink target, xattrs, device numbers, mtimes and hard-link groups.
- Layers shared by two images, or by two namespaces, are applied once.
- `snapshots diff` of a changed snapshot, applied in another namespace, gives the same tree.
- A snapshot actor killed -9 in the middle of applying a layer leaves nothing half-applied once
  the pull's lease is gone and GC has run: no extract snapshot, no temporary directory, no mount.
- The CLI: `pull --no-unpack|--snapshotter`, `images check` (UNPACKED), `images mount|unmount`.

Every mount made is unmounted; every test ends with no mount under its daemon's directory.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import gzip
import hashlib
import inspect
import io
import json
import os
import random
import re
import shutil
import signal
import stat
import subprocess
import tarfile
import threading

import pytest

from actors.snapshot import mounts_under
from actors.transfer import chain_ids
from tests.registry import _cached, build_busybox_image, layout_blob, layout_manifest, run
from tests.support import wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="unpacking and mounting need root")

SNAPSHOTTERS = ["overlayfs", "native"]
PLAIN_LINE = re.compile(r"(\S+): (\S.*) (\d+)/(\d+)\Z")
SKIPPED_XATTRS = ("security.", "trusted.")   # overlay's own (trusted.overlay.*), LSM labels


# --- an independent look at a tree ---------------------------------------------------------------

def walk_tree(root: str, whole_seconds: bool = False) -> tuple[dict[str, dict], list[list[str]]]:
    """Everything observable about each path under `root` (relative; "." is root itself), and
    the groups of paths that are one regular file (hard links), sorted. `whole_seconds`: mtimes
    to the second, all a layer written by a differ carries (containerd truncates them too)."""
    def mtime(st) -> int:
        return st.st_mtime_ns // 10**9 * 10**9 if whole_seconds else st.st_mtime_ns
    entries: dict[str, dict] = {}
    inodes: dict[int, list[str]] = {}
    stack = ["."]
    while stack:
        rel = stack.pop()
        path = os.path.normpath(os.path.join(root, rel))
        st = os.lstat(path)
        entry = {"type": stat.S_IFMT(st.st_mode), "mode": oct(stat.S_IMODE(st.st_mode)),
                 "uid": st.st_uid, "gid": st.st_gid,
                 "xattrs": {k: os.getxattr(path, k, follow_symlinks=False)
                            for k in sorted(os.listxattr(path, follow_symlinks=False))
                            if not k.startswith(SKIPPED_XATTRS)}}
        if stat.S_ISREG(st.st_mode):
            h = hashlib.sha256()
            with open(path, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            entry.update(size=st.st_size, sha256=h.hexdigest(), mtime=mtime(st))
            inodes.setdefault(st.st_ino, []).append(rel)
        elif stat.S_ISLNK(st.st_mode):
            entry.update(target=os.readlink(path), mtime=mtime(st))
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            entry.update(rdev=(os.major(st.st_rdev), os.minor(st.st_rdev)), mtime=mtime(st))
        elif stat.S_ISDIR(st.st_mode):
            entry["mtime"] = mtime(st)
            stack.extend(os.path.normpath(os.path.join(rel, name)) for name in os.listdir(path))
        entries[rel] = entry
    links = sorted(sorted(group) for group in inodes.values() if len(group) > 1)
    return entries, links


def assert_same_tree(got: tuple, expected: tuple, ignore_dir_mtimes: set[str] = frozenset(), what: str = ""):
    (a, a_links), (b, b_links) = got, expected
    for entries in (a, b):
        for rel in ignore_dir_mtimes:
            if rel in entries and stat.S_ISDIR(entries[rel]["type"]):
                entries[rel].pop("mtime", None)
    differing = [(rel, a.get(rel), b.get(rel)) for rel in sorted(set(a) | set(b)) if a.get(rel) != b.get(rel)]
    shown = "\n".join(f"  {rel}:\n    berth: {x}\n    other: {y}" for rel, x, y in differing[:20])
    assert not differing, f"{what}: {len(differing)} paths differ:\n{shown}"
    assert a_links == b_links, f"{what}: hard links differ: {a_links} != {b_links}"


def umoci_rootfs(layout: str, workdir) -> str:
    """`umoci unpack` of the layout's "latest" (on a copy: umoci writes to the layout it reads)."""
    copy, bundle = os.path.join(workdir, "umoci-layout"), os.path.join(workdir, "umoci-bundle")
    shutil.copytree(layout, copy, symlinks=True)
    run("umoci", "unpack", "--image", f"{copy}:latest", bundle, timeout=600)
    return os.path.join(bundle, "rootfs")


def layer_names(layout: str) -> list[list[str]]:
    """Each layer's entry names, normalised ("etc/passwd"), bottom layer first."""
    manifest = json.loads(layout_blob(layout, layout_manifest(layout)["digest"]))
    layers = []
    for layer in manifest["layers"]:
        with tarfile.open(fileobj=io.BytesIO(layout_blob(layout, layer["digest"])), mode="r:*") as tar:
            layers.append([os.path.normpath(m.name.lstrip("/")) for m in tar.getmembers()])
    return layers


def dir_mtimes_not_comparable(layout: str, snapshotter: str) -> set[str]:
    """Directories whose mtime is not the layers' word on it, as containerd applies layers too
    (this may leave out more than it must, never less):

    - The root: containerd (and berth) ignore a layer's entry for "./"; umoci applies it.
    - Directories no layer lists (made implicitly): each unpacker gives them its own time.
    - native only: a directory that a layer adds to or removes from without listing the
      directory itself has the time of that apply (containerd's naive applier sets directory
      times only for directories in the layer being applied). Overlay shows the upper layer's
      copy of such a directory, which the differ gives the lower directory's attributes.
    """
    layers = [set(names) for names in layer_names(layout)]
    listed = set().union(*layers)
    skip = {"."}
    for names in layers:
        for name in names:
            parent = os.path.dirname(name)
            while parent:
                if parent not in listed:
                    skip.add(parent)
                parent = os.path.dirname(parent)
    if snapshotter == "native":
        for names in layers[1:]:             # the first layer is applied to an empty tree
            skip |= {os.path.dirname(name) or "." for name in names} - names
    return skip


# --- helpers --------------------------------------------------------------------------------------

def config_of(layout: str) -> dict:
    manifest = json.loads(layout_blob(layout, layout_manifest(layout)["digest"]))
    return json.loads(layout_blob(layout, manifest["config"]["digest"]))


def chains_of(layout: str) -> list[str]:
    return chain_ids(config_of(layout)["rootfs"]["diff_ids"])


def progress_lines(stdout: str) -> list[tuple[str, str]]:
    return [(m.group(1), m.group(2)) for m in map(PLAIN_LINE.match, stdout.splitlines()) if m]


def unpack_statuses(stdout: str) -> dict[str, str]:
    """layer digest -> its last unpack status, from `berth pull`'s plain lines."""
    return {ref.removeprefix("unpack-"): status for ref, status in progress_lines(stdout)
            if ref.startswith("unpack-")}


def one_line_error(result) -> str:
    assert result.returncode != 0, result
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("berth: "), result.stderr
    return result.stderr.strip()


def parse_table(text: str) -> list[dict[str, str]]:
    lines = [line for line in text.splitlines() if line.strip()]
    starts = [m.start() for m in re.finditer(r"\S+", lines[0])]
    names = lines[0].split()
    return [dict(zip(names, (line[a:b].strip() for a, b in zip(starts, starts[1:] + [None]))))
            for line in lines[1:]]


def unpacked_column(daemon, ref: str, *flags: str, namespace: str | None = None) -> str:
    rows = [r for r in parse_table(daemon.cli("images", "check", *flags, namespace=namespace).stdout)
            if r["REF"] == ref]
    assert len(rows) == 1, rows
    return rows[0]["UNPACKED"]


def snapshot_dirs(daemon, snapshotter: str) -> list[str]:
    path = os.path.join(daemon.root, "snapshots", snapshotter, "snapshots")
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def backend_ids(client, snapshotter: str = "overlayfs") -> dict[tuple[str, str], int]:
    """(namespace, key) -> the backend snapshot it names, across all namespaces."""
    rows = client.call("snapshot", "walk_all", {"snapshotter": snapshotter})
    return {(r["namespace"], r["key"]): r["id"] for r in rows}


def snapshot_stats(daemon) -> dict:
    client = daemon.client()
    try:
        return next(a["stats"] for a in client.actors()["actors"] if a["name"] == "snapshot")
    finally:
        client.close()


def fresh_snapshot_stats(daemon, client, snapshotter: str = "overlayfs") -> dict:
    """The snapshot actor's stats as of now. They come with its pings, so they may be older than
    the last request: a marker snapshot made now, seen in the count, dates them after it (the
    count returned leaves the marker out)."""
    rows = len(set(backend_ids(client, snapshotter).values()))
    marker = "stats-marker"
    client.snapshots.prepare(marker, labels={"containerd.io/gc.root": "marker"}, snapshotter=snapshotter)
    try:
        stats = wait_until(lambda: (s := snapshot_stats(daemon)).get(snapshotter, {}).get("snapshots", 0)
                           >= rows + 1 and s, 20, 0.05, "the snapshot actor's stats after the marker")
    finally:
        client.snapshots.remove(marker, snapshotter=snapshotter)
    stats[snapshotter]["snapshots"] -= 1
    return stats


@contextlib.contextmanager
def image_mounted(daemon, ref: str, target, *flags: str, namespace: str | None = None):
    """`berth images mount REF DIR`; `images unmount --rm DIR` at the end, whatever happens."""
    target.mkdir(exist_ok=True)
    try:
        out = daemon.cli("images", "mount", *flags, ref, str(target), namespace=namespace)
        assert out.stdout.splitlines() == [str(target)]
        assert mounts_under(str(target)) == [str(target)]
        yield str(target)
    finally:
        daemon.cli("images", "unmount", "--rm", str(target), namespace=namespace)
        assert not mounts_under(str(target))


@pytest.fixture
def no_leaked_mounts(daemon, tmp_path):
    yield
    assert not mounts_under(str(tmp_path)), "a mount was left behind"
    assert not mounts_under(daemon.dir), "a mount was left behind under the daemon's directory"


def push(registry, layout: str, name: str) -> str:
    registry.push(layout, f"{name}:latest")
    return f"{registry.host}/{name}:latest"


# --- against umoci --------------------------------------------------------------------------------

@pytest.mark.parametrize("snapshotter", SNAPSHOTTERS)
@pytest.mark.parametrize("image", ["busybox", "layered"])
def test_mounted_image_is_what_umoci_unpacks(daemon, registry, tmp_path, no_leaked_mounts, request,
                                             image, snapshotter):
    layout = request.getfixturevalue(f"{image}_image")
    ref = push(registry, layout, image)
    ns = "unpack-" + snapshotter
    pulled = daemon.cli("pull", "--plain-http", "--snapshotter", snapshotter, ref, namespace=ns).stdout
    chains = chains_of(layout)
    assert set(unpack_statuses(pulled).values()) == {"unpacked"}
    assert daemon.cli("snapshots", "--snapshotter", snapshotter, "ls", "-q", namespace=ns).stdout.split() \
        == sorted(chains)
    assert unpacked_column(daemon, ref, "--snapshotter", snapshotter, namespace=ns) == "true"

    expected = walk_tree(umoci_rootfs(layout, tmp_path))
    with image_mounted(daemon, ref, tmp_path / "mnt", "--snapshotter", snapshotter, namespace=ns) as mnt:
        got = walk_tree(mnt)
        with pytest.raises(OSError):                   # a view: read-only
            open(os.path.join(mnt, "etc", "new-file"), "w").close()
    assert_same_tree(got, expected, dir_mtimes_not_comparable(layout, snapshotter),
                     f"{image} on {snapshotter} against umoci")
    if image == "layered":                             # the cases the image exists for, seen directly
        files = got[0]
        assert files["usr/local/bin/suid-true"]["mode"] == "0o4755"
        assert files["etc/berth/symlink"]["target"] == "added.txt"
        assert ["etc/berth/added.txt", "etc/berth/hardlink.txt"] in got[1]
        assert "etc/berth/doomed.txt" not in files
        assert [p for p in files if p.startswith("opt/data/")] == ["opt/data/new.txt"]
    # unmount --rm took the view and its lease; the layers stay, held by the image.
    client = daemon.client(ns)
    assert client.leases.list() == []
    assert sorted(s["name"] for s in client.snapshots.list(snapshotter=snapshotter)) == sorted(chains)


# --- sharing layers -------------------------------------------------------------------------------

def cached_here(name: str, build, *inputs) -> str:
    """tests.registry's cached build, keyed also by the source of a builder of this module's and
    its inputs (tests.registry keys by its own builders only)."""
    key = hashlib.sha256(inspect.getsource(build).encode() + repr(inputs).encode()).hexdigest()[:12]
    return _cached(f"{name}-{key}", build)


def _build_busybox_plus(scratch: str, layout: str) -> None:
    """The busybox image, byte for byte, with one more layer on top."""
    shutil.copytree(build_busybox_image(), layout, symlinks=True)
    layer = os.path.join(scratch, "plus.tar")
    with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("etc/plus", None), ("etc/plus/hello.txt", b"plus\n")):
            info = tarfile.TarInfo(name)
            info.mtime, info.mode = 1700000000, 0o755 if data is None else 0o644
            info.type = tarfile.DIRTYPE if data is None else tarfile.REGTYPE
            info.size = len(data or b"")
            tar.addfile(info, io.BytesIO(data) if data else None)
    run("umoci", "raw", "add-layer", "--image", f"{layout}:latest", "--history.created_by", "berth test: plus",
        layer)
    run("umoci", "gc", "--layout", layout)


@pytest.fixture(scope="session")
def busybox_plus_image() -> str:
    return cached_here("unpack-busybox-plus", _build_busybox_plus)


def test_layers_shared_by_images_and_namespaces_are_applied_once(daemon, registry, busybox_image,
                                                                 busybox_plus_image, no_leaked_mounts):
    busybox, plus = push(registry, busybox_image, "busybox"), push(registry, busybox_plus_image, "plus")
    base_layer = json.loads(layout_blob(busybox_image, layout_manifest(busybox_image)["digest"]))["layers"][0]
    plus_layers = json.loads(layout_blob(busybox_plus_image, layout_manifest(busybox_plus_image)["digest"]))["layers"]
    assert plus_layers[0]["digest"] == base_layer["digest"] and len(plus_layers) == 2
    client = daemon.client()

    first = unpack_statuses(daemon.cli("pull", "--plain-http", busybox).stdout)
    assert first == {base_layer["digest"]: "unpacked"}
    wait_until(lambda: snapshot_stats(daemon).get("applied") == 1, 20, 0.05, "one layer applied")

    second = unpack_statuses(daemon.cli("pull", "--plain-http", plus).stdout)
    assert second == {plus_layers[0]["digest"]: "unpacked (reused)", plus_layers[1]["digest"]: "unpacked"}
    stats = fresh_snapshot_stats(daemon, client)
    assert stats["applied"] == 2

    # Another namespace: the same chain IDs, linked to the same backend snapshots, none applied.
    other = unpack_statuses(daemon.cli("pull", "--plain-http", plus, namespace="second").stdout)
    assert other == {layer["digest"]: "unpacked (reused)" for layer in plus_layers}
    ids = backend_ids(client)
    chains = chains_of(busybox_plus_image)
    assert [ids[("second", c)] for c in chains] == [ids[("default", c)] for c in chains]
    stats = fresh_snapshot_stats(daemon, client)
    assert stats["applied"] == 2
    assert stats["overlayfs"]["snapshots"] == len(chains)          # one backend snapshot per layer

    # And again in the first namespace, and busybox in the second: nothing to do.
    again = unpack_statuses(daemon.cli("pull", "--plain-http", plus).stdout)
    assert set(again.values()) == {"unpacked (reused)"}
    base = unpack_statuses(daemon.cli("pull", "--plain-http", busybox, namespace="second").stdout)
    assert base == {base_layer["digest"]: "unpacked (reused)"}
    assert fresh_snapshot_stats(daemon, client)["applied"] == 2
    assert unpacked_column(daemon, plus, namespace="second") == "true"
    assert unpacked_column(daemon, busybox, namespace="second") == "true"


# --- snapshots diff -------------------------------------------------------------------------------

def change_tree(root: str) -> None:
    """Add a file, modify one, delete one, add a directory with a file, a symlink and a hard link,
    and change a mode."""
    with open(os.path.join(root, "etc", "added.conf"), "w") as f:
        f.write("added by the test\n")
    with open(os.path.join(root, "etc", "passwd"), "a") as f:
        f.write("berth:x:1000:1000::/home/berth:/bin/sh\n")
    os.unlink(os.path.join(root, "etc", "group"))
    os.unlink(os.path.join(root, "bin", "vi"))
    os.makedirs(os.path.join(root, "srv", "app"))
    with open(os.path.join(root, "srv", "app", "run"), "w") as f:
        f.write("#!/bin/sh\necho app\n")
    os.chown(os.path.join(root, "srv", "app", "run"), 1000, 1000)     # before chmod: chown clears setuid
    os.chmod(os.path.join(root, "srv", "app", "run"), 0o4750)
    os.link(os.path.join(root, "srv", "app", "run"), os.path.join(root, "srv", "app", "run-too"))
    os.symlink("../srv/app/run", os.path.join(root, "bin", "app"))
    os.chmod(os.path.join(root, "home"), 0o700)


@pytest.mark.parametrize("snapshotter", SNAPSHOTTERS)
def test_diff_of_changes_applied_elsewhere_gives_the_same_tree(daemon, registry, busybox_image, tmp_path,
                                                               no_leaked_mounts, snapshotter):
    ref = push(registry, busybox_image, "busybox")
    base = chains_of(busybox_image)[-1]
    snap = ["snapshots", "--snapshotter", snapshotter]
    daemon.cli("pull", "--plain-http", "--snapshotter", snapshotter, ref)
    mnt = tmp_path / "work"
    mnt.mkdir()
    try:
        daemon.cli(*snap, "prepare", "--target", str(mnt), "work", base)
        change_tree(str(mnt))
        changed = walk_tree(str(mnt), whole_seconds=True)
    finally:
        while mounts_under(str(mnt)):
            subprocess.run(["umount", str(mnt)], check=True)

    out = daemon.cli(*snap, "diff", "--keep", "--label", "origin=test", "work")
    digest = out.stdout.strip()
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", digest), out.stdout
    client = daemon.client()
    info = client.content.info(digest)
    assert info["labels"]["origin"] == "test" and "containerd.io/gc.root" in info["labels"]
    diff_id = info["labels"]["containerd.io/uncompressed"]
    blob = client.content.read_all(digest)
    assert "sha256:" + hashlib.sha256(gzip.decompress(blob)).hexdigest() == diff_id
    client.gc()                                        # kept: the layer survives a collection
    assert client.content.info(digest)["size"] == len(blob)
    # The same changes again give the same layer (content-addressed, no duplicate).
    assert daemon.cli(*snap, "diff", "work").stdout.strip() == digest

    # Elsewhere: the same base, then the layer applied on it by the snapshot actor, and a view
    # of the result (made while the lease holds the new layer; the view then holds its parents).
    other = daemon.client("elsewhere")
    daemon.cli("pull", "--plain-http", "--snapshotter", snapshotter, ref, namespace="elsewhere")
    look = tmp_path / "look"
    look.mkdir()
    try:
        with other.lease():
            other.content.write("diff-layer", blob, expected=digest)
            layer = {"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest,
                     "size": len(blob)}
            chain = chain_ids([base, diff_id])[-1]
            done = other.call("snapshot", "unpack_layer", {"chain_id": chain, "layer": layer, "diff_id": diff_id,
                                                           "parent": base, "snapshotter": snapshotter},
                              timeout=120)
            assert done["applied"] is True
            daemon.cli(*snap, "view", "--target", str(look), "look", chain, namespace="elsewhere")
        applied = walk_tree(str(look), whole_seconds=True)
    finally:
        while mounts_under(str(look)):
            subprocess.run(["umount", str(look)], check=True)
    # The root's mtime is not carried by a layer (a layer's "./" entry is ignored, as containerd does).
    assert_same_tree(applied, changed, {"."}, f"diff applied on {snapshotter}")
    files = applied[0]
    assert "etc/group" not in files and "bin/vi" not in files
    run_file = files["srv/app/run"]
    assert (run_file["mode"], run_file["uid"], run_file["gid"]) == ("0o4750", 1000, 1000)
    assert ["srv/app/run", "srv/app/run-too"] in applied[1]


def test_diff_of_a_missing_snapshot_is_a_one_line_error(daemon):
    assert "not found" in one_line_error(daemon.cli("snapshots", "diff", "nope", check=False))


# --- kill -9 of the snapshot actor while it applies a layer --------------------------------------

BIG_SMALL_FILES, BIG_SMALL_SIZE = 20000, 4 << 10
BIG_FILES, BIG_SIZE = 1000, 64 << 10


def _build_big(scratch: str, layout: str) -> None:
    """busybox, then one layer of about 140 MB in 21000 files (incompressible), which takes
    seconds to apply: long enough to kill the applier in the middle."""
    shutil.copytree(build_busybox_image(), layout, symlinks=True)
    layer = os.path.join(scratch, "big.tar")
    rng = random.Random(20240229)
    with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as tar:
        def add(name: str, kind: bytes, data: bytes = b"", mode: int = 0o644) -> None:
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.mode, info.type = 1700000000, 0, 0, mode, kind
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data) if data else None)
        add("data", tarfile.DIRTYPE, mode=0o755)
        for i in range(BIG_SMALL_FILES + BIG_FILES):
            if i % 500 == 0:
                add(f"data/d{i // 500:03d}", tarfile.DIRTYPE, mode=0o755)
            size = BIG_SMALL_SIZE if i < BIG_SMALL_FILES else BIG_SIZE
            add(f"data/d{i // 500:03d}/f{i:05d}", tarfile.REGTYPE, rng.randbytes(size))
    run("umoci", "raw", "add-layer", "--image", f"{layout}:latest", "--history.created_by", "berth test: big",
        layer, timeout=600)
    run("umoci", "gc", "--layout", layout)


@pytest.fixture(scope="session")
def big_image() -> str:
    return cached_here("unpack-big", _build_big, BIG_SMALL_FILES, BIG_SMALL_SIZE, BIG_FILES, BIG_SIZE)


def test_snapshot_actor_killed_while_applying_leaves_nothing_half_applied(daemon, registry, big_image, tmp_path,
                                                                          no_leaked_mounts):
    ref = push(registry, big_image, "big")
    manifest = json.loads(layout_blob(big_image, layout_manifest(big_image)["digest"]))
    big_layer = manifest["layers"][-1]["digest"]
    chains = chains_of(big_image)
    client = daemon.client(timeout=60)
    pid = daemon.actor_pids()["snapshot"]
    unpacking = threading.Event()

    def report(item: dict) -> None:
        if item.get("ref") == f"unpack-{big_layer}" and item.get("status") == "unpacking":
            unpacking.set()

    def pull_under(lease_id: str) -> dict:
        puller = daemon.client(timeout=60)
        puller.active_lease = lease_id
        try:
            return puller.pull(ref, plain_http=True, progress=report, timeout=600)
        finally:
            puller.close()

    def extracting() -> list[dict]:
        return [s for s in client.snapshots.list() if s["name"].startswith("extract-")
                and s["name"].endswith(" " + chains[-1])]

    # The pull runs under a lease of the test's, so what the crash leaves stays visible until the
    # lease goes, as it would for a client whose pull is retried under the same lease.
    lease = client.leases.create("pull-under-test")["id"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(pull_under, lease)
        assert unpacking.wait(300), future.exception(0) if future.done() else "no unpacking report"
        half = wait_until(lambda: extracting() or future.done(), 60, 0.01, "the big layer's extract snapshot")
        assert half is not True and not future.done(), "the layer was applied before the kill could land"
        assert not any(s["name"] == chains[-1] for s in client.snapshots.list()), "committed already"
        os.kill(pid, signal.SIGKILL)
        record = future.result(timeout=600)            # redelivered to the restarted actor: it succeeds

    assert record["target"]["digest"] == layout_manifest(big_image)["digest"]
    new_pid = wait_until(lambda: daemon.actor_pids().get("snapshot") not in (None, pid)
                         and daemon.actor_pids()["snapshot"], 20, 0.05, "the snapshot actor back")
    assert new_pid != pid
    # The half-applied extract snapshot is an Active snapshot held by the pull's lease, as
    # containerd leaves it; the layer itself is committed once, under its chain ID.
    listed = {s["name"]: s["kind"] for s in client.snapshots.list()}
    stale = [k for k in listed if k.startswith("extract-")]
    assert stale == [half[0]["name"]] and listed[stale[0]] == "active", listed
    assert {k: v for k, v in listed.items() if k not in stale} == {c: "committed" for c in chains}

    # Once the lease is gone, GC takes it: no extract snapshot, no stray directory, no mount.
    daemon.cli("leases", "rm", lease)
    daemon.cli("gc")
    assert daemon.cli("snapshots", "ls", "-q").stdout.split() == sorted(chains)
    dirs = snapshot_dirs(daemon, "overlayfs")
    assert not [d for d in dirs if d.startswith(("new-", "rm-"))], dirs
    assert sorted(dirs, key=int) == sorted(str(i) for i in set(backend_ids(client).values()))
    assert not mounts_under(daemon.root)
    assert unpacked_column(daemon, ref) == "true"

    # What was committed after the crash is the whole layer, entry for entry.
    with image_mounted(daemon, ref, tmp_path / "mnt") as mnt:
        got = walk_tree(mnt)[0]
    in_layer = layer_entries(big_image, -1)
    assert {rel: entry for rel, entry in got.items() if rel in in_layer} == in_layer
    assert [rel for rel in got if rel.startswith("data/") and rel not in in_layer] == []

    # Pulled again: the same chain IDs, nothing applied.
    again = daemon.cli("pull", "--plain-http", ref, timeout=600)
    assert set(unpack_statuses(again.stdout).values()) == {"unpacked (reused)"}
    assert daemon.cli("snapshots", "ls", "-q").stdout.split() == sorted(chains)
    assert not mounts_under(daemon.root)


def layer_entries(layout: str, index: int) -> dict[str, dict]:
    """What walk_tree would record for each directory and regular file of one layer, read
    from the layer tar itself (the image's own word on it)."""
    manifest = json.loads(layout_blob(layout, layout_manifest(layout)["digest"]))
    entries = {}
    with tarfile.open(fileobj=io.BytesIO(layout_blob(layout, manifest["layers"][index]["digest"])),
                      mode="r:*") as tar:
        for member in tar:
            rel = os.path.normpath(member.name)
            entry = {"mode": oct(member.mode), "uid": member.uid, "gid": member.gid, "xattrs": {},
                     "mtime": int(member.mtime) * 10**9}
            if member.isdir():
                entry["type"] = stat.S_IFDIR
            elif member.isreg():
                data = tar.extractfile(member).read()
                entry.update(type=stat.S_IFREG, size=len(data), sha256=hashlib.sha256(data).hexdigest())
            else:
                raise AssertionError(f"{rel}: only directories and regular files expected here")
            entries[rel] = entry
    return entries


# --- the CLI --------------------------------------------------------------------------------------

def test_pull_no_unpack_then_mount_says_so_and_pull_unpacks(daemon, registry, busybox_image, tmp_path,
                                                           no_leaked_mounts):
    ref = push(registry, busybox_image, "busybox")
    fetched = daemon.cli("pull", "--plain-http", "--no-unpack", ref)
    assert not unpack_statuses(fetched.stdout)
    assert fetched.stdout.splitlines()[-1].startswith(f"image: {ref} digest: ")
    assert daemon.cli("snapshots", "ls", "-q").stdout.split() == []
    assert unpacked_column(daemon, ref) == "false"
    (tmp_path / "mnt").mkdir()
    error = one_line_error(daemon.cli("images", "mount", ref, str(tmp_path / "mnt"), check=False))
    assert "not unpacked" in error and "pull it again with unpack" in error
    client = daemon.client()
    assert client.leases.list() == [] and client.snapshots.list() == []

    pulled = daemon.cli("images", "pull", "--plain-http", ref)
    assert set(unpack_statuses(pulled.stdout).values()) == {"unpacked"}
    assert unpacked_column(daemon, ref) == "true"
    assert unpacked_column(daemon, ref, "--snapshotter", "native") == "false"
    rows = json.loads(daemon.cli("images", "check", "--format", "json").stdout)
    assert [r["unpacked"] for r in rows] == [True]


def test_pull_into_native_and_an_unknown_snapshotter(daemon, registry, busybox_image):
    ref = push(registry, busybox_image, "busybox")
    pulled = daemon.cli("pull", "--plain-http", "--snapshotter", "native", ref)
    assert set(unpack_statuses(pulled.stdout).values()) == {"unpacked"}
    chains = chains_of(busybox_image)
    assert daemon.cli("snapshots", "--snapshotter", "native", "ls", "-q").stdout.split() == chains
    assert daemon.cli("snapshots", "ls", "-q").stdout.split() == []
    assert unpacked_column(daemon, ref, "--snapshotter", "native") == "true"
    assert unpacked_column(daemon, ref) == "false"

    error = one_line_error(daemon.cli("pull", "--plain-http", "--snapshotter", "zfs", ref, namespace="x",
                                      check=False))
    assert "zfs" in error and "not available" in error
    assert daemon.cli("content", "ls", "-q", namespace="x").stdout.split() == []      # nothing fetched
    assert "zfs" in one_line_error(daemon.cli("images", "check", "--snapshotter", "zfs", check=False))


def test_images_mount_rw_keeps_its_snapshot_until_unmount_rm(daemon, registry, busybox_image, tmp_path,
                                                            no_leaked_mounts):
    ref = push(registry, busybox_image, "busybox")
    daemon.cli("pull", "--plain-http", ref)
    client = daemon.client()
    mnt = tmp_path / "rw"
    mnt.mkdir()
    key = str(mnt)
    try:
        assert daemon.cli("images", "mount", "--rw", ref, str(mnt)).stdout.splitlines() == [str(mnt)]
        assert mounts_under(str(mnt)) == [str(mnt)]
        (mnt / "etc" / "written").write_text("rw\n")
        info = client.snapshots.stat(key)
        assert (info["kind"], info["parent"]) == ("active", chains_of(busybox_image)[-1])
        leases = client.leases.list()
        assert len(leases) == 1 and "containerd.io/gc.expire" not in leases[0]["labels"]
        assert {"type": "snapshots/overlayfs", "id": key} in client.leases.resources(leases[0]["id"])

        # Unmounted but not removed: the snapshot stays, held by the lease, through a GC and
        # with the image gone; mounting again finds it, with what was written.
        assert daemon.cli("images", "unmount", str(mnt)).stdout.splitlines() == [str(mnt)]
        assert not mounts_under(str(mnt))
        daemon.cli("images", "rm", "--sync", ref)
        daemon.cli("gc")
        assert client.snapshots.stat(key)["kind"] == "active"
        daemon.cli("pull", "--plain-http", ref)
        daemon.cli("images", "mount", "--rw", ref, str(mnt))
        assert (mnt / "etc" / "written").read_text() == "rw\n"
        assert len(client.leases.list()) == 1
    finally:
        while mounts_under(str(mnt)):
            daemon.cli("images", "unmount", str(mnt))
    assert daemon.cli("images", "unmount", "--rm", str(mnt)).stdout.splitlines() == [str(mnt)]
    assert client.leases.list() == []
    assert key not in [s["name"] for s in client.snapshots.list()]
    # Unmounting what is not mounted is not an error (as ctr), --rm of what is gone neither.
    assert daemon.cli("images", "unmount", "--rm", str(mnt)).returncode == 0


def test_images_mount_errors_are_one_line(daemon, registry, busybox_image, tmp_path):
    ref = push(registry, busybox_image, "busybox")
    daemon.cli("pull", "--plain-http", ref)
    assert "not a directory" in one_line_error(daemon.cli("images", "mount", ref, str(tmp_path / "nope"),
                                                          check=False))
    (tmp_path / "mnt").mkdir()
    assert "not found" in one_line_error(daemon.cli("images", "mount", "no/such:image", str(tmp_path / "mnt"),
                                                    check=False))
    error = one_line_error(daemon.cli("images", "mount", "--snapshotter", "native", ref, str(tmp_path / "mnt"),
                                      check=False))
    assert "not unpacked" in error
    assert not mounts_under(str(tmp_path))
    assert daemon.client().leases.list() == []
