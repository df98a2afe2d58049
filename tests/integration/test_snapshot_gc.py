"""Snapshot GC against a real berthd: unpacked layers go with the last image that needs them,
content and snapshots alike, down to the directories on disk; a snapshot a container record or a
lease holds stays, with every parent under it, until the holder goes."""
from __future__ import annotations

import concurrent.futures
import glob
import json
import os

import pytest

from actors.snapshot import mounts_under
from actors.transfer import chain_ids
from tests.registry import layout_blob, layout_manifest, run
from tests.support import wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="unpacking needs root")

SNAPSHOTTERS = ["overlayfs", "native"]


def snapshot_dirs(daemon) -> list[str]:
    """Every snapshot directory of every snapshotter, in flight or not."""
    return sorted(glob.glob(os.path.join(daemon.root, "snapshots", "*", "snapshots", "*")))


def blobs(daemon) -> list[str]:
    path = os.path.join(daemon.root, "content", "blobs", "sha256")
    return sorted(os.listdir(path)) if os.path.isdir(path) else []


def chains_of(layout: str) -> list[str]:
    manifest = json.loads(layout_blob(layout, layout_manifest(layout)["digest"]))
    return chain_ids(json.loads(layout_blob(layout, manifest["config"]["digest"]))["rootfs"]["diff_ids"])


def keys(daemon, snapshotter: str, namespace: str | None = None) -> list[str]:
    return daemon.cli("snapshots", "--snapshotter", snapshotter, "ls", "-q", namespace=namespace).stdout.split()


@pytest.fixture
def pushed(registry, busybox_image, layered_image) -> dict[str, tuple[str, str]]:
    """name -> (reference, layout) of the images in the registry."""
    refs = {}
    for name, layout in (("busybox", busybox_image), ("layered", layered_image)):
        registry.push(layout, f"{name}:latest")
        refs[name] = (f"{registry.host}/{name}:latest", layout)
    return refs


def test_removing_every_image_leaves_no_snapshot_and_no_blob(daemon, pushed, tmp_path):
    busybox, layered = pushed["busybox"][0], pushed["layered"][0]
    daemon.cli("pull", "--plain-http", busybox)
    daemon.cli("pull", "--plain-http", layered)
    daemon.cli("pull", "--plain-http", layered, namespace="again")
    daemon.cli("pull", "--plain-http", "--snapshotter", "native", layered, namespace="copies")
    daemon.cli("images", "tag", busybox, "local/busybox:tagged")
    # A mount made and removed, and a diff kept only by a lease of its own: nothing of them stays.
    (tmp_path / "mnt").mkdir()
    daemon.cli("images", "mount", "--rw", layered, str(tmp_path / "mnt"))
    (tmp_path / "mnt" / "scratch").write_text("x\n")
    daemon.cli("snapshots", "diff", os.path.realpath(tmp_path / "mnt"))
    daemon.cli("images", "unmount", "--rm", str(tmp_path / "mnt"))
    layered_chains = chains_of(pushed["layered"][1])
    assert set(keys(daemon, "overlayfs")) == set(chains_of(pushed["busybox"][1])) | set(layered_chains)
    assert keys(daemon, "native", "copies") == sorted(layered_chains)
    assert snapshot_dirs(daemon) and blobs(daemon)

    for ns, names in (("default", [busybox, layered, "local/busybox:tagged"]), ("again", [layered]),
                      ("copies", [layered])):
        daemon.cli("images", "rm", "--sync", *names, namespace=ns)
    daemon.cli("gc")

    assert snapshot_dirs(daemon) == []
    assert blobs(daemon) == []
    for ns in ("default", "again", "copies"):
        for snapshotter in SNAPSHOTTERS:
            assert keys(daemon, snapshotter, ns) == []
        assert daemon.cli("content", "ls", "-q", namespace=ns).stdout.split() == []
        assert daemon.cli("leases", "ls", "-q", namespace=ns).stdout.split() == []
    assert not mounts_under(daemon.dir)


