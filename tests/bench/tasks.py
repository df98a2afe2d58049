"""Tasks: `run --rm` latency, concurrent runs, shim and daemon memory with 20 running, and how long
the tasks take to answer again after the daemon is killed; berth beside containerd and bare runc.

Each figure is printed with its ratio to containerd's and DESIGN's target; nothing is asserted.
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time

from tests.bench import containerd
from tests.registry import Registry, build_busybox_image, run as sh
from tests.support import Daemon, descendants, pid_alive, proc_title

NS = "bench"
RUNS = 15
WARMUP = 2
CLIENTS = 8
CONCURRENT_SECONDS = 20
RUNNING = 20


# --- helpers --------------------------------------------------------------------------------------

def _pss_kib(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        pass
    return 0


def _cmdline(pid: int) -> list[str]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
    except (FileNotFoundError, ProcessLookupError):
        return []


def _kill_pids(pids) -> None:
    for pid in pids:
        if pid_alive(pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _cpu_seconds(pids) -> float:
    """User + system time of `pids` and of the children they reaped."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        total += sum(int(x) for x in fields[11:15])      # utime, stime, cutime, cstime
    return total / os.sysconf("SC_CLK_TCK")


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(cmd: list[str], env: dict | None = None) -> float:
    started = time.perf_counter()
    r = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True, env=env, timeout=120)
    elapsed = time.perf_counter() - started
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}: {r.stderr.strip()[:300]}")
    return elapsed


def _median_run(make_cmd, prefix: str, env: dict | None = None) -> float:
    for i in range(WARMUP):
        _timed(make_cmd(f"{prefix}-w{i}"), env)
    return statistics.median(_timed(make_cmd(f"{prefix}-{i}"), env) for i in range(RUNS))


