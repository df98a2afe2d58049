"""A registry that lies: a stdlib HTTP server of the test's own answering with crafted responses.

Each pull must fail with a clear error of the right class, or (foreign URLs, cross-host redirects)
succeed without doing the dangerous thing; in every case the content store's blobs/ holds only
verified blobs.
"""
from __future__ import annotations

import base64
import hashlib
import json
import os
import urllib.parse

import pytest

from actors.content import ContentStore
from actors.transfer import MAX_MANIFEST, OCI_INDEX, OCI_MANIFEST, Puller
from bus.errors import (FailedPrecondition, InvalidArgument, NotFound, NotImplementedErr,
                        PermissionDenied, ResourceExhausted, Unavailable)
from tests.registry import HTTPServerThread, QuietHandler

NS = "default"
REPO = "lies"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
FOREIGN_LAYER = "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"
USER, PASSWORD = "alice", "wonderland"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def sha(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def desc(media_type: str, data: bytes, **extra) -> dict:
    return {"mediaType": media_type, "digest": sha(data), "size": len(data), **extra}


# --- the lying registry -----------------------------------------------------------------------------

class _LiesHandler(QuietHandler):
    def _handle(self) -> None:
        srv = self.server
        path = urllib.parse.urlsplit(self.path).path
        srv.requests.append({"method": self.command, "path": path,
                             "authorization": self.headers.get("Authorization"),
                             "range": self.headers.get("Range")})
        route = srv.routes.get(path)
        if route is None:
            return self.reply(404, b'{"errors":[{"code":"NOT_FOUND","message":"no such thing"}]}',
                              {"Content-Type": "application/json"})
        route(self)

    do_GET = do_HEAD = _handle


def serve(body: bytes, content_type: str = "application/octet-stream", digest: str | None = None,
          status: int = 200, headers: dict | None = None):
    def route(h: QuietHandler) -> None:
        extra = {"Content-Type": content_type, **(headers or {})}
        if digest:
            extra["Docker-Content-Digest"] = digest
        h.reply(status, body, extra)
    return route


def serve_ranged(body: bytes):
    """An honest blob route that honours Range requests."""
    def route(h: QuietHandler) -> None:
        wanted = h.headers.get("Range")
        if wanted and wanted.startswith("bytes=") and h.command == "GET":
            start = int(wanted[len("bytes="):].rstrip("-"))
            return h.reply(206, body[start:], {"Content-Range": f"bytes {start}-{len(body) - 1}/{len(body)}"})
        h.reply(200, body)
    return route


def serve_chunked(body: bytes, content_type: str = "application/octet-stream", head_length: bool = True):
    """Transfer-Encoding: chunked, so no Content-Length announces the size."""
    def route(h: QuietHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Type", content_type)
        if h.command == "HEAD":
            h.send_header("Content-Length" if head_length else "X-No-Length", str(len(body)))
            h.end_headers()
            return
        h.send_header("Transfer-Encoding", "chunked")
        h.end_headers()
        for pos in range(0, len(body), 64 << 10):
            piece = body[pos:pos + (64 << 10)]
            h.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
        h.wfile.write(b"0\r\n\r\n")
    return route


def serve_truncated(body: bytes, announced: int):
    """Announce `announced` bytes, send `body`, then hang up."""
    def route(h: QuietHandler) -> None:
        h.send_response(200)
        h.send_header("Content-Length", str(announced))
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(body)
            h.wfile.flush()
        h.close_connection = True
    return route


def require_basic(route):
    def guarded(h: QuietHandler) -> None:
        if h.headers.get("Authorization") != BASIC:
            return h.reply(401, b'{"errors":[{"code":"UNAUTHORIZED","message":"authenticate"}]}',
                           {"WWW-Authenticate": 'Basic realm="lies"', "Content-Type": "application/json"})
        route(h)
    return guarded


class Lies:
    """The crafted registry: `routes` maps a path to a route function; `requests` records all."""

    def __init__(self, host: str = "127.0.0.1"):
        self.routes: dict = {"/v2/": serve(b"{}", "application/json")}
        self.requests: list[dict] = []
        self.server = HTTPServerThread(_LiesHandler, host=host, routes=self.routes, requests=self.requests)
        self.host = self.server.host
        self.url = self.server.url

    def blob(self, data: bytes, route=None) -> None:
        self.routes[f"/v2/{REPO}/blobs/{sha(data)}"] = route or serve_ranged(data)

    def manifest(self, body: bytes, media_type: str = OCI_MANIFEST, tag: str = "v1", route=None) -> dict:
        route = route or serve(body, media_type, sha(body))
        self.routes[f"/v2/{REPO}/manifests/{tag}"] = route
        self.routes[f"/v2/{REPO}/manifests/{sha(body)}"] = route
        return desc(media_type, body)

    def image(self, layers: list[dict] | None = None, tag: str = "v1", **extra) -> "Image":
        """A valid image (config + one 300 KiB layer) unless told otherwise."""
        config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers"}}).encode()
        layer = os.urandom(300 << 10)
        self.blob(config)
        self.blob(layer)
        layer_descs = layers if layers is not None else [desc(LAYER, layer)]
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": desc(OCI_CONFIG, config),
                           "layers": layer_descs, **extra}).encode()
        return Image(self.manifest(body, tag=tag), body, config, layer)

    def fetched(self, digest: str) -> list[dict]:
        return [r for r in self.requests if r["path"].endswith(digest) and r["method"] == "GET"]

    @property
    def ref(self) -> str:
        return f"{self.host}/{REPO}:v1"


