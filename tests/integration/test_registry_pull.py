"""Pull and push against a real docker-registry, with images built by umoci and pushed by skopeo.

The transfer logic runs in-process on a ContentStore of the test's own; no daemon is involved.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os

import pytest

from actors.content import ContentStore
from actors.transfer import (GC_REF_CONTENT, OCI_INDEX, PlatformMatcher, Puller, Pusher, format_platform,
                             host_platform, parse_reference)
from bus.errors import InvalidArgument, NotFound, PermissionDenied, Unavailable

from tests.registry import AUTH_PASSWORD, AUTH_USER, BearerAuth, Registry, run

NS = "default"
CREDENTIALS = f"{AUTH_USER}:{AUTH_PASSWORD}"


@pytest.fixture
def store(tmp_path):
    s = ContentStore(str(tmp_path / "content"))
    yield s
    s.close()


def stored_digests(store: ContentStore) -> set[str]:
    return {info["digest"] for info in store.list(NS)}


def assert_blobs_verified(store: ContentStore) -> None:
    """Every file under blobs/ hashes to its name, and each has its row."""
    names = os.listdir(store.blobs)
    for name in names:
        with open(os.path.join(store.blobs, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == name
    assert {f"sha256:{n}" for n in names} == stored_digests(store)


def read_json(store: ContentStore, digest: str) -> dict:
    return json.loads(store.read(NS, digest))


def assert_image_complete(store: ContentStore, manifest_digest: str) -> dict:
    """The manifest, its config and its layers are stored, with the manifest's GC labels."""
    manifest = read_json(store, manifest_digest)
    labels = store.info(NS, manifest_digest)["labels"]
    assert labels[f"{GC_REF_CONTENT}.config"] == manifest["config"]["digest"]
    for i, layer in enumerate(manifest["layers"]):
        assert labels[f"{GC_REF_CONTENT}.l.{i}"] == layer["digest"]
        assert store.info(NS, layer["digest"])["size"] == layer["size"]
    assert store.info(NS, manifest["config"]["digest"])["size"] == manifest["config"]["size"]
    return manifest


# --- references -------------------------------------------------------------------------------------

@pytest.mark.parametrize("ref, expected", [
    ("127.0.0.1:5000/busybox:latest", ("127.0.0.1:5000", "busybox", "latest", None)),
    ("busybox", ("docker.io", "library/busybox", "latest", None)),
    ("user/app:1.2", ("docker.io", "user/app", "1.2", None)),
    ("localhost/a/b", ("localhost", "a/b", "latest", None)),
    ("index.docker.io/library/x", ("docker.io", "library/x", "latest", None)),
    ("ghcr.io/o/r@sha256:" + "a" * 64, ("ghcr.io", "o/r", None, "sha256:" + "a" * 64)),
    ("ghcr.io/o/r:v1@sha256:" + "b" * 64, ("ghcr.io", "o/r", "v1", "sha256:" + "b" * 64)),
])
def test_reference_parsing(ref, expected):
    parsed = parse_reference(ref)
    assert (parsed.host, parsed.repository, parsed.tag, parsed.digest) == expected
    assert parse_reference(str(parsed)) == parsed


def test_docker_hub_reference_is_normalised():
    parsed = parse_reference("busybox")
    assert str(parsed) == "docker.io/library/busybox:latest"
    assert parsed.endpoint == "registry-1.docker.io"


@pytest.mark.parametrize("ref, words", [
    ("", "non-empty"),
    ("Busybox:latest", "lowercase"),
    ("repo@sha256:abc", "64 lower-case hex"),
    ("repo@sha256:" + "A" * 64, "64 lower-case hex"),
    ("repo:bad!tag", "not valid"),
    ("repo:bad/tag", "registry host"),
    ("host:5000/", "no repository"),
    ("a b", "spaces"),
    ("repo:" + "t" * 200, "tag"),
])
def test_invalid_reference_is_invalid_argument(ref, words):
    with pytest.raises(InvalidArgument) as err:
        parse_reference(ref)
    assert words in str(err.value)


