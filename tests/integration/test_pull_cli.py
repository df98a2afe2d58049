"""`berth pull`, `images pull|push|check|rm` and `content fetch` as users run them: a real berthd,
a real docker-registry, images built by umoci and pushed by skopeo. What is printed on a pipe and
on a terminal, what lands in the content store (and only that), which platform an index gives,
credentials, a GC in the middle of a pull, and one-line errors for bad input."""
from __future__ import annotations

import concurrent.futures
import fcntl
import hashlib
import http.client
import json
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import threading
import time

import pytest

from berth.cli.content import human_size
from tests.registry import (AUTH_PASSWORD, AUTH_USER, HTTPServerThread, QuietHandler, layout_blob,
                            layout_manifest, run)
from tests.support import REPO

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
GC_REF = "containerd.io/gc.ref.content"
PLAIN_LINE = re.compile(r"(\S+): (\S.*) (\d+)/(\d+)\Z")


# --- helpers ------------------------------------------------------------------------------------------

def one_line_error(result: subprocess.CompletedProcess) -> str:
    assert result.returncode != 0, result
    assert len(result.stderr.splitlines()) == 1 and result.stderr.startswith("berth: "), result.stderr
    return result.stderr


def parse_table(text: str) -> list[dict[str, str]]:
    """An aligned table (berth.cli.output.table) as dicts; cells may hold spaces ("1.0 MiB")."""
    lines = [line for line in text.splitlines() if line.strip()]
    header = lines[0]
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    names = header.split()
    rows = []
    for line in lines[1:]:
        cells = [line[a:b].strip() for a, b in zip(starts, starts[1:] + [None])]
        rows.append(dict(zip(names, cells)))
    return rows


def image_row(daemon, name: str, namespace: str | None = None) -> dict[str, str]:
    rows = [r for r in parse_table(daemon.cli("images", "ls", namespace=namespace).stdout) if r["REF"] == name]
    assert len(rows) == 1, rows
    return rows[0]


def check_of(daemon, name: str, *flags: str, namespace: str | None = None) -> dict:
    rows = json.loads(daemon.cli("images", "check", "--format", "json", *flags, namespace=namespace).stdout)
    found = [r for r in rows if r["name"] == name]
    assert len(found) == 1, rows
    return found[0]


def content_digests(daemon, namespace: str | None = None) -> set[str]:
    return set(daemon.cli("content", "ls", "-q", namespace=namespace).stdout.split())


def assert_every_blob_verifies(client) -> None:
    for info in client.content.list():
        data = client.content.read_all(info["digest"])
        assert len(data) == info["size"]
        assert "sha256:" + hashlib.sha256(data).hexdigest() == info["digest"]


def layout_tree(layout: str) -> tuple[dict, dict, dict]:
    """(manifest descriptor, manifest, config descriptor) of a layout's "latest"."""
    desc = layout_manifest(layout)
    manifest = json.loads(layout_blob(layout, desc["digest"]))
    return desc, manifest, manifest["config"]


def plain_lines(stdout: str) -> tuple[list[tuple[str, str, int, int]], str]:
    """The progress lines, parsed, and the final line."""
    lines = stdout.splitlines()
    parsed = []
    for line in lines[:-1]:
        m = PLAIN_LINE.match(line)
        assert m, f"not a progress line: {line!r}"
        parsed.append((m.group(1), m.group(2), int(m.group(3)), int(m.group(4))))
    return parsed, lines[-1]


# --- pulling ------------------------------------------------------------------------------------------

def test_pull_prints_one_line_per_status_then_the_image_and_images_ls_shows_it(daemon, registry, busybox_image):
    pushed = registry.push(busybox_image, "busybox:latest")
    _, manifest, config = layout_tree(busybox_image)
    layer = manifest["layers"][0]
    ref = f"{registry.host}/busybox:latest"

    result = daemon.cli("pull", "--plain-http", ref)

    progress, last = plain_lines(result.stdout)
    assert last == f"image: {ref} digest: {pushed}"
    pairs = [(r, status) for r, status, _, _ in progress]
    assert len(pairs) == len(set(pairs)), "a status was printed twice for one ref (once per chunk?)"
    assert (ref, "resolving") in pairs
    assert (f"layer-sha256:{layer['digest'][7:]}", "done", layer["size"], layer["size"]) in progress
    assert (f"config-sha256:{config['digest'][7:]}", "done", config["size"], config["size"]) in progress
    assert (f"manifest-{pushed}", "done") in pairs

    row = image_row(daemon, ref)
    assert row["TYPE"] == OCI_MANIFEST
    assert row["DIGEST"] == pushed
    assert row["SIZE"] == human_size(config["size"] + layer["size"])
    assert row["PLATFORMS"] == "linux/amd64"
    assert content_digests(daemon) == {pushed, config["digest"], layer["digest"]}

    check = check_of(daemon, ref)
    assert (check["status"], check["present"], check["required"]) == ("complete", 2, 2)
    table = parse_table(daemon.cli("images", "check").stdout)
    assert list(table[0]) == ["REF", "TYPE", "DIGEST", "STATUS", "SIZE", "UNPACKED"]
    assert (table[0]["STATUS"], table[0]["UNPACKED"]) == ("complete (2/2)", "true")    # pull unpacks


