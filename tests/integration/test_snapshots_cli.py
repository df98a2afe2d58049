"""Snapshots as users see them: `berth snapshots …` and `client.snapshots` against a real berthd,
with both snapshotters. Trees are written through real mounts (`prepare --target`), show through
to children and views, stay apart by namespace, announce themselves on the event bus, survive a
daemon killed mid-flight, and bad input gets a one-line error. Every mount made is unmounted."""
from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess

import pytest

from actors.snapshot import mounts_under

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="snapshots are mounted, which needs root")

SNAPSHOTTERS = ["overlayfs", "native"]


def lines(result) -> list[str]:
    return [line for line in result.stdout.splitlines() if line.strip()]


def one_line_error(result) -> str:
    assert result.returncode != 0, result
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("berth: "), result.stderr
    return result.stderr.strip()


def snap(daemon, snapshotter: str, *args: str, check: bool = True, namespace: str | None = None):
    """`berth snapshots --snapshotter S ACTION …`."""
    return daemon.cli("snapshots", "--snapshotter", snapshotter, *args, check=check, namespace=namespace)


@contextlib.contextmanager
def mount_point(tmp_path, name: str):
    """A directory to mount on; whatever is mounted there is unmounted at the end."""
    path = tmp_path / name
    path.mkdir()
    try:
        yield path
    finally:
        while mounts_under(str(path)):
            subprocess.run(["umount", str(path)], check=True)


def unmount(path) -> None:
    subprocess.run(["umount", str(path)], check=True)


def read(path) -> str:
    with open(path) as f:
        return f.read()


@pytest.fixture
def no_leaks(daemon, tmp_path):
    yield
    assert not mounts_under(str(tmp_path)), "a mount was left behind"
    assert not mounts_under(daemon.dir), "a mount was left behind"


@pytest.mark.parametrize("snapshotter", SNAPSHOTTERS)
def test_build_a_chain_through_mounts(daemon, tmp_path, no_leaks, snapshotter):
    with mount_point(tmp_path, "mnt") as mnt:
        snap(daemon, snapshotter, "prepare", "--target", str(mnt), "base-work")
        (mnt / "etc").mkdir()
        (mnt / "etc" / "hostname").write_text("base\n")
        (mnt / "etc" / "motd").write_text("hello\n")
        unmount(mnt)
        snap(daemon, snapshotter, "commit", "base", "base-work")

        snap(daemon, snapshotter, "prepare", "-t", str(mnt), "app-work", "base")
        assert read(mnt / "etc" / "hostname") == "base\n"
        (mnt / "etc" / "motd").write_text("changed\n")
        (mnt / "app").mkdir()
        (mnt / "app" / "run").write_text("app\n")
        unmount(mnt)
        snap(daemon, snapshotter, "commit", "app", "app-work")

        snap(daemon, snapshotter, "prepare", "--target", str(mnt), "ctr", "app")
        assert read(mnt / "etc" / "motd") == "changed\n"
        assert read(mnt / "app" / "run") == "app\n"
        (mnt / "scratch").write_text("only in ctr\n")
        unmount(mnt)

        out = snap(daemon, snapshotter, "view", "--target", str(mnt), "--mounts", "look", "base")
        mounts = json.loads(out.stdout)
        assert mounts[0]["options"][0] == "ro"
        assert read(mnt / "etc" / "motd") == "hello\n"
        assert not (mnt / "app").exists()
        with pytest.raises(OSError):
            (mnt / "nope").write_text("x")
        unmount(mnt)

    assert lines(snap(daemon, snapshotter, "ls")) == [
        "KEY   PARENT  KIND",
        "app   base    Committed",
        "base          Committed",
        "ctr   app     Active",
        "look  base    View",
    ]
    assert lines(snap(daemon, snapshotter, "tree")) == [" base", "  \\_ app", "    \\_ ctr", "  \\_ look"]
    assert lines(snap(daemon, snapshotter, "ls", "-q", "kind==committed")) == ["app", "base"]
    info = json.loads(snap(daemon, snapshotter, "info", "ctr").stdout)
    assert (info["name"], info["parent"], info["kind"]) == ("ctr", "app", "active")
    assert "containerd.io/gc.root" in info["labels"]          # as ctr: CLI snapshots are GC roots

    usage = {row.split()[0]: row.split() for row in lines(snap(daemon, snapshotter, "usage", "-b"))[1:]}
    assert set(usage) == {"app", "base", "ctr", "look"}
    inodes = {key: int(row[2]) for key, row in usage.items()}
    if snapshotter == "native":        # each a full copy: / etc hostname motd [app run] [scratch]
        assert inodes == {"base": 4, "app": 6, "ctr": 7, "look": 4}
    else:                              # each its own changes: app copied etc up; ctr wrote scratch
        assert inodes == {"base": 4, "app": 5, "ctr": 2, "look": 1}
    human = lines(snap(daemon, snapshotter, "usage", "base"))
    assert human[0].split() == ["KEY", "SIZE", "INODES"] and human[1].split()[2] in ("B", "KiB")

    # rm, children first; each removed key is printed.
    assert lines(snap(daemon, snapshotter, "rm", "ctr", "look")) == ["ctr", "look"]
    assert lines(snap(daemon, snapshotter, "rm", "app", "base")) == ["app", "base"]
    assert lines(snap(daemon, snapshotter, "ls")) == ["KEY  PARENT  KIND"]
    assert os.listdir(os.path.join(daemon.root, "snapshots", snapshotter, "snapshots")) == []


