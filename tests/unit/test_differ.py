"""The differ: layers applied in both modes, changesets written from both, and round trips.

Needs root (owners, devices, trusted.* xattrs, overlay mounts), as berthd does.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import shutil
import stat
import subprocess
import tarfile

import pytest
import zstandard

from actors import differ
from actors.differ import apply_layer, write_changes
from bus.errors import InvalidArgument

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the differ runs as root")

MTIME = 1_600_000_000


# --- helpers ----------------------------------------------------------------------------------------

def snapshot(root, *, mtimes: bool = True) -> dict:
    """Everything that a layer carries about a tree: per path its type, mode, owner, size, content
    hash, link target, layer xattrs, device number, mtime (whole seconds, as layers carry them),
    and for hardlinked files the set of names sharing the inode."""
    root = os.fspath(root)
    by_inode: dict[tuple, list[str]] = {}
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(dirnames) + sorted(filenames):
            path = os.path.join(dirpath, name)
            rel = os.path.relpath(path, root)
            st = os.lstat(path)
            kind = stat.S_IFMT(st.st_mode)
            digest = None
            if kind == stat.S_IFREG:
                with open(path, "rb") as f:
                    digest = hashlib.sha256(f.read()).hexdigest()
                if st.st_nlink > 1:
                    by_inode.setdefault((st.st_dev, st.st_ino), []).append(rel)
            xattrs = {}
            for key in os.listxattr(path, follow_symlinks=False):
                if not key.startswith("trusted."):
                    xattrs[key] = os.getxattr(path, key, follow_symlinks=False)
            out[rel] = {
                "type": kind, "mode": stat.S_IMODE(st.st_mode), "uid": st.st_uid, "gid": st.st_gid,
                "size": st.st_size if kind in (stat.S_IFREG, stat.S_IFLNK) else None,
                "sha256": digest,
                "target": os.readlink(path) if kind == stat.S_IFLNK else None,
                "xattrs": xattrs,
                "rdev": st.st_rdev if kind in (stat.S_IFCHR, stat.S_IFBLK) else None,
                "mtime": int(st.st_mtime) if mtimes and kind != stat.S_IFLNK else None,
            }
    for names in by_inode.values():
        for rel in names if len(names) > 1 else ():
            out[rel]["links"] = tuple(sorted(names))
    return out


def assert_same_tree(a, b, *, mtimes: bool = True) -> None:
    sa, sb = snapshot(a, mtimes=mtimes), snapshot(b, mtimes=mtimes)
    assert sorted(sa) == sorted(sb)
    for path in sa:
        assert sa[path] == sb[path], path


def settime(path, t=MTIME) -> None:
    os.utime(path, (t, t), follow_symlinks=False)


def build_tree(root) -> None:
    """A tree with one of everything a layer can hold."""
    root = os.fspath(root)
    j = lambda *p: os.path.join(root, *p)   # noqa: E731
    os.makedirs(j("etc", "conf.d"))
    os.makedirs(j("usr", "bin"))
    os.makedirs(j("home", "alice"))
    with open(j("etc", "hosts"), "wb") as f:
        f.write(b"127.0.0.1 localhost\n")
    with open(j("etc", "conf.d", "big"), "wb") as f:
        f.write(os.urandom(3 << 20) + b"tail")
    os.link(j("etc", "hosts"), j("etc", "hosts.allow"))
    with open(j("usr", "bin", "tool"), "wb") as f:
        f.write(b"\x7fELF" + bytes(1000))
    os.chmod(j("usr", "bin", "tool"), 0o4755)                        # setuid
    with open(j("usr", "bin", "sgid"), "wb") as f:
        f.write(b"g")
    os.chmod(j("usr", "bin", "sgid"), 0o2711)
    os.symlink("tool", j("usr", "bin", "alias"))
    os.symlink("/etc/hosts", j("usr", "abs-link"))
    os.symlink("../../nowhere", j("usr", "dangling"))
    os.mkfifo(j("home", "fifo"), 0o600)
    os.mknod(j("home", "null"), stat.S_IFCHR | 0o666, os.makedev(1, 3))
    os.mknod(j("home", "blk"), stat.S_IFBLK | 0o660, os.makedev(7, 200))
    with open(j("home", "alice", "notes"), "wb") as f:
        f.write(b"alice's")
    os.chown(j("home", "alice", "notes"), 1000, 1000)
    os.chown(j("home", "alice"), 1000, 1001)
    os.chmod(j("home", "alice"), 0o700)
    os.mkdir(j("tmp"))
    os.chmod(j("tmp"), 0o1777)                                       # sticky
    os.setxattr(j("etc", "hosts"), "user.x", b"hello")
    os.setxattr(j("home", "alice"), "user.dir", b"\x00\x01binary")
    os.setxattr(j("usr", "bin", "tool"), "security.capability",
                bytes.fromhex("0100000200200000000000000000000000000000"))
    os.chown(j("usr", "abs-link"), 7, 8, follow_symlinks=False)
    for dirpath, dirnames, filenames in os.walk(root, topdown=False):
        for name in filenames + dirnames:
            settime(os.path.join(dirpath, name))
    settime(root)


def gnu_tar(src) -> bytes:
    """The tree as GNU tar writes it: an independent writer for the applier."""
    return subprocess.run(["tar", "--xattrs", "--xattrs-include=*", "--numeric-owner", "--format=posix",
                           "-C", os.fspath(src), "-cf", "-", "."], check=True, capture_output=True).stdout


def tar_of(*members) -> bytes:
    """A tar from (TarInfo, data) pairs, or TarInfo alone."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tf:
        for m in members:
            info, data = m if isinstance(m, tuple) else (m, None)
            if data is not None:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if data is not None else None)
    return buf.getvalue()


