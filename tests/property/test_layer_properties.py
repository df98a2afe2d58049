"""The layer applier against a model of OCI layer semantics, and against hostile layers.

Random stacks of layers, built from a three-letter alphabet so that names collide often (a file
replaced by a directory, a whiteout of a directory, an opaque directory over a merged one, a
hardlink to what a whiteout removed), are applied in order onto one tree (native mode) and as
separate overlay upper directories that are then mounted (overlay mode). Both views must equal
the tree a plain dictionary model computes; natively, hardlinks must share inodes as the model's
do.

Hostile layers (names with `..`, absolute names, symlinks out of the root followed by entries
written through them, hardlinks to outside files, whiteout tricks) must never change a canary
directory beside the root, whether the apply succeeds or fails.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import os
import shutil
import stat
import subprocess
import tarfile
import tempfile

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from actors.differ import apply_layer
from bus.errors import BerthError, InvalidArgument

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the differ runs as root")

NAMES = ["a", "b", "c"]
WH, OPAQUE, AUFS_META = ".wh.", ".wh..wh..opq", ".wh..wh.plnk"
DIR, FILE, SYMLINK, HARDLINK, FIFO, WHITEOUT = "dir", "file", "symlink", "hardlink", "fifo", "whiteout"


# --- the model ---------------------------------------------------------------------------------------

@dataclasses.dataclass(eq=False)
class Node:
    """One inode: hardlinked names share the object."""
    kind: str
    mode: int = 0
    owner: tuple[int, int] = (0, 0)
    data: bytes = b""
    target: str = ""

    def view(self) -> tuple:
        if self.kind == SYMLINK:
            return (SYMLINK, self.target, self.owner)
        return (self.kind, self.mode, self.owner, self.data)


@dataclasses.dataclass
class Entry:
    path: str                      # "" is the root
    kind: str
    mode: int = 0o644
    owner: tuple[int, int] = (0, 0)
    data: bytes = b""
    target: str = ""               # symlink target, or the path a hardlink names


def parent_of(path: str) -> str:
    return path.rpartition("/")[0]


def under(path: str, top: str) -> bool:
    return path.startswith(top + "/") if top else bool(path)


class Model:
    """A tree as {path: Node}, changed the way the OCI image spec says a layer changes it: entries
    in order, a directory onto a directory merges, anything else replaces what is there;
    `.wh.name` removes what the layers below put at name, `.wh..wh..opq` what they put in the
    directory, and neither removes what the same layer put there."""

    def __init__(self):
        self.tree: dict[str, Node] = {}

    def apply(self, entries: list[Entry]) -> bool:
        """Apply one layer; False where the applier must refuse it (a bad hardlink)."""
        ours: set[str] = set()
        return all(self.entry(e, ours) for e in entries)

    def entry(self, e: Entry, ours: set[str]) -> bool:
        base = e.path.rpartition("/")[2]
        if e.path == "" or base == AUFS_META:
            return True
        if base == OPAQUE:
            self.clear(parent_of(e.path), ours)
            return True
        if base.startswith(WH):
            gone = f"{parent_of(e.path)}/{base[len(WH):]}".lstrip("/")
            if gone not in self.tree:
                return True
            if gone not in ours:
                self.remove(gone, ours)
            elif self.tree[gone].kind == DIR:
                self.clear(gone, ours)
            return True
        existing = self.tree.get(e.path)
        if e.kind == DIR and existing is not None and existing.kind == DIR:
            existing.mode, existing.owner = e.mode, e.owner
            ours.add(e.path)
            return True
        self.remove(e.path, ours)
        if e.kind == HARDLINK:
            node = self.tree.get(e.target)
            if node is None or node.kind == DIR:
                return False
            node.mode, node.owner = e.mode, e.owner          # one inode, one set of attributes
        else:
            node = Node(e.kind, e.mode, e.owner, e.data, e.target)
        self.tree[e.path] = node
        ours.add(e.path)
        return True

    def remove(self, path: str, ours: set[str]) -> None:
        for p in [p for p in self.tree if p == path or under(p, path)]:
            del self.tree[p]
            ours.discard(p)

    def clear(self, top: str, ours: set[str]) -> None:
        for p in sorted(p for p in self.tree if under(p, top)):
            if p in self.tree and p not in ours:
                self.remove(p, ours)

    def view(self) -> dict[str, tuple]:
        return {p: n.view() for p, n in self.tree.items()}

    def link_groups(self) -> set[frozenset[str]]:
        by_node: dict[int, set[str]] = {}
        for p, n in self.tree.items():
            if n.kind != DIR:
                by_node.setdefault(id(n), set()).add(p)
        return {frozenset(g) for g in by_node.values() if len(g) > 1}


# --- layers ------------------------------------------------------------------------------------------

paths = st.lists(st.sampled_from(NAMES), min_size=1, max_size=3).map("/".join)
modes = st.sampled_from([0o755, 0o644, 0o700, 0o600, 0o4755, 0o2750, 0o1777, 0o000, 0o444, 0o7777])
owners = st.sampled_from([(0, 0), (1000, 1000), (7, 8)])
contents = st.sampled_from([b"", b"x", b"hello\n", bytes(range(256)) * 5]) | st.binary(max_size=12)
symlink_targets = st.sampled_from(["a", "b/c", "../a", "/a", "/", ".", "/nowhere/x", "c/../a", "../../.."])
ops = st.sampled_from([FILE, FILE, DIR, SYMLINK, HARDLINK, HARDLINK, FIFO, WHITEOUT, WHITEOUT,
                       OPAQUE, AUFS_META])


def draw_layer(draw, model: Model) -> list[Entry]:
    """One layer as a tar writer would lay it out: every path once, each parent directory as an
    entry of its own before its children, siblings in any order."""
    entries: dict[str, Entry] = {}
    for op, path in draw(st.lists(st.tuples(ops, paths), min_size=1, max_size=7)):
        parts = path.split("/")
        if op == WHITEOUT:
            parts[-1] = WH + parts[-1]
        elif op in (OPAQUE, AUFS_META):
            parts[-1] = op                          # in the directory above, the root included
        full = "/".join(parts)
        ancestors = ["/".join(parts[:i]) for i in range(1, len(parts))]
        if full in entries or any(a in entries and entries[a].kind != DIR for a in ancestors):
            continue
        for a in ancestors:
            entries.setdefault(a, Entry(a, DIR, draw(modes), draw(owners)))
        kind = {OPAQUE: WHITEOUT, AUFS_META: WHITEOUT}.get(op, op)
        entries[full] = Entry(full, kind, draw(modes), draw(owners))
        if kind == FILE:
            entries[full].data = draw(contents)
        elif kind == SYMLINK:
            entries[full].target = draw(symlink_targets)

    order: list[Entry] = [Entry("", DIR, 0o755)] if draw(st.booleans()) else []
    placed: set[str] = {""}
    pending = list(entries)
    while pending:
        ready = [p for p in pending if parent_of(p) in placed]
        path = draw(st.sampled_from(ready))
        pending.remove(path)
        placed.add(path)
        order.append(entries[path])

    # hardlink targets are chosen against the tree as it is when the link is applied
    sim, ours = Model(), set()
    sim.tree = copy.deepcopy(model.tree)            # a copy that keeps hardlinked names shared
    for e in order:
        if e.kind == HARDLINK:
            candidates = sorted(p for p, n in sim.tree.items()
                                if n.kind != DIR and p != e.path and not under(p, e.path))
            if candidates and draw(st.integers(0, 7)):
                e.target = draw(st.sampled_from(candidates))
            elif model.tree:                        # what was below: maybe removed by now
                e.target = draw(st.sampled_from(sorted(model.tree)) | paths)
            else:
                e.kind, e.data = FILE, b""          # nothing to link to
            node = sim.tree.get(e.target)
            if e.kind == HARDLINK and node is not None:
                # every name of an inode carries its attributes, as tar writers write them (in
                # overlay mode a link to a lower file links a copy: the lower names keep theirs)
                e.mode, e.owner = node.mode, node.owner
        if not sim.entry(e, ours):
            break
    return order


@st.composite
def layer_stacks(draw) -> list[tuple[str, list[Entry]]]:
    model, stack = Model(), []
    for _ in range(draw(st.integers(1, 4))):
        layer = draw_layer(draw, model)
        stack.append((draw(st.sampled_from(["", "./", "/"])), layer))
        if not model.apply(layer):
            break
    return stack


def tar_of(entries: list[Entry], prefix: str = "") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for e in entries:
            info = tarfile.TarInfo(prefix + e.path if e.path else ".")
            info.mode, (info.uid, info.gid), info.mtime = e.mode, e.owner, 1_600_000_000
            data = None
            if e.kind == DIR:
                info.type = tarfile.DIRTYPE
            elif e.kind == SYMLINK:
                info.type, info.linkname = tarfile.SYMTYPE, e.target
            elif e.kind == HARDLINK:
                info.type, info.linkname = tarfile.LNKTYPE, prefix + e.target
            elif e.kind == FIFO:
                info.type = tarfile.FIFOTYPE
            else:
                data = e.data
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


# --- the trees on disk -------------------------------------------------------------------------------

def observe(root: str) -> tuple[dict[str, tuple], set[frozenset[str]]]:
    """What the model tracks, read from disk, and the names that share an inode."""
    seen, inodes = {}, {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st_ = os.lstat(path)
            owner, mode = (st_.st_uid, st_.st_gid), stat.S_IMODE(st_.st_mode)
            if stat.S_ISDIR(st_.st_mode):
                seen[rel] = (DIR, mode, owner, b"")
                continue
            if stat.S_ISREG(st_.st_mode):
                with open(path, "rb") as f:
                    seen[rel] = (FILE, mode, owner, f.read())
            elif stat.S_ISLNK(st_.st_mode):
                seen[rel] = (SYMLINK, os.readlink(path), owner)
            elif stat.S_ISFIFO(st_.st_mode):
                seen[rel] = (FIFO, mode, owner, b"")
            else:
                seen[rel] = ("other", st_.st_mode, st_.st_rdev)
            inodes.setdefault((st_.st_dev, st_.st_ino), set()).add(rel)
    return seen, {frozenset(g) for g in inodes.values() if len(g) > 1}


@contextlib.contextmanager
def workdir():
    path = tempfile.mkdtemp(prefix="berth-prop-", dir="/tmp")
    try:
        yield path
    finally:
        shutil.rmtree(path)


@contextlib.contextmanager
def overlay_view(target: str, lowers: list[str]):
    """Read-only overlayfs of `lowers` (top first); unmounted whatever happens."""
    os.mkdir(target)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", "lowerdir=" + ":".join(lowers), target],
                   check=True, capture_output=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", target], check=True)


def apply(data: bytes, root: str, mode: str, lowers: list[str] | None = None) -> None:
    apply_layer(io.BytesIO(data), root, mode=mode, lowers=lowers)


def assert_same(seen: dict, expected: dict) -> None:
    assert sorted(seen) == sorted(expected)
    for path in expected:
        assert seen[path] == expected[path], path


# --- properties --------------------------------------------------------------------------------------

def check_stack(stack: list[tuple[str, list[Entry]]]) -> None:
    model = Model()
    expected_ok = [model.apply(layer) for _, layer in stack]
    tars = [tar_of(layer, prefix) for prefix, layer in stack]
    with workdir() as tmp:
        native = os.path.join(tmp, "native")
        os.mkdir(native)
        uppers = [os.path.join(tmp, f"layer{i}") for i in range(len(tars))]
        bottom = os.path.join(tmp, "empty")             # overlayfs wants two lowers at least
        os.mkdir(bottom)
        for i, (data, ok) in enumerate(zip(tars, expected_ok)):
            os.mkdir(uppers[i])
            lowers = uppers[:i][::-1]
            if not ok:
                with pytest.raises(InvalidArgument):
                    apply(data, native, "native")
                with pytest.raises(InvalidArgument):
                    apply(data, uppers[i], "overlay", lowers)
                return
            apply(data, native, "native")
            apply(data, uppers[i], "overlay", lowers)
        seen, groups = observe(native)
        assert_same(seen, model.view())
        assert groups == model.link_groups()
        with overlay_view(os.path.join(tmp, "merged"), uppers[::-1] + [bottom]) as merged:
            assert_same(observe(merged)[0], model.view())


@given(layer_stacks())
def test_layers_apply_as_the_model_says(stack):
    check_stack(stack)


def lower(*entries: Entry) -> tuple[str, list[Entry]]:
    return "", list(entries)


A_F = lower(Entry("a", DIR, 0o755), Entry("a/f", FILE, 0o644, data=b"f"), Entry("a/g", FILE, 0o600, data=b"g"))

# Stacks on which overlay mode once disagreed with the model (and with native mode).
REGRESSIONS = {
    # a whiteout with nothing below it showed in the merged directory as a name that
    # could not be opened
    "whiteout_with_nothing_below": [lower(Entry("a", DIR, 0o755), Entry("a/.wh.a", WHITEOUT))],
    # overlayfs ignores the opaque attribute on a layer's root: lower files stayed visible
    "opaque_root": [lower(Entry("a", FILE, 0o644), Entry("d", DIR, 0o755), Entry("d/x", FILE, 0o644)),
                    lower(Entry("d", DIR, 0o700), Entry("d/y", FILE, 0o644), Entry(".wh..wh..opq", WHITEOUT),
                          Entry("n", FILE, 0o644))],
    # a hardlink to a file this layer had hidden linked the whiteout device, or copied the file
    # back up from below
    "hardlink_to_whited_out_file": [A_F, lower(Entry("a", DIR, 0o755), Entry("a/.wh.f", WHITEOUT),
                                               Entry("h", HARDLINK, 0o644, target="a/f"))],
    "hardlink_into_opaque_directory": [A_F, lower(Entry("a", DIR, 0o755), Entry("a/.wh..wh..opq", WHITEOUT),
                                                  Entry("h", HARDLINK, 0o644, target="a/f"))],
    # the copy made for a hardlink to a lower file counted as this layer's own, so a later
    # whiteout or opaque marker of the same layer left it (and its directory) visible
    "whiteout_after_hardlink_to_lower_file": [lower(Entry("a", FILE, 0o755)),
                                              lower(Entry("b", HARDLINK, 0o755, target="a"), Entry(".wh.a", WHITEOUT))],
    "whiteout_of_directory_copied_for_hardlink": [A_F, lower(Entry("h", HARDLINK, 0o644, target="a/f"),
                                                             Entry(".wh.a", WHITEOUT))],
    "opaque_after_hardlink_to_lower_file": [A_F, lower(Entry("h", HARDLINK, 0o644, target="a/f"),
                                                       Entry("a", DIR, 0o700), Entry("a/.wh..wh..opq", WHITEOUT),
                                                       Entry("a/n", FILE, 0o600, data=b"n"))],
}


@pytest.mark.parametrize("name", sorted(REGRESSIONS))
def test_layer_regressions(name):
    check_stack(REGRESSIONS[name])


# --- hostile layers -----------------------------------------------------------------------------------

CANARY = "<canary>"            # replaced by the canary's absolute path when the tar is built
hostile_names = st.sampled_from([
    "../x", "../../canary/f", "a/../../x", "/../x", "..", "../canary", "../canary/d/new",
    "/a", "a/../b", "./a/./b", "s", "s/f", "s/d/g", "s/new", "s/.wh.f", "s/.wh..wh..opq",
    "s/d", "t/f", ".wh..", ".wh...", "a/.wh..", "../.wh.canary", "a", "a/b",
])
hostile_links = st.sampled_from([
    "../canary", "../../canary", "/", "..", "/..", "a/../../canary", CANARY, CANARY + "/f",
    CANARY + "/d", "../canary/f", "/etc/passwd", "s/f", "s/d/g", "s", "a",
])
hostile_kinds = st.sampled_from([FILE, DIR, SYMLINK, SYMLINK, HARDLINK, FIFO])


@st.composite
def hostile_layers(draw) -> list[list[Entry]]:
    layers = []
    for _ in range(draw(st.integers(1, 3))):
        entries = []
        for name, kind in draw(st.lists(st.tuples(hostile_names, hostile_kinds), min_size=1, max_size=8)):
            target = draw(hostile_links) if kind in (SYMLINK, HARDLINK) else ""
            entries.append(Entry(name, kind, draw(modes), (0, 0), b"pwned", target))
        layers.append(entries)
    return layers


def canary_state(canary: str) -> dict:
    state = {}
    for dirpath, dirnames, filenames in os.walk(canary):
        for name in [""] + dirnames + filenames:
            path = os.path.join(dirpath, name) if name else dirpath
            st_ = os.lstat(path)
            data = open(path, "rb").read() if stat.S_ISREG(st_.st_mode) else None
            state[os.path.relpath(path, canary)] = (st_.st_mode, st_.st_uid, st_.st_nlink,
                                                     st_.st_mtime_ns, data)
    return state


def make_canary(canary: str) -> None:
    os.makedirs(os.path.join(canary, "d"))
    for rel in ("f", "d/g"):
        with open(os.path.join(canary, rel), "wb") as f:
            f.write(b"canary")
    os.utime(os.path.join(canary, "d"), ns=(1, 1))
    os.utime(canary, ns=(1, 1))


@given(hostile_layers(), st.sampled_from(["native", "overlay"]))
@example([[Entry("s", SYMLINK, target="../canary"), Entry("s/f", FILE, data=b"pwned")]], "native")
@example([[Entry("s", SYMLINK, target=CANARY)], [Entry("s/.wh.f", WHITEOUT)]], "native")
@example([[Entry("s", SYMLINK, target=CANARY)], [Entry("s/.wh..wh..opq", WHITEOUT)]], "native")
@example([[Entry("h", HARDLINK, target="../canary/f")]], "overlay")
@example([[Entry("s", SYMLINK, target=CANARY + "/f")], [Entry("s", FILE, mode=0o777)]], "native")
@example([[Entry("s", SYMLINK, target=CANARY), Entry("h", HARDLINK, target="s/f")]], "native")
def test_hostile_layers_never_write_outside_the_root(layers, mode):
    with workdir() as tmp:
        root, canary = os.path.join(tmp, "root"), os.path.join(tmp, "canary")
        os.mkdir(root)
        make_canary(canary)
        before = canary_state(canary)
        made, applied = ["root", "canary"], []
        for i, layer in enumerate(layers):
            layer = [dataclasses.replace(e, target=e.target.replace(CANARY, canary)) for e in layer]
            target = root
            if mode == "overlay" and i:
                made.append(f"upper{i}")
                target = os.path.join(tmp, made[-1])
                os.mkdir(target)
            try:
                apply(tar_of(layer), target, mode, applied[::-1] if mode == "overlay" else None)
            except BerthError as e:
                assert e.code == InvalidArgument.code, e
                break
            applied.append(target)
        assert canary_state(canary) == before
        assert sorted(os.listdir(tmp)) == sorted(made)
