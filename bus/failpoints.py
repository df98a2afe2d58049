"""Failpoints: named places where berth can be made to crash, fail or stall on purpose, so that
the recovery of berth and of the programs built on it can be tested (containerd's pkg/failpoint,
after FreeBSD's fail(9)). docs/failpoints.md is the user's guide and lists every site.

    spec   = name "=" term (";" name "=" term)*     BERTH_FAILPOINTS, the config's `failpoints`
    term   = step ("->" step)*                      the first step with a count left runs
    step   = [N "*"] action                         N times, or every time without N
    action = crash | error(Code) | delay(ms) | off

A site is `fail("content.commit")`; the router's, the workers' and the event publishers' add a
scope, so that `worker.dispatch` covers every method of every actor and
`worker.dispatch.content.commit` one.
The most specific failpoint set that still has a step to run is the one that fires.

One table for every process of a berthd: the supervisor maps it (anonymous shared memory) before
it forks anything, so every actor, restarted or not, the shim zygote and every shim see the same
table and the same counts: a step spent in one process is spent for all, so `1*crash` crashes one
process once, and its successor runs on. Counts change under an flock on a file beside the
sockets. When no step can run, a site costs one function call and one byte test.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import logging
import mmap
import os
import re
import struct
import time

from bus import codec
from bus.errors import BY_CODE, InvalidArgument, NotFound, NotImplementedErr, ResourceExhausted

log = logging.getLogger("berth.failpoints")

CRASH_EXIT = 86                # the exit status of a process a `crash` step ended
REGION = 64 << 10              # bytes of shared memory for the table
MAX_DELAY_MS = 600_000
MAX_COUNT = 1_000_000_000
MAX_NAME = 160

# Every site in the code. Scoped sites take more words after their name (see `fail`).
SITES = frozenset({
    "router.forward", "worker.dispatch",
    "content.write", "content.commit", "metadata.commit", "metadata.gc", "snapshot.commit", "snapshot.apply",
    "transfer.fetch", "runtime.create", "runtime.spawn", "runtime.created", "runtime.started", "runtime.delete",
    "shim.create", "shim.start", "shim.kill", "shim.delete", "events.publish",
})
SCOPED = ("router.forward", "worker.dispatch", "events.publish")
METHODS = ("failpoints", "set_failpoint", "clear_failpoints")     # of the `berth` service

_HEADER = struct.Struct("!BI")         # can a step run (0/1), length of the packed table
_STEP = re.compile(r"(?:(\d+)\*)?(?:(crash|off)|error\(([A-Za-z]+)\)|delay\((\d+)\))")
_SCOPE_WORD = re.compile(r"[A-Za-z0-9_-]+")


@dataclasses.dataclass(slots=True)
class Step:
    count: int | None          # how many more times it runs; None: every time
    action: str                # crash, error, delay, off
    arg: str | int | None = None

    def __str__(self) -> str:
        text = self.action if self.arg is None else f"{self.action}({self.arg})"
        return text if self.count is None else f"{self.count}*{text}"


def parse_term(term: str) -> list[Step]:
    """`2*off->1*error(Unavailable)` into its steps; anything else is InvalidArgument."""
    if not isinstance(term, str) or not term.strip():
        raise InvalidArgument("a failpoint term must not be empty (crash, error(Code), delay(ms), off)")
    steps = []
    for text in term.split("->"):
        text = text.strip()
        m = _STEP.fullmatch(text)
        if m is None:
            raise InvalidArgument(f"bad failpoint step {text!r} in {term!r}: expected [N*]crash, "
                                  "[N*]error(Code), [N*]delay(ms) or [N*]off")
        count, plain, code, delay = m.groups()
        if count is not None and int(count) > MAX_COUNT:
            raise InvalidArgument(f"failpoint count {count} is more than {MAX_COUNT}")
        step = Step(None if count is None else int(count), plain or ("error" if code else "delay"))
        if code is not None:
            if code not in BY_CODE:
                raise InvalidArgument(f"bad failpoint error code {code!r}: one of {', '.join(BY_CODE)}")
            step.arg = code
        elif delay is not None:
            if int(delay) > MAX_DELAY_MS:
                raise InvalidArgument(f"failpoint delay {delay} ms is more than {MAX_DELAY_MS}")
            step.arg = int(delay)
        steps.append(step)
    return steps


def format_term(steps: list[Step]) -> str:
    return "->".join(map(str, steps))


def check_name(name: str) -> str:
    """A site's name, or a scoped site's name with its scope (`worker.dispatch.content.commit`)."""
    if not isinstance(name, str) or len(name) > MAX_NAME:
        raise InvalidArgument(f"a failpoint name is a string of at most {MAX_NAME} characters")
    if name in SITES:
        return name
    for site in SCOPED:
        if name.startswith(site + ".") and all(_SCOPE_WORD.fullmatch(w) for w in name[len(site) + 1:].split(".")):
            return name
    raise InvalidArgument(f"no failpoint site {name!r}: the sites are {', '.join(sorted(SITES))} "
                          f"(and, for {', '.join(SCOPED)}, those followed by a scope)")


def parse(spec: str) -> dict[str, str]:
    """`name=term;name=term` into {name: normalised term}; empty items are skipped, a later
    item for the same name wins."""
    if not isinstance(spec, str):
        raise InvalidArgument("failpoints must be a string: name=term;name=term")
    table = {}
    for item in spec.split(";"):
        if not item.strip():
            continue
        name, eq, term = item.partition("=")
        if not eq:
            raise InvalidArgument(f"bad failpoint {item.strip()!r}: expected name=term")
        table[check_name(name.strip())] = format_term(parse_term(term))
    return table


def next_step(steps: list[Step]) -> Step | None:
    """The step to run now, counted down; None once every count is spent."""
    for step in steps:
        if step.count is None:
            return step
        if step.count > 0:
            step.count -= 1
            return step
    return None


def can_run(term: str) -> bool:
    return any(s.count is None or s.count > 0 for s in parse_term(term))


class Table:
    """The table in a shared memory region: a header (can any step run, payload length), then
    the msgpack'd {name: term}. Changes hold an flock on `lock_path`; the flag byte alone is read
    without it, by every site."""

    def __init__(self, region: mmap.mmap, lock_path: str):
        self.region = region
        self.lock_path = lock_path

    @classmethod
    def create(cls, lock_path: str, table: dict[str, str]) -> "Table":
        """Map a fresh region (anonymous: it holds no descriptor, which a shim closes) and fill it."""
        t = cls(mmap.mmap(-1, REGION, flags=mmap.MAP_SHARED), lock_path)
        with t._locked():
            t._store(table)
        return t

    def read(self) -> dict[str, str]:
        with self._locked():
            return self._load()

    def set(self, name: str, term: str) -> str:
        term = format_term(parse_term(term))
        with self._locked():
            table = self._load()
            table[check_name(name)] = term
            self._store(table)
        return term

    def clear(self, name: str | None = None) -> list[str]:
        with self._locked():
            table = self._load()
            if name is None:
                cleared = sorted(table)
                table = {}
            elif name in table:
                cleared = [name]
                del table[name]
            else:
                raise NotFound(f"failpoint {name} is not set")
            self._store(table)
        return cleared

    def take(self, names: list[str]) -> tuple[str, Step] | None:
        """The first of `names` (most specific first) with a step to run: that step, counted down."""
        with self._locked():
            table = self._load()
            for name in names:
                if name not in table:
                    continue
                steps = parse_term(table[name])
                step = next_step(steps)
                if step is None:
                    continue
                if step.count is not None:
                    table[name] = format_term(steps)
                    self._store(table)
                return name, step
        return None

    @property
    def armed(self) -> bool:
        return bool(self.region[0])

    def _load(self) -> dict[str, str]:
        _, size = _HEADER.unpack_from(self.region, 0)
        return codec.unpack(self.region[_HEADER.size:_HEADER.size + size], limit=REGION) if size else {}

    def _store(self, table: dict[str, str]) -> None:
        data = codec.pack(table) if table else b""
        if _HEADER.size + len(data) > REGION:
            raise ResourceExhausted(f"failpoints take {len(data)} bytes, more than the {REGION} there is room for")
        self.region[0] = 0
        self.region[_HEADER.size:_HEADER.size + len(data)] = data
        _HEADER.pack_into(self.region, 0, any(map(can_run, table.values())), len(data))

    @contextlib.contextmanager
    def _locked(self):
        """flock: released by the kernel if its holder dies, and exclusive between threads too
        (each call opens the file anew). Without the file (its berthd's state is gone, a shim
        lives on) counts are kept without it."""
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)


# --- the process's table and the sites --------------------------------------------------------

_table: Table | None = None
_armed: mmap.mmap | bytearray = bytearray(1)       # the region's flag byte, once there is a region


def share(lock_path: str, table: dict[str, str]) -> Table:
    """Make `table` this process's failpoints and those of everything it forks from now on.
    berthd's supervisor calls it before it forks the template."""
    global _table, _armed
    _table = Table.create(lock_path, table)
    _armed = _table.region
    return _table


