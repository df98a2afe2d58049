"""Pulling from a local registry: a large multi-layer image, berth beside containerd."""
from __future__ import annotations

import os
import statistics
import time

from tests.bench import containerd
from tests.registry import Registry, _cached, run as sh
from tests.support import Daemon

LAYERS = 4
LAYER_MB = 60
RUNS = 3


def _build_large(scratch: str, layout: str) -> None:
    """LAYERS layers of LAYER_MB each: half incompressible, half text, in files of 64 KiB–4 MiB."""
    image = f"{layout}:latest"
    bundle = os.path.join(scratch, "bundle")
    sh("umoci", "init", "--layout", layout)
    sh("umoci", "new", "--image", image)
    sh("umoci", "unpack", "--image", image, bundle)
    rng = __import__("random").Random(7)
    for layer in range(LAYERS):
        d = os.path.join(bundle, "rootfs", f"data{layer}")
        os.makedirs(d)
        written, n = 0, 0
        while written < LAYER_MB << 20:
            size = rng.choice((64 << 10, 256 << 10, 1 << 20, 4 << 20))
            data = os.urandom(size // 2) + (b"berth layer text %d\n" % n) * (size // 40)
            with open(os.path.join(d, f"f{n:05d}"), "wb") as f:
                f.write(data)
            written += len(data)
            n += 1
        sh("umoci", "repack", "--image", image, bundle, timeout=600)
    sh("umoci", "gc", "--layout", layout)


def large_image() -> str:
    return _cached("bench-large", _build_large)


def _du(path: str) -> int:
    return sum(os.path.getsize(os.path.join(dp, f)) for dp, _, fs in os.walk(path) for f in fs)


def _build_debian(scratch: str, layout: str) -> None:
    """A realistic image: Debian's minbase from debootstrap, and a second layer over it."""
    rootfs = os.path.join(scratch, "debian")
    sh("debootstrap", "--variant=minbase", "bookworm", rootfs, "http://deb.debian.org/debian", timeout=1200)
    image = f"{layout}:latest"
    bundle = os.path.join(scratch, "bundle")
    sh("umoci", "init", "--layout", layout)
    sh("umoci", "new", "--image", image)
    sh("umoci", "unpack", "--image", image, bundle)
    sh("cp", "-a", f"{rootfs}/.", os.path.join(bundle, "rootfs"))
    sh("umoci", "repack", "--image", image, bundle, timeout=1200)
    extra = os.path.join(bundle, "rootfs", "usr", "share", "berth-bench")
    os.makedirs(extra)
    for i in range(200):
        with open(os.path.join(extra, f"note-{i:03d}.txt"), "w") as f:
            f.write("second layer of the Debian benchmark image\n" * 200)
    sh("umoci", "repack", "--image", image, bundle, timeout=1200)
    sh("umoci", "gc", "--layout", layout)


def debian_image() -> str | None:
    try:
        return _cached("bench-debian", _build_debian)
    except (AssertionError, OSError) as e:
        print(f"no Debian image (debootstrap failed: {str(e).splitlines()[0][:200]})")
        return None


def _files(layout: str) -> int:
    """Entries in the image's layers, counted from their tars."""
    import gzip
    import json
    import tarfile
    with open(os.path.join(layout, "index.json")) as f:
        manifest_digest = json.load(f)["manifests"][0]["digest"]
    blob = lambda d: os.path.join(layout, "blobs", "sha256", d.split(":")[1])  # noqa: E731
    with open(blob(manifest_digest)) as f:
        layers = json.load(f)["layers"]
    total = 0
    for layer in layers:
        with gzip.open(blob(layer["digest"])) as g, tarfile.open(fileobj=g, mode="r|") as t:
            total += sum(1 for _ in t)
    return total


def _berth_pull(ref: str, *args: str) -> float:
    d = Daemon(metrics=False).start()
    try:
        started = time.perf_counter()
        d.cli("pull", "--plain-http", *args, ref, timeout=1200)
        return time.perf_counter() - started
    finally:
        d.cleanup()


def _ctr(ref: str, *args: str) -> float:
    c = containerd.Containerd()
    try:
        started = time.perf_counter()
        c.ctr(*args, "--plain-http", ref)
        return time.perf_counter() - started
    finally:
        c.stop()


def _compare(name: str, ref: str, size_mb: float, files: int) -> None:
    berth_fetch = statistics.median(_berth_pull(ref, "--no-unpack") for _ in range(RUNS))
    berth_full = statistics.median(_berth_pull(ref) for _ in range(RUNS))
    print(f"{name}: {size_mb:.0f} MB compressed, {files} files", flush=True)
    print(f"  berth fetch only:    {berth_fetch:6.2f}s  {size_mb / berth_fetch:6.0f} MB/s", flush=True)
    print(f"  berth pull + unpack: {berth_full:6.2f}s  {size_mb / berth_full:6.0f} MB/s  "
          f"{files / berth_full:6.0f} files/s", flush=True)
    if not containerd.available():
        print("  containerd is not installed: no side-by-side figures")
        return
    ctr_fetch = statistics.median(_ctr(ref, "content", "fetch") for _ in range(RUNS))
    ctr_full = statistics.median(_ctr(ref, "images", "pull") for _ in range(RUNS))
    print(f"  ctr content fetch:   {ctr_fetch:6.2f}s   ratio berth/containerd {berth_fetch / ctr_fetch:.2f}", flush=True)
    print(f"  ctr images pull:     {ctr_full:6.2f}s   ratio berth/containerd {berth_full / ctr_full:.2f} "
          f"(target <= 0.75)", flush=True)


def run() -> None:
    registry = Registry().start()
    try:
        for name, build in (("large multi-layer image", large_image), ("Debian minbase image", debian_image)):
            layout = build()
            if layout is None:
                continue
            repo = name.split()[0].lower()
            registry.push(layout, f"{repo}:latest")
            _compare(name, f"{registry.host}/{repo}:latest", _du(os.path.join(layout, "blobs")) / 1e6,
                     _files(layout))
    finally:
        registry.stop()
