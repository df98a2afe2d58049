"""Hostile layers: each case tries to write, chmod, chown, link or delete outside the snapshot, or to
exhaust the disk or memory, and must not.

Every test applies its layer to `<tmp>/root` with `<tmp>/canary` (a file) and `<tmp>/outside/passwd`
(a file in a directory) beside it, and checks afterwards that nothing outside the root changed:
no new paths, and every existing one with the same content, mode, owner, times, links and xattrs.

The expected outcome follows containerd's TestBreakouts: where containerd confines (a symlink is a
legal entry; a name or link resolved through it is resolved inside the root) the test checks the
write landed inside the root; where the input is malformed or the name climbs out with `..`, the
apply raises InvalidArgument naming the entry. Each test's docstring says which it is. Cases that
in containerd's suite target /etc use the tmp directory's own files where a regression would
otherwise delete or rewrite the host's.
"""
from __future__ import annotations

import hashlib
import io
import os
import shutil
import stat
import tarfile
import time
import uuid
import zlib

import pytest

from actors import differ
from actors.differ import apply_layer
from bus.errors import InvalidArgument

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the differ runs as root")

MTIME = 1_600_000_000
CANARY = b"canary: must never change\n"


# --- the jail ---------------------------------------------------------------------------------------

class Jail:
    def __init__(self, base, mode: str):
        self.base = base
        self.mode = mode
        self.root = base / "root"
        self.canary = base / "canary"
        self.outside = base / "outside"
        self.root.mkdir()
        self.outside.mkdir()
        for path, mode_ in ((self.canary, 0o640), (self.outside / "passwd", 0o600)):
            path.write_bytes(CANARY)
            os.chmod(path, mode_)
            os.setxattr(path, "user.canary", b"1")
            os.utime(path, ns=(MTIME * 10**9, MTIME * 10**9))
        os.utime(self.outside, ns=(MTIME * 10**9, MTIME * 10**9))
        self.before = self.state()

    def state(self) -> dict:
        """Everything outside the root, down to the inode."""
        out = {}
        for dirpath, dirnames, filenames in os.walk(self.base):
            if os.path.samefile(dirpath, self.base) and "root" in dirnames:
                dirnames.remove("root")
            for name in [""] + dirnames + filenames:
                path = os.path.join(dirpath, name)
                st = os.lstat(path)
                content = None
                if stat.S_ISREG(st.st_mode):
                    with open(path, "rb") as f:
                        content = hashlib.sha256(f.read()).hexdigest()
                xattrs = {k: os.getxattr(path, k, follow_symlinks=False)
                          for k in os.listxattr(path, follow_symlinks=False)}
                out[path] = (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_nlink, st.st_ino,
                             st.st_mtime_ns, content, xattrs,
                             os.readlink(path) if stat.S_ISLNK(st.st_mode) else None)
        return out

    def apply(self, data: bytes, **kw) -> dict:
        return apply_layer(io.BytesIO(data), str(self.root), mode=self.mode, **kw)

    def assert_contained(self) -> None:
        after = self.state()
        assert sorted(after) == sorted(self.before), "paths appeared or vanished outside the root"
        for path, before in self.before.items():
            assert after[path] == before, f"{path} changed"
        assert stat.S_ISDIR(os.lstat(self.root).st_mode), "the root was replaced"


@pytest.fixture(params=["native", "overlay"])
def jail(request, tmp_path):
    j = Jail(tmp_path, request.param)
    yield j
    j.assert_contained()


class HostFile:
    """A host path outside the tmp directory that a broken applier would touch."""

    def __init__(self, path: str):
        self.path = path
        self.before = self._stat()

    def _stat(self):
        try:
            st = os.lstat(self.path)
        except FileNotFoundError:
            return None
        return (st.st_mode, st.st_uid, st.st_gid, st.st_size, st.st_nlink, st.st_ino, st.st_mtime_ns)

    def assert_unchanged(self) -> None:
        now = self._stat()
        if self.before is None and now is not None:          # a broken applier made it: clean up
            if stat.S_ISDIR(now[0]):
                shutil.rmtree(self.path)
            else:
                os.unlink(self.path)
        assert now == self.before, f"host path {self.path} changed"


# --- layer construction -----------------------------------------------------------------------------

def member(name, kind=tarfile.REGTYPE, *, data=b"", mode=0o644, linkname="", uid=0, gid=0,
           mtime=MTIME, pax=None):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.uid, info.gid, info.mtime = kind, mode, linkname, uid, gid, mtime
    if pax:
        info.pax_headers = pax
    if kind == tarfile.REGTYPE:
        info.size = len(data)
        return info, data
    return info, None