class Image:
    def __init__(self, manifest: dict, body: bytes, config: bytes, layer: bytes):
        self.manifest, self.body, self.config, self.layer = manifest, body, config, layer


class _RecordingHandler(QuietHandler):
    """Another host: records every request's Authorization; serves `body` or a 401."""

    def _handle(self) -> None:
        self.server.requests.append({"path": self.path, "authorization": self.headers.get("Authorization")})
        if self.server.body is None:
            return self.reply(401, b"no", {"WWW-Authenticate": 'Basic realm="elsewhere"'})
        self.reply(200, self.server.body)

    do_GET = do_HEAD = _handle


@pytest.fixture
def lies():
    registry = Lies()
    yield registry
    registry.server.stop()


@pytest.fixture
def elsewhere():
    """A second host (127.0.0.2, another origin) that records what it is sent."""
    server = HTTPServerThread(_RecordingHandler, host="127.0.0.2", requests=[], body=None)
    yield server
    server.stop()


@pytest.fixture
def store(tmp_path):
    s = ContentStore(str(tmp_path / "content"))
    yield s
    s.close()


def pull(store: ContentStore, ref: str, **kw) -> dict:
    return Puller(store).pull(NS, ref, plain_http=True, **kw)


def assert_only_verified(store: ContentStore, *absent: str) -> set[str]:
    """blobs/ holds only files whose content hashes to their name; none of `absent` is there."""
    names = set(os.listdir(store.blobs))
    for name in names:
        with open(os.path.join(store.blobs, name), "rb") as f:
            assert hashlib.sha256(f.read()).hexdigest() == name, f"unverified blob {name}"
    digests = {f"sha256:{n}" for n in names}
    assert digests == {info["digest"] for info in store.list(NS)}
    for digest in absent:
        assert digest not in digests
    return digests


def assert_no_ingest(store: ContentStore, ref: str) -> None:
    with pytest.raises(NotFound):
        store.status(NS, ref)


# --- blobs that do not match their descriptors ------------------------------------------------------

def test_blob_bytes_not_matching_the_digest(lies, store):
    img = lies.image()
    forged = bytes(b ^ 0xFF for b in img.layer)               # same size, other bytes
    lies.blob(img.layer, serve(forged))
    with pytest.raises(FailedPrecondition) as err:
        pull(store, lies.ref)
    assert "digest" in str(err.value) and sha(img.layer) in str(err.value)
    assert_only_verified(store, sha(img.layer), sha(forged), img.manifest["digest"])
    assert_no_ingest(store, f"layer-{sha(img.layer)}")        # the forged bytes are gone too


