"""`berth images import|export` (berth.archive) against a real berthd: OCI layout tars as our export
and `skopeo copy … oci-archive:` write them, `docker save` tars, and hostile archives. Digests
survive a round trip, names come out as ctr makes them, and an archive that tries to escape its
root, smuggles a link or lies about a blob fails in one line with nothing unverified kept."""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time

import pytest

from tests.registry import layout_blob, layout_manifest, run
from tests.support import REPO

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar"
IMAGE_NAME = "io.containerd.image.name"
REF_NAME = "org.opencontainers.image.ref.name"
GC_REF = "containerd.io/gc.ref.content"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def berth_bytes(daemon, *args: str, input: bytes | None = None, namespace: str | None = None) -> bytes:
    """`berth …` with bytes in and out (archives on stdin and stdout are not text)."""
    cmd = [sys.executable, "-m", "berth.cli.main", "-a", daemon.address] + (["-n", namespace] if namespace else [])
    result = subprocess.run([*cmd, *args], input=input, capture_output=True, timeout=120, env=daemon.env, cwd=REPO)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def one_line_error(result) -> str:
    assert result.returncode != 0, result
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("berth: "), result.stderr
    return result.stderr


def imported(result) -> dict[str, str]:
    """`image: NAME digest: DIGEST` lines -> {name: digest}."""
    out = {}
    for line in result.stdout.splitlines():
        _, name, _, digest = line.split(" ")
        out[name] = digest
    return out


def images(client) -> dict[str, dict]:
    return {image["name"]: image["target"] for image in client.images.list()}


def check(daemon, namespace: str | None = None) -> dict[str, str]:
    rows = json.loads(daemon.cli("images", "check", "--format", "json", namespace=namespace).stdout)
    return {row["name"]: row["status"] for row in rows}


def assert_content_verified(client) -> set[str]:
    """Every stored blob hashes to its digest, and no write is left half done; the digests."""
    digests = set()
    for info in client.content.list():
        data = client.content.read_all(info["digest"])
        assert sha(data) == info["digest"] and len(data) == info["size"]
        digests.add(info["digest"])
    assert client.content.list_statuses() == []
    return digests


def layout_files(layout: str) -> list[tuple[str, bytes]]:
    files = []
    for name in ("oci-layout", "index.json"):
        with open(os.path.join(layout, name), "rb") as f:
            files.append((name, f.read()))
    blobs = os.path.join(layout, "blobs", "sha256")
    for name in sorted(os.listdir(blobs)):
        with open(os.path.join(blobs, name), "rb") as f:
            files.append((f"blobs/sha256/{name}", f.read()))
    return files


def write_tar(path, files: list[tuple[str, bytes]], extra: list[tarfile.TarInfo] = ()) -> str:
    with tarfile.open(path, "w") as tar:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))
        for info in extra:
            tar.addfile(info, io.BytesIO(b"x" * info.size) if info.isreg() else None)
    return str(path)


def tree_digests(client, digest: str) -> set[str]:
    """A stored image's digests: the target, and below it what its GC labels point at."""
    found, stack = set(), [digest]
    while stack:
        d = stack.pop()
        if d in found:
            continue
        found.add(d)
        stack += [v for k, v in client.content.info(d)["labels"].items() if k.startswith(GC_REF)]
    return found


# --- round trip ----------------------------------------------------------------------------------