def entry(name, kind=tarfile.REGTYPE, *, mode=0o644, linkname="", uid=0, gid=0, mtime=MTIME,
          xattrs=None, data=None, devmajor=0, devminor=0):
    info = tarfile.TarInfo(name)
    info.type, info.mode, info.linkname, info.uid, info.gid, info.mtime = kind, mode, linkname, uid, gid, mtime
    info.devmajor, info.devminor = devmajor, devminor
    if xattrs:
        info.pax_headers = {"SCHILY.xattr." + k: v for k, v in xattrs.items()}
    if kind == tarfile.REGTYPE:
        return info, (data if data is not None else b"")
    return info


def apply_bytes(data: bytes, root, mode: str, **kw) -> dict:
    return apply_layer(io.BytesIO(data), os.fspath(root), mode=mode, **kw)


def changes(lower, upper, mode: str) -> tuple[bytes, dict]:
    out = io.BytesIO()
    result = write_changes(lower, os.fspath(upper), out, mode=mode)
    return out.getvalue(), result


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def overlay_mount(target, lowers, upper=None, work=None):
    """Mount overlayfs (lowers top first); unmounted whatever happens."""
    opts = "lowerdir=" + ":".join(os.fspath(x) for x in lowers)
    if upper is not None:
        opts += f",upperdir={os.fspath(upper)},workdir={os.fspath(work)}"
    os.makedirs(target, exist_ok=True)
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, os.fspath(target)], check=True)
    try:
        yield target
    finally:
        subprocess.run(["umount", os.fspath(target)], check=True)


def is_whiteout(path) -> bool:
    st = os.lstat(path)
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def opaque(path) -> bool:
    try:
        return os.getxattr(path, "trusted.overlay.opaque") == b"y"
    except OSError:
        return False


@pytest.fixture
def src(tmp_path):
    build_tree(tmp_path / "src")
    return tmp_path / "src"


# --- applying: round trips --------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["native", "overlay"])
def test_apply_gnu_tar_reproduces_the_tree(src, tmp_path, mode):
    out = tmp_path / "out"
    out.mkdir()
    layer = gnu_tar(src)
    result = apply_bytes(layer, out, mode)
    assert result["diff_id"] == sha(layer)
    assert result["size"] == len(layer)
    assert result["files"] == len(snapshot(src))
    assert_same_tree(src, out)
    assert os.stat(out / "usr/bin/tool").st_mode & 0o7777 == 0o4755      # chmod after chown
    assert os.getxattr(out / "usr/bin/tool", "security.capability")     # xattr after chown


@pytest.mark.parametrize("mode", ["native", "overlay"])
def test_write_changes_of_a_base_tree_round_trips(src, tmp_path, mode):
    layer, result = changes(None, src, mode)
    assert result == {"diff_id": sha(layer), "size": len(layer)}
    out = tmp_path / "out"
    out.mkdir()
    apply_bytes(layer, out, "native")
    assert_same_tree(src, out)


