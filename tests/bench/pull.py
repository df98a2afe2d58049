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


def run() -> None:
    layout = large_image()
    size_mb = _du(os.path.join(layout, "blobs")) / 1e6
    registry = Registry().start()
    try:
        registry.push(layout, "large:latest")
        ref = f"{registry.host}/large:latest"
        berth_times = []
        for i in range(RUNS):
            d = Daemon(metrics=False).start()
            try:
                started = time.perf_counter()
                d.cli("pull", "--plain-http", ref, timeout=600)
                berth_times.append(time.perf_counter() - started)
            finally:
                d.cleanup()
        berth = statistics.median(berth_times)
        print(f"berth pull (fetch only) of {size_mb:.0f} MB in {LAYERS} layers: {berth:.2f}s "
              f"({size_mb / berth:.0f} MB/s)", flush=True)
        if not containerd.available():
            print("containerd is not installed: no side-by-side figure")
            return
        ctr_times = []
        for i in range(RUNS):
            c = containerd.Containerd()
            try:
                started = time.perf_counter()
                c.ctr("content", "fetch", "--plain-http", ref)
                ctr_times.append(time.perf_counter() - started)
            finally:
                c.stop()
        ctr = statistics.median(ctr_times)
        print(f"ctr content fetch: {ctr:.2f}s ({size_mb / ctr:.0f} MB/s); berth/containerd time ratio "
              f"{berth / ctr:.2f}", flush=True)
    finally:
        registry.stop()