def test_tree_prints_children_under_their_parents(daemon, no_leaks):
    for args in (["prepare", "a"], ["commit", "A", "a"], ["prepare", "b", "A"], ["commit", "B", "b"],
                 ["prepare", "c", "B"], ["view", "v", "A"], ["prepare", "other"]):
        snap(daemon, "overlayfs", *args)
    assert lines(snap(daemon, "overlayfs", "tree")) == [" A", "  \\_ B", "    \\_ c", "  \\_ v", " other"]


@pytest.mark.parametrize("snapshotter", SNAPSHOTTERS)
def test_mounts_prints_commands_that_work(daemon, tmp_path, no_leaks, snapshotter):
    snap(daemon, snapshotter, "prepare", "a")
    snap(daemon, snapshotter, "commit", "A", "a")
    snap(daemon, snapshotter, "prepare", "b", "A")
    with mount_point(tmp_path, "target") as target:
        (printed,) = lines(snap(daemon, snapshotter, "mounts", str(target), "b"))
        words = shlex.split(printed)
        if snapshotter == "overlayfs":
            assert words[:5] == ["mount", "-t", "overlay", "overlay", str(target)] and words[5] == "-o"
            assert words[6].split(",")[-1].startswith("lowerdir=")
        else:
            assert words[:2] == ["mount", "-t"] and words[2] == "bind" and words[4] == str(target)
            assert words[6] == "rw,rbind"
        subprocess.run(words, check=True)
        (target / "hello").write_text("via the printed command\n")
        unmount(target)
    upper = daemon.client().call("snapshot", "upper_dir", {"key": "b", "snapshotter": snapshotter})
    assert read(os.path.join(upper, "hello")) == "via the printed command\n"


def test_snapshotter_option_goes_before_or_after_the_action(daemon, no_leaks):
    daemon.cli("snapshots", "prepare", "--snapshotter", "native", "n")
    daemon.cli("snapshots", "--snapshotter", "native", "prepare", "m")
    assert lines(daemon.cli("snapshots", "--snapshotter", "native", "ls", "-q")) == ["m", "n"]
    assert lines(daemon.cli("snapshots", "ls", "-q")) == []            # overlayfs by default
    assert lines(daemon.cli("snapshot", "ls", "-q", "--snapshotter", "native")) == ["m", "n"]


def test_labels_and_json(daemon, no_leaks):
    snap(daemon, "overlayfs", "prepare", "a")
    out = snap(daemon, "overlayfs", "label", "a", "team=ci", "tier=1").stdout.strip()
    assert out.split(",")[1:] == ["team=ci", "tier=1"] and out.startswith("containerd.io/gc.root=")
    assert snap(daemon, "overlayfs", "label", "a", "tier=").stdout.strip().endswith(",team=ci")
    listed = json.loads(snap(daemon, "overlayfs", "ls", "--format", "json").stdout)
    assert listed[0]["labels"]["team"] == "ci" and listed[0]["kind"] == "active"
    assert lines(snap(daemon, "overlayfs", "ls", "-q", 'labels."team"==ci')) == ["a"]
    assert lines(snap(daemon, "overlayfs", "ls", "-q", 'labels."team"==cd')) == []


def test_namespaces_keep_keys_apart(daemon, no_leaks):
    snap(daemon, "overlayfs", "prepare", "k", namespace="one")
    snap(daemon, "overlayfs", "prepare", "k", namespace="two")
    snap(daemon, "overlayfs", "commit", "K", "k", namespace="two")
    assert lines(snap(daemon, "overlayfs", "ls", "-q", namespace="one")) == ["k"]
    assert lines(snap(daemon, "overlayfs", "ls", "-q", namespace="two")) == ["K"]
    one_line_error(snap(daemon, "overlayfs", "prepare", "x", "K", check=False, namespace="one"))
    assert lines(snap(daemon, "overlayfs", "ls", "-q")) == []