def test_write_changes_is_deterministic_and_readable_by_tarfile(src):
    first, _ = changes(None, src, "native")
    second, _ = changes(None, src, "native")
    assert first == second
    with tarfile.open(fileobj=io.BytesIO(first)) as tf:
        ordered = tf.getmembers()
    members = {m.name: m for m in ordered}
    assert members["etc/"].isdir() if "etc/" in members else members["etc"].isdir()
    assert members["etc/hosts.allow"].islnk() and members["etc/hosts.allow"].linkname == "etc/hosts"
    assert members["usr/bin/tool"].mode == 0o4755
    assert members["home/null"].ischr() and (members["home/null"].devmajor, members["home/null"].devminor) == (1, 3)
    assert members["etc/hosts"].pax_headers["SCHILY.xattr.user.x"] == "hello"
    assert members["usr/abs-link"].uid == 7
    assert all(not m.uname and not m.gname for m in members.values())
    names = [m.name.rstrip("/") for m in ordered]
    for i, name in enumerate(names):                  # parents before children
        parent = os.path.dirname(name)
        assert not parent or parent in names[:i]


def test_long_names_and_link_targets_round_trip(tmp_path):
    src = tmp_path / "src"
    deep = src / ("d" * 90) / ("e" * 90)
    deep.mkdir(parents=True)
    (deep / ("f" * 120)).write_bytes(b"deep")
    os.symlink("t" * 300, deep / "long-link")
    os.link(deep / ("f" * 120), src / "short")
    for p in (deep / ("f" * 120), deep / "long-link", deep, deep.parent):
        settime(p)
    layer, _ = changes(None, src, "native")
    out = tmp_path / "out"
    out.mkdir()
    apply_bytes(layer, out, "native")
    assert_same_tree(src, out)


def test_tar_formats_gnu_longname_and_ustar_prefix(tmp_path):
    """GNU long names ('L'), ustar prefix splitting and base-256 numbers, as other writers emit."""
    long = "a" * 60 + "/" + "b" * 60 + "/" + "c" * 80
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.GNU_FORMAT) as tf:
        info, data = entry(long, data=b"gnu", uid=3_000_000)           # uid needs base-256 in GNU
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    buf2 = io.BytesIO()
    with tarfile.open(fileobj=buf2, mode="w", format=tarfile.USTAR_FORMAT) as tf:
        info, data = entry("p" * 80 + "/" + "q" * 90, data=b"ustar")   # fits only with the prefix
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    root = tmp_path / "root"
    root.mkdir()
    apply_bytes(buf.getvalue(), root, "native")
    apply_bytes(buf2.getvalue(), root, "native")
    assert (root / long).read_bytes() == b"gnu"
    assert os.stat(root / long).st_uid == 3_000_000
    assert (root / ("p" * 80) / ("q" * 90)).read_bytes() == b"ustar"


def test_pax_times_keep_nanoseconds_and_dirs_get_their_mtime_last(tmp_path):
    d = entry("dir", tarfile.DIRTYPE, mode=0o755)
    d.pax_headers = {"mtime": "1500000000.123456789"}
    layer = tar_of(d, entry("dir/file", data=b"x", mtime=1234), entry("dir/sub", tarfile.DIRTYPE, mode=0o700))
    root = tmp_path / "root"
    root.mkdir()
    apply_bytes(layer, root, "native")
    assert os.stat(root / "dir").st_mtime_ns == 1_500_000_000_123_456_789
    assert os.stat(root / "dir" / "file").st_mtime == 1234
    assert os.stat(root / "dir" / "sub").st_mtime == MTIME


# --- compression and the diff_id ---------------------------------------------------------------------

@pytest.mark.parametrize("compression", ["plain", "gzip", "zstd", "gzip-multimember", "zstd-multiframe"])
def test_diff_id_is_the_sha256_of_the_uncompressed_stream(src, tmp_path, compression):
    layer = gnu_tar(src)
    if compression == "plain":
        blob = layer
    elif compression == "gzip":
        blob = gzip.compress(layer)
    elif compression == "gzip-multimember":
        half = len(layer) // 2
        blob = gzip.compress(layer[:half]) + gzip.compress(layer[half:])
    elif compression == "zstd":
        blob = zstandard.ZstdCompressor().compress(layer)
    else:
        half = len(layer) // 3
        c = zstandard.ZstdCompressor()
        blob = c.compress(layer[:half]) + c.compress(layer[half:])
    out = tmp_path / "out"
    out.mkdir()
    result = apply_bytes(blob, out, "native", media_type="application/vnd.oci.image.layer.v1.tar+gzip")
    assert result["diff_id"] == sha(layer)
    assert result["size"] == len(layer)
    assert_same_tree(src, out)