@pytest.mark.parametrize("snapshotter", SNAPSHOTTERS)
def test_a_container_holds_its_snapshot_and_its_parents(daemon, pushed, snapshotter):
    ref, layout = pushed["layered"]
    chains = chains_of(layout)
    daemon.cli("pull", "--plain-http", "--snapshotter", snapshotter, ref)
    client = daemon.client()
    with client.lease():                          # nothing unheld between prepare and create
        client.snapshots.prepare("ctr-rootfs", chains[-1], snapshotter=snapshotter)
        client.containers.create("ctr", spec={}, image=ref, snapshotter=snapshotter, snapshot_key="ctr-rootfs")

    daemon.cli("images", "rm", "--sync", ref)
    daemon.cli("gc")
    assert keys(daemon, snapshotter) == sorted(chains + ["ctr-rootfs"])
    assert client.snapshots.stat("ctr-rootfs", snapshotter=snapshotter)["kind"] == "active"
    assert len(snapshot_dirs(daemon)) == len(chains) + 1
    assert blobs(daemon) == []                     # a container record holds no content

    client.containers.delete("ctr")
    daemon.cli("gc")
    assert keys(daemon, snapshotter) == []
    assert snapshot_dirs(daemon) == []


@pytest.mark.parametrize("snapshotter", SNAPSHOTTERS)
def test_a_lease_holds_its_snapshot_until_leases_rm_sync(daemon, pushed, snapshotter):
    ref, layout = pushed["busybox"]
    chains = chains_of(layout)
    daemon.cli("pull", "--plain-http", "--snapshotter", snapshotter, ref)
    assert daemon.cli("leases", "create", "--id", "hold", "-x", "0").stdout.split() == ["hold"]
    client = daemon.client()
    client.active_lease = "hold"
    client.snapshots.prepare("held-work", chains[-1], snapshotter=snapshotter)
    client.snapshots.commit("held", "held-work", snapshotter=snapshotter)
    client.snapshots.view("held-view", "held", snapshotter=snapshotter)
    client.active_lease = None
    assert {(r["type"], r["id"]) for r in client.leases.resources("hold")} >= \
        {(f"snapshots/{snapshotter}", key) for key in ("held-work", "held", "held-view")}

    daemon.cli("images", "rm", "--sync", ref)
    daemon.cli("gc")
    assert keys(daemon, snapshotter) == sorted(chains + ["held", "held-view"])
    assert blobs(daemon) == []

    assert daemon.cli("leases", "rm", "--sync", "hold").stdout.split() == ["hold"]
    assert keys(daemon, snapshotter) == []
    assert snapshot_dirs(daemon) == []
    assert client.leases.list() == []


def test_the_unpack_of_a_failed_pull_goes_with_its_lease(daemon, registry, layered_image, tmp_path):
    """A pull whose last layer cannot be applied (its diffID is not what the config says) fails;
    what it did apply is held by nothing but its lease, and goes at the next GC."""
    broken = str(tmp_path / "broken")
    run("cp", "-a", layered_image, broken)
    desc = layout_manifest(broken)
    manifest = json.loads(layout_blob(broken, desc["digest"]))
    config = json.loads(layout_blob(broken, manifest["config"]["digest"]))
    config["rootfs"]["diff_ids"][-1] = "sha256:" + "0" * 64
    _replace_config(broken, manifest, config)
    registry.push(broken, "broken:latest")
    ref = f"{registry.host}/broken:latest"

    failed = daemon.cli("pull", "--plain-http", ref, check=False)
    assert failed.returncode != 0 and "diffID" in failed.stderr, failed.stderr
    daemon.cli("gc")
    assert keys(daemon, "overlayfs") == []
    assert snapshot_dirs(daemon) == []
    assert daemon.cli("leases", "ls", "-q").stdout.split() == []


