"""The container's cgroup v1 directories: resource figures, and OOM notification.

Paths come from /proc/<init pid>/cgroup, read once the init exists: it is where the runtime put
the container whatever its config says (an absent cgroupsPath, runc's or crun's defaults), and the
shim's view of it is the host's (the shim shares the host's cgroup namespace).

OOM: cgroup v1 notifies through an eventfd registered in cgroup.event_control against
memory.oom_control; the eventfd also fires when the cgroup is removed, which ends the watch.
"""
from __future__ import annotations

import logging
import os
from typing import Callable

log = logging.getLogger("berth.shim.cgroups")

V1_ROOT = "/sys/fs/cgroup"


def paths_of(pid: int) -> dict[str, str]:
    """Controller name -> absolute cgroup v1 directory of `pid` (only controllers mounted here)."""
    found: dict[str, str] = {}
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except (FileNotFoundError, ProcessLookupError):
        return found
    for line in lines:
        _, controllers, path = line.split(":", 2)
        for name in controllers.split(","):
            if not name or name.startswith("name="):
                continue
            directory = os.path.join(V1_ROOT, name, path.lstrip("/"))
            if os.path.isdir(os.path.join(V1_ROOT, name)):
                found[name] = directory
    return found


def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            value = f.read().strip()
    except (FileNotFoundError, OSError):
        return None
    if value == "max":
        return None
    try:
        return int(value)
    except ValueError:
        return None


def _read_kv(path: str) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, value = line.partition(" ")
                if value.strip().isdigit():
                    out[key] = int(value)
    except (FileNotFoundError, OSError):
        pass
    return out


def stats(paths: dict[str, str]) -> dict:
    """Memory, pids and CPU figures of a container's cgroups (cgroup v1)."""
    memory = paths.get("memory")
    pids = paths.get("pids")
    cpuacct = paths.get("cpuacct")
    result: dict = {}
    if memory:
        mstat = _read_kv(os.path.join(memory, "memory.stat"))
        result["memory"] = {
            "usage": _read_int(os.path.join(memory, "memory.usage_in_bytes")),
            "max_usage": _read_int(os.path.join(memory, "memory.max_usage_in_bytes")),
            "limit": _read_int(os.path.join(memory, "memory.limit_in_bytes")),
            "failcnt": _read_int(os.path.join(memory, "memory.failcnt")),
            "rss": mstat.get("total_rss", mstat.get("rss")),
            "cache": mstat.get("total_cache", mstat.get("cache")),
        }
    if pids:
        result["pids"] = {"current": _read_int(os.path.join(pids, "pids.current")),
                          "limit": _read_int(os.path.join(pids, "pids.max"))}
    if cpuacct:
        ticks = _read_kv(os.path.join(cpuacct, "cpuacct.stat"))
        hz = os.sysconf("SC_CLK_TCK")
        result["cpu"] = {"usage_ns": _read_int(os.path.join(cpuacct, "cpuacct.usage")),
                         "user_ns": ticks["user"] * 1_000_000_000 // hz if "user" in ticks else None,
                         "system_ns": ticks["system"] * 1_000_000_000 // hz if "system" in ticks else None}
    return result


class OomWatcher:
    """Calls `on_oom` whenever the memory cgroup's OOM killer fires, from the shim's loop: the
    eventfd (`fileno`) is one more thing its poller waits on, so a running task costs no thread
    for it. Best effort: where the kernel offers no v1 notification, `start` logs why and returns
    False."""

    def __init__(self, memory_dir: str, on_oom: Callable[[], None]):
        self.dir = memory_dir
        self.on_oom = on_oom
        self.efd = -1

    def start(self) -> bool:
        try:
            self.efd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            control = os.open(os.path.join(self.dir, "memory.oom_control"), os.O_RDONLY | os.O_CLOEXEC)
            try:
                with open(os.path.join(self.dir, "cgroup.event_control"), "w") as f:
                    f.write(f"{self.efd} {control}")
            finally:
                os.close(control)
        except OSError as e:
            log.info("no OOM notification for %s: %s", self.dir, e)
            self.close()
            return False
        return True

    def fileno(self) -> int:
        return self.efd

    def check(self) -> bool:
        """Handle what the eventfd holds, if anything; False once the cgroup is gone (that
        wakes it too), when nothing more can come."""
        try:
            os.eventfd_read(self.efd)
        except BlockingIOError:
            return True
        if not os.path.isdir(self.dir):
            return False
        try:
            self.on_oom()
        except Exception:
            log.exception("publishing an OOM event failed")
        return True

    def close(self) -> None:
        if self.efd >= 0:
            os.close(self.efd)
            self.efd = -1