def test_blob_larger_than_its_descriptor_says(lies, store):
    layer = os.urandom(100 << 10)
    lies.blob(layer)
    img = lies.image(layers=[desc(LAYER, layer, size=len(layer) - 10)])
    with pytest.raises(FailedPrecondition) as err:
        pull(store, lies.ref)
    assert "announced" in str(err.value)
    assert_only_verified(store, sha(layer), img.manifest["digest"])


def test_blob_larger_than_its_descriptor_without_content_length(lies, store):
    layer = os.urandom(100 << 10)
    lies.blob(layer, serve_chunked(layer))
    img = lies.image(layers=[desc(LAYER, layer, size=len(layer) - 10)])
    with pytest.raises(FailedPrecondition) as err:
        pull(store, lies.ref)
    assert "more than" in str(err.value)
    assert_only_verified(store, sha(layer), img.manifest["digest"])
    assert_no_ingest(store, f"layer-{sha(layer)}")


def test_blob_smaller_than_its_descriptor_says(lies, store):
    layer = os.urandom(100 << 10)
    lies.blob(layer, serve_chunked(layer))
    img = lies.image(layers=[desc(LAYER, layer, size=len(layer) + 10)])
    with pytest.raises(FailedPrecondition) as err:
        pull(store, lies.ref)
    assert f"{len(layer)} of its {len(layer) + 10} bytes" in str(err.value)
    assert_only_verified(store, sha(layer), img.manifest["digest"])


# --- Content-Length lies ----------------------------------------------------------------------------

def test_content_length_announcing_more_than_the_descriptor(lies, store):
    img = lies.image()
    lies.blob(img.layer, serve(img.layer + b"\0" * 1000))
    with pytest.raises(FailedPrecondition) as err:
        pull(store, lies.ref)
    assert f"announced {len(img.layer) + 1000} bytes" in str(err.value)
    assert_only_verified(store, sha(img.layer), img.manifest["digest"])


def test_content_length_not_honoured_breaks_off_then_resumes_with_a_range(lies, store):
    img = lies.image()
    half = len(img.layer) // 2
    lies.blob(img.layer, serve_truncated(img.layer[:half], announced=len(img.layer)))
    with pytest.raises(Unavailable) as err:
        pull(store, lies.ref)
    assert "broke off" in str(err.value)
    assert_only_verified(store, sha(img.layer), img.manifest["digest"])
    # The bytes that did arrive wait in the ingest; an honest answer continues from there.
    assert store.status(NS, f"layer-{sha(img.layer)}")["offset"] == half
    lies.blob(img.layer)
    record = pull(store, lies.ref)
    assert record["target"]["digest"] == img.manifest["digest"]
    assert lies.fetched(sha(img.layer))[-1]["range"] == f"bytes={half}-"
    assert sha(img.layer) in assert_only_verified(store)


def test_resumed_ingest_that_does_not_verify_starts_over(lies, store):
    """A leftover ingest whose bytes are wrong costs one more download, never a bad blob."""
    img = lies.image()
    half = len(img.layer) // 2
    key = f"layer-{sha(img.layer)}"
    store.writer_open(NS, key, len(img.layer), sha(img.layer))
    store.write(NS, key, 0, b"\0" * half)
    store.writer_close(NS, key)
    pull(store, lies.ref)
    ranges = [r["range"] for r in lies.fetched(sha(img.layer))]
    assert ranges == [f"bytes={half}-", None]
    assert sha(img.layer) in assert_only_verified(store)


# --- manifests --------------------------------------------------------------------------------------

def test_manifest_over_4_mib_announced_by_head(lies, store):
    big = b"{" + b" " * (MAX_MANIFEST + 10) + b"}"
    lies.manifest(big)
    with pytest.raises(ResourceExhausted) as err:
        pull(store, lies.ref)
    assert str(MAX_MANIFEST) in str(err.value)
    assert not [r for r in lies.requests if r["method"] == "GET" and "/manifests/" in r["path"]]
    assert assert_only_verified(store) == set()