def layer(*members) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for info, data in members:
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def raw_header(name: bytes, typeflag: bytes = b"0", *, size: bytes | int = 0, mode: int = 0o644,
               linkname: bytes = b"", devmajor: bytes | int = 0, devminor: bytes | int = 0) -> bytes:
    """A ustar header built by hand, for values tarfile refuses to write."""
    h = bytearray(512)
    h[0:len(name)] = name
    h[100:108] = b"%07o\0" % mode
    h[108:116] = b"%07o\0" % 0
    h[116:124] = b"%07o\0" % 0
    h[124:136] = size if isinstance(size, bytes) else b"%011o\0" % size
    h[136:148] = b"%011o\0" % MTIME
    h[156:157] = typeflag
    h[157:157 + len(linkname)] = linkname
    h[257:265] = b"ustar\x0000"
    h[329:337] = devmajor if isinstance(devmajor, bytes) else b"%07o\0" % devmajor
    h[337:345] = devminor if isinstance(devminor, bytes) else b"%07o\0" % devminor
    h[148:156] = b" " * 8
    h[148:156] = b"%06o\0 " % sum(h)
    return bytes(h)


def base256(value: int, width: int) -> bytes:
    """GNU's binary number encoding: big-endian two's complement with the top bit of the first
    byte set for a positive number."""
    if value < 0:
        return value.to_bytes(width, "big", signed=True)
    encoded = bytearray(value.to_bytes(width, "big"))
    encoded[0] |= 0x80
    return bytes(encoded)


END = bytes(1024)


# --- symlinks: legal entries, confined resolution ----------------------------------------------------

def test_symlink_absolute_then_write_through_it(jail):
    """containerd SymlinkAbsolute: `localetc -> /etc` is a legal symlink; `localetc/unbroken`
    resolves through it inside the root, so the file lands in <root>/etc. Confined."""
    name = f"berth-breakout-{uuid.uuid4().hex}"
    host = HostFile(f"/etc/{name}")
    try:
        jail.apply(layer(member("etc", tarfile.DIRTYPE, mode=0o755),
                         member("localetc", tarfile.SYMTYPE, linkname="/etc"),
                         member(f"/localetc/{name}", data=b"unbroken")))
    finally:
        host.assert_unchanged()
    assert (jail.root / "etc" / name).read_bytes() == b"unbroken"
    assert os.readlink(jail.root / "localetc") == "/etc"


def test_symlink_absolute_to_host_dir_then_write_through_it(jail):
    """`out -> <tmp>/outside` (absolute) then `out/passwd`: resolved inside the root, the symlink
    leads to a directory that does not exist there. Rejected: the applier does not create
    directories through a dangling symlink; the host's outside/passwd is untouched."""
    with pytest.raises(InvalidArgument, match="out/passwd"):
        jail.apply(layer(member("out", tarfile.SYMTYPE, linkname=str(jail.outside)),
                         member("out/passwd", data=b"pwned")))


def test_symlink_up_and_out(jail):
    """containerd SymlinkUpAndOut: `localetc -> /dummy/../etc`, write through it. Confined to
    <root>/etc."""
    jail.apply(layer(member("etc", tarfile.DIRTYPE, mode=0o755), member("dummy", tarfile.DIRTYPE, mode=0o755),
                     member("localetc", tarfile.SYMTYPE, linkname="/dummy/../etc"),
                     member("/localetc/unbroken", data=b"unbroken")))
    assert (jail.root / "etc" / "unbroken").read_bytes() == b"unbroken"


def test_symlink_relative_up_and_out_many_levels(jail):
    """`localetc -> ../../../../../../../../etc` (far above the root), write through it: `..` stops
    at the root, so the file lands in <root>/etc. Confined."""
    jail.apply(layer(member("etc", tarfile.DIRTYPE, mode=0o755),
                     member("localetc", tarfile.SYMTYPE, linkname="../" * 8 + "etc"),
                     member("localetc/unbroken", data=b"unbroken")))
    assert (jail.root / "etc" / "unbroken").read_bytes() == b"unbroken"


def test_symlink_relative_up_and_out_to_host_dir(jail):
    """`up -> ../../../../<tmp>/outside`, then `up/passwd`: the `..` cannot leave the root, the
    directory does not exist inside it. Rejected; outside/passwd untouched."""
    target = "../" * 16 + str(jail.outside).lstrip("/")
    with pytest.raises(InvalidArgument, match="up/passwd"):
        jail.apply(layer(member("up", tarfile.SYMTYPE, linkname=target), member("up/passwd", data=b"pwned")))


def test_symlink_to_parent_relative_then_write(jail):
    """`p -> ..` then `p/canary`: the root's parent is the root itself, so the file is
    <root>/canary and <tmp>/canary is untouched. Confined."""
    jail.apply(layer(member("p", tarfile.SYMTYPE, linkname=".."), member("p/canary", data=b"inside")))
    assert (jail.root / "canary").read_bytes() == b"inside"


