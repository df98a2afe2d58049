"""Content, leases, GC, images and containers as users see them: through `berth` and `berth.Client`
against a real berthd. Blobs go in from stdin and come out byte for byte, nothing unverified is
ever visible, namespaces keep their content and images apart, leases hold what is written under
them until they go, and an ingest cut off by a content actor crash resumes where it stopped."""
from __future__ import annotations

import concurrent.futures
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
import urllib.request

import pytest

from bus.errors import Unavailable
from tests.support import REPO

MiB = 1 << 20
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar"


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def berth(daemon, *args: str, input: bytes | None = None, namespace: str | None = None,
          check: bool = True) -> subprocess.CompletedProcess:
    """`berth …` with bytes in and out (daemon.cli speaks text, and blobs are not text)."""
    cmd = [sys.executable, "-m", "berth.cli.main", "-a", daemon.address]
    if namespace:
        cmd += ["-n", namespace]
    result = subprocess.run([*cmd, *args], input=input, capture_output=True, timeout=120,
                            env=daemon.env, cwd=REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"berth {' '.join(args)} exited {result.returncode}: {result.stderr.decode()}")
    return result


def lines(result: subprocess.CompletedProcess) -> list[str]:
    out = result.stdout if isinstance(result.stdout, str) else result.stdout.decode()
    return [line for line in out.splitlines() if line.strip()]


def one_line_error(result: subprocess.CompletedProcess) -> str:
    err = result.stderr if isinstance(result.stderr, str) else result.stderr.decode()
    assert result.returncode != 0, result
    assert len(err.splitlines()) == 1 and err.startswith("berth: "), err
    return err


def digests(daemon, namespace: str | None = None) -> set[str]:
    return set(lines(berth(daemon, "content", "ls", "-q", namespace=namespace)))


def blob_files(daemon) -> list[str]:
    return sorted(os.listdir(os.path.join(daemon.root, "content", "blobs", "sha256")))


def ingest(daemon, ref: str, data: bytes, *flags: str, namespace: str | None = None) -> str:
    out = lines(berth(daemon, "content", "ingest", *flags, ref, input=data, namespace=namespace))
    assert out == [sha(data)]
    return out[0]


def requests_ok(client, service: str, method: str) -> float:
    """berth_requests_total for one successful service.method, from the metrics endpoint."""
    wanted = f'berth_requests_total{{code="OK",method="{method}",service="{service}"}} '
    with urllib.request.urlopen(client.info()["metrics"], timeout=10) as resp:
        found = [line for line in resp.read().decode().splitlines() if line.startswith(wanted)]
    return float(found[0].split()[1]) if found else 0.0


def image_content(daemon, platform=("linux", "amd64")) -> dict:
    """A config, a layer and a manifest naming them (with the GC labels a pull would set)."""
    layer = random.Random(7).randbytes(2 * MiB + 17)
    config = json.dumps({"os": platform[0], "architecture": platform[1], "rootfs": {"type": "layers"}}).encode()
    manifest = json.dumps({
        "schemaVersion": 2, "mediaType": MANIFEST,
        "config": {"mediaType": CONFIG, "digest": sha(config), "size": len(config)},
        "layers": [{"mediaType": LAYER, "digest": sha(layer), "size": len(layer)}],
    }).encode()
    ingest(daemon, "layer", layer)
    ingest(daemon, "config", config)
    ingest(daemon, "manifest", manifest,
           "--label", f"containerd.io/gc.ref.content.l.0={sha(layer)}",
           "--label", f"containerd.io/gc.ref.content.config={sha(config)}")
    return {"layer": sha(layer), "config": sha(config), "manifest": sha(manifest),
            "target": {"mediaType": MANIFEST, "digest": sha(manifest), "size": len(manifest)},
            "size": len(layer) + len(config)}


# --- content through the CLI ----------------------------------------------------------------

def test_ingest_from_stdin_then_ls_and_get_return_the_same_bytes(daemon):
    data = random.Random(1).randbytes(5 * MiB + 123)
    digest = ingest(daemon, "upload-1", data, "--label", "origin=test")

    table = lines(berth(daemon, "content", "ls"))
    assert table[0].split() == ["DIGEST", "SIZE", "AGE", "LABELS"]
    row = next(line for line in table[1:] if line.startswith(digest))
    assert "5.0 MiB" in row and "origin=test" in row
    assert digests(daemon) == {digest}
    listed = json.loads(berth(daemon, "content", "ls", "--format", "json").stdout)
    assert [(b["digest"], b["size"], b["labels"]) for b in listed] == [(digest, len(data), {"origin": "test"})]

    assert berth(daemon, "content", "get", digest).stdout == data
    assert blob_files(daemon) == [digest.removeprefix("sha256:")]
    assert lines(berth(daemon, "content", "active", "-q")) == []

    # With the right expectations it goes in too; content already there is not an error.
    small = b"small blob\n"
    ingest(daemon, "upload-2", small, "--expected-size", str(len(small)), "--expected-digest", sha(small))
    ingest(daemon, "upload-3", small)
    assert digests(daemon) == {digest, sha(small)}

    assert lines(berth(daemon, "content", "label", sha(small), "a=1", "b=2")) == ["a=1,b=2"]
    assert lines(berth(daemon, "content", "label", sha(small), "a=")) == ["b=2"]
    assert lines(berth(daemon, "content", "rm", sha(small))) == [sha(small)]
    assert digests(daemon) == {digest}
    one_line_error(berth(daemon, "content", "get", "sha256:nothex", check=False))