def test_diff_id_covers_bytes_after_the_end_of_archive(tmp_path):
    layer = tar_of(entry("a", data=b"a")) + bytes(10240)       # GNU tar pads to a 10 KiB record
    result = apply_bytes(gzip.compress(layer), tmp_path, "native")
    assert result["diff_id"] == sha(layer) and result["size"] == len(layer)


def test_empty_stream_is_an_empty_layer(tmp_path):
    assert apply_bytes(b"", tmp_path, "native") == {"diff_id": sha(b""), "size": 0, "files": 0}


BIG_TAR = tar_of(entry("f", data=os.urandom(300_000)))
BROKEN = {
    "bzip2": (b"BZh91AY&SY" + bytes(100), "bzip2"),
    "xz": (b"\xfd7zXZ\x00" + bytes(100), "xz"),
    "gzip-truncated": (gzip.compress(BIG_TAR)[:-20], "truncated"),
    "gzip-bad-crc": (gzip.compress(BIG_TAR)[:-8] + b"\0\0\0\0" + gzip.compress(BIG_TAR)[-4:], "corrupt"),
    "gzip-trailing-garbage": (gzip.compress(BIG_TAR) + b"garbage!", "not gzip"),
    "zstd-truncated": (zstandard.ZstdCompressor().compress(BIG_TAR)[:-30], "zstd stream is truncated"),
    "zstd-trailing-garbage": (zstandard.ZstdCompressor().compress(BIG_TAR) + b"junk", "zstd stream is corrupt"),
}


@pytest.mark.parametrize("blob, message", list(BROKEN.values()), ids=list(BROKEN))
def test_unsupported_or_broken_compression_is_invalid(tmp_path, blob, message):
    with pytest.raises(InvalidArgument, match=message):
        apply_bytes(blob, tmp_path, "native")


def test_truncated_tar_is_invalid(tmp_path):
    layer = tar_of(entry("f", data=b"z" * 5000))
    with pytest.raises(InvalidArgument, match="ends in the middle"):
        apply_bytes(layer[:1500], tmp_path, "native")


def test_bad_header_checksum_is_invalid(tmp_path):
    layer = bytearray(tar_of(entry("f", data=b"z")))
    layer[0] ^= 1
    with pytest.raises(InvalidArgument, match="checksum"):
        apply_bytes(bytes(layer), tmp_path, "native")


def test_compressible_layer_below_the_ratio_grace_applies(tmp_path):
    layer = tar_of(entry("zeros", data=bytes(32 << 20)))
    result = apply_bytes(gzip.compress(layer, 9), tmp_path, "native")
    assert result["size"] == len(layer)
    assert os.path.getsize(tmp_path / "zeros") == 32 << 20


def test_threaded_and_inline_decompression_agree(src, tmp_path):
    blob = gzip.compress(gnu_tar(src))
    got = []
    for threaded in (True, False):
        stream = differ._Stream(io.BytesIO(blob), threaded=threaded)
        try:
            stream.drain()
        finally:
            stream.close()
        got.append((stream.hasher.hexdigest(), stream.total))
    assert got[0] == got[1]


# --- native mode: whiteouts and opaque directories ---------------------------------------------------

@pytest.fixture
def parent(tmp_path):
    """A parent tree as the native snapshotter copies it."""
    root = tmp_path / "parent"
    for d in ("keep", "gone-dir/sub", "opq/old-dir", "mixed"):
        (root / d).mkdir(parents=True)
    for f in ("keep/a", "gone-file", "gone-dir/sub/x", "opq/old", "opq/old-dir/y", "mixed/old"):
        (root / f).write_bytes(f.encode())
    os.symlink("keep/a", root / "gone-link")
    return root