def test_symlink_multiple_absolute(jail):
    """containerd SymlinkMultipleAbsolute: a chain of absolute symlinks, written through. Confined."""
    jail.apply(layer(member("etc", tarfile.DIRTYPE, mode=0o755), member("dummy", tarfile.DIRTYPE, mode=0o755),
                     member("/dummy/etc", tarfile.SYMTYPE, linkname="/etc"),
                     member("localetc", tarfile.SYMTYPE, linkname="/dummy/etc"),
                     member("/dummy/etc/unbroken", data=b"unbroken")))
    assert (jail.root / "etc" / "unbroken").read_bytes() == b"unbroken"


def test_symlink_empty_file_through_link(jail):
    """containerd SymlinkEmptyFile: `localetc -> /etc`, then an empty `localetc/emptied`
    replaces the root's etc/emptied. Confined."""
    jail.apply(layer(member("etc", tarfile.DIRTYPE, mode=0o755), member("etc/emptied", data=b"notempty"),
                     member("localetc", tarfile.SYMTYPE, linkname="/etc"),
                     member("/localetc/emptied", data=b"")))
    assert (jail.root / "etc" / "emptied").read_bytes() == b""


def test_file_entry_over_symlink_to_canary(jail):
    """`c -> <tmp>/canary`, then a regular file `c`: the file replaces the symlink, it is not
    written through it. Applied; canary untouched."""
    jail.apply(layer(member("c", tarfile.SYMTYPE, linkname=str(jail.canary)),
                     member("c", data=b"pwned", mode=0o777)))
    assert not os.path.islink(jail.root / "c") and (jail.root / "c").read_bytes() == b"pwned"


def test_dir_entry_over_symlink_does_not_chmod_target(jail):
    """`x -> <tmp>/outside`, then directory `x` mode 0777: the directory replaces the symlink;
    outside keeps its mode. Applied."""
    jail.apply(layer(member("x", tarfile.SYMTYPE, linkname=str(jail.outside)),
                     member("x", tarfile.DIRTYPE, mode=0o777, uid=4242)))
    assert stat.S_ISDIR(os.lstat(jail.root / "x").st_mode)


def test_foo_tmp_x_then_foo_symlink_root_then_foo_tmp_x(jail):
    """`foo/tmp/x`, then `foo -> /` (replacing the directory foo), then `foo/tmp/x` again: the
    second write resolves foo to the root and lands in <root>/tmp/x, never in the host's /tmp.
    Confined (containerd's resolution)."""
    x = f"berth-breakout-{uuid.uuid4().hex}"
    host = HostFile(f"/tmp/{x}")
    try:
        jail.apply(layer(member(f"foo/tmp/{x}", data=b"first"),
                         member("foo", tarfile.SYMTYPE, linkname="/"),
                         member(f"foo/tmp/{x}", data=b"second")))
    finally:
        host.assert_unchanged()
    assert os.readlink(jail.root / "foo") == "/"
    assert (jail.root / "tmp" / x).read_bytes() == b"second"


def test_directory_override_symlink(tmp_path):
    """containerd DirectoryOverrideSymlink (native, parent has `localetc -> /etc`): the layer's
    directory `localetc/` replaces the symlink and the hardlink inside it targets <root>/etc."""
    j = Jail(tmp_path, "native")
    (j.root / "etc").mkdir()
    (j.root / "etc" / "passwd").write_bytes(b"inside")
    os.symlink("/etc", j.root / "localetc")
    j.apply(layer(member("/localetc/", tarfile.DIRTYPE, mode=0o755),
                  member("/localetc/localpasswd", tarfile.LNKTYPE, linkname="/etc/passwd")))
    assert stat.S_ISDIR(os.lstat(j.root / "localetc").st_mode)
    assert os.stat(j.root / "localetc" / "localpasswd").st_ino == os.stat(j.root / "etc" / "passwd").st_ino
    j.assert_contained()


def test_symlink_loop_in_parent(jail):
    """`a -> b`, `b -> a`, then `a/x`: the resolution loops. Rejected."""
    with pytest.raises(InvalidArgument, match="a/x"):
        jail.apply(layer(member("a", tarfile.SYMTYPE, linkname="b"), member("b", tarfile.SYMTYPE, linkname="a"),
                         member("a/x", data=b"x")))


# --- hardlinks --------------------------------------------------------------------------------------