def test_pull_by_digest_and_content_fetch(daemon, registry, busybox_image):
    pushed = registry.push(busybox_image, "busybox:latest")
    by_digest = f"{registry.host}/busybox@{pushed}"

    result = daemon.cli("images", "pull", "--plain-http", by_digest)
    assert result.stdout.splitlines()[-1] == f"image: {by_digest} digest: {pushed}"
    assert check_of(daemon, by_digest)["status"] == "complete"

    # ctr's `content fetch` (containerd's client.Fetch) fetches everything and records the image too.
    fetched = daemon.cli("content", "fetch", "--plain-http", f"{registry.host}/busybox:latest")
    assert fetched.stdout.splitlines()[-1] == f"image: {registry.host}/busybox:latest digest: {pushed}"
    assert "unpack" not in fetched.stdout                   # fetch never unpacks
    assert image_row(daemon, f"{registry.host}/busybox:latest")["DIGEST"] == pushed


def test_platform_flag_picks_that_manifest_of_an_index(daemon, registry, busybox_image, busybox_arm64_image):
    index_digest, body = registry.push_index("multi:latest", {"linux/amd64": busybox_image,
                                                              "linux/arm64": busybox_arm64_image})
    entries = {m["platform"]["architecture"]: m for m in json.loads(body)["manifests"]}
    _, arm_manifest, arm_config = layout_tree(busybox_arm64_image)
    ref = f"{registry.host}/multi:latest"

    result = daemon.cli("pull", "--plain-http", "--platform", "linux/arm64", ref)

    assert result.stdout.splitlines()[-1] == f"image: {ref} digest: {index_digest}"
    stored = content_digests(daemon)
    assert stored == {index_digest, entries["arm64"]["digest"], arm_config["digest"],
                      arm_manifest["layers"][0]["digest"]}
    assert entries["amd64"]["digest"] not in stored
    row = image_row(daemon, ref)
    assert (row["TYPE"], row["DIGEST"], row["PLATFORMS"]) == (OCI_INDEX, index_digest, "linux/amd64,linux/arm64")
    labels = daemon.client().content.info(index_digest)["labels"]
    assert labels == {f"{GC_REF}.m.0": entries["arm64"]["digest"]}

    assert check_of(daemon, ref, "--platform", "linux/arm64")["status"] == "complete"
    # For this (amd64) host the index names a manifest that was never pulled: as ctr says, unavailable.
    assert check_of(daemon, ref)["status"] == "unavailable"


def test_push_to_another_repository_gives_the_same_digest(daemon, registry, busybox_image):
    pushed = registry.push(busybox_image, "busybox:latest")
    local = f"{registry.host}/busybox:latest"
    remote = f"{registry.host}/copies/busybox:v1"
    daemon.cli("pull", "--plain-http", local)

    result = daemon.cli("images", "push", "--plain-http", remote, local)

    progress, last = plain_lines(result.stdout)
    assert last == f"pushed: {remote} digest: {pushed}"
    assert any(status == "uploading" for _, status, _, _ in progress)
    inspected = json.loads(run("skopeo", "inspect", "--tls-verify=false", f"docker://{remote}").stdout)
    assert inspected["Digest"] == pushed