def test_platform_matcher_prefers_exact_then_compatible():
    m = PlatformMatcher("linux/arm64")
    platforms = [{"os": "linux", "architecture": "arm", "variant": "v7"},
                 {"os": "linux", "architecture": "arm64", "variant": "v8"},
                 {"os": "linux", "architecture": "amd64"}]
    entries = [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": f"sha256:{i * 64}",
                "size": 1, "platform": p} for i, p in zip("abc", platforms)]
    assert m.select(entries)[0]["digest"] == "sha256:" + "b" * 64
    assert m.select(entries[:1])[0]["digest"] == "sha256:" + "a" * 64
    assert PlatformMatcher("linux/s390x").select(entries) == []


# --- pulls ------------------------------------------------------------------------------------------

def test_pull_by_tag_stores_all_blobs_with_gc_labels(registry, busybox_image, store):
    pushed = registry.push(busybox_image, "busybox:latest")
    events = []
    record = Puller(store).pull(NS, f"{registry.host}/busybox:latest", plain_http=True, progress=events.append)

    assert record["name"] == f"{registry.host}/busybox:latest"
    assert record["target"]["digest"] == pushed
    assert record["target"]["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    manifest = assert_image_complete(store, pushed)
    assert stored_digests(store) == {pushed, manifest["config"]["digest"], *(l["digest"] for l in manifest["layers"])}
    assert_blobs_verified(store)
    assert os.listdir(store.ingests) == []
    statuses = {(e["ref"].split("-")[0], e["status"]) for e in events}
    assert (record["name"], "resolving") in statuses
    assert {("layer", "done"), ("config", "done"), ("manifest", "done")} <= statuses
    layer = manifest["layers"][0]
    last = [e for e in events if e["digest"] == layer["digest"]][-1]
    assert (last["offset"], last["total"]) == (layer["size"], layer["size"])


def test_pull_by_digest(registry, busybox_image, store):
    pushed = registry.push(busybox_image, "busybox:latest")
    record = Puller(store).pull(NS, f"{registry.host}/busybox@{pushed}", plain_http=True)
    assert record["name"] == f"{registry.host}/busybox@{pushed}"
    assert record["target"]["digest"] == pushed
    assert_image_complete(store, pushed)
    assert_blobs_verified(store)


def test_pull_of_unknown_tag_is_not_found(registry, busybox_image, store):
    registry.push(busybox_image, "busybox:latest")
    with pytest.raises(NotFound):
        Puller(store).pull(NS, f"{registry.host}/busybox:nope", plain_http=True)
    assert stored_digests(store) == set()


def test_second_pull_finds_everything_stored(registry, busybox_image, store):
    registry.push(busybox_image, "busybox:latest")
    puller = Puller(store)
    first = puller.pull(NS, f"{registry.host}/busybox:latest", plain_http=True)
    events = []
    second = puller.pull(NS, f"{registry.host}/busybox:latest", plain_http=True, progress=events.append)
    assert second == first
    blob_statuses = [e["status"] for e in events if e["ref"].startswith(("layer-", "config-", "manifest-"))]
    assert blob_statuses and set(blob_statuses) == {"exists"}


def test_layered_image_pull(registry, layered_image, store):
    pushed = registry.push(layered_image, "layered:v3")
    Puller(store).pull(NS, f"{registry.host}/layered:v3", plain_http=True)
    manifest = assert_image_complete(store, pushed)
    assert len(manifest["layers"]) == 3
    assert_blobs_verified(store)


def test_concurrent_pulls_of_one_image_share_the_downloads(registry, busybox_image, store):
    pushed = registry.push(busybox_image, "busybox:latest")
    puller = Puller(store)
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        records = list(pool.map(lambda _: puller.pull(NS, f"{registry.host}/busybox:latest", plain_http=True),
                                range(4)))
    assert {r["target"]["digest"] for r in records} == {pushed}
    assert_image_complete(store, pushed)
    assert_blobs_verified(store)
    assert os.listdir(store.ingests) == []
    assert puller.stats()["pulls"] == 0


def test_pull_into_a_second_namespace(registry, busybox_image, store):
    pushed = registry.push(busybox_image, "busybox:latest")
    puller = Puller(store)
    puller.pull(NS, f"{registry.host}/busybox:latest", plain_http=True)
    puller.pull("other", f"{registry.host}/busybox:latest", plain_http=True)
    assert {i["digest"] for i in store.list("other")} == stored_digests(store)
    assert store.info("other", pushed)["labels"] == store.info(NS, pushed)["labels"]


@pytest.fixture
def multi_platform(registry, busybox_image, busybox_arm64_image):
    index_digest, body = registry.push_index("multi:latest", {"linux/amd64": busybox_image,
                                                              "linux/arm64": busybox_arm64_image})
    by_arch = {m["platform"]["architecture"]: m["digest"] for m in json.loads(body)["manifests"]}
    return index_digest, by_arch


def test_index_pull_picks_host_platform_by_default(registry, multi_platform, store):
    index_digest, by_arch = multi_platform
    host_arch = host_platform()[1]
    if host_arch not in by_arch:
        pytest.skip(f"the test index has no {host_arch} image")
    record = Puller(store).pull(NS, f"{registry.host}/multi:latest", plain_http=True)
    assert record["target"] == {"mediaType": OCI_INDEX, "digest": index_digest, "size": record["target"]["size"]}
    chosen = by_arch[host_arch]
    assert store.info(NS, index_digest)["labels"] == {f"{GC_REF_CONTENT}.m.0": chosen}
    assert_image_complete(store, chosen)
    for arch, digest in by_arch.items():
        if arch != host_arch:
            assert digest not in stored_digests(store)
    assert_blobs_verified(store)


def test_index_pull_picks_arm64_on_request(registry, multi_platform, store):
    index_digest, by_arch = multi_platform
    Puller(store).pull(NS, f"{registry.host}/multi:latest", platform="linux/arm64", plain_http=True)
    assert store.info(NS, index_digest)["labels"] == {f"{GC_REF_CONTENT}.m.0": by_arch["arm64"]}
    config = read_json(store, assert_image_complete(store, by_arch["arm64"])["config"]["digest"])
    assert config["architecture"] == "arm64"
    assert by_arch["amd64"] not in stored_digests(store)


def test_index_without_the_platform_is_not_found(registry, multi_platform, store):
    with pytest.raises(NotFound) as err:
        Puller(store).pull(NS, f"{registry.host}/multi:latest", platform="linux/s390x", plain_http=True)
    assert "linux/s390x" in str(err.value) and "linux/arm64" in str(err.value)


# --- pushes -----------------------------------------------------------------------------------------

def skopeo_digest(host: str, ref: str, creds: str | None = None) -> str:
    args = ["skopeo", "inspect", "--tls-verify=false"]
    if creds:
        args += ["--creds", creds]
    return json.loads(run(*args, f"docker://{host}/{ref}").stdout)["Digest"]


@pytest.mark.parametrize("chunk_size", [None, 256 << 10], ids=["monolithic", "chunked"])
def test_push_to_another_repository_reads_back(registry, busybox_image, store, chunk_size):
    pushed = registry.push(busybox_image, "busybox:latest")
    record = Puller(store).pull(NS, f"{registry.host}/busybox:latest", plain_http=True)
    events = []
    target = Pusher(store, chunk_size=chunk_size).push(NS, record["target"], f"{registry.host}/copy:v1",
                                                       plain_http=True, progress=events.append)
    assert target["digest"] == pushed
    assert skopeo_digest(registry.host, "copy:v1") == pushed
    uploaded = {e["digest"] for e in events if e["status"] == "done" and e["ref"].startswith("layer-")}
    assert uploaded == {l["digest"] for l in read_json(store, pushed)["layers"]}
    # A second push finds every blob there already.
    events.clear()
    Pusher(store).push(NS, record["target"], f"{registry.host}/copy:v2", plain_http=True, progress=events.append)
    assert {e["status"] for e in events if e["ref"].startswith(("layer-", "config-"))} >= {"exists"}
    assert "uploading" not in {e["status"] for e in events}
    assert skopeo_digest(registry.host, "copy:v2") == pushed


def test_push_of_an_index_reads_back(registry, multi_platform, store):
    index_digest, by_arch = multi_platform
    puller = Puller(store)
    for arch in by_arch:
        puller.pull(NS, f"{registry.host}/multi:latest", platform=f"linux/{arch}", plain_http=True)
    target = {"mediaType": OCI_INDEX, "digest": index_digest, "size": store.info(NS, index_digest)["size"]}
    Pusher(store).push(NS, target, f"{registry.host}/multi-copy:v1", plain_http=True)
    assert skopeo_digest(registry.host, "multi-copy:v1") == index_digest
    for digest in by_arch.values():
        assert skopeo_digest(registry.host, f"multi-copy@{digest}") == digest


def test_push_of_a_partly_pulled_index_names_the_missing_manifest(registry, multi_platform, store):
    index_digest, by_arch = multi_platform
    Puller(store).pull(NS, f"{registry.host}/multi:latest", platform="linux/arm64", plain_http=True)
    target = {"mediaType": OCI_INDEX, "digest": index_digest, "size": store.info(NS, index_digest)["size"]}
    with pytest.raises(NotFound) as err:
        Pusher(store).push(NS, target, f"{registry.host}/multi-copy:v1", plain_http=True)
    assert by_arch["amd64"] in str(err.value) and index_digest in str(err.value)


def test_push_to_a_digest_reference_is_invalid(registry, store):
    with pytest.raises(InvalidArgument):
        Pusher(store).push(NS, {"mediaType": OCI_INDEX, "digest": "sha256:" + "0" * 64, "size": 1},
                           f"{registry.host}/x@sha256:{'0' * 64}", plain_http=True)


# --- authentication ---------------------------------------------------------------------------------

def test_basic_auth_pull_with_credentials(auth_registry, busybox_image, store):
    pushed = auth_registry.push(busybox_image, "private/busybox:latest")
    record = Puller(store).pull(NS, f"{auth_registry.host}/private/busybox:latest", plain_http=True,
                                credentials=CREDENTIALS)
    assert record["target"]["digest"] == pushed
    assert_image_complete(store, pushed)


def test_basic_auth_pull_without_credentials_is_permission_denied(auth_registry, busybox_image, store):
    auth_registry.push(busybox_image, "private/busybox:latest")
    with pytest.raises(PermissionDenied) as err:
        Puller(store).pull(NS, f"{auth_registry.host}/private/busybox:latest", plain_http=True)
    assert "requires authentication" in str(err.value)
    assert stored_digests(store) == set()


def test_basic_auth_wrong_password_is_permission_denied(auth_registry, busybox_image, store):
    auth_registry.push(busybox_image, "private/busybox:latest")
    with pytest.raises(PermissionDenied) as err:
        Puller(store).pull(NS, f"{auth_registry.host}/private/busybox:latest", plain_http=True,
                           credentials=f"{AUTH_USER}:wrong")
    assert "rejected" in str(err.value)


def test_basic_auth_push(auth_registry, busybox_image, store):
    pushed = auth_registry.push(busybox_image, "private/busybox:latest")
    record = Puller(store).pull(NS, f"{auth_registry.host}/private/busybox:latest", plain_http=True,
                                credentials=CREDENTIALS)
    Pusher(store).push(NS, record["target"], f"{auth_registry.host}/private/copy:v1", plain_http=True,
                       credentials=CREDENTIALS)
    assert skopeo_digest(auth_registry.host, "private/copy:v1", CREDENTIALS) == pushed


def test_bearer_token_pull(registry, bearer_registry, busybox_image, store):
    pushed = registry.push(busybox_image, "busybox:latest")
    record = Puller(store).pull(NS, f"{bearer_registry.host}/busybox:latest", plain_http=True,
                                credentials=CREDENTIALS)
    assert record["target"]["digest"] == pushed
    assert_image_complete(store, pushed)
    assert_blobs_verified(store)
    (token_request,) = bearer_registry.token_requests        # one token serves the whole pull
    assert token_request["service"] == BearerAuth.SERVICE
    assert "repository:busybox:pull" in token_request["scopes"]
    assert token_request["authorization"].startswith("Basic ")
    served = [r for r in bearer_registry.proxy_requests if r["authorization"].startswith("Bearer ")]
    assert {r["path"].split("/")[3] for r in served} >= {"manifests", "blobs"}
    assert not any(r["authorization"].startswith("Basic ") for r in bearer_registry.proxy_requests)


def test_bearer_token_refused_is_permission_denied(registry, bearer_registry, busybox_image, store):
    registry.push(busybox_image, "busybox:latest")
    with pytest.raises(PermissionDenied) as err:
        Puller(store).pull(NS, f"{bearer_registry.host}/busybox:latest", plain_http=True,
                           credentials=f"{AUTH_USER}:wrong")
    assert "token server" in str(err.value)
    with pytest.raises(PermissionDenied):
        Puller(store).pull(NS, f"{bearer_registry.host}/busybox:latest", plain_http=True)
    assert stored_digests(store) == set()


def test_bearer_token_push(registry, bearer_registry, busybox_image, store):
    pushed = registry.push(busybox_image, "busybox:latest")
    record = Puller(store).pull(NS, f"{bearer_registry.host}/busybox:latest", plain_http=True,
                                credentials=CREDENTIALS)
    Pusher(store).push(NS, record["target"], f"{bearer_registry.host}/pushed:v1", plain_http=True,
                       credentials=CREDENTIALS)
    assert skopeo_digest(registry.host, "pushed:v1") == pushed
    assert any("repository:pushed:pull,push" in r["scopes"] for r in bearer_registry.token_requests)


def test_anonymous_bearer_token_pull(registry, busybox_image, store):
    pushed = registry.push(busybox_image, "busybox:latest")
    bearer = BearerAuth(registry)                              # tokens for anyone, like Docker Hub
    try:
        record = Puller(store).pull(NS, f"{bearer.host}/busybox:latest", plain_http=True)
    finally:
        bearer.stop()
    assert record["target"]["digest"] == pushed
    assert all(r["authorization"] is None for r in bearer.token_requests)


# --- TLS --------------------------------------------------------------------------------------------

@pytest.fixture
def tls_registry():
    reg = Registry(tls=True).start()
    yield reg
    reg.stop()


def test_https_registry_with_its_ca(tls_registry, busybox_image, store):
    pushed = tls_registry.push(busybox_image, "busybox:latest")
    record = Puller(store, verify=tls_registry.ca).pull(NS, f"{tls_registry.host}/busybox:latest")
    assert record["target"]["digest"] == pushed
    assert_image_complete(store, pushed)


def test_https_registry_with_an_unknown_certificate_is_refused(tls_registry, busybox_image, store):
    tls_registry.push(busybox_image, "busybox:latest")
    with pytest.raises(Unavailable) as err:
        Puller(store).pull(NS, f"{tls_registry.host}/busybox:latest")
    assert "CERTIFICATE_VERIFY_FAILED" in str(err.value)
    assert stored_digests(store) == set()


def test_localhost_without_plain_http_falls_back_to_http(registry, busybox_image, store):
    pushed = registry.push(busybox_image, "busybox:latest")
    record = Puller(store).pull(NS, f"{registry.host}/busybox:latest")
    assert record["target"]["digest"] == pushed


def test_unreachable_registry_is_unavailable(store, tmp_path):
    reg = Registry(workdir=str(tmp_path / "reg")).start()
    host = reg.host
    reg.stop()
    with pytest.raises(Unavailable):
        Puller(store).pull(NS, f"{host}/busybox:latest", plain_http=True)


def test_host_platform_names_this_machine():
    os_, arch, _ = host_platform()
    assert os_ == "linux" and arch in {"amd64", "arm64", "arm", "386", "ppc64le", "s390x", "riscv64"}
    assert format_platform(host_platform()).startswith(f"linux/{arch}")

