"""Test registries and test images: real images built with umoci, served by Debian's docker-registry.

    build_busybox_image(workdir)            OCI layout with one busybox layer (tag "latest")
    build_busybox_arm64_image(workdir)      the same rootfs, its config saying linux/arm64
    build_layered_image(workdir)            three layers: busybox; files, a hardlink, a symlink and a
                                            setuid file; a whiteout and an opaque directory
    Registry(...)                           docker-registry on 127.0.0.1, optionally behind htpasswd or TLS
    BearerAuth(registry)                    a token server and a bearer-checking proxy in front of a Registry
    HTTPServerThread(handler)               a stdlib HTTP server on a loopback port, owned by a test

Images are built once per set of inputs and kept under /tmp/berth-test-images/<key>/, where `key`
hashes everything that goes into them (this file, the busybox binary, umoci's version); a file lock
lets parallel test workers share one build. Callers treat the returned layout as read-only: copy
it (shutil.copytree) before changing it.

Fixtures, for a conftest or a test module to import: `busybox_image`, `busybox_arm64_image`,
`layered_image` (session-scoped layout paths), `registry`, `auth_registry` (basic auth as
AUTH_USER/AUTH_PASSWORD), `bearer_registry` (a BearerAuth; `.host` is what clients use).
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import hashlib
import http.client
import http.server
import inspect
import io
import json
import os
import re
import secrets
import shutil
import ssl
import subprocess
import tarfile
import tempfile
import threading
import urllib.parse

import httpx
import pytest

from tests.support import wait_until

IMAGE_CACHE = "/tmp/berth-test-images"
BUSYBOX = "/bin/busybox"
REGISTRY_BIN = "/usr/bin/docker-registry"
PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
AUTH_USER, AUTH_PASSWORD = "berth", "s3cret-pass"

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MANIFEST_ACCEPT = ", ".join([OCI_INDEX, OCI_MANIFEST,
                             "application/vnd.docker.distribution.manifest.list.v2+json",
                             "application/vnd.docker.distribution.manifest.v2+json"])

# Files of the layered image, checked by whoever unpacks it.
LAYERED_FILES = {
    "added": "etc/berth/added.txt",            # layer 2: a regular file (b"added\n")
    "hardlink": "etc/berth/hardlink.txt",      # layer 2: hard link to `added`
    "symlink": "etc/berth/symlink",            # layer 2: symlink -> added.txt
    "setuid": "usr/local/bin/suid-true",       # layer 2: mode 04755
    "deleted": "etc/berth/doomed.txt",         # layer 2 adds it, layer 3 whites it out
    "opaque_dir": "opt/data",                  # layer 2: old.txt inside; layer 3: opaque, new.txt
}


def run(*cmd: str, cwd: str | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    if result.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


# --- cached image builds --------------------------------------------------------------------------

def _inputs_key(name: str) -> str:
    """Everything a build depends on: the builders' code, the busybox binary, umoci's version."""
    h = hashlib.sha256(name.encode())
    for fn in (_populate_busybox, _build_busybox, _tar_layer, _build_layered):
        h.update(inspect.getsource(fn).encode())
    h.update(repr(sorted(LAYERED_FILES.items())).encode())
    st = os.stat(BUSYBOX)
    h.update(f"{st.st_size}:{st.st_mtime_ns}".encode())
    h.update(run("umoci", "--version").stdout.encode())
    return h.hexdigest()[:16]


def _cached(name: str, build) -> str:
    """The layout `build(scratch, out)` makes, built once per inputs under IMAGE_CACHE."""
    os.makedirs(IMAGE_CACHE, exist_ok=True)
    final = os.path.join(IMAGE_CACHE, f"{name}-{_inputs_key(name)}")
    layout = os.path.join(final, "layout")
    if os.path.isdir(layout):
        return layout
    with open(final + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)          # a parallel worker may be building it: wait for it
        if os.path.isdir(layout):
            return layout
        scratch = tempfile.mkdtemp(prefix=f".{name}-", dir=IMAGE_CACHE)
        try:
            out = os.path.join(scratch, "out")
            os.makedirs(out)
            build(scratch, os.path.join(out, "layout"))
            os.rename(out, final)                 # appears whole or not at all
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    return layout


def _populate_busybox(rootfs: str) -> None:
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "tmp", "proc", "sys", "dev", "var", "home"):
        os.makedirs(os.path.join(rootfs, d), exist_ok=True)
    os.chmod(os.path.join(rootfs, "tmp"), 0o1777)
    os.chmod(os.path.join(rootfs, "root"), 0o700)
    shutil.copy2(BUSYBOX, os.path.join(rootfs, "bin/busybox"))
    os.chmod(os.path.join(rootfs, "bin/busybox"), 0o755)
    for applet in run(BUSYBOX, "--list-full").stdout.split():
        if "/" not in applet or applet == "bin/busybox":
            continue
        path = os.path.join(rootfs, applet)
        if not os.path.lexists(path):
            os.symlink("/bin/busybox", path)
    with open(os.path.join(rootfs, "etc/passwd"), "w") as f:
        f.write("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n")
    with open(os.path.join(rootfs, "etc/group"), "w") as f:
        f.write("root:x:0:\nnogroup:x:65534:\n")


def _build_busybox(scratch: str, layout: str, arch: str | None = None) -> None:
    image = f"{layout}:latest"
    bundle = os.path.join(scratch, "bundle")
    run("umoci", "init", "--layout", layout)
    run("umoci", "new", "--image", image)
    run("umoci", "unpack", "--image", image, bundle)
    _populate_busybox(os.path.join(bundle, "rootfs"))
    run("umoci", "repack", "--image", image, bundle)
    args = ["--config.cmd", "/bin/sh", "--config.env", PATH_ENV, "--os", "linux"]
    if arch:
        args += ["--architecture", arch]
    run("umoci", "config", "--image", image, *args)
    run("umoci", "gc", "--layout", layout)


def _tar_layer(path: str, entries: list[tuple]) -> None:
    """An uncompressed layer tar: entries are (name, kind, extra) with kind file/dir/link/hardlink."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, kind, extra, mode in entries:
            info = tarfile.TarInfo(name)
            info.mtime, info.uid, info.gid, info.mode = 1700000000, 0, 0, mode
            data = None
            if kind == "file":
                info.type, data = tarfile.REGTYPE, extra
                info.size = len(data)
            elif kind == "dir":
                info.type = tarfile.DIRTYPE
            elif kind == "symlink":
                info.type, info.linkname = tarfile.SYMTYPE, extra
            elif kind == "hardlink":
                info.type, info.linkname = tarfile.LNKTYPE, extra
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _build_layered(scratch: str, layout: str) -> None:
    image = f"{layout}:latest"
    _build_busybox(scratch, layout)
    f = LAYERED_FILES
    layer2 = os.path.join(scratch, "layer2.tar")
    _tar_layer(layer2, [
        ("etc/berth", "dir", None, 0o755),
        (f["added"], "file", b"added\n", 0o644),
        (f["hardlink"], "hardlink", f["added"], 0o644),
        (f["symlink"], "symlink", "added.txt", 0o777),
        (f["deleted"], "file", b"to be deleted\n", 0o644),
        ("usr/local", "dir", None, 0o755),
        ("usr/local/bin", "dir", None, 0o755),
        (f["setuid"], "file", b"#!/bin/sh\nexit 0\n", 0o4755),
        ("opt", "dir", None, 0o755),
        (f["opaque_dir"], "dir", None, 0o755),
        (f["opaque_dir"] + "/old.txt", "file", b"old\n", 0o644),
    ])
    run("umoci", "raw", "add-layer", "--image", image, "--history.created_by", "berth test: layer 2", layer2)
    layer3 = os.path.join(scratch, "layer3.tar")
    doomed_dir, doomed_name = os.path.split(f["deleted"])
    _tar_layer(layer3, [
        (f"{doomed_dir}/.wh.{doomed_name}", "file", b"", 0o644),
        (f["opaque_dir"], "dir", None, 0o755),
        (f["opaque_dir"] + "/.wh..wh..opq", "file", b"", 0o644),
        (f["opaque_dir"] + "/new.txt", "file", b"new\n", 0o644),
    ])
    run("umoci", "raw", "add-layer", "--image", image, "--history.created_by", "berth test: layer 3", layer3)
    run("umoci", "gc", "--layout", layout)