def test_native_whiteouts_delete_files_dirs_and_links(parent):
    layer = tar_of(entry(".wh.gone-file"), entry(".wh.gone-dir"), entry(".wh.gone-link"),
                   entry("keep/.wh.missing"), entry("nowhere/.wh.x"))
    result = apply_bytes(layer, parent, "native")
    assert result["files"] == 5
    assert sorted(os.listdir(parent)) == ["keep", "mixed", "opq"]
    assert (parent / "keep" / "a").read_bytes() == b"keep/a"
    assert not (parent / "nowhere").exists()         # nothing to delete: nothing created


def test_native_opaque_clears_lower_children_and_keeps_this_layers(parent):
    layer = tar_of(entry("opq", tarfile.DIRTYPE, mode=0o755),
                   entry("opq/before", data=b"mine"),               # this layer's, before the marker
                   entry("opq/old-dir", tarfile.DIRTYPE, mode=0o755),
                   entry("opq/.wh..wh..opq"),
                   entry("opq/after", data=b"mine too"),
                   entry("mixed/new", data=b"n"))
    apply_bytes(layer, parent, "native")
    assert sorted(os.listdir(parent / "opq")) == ["after", "before", "old-dir"]
    assert os.listdir(parent / "opq" / "old-dir") == []            # its lower contents are gone
    assert sorted(os.listdir(parent / "mixed")) == ["new", "old"]   # not opaque: merged


def test_native_opaque_for_a_missing_directory_creates_it(parent):
    apply_bytes(tar_of(entry("fresh/.wh..wh..opq")), parent, "native")
    assert (parent / "fresh").is_dir() and os.listdir(parent / "fresh") == []


def test_native_whiteout_does_not_hide_the_same_layers_entries(parent):
    """OCI: a whiteout applies to lower layers only; order within the layer does not matter."""
    layer = tar_of(entry("mine", data=b"1"), entry(".wh.mine"),
                   entry("mixed", tarfile.DIRTYPE, mode=0o755), entry("mixed/new", data=b"2"),
                   entry(".wh.mixed"))
    apply_bytes(layer, parent, "native")
    assert (parent / "mine").read_bytes() == b"1"
    assert os.listdir(parent / "mixed") == ["new"]           # the lower mixed/old is whited out


def test_native_replacing_types(parent):
    layer = tar_of(entry("keep", data=b"now a file"),                      # dir → file
                   entry("gone-file", tarfile.DIRTYPE, mode=0o711),        # file → dir
                   entry("gone-link", tarfile.SYMTYPE, linkname="elsewhere"))
    apply_bytes(layer, parent, "native")
    assert (parent / "keep").read_bytes() == b"now a file"
    assert stat.S_IMODE(os.stat(parent / "gone-file").st_mode) == 0o711
    assert os.readlink(parent / "gone-link") == "elsewhere"


def test_native_dir_entry_merges_and_updates_metadata(parent):
    apply_bytes(tar_of(entry("keep", tarfile.DIRTYPE, mode=0o750, uid=5, gid=6,
                             xattrs={"user.tag": "v"})), parent, "native")
    st = os.stat(parent / "keep")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 5, 6)
    assert os.getxattr(parent / "keep", "user.tag") == b"v"
    assert (parent / "keep" / "a").exists()


def test_implicit_parents_are_created_0755(tmp_path):
    apply_bytes(tar_of(entry("x/y/z", data=b"z")), tmp_path, "native")
    assert stat.S_IMODE(os.stat(tmp_path / "x" / "y").st_mode) == 0o755


def test_hardlink_to_a_symlink_links_the_symlink(tmp_path):
    layer = tar_of(entry("target", data=b"t"), entry("sym", tarfile.SYMTYPE, linkname="target"),
                   entry("hard", tarfile.LNKTYPE, linkname="sym"))
    apply_bytes(layer, tmp_path, "native")
    assert os.path.islink(tmp_path / "hard")
    assert os.lstat(tmp_path / "hard").st_ino == os.lstat(tmp_path / "sym").st_ino


def test_trusted_xattrs_from_a_layer_are_ignored(tmp_path):
    layer = tar_of(entry("d", tarfile.DIRTYPE, mode=0o755,
                         xattrs={"trusted.overlay.opaque": "y", "user.ok": "1"}))
    apply_bytes(layer, tmp_path, "overlay")
    assert not opaque(tmp_path / "d")
    assert os.getxattr(tmp_path / "d", "user.ok") == b"1"