def test_export_then_import_into_another_namespace_keeps_every_digest(daemon, registry, busybox_image,
                                                                     busybox_arm64_image, tmp_path):
    pushed = registry.push(busybox_image, "busybox:latest")
    index_digest, _ = registry.push_index("multi:latest", {"linux/amd64": busybox_image,
                                                          "linux/arm64": busybox_arm64_image})
    single, multi = f"{registry.host}/busybox:latest", f"{registry.host}/multi:latest"
    daemon.cli("pull", "--plain-http", single)
    daemon.cli("pull", "--plain-http", multi)
    client, other = daemon.client(), daemon.client("other")
    archive = tmp_path / "images.tar"

    daemon.cli("images", "export", str(archive), single, multi)

    with tarfile.open(archive) as tar:
        names = tar.getnames()
        index = json.load(tar.extractfile("index.json"))
        docker = json.load(tar.extractfile("manifest.json"))
        assert json.load(tar.extractfile("oci-layout")) == {"imageLayoutVersion": "1.0.0"}
    assert names == sorted(names)
    assert [(m["digest"], m["annotations"][IMAGE_NAME], m["annotations"][REF_NAME]) for m in index["manifests"]] \
        == [(pushed, single, "latest"), (index_digest, multi, "latest")]
    stored = assert_content_verified(client)
    assert {n for n in names if n.startswith("blobs/sha256/")} == {f"blobs/sha256/{d[7:]}" for d in stored}
    # Both names resolve (on this amd64 host) to the same manifest: one docker entry, two tags.
    assert [sorted(entry["RepoTags"]) for entry in docker] == [sorted([single, multi])]

    result = daemon.cli("images", "import", str(archive), namespace="other")

    assert imported(result) == {single: pushed, multi: index_digest}
    assert {n: t["digest"] for n, t in images(other).items()} == {single: pushed, multi: index_digest}
    assert assert_content_verified(other) == stored
    for digest in (pushed, index_digest):
        assert tree_digests(other, digest) == tree_digests(client, digest)
    assert check(daemon, namespace="other") == {single: "complete", multi: "complete"}

    # Same images, same bytes: sorted members, no times or owners; to a file or to stdout.
    again = tmp_path / "again.tar"
    daemon.cli("images", "export", str(again), single, multi, namespace="other")
    assert again.read_bytes() == archive.read_bytes()
    assert berth_bytes(daemon, "images", "export", "-", single, multi) == archive.read_bytes()


def test_skopeo_oci_archive_imports_with_the_layouts_manifest_digest(daemon, busybox_image, tmp_path):
    archive = tmp_path / "busybox-oci.tar"
    run("skopeo", "copy", "--quiet", f"oci:{busybox_image}:latest", f"oci-archive:{archive}:busybox:latest")
    expected = layout_manifest(busybox_image)["digest"]

    out = berth_bytes(daemon, "images", "import", "-", input=archive.read_bytes())     # from stdin

    assert out.decode() == f"image: busybox:latest digest: {expected}\n"
    target = images(daemon.client())["busybox:latest"]
    assert (target["mediaType"], target["digest"]) == (OCI_MANIFEST, expected)
    assert check(daemon) == {"busybox:latest": "complete"}
    assert_content_verified(daemon.client())


def test_bare_tags_get_the_base_name_as_ctr_gives_them(daemon, busybox_image, tmp_path):
    archive = write_tar(tmp_path / "layout.tar", layout_files(busybox_image))     # ref name "latest"
    digest = layout_manifest(busybox_image)["digest"]

    default = imported(daemon.cli("images", "import", archive))
    named = imported(daemon.cli("images", "import", "--base-name", "example.com/tools/busybox", "--digests",
                                archive))

    assert default == {time.strftime("import-%Y-%m-%d") + ":latest": digest}
    assert named == {"example.com/tools/busybox:latest": digest, f"example.com/tools/busybox@{digest}": digest}
    assert set(check(daemon).values()) == {"complete"}