def test_hardlink_to_etc_passwd_absolute(jail):
    """A hardlink to `/etc/passwd` with no etc/passwd in the layer: the target is looked up inside
    the root, where it does not exist. Rejected; the host's /etc/passwd keeps its link count.
    (The entry carries /etc/passwd's own mode, owner and mtime, so even a broken applier could
    not change it.)"""
    host = HostFile("/etc/passwd")
    st = os.stat("/etc/passwd")
    info, _ = member("pw", tarfile.LNKTYPE, linkname="/etc/passwd", mode=stat.S_IMODE(st.st_mode),
                     uid=st.st_uid, gid=st.st_gid, mtime=int(st.st_mtime))
    try:
        with pytest.raises(InvalidArgument, match="pw"):
            jail.apply(layer((info, None)))
    finally:
        host.assert_unchanged()


def test_hardlink_to_canary_absolute(jail):
    """A hardlink to the canary's absolute host path: looked up inside the root, missing. Rejected;
    the canary's link count stays 1."""
    with pytest.raises(InvalidArgument, match="not in the layer"):
        jail.apply(layer(member("h", tarfile.LNKTYPE, linkname=str(jail.canary), mode=0o777, uid=4242)))


def test_hardlink_absolute_confined_to_root(jail):
    """containerd HardlinkDirectAbsolute: `localpasswd` => `/etc/passwd` with etc/passwd in the
    layer links to <root>/etc/passwd. Confined."""
    jail.apply(layer(member("etc", tarfile.DIRTYPE, mode=0o770), member("/etc/passwd", data=b"inside"),
                     member("localpasswd", tarfile.LNKTYPE, linkname="/etc/passwd")))
    assert os.stat(jail.root / "localpasswd").st_ino == os.stat(jail.root / "etc" / "passwd").st_ino


def test_hardlink_to_parent_relative_escape(jail):
    """A hardlink to `../canary`: the target name climbs out of the root. Rejected."""
    with pytest.raises(InvalidArgument, match="outside the root"):
        jail.apply(layer(member("h", tarfile.LNKTYPE, linkname="../canary")))


def test_hardlink_to_nested_parent_relative_escape(jail):
    """A hardlink to `etc/../../canary`: still climbs out after cleaning. Rejected."""
    with pytest.raises(InvalidArgument, match="outside the root"):
        jail.apply(layer(member("etc", tarfile.DIRTYPE, mode=0o755),
                         member("h", tarfile.LNKTYPE, linkname="etc/../../canary")))


def test_hardlink_through_symlinked_dir_to_canary(jail):
    """`d -> <tmp>` (absolute), then a hardlink to `d/canary`: d resolves inside the root, where
    there is no canary. Rejected."""
    with pytest.raises(InvalidArgument, match="not in the layer"):
        jail.apply(layer(member("d", tarfile.SYMTYPE, linkname=str(jail.base)),
                         member("h", tarfile.LNKTYPE, linkname="d/canary")))


def test_hardlink_relative_through_symlink(jail):
    """containerd HardlinkRelative: `breakouts/d1 -> ../../etc`, hardlink to `/breakouts/d1/passwd`
    links <root>/etc/passwd. Confined."""
    jail.apply(layer(member("etc", tarfile.DIRTYPE, mode=0o770), member("/etc/passwd", data=b"inside"),
                     member("breakouts", tarfile.DIRTYPE, mode=0o755),
                     member("breakouts/d1", tarfile.SYMTYPE, linkname="../../etc"),
                     member("breakouts/mypasswd", tarfile.LNKTYPE, linkname="/breakouts/d1/passwd")))
    assert os.stat(jail.root / "breakouts" / "mypasswd").st_ino == os.stat(jail.root / "etc" / "passwd").st_ino


def test_hardlink_to_the_root_directory(jail):
    """A hardlink to `.`: directories cannot be hardlinked, least of all the root. Rejected."""
    with pytest.raises(InvalidArgument, match="root"):
        jail.apply(layer(member("h", tarfile.LNKTYPE, linkname=".")))


def test_symlink_then_hardlink_chmod_cve_2021_32760(jail):
    """CVE-2021-32760 (containerd HardlinkSymlinkChmod): `also-exists-outside-root` is a symlink to
    the canary; `sketchylink` is a hardlink to that symlink, mode 0777, owner 4242. The hardlink
    links the symlink itself, and neither chmod, chown, xattrs nor times follow it. Applied; the
    canary keeps mode 0640, its owner, its xattrs and its mtime."""
    info, _ = member("sketchylink", tarfile.LNKTYPE, linkname="also-exists-outside-root", mode=0o777,
                     uid=4242, gid=4242, mtime=1, pax={"SCHILY.xattr.user.pwned": "1",
                                                      "SCHILY.xattr.security.pwned": "1"})
    jail.apply(layer(member("also-exists-outside-root", tarfile.SYMTYPE, linkname=str(jail.canary)),
                     (info, None)))
    assert os.path.islink(jail.root / "sketchylink")
    assert os.lstat(jail.root / "sketchylink").st_uid == 4242
    assert stat.S_IMODE(os.stat(jail.canary).st_mode) == 0o640