def build_busybox_image(workdir: str | None = None) -> str:
    """An OCI layout (tag "latest") holding busybox-static with every applet linked, for the host's
    architecture. `workdir` is accepted for symmetry; builds happen in the shared cache."""
    return _cached("busybox", _build_busybox)


def build_busybox_arm64_image(workdir: str | None = None) -> str:
    """The busybox image with its config saying linux/arm64 (the binary stays the host's: it is
    only for platform selection, never for running)."""
    return _cached("busybox-arm64", lambda scratch, layout: _build_busybox(scratch, layout, "arm64"))


def build_layered_image(workdir: str | None = None) -> str:
    """Three layers: busybox; a layer adding files, a hardlink, a symlink and a setuid file; a
    layer deleting a file (whiteout) and replacing a directory (opaque). See LAYERED_FILES."""
    return _cached("layered", _build_layered)


def layout_manifest(layout: str, tag: str = "latest") -> dict:
    """{mediaType, digest, size} of the manifest `tag` names in an OCI layout."""
    with open(os.path.join(layout, "index.json")) as f:
        index = json.load(f)
    for desc in index["manifests"]:
        if desc.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag:
            return {k: desc[k] for k in ("mediaType", "digest", "size")}
    raise KeyError(f"{layout}: no tag {tag!r}")