def fail(site: str, *scope: str) -> None:
    """A failpoint site. `scope` narrows a scoped site: words, or topics such as `/tasks/exit`,
    each appended to the name (`events.publish.tasks.exit`)."""
    if _armed[0]:
        _fire(site, scope)


def _fire(site: str, scope: tuple[str, ...]) -> None:
    words = [w for part in scope for w in re.split(r"[./]", part) if w]
    names = [".".join((site, *words[:n])) for n in range(len(words), -1, -1)]
    hit = _table.take(names)
    if hit is None:
        return
    name, step = hit
    if step.action == "crash":
        os.write(2, f"failpoint {name}: crash (exit status {CRASH_EXIT})\n".encode())
        os._exit(CRASH_EXIT)
    if step.action == "error":
        raise BY_CODE[step.arg](f"failpoint {name}: injected {step.arg}")
    if step.action == "delay":
        time.sleep(step.arg / 1000)


# --- the `berth` service's methods --------------------------------------------------------------

def serve(method: str, args: dict):
    """berthd's `berth.failpoints` (list), `berth.set_failpoint` and `berth.clear_failpoints`."""
    name = args.get("name")
    if method == "failpoints":
        return [{"name": n, "term": term} for n, term in sorted(_table.read().items())]
    if method == "set_failpoint":
        if not isinstance(args.get("term"), str):
            raise InvalidArgument("set_failpoint takes a name and a term (strings)")
        term = _table.set(name, args["term"])
        log.warning("failpoint %s set to %s", name, term)
        return {"name": name, "term": term}
    if method == "clear_failpoints":
        if name is not None and not isinstance(name, str):
            raise InvalidArgument("clear_failpoints takes a failpoint name, or none for all")
        cleared = _table.clear(name)
        log.info("failpoints cleared: %s", ", ".join(cleared) or "none was set")
        return {"cleared": cleared}
    raise NotImplementedErr(f"berth has no method {method!r}")