def test_symlink_named_by_host_path_then_hardlink_chmod(jail):
    """containerd's HardlinkSymlinkChmod verbatim: the symlink's own name is the host path of
    outside/passwd and points at the canary; the hardlink names it by that absolute path. Both
    names are read inside the root. Applied; nothing outside changes."""
    jail.apply(layer(member(str(jail.outside / "passwd"), tarfile.SYMTYPE, linkname=str(jail.canary)),
                     member("sketchylink", tarfile.LNKTYPE, linkname=str(jail.outside / "passwd"), mode=0o777)))
    assert os.path.islink(jail.root / str(jail.outside / "passwd").lstrip("/"))


def test_hardlink_symlink_before_create_target(jail):
    """containerd HardlinkSymlinkBeforeCreateTarget: a hardlink to a symlink whose target appears
    later. Both live in the root."""
    jail.apply(layer(member("etc", tarfile.DIRTYPE, mode=0o770),
                     member("localpasswd", tarfile.SYMTYPE, linkname="/etc/passwd"),
                     member("localpasswd-dup", tarfile.LNKTYPE, linkname="localpasswd"),
                     member("/etc/passwd", data=b"after")))
    assert os.readlink(jail.root / "localpasswd-dup") == "/etc/passwd"


# --- the root itself --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", [".", "./", "/", "", "//", "a/..", "/../.."])
def test_dot_entry_is_symlink_cve_2021_29136(jail, name):
    """umoci CVE-2021-29136: an entry naming the root (`.`, `/`, and spellings of them) that is a
    symlink would turn the root into a link to anywhere. Rejected before anything is written;
    the entry after it (which would go through the link) never runs."""
    bad = raw_header(name.encode(), b"2", linkname=str(jail.outside).encode())
    with pytest.raises(InvalidArgument, match="replace the root"):
        jail.apply(bad + layer(member("passwd", data=b"pwned")))
    assert os.listdir(jail.root) == []


def test_slash_entry_is_symlink(jail):
    """`/` as a symlink to the outside directory. Rejected."""
    with pytest.raises(InvalidArgument, match="replace the root"):
        jail.apply(layer(member("/", tarfile.SYMTYPE, linkname=str(jail.outside))))


def test_dot_dot_entry_is_symlink(jail):
    """containerd SymlinkParentDirectory: a symlink named `..`. The name climbs out. Rejected."""
    with pytest.raises(InvalidArgument, match="outside the root"):
        jail.apply(layer(member("..", tarfile.SYMTYPE, linkname="/etc/")))


@pytest.mark.parametrize("kind", [tarfile.REGTYPE, tarfile.LNKTYPE, tarfile.FIFOTYPE])
def test_root_replaced_by_non_directory(jail, kind):
    """`.` as a file, hardlink or FIFO. Rejected."""
    with pytest.raises(InvalidArgument, match="replace the root"):
        jail.apply(layer(member(".", kind, linkname="x")))


def test_root_directory_entry_is_ignored(jail):
    """`./` as a directory (common in real layers) leaves the root's mode and owner alone."""
    os.chmod(jail.root, 0o711)
    result = jail.apply(layer(member("./", tarfile.DIRTYPE, mode=0o777, uid=4242), member("./f", data=b"f")))
    assert result["files"] == 1
    st = os.stat(jail.root)
    assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o711, 0)


# --- names ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["../canary", "a/../../canary", "../root/../canary", "../outside/passwd"])
def test_dot_dot_entry_name_rejected(jail, name):
    """Names that climb out of the root after lexical cleaning. Rejected."""
    with pytest.raises(InvalidArgument, match="outside the root"):
        jail.apply(layer(member(name, data=b"pwned")))


def test_absolute_entry_name_is_confined(jail):
    """An absolute name (the canary's own host path): read relative to the root, as containerd,
    Docker and GNU tar do (Distroless and kaniko layers carry absolute names). Confined."""
    jail.apply(layer(member(str(jail.canary), data=b"inside")))
    assert (jail.root / str(jail.canary).lstrip("/")).read_bytes() == b"inside"


def test_pax_path_with_nul(jail):
    """A PAX path with a NUL byte (`visible\\0hidden`). Rejected."""
    info, data = member("visible", data=b"x", pax={"path": "visible\0../../canary"})
    with pytest.raises(InvalidArgument, match="NUL"):
        jail.apply(layer((info, data)))


def test_pax_linkpath_escape(jail):
    """A symlink whose PAX linkpath differs from its header: the PAX value wins, as in Go; it is
    still only a symlink. A hardlink through PAX linkpath `../canary` is rejected."""
    info, _ = member("h", tarfile.LNKTYPE, linkname="harmless", pax={"linkpath": "../canary"})
    with pytest.raises(InvalidArgument, match="outside the root"):
        jail.apply(layer((info, None)))


