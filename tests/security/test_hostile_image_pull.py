"""A hostile layer pulled through a real berthd: the pull fails with InvalidArgument, nothing
lands outside the snapshot, no half-applied snapshot stays visible, and the daemon keeps serving."""
from __future__ import annotations

import io
import os
import shutil
import tarfile

import pytest

from bus.errors import InvalidArgument
from tests.registry import build_busybox_image, run


def _hostile_layer(path: str, canary: str) -> None:
    """`escape -> <canary's dir>` then `escape/<name>`: a write through a symlink to the host."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        link = tarfile.TarInfo("escape")
        link.type, link.linkname = tarfile.SYMTYPE, os.path.dirname(canary)
        tar.addfile(link)
        data = b"written through a symlink\n"
        entry = tarfile.TarInfo(f"escape/{os.path.basename(canary)}")
        entry.size = len(data)
        tar.addfile(entry, io.BytesIO(data))
        up = tarfile.TarInfo("../../../../" + os.path.basename(canary) + "-up")
        up.size = len(data)
        tar.addfile(up, io.BytesIO(data))


@pytest.fixture
def hostile_image(tmp_path):
    layout = str(tmp_path / "layout")
    shutil.copytree(build_busybox_image(), layout, symlinks=True)
    canary = str(tmp_path / "host" / "canary")
    os.makedirs(os.path.dirname(canary))
    with open(canary, "w") as f:
        f.write("untouched\n")
    layer = str(tmp_path / "hostile.tar")
    _hostile_layer(layer, canary)
    run("umoci", "raw", "add-layer", "--image", f"{layout}:latest", layer)
    return layout, canary


def test_hostile_layer_fails_the_pull_and_touches_nothing_outside(daemon, registry, hostile_image):
    layout, canary = hostile_image
    registry.push(layout, "hostile:latest")
    client = daemon.client()
    before = os.stat(canary)
    with pytest.raises(InvalidArgument):
        client.pull(f"{registry.host}/hostile:latest", plain_http=True)
    with open(canary) as f:
        assert f.read() == "untouched\n"
    assert os.stat(canary).st_mtime_ns == before.st_mtime_ns
    assert sorted(os.listdir(os.path.dirname(canary))) == ["canary"]
    snapshots = client.snapshots.list()
    assert not any(s["name"].startswith("extract-") for s in snapshots)   # the failed apply is gone
    assert [s["kind"] for s in snapshots] == ["committed"]               # busybox's layer, nothing above
    assert client.images.list() == []
    assert client.version()["server"]                  # still serving