def layout_blob(layout: str, digest: str) -> bytes:
    algo, hexdigest = digest.split(":", 1)
    with open(os.path.join(layout, "blobs", algo, hexdigest), "rb") as f:
        return f.read()


# --- docker-registry ------------------------------------------------------------------------------

def _self_signed(workdir: str) -> tuple[str, str]:
    """A certificate for 127.0.0.1 in `workdir`/certs (skopeo's --cert-dir takes *.crt there as
    CAs, so the key stays outside it)."""
    os.makedirs(os.path.join(workdir, "certs"))
    cert, key = os.path.join(workdir, "certs", "registry.crt"), os.path.join(workdir, "registry.key")
    run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1,DNS:localhost",
        "-keyout", key, "-out", cert)
    return cert, key


class Registry:
    """Debian's docker-registry on 127.0.0.1 with a port of its own choosing and its own storage.

    `auth=(user, password)` puts it behind htpasswd (basic auth); `tls=True` serves HTTPS with a
    self-signed certificate whose path is `ca` (pass it to a client as its CA bundle)."""

    def __init__(self, workdir: str | None = None, auth: tuple[str, str] | None = None, tls: bool = False):
        self.owns_dir = workdir is None
        self.dir = tempfile.mkdtemp(prefix="berth-reg-", dir="/tmp") if workdir is None else workdir
        os.makedirs(self.dir, exist_ok=True)
        self.auth = auth
        self.tls = tls
        self.ca: str | None = None
        self.proc: subprocess.Popen | None = None
        self.host = ""

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://{self.host}"

    def start(self, timeout: float = 20.0) -> "Registry":
        try:
            return self._start(timeout)
        except BaseException:
            self.stop()
            raise

    def _start(self, timeout: float) -> "Registry":
        config = [
            "version: 0.1",
            "log:",
            "  level: info",
            "storage:",
            "  filesystem:",
            f"    rootdirectory: {os.path.join(self.dir, 'data')}",
            "  delete:",
            "    enabled: true",
            "  maintenance:",
            "    uploadpurging:",
            "      enabled: false",
            "http:",
            "  addr: 127.0.0.1:0",
            f"  secret: {secrets.token_hex(16)}",
        ]
        if self.tls:
            cert, key = _self_signed(self.dir)
            self.ca = cert
            config += ["  tls:", f"    certificate: {cert}", f"    key: {key}"]
        if self.auth:
            htpasswd = os.path.join(self.dir, "htpasswd")
            with open(htpasswd, "w") as f:
                f.write(run("htpasswd", "-Bbn", *self.auth).stdout)
            config += ["auth:", "  htpasswd:", "    realm: berth-test", f"    path: {htpasswd}"]
        config_path = os.path.join(self.dir, "config.yml")
        with open(config_path, "w") as f:
            f.write("\n".join(config) + "\n")
        self.log_path = os.path.join(self.dir, "registry.log")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen([REGISTRY_BIN, "serve", config_path], stdout=log, stderr=log,
                                         stdin=subprocess.DEVNULL)

        def listening():
            if self.proc.poll() is not None:
                raise AssertionError(f"docker-registry exited {self.proc.returncode}:\n{self.log()}")
            m = re.search(r'listening on (127\.0\.0\.1:\d+)', self.log())
            return m and m.group(1)
        self.host = wait_until(listening, timeout, 0.02, "docker-registry to listen")

        def answers():
            with contextlib.suppress(httpx.TransportError):
                with self.http() as client:
                    return client.get("/v2/").status_code in (200, 401)
            return False
        wait_until(answers, timeout, 0.02, "docker-registry to answer GET /v2/")
        return self

    def http(self, authenticated: bool = True) -> httpx.Client:
        """An httpx client for the registry's API (with its basic credentials, if it has any)."""
        auth = self.auth if (self.auth and authenticated) else None
        verify = ssl.create_default_context(cafile=self.ca) if self.ca else True
        return httpx.Client(base_url=self.url, auth=auth, verify=verify, trust_env=False, timeout=30)

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()                      # by its pid; wait() reaps it
            self.proc.wait(10)
        if self.owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> "Registry":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- filling it -------------------------------------------------------------------------------

    def push(self, layout: str, ref: str, multi_arch: bool = False, layout_tag: str = "latest") -> str:
        """skopeo copy an OCI layout's tag to `repo:tag` here; returns the pushed manifest's digest.
        `multi_arch` copies every image of an index the tag names (skopeo --multi-arch all)."""
        digest_file = os.path.join(self.dir, f"digest-{secrets.token_hex(4)}")
        cmd = ["skopeo", "copy", "--quiet", "--digestfile", digest_file]
        cmd += ["--dest-cert-dir", os.path.dirname(self.ca)] if self.ca else ["--dest-tls-verify=false"]
        if self.auth:
            cmd += ["--dest-creds", f"{self.auth[0]}:{self.auth[1]}"]
        if multi_arch:
            cmd += ["--multi-arch", "all"]
        run(*cmd, f"oci:{layout}:{layout_tag}", f"docker://{self.host}/{ref}", timeout=300)
        with open(digest_file) as f:
            return f.read().strip()

    def manifest(self, repo: str, reference: str) -> tuple[str, bytes]:
        """(media type, bytes) of a manifest or index as the registry serves it."""
        with self.http() as client:
            r = client.get(f"/v2/{repo}/manifests/{reference}", headers={"Accept": MANIFEST_ACCEPT})
            r.raise_for_status()
            return r.headers["content-type"].split(";")[0], r.content

    def push_index(self, ref: str, images: dict[str, str]) -> tuple[str, bytes]:
        """Push one image per platform ("os/arch[/variant]" -> layout) to `repo`, then an OCI index
        of them as `repo:tag`; returns (index digest, index bytes)."""
        repo, tag = ref.rsplit(":", 1)
        manifests = []
        for platform, layout in images.items():
            parts = platform.split("/")
            digest = self.push(layout, f"{repo}:{tag}-{parts[1]}{''.join(parts[2:])}")
            media_type, body = self.manifest(repo, digest)
            desc = {"mediaType": media_type, "digest": digest, "size": len(body),
                    "platform": {"os": parts[0], "architecture": parts[1]}}
            if len(parts) > 2:
                desc["platform"]["variant"] = parts[2]
            manifests.append(desc)
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests},
                          indent=2).encode()
        with self.http() as client:
            r = client.put(f"/v2/{repo}/manifests/{tag}", content=body, headers={"Content-Type": OCI_INDEX})
            if r.status_code != 201:
                raise AssertionError(f"PUT index {ref}: {r.status_code} {r.text}")
        return "sha256:" + hashlib.sha256(body).hexdigest(), body


