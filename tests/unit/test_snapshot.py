"""The snapshotters as plain objects on a temporary directory: chains of prepare, commit and view;
the mounts they hand out, actually mounted; removal rules; namespaces and sharing across them;
what a crash leaves behind and how startup clears it; usage; events; validation."""
from __future__ import annotations

import contextlib
import errno
import os
import stat
import subprocess

import pytest

from actors import snapshot
from actors.snapshot import (BACKENDS, NativeSnapshotter, SnapshotActor, disk_usage,
                             mounts_under, open_snapshotters, probe_overlay)
from bus.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from bus.worker import Call

NS, OTHER = "default", "other"
ROOT = os.geteuid() == 0


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        self.now += 1
        return self.now


@pytest.fixture(scope="session")
def overlay_ok(tmp_path_factory) -> bool:
    return ROOT and probe_overlay(str(tmp_path_factory.mktemp("probe"))) is None


@pytest.fixture
def events():
    return []


def open_backend(name: str, root, events) -> snapshot.Snapshotter:
    return BACKENDS[name](str(root), publish=lambda ns, topic, ev: events.append((ns, topic, ev)), clock=Clock())


@pytest.fixture(params=["overlayfs", "native"])
def snap(request, tmp_path, events, overlay_ok):
    if request.param == "overlayfs" and not overlay_ok:
        pytest.skip("overlayfs cannot be mounted here")
    s = open_backend(request.param, tmp_path / request.param, events)
    yield s
    s.close()
    assert not mounts_under(str(tmp_path)), "a test left a mount behind"


@pytest.fixture
def overlay(tmp_path, events, overlay_ok):
    if not overlay_ok:
        pytest.skip("overlayfs cannot be mounted here")
    s = open_backend("overlayfs", tmp_path / "overlayfs", events)
    yield s
    s.close()


@pytest.fixture
def native(tmp_path, events):
    s = open_backend("native", tmp_path / "native", events)
    yield s
    s.close()


def write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def layer(s, ns: str, name: str, parent: str = "", files: dict | None = None) -> None:
    """Commit `name` on `parent`, with `files` written into the new snapshot's own tree."""
    s.prepare(ns, f"extract-{name}", parent)
    upper = s.upper_dir(ns, f"extract-{name}")
    for rel, text in (files or {}).items():
        write(os.path.join(upper, rel), text)
    s.commit(ns, name, f"extract-{name}")