def test_manifest_over_4_mib_streamed(lies, store):
    big = b'{"schemaVersion": 2, "layers": [' + b" " * (MAX_MANIFEST + 10) + b"]}"
    lies.manifest(big, route=serve_chunked(big, OCI_MANIFEST, head_length=False))
    with pytest.raises(ResourceExhausted) as err:
        pull(store, lies.ref)
    assert f"more than {MAX_MANIFEST} bytes" in str(err.value)
    assert assert_only_verified(store) == set()


def test_manifest_over_4_mib_named_by_an_index(lies, store):
    child = {"mediaType": OCI_MANIFEST, "digest": sha(b"x"), "size": MAX_MANIFEST + 1,
             "platform": {"os": "linux", "architecture": "amd64"}}
    index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [child]}).encode()
    lies.manifest(index, OCI_INDEX)
    with pytest.raises(ResourceExhausted):
        pull(store, lies.ref, platform="linux/amd64")
    assert lies.fetched(sha(b"x")) == []
    assert assert_only_verified(store) == set()


def test_document_both_index_and_manifest(lies, store):
    img = lies.image(manifests=[{"mediaType": OCI_MANIFEST, "digest": sha(b"other"), "size": 5}])
    with pytest.raises(InvalidArgument) as err:
        pull(store, lies.ref)
    assert "both an index" in str(err.value)
    assert lies.fetched(sha(img.layer)) == []
    assert assert_only_verified(store) == set()


def test_document_both_index_and_manifest_served_as_an_index(lies, store):
    body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [],
                       "config": desc(OCI_CONFIG, b"{}"), "layers": []}).encode()
    lies.manifest(body, OCI_INDEX)
    with pytest.raises(InvalidArgument) as err:
        pull(store, lies.ref)
    assert "both an index" in str(err.value)
    assert assert_only_verified(store) == set()


def test_manifest_that_is_not_json(lies, store):
    lies.manifest(b"\x00not json")
    with pytest.raises(InvalidArgument) as err:
        pull(store, lies.ref)
    assert "not valid JSON" in str(err.value)
    assert assert_only_verified(store) == set()


def test_schema1_manifest_is_not_implemented(lies, store):
    lies.manifest(b'{"schemaVersion": 1}', "application/vnd.docker.distribution.manifest.v1+prettyjws")
    with pytest.raises(NotImplementedErr):
        pull(store, lies.ref)
    assert assert_only_verified(store) == set()


def test_manifest_not_matching_the_digest_header(lies, store):
    img = lies.image()
    other = sha(b"something else entirely")
    route = serve(img.body, OCI_MANIFEST, other)
    lies.routes[f"/v2/{REPO}/manifests/v1"] = route
    lies.routes[f"/v2/{REPO}/manifests/{other}"] = route       # the lie, served under its claimed name
    with pytest.raises(FailedPrecondition) as err:
        pull(store, lies.ref)
    assert other in str(err.value)
    assert lies.fetched(sha(img.layer)) == []
    assert assert_only_verified(store) == set()


# --- digests that are not digests -------------------------------------------------------------------

@pytest.mark.parametrize("bad", ["sha256:../../x", "sha256:" + "AB" * 32, "sha512:" + "a" * 128,
                                 "sha256:" + "a" * 63, "sha256:" + "a" * 64 + "/../../x"],
                         ids=["traversal", "upper-case", "sha512", "short", "suffix"])
def test_invalid_digest_in_a_manifest(lies, store, tmp_path, bad):
    img = lies.image(layers=[{"mediaType": LAYER, "digest": bad, "size": 10}])
    with pytest.raises(InvalidArgument) as err:
        pull(store, lies.ref)
    assert "lower-case hex" in str(err.value) and "layer 0" in str(err.value)
    assert not [r for r in lies.requests if "/blobs/" in r["path"]]      # nothing fetched at all
    assert not os.path.exists(tmp_path / "x")
    assert assert_only_verified(store) == set()
    assert img.manifest["digest"] not in {i["digest"] for i in store.list(NS)}