def test_client_library_and_events(daemon, no_leaks):
    client = daemon.client()
    head = client.events.head()
    client.snapshots.prepare("a", snapshotter="native")
    client.snapshots.commit("A", "a", snapshotter="native")
    mounts = client.snapshots.view("v", "A", snapshotter="native")
    assert mounts[0]["type"] == "bind" and mounts[0]["options"] == ["ro", "rbind"]
    assert client.snapshots.mounts("v", snapshotter="native") == mounts
    assert client.snapshots.stat("A", snapshotter="native")["kind"] == "committed"
    assert client.snapshots.usage("A", snapshotter="native")["inodes"] == 1
    client.snapshots.remove("v", snapshotter="native")
    assert [s["name"] for s in client.snapshots.list(snapshotter="native")] == ["A"]
    assert {s["name"] for s in client.snapshots.available()} == {"overlayfs", "native"}
    wanted = ["/snapshot/prepare", "/snapshot/commit", "/snapshot/remove"]
    seen = []
    for envelope in client.events.subscribe(since=head, filters=['topic~="^/snapshot/"'], timeout=10):
        seen.append((envelope["namespace"], envelope["topic"], envelope["event"]))
        if len(seen) == len(wanted):
            break
    assert seen == [("default", "/snapshot/prepare", {"key": "a", "parent": "", "snapshotter": "native"}),
                    ("default", "/snapshot/commit", {"key": "a", "name": "A", "snapshotter": "native"}),
                    ("default", "/snapshot/remove", {"key": "v", "snapshotter": "native"})]
    client.close()


def test_bad_input_gets_one_line_errors(daemon, tmp_path, no_leaks):
    assert "zfs" in one_line_error(snap(daemon, "zfs", "ls", check=False))
    assert "not found" in one_line_error(snap(daemon, "overlayfs", "info", "missing", check=False))
    assert "not found" in one_line_error(snap(daemon, "native", "mounts", "/mnt", "missing", check=False))
    assert "not found" in one_line_error(snap(daemon, "overlayfs", "commit", "X", "missing", check=False))
    assert "not found" in one_line_error(snap(daemon, "overlayfs", "prepare", "c", "missing", check=False))
    assert "not found" in one_line_error(snap(daemon, "overlayfs", "rm", "missing", check=False))
    assert "not found" in one_line_error(snap(daemon, "overlayfs", "usage", "missing", check=False))
    snap(daemon, "overlayfs", "prepare", "a")
    assert "only committed" in one_line_error(snap(daemon, "overlayfs", "prepare", "b", "a", check=False))
    assert "already exists" in one_line_error(snap(daemon, "overlayfs", "prepare", "a", check=False))
    snap(daemon, "overlayfs", "commit", "A", "a")
    snap(daemon, "overlayfs", "prepare", "b", "A")
    err = one_line_error(snap(daemon, "overlayfs", "rm", "A", check=False))
    assert "child" in err and "A" in err
    assert "only active" in one_line_error(snap(daemon, "overlayfs", "commit", "AA", "A", check=False))
    assert "committed" in one_line_error(snap(daemon, "overlayfs", "mounts", "/mnt", "A", check=False))
    assert "1024" in one_line_error(snap(daemon, "overlayfs", "info", "k" * 1025, check=False))
    assert "not a directory" in one_line_error(
        snap(daemon, "overlayfs", "prepare", "--target", str(tmp_path / "absent"), "c", "A", check=False))
    assert lines(snap(daemon, "overlayfs", "ls", "-q")) == ["A", "b"]
    # rm goes on past a failure, and says which failed.
    result = snap(daemon, "overlayfs", "rm", "A", "b", check=False)
    assert result.returncode == 1 and lines(result) == ["b"] and "child" in result.stderr
    assert lines(snap(daemon, "overlayfs", "rm", "A")) == ["A"]


def test_kill9_and_restart_keeps_snapshots_and_clears_leftovers(daemon, make_daemon, tmp_path, no_leaks):
    snap(daemon, "overlayfs", "prepare", "a")
    snap(daemon, "overlayfs", "commit", "A", "a")
    snap(daemon, "native", "prepare", "n")
    daemon.kill9()
    leftovers = []
    for name in SNAPSHOTTERS:
        top = os.path.join(daemon.root, "snapshots", name, "snapshots")
        for stray in ("new-00000000deadbeef", "rm-00000000deadbeef", "4242"):
            os.makedirs(os.path.join(top, stray, "fs"))
            leftovers.append(os.path.join(top, stray))
    again = make_daemon(dir=daemon.dir).start()
    assert lines(snap(again, "overlayfs", "ls", "-q")) == ["A"]
    assert lines(snap(again, "native", "ls", "-q")) == ["n"]
    assert not [p for p in leftovers if os.path.exists(p)]
    with mount_point(tmp_path, "mnt") as mnt:
        snap(again, "overlayfs", "prepare", "--target", str(mnt), "b", "A")
        (mnt / "after-restart").write_text("ok")
        unmount(mnt)