def test_wrong_expected_digest_fails_in_one_line_and_nothing_is_listed(daemon):
    data = random.Random(2).randbytes(MiB + 5)
    wrong = sha(b"something else")
    result = berth(daemon, "content", "ingest", "--expected-digest", wrong, "bad-1", input=data, check=False)
    err = one_line_error(result)
    assert wrong in err
    assert digests(daemon) == set()
    assert blob_files(daemon) == []
    assert lines(berth(daemon, "content", "active", "-q")) == []       # rejected data is not kept

    result = berth(daemon, "content", "ingest", "--expected-size", "10", "bad-2", input=data, check=False)
    one_line_error(result)
    assert digests(daemon) == set() and blob_files(daemon) == []


def test_namespaces_isolate_content_and_images(daemon):
    data = b"only in default\n" * 1000
    digest = ingest(daemon, "ref", data)
    assert digests(daemon, "other") == set()
    one_line_error(berth(daemon, "content", "get", digest, namespace="other", check=False))

    daemon.client().images.create("example.com/app:1", {"mediaType": MANIFEST, "digest": digest,
                                                        "size": len(data)})
    assert lines(berth(daemon, "images", "ls", "-q")) == ["example.com/app:1"]
    assert lines(berth(daemon, "images", "ls", "-q", namespace="other")) == []

    # The same bytes committed in another namespace: one file, seen by both, each removing its own.
    ingest(daemon, "ref", data, namespace="other")
    assert digests(daemon, "other") == {digest}
    assert blob_files(daemon) == [digest.removeprefix("sha256:")]
    berth(daemon, "content", "rm", digest, namespace="other")
    assert digests(daemon, "other") == set()
    assert digests(daemon) == {digest}
    assert berth(daemon, "content", "get", digest).stdout == data


def test_deleting_a_namespace_that_holds_an_image_fails_in_one_line(daemon):
    client = daemon.client(namespace="other")
    client.images.create("example.com/app:1", {"mediaType": MANIFEST, "digest": sha(b"x"), "size": 1})
    err = one_line_error(daemon.cli("namespaces", "rm", "other", check=False))
    assert "images" in err
    assert "other" in lines(daemon.cli("namespaces", "ls", "-q"))

    assert lines(berth(daemon, "images", "rm", "example.com/app:1", namespace="other")) == ["example.com/app:1"]
    daemon.cli("namespaces", "rm", "other")
    assert "other" not in lines(daemon.cli("namespaces", "ls", "-q"))


# --- leases and GC --------------------------------------------------------------------------

def test_leases_create_ls_rm(daemon):
    assert lines(daemon.cli("leases", "create", "--id", "build-1", "team=ci")) == ["build-1"]
    (generated,) = lines(daemon.cli("leases", "create", "--expires", "1h30m"))
    assert lines(daemon.cli("leases", "ls", "-q")) == sorted(["build-1", generated])

    table = lines(daemon.cli("leases", "ls"))
    assert table[0].split() == ["ID", "CREATED", "AT", "LABELS"]
    row = next(line for line in table if line.startswith("build-1 "))
    assert "team=ci" in row and "containerd.io/gc.expire=" in row
    never = lines(daemon.cli("leases", "create", "--id", "forever", "--expires", "0"))
    assert never == ["forever"]
    assert "gc.expire" not in next(line for line in lines(daemon.cli("leases", "ls")) if line.startswith("forever "))

    assert lines(daemon.cli("leases", "rm", "build-1", generated, "forever")) == ["build-1", generated, "forever"]
    assert lines(daemon.cli("leases", "ls", "-q")) == []
    one_line_error(daemon.cli("leases", "rm", "build-1", check=False))
    one_line_error(daemon.cli("leases", "create", "--expires", "soon", check=False))