# --- small HTTP servers owned by a test -------------------------------------------------------------

class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = False
    block_on_close = True                         # server_close() joins the request threads


class HTTPServerThread:
    """A ThreadingHTTPServer on a loopback port, served by a thread; `stop()` joins it and the
    threads of the requests it served (an idle keep-alive connection ends at the handler's
    timeout)."""

    def __init__(self, handler: type[http.server.BaseHTTPRequestHandler], host: str = "127.0.0.1", **attrs):
        self.server = _Server((host, 0), handler)
        for name, value in attrs.items():
            setattr(self.server, name, value)
        self.host = f"{host}:{self.server.server_address[1]}"
        self.url = f"http://{self.host}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       name=f"http-{self.host}")
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)
        if self.thread.is_alive():
            raise AssertionError(f"HTTP server thread {self.host} did not stop")

    def __enter__(self) -> "HTTPServerThread":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class QuietHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 10                                  # seconds a connection may sit idle

    def log_message(self, format, *args) -> None:
        pass

    def read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def reply(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        headers = dict(headers or {})
        headers.setdefault("Content-Length", str(len(body)))
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


_SCOPE_PATH = re.compile(r"/v2/(.+?)/(?:manifests|blobs|tags)/")


class _TokenHandler(QuietHandler):
    def do_GET(self) -> None:
        srv = self.server
        url = urllib.parse.urlsplit(self.path)
        query = urllib.parse.parse_qs(url.query)
        srv.requests.append({"path": url.path, "authorization": self.headers.get("Authorization"),
                             "service": query.get("service", [None])[0], "scopes": query.get("scope", [])})
        if url.path != "/token":
            return self.reply(404)
        if srv.credentials is not None:
            expected = "Basic " + base64.b64encode(":".join(srv.credentials).encode()).decode()
            if self.headers.get("Authorization") != expected:
                return self.reply(401, b'{"details":"bad credentials"}', {"Content-Type": "application/json"})
        granted = set()
        for scope in query.get("scope", []):
            for item in scope.split(" "):
                kind, _, rest = item.partition(":")
                repo, _, actions = rest.rpartition(":")
                if kind == "repository":
                    granted |= {(repo, a) for a in actions.split(",")}
        token = secrets.token_urlsafe(24)
        srv.tokens[token] = granted
        body = json.dumps({"token": token, "access_token": token, "expires_in": 300}).encode()
        self.reply(200, body, {"Content-Type": "application/json"})


class _BearerProxyHandler(QuietHandler):
    def _handle(self) -> None:
        srv = self.server
        body = self.read_body() if self.command in ("POST", "PUT", "PATCH") else b""
        m = _SCOPE_PATH.match(self.path)
        action = "pull" if self.command in ("GET", "HEAD") else "push"
        auth = self.headers.get("Authorization", "")
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else None
        granted = srv.tokens.get(token) if token else None
        srv.requests.append({"method": self.command, "path": self.path, "authorization": auth})
        if granted is None or (m and (m.group(1), action) not in granted):
            challenge = f'Bearer realm="{srv.realm}",service="{srv.service}"'
            if m:
                actions = "pull" if action == "pull" else "pull,push"
                challenge += f',scope="repository:{m.group(1)}:{actions}"'
            return self.reply(401, b'{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}',
                              {"WWW-Authenticate": challenge, "Content-Type": "application/json"})
        conn = http.client.HTTPConnection(srv.backend, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items()
                       if k.lower() not in ("authorization", "connection", "transfer-encoding", "content-length")}
            if self.command in ("POST", "PUT", "PATCH"):
                headers["Content-Length"] = str(len(body))
            conn.request(self.command, self.path, body=body or None, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            out = {k: v for k, v in resp.getheaders()
                   if k.lower() not in ("connection", "transfer-encoding", "content-length", "keep-alive",
                                       "date", "server")}
            out["Content-Length"] = resp.getheader("Content-Length", str(len(data))) \
                if self.command == "HEAD" else str(len(data))
            self.send_response(resp.status)
            for k, v in out.items():
                self.send_header(k, v)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        finally:
            conn.close()

    do_GET = do_HEAD = do_POST = do_PUT = do_PATCH = do_DELETE = _handle


class BearerAuth:
    """A token server and, on another port, a proxy in front of `registry` that answers every
    request without a valid bearer token for the repository with a 401 and a
    `WWW-Authenticate: Bearer realm=...,service=...,scope=...` challenge, as Docker Hub does.

    With `credentials=(user, password)` the token server hands out tokens only for those basic
    credentials. `token_requests` and `proxy_requests` record what each saw."""

    SERVICE = "berth-test-registry"

    def __init__(self, registry: Registry, credentials: tuple[str, str] | None = None):
        self.registry = registry
        self.tokens: dict[str, set] = {}
        self.token_requests: list[dict] = []
        self.proxy_requests: list[dict] = []
        self.token_server = HTTPServerThread(_TokenHandler, credentials=credentials, tokens=self.tokens,
                                             requests=self.token_requests)
        try:
            self.proxy = HTTPServerThread(_BearerProxyHandler, tokens=self.tokens, requests=self.proxy_requests,
                                          backend=registry.host, realm=f"{self.token_server.url}/token",
                                          service=self.SERVICE)
        except BaseException:
            self.token_server.stop()
            raise
        self.host = self.proxy.host
        self.url = self.proxy.url

    def stop(self) -> None:
        try:
            self.proxy.stop()
        finally:
            self.token_server.stop()


# --- fixtures ---------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def busybox_image() -> str:
    return build_busybox_image()


@pytest.fixture(scope="session")
def busybox_arm64_image() -> str:
    return build_busybox_arm64_image()


@pytest.fixture(scope="session")
def layered_image() -> str:
    return build_layered_image()


@pytest.fixture
def registry():
    reg = Registry().start()
    yield reg
    reg.stop()


@pytest.fixture
def auth_registry():
    reg = Registry(auth=(AUTH_USER, AUTH_PASSWORD)).start()
    yield reg
    reg.stop()


@pytest.fixture
def bearer_registry(registry):
    bearer = BearerAuth(registry, credentials=(AUTH_USER, AUTH_PASSWORD))
    yield bearer
    bearer.stop()


__all__ = [
    "AUTH_PASSWORD", "AUTH_USER", "BearerAuth", "HTTPServerThread", "LAYERED_FILES", "QuietHandler",
    "Registry", "auth_registry", "bearer_registry", "build_busybox_arm64_image", "build_busybox_image",
    "build_layered_image", "busybox_arm64_image", "busybox_image", "layered_image", "layout_blob",
    "layout_manifest", "registry", "run",
]


if __name__ == "__main__":
    # `python3 -m tests.registry`: build the busybox test image and print its OCI layout's path.
    print(build_busybox_image())