# --- whiteouts --------------------------------------------------------------------------------------

@pytest.fixture
def populated(jail):
    """In native mode the root holds a parent tree: etc/passwd and etc/group."""
    if jail.mode == "native":
        (jail.root / "etc").mkdir()
        (jail.root / "etc" / "passwd").write_bytes(b"root:x:0:0")
        (jail.root / "etc" / "group").write_bytes(b"root:x:0:")
    return jail


def assert_parent_intact(j: Jail) -> None:
    if j.mode == "native":
        assert sorted(os.listdir(j.root / "etc")) == ["group", "passwd"]


def test_whiteout_dot_dot(populated):
    """containerd WhiteoutRoot: `.wh..` names the directory itself (the root). Rejected; the
    parent tree stays."""
    with pytest.raises(InvalidArgument, match="whiteout"):
        populated.apply(layer(member(".wh..")))
    assert_parent_intact(populated)


def test_whiteout_dot_dot_dot(populated):
    """containerd WhiteoutParent at the top: `.wh...` names the root's parent. Rejected."""
    with pytest.raises(InvalidArgument, match="whiteout"):
        populated.apply(layer(member(".wh...")))
    assert_parent_intact(populated)


def test_whiteout_in_etc_dot_dot(populated):
    """containerd WhiteoutParent: `etc/.wh...` would remove etc's parent. Rejected."""
    with pytest.raises(InvalidArgument, match="whiteout"):
        populated.apply(layer(member("etc/.wh...")))
    assert_parent_intact(populated)


def test_whiteout_in_etc_dot(populated):
    """containerd WhiteoutCurrentDirectory: `etc/.wh..` would remove etc. Rejected."""
    with pytest.raises(InvalidArgument, match="whiteout"):
        populated.apply(layer(member("etc/.wh..")))
    assert_parent_intact(populated)


def test_whiteout_prefix_alone(populated):
    """`.wh.` with no name after it. Rejected."""
    with pytest.raises(InvalidArgument, match="whiteout"):
        populated.apply(layer(member("etc/.wh.")))
    assert_parent_intact(populated)


def test_whiteout_name_escaping(populated):
    """`../.wh.canary`: the whiteout's directory is outside the root. Rejected."""
    with pytest.raises(InvalidArgument, match="outside the root"):
        populated.apply(layer(member("../.wh.canary")))


def test_whiteout_through_symlinked_parent(tmp_path):
    """`link -> /etc`, then `link/.wh.passwd` (containerd WhiteoutSymlinkPath), with the jail's
    outside directory standing in for /etc: the parent tree holds <root><outside>/passwd, and
    `link -> <outside>` resolves to it. Native: the root's copy is deleted (confined), the host's
    outside/passwd stays."""
    j = Jail(tmp_path, "native")
    inner = j.root / str(j.outside).lstrip("/")
    inner.mkdir(parents=True)
    (inner / "passwd").write_bytes(b"inside copy")
    (inner / "keep").write_bytes(b"keep")
    j.apply(layer(member("link", tarfile.SYMTYPE, linkname=str(j.outside)), member("link/.wh.passwd")))
    assert sorted(os.listdir(inner)) == ["keep"]
    j.assert_contained()


def test_whiteout_through_symlinked_parent_to_missing_dir(jail):
    """`link -> <outside>` with nothing at <root><outside>, then `link/.wh.passwd`. Native: nothing
    to delete inside the root, a no-op. Overlay: the whiteout device would need the directory,
    which would be created through a dangling symlink. Rejected."""
    data = layer(member("link", tarfile.SYMTYPE, linkname=str(jail.outside)), member("link/.wh.passwd"))
    if jail.mode == "native":
        jail.apply(data)
    else:
        with pytest.raises(InvalidArgument, match="link/.wh.passwd"):
            jail.apply(data)


def test_whiteout_of_a_symlink_removes_the_link_not_its_target(populated):
    """containerd WhiteoutSymlink: `.wh.localetc` where localetc -> <outside> deletes the link."""
    os.symlink(str(populated.outside), populated.root / "localetc")
    if populated.mode == "overlay":
        os.unlink(populated.root / "localetc")
    populated.apply(layer(member(".wh.localetc")))
    # overlay: no lower layer has the name, so no whiteout device is written for it either
    assert not os.path.lexists(populated.root / "localetc")


def test_opaque_through_symlinked_parent(populated):
    """`link -> <outside>`, then `link/.wh..wh..opq`: in native mode an opaque marker deletes the
    directory's contents, so following the link out would empty the host directory. The
    directory is resolved inside the root, where it is missing. Rejected."""
    with pytest.raises(InvalidArgument, match="link/.wh..wh..opq"):
        populated.apply(layer(member("link", tarfile.SYMTYPE, linkname=str(populated.outside)),
                              member("link/.wh..wh..opq")))
    assert_parent_intact(populated)