def test_user_xattr_on_a_symlink_is_skipped_like_containerd(tmp_path):
    layer = tar_of(entry("l", tarfile.SYMTYPE, linkname="x", xattrs={"user.x": "1"}))
    apply_bytes(layer, tmp_path, "native")
    assert os.path.islink(tmp_path / "l")


# --- overlay mode -----------------------------------------------------------------------------------

def test_overlay_whiteouts_are_char_devices_and_opaque_is_an_xattr(tmp_path):
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    upper.mkdir()
    apply_bytes(tar_of(entry("etc", tarfile.DIRTYPE, mode=0o755), entry("etc/passwd", data=b"root"),
                       entry("tmp", tarfile.DIRTYPE, mode=0o1777)), lower, "overlay")
    layer = tar_of(entry("etc", tarfile.DIRTYPE, mode=0o755), entry("etc/.wh.passwd", uid=0),
                   entry("var/.wh..wh..opq"), entry(".wh.tmp"), entry("etc/.wh..wh.plnk"))
    assert apply_bytes(layer, upper, "overlay", lowers=[str(lower)])["files"] == 4   # AUFS entry ignored
    assert is_whiteout(upper / "etc" / "passwd")
    assert is_whiteout(upper / "tmp")
    assert (upper / "var").is_dir() and opaque(upper / "var")
    assert not opaque(upper / "etc")
    assert sorted(os.listdir(upper)) == ["etc", "tmp", "var"]
    assert not (upper / "etc" / ".wh..wh.plnk").exists()


def test_overlay_layers_mount_to_the_native_result(tmp_path):
    """The same two layers, applied as overlay layers and mounted, and applied natively onto one
    tree, give the same view: whiteouts, opaque directories, replacement and re-creation."""
    base = tar_of(entry("etc", tarfile.DIRTYPE, mode=0o755), entry("etc/passwd", data=b"root"),
                  entry("etc/group", data=b"wheel"), entry("var", tarfile.DIRTYPE, mode=0o755),
                  entry("var/lib", tarfile.DIRTYPE, mode=0o700), entry("var/lib/db", data=b"old"),
                  entry("var/log", data=b"log"), entry("opt", tarfile.DIRTYPE, mode=0o755),
                  entry("opt/tool", data=b"t"), entry("gone", tarfile.DIRTYPE, mode=0o755),
                  entry("gone/x", data=b"x"), entry("again", tarfile.DIRTYPE, mode=0o755),
                  entry("again/old", data=b"o"))
    top = tar_of(entry("etc", tarfile.DIRTYPE, mode=0o755), entry("etc/.wh.passwd"),
                 entry("var", tarfile.DIRTYPE, mode=0o755), entry("var/.wh..wh..opq"),
                 entry("var/new", data=b"new"), entry("opt/tool", data=b"replaced"),
                 entry(".wh.gone"), entry(".wh.again"), entry("again", tarfile.DIRTYPE, mode=0o700),
                 entry("again/new", data=b"n"), entry("usr/bin/implied", data=b"i"))
    l1, l2, native = tmp_path / "l1", tmp_path / "l2", tmp_path / "native"
    for d in (l1, l2, native):
        d.mkdir()
    apply_bytes(base, l1, "overlay")
    apply_bytes(top, l2, "overlay", lowers=[str(l1)])
    apply_bytes(base, native, "native")
    apply_bytes(top, native, "native")
    assert is_whiteout(l2 / "etc" / "passwd") and opaque(l2 / "var")
    assert opaque(l2 / "again")                      # whited out, then made again: lower stays hidden
    with overlay_mount(tmp_path / "merged", [l2, l1]) as merged:
        assert_same_tree(native, merged, mtimes=False)
        assert sorted(os.listdir(merged / "var")) == ["new"]
        assert os.listdir(merged / "again") == ["new"]
        assert not (merged / "gone").exists()


def test_overlay_implied_parent_copies_the_lower_directory(tmp_path):
    lower, upper = tmp_path / "lower", tmp_path / "upper"
    lower.mkdir()
    upper.mkdir()
    apply_bytes(tar_of(entry("srv", tarfile.DIRTYPE, mode=0o710, uid=33, gid=34, xattrs={"user.k": "v"},
                             mtime=1_000_000)), lower, "overlay")
    os.setxattr(lower / "srv", "trusted.overlay.opaque", b"y")        # the lower's own; not copied
    apply_bytes(tar_of(entry("srv/new", data=b"n")), upper, "overlay", lowers=[str(lower)])
    st = os.stat(upper / "srv")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid, int(st.st_mtime)) == (0o710, 33, 34, 1_000_000)
    assert os.getxattr(upper / "srv", "user.k") == b"v"
    assert not opaque(upper / "srv")


