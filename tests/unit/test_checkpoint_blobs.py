"""Checkpoint blobs (actors/checkpoint.py): a CRIU image directory into the content store and
back, and what a hostile checkpoint tar may not do when unpacked."""
from __future__ import annotations

import io
import os
import tarfile

import pytest

from actors import checkpoint
from actors.content import ContentStore
from bus.errors import InvalidArgument


def content_call(store: ContentStore):
    """The content actor's methods that checkpoint uses, on a store in this process."""
    def call(service, method, args, namespace=None, lease=None, frames=(), with_frames=False):
        assert service == "content"
        if method == "write":
            return store.write(namespace, args["ref"], args["offset"], frames[0])
        if method == "read":
            data = store.read(namespace, args["digest"], args["offset"], args["size"])
            return ({"size": len(data)}, [data]) if with_frames else data
        return getattr(store, method)(namespace, **args)
    return call


def test_store_then_fetch_gives_the_same_files(tmp_path):
    store = ContentStore(str(tmp_path / "content"))
    image = tmp_path / "image"
    (image / "sub").mkdir(parents=True)
    (image / "pages-1.img").write_bytes(os.urandom(9 << 20))        # more than two chunks
    (image / "sub" / "inventory.img").write_bytes(b"inventory")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    call = content_call(store)
    desc = checkpoint.store(call, "ns", None, str(image), str(scratch), "checkpoint-c1-1")
    assert desc["mediaType"] == checkpoint.MEDIA_TYPE
    assert store.info("ns", desc["digest"])["size"] == desc["size"]
    dest = tmp_path / "restored"
    checkpoint.fetch(call, "ns", desc["digest"], str(dest), str(scratch))
    assert (dest / "pages-1.img").read_bytes() == (image / "pages-1.img").read_bytes()
    assert (dest / "sub" / "inventory.img").read_bytes() == b"inventory"
    assert os.listdir(scratch) == []                                 # the temporary tars are gone


def _tar(*members: tuple[tarfile.TarInfo, bytes]) -> io.BytesIO:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for info, data in members:
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    buf.seek(0)
    return buf


def _entry(name: str, kind=tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


@pytest.mark.parametrize("member", [
    _entry("../escape"),
    _entry("link", tarfile.SYMTYPE, "/etc/passwd"),
    _entry("hard", tarfile.LNKTYPE, "../../etc/passwd"),
    _entry("dev", tarfile.CHRTYPE),
    _entry("fifo", tarfile.FIFOTYPE),
], ids=["dotdot", "symlink", "hardlink", "device", "fifo"])
def test_a_hostile_checkpoint_is_refused_and_writes_nothing_outside(tmp_path, member):
    canary = tmp_path / "escape"
    dest = tmp_path / "a" / "dest"
    dest.parent.mkdir()
    with pytest.raises(InvalidArgument):
        checkpoint.unpack(_tar((member, b"x")), str(dest))
    assert not canary.exists()
    assert not (tmp_path / "a" / "escape").exists()


def test_an_absolute_name_lands_inside(tmp_path):
    dest = tmp_path / "dest"
    checkpoint.unpack(_tar((_entry("/abs/file"), b"x")), str(dest))
    assert (dest / "abs" / "file").read_bytes() == b"x"


def test_what_is_not_a_tar_is_a_clear_error(tmp_path):
    with pytest.raises(InvalidArgument, match="not a usable CRIU image tar"):
        checkpoint.unpack(io.BytesIO(b"\x00garbage" * 200), str(tmp_path / "dest"))