def test_blob_written_under_a_lease_survives_gc_until_the_lease_is_removed(daemon):
    client = daemon.client()
    loose = client.content.write("loose", b"nothing holds me" * 100)["digest"]
    with client.lease() as lease:
        assert client.active_lease == lease["id"]
        held = client.content.write("held", random.Random(3).randbytes(3 * MiB))["digest"]
        resources = client.leases.resources(lease["id"])
        assert {"type": "content", "id": held} in resources
        assert {"type": "ingests", "id": "held"} in resources

        out = daemon.cli("gc").stdout
        assert "removed 1 blob," in out
        assert digests(daemon) == {held}
        assert loose not in digests(daemon)

        assert lines(daemon.cli("leases", "rm", "--sync", lease["id"])) == [lease["id"]]
        assert digests(daemon) == set()
        assert blob_files(daemon) == []
    assert client.active_lease is None
    assert client.leases.list() == []


def test_images_tag_ls_and_rm_sync_collect_what_no_image_holds(daemon):
    client = daemon.client()
    content = image_content(daemon)
    blobs = {content["layer"], content["config"], content["manifest"]}
    client.images.create("example.com/app:1", content["target"], labels={"tier": "web"})

    assert lines(daemon.cli("images", "tag", "example.com/app:1", "example.com/app:2")) == ["example.com/app:2"]
    one_line_error(daemon.cli("images", "tag", "example.com/app:1", "example.com/app:2", check=False))
    assert lines(daemon.cli("images", "tag", "--force", "example.com/app:1", "example.com/app:2")) \
        == ["example.com/app:2"]
    assert lines(daemon.cli("images", "ls", "-q")) == ["example.com/app:1", "example.com/app:2"]
    assert client.images.get("example.com/app:2")["target"] == content["target"]
    assert client.images.get("example.com/app:2")["labels"] == {"tier": "web"}

    # Another image still references the manifest: nothing goes.
    assert lines(daemon.cli("images", "rm", "--sync", "example.com/app:1")) == ["example.com/app:1"]
    assert digests(daemon) == blobs
    # The last one goes: the manifest, and the layer and config it labels, go with it.
    assert lines(daemon.cli("images", "rm", "--sync", "example.com/app:2")) == ["example.com/app:2"]
    assert lines(daemon.cli("images", "ls", "-q")) == []
    assert digests(daemon) == set()
    assert blob_files(daemon) == []


def test_images_ls_reads_size_and_platforms_from_content(daemon):
    client = daemon.client()
    content = image_content(daemon, ("linux", "arm64"))
    index = json.dumps({"schemaVersion": 2, "mediaType": INDEX, "manifests": [
        dict(content["target"], platform={"os": "linux", "architecture": "arm64", "variant": "v8"}),
        {"mediaType": MANIFEST, "digest": sha(b"absent"), "size": 6,
         "platform": {"os": "linux", "architecture": "amd64"}},
    ]}).encode()
    ingest(daemon, "index", index, "--label", f"containerd.io/gc.ref.content.m.0={content['manifest']}")
    client.images.create("example.com/single:1", content["target"], labels={"a": "b"})
    client.images.create("example.com/multi:1", {"mediaType": INDEX, "digest": sha(index), "size": len(index)})
    client.images.create("example.com/gone:1", {"mediaType": INDEX, "digest": sha(b"gone"), "size": 4})

    table = lines(daemon.cli("images", "ls"))
    assert table[0].split() == ["REF", "TYPE", "DIGEST", "SIZE", "PLATFORMS", "LABELS"]
    rows = {line.split()[0]: line.split() for line in table[1:]}
    size = f"{content['size'] / MiB:.1f} MiB"
    assert rows["example.com/single:1"][1:] == [MANIFEST, content["manifest"], *size.split(), "linux/arm64", "a=b"]
    assert rows["example.com/multi:1"][1:] == [INDEX, sha(index), *size.split(),
                                               "linux/amd64,linux/arm64/v8", "-"]
    assert rows["example.com/gone:1"][1:] == [INDEX, sha(b"gone"), "-", "-", "-"]


# --- containers -----------------------------------------------------------------------------

def test_containers_create_ls_info_label_rm(daemon):
    client = daemon.client()
    client.images.create("example.com/app:1", {"mediaType": MANIFEST, "digest": sha(b"m"), "size": 1})
    daemon.cli("containers", "create", "--label", "role=db", "example.com/app:1", "db-1")
    daemon.cli("containers", "create", "--runtime", "io.containerd.runc.v1", "example.com/app:1", "db-2")
    one_line_error(daemon.cli("containers", "create", "example.com/app:1", "db-1", check=False))
    one_line_error(daemon.cli("containers", "create", "example.com/none:1", "db-3", check=False))

    table = [line.split() for line in lines(daemon.cli("containers", "ls"))]
    assert table == [["CONTAINER", "IMAGE", "RUNTIME"], ["db-1", "example.com/app:1", "io.containerd.runc.v2"],
                     ["db-2", "example.com/app:1", "io.containerd.runc.v1"]]
    info = json.loads(daemon.cli("containers", "info", "db-1").stdout)
    assert info["id"] == "db-1" and info["image"] == "example.com/app:1" and info["labels"] == {"role": "db"}
    assert lines(daemon.cli("containers", "label", "db-1", "tier=1", "role=")) == ["tier=1"]
    assert client.containers.get("db-1")["labels"] == {"tier": "1"}

    daemon.cli("containers", "rm", "db-1", "db-2")
    assert lines(daemon.cli("containers", "ls", "-q")) == []
    one_line_error(daemon.cli("containers", "info", "db-1", check=False))