def test_docker_save_tar_imports_with_its_layers_as_they_are(daemon, busybox_image, tmp_path):
    manifest = json.loads(layout_blob(busybox_image, layout_manifest(busybox_image)["digest"]))
    config = layout_blob(busybox_image, manifest["config"]["digest"])
    layer = gzip.decompress(layout_blob(busybox_image, manifest["layers"][0]["digest"]))
    layer_id = hashlib.sha256(b"layer-id" + layer).hexdigest()
    config_name = f"{sha(config)[7:]}.json"
    archive = write_tar(tmp_path / "docker-save.tar", [
        (f"{layer_id}/VERSION", b"1.0"),
        (f"{layer_id}/json", json.dumps({"id": layer_id}).encode()),
        (f"{layer_id}/layer.tar", layer),
        (config_name, config),
        ("manifest.json", json.dumps([{"Config": config_name, "RepoTags": ["busybox:latest"],
                                       "Layers": [f"{layer_id}/layer.tar"]}]).encode()),
        ("repositories", json.dumps({"busybox": {"latest": layer_id}}).encode()),
    ])
    client = daemon.client()

    result = daemon.cli("images", "import", archive)

    name = "docker.io/library/busybox:latest"
    [(got_name, digest)] = imported(result).items()
    assert got_name == name
    target = images(client)[name]
    assert (target["mediaType"], target["digest"]) == (DOCKER_MANIFEST, digest)
    built = json.loads(client.content.read_all(digest))
    assert built["config"] == {"mediaType": DOCKER_CONFIG, "digest": sha(config), "size": len(config)}
    assert built["layers"] == [{"mediaType": DOCKER_LAYER, "digest": sha(layer), "size": len(layer)}]
    assert sha(layer) == json.loads(config)["rootfs"]["diff_ids"][0]
    assert client.content.info(digest)["labels"] == {f"{GC_REF}.config": sha(config), f"{GC_REF}.l.0": sha(layer)}
    assert check(daemon) == {name: "complete"}
    assert assert_content_verified(client) == {digest, sha(config), sha(layer)}

    exported = tmp_path / "out.tar"
    daemon.cli("images", "export", str(exported), name)
    with tarfile.open(exported) as tar:
        assert json.load(tar.extractfile("manifest.json"))[0]["RepoTags"] == ["busybox:latest"]


# --- hostile archives ------------------------------------------------------------------------------

def _link(name: str, target: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def _file(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = 5
    return info


def _tampered_layer(layout: str) -> list[tuple[str, bytes]]:
    """The layout with one byte of its layer changed: same name and size, another digest."""
    layer = json.loads(layout_blob(layout, layout_manifest(layout)["digest"]))["layers"][0]["digest"]
    files = []
    for name, data in layout_files(layout):
        if name == f"blobs/sha256/{layer[7:]}":
            middle = len(data) // 2
            data = data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1:]
        files.append((name, data))
    return files


HOSTILE = {
    "dotdot_member": (lambda layout: (layout_files(layout), [_file("../evil")]), "'..'"),
    "dotdot_inside_path": (lambda layout: (layout_files(layout), [_file("blobs/../../evil")]), "'..'"),
    "absolute_member": (lambda layout: (layout_files(layout), [_file("/tmp/berth-evil")]), "absolute"),
    "symlink_member": (lambda layout: (layout_files(layout), [_link("blobs/sha256/evil", "/etc/passwd",
                                                                     tarfile.SYMTYPE)]), "link"),
    "hardlink_member": (lambda layout: (layout_files(layout), [_link("evil", "index.json", tarfile.LNKTYPE)]), "link"),
    "blob_not_matching_its_digest": (lambda layout: (_tampered_layer(layout), []), "does not match its digest"),
    "index_json_over_4_mib": (lambda layout: ([(n, d + b" " * (4 << 20) if n == "index.json" else d)
                                               for n, d in layout_files(layout)], []), "limit"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_archive_fails_in_one_line_and_keeps_nothing_unverified(daemon, busybox_image, tmp_path, case):
    build, words = HOSTILE[case]
    files, extra = build(busybox_image)
    archive = write_tar(tmp_path / f"{case}.tar", files, extra)
    layer = json.loads(layout_blob(busybox_image, layout_manifest(busybox_image)["digest"]))["layers"][0]["digest"]
    client = daemon.client()

    err = one_line_error(daemon.cli("images", "import", archive, check=False))

    assert words in err, err
    assert client.images.list() == []
    stored = assert_content_verified(client)
    assert layer not in stored
    assert not os.path.exists("/tmp/berth-evil")
    client.gc()
    assert client.content.list() == [] and client.leases.list() == []


def test_what_is_not_an_image_archive_fails_in_one_line(daemon, tmp_path):
    garbage = daemon.cli("images", "import", "-", input="this is not a tar archive\n" * 100, check=False)
    assert "not a tar archive" in one_line_error(garbage)
    other = write_tar(tmp_path / "other.tar", [("hello.txt", b"hello")])
    assert "unrecognised image archive" in one_line_error(daemon.cli("images", "import", other, check=False))
    assert daemon.client().content.list() == []