def test_what_is_made_while_a_gc_runs_stays(daemon, pushed):
    """A GC held open between reading its roots and reading what exists: a snapshot and a blob made
    meanwhile, under a lease made meanwhile, are not in the roots it read, yet both stay."""
    ref, layout = pushed["busybox"]
    chains = chains_of(layout)
    daemon.cli("pull", "--plain-http", ref)
    client = daemon.client()
    client.set_failpoint("metadata.gc", "1*delay(2000)")
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        collecting = pool.submit(daemon.cli, "gc")
        wait_until(lambda: client.failpoints() == [{"name": "metadata.gc", "term": "0*delay(2000)"}],
                   what="the GC to read its roots")
        with client.lease():
            client.snapshots.prepare("made-during-gc", chains[-1])
            blob = client.content.write("made-during-gc", b"made while a GC ran\n")
            assert not collecting.done()
            collecting.result(timeout=30)
    assert client.snapshots.stat("made-during-gc")["kind"] == "active"
    assert client.content.info(blob["digest"])["size"] == 20

    client.clear_failpoints()
    daemon.cli("images", "rm", "--sync", ref)
    assert keys(daemon, "overlayfs") == [] and blobs(daemon) == []


def test_a_pull_holds_what_it_finds_stored_against_a_gc_meanwhile(daemon, pushed):
    """A pull that finds an image's manifest and config stored (an earlier image left them,
    unreferenced) builds on them: a GC while it fetches the rest must not take them away."""
    ref = pushed["busybox"][0]
    daemon.cli("pull", "--plain-http", ref)
    client = daemon.client()
    manifest = client.images.get(ref)["target"]["digest"]
    layer = json.loads(client.content.read_all(manifest))["layers"][0]["digest"]
    client.set_failpoint("metadata.gc", "1*error(Unavailable)")     # the GC images rm schedules fails
    daemon.cli("images", "rm", ref)
    wait_until(lambda: client.failpoints() == [{"name": "metadata.gc", "term": "0*error(Unavailable)"}],
               what="the scheduled GC")
    daemon.cli("content", "rm", layer)
    stored = set(daemon.cli("content", "ls", "-q").stdout.split())
    assert manifest in stored and layer not in stored

    client.set_failpoint("transfer.fetch", "1*delay(2000)")        # the layer's download waits
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pulling = pool.submit(daemon.cli, "pull", "--plain-http", ref, check=False, timeout=60)
        wait_until(lambda: {"name": "transfer.fetch", "term": "0*delay(2000)"} in client.failpoints(),
                   what="the layer's download to wait")
        daemon.cli("gc")
        pulled = pulling.result(timeout=60)
    assert pulled.returncode == 0, pulled.stderr
    assert {manifest, layer} <= set(daemon.cli("content", "ls", "-q").stdout.split())
    assert client.images.get(ref)["target"]["digest"] == manifest
    client.clear_failpoints()


def _replace_config(layout: str, manifest: dict, config: dict) -> None:
    """Point the layout's "latest" at a manifest with `config` (blobs written, index rewritten)."""
    import hashlib

    def put(data: bytes) -> str:
        digest = hashlib.sha256(data).hexdigest()
        with open(os.path.join(layout, "blobs", "sha256", digest), "wb") as f:
            f.write(data)
        return "sha256:" + digest
    config_bytes = json.dumps(config).encode()
    manifest = dict(manifest, config=dict(manifest["config"], digest=put(config_bytes), size=len(config_bytes)))
    manifest_bytes = json.dumps(manifest).encode()
    with open(os.path.join(layout, "index.json")) as f:
        index = json.load(f)
    for entry in index["manifests"]:
        if entry.get("annotations", {}).get("org.opencontainers.image.ref.name") == "latest":
            entry.update(digest=put(manifest_bytes), size=len(manifest_bytes))
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump(index, f)