# --- ingests: crashes and concurrent writers -------------------------------------------------

def test_content_actor_killed_mid_ingest_shows_nothing_partial_and_the_write_resumes(daemon):
    """The source pauses at 10 MiB while the content actor is killed, carries on (its writes
    wait for the new actor), and is cut off at 20 MiB; the same write run again then sends only
    what the store does not hold yet."""
    client = daemon.client(timeout=60)
    data = random.Random(4).randbytes(50 * MiB)
    ref = "big-layer"
    halfway, killed = threading.Event(), threading.Event()

    class Source:
        pos = 0

        def read(self, n: int) -> bytes:
            if self.pos >= 10 * MiB and not killed.is_set():
                halfway.set()
                if not killed.wait(30):
                    raise AssertionError("the actor was not killed")
            if self.pos >= 20 * MiB:
                raise OSError("source cut off")
            chunk = data[self.pos:self.pos + n]
            self.pos += len(chunk)
            return chunk

    old = daemon.actor_pids()["content"]
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.content.write, ref, Source(), len(data))
        assert halfway.wait(30)
        os.kill(old, signal.SIGKILL)
        killed.set()
        with pytest.raises(OSError, match="source cut off"):
            first.result(timeout=60)
    assert daemon.actor_pids()["content"] != old

    assert digests(daemon) == set()
    assert blob_files(daemon) == []
    status = client.content.status(ref)
    assert status["offset"] > 0
    assert status["offset"] == 20 * MiB and status["total"] == len(data)
    active = lines(berth(daemon, "content", "active"))
    assert active[1].split()[:3] == [ref, "20.0", "MiB"]

    writes_before = requests_ok(client, "content", "write")
    info = client.content.write(ref, io.BytesIO(data), total=len(data))
    assert info["digest"] == sha(data) and info["size"] == len(data)
    assert requests_ok(client, "content", "write") - writes_before == 30       # only the missing 30 MiB
    assert hashlib.sha256(b"".join(client.content.read(info["digest"]))).hexdigest() == sha(data)[7:]
    assert digests(daemon) == {sha(data)}
    assert client.content.list_statuses() == []


def test_second_writer_on_a_ref_is_refused_until_the_first_finishes(daemon):
    client = daemon.client()
    first_data = random.Random(5).randbytes(3 * MiB)
    opened, go = threading.Event(), threading.Event()

    class Gated(io.BytesIO):
        def read(self, n: int = -1) -> bytes:
            opened.set()
            if not go.wait(30):
                raise AssertionError("never let go")
            return super().read(n)

    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        first = pool.submit(client.content.write, "shared", Gated(first_data))
        assert opened.wait(30)
        with pytest.raises(Unavailable, match="locked"):
            client.call("content", "writer_open", {"ref": "shared"})
        with pytest.raises(Unavailable, match="locked"):
            client.content.write("shared", b"second writer")
        go.set()
        assert first.result(timeout=30)["digest"] == sha(first_data)

    assert client.content.write("shared", b"second writer")["digest"] == sha(b"second writer")
    assert digests(daemon) == {sha(first_data), sha(b"second writer")}


def test_fsck_is_clean_until_a_blob_rots_on_disk_then_names_it_and_fails(daemon):
    kept, rotting = b"kept" * 1000, os.urandom(3 * MiB)
    ingest(daemon, "kept", kept)
    ingest(daemon, "rotting", rotting, namespace="other")
    clean = berth(daemon, "content", "fsck")
    assert lines(clean) == ["checked 2 blobs, 3.0 MiB"]

    path = os.path.join(daemon.root, "content", "blobs", "sha256", sha(rotting)[7:])
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.seek(2 * MiB)
        f.write(b"\0" * 16)
    found = berth(daemon, "content", "fsck", check=False)
    assert found.returncode == 1
    rows = [line.split() for line in lines(found)[2:]]
    assert [row[:3] for row in rows] == [["corrupt", sha(rotting), "digest"]]
    report = json.loads(berth(daemon, "content", "fsck", "--json", check=False).stdout)
    assert [(d["digest"], d["namespaces"], d["problem"]) for d in report["corrupt"]] == [
        (sha(rotting), ["other"], "digest mismatch")]
    assert report["missing"] == report["orphans"] == report["unknown"] == []
    assert berth(daemon, "content", "get", sha(kept)).stdout == kept          # still serving
