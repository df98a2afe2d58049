"""Debian's containerd on a temporary root, for side-by-side figures (skipped where it is not installed)."""
from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time

CONFIG = """version = 2
root = "{root}"
state = "{state}"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{address}"
[ttrpc]
  address = "{address}.ttrpc"
[debug]
  level = "warn"
"""


def available() -> bool:
    return bool(shutil.which("containerd") and shutil.which("ctr"))


class Containerd:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="berth-bench-ctrd-", dir="/tmp")
        self.address = os.path.join(self.dir, "c.sock")
        self.config = os.path.join(self.dir, "config.toml")
        with open(self.config, "w") as f:
            f.write(CONFIG.format(root=os.path.join(self.dir, "root"), state=os.path.join(self.dir, "state"),
                                  address=self.address))
        self.log = open(os.path.join(self.dir, "containerd.log"), "wb")
        self.proc = subprocess.Popen(["containerd", "--config", self.config], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 30
        while not os.path.exists(self.address):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"containerd did not start; see {self.log.name}")
            time.sleep(0.05)

    def ctr(self, *args: str, namespace: str = "bench") -> subprocess.CompletedProcess:
        return subprocess.run(["ctr", "-a", self.address, "-n", namespace, *args],
                              capture_output=True, text=True, check=True, timeout=600)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
        subprocess.run(["umount", "-R", os.path.join(self.dir, "root")], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)