def _concurrent(make_cmd, prefix: str, env: dict | None = None) -> tuple[float, int, str]:
    """CLIENTS loops of the command for CONCURRENT_SECONDS: runs/s, failures, the first error."""
    counts, failures, errors = [0] * CLIENTS, [0] * CLIENTS, []
    deadline = time.monotonic() + CONCURRENT_SECONDS

    def loop(k: int) -> None:
        n = 0
        while time.monotonic() < deadline:
            r = subprocess.run(make_cmd(f"{prefix}-{k}-{n}"), stdin=subprocess.DEVNULL, capture_output=True,
                               text=True, env=env, timeout=120)
            n += 1
            if r.returncode == 0:
                counts[k] += 1
            else:
                failures[k] += 1
                errors.append(r.stderr.strip()[:300])

    started = time.monotonic()
    threads = [threading.Thread(target=loop, args=(k,)) for k in range(CLIENTS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.monotonic() - started), sum(failures), (errors[0] if errors else "")


def _ratio(berth: float, other: float | None) -> str:
    return f"{berth / other:.2f}" if other else "n/a"


# --- berth ----------------------------------------------------------------------------------------

class Berth:
    def __init__(self):
        from berth.cli import launcher
        self.bin = tempfile.mkdtemp(prefix="berth-bench-bin-", dir="/tmp")
        self.berth, self.berthd = (os.path.join(self.bin, c) for c in ("berth", "berthd"))
        for command in ("berth", "berthd"):              # the commands as `make install` writes them
            launcher.write(command, os.path.join(self.bin, command))
        self.d = Daemon(metrics=False, command=[self.berthd]).start()
        self.daemons = [self.d]

    def cmd(self, *args: str) -> list[str]:
        return [self.berth, "-a", self.d.address, "-n", NS, *args]

    def cli(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return self.d.cli(*args, namespace=NS, check=check, timeout=120)

    def shim_pids(self, ids) -> dict[str, int]:
        out = {}
        for id in ids:
            try:
                with open(os.path.join(self.d.state, "tasks", NS, id, "shim.pid")) as f:
                    pid = int(f.read().strip())
            except (FileNotFoundError, ValueError):
                continue
            if proc_title(pid) == f"berth-shim: {NS}/{id}":
                out[id] = pid
        return out

    def daemon_pids(self, shims) -> set[int]:
        """berthd's processes, and the spare shim its zygote keeps ready (titled with the
        zygote's pid)."""
        excluded = set(shims)
        for pid in shims:
            excluded |= descendants(pid)
        daemon = {self.d.proc.pid} | descendants(self.d.proc.pid)
        titles = {f"berth-shim: spare of {pid}" for pid in daemon if proc_title(pid) == "berthd: shim-zygote"}
        spares = {int(e) for e in os.listdir("/proc") if e.isdigit() and proc_title(int(e)) in titles}
        return (daemon | spares) - excluded

    def running(self, ids) -> int:
        client = self.d.client(NS, timeout=2)
        try:
            return sum(1 for t in client.tasks.list() if t["container_id"] in ids and t["status"] == "running")
        finally:
            client.close()

    def restart_after_kill9(self, ids) -> float:
        self.d.kill9()
        old = self.d
        deadline = time.monotonic() + 10
        while any(pid_alive(p) for p in old.known_pids) and time.monotonic() < deadline:
            time.sleep(0.02)
        old.known_pids = {p for p in old.known_pids if pid_alive(p)}
        self.d = Daemon(metrics=False, dir=old.dir, command=[self.berthd])
        self.daemons.append(self.d)
        started = time.perf_counter()
        self.d.start(wait=False)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if self.running(ids) == len(ids):
                    elapsed = time.perf_counter() - started
                    self.d.known_pids |= descendants(self.d.proc.pid)
                    return elapsed
            except Exception:
                pass
            if self.d.proc.poll() is not None:
                raise RuntimeError(f"berthd exited {self.d.proc.returncode}")
            time.sleep(0.01)
        raise RuntimeError(f"not all {len(ids)} tasks answered within 120s after the restart")

    def cleanup(self) -> None:
        shims = {}
        try:
            tasks = self.cli("tasks", "ls", "-q", check=False).stdout.split()
            shims = self.shim_pids(tasks)
            if tasks:
                self.cli("tasks", "rm", "-f", *tasks, check=False)
            containers = self.cli("containers", "ls", "-q", check=False).stdout.split()
            if containers:
                self.cli("containers", "rm", *containers, check=False)
        finally:
            _kill_pids(shims.values())
            for d in reversed(self.daemons):
                d.cleanup()
            shutil.rmtree(self.bin, ignore_errors=True)


# --- containerd -----------------------------------------------------------------------------------

class Ctrd:
    def __init__(self):
        self.c = containerd.Containerd()

    def cmd(self, *args: str) -> list[str]:
        return ["ctr", "-a", self.c.address, "-n", NS, *args]

    def shim_pids(self) -> list[int]:
        out = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit():
                continue
            argv = _cmdline(int(entry))
            if argv and os.path.basename(argv[0]) == "containerd-shim-runc-v2" and "-address" in argv:
                i = argv.index("-address")
                if i + 1 < len(argv) and argv[i + 1] == self.c.address:
                    out.append(int(entry))
        return out

    def running(self, ids) -> int:
        r = subprocess.run(self.cmd("tasks", "ls"), capture_output=True, text=True, timeout=30)
        if r.returncode != 0:
            return -1
        n = 0
        for line in r.stdout.splitlines()[1:]:
            fields = line.split()
            if len(fields) >= 3 and fields[0] in ids and fields[2] == "RUNNING":
                n += 1
        return n

    def restart_after_kill9(self, ids) -> float:
        self.c.proc.kill()
        self.c.proc.wait()
        started = time.perf_counter()
        self.c.proc = subprocess.Popen(["containerd", "--config", self.c.config], stdout=self.c.log,
                                       stderr=self.c.log)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.running(ids) == len(ids):
                return time.perf_counter() - started
            if self.c.proc.poll() is not None:
                raise RuntimeError(f"containerd exited {self.c.proc.returncode}")
            time.sleep(0.01)
        raise RuntimeError(f"not all {len(ids)} tasks RUNNING within 120s after the restart")

    def cleanup(self) -> None:
        shims = self.shim_pids()
        try:
            r = subprocess.run(self.cmd("tasks", "ls", "-q"), capture_output=True, text=True, timeout=60)
            tasks = r.stdout.split()
            if tasks:
                subprocess.run(self.cmd("tasks", "rm", "-f", *tasks), capture_output=True, timeout=120)
            r = subprocess.run(self.cmd("containers", "ls", "-q"), capture_output=True, text=True, timeout=60)
            if r.stdout.split():
                subprocess.run(self.cmd("containers", "rm", *r.stdout.split()), capture_output=True, timeout=120)
        finally:
            left = [p for p in shims if pid_alive(p)]
            for pid in left:
                _kill_pids(descendants(pid))
            _kill_pids(left)
            self.c.stop()


# --- bare runc --------------------------------------------------------------------------------------

class Runc:
    def __init__(self, layout: str):
        self.dir = tempfile.mkdtemp(prefix="berth-bench-runc-", dir="/tmp")
        self.root = os.path.join(self.dir, "runc")
        self.bundle = os.path.join(self.dir, "bundle")
        sh("umoci", "unpack", "--image", f"{layout}:latest", self.bundle)
        config_path = os.path.join(self.bundle, "config.json")
        with open(config_path) as f:
            config = json.load(f)
        config["process"]["args"] = ["true"]
        config["process"]["terminal"] = False
        with open(config_path, "w") as f:
            json.dump(config, f)

    def cmd(self, id: str) -> list[str]:
        return ["runc", "--root", self.root, "run", "-b", self.bundle, id]

    def cleanup(self) -> None:
        r = subprocess.run(["runc", "--root", self.root, "list", "-q"], capture_output=True, text=True)
        for id in r.stdout.split():
            subprocess.run(["runc", "--root", self.root, "delete", "-f", id], capture_output=True)
        shutil.rmtree(self.dir, ignore_errors=True)


# --- the section ----------------------------------------------------------------------------------

def _median_and_cpu(make_cmd, prefix: str, daemon_pids, env: dict | None = None) -> tuple[float, float, float]:
    """The median run, and the CPU seconds per run of the client and of the daemon's processes."""
    daemon, client = _cpu_seconds(daemon_pids), _children_cpu()
    median = _median_run(make_cmd, prefix, env)
    runs = WARMUP + RUNS
    return median, (_children_cpu() - client) / runs, (_cpu_seconds(daemon_pids) - daemon) / runs


def _latency(b: Berth, c: Ctrd | None, runc: Runc | None, ref: str) -> None:
    berth, berth_client, berth_daemon = _median_and_cpu(lambda id: b.cmd("run", "--rm", ref, id, "true"), "lat",
                                                        b.daemon_pids(()), b.d.env)
    if c:
        cpids = ({c.c.proc.pid} | descendants(c.c.proc.pid)) - set(c.shim_pids())
        ctr, ctr_client, ctr_daemon = _median_and_cpu(lambda id: c.cmd("run", "--rm", ref, id, "true"), "lat", cpids)
    else:
        ctr = None
    bare = _median_run(runc.cmd, "lat") if runc else None
    print(f"run --rm busybox true, median of {RUNS}:", flush=True)
    print(f"  berth run --rm: {berth * 1e3:7.0f} ms", flush=True)
    if ctr:
        print(f"  ctr run --rm:   {ctr * 1e3:7.0f} ms   ratio berth/containerd {_ratio(berth, ctr)} (target <= 0.8)",
              flush=True)
    if bare:
        print(f"  bare runc run:  {bare * 1e3:7.0f} ms   (reference; berth/runc {_ratio(berth, bare)})", flush=True)
    print("  CPU per run (the shims' own is not counted: they are not the daemon's children):", flush=True)
    print(f"    berth: client {berth_client * 1e3:5.0f} ms, berthd {berth_daemon * 1e3:5.0f} ms", flush=True)
    if ctr:
        print(f"    ctr:   client {ctr_client * 1e3:5.0f} ms, containerd {ctr_daemon * 1e3:5.0f} ms", flush=True)


def _throughput(b: Berth, c: Ctrd | None, ref: str) -> None:
    print(f"{CLIENTS} concurrent clients, run --rm busybox true for {CONCURRENT_SECONDS}s each:", flush=True)
    berth, bf, berr = _concurrent(lambda id: b.cmd("run", "--rm", ref, id, "true"), "conc", b.d.env)
    print(f"  berth: {berth:6.2f} runs/s" + (f"  ({bf} failed: {berr})" if bf else ""), flush=True)
    if c:
        ctr, cf, cerr = _concurrent(lambda id: c.cmd("run", "--rm", ref, id, "true"), "conc")
        print(f"  ctr:   {ctr:6.2f} runs/s   ratio berth/containerd {_ratio(berth, ctr)} (target >= 1.25)"
              + (f"  ({cf} failed: {cerr})" if cf else ""), flush=True)


def _start_running(make_cmd, ids, env: dict | None = None) -> None:
    for id in ids:
        _timed(make_cmd(id), env)


def _memory_and_restart(b: Berth, c: Ctrd | None, ref: str) -> None:
    ids = [f"sleep-{i}" for i in range(RUNNING)]
    _start_running(lambda id: b.cmd("run", "-d", ref, id, "sleep", "1000"), ids, b.d.env)
    if c:
        _start_running(lambda id: c.cmd("run", "-d", "--null-io", ref, id, "sleep", "1000"), ids)
    time.sleep(1)                                  # let the shims settle

    shims = b.shim_pids(ids)
    berth_shim = sum(_pss_kib(p) for p in shims.values()) / max(1, len(shims))
    berth_daemon_pids = b.daemon_pids(shims.values())
    berth_daemon = sum(_pss_kib(p) for p in berth_daemon_pids)
    print(f"memory with {RUNNING} containers running (PSS):", flush=True)
    print(f"  berth-shim: {berth_shim / 1024:6.2f} MiB per container ({len(shims)} shims found)", flush=True)
    if c:
        cshims = c.shim_pids()
        ctr_shim = sum(_pss_kib(p) for p in cshims) / max(1, len(cshims))
        print(f"  containerd-shim-runc-v2: {ctr_shim / 1024:6.2f} MiB per container ({len(cshims)} shims found)  "
              f"ratio berth/containerd {_ratio(berth_shim, ctr_shim)} (target <= 0.67)", flush=True)
    print(f"  berthd, all {len(berth_daemon_pids)} processes: {berth_daemon / 1024:6.1f} MiB", flush=True)
    if c:
        cpids = ({c.c.proc.pid} | descendants(c.c.proc.pid)) - set(c.shim_pids())
        ctr_daemon = sum(_pss_kib(p) for p in cpids)
        print(f"  containerd daemon ({len(cpids)} process(es)): {ctr_daemon / 1024:6.1f} MiB  "
              f"ratio berth/containerd {_ratio(berth_daemon, ctr_daemon)} (target <= 1.0)", flush=True)

    berth_restart = b.restart_after_kill9(ids)
    print(f"kill -9 of the daemon with {RUNNING} running, restart, until all {RUNNING} answer as running:",
          flush=True)
    print(f"  berthd:     {berth_restart:6.2f}s", flush=True)
    if c:
        ctr_restart = c.restart_after_kill9(ids)
        print(f"  containerd: {ctr_restart:6.2f}s   ratio berth/containerd {_ratio(berth_restart, ctr_restart)} "
              f"(target <= 1.0)", flush=True)


def run() -> None:
    layout = build_busybox_image()
    registry = Registry().start()
    b = c = runc = None
    try:
        registry.push(layout, "busybox:latest")
        ref = f"{registry.host}/busybox:latest"
        b = Berth()
        b.cli("pull", "--plain-http", ref)
        if containerd.available():
            c = Ctrd()
            c.c.ctr("images", "pull", "--plain-http", ref, namespace=NS)
        else:
            print("containerd is not installed: no side-by-side figures", flush=True)
        if shutil.which("runc") and shutil.which("umoci"):
            runc = Runc(layout)
        _latency(b, c, runc, ref)
        _throughput(b, c, ref)
        _memory_and_restart(b, c, ref)
    finally:
        for x in (runc, c, b):
            if x is not None:
                try:
                    x.cleanup()
                except Exception as e:                # keep cleaning up the others
                    print(f"cleanup of {type(x).__name__}: {e}", flush=True)
        registry.stop()
        _remove_namespace_cgroups()


def _remove_namespace_cgroups() -> None:
    """The namespace's parent cgroups the runtimes made (/<ns> in each hierarchy), once empty."""
    base = "/sys/fs/cgroup"
    for path in [os.path.join(base, NS)] + [os.path.join(base, h, NS) for h in os.listdir(base)]:
        if os.path.isdir(path):
            try:
                os.rmdir(path)
            except OSError:
                pass                                  # in use, or not ours to remove