def test_overlay_hardlink_to_a_lower_file_copies_it_up(tmp_path):
    l1, l2, upper = tmp_path / "l1", tmp_path / "l2", tmp_path / "upper"
    for d in (l1, l2, upper):
        d.mkdir()
    apply_bytes(tar_of(entry("bin", tarfile.DIRTYPE, mode=0o755),
                       entry("bin/busybox", data=b"bb", mode=0o4755, uid=2),
                       entry("bin/old", data=b"old")), l1, "overlay")
    apply_bytes(tar_of(entry("bin/.wh.old")), l2, "overlay", lowers=[str(l1)])
    apply_bytes(tar_of(entry("sbin/sh", tarfile.LNKTYPE, linkname="bin/busybox", mode=0o4755, uid=2)),
                upper, "overlay", lowers=[str(l2), str(l1)])
    assert os.stat(upper / "bin" / "busybox").st_ino == os.stat(upper / "sbin" / "sh").st_ino
    assert (upper / "sbin" / "sh").read_bytes() == b"bb"
    assert stat.S_IMODE(os.stat(upper / "bin" / "busybox").st_mode) == 0o4755
    with pytest.raises(InvalidArgument, match="not in the layer"):     # whited out in l2
        apply_bytes(tar_of(entry("x", tarfile.LNKTYPE, linkname="bin/old")), tmp_path / "upper", "overlay",
                    lowers=[str(l2), str(l1)])


def test_overlay_whiteout_does_not_hide_the_same_layers_entries(tmp_path):
    upper = tmp_path / "upper"
    upper.mkdir()
    layer = tar_of(entry("f", data=b"mine"), entry(".wh.f"), entry("d", tarfile.DIRTYPE, mode=0o755),
                   entry(".wh.d"))
    apply_bytes(layer, upper, "overlay")
    assert (upper / "f").read_bytes() == b"mine"
    assert (upper / "d").is_dir() and opaque(upper / "d")


# --- write_changes ----------------------------------------------------------------------------------

def test_native_changeset_applied_to_the_parent_reproduces_the_child(src, tmp_path):
    parent = src
    child = tmp_path / "child"
    subprocess.run(["cp", "-a", f"{parent}/.", str(child)], check=True)    # keep owners and hardlinks
    j = lambda *p: child.joinpath(*p)   # noqa: E731
    j("etc", "hosts").write_bytes(b"127.0.0.1 other\n")           # content change, same second
    settime(j("etc", "hosts"))
    os.chmod(j("usr", "bin", "sgid"), 0o755)                       # mode change
    os.chown(j("home", "alice", "notes"), 2000, 2000)              # owner change
    os.setxattr(j("usr", "bin", "tool"), "user.new", b"1")         # xattr change
    os.remove(j("usr", "bin", "alias"))
    os.symlink("elsewhere", j("usr", "bin", "alias"))             # retargeted
    shutil.rmtree(j("home", "alice"))                              # deleted dir
    os.remove(j("home", "fifo"))                                    # deleted fifo
    os.makedirs(j("new", "deep"))                                  # added
    j("new", "deep", "file").write_bytes(b"new")
    os.link(j("usr", "bin", "tool"), j("new", "tool-link"))        # new name for an unchanged file
    shutil.rmtree(j("etc", "conf.d"))
    j("etc", "conf.d").write_bytes(b"dir became a file")
    layer, result = changes([str(parent)], child, "native")
    assert result["diff_id"] == sha(layer)
    with tarfile.open(fileobj=io.BytesIO(layer)) as tf:
        names = tf.getnames()
    assert "home/.wh.alice" in names and "home/.wh.fifo" in names
    assert "etc/hosts.allow" in names                               # its inode changed: re-linked
    assert "usr/abs-link" not in names                              # unchanged, not archived
    target = tmp_path / "applied"
    subprocess.run(["cp", "-a", f"{parent}/.", str(target)], check=True)
    apply_bytes(layer, target, "native")
    assert_same_tree(child, target)