def test_opaque_through_relative_symlink_is_confined(populated):
    """`link -> ../../etc`, then `link/.wh..wh..opq`: resolved to <root>/etc. Native: etc's
    children from below are cleared (confined). Overlay: etc becomes opaque."""
    (populated.root / "etc").mkdir(exist_ok=True)
    populated.apply(layer(member("link", tarfile.SYMTYPE, linkname="../../etc"),
                          member("link/.wh..wh..opq")))
    if populated.mode == "native":
        assert os.listdir(populated.root / "etc") == []
    else:
        assert os.getxattr(populated.root / "etc", "trusted.overlay.opaque") == b"y"


def test_whiteout_directory_name_is_a_plain_directory(jail):
    """containerd WhiteoutDirectoryName: `.wh.etc/somefile` is a file inside a directory that
    happens to be called `.wh.etc`; it removes nothing."""
    jail.apply(layer(member(".wh.etc/somefile", data=b"non-empty")))
    assert (jail.root / ".wh.etc" / "somefile").read_bytes() == b"non-empty"


def test_layer_cannot_set_overlay_xattrs(jail):
    """trusted.* xattrs in a layer (trusted.overlay.opaque, .redirect, .metacopy steer overlayfs)
    are not applied, as containerd refuses admin attributes from archives."""
    jail.apply(layer(member("d", tarfile.DIRTYPE, mode=0o755,
                            pax={"SCHILY.xattr.trusted.overlay.opaque": "y",
                                 "SCHILY.xattr.trusted.overlay.redirect": "/" + str(jail.outside)}),
                     member("f", data=b"f", pax={"SCHILY.xattr.trusted.overlay.metacopy": ""})))
    assert not [k for k in os.listxattr(jail.root / "d") if k.startswith("trusted.")]


# --- devices ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("major, minor", [(1 << 32, 0), (0, 1 << 32), ((1 << 63) - 1, 5), (-1, 0)],
                         ids=["major-2^32", "minor-2^32", "major-2^63", "major-negative"])
def test_device_numbers_beyond_2_32(jail, major, minor):
    """A character device whose major or minor needs more than 32 bits (written in base-256, which
    tarfile refuses): truncated, it would make a different device than the header says.
    Rejected."""
    data = raw_header(b"dev", b"3", mode=0o666, devmajor=base256(major, 8), devminor=base256(minor, 8)) + END
    with pytest.raises(InvalidArgument, match="dev"):
        jail.apply(data)
    assert os.listdir(jail.root) == []


def test_device_numbers_the_kernel_cannot_hold(jail):
    """Major 4096 fits 32 bits but not Linux's 12-bit major: mknod refuses. Rejected."""
    data = raw_header(b"dev", b"3", mode=0o666, devmajor=4096, devminor=1) + END
    with pytest.raises(InvalidArgument, match="dev"):
        jail.apply(data)


# --- sizes, headers and bombs -----------------------------------------------------------------------

def test_tar_header_size_2_62(jail):
    """A regular file declaring 2^62 bytes (base-256 size field): rejected from the header alone,
    before any data is read or written."""
    data = raw_header(b"huge", size=base256(1 << 62, 12)) + bytes(4096) + END
    start = time.monotonic()
    with pytest.raises(InvalidArgument, match="declares"):
        jail.apply(data)
    assert time.monotonic() - start < 2
    assert os.listdir(jail.root) == []


def test_pax_size_2_62(jail):
    """The same size given in a PAX record, which overrides the header's. Rejected."""
    info, _ = member("huge", pax={"size": str(1 << 62)})
    with pytest.raises(InvalidArgument, match="declares"):
        jail.apply(layer((info, b"")))


def test_negative_size(jail):
    """A negative base-256 size. Rejected."""
    with pytest.raises(InvalidArgument, match="negative"):
        jail.apply(raw_header(b"neg", size=base256(-512, 12)) + END)


def test_entry_size_cap(jail, monkeypatch):
    """MAX_ENTRY_SIZE bounds one file's declared size."""
    monkeypatch.setattr(differ, "MAX_ENTRY_SIZE", 1 << 20)
    with pytest.raises(InvalidArgument, match="declares"):
        jail.apply(layer(member("big", data=bytes(2 << 20))))


def test_total_uncompressed_cap(jail, monkeypatch):
    """MAX_TOTAL_SIZE bounds the uncompressed layer, even one that is not compressed at all."""
    monkeypatch.setattr(differ, "MAX_TOTAL_SIZE", 4 << 20)
    with pytest.raises(InvalidArgument, match="larger than"):
        jail.apply(layer(*(member(f"f{i}", data=bytes(1 << 20)) for i in range(6))))