@contextlib.contextmanager
def mounted(mounts: list[dict], target: str):
    """Mount as a user of the API would (the `mount` command), and always unmount."""
    assert len(mounts) == 1
    m = mounts[0]
    subprocess.run(["mount", "-t", m["type"], m["source"], target, "-o", ",".join(m["options"])],
                   check=True, capture_output=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", target], check=True)


def snapshot_dirs(s) -> list[str]:
    return sorted(os.listdir(s.dir))


# --- chains and kinds ---------------------------------------------------------------------------

def test_prepare_commit_view_chain(snap):
    layer(snap, NS, "base", files={"etc/os-release": "base\n"})
    layer(snap, NS, "app", "base", files={"app/run": "app\n"})
    snap.prepare(NS, "ctr", "app")
    snap.view(NS, "look", "app")
    info = {i["name"]: i for i in snap.list(NS)}
    assert {k: (v["parent"], v["kind"]) for k, v in info.items()} == {
        "base": ("", "committed"), "app": ("base", "committed"), "ctr": ("app", "active"), "look": ("app", "view")}
    assert set(info["ctr"]) == {"name", "parent", "kind", "labels", "created_at", "updated_at"}
    assert [i["name"] for i in snap.list(NS, ['kind==committed'])] == ["app", "base"]
    assert [i["name"] for i in snap.list(NS, ['parent==app'])] == ["ctr", "look"]
    assert [i["name"] for i in snap.list(NS, ['name==base', 'kind==view'])] == ["base", "look"]
    # The extract keys were renamed by commit: they are gone.
    with pytest.raises(NotFound):
        snap.stat(NS, "extract-app")
    # The snapshot's own tree and its parents', nearest first.
    lowers = snap.lower_dirs(NS, "ctr")
    assert all(os.path.isdir(d) for d in lowers)
    assert snap.lower_dirs(NS, "base") == []
    if snap.name == "native":       # each holds a full copy: the parent's is all there is below
        assert lowers == [snap.upper_dir(NS, "app")]
        assert read(os.path.join(snap.upper_dir(NS, "ctr"), "etc/os-release")) == "base\n"
        assert read(os.path.join(snap.upper_dir(NS, "ctr"), "app/run")) == "app\n"
    else:                           # each holds its own changes: the whole chain is below
        assert lowers == [snap.upper_dir(NS, "app"), snap.upper_dir(NS, "base")]
        assert read(os.path.join(lowers[0], "app/run")) == "app\n"
        assert read(os.path.join(lowers[1], "etc/os-release")) == "base\n"
        assert os.listdir(snap.upper_dir(NS, "ctr")) == []


def test_snapshots_survive_reopening(tmp_path, events, overlay_ok):
    for name in ("overlayfs", "native") if overlay_ok else ("native",):
        s = open_backend(name, tmp_path / name, events)
        layer(s, NS, "base", files={"f": "1"})
        before = (s.list(NS), s.prepare(NS, "ctr", "base"))
        s.close()
        s = open_backend(name, tmp_path / name, events)
        assert s.list(NS)[0] == before[0][0]
        assert s.mounts(NS, "ctr") == before[1]
        s.close()


def test_usage_of_active_is_walked_and_of_committed_is_kept(snap):
    snap.prepare(NS, "a")
    upper = snap.upper_dir(NS, "a")
    empty = snap.usage(NS, "a")
    assert empty["inodes"] == 1 and empty["size"] >= 0
    write(os.path.join(upper, "one"), "x" * 10000)
    write(os.path.join(upper, "dir/two"), "y" * 5000)
    os.link(os.path.join(upper, "one"), os.path.join(upper, "dir/one-again"))
    usage = snap.usage(NS, "a")
    assert usage["inodes"] == 4                    # root, one (twice linked), dir, two
    assert usage["size"] >= 15000
    assert usage == disk_usage(upper)
    snap.commit(NS, "A", "a")
    write(os.path.join(upper, "late"), "z" * 50000)  # nobody may do this; usage was measured at commit
    assert snap.usage(NS, "A") == usage


def test_events_are_published(snap, events):
    snap.prepare(NS, "a", labels={"x": "1"})
    snap.commit(NS, "A", "a")
    snap.view(NS, "v", "A")                        # as containerd: views are not announced
    snap.remove(NS, "v")
    snap.remove(NS, "A")
    assert events == [
        (NS, "/snapshot/prepare", {"key": "a", "parent": "", "snapshotter": snap.name}),
        (NS, "/snapshot/commit", {"key": "a", "name": "A", "snapshotter": snap.name}),
        (NS, "/snapshot/remove", {"key": "v", "snapshotter": snap.name}),
        (NS, "/snapshot/remove", {"key": "A", "snapshotter": snap.name}),
    ]


def test_a_failing_publisher_does_not_fail_the_operation(tmp_path):
    def broken(ns, topic, event):
        raise ConnectionError("events actor gone")
    s = NativeSnapshotter(str(tmp_path / "n"), publish=broken)
    s.prepare(NS, "a")
    assert s.stat(NS, "a")["kind"] == "active"
    s.close()


# --- mounts -------------------------------------------------------------------------------------

def test_overlay_mount_shapes(overlay):
    fs = overlay._fs
    assert overlay.prepare(NS, "a") == [{"type": "bind", "source": fs(1), "options": ["rw", "rbind"]}]
    overlay.commit(NS, "A", "a")
    assert overlay.view(NS, "empty") == [{"type": "bind", "source": fs(2), "options": ["ro", "rbind"]}]
    index = ["index=off"] if overlay.index_off else []
    assert overlay.prepare(NS, "b", "A") == [{"type": "overlay", "source": "overlay", "options": [
        *index, f"workdir={overlay.dir}/3/work", f"upperdir={fs(3)}", f"lowerdir={fs(1)}"]}]
    overlay.commit(NS, "B", "b")
    assert overlay.view(NS, "v1", "A") == [{"type": "bind", "source": fs(1), "options": ["ro", "rbind"]}]
    assert overlay.view(NS, "v2", "B") == [{"type": "overlay", "source": "overlay",
                                            "options": [*index, f"lowerdir={fs(3)}:{fs(1)}"]}]
    c = overlay.prepare(NS, "c", "B")
    assert c[0]["options"][-1] == f"lowerdir={fs(3)}:{fs(1)}"
    assert overlay.mounts(NS, "c") == c and overlay.mounts(NS, "v2") == overlay.view(NS, "v3", "B")
    # Views have no workdir; active snapshots do.
    assert sorted(os.listdir(overlay._path(4))) == ["fs"]
    assert sorted(os.listdir(overlay._path(6))) == ["fs", "work"]
    with pytest.raises(FailedPrecondition, match="committed"):
        overlay.mounts(NS, "B")


def test_native_mount_shapes(native):
    fs = native._fs
    assert native.prepare(NS, "a") == [{"type": "bind", "source": fs(1), "options": ["rw", "rbind"]}]
    native.commit(NS, "A", "a")
    assert native.prepare(NS, "b", "A") == [{"type": "bind", "source": fs(2), "options": ["rw", "rbind"]}]
    assert native.view(NS, "v", "A") == [{"type": "bind", "source": fs(3), "options": ["ro", "rbind"]}]
    assert native.mounts(NS, "v") == [{"type": "bind", "source": fs(3), "options": ["ro", "rbind"]}]


@pytest.mark.skipif(not ROOT, reason="mounting needs root")
def test_mounted_snapshots_show_their_parents(snap, tmp_path):
    layer(snap, NS, "base", files={"etc/hostname": "base\n", "etc/motd": "hello\n"})
    layer(snap, NS, "app", "base", files={"app/run": "app\n", "etc/motd": "changed\n"})
    target = tmp_path / "mnt"
    target.mkdir()
    with mounted(snap.prepare(NS, "ctr", "app"), str(target)):
        assert read(target / "etc/hostname") == "base\n"
        assert read(target / "etc/motd") == "changed\n"           # the nearer layer wins
        assert read(target / "app/run") == "app\n"
        write(str(target / "new/file"), "written in the container\n")
        os.unlink(target / "etc/hostname")
    upper = snap.upper_dir(NS, "ctr")
    assert read(os.path.join(upper, "new/file")) == "written in the container\n"
    # The layers underneath are untouched.
    for lower in snap.lower_dirs(NS, "ctr"):
        assert not os.path.exists(os.path.join(lower, "new"))
    with mounted(snap.view(NS, "look", "app"), str(target)):
        assert read(target / "app/run") == "app\n"
        assert read(target / "etc/hostname") == "base\n"
        with pytest.raises(OSError) as e:
            write(str(target / "nope"), "x")
        assert e.value.errno == errno.EROFS
    with mounted(snap.view(NS, "look-base", "base"), str(target)):
        assert read(target / "etc/motd") == "hello\n"
    with mounted(snap.prepare(NS, "scratch"), str(target)):
        write(str(target / "f"), "scratch\n")
    assert read(os.path.join(snap.upper_dir(NS, "scratch"), "f")) == "scratch\n"
    assert not mounts_under(str(tmp_path))


@pytest.mark.skipif(not ROOT, reason="owners and device nodes need root")
def test_native_copies_keep_owners_modes_links_devices_xattrs_and_times(native):
    native.prepare(NS, "a")
    fs = native.upper_dir(NS, "a")
    os.chmod(fs, 0o751)
    write(os.path.join(fs, "secret"), "s")
    os.chown(os.path.join(fs, "secret"), 1234, 5678)
    os.chmod(os.path.join(fs, "secret"), 0o4640)
    os.link(os.path.join(fs, "secret"), os.path.join(fs, "secret-link"))
    os.symlink("secret", os.path.join(fs, "sym"))
    os.mkfifo(os.path.join(fs, "fifo"))
    os.mknod(os.path.join(fs, "null"), 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    os.setxattr(os.path.join(fs, "secret"), "user.note", b"kept")
    os.utime(os.path.join(fs, "secret"), ns=(1_000_000_000, 2_000_000_000))
    native.commit(NS, "A", "a")
    native.prepare(NS, "b", "A")
    copy = native.upper_dir(NS, "b")
    assert stat.S_IMODE(os.lstat(copy).st_mode) == 0o751
    st = os.lstat(os.path.join(copy, "secret"))
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1234, 5678, 0o4640)
    assert st.st_mtime_ns == 2_000_000_000
    assert st.st_ino == os.lstat(os.path.join(copy, "secret-link")).st_ino
    assert os.readlink(os.path.join(copy, "sym")) == "secret"
    assert stat.S_ISFIFO(os.lstat(os.path.join(copy, "fifo")).st_mode)
    null = os.lstat(os.path.join(copy, "null"))
    assert stat.S_ISCHR(null.st_mode) and null.st_rdev == os.makedev(1, 3)
    assert os.getxattr(os.path.join(copy, "secret"), "user.note") == b"kept"
    assert st.st_ino != os.lstat(os.path.join(fs, "secret")).st_ino     # a copy, not the same file


@pytest.mark.skipif(not ROOT, reason="owners need root")
def test_overlay_upper_root_takes_the_parent_owner(overlay):
    overlay.prepare(NS, "a")
    os.chown(overlay.upper_dir(NS, "a"), 4321, 4321)
    overlay.commit(NS, "A", "a")
    overlay.prepare(NS, "b", "A")
    assert os.lstat(overlay.upper_dir(NS, "b")).st_uid == 4321


# --- removal ------------------------------------------------------------------------------------

def test_remove_is_refused_while_children_exist(snap):
    layer(snap, NS, "A")
    snap.prepare(NS, "b", "A")
    snap.view(NS, "v", "A")
    with pytest.raises(FailedPrecondition, match="child"):
        snap.remove(NS, "A")
    snap.remove(NS, "b")
    with pytest.raises(FailedPrecondition, match="snapshot v is its child"):
        snap.remove(NS, "A")
    snap.remove(NS, "v")
    snap.remove(NS, "A")
    assert snap.list(NS) == [] and snapshot_dirs(snap) == []
    with pytest.raises(NotFound):
        snap.remove(NS, "A")


def test_a_parent_being_copied_cannot_be_removed(native, monkeypatch):
    layer(native, NS, "A", files={"f": "x"})
    seen = []
    real = NativeSnapshotter._populate

    def populate(self, path, kind, parent_id):
        with pytest.raises(FailedPrecondition, match="being copied"):
            self.remove(NS, "A")
        seen.append(parent_id)
        real(self, path, kind, parent_id)
    monkeypatch.setattr(NativeSnapshotter, "_populate", populate)
    native.prepare(NS, "b", "A")
    assert seen == [1]
    assert read(os.path.join(native.upper_dir(NS, "b"), "f")) == "x"


def test_a_failed_create_leaves_no_row_and_no_directory(snap, monkeypatch):
    layer(snap, NS, "A")
    before = snapshot_dirs(snap)

    def fail(path):
        raise OSError(errno.EIO, "disk on fire")
    monkeypatch.setattr(snapshot, "fsync_dir", fail)     # after the rename, before the commit
    with pytest.raises(OSError):
        snap.prepare(NS, "b", "A")
    monkeypatch.undo()
    assert [i["name"] for i in snap.list(NS)] == ["A"]
    assert snapshot_dirs(snap) == before
    snap.prepare(NS, "b", "A")                              # and the key is free to use


# --- namespaces ---------------------------------------------------------------------------------

def test_keys_are_per_namespace(snap):
    layer(snap, NS, "base", files={"f": "default"})
    layer(snap, OTHER, "base", files={"f": "other"})
    assert snap.upper_dir(NS, "base") != snap.upper_dir(OTHER, "base")
    assert read(os.path.join(snap.upper_dir(OTHER, "base"), "f")) == "other"
    snap.prepare(NS, "only-here", "base")
    assert [i["name"] for i in snap.list(OTHER)] == ["base"]
    with pytest.raises(NotFound):
        snap.stat(OTHER, "only-here")
    with pytest.raises(NotFound):
        snap.prepare(OTHER, "x", "only-here")              # parents are looked up in the namespace
    snap.remove(NS, "only-here")
    snap.remove(NS, "base")
    assert read(os.path.join(snap.upper_dir(OTHER, "base"), "f")) == "other"


def test_a_committed_snapshot_is_shared_into_another_namespace(snap, tmp_path):
    l1, l2 = "sha256:" + "1" * 64, "sha256:" + "2" * 64
    layer(snap, NS, l1, files={"bin/sh": "shell"})
    layer(snap, NS, l2, l1, files={"etc/conf": "conf"})
    dirs = snapshot_dirs(snap)
    id1, id2 = snap.find_committed(l1), snap.find_committed(l2)
    assert isinstance(id1, int) and id1 != id2
    assert snap.find_committed("sha256:" + "3" * 64) is None
    with pytest.raises(FailedPrecondition, match="parent"):
        snap.link(OTHER, l2, id2)                           # bottom up: its parent first
    with pytest.raises(NotFound):
        snap.link(OTHER, "some-other-name", id1)           # only under a name it is committed as
    info = snap.link(OTHER, l1, id1, labels={"containerd.io/snapshot.ref": l1})
    assert (info["name"], info["parent"], info["kind"]) == (l1, "", "committed")
    assert snap.link(OTHER, l2, id2)["parent"] == l1
    assert snap.link(OTHER, l2, id2)["name"] == l2        # again: no change
    with pytest.raises(AlreadyExists):
        snap.link(OTHER, l2, id1)
    assert snapshot_dirs(snap) == dirs                      # nothing was copied or applied
    assert snap.stat(OTHER, l1)["labels"] == {"containerd.io/snapshot.ref": l1}
    assert snap.stat(NS, l1)["labels"] == {}               # labels stay per namespace
    assert {w["namespace"] for w in snap.walk_all() if w["key"] == l2} == {NS, OTHER}

    # Gone from the first namespace, the trees stay for the second.
    snap.remove(NS, l2)
    snap.remove(NS, l1)
    assert snapshot_dirs(snap) == dirs
    snap.prepare(OTHER, "ctr", l2)
    if ROOT:
        target = tmp_path / "mnt"
        target.mkdir()
        with mounted(snap.mounts(OTHER, "ctr"), str(target)):
            assert read(target / "bin/sh") == "shell" and read(target / "etc/conf") == "conf"
    else:
        assert read(os.path.join(snap.lower_dirs(OTHER, "ctr")[0], "etc/conf")) == "conf"
    with pytest.raises(FailedPrecondition):
        snap.remove(OTHER, l2)
    for key in ("ctr", l2, l1):
        snap.remove(OTHER, key)
    assert snapshot_dirs(snap) == [] and snap.walk_all() == []


def test_only_committed_snapshots_can_be_linked(snap):
    snap.prepare(NS, "work")
    active_id = snap.walk_all()[0]["id"]
    with pytest.raises(NotFound):
        snap.link(OTHER, "work", active_id)
    assert snap.find_committed("work") is None
    with pytest.raises(InvalidArgument):
        snap.link(OTHER, "work", "1")


def test_a_shared_snapshot_stays_while_either_namespace_refers_to_it(snap):
    layer(snap, NS, "L", files={"f": "x"})
    snap.link(OTHER, "L", snap.find_committed("L"))
    dirs = snapshot_dirs(snap)
    snap.remove(OTHER, "L")
    assert snapshot_dirs(snap) == dirs and snap.stat(NS, "L")["kind"] == "committed"
    snap.link(OTHER, "L", snap.find_committed("L"))
    snap.remove(NS, "L")
    assert snapshot_dirs(snap) == dirs
    assert read(os.path.join(snap.upper_dir(OTHER, "L"), "f")) == "x"
    snap.remove(OTHER, "L")
    assert snapshot_dirs(snap) == []


# --- crash safety -------------------------------------------------------------------------------

def test_startup_clears_what_a_crash_left(tmp_path, events, overlay_ok):
    for name in ("overlayfs", "native") if overlay_ok else ("native",):
        s = open_backend(name, tmp_path / name, events)
        layer(s, NS, "keep", files={"f": "kept"})
        keep_id = s.find_committed("keep")
        layer(s, NS, "gone")
        gone_id = s.find_committed("gone")
        s.close()
        # A create cut short before its rename, a removal cut short mid-delete, a directory
        # renamed into place whose row never committed, and one whose row was deleted.
        write(os.path.join(s.dir, "new-0123456789abcdef", "fs", "half"), "x")
        write(os.path.join(s.dir, "rm-fedcba9876543210", "fs", "half"), "x")
        write(os.path.join(s.dir, "999", "fs", "never-committed"), "x")
        import sqlite3
        db = sqlite3.connect(os.path.join(s.root, "metadata.db"))
        with db:
            db.execute("DELETE FROM keys WHERE id = ?", (gone_id,))
            db.execute("DELETE FROM snapshots WHERE id = ?", (gone_id,))
        db.close()
        s = open_backend(name, tmp_path / name, events)
        assert snapshot_dirs(s) == [str(keep_id)]
        assert read(os.path.join(s.upper_dir(NS, "keep"), "f")) == "kept"
        assert [i["name"] for i in s.list(NS)] == ["keep"]
        s.close()


@pytest.mark.skipif(not ROOT, reason="mounting needs root")
def test_cleanup_detaches_a_mount_left_inside_a_stray_directory(native, tmp_path):
    stray = os.path.join(native.dir, "new-00000000000000aa", "fs")
    os.makedirs(stray)
    source = tmp_path / "precious"
    source.mkdir()
    (source / "keep-me").write_text("x")
    subprocess.run(["mount", "--bind", str(source), stray], check=True)
    try:
        assert native.cleanup() == ["new-00000000000000aa"]
    finally:
        if mounts_under(stray):
            subprocess.run(["umount", "-l", stray])
    assert snapshot_dirs(native) == []
    assert (source / "keep-me").read_text() == "x"          # detached, not deleted through
    assert not mounts_under(str(tmp_path))


def test_cleanup_at_runtime_leaves_work_in_progress_alone(native, monkeypatch):
    layer(native, NS, "A", files={"f": "x"})
    real = NativeSnapshotter._populate
    cleaned = []

    def populate(self, path, kind, parent_id):
        real(self, path, kind, parent_id)
        cleaned.extend(self.cleanup())
        assert os.path.isdir(path)
    monkeypatch.setattr(NativeSnapshotter, "_populate", populate)
    native.prepare(NS, "b", "A")
    assert cleaned == []
    assert read(os.path.join(native.upper_dir(NS, "b"), "f")) == "x"


# --- validation and errors ----------------------------------------------------------------------

def test_bad_requests(snap):
    layer(snap, NS, "A")
    snap.prepare(NS, "b", "A")
    snap.view(NS, "v", "A")
    with pytest.raises(AlreadyExists):
        snap.prepare(NS, "b", "A")
    with pytest.raises(AlreadyExists):
        snap.view(NS, "A")
    with pytest.raises(NotFound, match="parent"):
        snap.prepare(NS, "c", "missing")
    with pytest.raises(InvalidArgument, match="committed"):
        snap.prepare(NS, "c", "b")                          # an active snapshot cannot be a parent
    with pytest.raises(FailedPrecondition, match="only active"):
        snap.commit(NS, "V", "v")
    with pytest.raises(FailedPrecondition, match="only active"):
        snap.commit(NS, "AA", "A")
    with pytest.raises(AlreadyExists):
        snap.commit(NS, "A", "b")
    with pytest.raises(NotFound):
        snap.commit(NS, "X", "missing")
    with pytest.raises(NotFound):
        snap.mounts(NS, "missing")
    with pytest.raises(NotFound):
        snap.usage(NS, "missing")
    assert [i["name"] for i in snap.list(NS)] == ["A", "b", "v"]


@pytest.mark.parametrize("key", ["", "x" * 1025, "a\0b", 7])
def test_bad_keys_are_refused(native, key):
    with pytest.raises(InvalidArgument):
        native.prepare(NS, key)
    with pytest.raises(InvalidArgument):
        native.stat(NS, key)


def test_keys_never_become_paths(native):
    for key in ("../../etc", "/abs/path", "a/b/c", "sha256:" + "a" * 64, "k" * 1024):
        native.prepare(NS, key)
    assert snapshot_dirs(native) == ["1", "2", "3", "4", "5"]
    assert not os.path.exists(os.path.join(native.root, "..", "etc"))


def test_labels(snap):
    with pytest.raises(InvalidArgument):
        snap.prepare(NS, "a", labels={"k": 1})
    with pytest.raises(InvalidArgument):
        snap.prepare(NS, "a", labels={"k": "v" * 5000})
    snap.prepare(NS, "a", labels={"keep": "1", "drop": "2", "empty": ""})
    assert snap.stat(NS, "a")["labels"] == {"keep": "1", "drop": "2"}
    assert snap.update(NS, "a", {"new": "3", "drop": ""}, ["labels.new", "labels.drop"])["labels"] == \
        {"keep": "1", "new": "3"}
    assert snap.update(NS, "a", {"only": "this"})["labels"] == {"only": "this"}
    with pytest.raises(InvalidArgument):
        snap.update(NS, "a", {}, ["parent"])
    assert snap.stat(NS, "a")["updated_at"] > snap.stat(NS, "a")["created_at"]
    snap.commit(NS, "A", "a", labels={"committed": "yes"})    # commit replaces, as containerd
    assert snap.stat(NS, "A")["labels"] == {"committed": "yes"}
    assert [i["name"] for i in snap.list(NS, ['labels."committed"==yes'])] == ["A"]
    assert snap.list(NS, ['labels."committed"==no']) == []


def test_walk_all_names_every_key_in_every_namespace(snap):
    layer(snap, NS, "A")
    snap.prepare(NS, "b", "A", labels={"containerd.io/gc.root": "x"})
    layer(snap, OTHER, "Z")
    walked = snap.walk_all()
    assert [(w["namespace"], w["key"], w["kind"], w["parent"], w["labels"]) for w in walked] == [
        (NS, "A", "committed", "", {}), (NS, "b", "active", "A", {"containerd.io/gc.root": "x"}),
        (OTHER, "Z", "committed", "", {})]


# --- the actor ----------------------------------------------------------------------------------

def call(ns=NS):
    return Call(1, ns, None, None, [])


def test_actor_selects_the_snapshotter_by_name(native, tmp_path):
    actor = SnapshotActor({"native": native})
    actor.call = lambda service, method, args=None, **kw: None     # no other actors in a unit test
    actor.prepare(ns=NS, key="a", call=call(), snapshotter="native")
    assert [i["name"] for i in actor.list(ns=NS, snapshotter="native")] == ["a"]
    with pytest.raises(NotFound, match="not available on this machine"):
        actor.list(ns=NS)                                    # overlayfs, absent here
    with pytest.raises(NotFound, match="'zfs' not found"):
        actor.prepare(ns=NS, key="b", call=call(), snapshotter="zfs")
    assert actor.snapshotters() == [{"name": "native", "mode": "native", "root": native.root}]


def test_actor_schemas_check_keys_and_labels():
    prepare = SnapshotActor.methods["prepare"]
    assert prepare.blocking and not SnapshotActor.methods["stat"].blocking
    assert prepare.schema.bind({"key": "a", "parent": "p", "snapshotter": "native"})["key"] == "a"
    for bad in ({"key": "x" * 2000}, {"key": "a\0"}, {"key": "a", "labels": {"k": 1}}, {}):
        with pytest.raises(InvalidArgument):
            prepare.schema.bind(bad)
    for name in ("usage", "remove", "commit", "view", "link", "cleanup"):
        assert SnapshotActor.methods[name].blocking, name


@pytest.mark.skipif(not ROOT, reason="the overlay probe mounts")
def test_open_snapshotters_offers_overlayfs_where_it_mounts(tmp_path, overlay_ok):
    found = open_snapshotters(str(tmp_path / "snapshots"))
    try:
        assert sorted(found) == (["native", "overlayfs"] if overlay_ok else ["native"])
        assert found["native"].root == str(tmp_path / "snapshots" / "native")
        assert not [n for n in os.listdir(tmp_path / "snapshots") if n.startswith(".probe")]
        assert not mounts_under(str(tmp_path))
    finally:
        for s in found.values():
            s.close()
    # A root that overlay options cannot name is refused without trying.
    odd = tmp_path / "a,b"
    odd.mkdir()
    assert "cannot carry" in probe_overlay(str(odd))