def test_native_changeset_of_identical_trees_is_empty(src, tmp_path):
    child = tmp_path / "child"
    subprocess.run(["cp", "-a", f"{src}/.", str(child)], check=True)
    layer, result = changes([str(src)], child, "native")
    assert layer == bytes(1024)
    assert result == {"diff_id": sha(bytes(1024)), "size": 1024}


def test_overlay_changeset_from_a_mounted_container(tmp_path):
    """Changes made through a real overlay mount become a layer whose native application onto the
    lower tree reproduces the merged view."""
    lower, upper, work = tmp_path / "lower", tmp_path / "upper", tmp_path / "work"
    for d in (lower, upper, work):
        d.mkdir()
    build_tree(lower)
    os.makedirs(lower / "var" / "cache")
    (lower / "var" / "cache" / "a").write_bytes(b"a")
    with overlay_mount(tmp_path / "merged", [lower], upper, work) as merged:
        (merged / "etc" / "hosts").write_bytes(b"changed")
        os.remove(merged / "usr" / "bin" / "alias")
        shutil.rmtree(merged / "var" / "cache")
        os.mkdir(merged / "var" / "cache")                          # re-made: opaque in the upper
        (merged / "var" / "cache" / "b").write_bytes(b"b")
        os.chmod(merged / "home" / "alice", 0o755)
        (merged / "new").write_bytes(b"new")
        os.link(merged / "new", merged / "new-link")
        expected = tmp_path / "expected"
        subprocess.run(["cp", "-a", f"{merged}/.", str(expected)], check=True)
    assert is_whiteout(upper / "usr" / "bin" / "alias") and opaque(upper / "var" / "cache")
    layer, _ = changes([str(lower)], upper, "overlay")
    with tarfile.open(fileobj=io.BytesIO(layer)) as tf:
        names = tf.getnames()
    assert "usr/bin/.wh.alias" in names and "var/cache/.wh..wh..opq" in names
    assert not any("trusted.overlay" in k for m in tarfile.open(fileobj=io.BytesIO(layer)).getmembers()
                   for k in m.pax_headers)
    applied = tmp_path / "applied"
    subprocess.run(["cp", "-a", f"{lower}/.", str(applied)], check=True)
    apply_bytes(layer, applied, "native")
    assert_same_tree(expected, applied, mtimes=False)
    # and as an overlay layer on top of the lower, mounted
    layer_dir = tmp_path / "layer"
    layer_dir.mkdir()
    apply_bytes(layer, layer_dir, "overlay", lowers=[str(lower)])
    with overlay_mount(tmp_path / "merged2", [layer_dir, lower]) as merged2:
        assert_same_tree(expected, merged2, mtimes=False)


def test_write_changes_rejects_bad_arguments(tmp_path):
    with pytest.raises(InvalidArgument):
        write_changes(None, str(tmp_path), io.BytesIO(), mode="zfs")
    with pytest.raises(InvalidArgument):
        write_changes([str(tmp_path), str(tmp_path)], str(tmp_path), io.BytesIO(), mode="native")
    with pytest.raises(InvalidArgument):
        apply_layer(io.BytesIO(b""), str(tmp_path), mode="aufs")
    with pytest.raises(InvalidArgument):
        apply_layer(io.BytesIO(b""), str(tmp_path), mode="native", lowers=[str(tmp_path)])


def test_sockets_are_not_archived(tmp_path):
    import socket
    s = socket.socket(socket.AF_UNIX)
    try:
        s.bind(str(tmp_path / "sock"))
        (tmp_path / "file").write_bytes(b"f")
        layer, _ = changes(None, tmp_path, "native")
    finally:
        s.close()
    with tarfile.open(fileobj=io.BytesIO(layer)) as tf:
        assert tf.getnames() == ["file"]


def test_no_tarfile_extraction_is_used(monkeypatch, src, tmp_path):
    """The applier never hands a layer to tarfile's extraction."""
    def forbidden(*a, **k):
        raise AssertionError("tarfile extraction used")
    monkeypatch.setattr(tarfile.TarFile, "extract", forbidden)
    monkeypatch.setattr(tarfile.TarFile, "extractall", forbidden)
    monkeypatch.setattr(tarfile.TarFile, "next", forbidden)
    out = tmp_path / "out"
    out.mkdir()
    layer, _ = changes(None, src, "native")
    apply_bytes(gzip.compress(layer), out, "native")
    assert_same_tree(src, out)