def test_invalid_digest_header(lies, store):
    img = lies.image()
    lies.routes[f"/v2/{REPO}/manifests/v1"] = serve(img.body, OCI_MANIFEST, "sha256:../../etc/passwd")
    with pytest.raises(InvalidArgument) as err:
        pull(store, lies.ref)
    assert "invalid digest" in str(err.value)
    assert assert_only_verified(store) == set()


# --- URLs and hosts the registry names ----------------------------------------------------------------

def test_foreign_layer_url_is_not_followed(lies, elsewhere, store):
    foreign = os.urandom(1000)
    lies.blob(foreign)                                          # even the registry is not asked
    img = lies.image(layers=None)
    manifest = json.loads(img.body)
    manifest["layers"].append(desc(FOREIGN_LAYER, foreign, urls=[f"{elsewhere.url}/foreign.tar.gz"]))
    body = json.dumps(manifest).encode()
    target = lies.manifest(body)
    record = pull(store, lies.ref)
    assert record["target"]["digest"] == target["digest"]
    assert elsewhere.server.requests == []
    assert lies.fetched(sha(foreign)) == []
    stored = assert_only_verified(store, sha(foreign))
    assert sha(img.layer) in stored
    labels = store.info(NS, target["digest"])["labels"]
    assert labels["containerd.io/gc.ref.content.l.1"] == sha(foreign)


def test_urls_on_a_distributable_layer_are_not_followed(lies, elsewhere, store):
    layer = os.urandom(1000)
    lies.blob(layer)
    lies.image(layers=[desc(LAYER, layer, urls=[f"{elsewhere.url}/layer.tar.gz"])])
    pull(store, lies.ref)
    assert elsewhere.server.requests == []
    assert len(lies.fetched(sha(layer))) == 1
    assert sha(layer) in assert_only_verified(store)


def test_redirect_to_another_host_carries_no_credentials(lies, elsewhere, store):
    img = lies.image()
    elsewhere.server.body = img.layer
    redirect = serve(b"", headers={"Location": f"{elsewhere.url}/bucket/layer"}, status=307)
    for path, route in list(lies.routes.items()):
        lies.routes[path] = require_basic(redirect if path.endswith(sha(img.layer)) else route)
    record = pull(store, lies.ref, credentials=f"{USER}:{PASSWORD}")
    assert record["target"]["digest"] == img.manifest["digest"]
    assert elsewhere.server.requests, "the redirect was not followed"
    assert [r["authorization"] for r in elsewhere.server.requests] == [None] * len(elsewhere.server.requests)
    assert BASIC in {r["authorization"] for r in lies.requests}
    assert sha(img.layer) in assert_only_verified(store)


def test_redirect_target_asking_for_credentials_gets_none(lies, elsewhere, store):
    img = lies.image()
    redirect = serve(b"", headers={"Location": f"{elsewhere.url}/bucket/layer"}, status=302)
    for path, route in list(lies.routes.items()):
        lies.routes[path] = require_basic(redirect if path.endswith(sha(img.layer)) else route)
    with pytest.raises(PermissionDenied) as err:
        pull(store, lies.ref, credentials=f"{USER}:{PASSWORD}")
    assert "401" in str(err.value)
    assert elsewhere.server.requests
    assert {r["authorization"] for r in elsewhere.server.requests} == {None}
    assert_only_verified(store, sha(img.layer), img.manifest["digest"])


def test_redirect_to_a_non_http_url_is_refused(lies, store):
    img = lies.image()
    lies.blob(img.layer, serve(b"", headers={"Location": "ftp://127.0.0.1/x"}, status=302))
    with pytest.raises(Unavailable) as err:
        pull(store, lies.ref)
    assert "unusable location" in str(err.value)
    assert_only_verified(store, sha(img.layer))