def test_basic_auth_registry_needs_user(daemon, auth_registry, busybox_image):
    pushed = auth_registry.push(busybox_image, "busybox:latest")
    ref = f"{auth_registry.host}/busybox:latest"

    denied = daemon.cli("pull", "--plain-http", ref, check=False)
    assert "authentication" in one_line_error(denied)
    wrong = daemon.cli("pull", "--plain-http", "--user", f"{AUTH_USER}:not-it", ref, check=False)
    assert "rejected" in one_line_error(wrong)
    assert daemon.cli("images", "ls", "-q").stdout == ""

    result = daemon.cli("pull", "--plain-http", "--user", f"{AUTH_USER}:{AUTH_PASSWORD}", ref)
    assert result.stdout.splitlines()[-1] == f"image: {ref} digest: {pushed}"
    assert check_of(daemon, ref)["status"] == "complete"


def test_images_rm_sync_removes_only_what_no_other_image_needs(daemon, registry, busybox_image,
                                                               busybox_arm64_image):
    pushed = registry.push(busybox_image, "busybox:latest")
    index_digest, _ = registry.push_index("multi:latest", {"linux/amd64": busybox_image,
                                                          "linux/arm64": busybox_arm64_image})
    _, manifest, config = layout_tree(busybox_image)
    single, multi = f"{registry.host}/busybox:latest", f"{registry.host}/multi:latest"
    daemon.cli("pull", "--plain-http", single)
    daemon.cli("pull", "--plain-http", multi)          # this host's entry is the same manifest
    shared = {pushed, config["digest"], manifest["layers"][0]["digest"]}
    assert content_digests(daemon) == shared | {index_digest}

    assert daemon.cli("images", "rm", "--sync", multi).stdout.split() == [multi]
    assert content_digests(daemon) == shared
    assert check_of(daemon, single)["status"] == "complete"

    daemon.cli("images", "rm", "--sync", single)
    assert content_digests(daemon) == set()


# --- GC while a pull is under way ------------------------------------------------------------------