def gzip_zeros_bomb(declared: int, compressed_mib: int) -> bytes:
    """A gzip stream: a tar header declaring `declared` bytes, then zeros, `compressed_mib` MiB of
    deflate blocks that each inflate 1 MiB of zeros to ~1 KiB (deflate's limit is ~1030:1).
    Built from one full-flushed block repeated, so it costs nothing to make."""
    header = raw_header(b"zeros", size=base256(declared, 12))
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(header) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(1 << 20)) + c.flush(zlib.Z_FULL_FLUSH)
    count = (compressed_mib << 20) // len(block)
    gzip_header = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"
    return gzip_header + head + block * count


def test_gzip_bomb_1mib_to_20gib(jail):
    """1 MiB of gzip whose tar header declares a 20 GiB file of zeros (the stream itself holds
    1 GiB of them; deflate tops out near 1030:1). Past RATIO_GRACE (64 MiB) the output may not
    exceed MAX_RATIO (1000) times the compressed input: the apply stops at about 64 MiB with
    InvalidArgument, in well under the time it takes to write 20 GiB."""
    blob = gzip_zeros_bomb(20 << 30, 1)
    assert len(blob) <= (1 << 20) + 4096
    start = time.monotonic()
    with pytest.raises(InvalidArgument, match="decompression bomb"):
        jail.apply(blob)
    assert time.monotonic() - start < 10
    written = os.path.getsize(jail.root / "zeros")
    assert written < differ.RATIO_GRACE + (16 << 20)


def zstd_rle_bomb(declared: int, blocks: int) -> bytes:
    """A hand-made zstd frame: a raw block with the tar header, then `blocks` RLE blocks of 128 KiB
    of zeros at 4 bytes each (32768:1)."""
    header = raw_header(b"zeros", size=base256(declared, 12))
    frame = bytearray(b"\x28\xb5\x2f\xfd")
    frame += bytes([0x00, 0x38])                           # descriptor; window 128 KiB
    frame += ((len(header) << 3) | (0 << 1)).to_bytes(3, "little") + header
    rle = ((128 << 10) << 3 | (1 << 1)).to_bytes(3, "little") + b"\0"
    frame += rle * (blocks - 1)
    frame += ((128 << 10) << 3 | (1 << 1) | 1).to_bytes(3, "little") + b"\0"
    return bytes(frame)


def test_zstd_bomb_1mib_to_20gib(jail):
    """Under 1 MiB of zstd (RLE blocks) that inflates to 20 GiB, the file declared as 20 GiB.
    Stopped by the same ratio bound."""
    blob = zstd_rle_bomb(20 << 30, (20 << 30) // (128 << 10))
    assert len(blob) < 1 << 20
    start = time.monotonic()
    with pytest.raises(InvalidArgument, match="decompression bomb"):
        jail.apply(blob)
    assert time.monotonic() - start < 10
    assert os.path.getsize(jail.root / "zeros") < differ.RATIO_GRACE + (16 << 20)


def test_pax_header_larger_than_the_limit(jail):
    """A PAX header declaring 2 MiB of records is refused before it is read into memory."""
    data = raw_header(b"PaxHeaders/x", b"x", size=2 << 20) + bytes(2 << 20) + END
    with pytest.raises(InvalidArgument, match="PAX"):
        jail.apply(data)


def test_gnu_long_name_larger_than_the_limit(jail):
    """A GNU long-name header declaring 1 GiB is refused before it is read."""
    data = raw_header(b"././@LongLink", b"L", size=1 << 30) + bytes(4096)
    with pytest.raises(InvalidArgument, match="GNU long name"):
        jail.apply(data)


def test_endless_extension_headers(jail):
    """Extension headers that never reach a real entry. Rejected."""
    record = b"20 comment=aaaaaaaa\n"
    one = raw_header(b"PaxHeaders/x", b"x", size=len(record)) + record + bytes(512 - len(record))
    with pytest.raises(InvalidArgument, match="extension headers"):
        jail.apply(one * 100 + END)


def test_malformed_pax_record(jail):
    """A PAX record whose length points past the header. Rejected."""
    record = b"99 path=x\n"
    data = raw_header(b"PaxHeaders/x", b"x", size=len(record)) + record + bytes(512 - len(record))
    with pytest.raises(InvalidArgument, match="PAX"):
        jail.apply(data + raw_header(b"x") + END)


def test_gnu_sparse_is_refused(jail):
    """GNU sparse entries describe data placement by offsets; refused rather than interpreted."""
    with pytest.raises(InvalidArgument, match="sparse"):
        jail.apply(raw_header(b"sparse", b"S") + END)