class _GateHandler(QuietHandler):
    """Forwards to the registry; holds a GET of the gated blob until the test opens the gate."""

    def _handle(self) -> None:
        srv = self.server
        if self.command == "GET" and self.path.endswith(f"/blobs/{srv.gated}"):
            srv.held.set()
            if not srv.gate.wait(120):
                return self.reply(503)
        conn = http.client.HTTPConnection(srv.backend, timeout=60)
        try:
            headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "host")}
            conn.request(self.command, self.path, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
            self.send_response(resp.status)
            for key, value in resp.getheaders():
                if key.lower() not in ("connection", "transfer-encoding", "content-length", "keep-alive",
                                       "date", "server"):
                    self.send_header(key, value)
            self.send_header("Content-Length", resp.getheader("Content-Length", "0")
                             if self.command == "HEAD" else str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
        finally:
            conn.close()

    do_GET = do_HEAD = _handle


@pytest.fixture
def gated_layered(registry, layered_image):
    """The layered image behind a proxy that holds back its first (largest) layer; yields
    (proxy, manifest digest, manifest)."""
    pushed = registry.push(layered_image, "layered:latest")
    manifest = json.loads(layout_blob(layered_image, pushed))
    proxy = HTTPServerThread(_GateHandler, backend=registry.host, gated=manifest["layers"][0]["digest"],
                             gate=threading.Event(), held=threading.Event())
    try:
        yield proxy, pushed, manifest
    finally:
        proxy.server.gate.set()
        proxy.stop()


def _others(manifest: dict) -> set[str]:
    """The blobs a pull of the layered image commits while its first layer is held back."""
    return {manifest["config"]["digest"], *(layer["digest"] for layer in manifest["layers"][1:])}


def test_gc_in_the_middle_of_a_client_pull_under_a_lease_takes_nothing(daemon, gated_layered):
    proxy, pushed, manifest = gated_layered
    ref = f"{proxy.host}/layered:latest"
    others, done = _others(manifest), set()
    committed = threading.Event()

    def report(item: dict) -> None:
        if item["status"] in ("done", "exists") and item["digest"] in others:
            done.add(item["digest"])
            if done == others:
                committed.set()

    def pull() -> dict:
        client = daemon.client(timeout=120)
        with client.lease():
            return client.pull(ref, plain_http=True, progress=report)

    gc_client = daemon.client()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(pull)
        try:
            assert proxy.server.held.wait(60) and committed.wait(60), future.exception(0) if future.done() else ""
            # The config and the later layers are stored, and no image points at them yet: only
            # the pull's lease holds them.
            for _ in range(3):
                gc_client.gc()
            assert others <= {info["digest"] for info in gc_client.content.list()}
        finally:
            proxy.server.gate.set()
        record = future.result(timeout=120)

    assert record["target"]["digest"] == pushed
    gc_client.gc()
    check = check_of(daemon, ref)
    required = 1 + len(manifest["layers"])
    assert (check["status"], check["present"], check["required"]) == ("complete", required, required)
    assert_every_blob_verifies(gc_client)
    assert gc_client.leases.list() == []


def test_gc_in_the_middle_of_a_cli_pull_takes_nothing(daemon, gated_layered):
    proxy, pushed, manifest = gated_layered
    ref = f"{proxy.host}/layered:latest"
    others = {f"{'config' if d == manifest['config']['digest'] else 'layer'}-{d}" for d in _others(manifest)}
    proc = subprocess.Popen([sys.executable, "-m", "berth.cli.main", "-a", daemon.address, "pull",
                             "--plain-http", ref], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=daemon.env, cwd=REPO)
    try:
        seen = set()
        for line in proc.stdout:                      # plain lines: the pull's own account of itself
            m = PLAIN_LINE.match(line.rstrip("\n"))
            if m and m.group(2) == "done" and m.group(1) in others:
                seen.add(m.group(1))
                if seen == others:
                    break
        assert seen == others and proxy.server.held.is_set(), proc.stderr.read()
        client = daemon.client()
        for _ in range(3):
            client.gc()
        assert {key.split("-", 1)[1] for key in others} <= {info["digest"] for info in client.content.list()}
    finally:
        proxy.server.gate.set()
        rest, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert rest.splitlines()[-1] == f"image: {ref} digest: {pushed}"
    client.gc()
    assert check_of(daemon, ref)["status"] == "complete"
    assert_every_blob_verifies(client)


# --- bad input ------------------------------------------------------------------------------------

def test_bad_input_fails_with_one_line_and_nonzero_exit(daemon, registry, busybox_image, tmp_path):
    registry.push(busybox_image, "busybox:latest")
    ref = f"{registry.host}/busybox:latest"
    out = tmp_path / "out.tar"
    cases = [
        (["pull", "--plain-http", "not a reference"], "not valid"),
        (["pull", "--plain-http", f"{registry.host}/BusyBox:latest"], "lowercase"),
        (["pull", "--plain-http", "--platform", "linux/amd64/v2/extra", ref], "is not os/arch"),
        (["images", "push", "--plain-http", f"{registry.host}/x:1", "no/such:image"], "not found"),
        (["images", "export", str(out), "no/such:image"], "not found"),
        (["images", "check", "--platform", "a/b/c/d"], "platform"),
        (["images", "import", str(tmp_path / "missing.tar")], "No such file"),
        (["pull", "--plain-http", f"{registry.host}/busybox:nope"], "busybox"),
    ]
    for args, words in cases:
        err = one_line_error(daemon.cli(*args, check=False))
        assert words in err, (args, err)
    assert not out.exists() and os.listdir(tmp_path) == []
    assert daemon.cli("images", "ls", "-q").stdout == ""
    assert content_digests(daemon) == set()


# --- a terminal -------------------------------------------------------------------------------------

def test_pull_on_a_terminal_draws_progress_bars(daemon, registry, busybox_image):
    pushed = registry.push(busybox_image, "busybox:latest")
    layer = json.loads(layout_blob(busybox_image, pushed))["layers"][0]
    ref = f"{registry.host}/busybox:latest"
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    env = dict(daemon.env, TERM="xterm-256color", COLUMNS="200", LINES="50")
    proc = subprocess.Popen([sys.executable, "-m", "berth.cli.main", "-a", daemon.address, "pull", "--plain-http",
                             ref], stdin=subprocess.DEVNULL, stdout=slave, stderr=subprocess.PIPE, env=env, cwd=REPO)
    os.close(slave)
    drawn = bytearray()
    deadline = time.monotonic() + 120
    try:
        while True:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, "the pull did not finish in time"
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:                               # EIO: the pull exited and closed the terminal
                break
            if not chunk:
                break
            drawn += chunk
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)
        stderr = proc.stderr.read().decode()
        proc.stderr.close()
    assert proc.returncode == 0, stderr
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", drawn.decode(errors="replace"))
    layer_row = [line for line in text.splitlines() if f"layer-sha256:{layer['digest'][7:19]}" in line]
    assert layer_row, text
    assert "━" in layer_row[-1] and "1.0/1.0 MiB" in layer_row[-1] and "done" in layer_row[-1], layer_row[-1]
    assert f"image: {ref} digest: {pushed}" in text
