"""OCI runtime specs: containerd's default Linux spec, and `with_*` options that compose.

    spec = generate("default", "redis",
                    with_image_config(image_config),        # the image's config JSON
                    with_process_args("redis-server"),
                    with_env({"REDIS_PORT": "6380"}),
                    rootfs="/run/berth/.../rootfs")         # only for user/group look-ups

An option is a small function that returns an applier, `apply(spec, ctx)`, which edits the spec
(a plain dict shaped as the runtime's config.json) in place. `ctx` is a `SpecContext`: the
namespace and container id, the host path of the container's root filesystem when the caller has
one mounted, and the image config. Options that need nothing from it may be written with one
parameter, `apply(spec)` (the shape in STYLE.md); `generate` passes the context only to those
that take it. Options apply in order, so a later one overrides an earlier one.

The defaults are containerd's (`oci.populateDefaultUnixSpec` plus `WithDefaultUnixDevices`, as
`ctr run` applies them), with two additions: the process starts with the default PATH, and the
hostname is the container id. Departures from containerd's options, each for a stated reason,
are noted where they are made.

Reading the image's /etc/passwd and /etc/group is the one place this module touches the disk:
the rootfs belongs to an image, so those files may be symlinks aimed at the host, FIFOs, devices
or endless. They are resolved with every symlink kept inside the rootfs (openat2 RESOLVE_IN_ROOT,
or a component-wise O_NOFOLLOW walk where openat2 is missing), must be regular files (the last
component may not be a symlink at all), are opened O_PATH first so nothing else is ever opened
for reading, and are read up to `MAX_ID_FILE` bytes. Anything else is a clear InvalidArgument.
Nothing else in the spec (WORKDIR, mount sources, ...) is opened here: they are strings for the
runtime to resolve inside the container.
"""
from __future__ import annotations

import collections
import errno
import json
import math
import os
import stat
from collections.abc import Callable, Iterable, Mapping

from bus.errors import FailedPrecondition, InvalidArgument, NotFound
from bus.checks import check_identifier

__all__ = [
    "OCI_VERSION", "DEFAULT_PATH", "DEFAULT_CAPABILITIES", "DEFAULT_NAMESPACES", "MASKED_PATHS",
    "READONLY_PATHS", "NAMESPACE_TYPES", "MAX_ID_FILE", "SpecContext", "SpecOpt",
    "default_spec", "generate", "validate", "compose", "parse_mount", "resolve_user",
    "read_rootfs_file", "with_image_config", "with_process_args", "with_env", "with_mounts",
    "with_host_namespace", "with_tty", "with_memory_limit", "with_cpus", "with_readonly_rootfs",
    "with_user", "with_cwd", "with_hostname", "with_rlimit", "with_cgroups_path",
    "with_annotations", "with_new_privileges",
]

OCI_VERSION = "1.1.0"
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
DEFAULT_ENV = ("PATH=" + DEFAULT_PATH,)

# containerd's defaultUnixCaps: bounding, effective and permitted; never inheritable or ambient.
DEFAULT_CAPABILITIES = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
)
# containerd's defaultUnixNamespaces, in its order. A new network namespace has only `lo`.
DEFAULT_NAMESPACES = ("pid", "ipc", "uts", "mount", "network")
NAMESPACE_TYPES = frozenset({"pid", "network", "mount", "ipc", "uts", "user", "cgroup", "time"})

MASKED_PATHS = (
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi",
)
READONLY_PATHS = ("/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger")

_DEFAULT_MOUNTS = (
    ("/proc", "proc", "proc", ("nosuid", "noexec", "nodev")),
    ("/dev", "tmpfs", "tmpfs", ("nosuid", "strictatime", "mode=755", "size=65536k")),
    ("/dev/pts", "devpts", "devpts",
     ("nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5")),
    ("/dev/shm", "tmpfs", "shm", ("nosuid", "noexec", "nodev", "mode=1777", "size=65536k")),
    ("/dev/mqueue", "mqueue", "mqueue", ("nosuid", "noexec", "nodev")),
    ("/sys", "sysfs", "sysfs", ("nosuid", "noexec", "nodev", "ro")),
    ("/run", "tmpfs", "tmpfs", ("nosuid", "strictatime", "mode=755", "size=65536k")),
)

# Deny every device, then allow containerd's default character devices (WithDefaultUnixDevices):
# (major, minor) with None meaning every minor.
_ALLOWED_CHAR_DEVICES = (
    (1, 3),     # /dev/null
    (1, 8),     # /dev/random
    (1, 7),     # /dev/full
    (5, 0),     # /dev/tty
    (1, 5),     # /dev/zero
    (1, 9),     # /dev/urandom
    (5, 1),     # /dev/console
    (136, None),  # /dev/pts/*
    (5, 2),     # /dev/ptmx
)

RLIMIT_TYPES = frozenset({
    "RLIMIT_AS", "RLIMIT_CORE", "RLIMIT_CPU", "RLIMIT_DATA", "RLIMIT_FSIZE", "RLIMIT_LOCKS",
    "RLIMIT_MEMLOCK", "RLIMIT_MSGQUEUE", "RLIMIT_NICE", "RLIMIT_NOFILE", "RLIMIT_NPROC",
    "RLIMIT_RSS", "RLIMIT_RTPRIO", "RLIMIT_RTTIME", "RLIMIT_SIGPENDING", "RLIMIT_STACK",
})

MAX_ID_FILE = 1 << 20           # bytes read at most from the image's /etc/passwd or /etc/group
MAX_ID = 2**32 - 2              # (uid_t)-1 means "unchanged" to the kernel, so it is no id
MAX_GROUPS = 65536              # NGROUPS_MAX
MAX_HOSTNAME = 64               # HOST_NAME_MAX
CPU_PERIOD = 100_000            # µs; `ctr run --cpus` uses this period
MIN_CPU_QUOTA = 1000            # µs; the kernel refuses a smaller cfs quota
U64_MAX = 2**64 - 1


class SpecContext(collections.namedtuple("SpecContext", "namespace container_id rootfs image_config",
                                         defaults=(None, None))):
    """What options may need besides the spec: who the container is, and where its files are.

    `rootfs` is the host path of the container's root filesystem, mounted, for options that
    read from it (user and group resolution); None when the caller has none at hand. It is never
    the spec's `root.path`, which stays bundle-relative. (A named tuple rather than a dataclass:
    dataclasses import inspect, which costs every `berth run` a few milliseconds.)
    """

    __slots__ = ()


SpecOpt = Callable[[dict, SpecContext], None] | Callable[[dict], None]


# ---------------------------------------------------------------------------------------------
# The default spec

def default_spec(namespace: str, container_id: str) -> dict:
    """containerd's default Linux spec for `namespace`/`container_id`, as a fresh dict."""
    check_identifier(namespace, "namespace")
    check_identifier(container_id, "container id")
    return {
        "ociVersion": OCI_VERSION,
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": [],                         # containerd leaves them to the image or caller
            "env": list(DEFAULT_ENV),
            "cwd": "/",
            "capabilities": {
                "bounding": list(DEFAULT_CAPABILITIES),
                "effective": list(DEFAULT_CAPABILITIES),
                "permitted": list(DEFAULT_CAPABILITIES),
            },
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            # containerd's default: setuid binaries and file capabilities in the image grant
            # nothing. `with_new_privileges()` turns it off (Docker's default).
            "noNewPrivileges": True,
        },
        "root": {"path": "rootfs", "readonly": False},
        "hostname": _hostname_for(container_id),
        "mounts": [{"destination": dst, "type": typ, "source": src, "options": list(opts)}
                   for dst, typ, src, opts in _DEFAULT_MOUNTS],
        "linux": {
            "resources": {"devices": _default_device_rules()},
            # containerd's cgroupfs default; a systemd cgroup driver would use "slice:prefix:name".
            "cgroupsPath": f"/{namespace}/{container_id}",
            "namespaces": [{"type": t} for t in DEFAULT_NAMESPACES],
            "maskedPaths": list(MASKED_PATHS),
            "readonlyPaths": list(READONLY_PATHS),
        },
    }


def _hostname_for(container_id: str) -> str:
    """The container id, cut to the kernel's 64 bytes if need be (ids may have 76)."""
    return container_id[:MAX_HOSTNAME].rstrip("._-")


def _default_device_rules() -> list[dict]:
    rules: list[dict] = [{"allow": False, "access": "rwm"}]
    for major, minor in _ALLOWED_CHAR_DEVICES:
        rule: dict = {"allow": True, "type": "c", "major": major}
        if minor is not None:
            rule["minor"] = minor
        rule["access"] = "rwm"
        rules.append(rule)
    return rules


# ---------------------------------------------------------------------------------------------
# Generating and validating

def generate(namespace: str, container_id: str, *opts: SpecOpt, rootfs: str | os.PathLike | None = None,
             image_config: Mapping | bytes | str | None = None) -> dict:
    """The default spec, then each option in order, then `validate`.

    `rootfs` (host path of the mounted root filesystem) is read only by options that need it,
    and only its /etc/passwd and /etc/group. `image_config` is handed to options through the
    context (`with_image_config()` without an argument uses it); it is not applied by itself.
    """
    if rootfs is not None:
        rootfs = os.fspath(rootfs)
        if not isinstance(rootfs, str) or not os.path.isabs(rootfs) or "\0" in rootfs:
            raise InvalidArgument(f"rootfs must be an absolute path, not {rootfs!r:.200}")
    if isinstance(image_config, (bytes, str)):
        image_config = _json_object(image_config, "image config")
    if image_config is not None and not isinstance(image_config, Mapping):
        raise InvalidArgument("image config must be a JSON object")
    ctx = SpecContext(namespace, container_id, rootfs, image_config)
    spec = default_spec(namespace, container_id)
    for opt in opts:
        _apply(opt, spec, ctx)
    validate(spec)
    return spec


def compose(*opts: SpecOpt) -> Callable[[dict, SpecContext | None], None]:
    """Several options as one, applied in order (containerd's `oci.Compose`)."""
    def apply(spec: dict, ctx: SpecContext | None = None) -> None:
        for opt in opts:
            _apply(opt, spec, ctx)
    return apply


def _apply(opt: SpecOpt, spec: dict, ctx: SpecContext | None) -> None:
    if not callable(opt):
        raise InvalidArgument(f"spec option {opt!r:.100} is not callable")
    if _takes_context(opt):
        opt(spec, ctx)
    else:
        opt(spec)


def _takes_context(opt: Callable) -> bool:
    if type(opt) is _FUNCTION and not hasattr(opt, "__wrapped__") and not hasattr(opt, "__signature__"):
        # A plain function (every with_* option is one): what inspect.signature would say, read
        # from its code, so that the CLI need not import inspect.
        code = opt.__code__
        return bool(code.co_flags & _CO_VARARGS) or code.co_argcount >= 2
    import inspect
    try:
        params = inspect.signature(opt).parameters.values()
    except (TypeError, ValueError):
        return True
    positional = 0
    for p in params:
        if p.kind is p.VAR_POSITIONAL:
            return True
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD):
            positional += 1
    return positional >= 2


_FUNCTION = type(_takes_context)
_CO_VARARGS = 0x04           # inspect.CO_VARARGS


def validate(spec: dict) -> dict:
    """The checks a runtime would otherwise fail on later and less clearly; returns `spec`."""
    process = spec.get("process")
    if not isinstance(process, dict):
        raise InvalidArgument("spec has no process")
    args = process.get("args")
    if not args:
        raise InvalidArgument("no command specified")
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        raise InvalidArgument("process args must be a list of strings")
    if not args[0]:
        raise InvalidArgument("no command specified: the first argument is empty")
    for a in args:
        _no_nul(a, "process argument")
    cwd = process.get("cwd")
    if not isinstance(cwd, str) or not cwd.startswith("/"):
        raise InvalidArgument(f"working directory {cwd!r:.200} is not an absolute path")
    _no_nul(cwd, "working directory")
    env = process.get("env") or []
    if not isinstance(env, list):
        raise InvalidArgument("process env must be a list of KEY=VALUE strings")
    for entry in env:
        if not isinstance(entry, str) or "=" not in entry or entry.startswith("="):
            raise InvalidArgument(f"environment entry {entry!r:.200} is not KEY=VALUE")
        _no_nul(entry, "environment entry")
    user = process.get("user") or {}
    if not isinstance(user, dict):
        raise InvalidArgument("process user must be a map")
    for key in ("uid", "gid"):
        _check_id(user.get(key, 0), f"process user {key}")
    for gid in user.get("additionalGids") or []:
        _check_id(gid, "additional gid")
    mounts = spec.get("mounts") or []
    if not isinstance(mounts, list):
        raise InvalidArgument("mounts must be a list")
    for m in mounts:
        _check_mount(m)
    linux = spec.get("linux") or {}
    namespaces = (linux.get("namespaces") or []) if isinstance(linux, dict) else None
    if not isinstance(namespaces, list) or not all(isinstance(n, dict) for n in namespaces):
        raise InvalidArgument("linux.namespaces must be a list of maps")
    types = [ns.get("type") for ns in namespaces]
    for t in types:
        if t not in NAMESPACE_TYPES:
            raise InvalidArgument(f"unknown namespace type {t!r:.50}")
    if len(set(types)) != len(types):
        raise InvalidArgument("a namespace type is listed twice")
    if spec.get("hostname") and "uts" not in types:
        raise InvalidArgument("a hostname needs the container's own UTS namespace")
    if "mount" not in types:
        raise InvalidArgument("the container needs its own mount namespace")
    try:
        plain = json.loads(json.dumps(spec, allow_nan=False))
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"spec is not plain JSON: {e}") from None
    if plain != spec:
        raise InvalidArgument("spec is not plain JSON (tuples, non-string keys?)")
    return spec


def _no_nul(value: str, what: str) -> None:
    if "\0" in value:
        raise InvalidArgument(f"{what} {value[:100]!r} contains a NUL byte")


def _check_id(value: object, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_ID:
        raise InvalidArgument(f"{what} {value!r:.50} is not an id between 0 and {MAX_ID}")
    return value


def _check_mount(m: object) -> dict:
    if not isinstance(m, dict):
        raise InvalidArgument(f"mount {m!r:.200} is not a map")
    dst = m.get("destination")
    if not isinstance(dst, str) or not dst.startswith("/"):
        raise InvalidArgument(f"mount destination {dst!r:.200} is not an absolute path")
    _no_nul(dst, "mount destination")
    if ".." in dst.split("/"):
        raise InvalidArgument(f"mount destination {dst!r:.200} contains '..'")
    for key in ("type", "source"):
        if key in m and not isinstance(m[key], str):
            raise InvalidArgument(f"mount {dst!r}: {key} must be a string")
        if isinstance(m.get(key), str):
            _no_nul(m[key], f"mount {key}")
    opts = m.get("options", [])
    if not isinstance(opts, list) or not all(isinstance(o, str) for o in opts):
        raise InvalidArgument(f"mount {dst!r}: options must be a list of strings")
    return m


# ---------------------------------------------------------------------------------------------
# Options: process

def with_process_args(*args: str) -> SpecOpt:
    """Replace the whole command line, entrypoint included (containerd's WithProcessArgs)."""
    for a in args:
        if not isinstance(a, str):
            raise InvalidArgument(f"process arguments must be strings, not {type(a).__name__}")

    def apply(spec: dict) -> None:
        spec["process"]["args"] = list(args)
    return apply


def with_env(env: Iterable[str] | Mapping[str, str | None]) -> SpecOpt:
    """Set environment variables, replacing by key or appending.

    A list holds "KEY=VALUE" entries; a bare "KEY" unsets KEY (containerd's replaceOrAppend).
    A mapping maps KEY to its value, or to None to unset it.
    """
    entries = _env_entries(env)

    def apply(spec: dict) -> None:
        process = spec["process"]
        process["env"] = _merge_env(process.get("env") or [], entries)
    return apply


def _env_entries(env: Iterable[str] | Mapping[str, str | None]) -> list[str]:
    if isinstance(env, Mapping):
        pairs = []
        for key, value in env.items():
            if not isinstance(key, str) or not (value is None or isinstance(value, str)):
                raise InvalidArgument("environment map must map strings to strings (or None)")
            if "=" in key:
                raise InvalidArgument(f"environment variable name {key!r:.100} contains '='")
            pairs.append(key if value is None else f"{key}={value}")
        entries = pairs
    elif isinstance(env, (str, bytes)):
        raise InvalidArgument("environment must be a list of KEY=VALUE strings or a map")
    else:
        entries = list(env)
    for e in entries:
        if not isinstance(e, str):
            raise InvalidArgument(f"environment entry {e!r:.100} is not a string")
        if not e or e.startswith("="):
            raise InvalidArgument(f"environment entry {e!r:.100} has no variable name")
        _no_nul(e, "environment entry")
    return entries


def _merge_env(base: list[str], overrides: Iterable[str]) -> list[str]:
    """Overrides replace base entries with the same key, or are appended; a bare KEY unsets."""
    result: list[str | None] = list(base)
    index = {e.split("=", 1)[0]: i for i, e in enumerate(result)}
    for e in overrides:
        key = e.split("=", 1)[0]
        if "=" not in e:
            if key in index:
                result[index.pop(key)] = None
            continue
        if key in index:
            result[index[key]] = e
        else:
            index[key] = len(result)
            result.append(e)
    return [e for e in result if e is not None]


def with_cwd(path: str) -> SpecOpt:
    """The process's working directory, a path inside the container (never opened here)."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise InvalidArgument(f"working directory {path!r:.200} is not an absolute path")
    _no_nul(path, "working directory")

    def apply(spec: dict) -> None:
        spec["process"]["cwd"] = path
    return apply


def with_tty() -> SpecOpt:
    """Give the process a terminal, and TERM=xterm unless TERM is already set.

    containerd appends TERM=xterm even when the image sets TERM; keeping a TERM that is there
    lets the image or an earlier `with_env` decide, whichever order the options come in.
    """
    def apply(spec: dict) -> None:
        process = spec["process"]
        process["terminal"] = True
        env = process.setdefault("env", [])
        if not any(e.split("=", 1)[0] == "TERM" for e in env):
            env.append("TERM=xterm")
    return apply


def with_new_privileges() -> SpecOpt:
    """Let setuid binaries and file capabilities work again (noNewPrivileges off)."""
    def apply(spec: dict) -> None:
        spec["process"]["noNewPrivileges"] = False
    return apply


def with_rlimit(kind: str, soft: int, hard: int | None = None) -> SpecOpt:
    """Set one POSIX rlimit, e.g. `with_rlimit("RLIMIT_NOFILE", 4096, 8192)` or ("nofile", ...)."""
    if not isinstance(kind, str):
        raise InvalidArgument("rlimit type must be a string")
    name = kind.upper()
    if not name.startswith("RLIMIT_"):
        name = "RLIMIT_" + name
    if name not in RLIMIT_TYPES:
        raise InvalidArgument(f"unknown rlimit {kind!r:.50}")
    hard = soft if hard is None else hard
    for value in (soft, hard):
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= U64_MAX:
            raise InvalidArgument(f"rlimit {name}: {value!r:.50} is not a 64-bit unsigned integer")
    if soft > hard:
        raise InvalidArgument(f"rlimit {name}: soft limit {soft} is above hard limit {hard}")

    def apply(spec: dict) -> None:
        limits = [r for r in spec["process"].get("rlimits") or [] if r.get("type") != name]
        limits.append({"type": name, "hard": hard, "soft": soft})
        spec["process"]["rlimits"] = limits
    return apply


# ---------------------------------------------------------------------------------------------
# Options: the image config

def with_image_config(config: Mapping | bytes | str | None = None, *,
                      args: Iterable[str] | None = None) -> SpecOpt:
    """Take the command, environment, working directory and user from an image's config JSON.

    `config` is the OCI image config (the whole blob, or just its "config" object); None uses
    the context's `image_config`. Like containerd's WithImageConfigArgs: args = Entrypoint +
    Cmd (`args`, when given, replace Cmd but keep Entrypoint); env = the image's, with PATH
    added when the image has none, under what earlier options set; cwd = WorkingDir or "/";
    User goes through `with_user`, and without a User root's supplementary groups are looked up.
    Image env entries that are not KEY=VALUE are dropped: a runtime refuses them, and a bare KEY
    only means "unset" in an override.
    """
    parsed = None if config is None else _image_config(config)
    override = list(args) if args is not None else []
    if not all(isinstance(a, str) for a in override):
        raise InvalidArgument("image config args must be strings")

    def apply(spec: dict, ctx: SpecContext | None = None) -> None:
        cfg = parsed
        if cfg is None:
            if ctx is None or ctx.image_config is None:
                raise InvalidArgument("with_image_config: no image config given")
            cfg = _image_config(ctx.image_config)
        process = spec["process"]
        image_env = [e for e in cfg["Env"] if "=" in e and not e.startswith("=")]
        if not any(e.split("=", 1)[0] == "PATH" for e in image_env):
            image_env.insert(0, DEFAULT_ENV[0])
        # What earlier options set wins over the image, except the untouched default PATH,
        # which stands in only for an image without one.
        earlier = [e for e in process.get("env") or [] if e not in DEFAULT_ENV]
        process["env"] = _merge_env(image_env, earlier)
        process["args"] = cfg["Entrypoint"] + (override or cfg["Cmd"])     # empty: keep Cmd
        process["cwd"] = cfg["WorkingDir"] or "/"
        if cfg["User"]:
            _set_user(spec, ctx, cfg["User"])
        else:
            _set_additional_gids(spec, ctx)
    return apply


def _image_config(config: Mapping | bytes | str) -> dict:
    """The fields of an image config this module uses, type-checked."""
    if isinstance(config, (bytes, str)):
        config = _json_object(config, "image config")
    if not isinstance(config, Mapping):
        raise InvalidArgument("image config must be a JSON object")
    inner = config["config"] if "config" in config else config
    if inner is None:
        inner = {}
    if not isinstance(inner, Mapping):
        raise InvalidArgument("image config: 'config' must be an object")

    def strings(key: str) -> list[str]:
        value = inner.get(key)
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise InvalidArgument(f"image config: {key} must be a list of strings")
        return list(value)

    def string(key: str) -> str:
        value = inner.get(key)
        if value is None:
            return ""
        if not isinstance(value, str):
            raise InvalidArgument(f"image config: {key} must be a string")
        return value

    return {"Entrypoint": strings("Entrypoint"), "Cmd": strings("Cmd"), "Env": strings("Env"),
            "WorkingDir": string("WorkingDir"), "User": string("User")}


def _json_object(text: bytes | str, what: str) -> object:
    try:
        return json.loads(text)
    except ValueError as e:
        raise InvalidArgument(f"{what} is not JSON: {e}") from None


# ---------------------------------------------------------------------------------------------
# Options: user

def with_user(user: str) -> SpecOpt:
    """Run as `user`: "name", "uid", "name:group", "uid:gid", "uid:group" or "name:gid".

    Names are resolved in the rootfs's /etc/passwd and /etc/group (a name that is not there is
    NotFound); a lone uid takes its primary group from /etc/passwd, or 0 when it is not listed.
    additionalGids become the primary gid followed by the groups that list the user as a member,
    as containerd sets them since CVE-2023-25173. Only a "uid:gid" of two numbers works without
    a rootfs (then without supplementary groups); the rest is FailedPrecondition without one.
    """
    _parse_user(user)

    def apply(spec: dict, ctx: SpecContext | None = None) -> None:
        _set_user(spec, ctx, user)
    return apply


def resolve_user(rootfs: str | None, user: str) -> tuple[int, int, list[int]]:
    """(uid, gid, additional gids) for a user string, as `with_user` sets them."""
    uid, gid = _resolve_primary(rootfs, user)
    return uid, gid, _with_supplementary(rootfs, gid, str(uid))


def _set_user(spec: dict, ctx: SpecContext | None, user: str) -> None:
    uid, gid, gids = resolve_user(ctx.rootfs if ctx is not None else None, user)
    spec["process"]["user"] = {"uid": uid, "gid": gid, "additionalGids": gids}


def _set_additional_gids(spec: dict, ctx: SpecContext | None) -> None:
    """containerd's WithAdditionalGIDs for the spec's current user: its primary gid, then the
    groups listing it. containerd names uid 0 "root" without looking it up; so does this."""
    user = spec["process"].setdefault("user", {"uid": 0, "gid": 0})
    uid = user.get("uid", 0)
    rootfs = ctx.rootfs if ctx is not None else None
    user["additionalGids"] = _with_supplementary(rootfs, user.get("gid", 0),
                                                 "root" if uid == 0 else str(uid))


def _with_supplementary(rootfs: str | None, gid: int, userstr: str) -> list[int]:
    """[gid] then the supplementary groups of `userstr` (uid or name), without repeats; without
    a rootfs there is nothing to look them up in, and only the primary gid is listed."""
    gids = [gid]
    if rootfs is not None:
        gids.extend(_supplementary_gids(rootfs, userstr))
    gids = list(dict.fromkeys(gids))
    if len(gids) > MAX_GROUPS:
        raise InvalidArgument(f"user {userstr!r} is in more than {MAX_GROUPS} groups")
    return gids


def _parse_user(user: str) -> tuple[int | str, int | str | None]:
    """A user string as (uid or name, gid or group name or None); numbers become ints."""
    if not isinstance(user, str):
        raise InvalidArgument("user must be a string")
    parts = user.split(":")
    if len(parts) > 2 or not all(parts) or "\0" in user or len(user) > 1024:
        raise InvalidArgument(f"invalid user {user[:100]!r}: use name, uid, name:group or uid:gid")
    values: list[int | str] = []
    for p in parts:
        if p.isascii() and p.isdigit():
            values.append(_check_id(int(p), "uid/gid"))
        else:
            values.append(p)
    return values[0], values[1] if len(values) == 2 else None


def _resolve_primary(rootfs: str | None, user: str) -> tuple[int, int]:
    who, group = _parse_user(user)
    if isinstance(who, int) and isinstance(group, int):
        return who, group
    if rootfs is None:
        raise FailedPrecondition(f"resolving user {user!r} needs the container's root filesystem")
    if isinstance(who, int):
        entry = next((u for u in _passwd(rootfs) if u[1] == who), None)
        uid, gid = who, (entry[2] if entry is not None else 0)
    else:
        entry = next((u for u in _passwd(rootfs) if u[0] == who), None)
        if entry is None:
            raise NotFound(f"no user {who!r} in the image's /etc/passwd")
        uid, gid = entry[1], entry[2]
    if isinstance(group, int):
        gid = group
    elif group is not None:
        found = next((g for g in _groups(rootfs) if g[0] == group), None)
        if found is None:
            raise NotFound(f"no group {group!r} in the image's /etc/group")
        gid = found[1]
    return uid, gid


def _supplementary_gids(rootfs: str, userstr: str) -> list[int]:
    """Groups listing the user as a member, except the one named after it (containerd's rule)."""
    if userstr.isascii() and userstr.isdigit():
        uid = int(userstr)
        entry = next((u for u in _passwd(rootfs) if u[1] == uid), None)
        if entry is None:
            return []
        name = entry[0]
    else:
        name = userstr
    return [gid for gname, gid, members in _groups(rootfs) if gname != name and name in members]


def _passwd(rootfs: str) -> list[tuple[str, int, int]]:
    """(name, uid, gid) of each well-formed line of the rootfs's /etc/passwd; [] if absent."""
    data = read_rootfs_file(rootfs, "/etc/passwd")
    users = []
    for fields in _lines(data):
        if len(fields) < 4 or not fields[0]:
            continue
        uid, gid = _number(fields[2]), _number(fields[3])
        if uid is not None and gid is not None:
            users.append((fields[0], uid, gid))
    return users


def _groups(rootfs: str) -> list[tuple[str, int, list[str]]]:
    """(name, gid, members) of each well-formed line of the rootfs's /etc/group; [] if absent."""
    data = read_rootfs_file(rootfs, "/etc/group")
    groups = []
    for fields in _lines(data):
        if len(fields) < 3 or not fields[0]:
            continue
        gid = _number(fields[2])
        if gid is None:
            continue
        members = [m.strip() for m in fields[3].split(",")] if len(fields) > 3 else []
        groups.append((fields[0], gid, [m for m in members if m]))
    return groups


def _lines(data: bytes | None) -> Iterable[list[str]]:
    if not data:
        return
    for line in data.decode("utf-8", "surrogateescape").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            yield line.split(":")


def _number(text: str) -> int | None:
    text = text.strip()
    if not (text.isascii() and text.isdigit()):
        return None
    value = int(text)
    return value if value <= MAX_ID else None


# ---------------------------------------------------------------------------------------------
# Reading a file inside an untrusted root filesystem

_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_IN_ROOT = 0x10
# openat2 has the same number wherever the unified syscall table is used; elsewhere (alpha,
# mips, ia64) the component-wise walk is used instead of guessing.
_OPENAT2_MACHINES = frozenset({"x86_64", "amd64", "aarch64", "arm64", "i386", "i686", "armv7l",
                               "armv6l", "armv8l", "ppc64le", "ppc64", "s390x", "riscv64",
                               "loongarch64"})
_SYS_OPENAT2 = 437


class _Openat2:
    """openat2(2) through libc's syscall(); `available` turns False once the kernel says no.
    ctypes is loaded at the first call, not at import: a spec made without a root filesystem
    never needs it, and importing it costs milliseconds of a CLI command's start-up."""

    def __init__(self) -> None:
        self.available = os.uname().machine in _OPENAT2_MACHINES     # platform.machine(), without platform
        self._loaded = None

    def _load(self) -> tuple:
        import ctypes

        class OpenHow(ctypes.Structure):
            _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]
        try:
            syscall = ctypes.CDLL(None, use_errno=True).syscall
        except (OSError, AttributeError):
            self.available = False
            raise _Unsupported() from None
        syscall.restype = ctypes.c_long
        self._loaded = (ctypes, OpenHow, syscall)
        return self._loaded

    def __call__(self, dirfd: int, path: str, flags: int, resolve: int) -> int:
        ctypes, OpenHow, syscall = self._loaded or self._load()
        how = OpenHow(flags, 0, resolve)
        for _ in range(16):     # EAGAIN: a concurrent rename raced the in-root resolution
            fd = syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dirfd),
                         ctypes.c_char_p(os.fsencode(path)), ctypes.byref(how),
                         ctypes.c_size_t(ctypes.sizeof(how)))
            if fd >= 0:
                return fd
            err = ctypes.get_errno()
            if err in (errno.ENOSYS, errno.EPERM):
                # Not in this kernel, or refused by a seccomp filter: walk instead from now on.
                self.available = False
                raise _Unsupported()
            if err != errno.EAGAIN:
                raise OSError(err, os.strerror(err), path)
        raise OSError(errno.EAGAIN, os.strerror(errno.EAGAIN), path)


class _Unsupported(Exception):
    pass


_openat2 = _Openat2()


def read_rootfs_file(rootfs: str, path: str, limit: int = MAX_ID_FILE) -> bytes | None:
    """The bytes of regular file `path` inside `rootfs` (resolved as if rootfs were "/"), or
    None when it does not exist. Symlinks never lead out of rootfs; the file itself may not be a
    symlink, and must be a regular file of at most `limit` bytes, else InvalidArgument."""
    parts = [p for p in path.split("/") if p and p != "."]
    if not parts or ".." in parts or "\0" in path:
        raise InvalidArgument(f"bad path {path!r:.100} inside the root filesystem")
    try:
        rootfd = os.open(rootfs, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        raise FailedPrecondition(f"root filesystem {rootfs!r}: {e.strerror}") from None
    try:
        fd = _open_path_in_root(rootfd, parts, path)
        if fd is None:
            return None
        try:
            return _read_regular(fd, path, limit)
        finally:
            os.close(fd)
    finally:
        os.close(rootfd)


def _open_path_in_root(rootfd: int, parts: list[str], path: str) -> int | None:
    """An O_PATH descriptor for `parts` under rootfd, the last component not followed."""
    if _openat2.available:
        try:
            return _openat2(rootfd, "/".join(parts), os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC,
                            _RESOLVE_IN_ROOT | _RESOLVE_NO_MAGICLINKS)
        except _Unsupported:
            pass
        except OSError as e:
            return _missing_or_raise(e, path)
    return _walk(rootfd, parts, path)


def _walk(rootfd: int, parts: list[str], path: str) -> int | None:
    """Without openat2: one component at a time, O_NOFOLLOW, so no symlink is followed at all
    (stricter than RESOLVE_IN_ROOT, which follows symlinks that stay inside)."""
    dirfd = rootfd
    try:
        for i, name in enumerate(parts):
            last = i == len(parts) - 1
            flags = os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC | (0 if last else os.O_DIRECTORY)
            try:
                fd = os.open(name, flags, dir_fd=dirfd)
            except OSError as e:
                if e.errno == errno.ENOTDIR and not last:
                    try:
                        st = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
                    except OSError:
                        return None
                    if stat.S_ISLNK(st.st_mode):
                        raise InvalidArgument(
                            f"{path}: /{'/'.join(parts[:i + 1])} in the image is a symbolic link, "
                            "which is not followed here") from None
                    return None
                return _missing_or_raise(e, path)
            if dirfd != rootfd:
                os.close(dirfd)
            dirfd = fd
        fd, dirfd = dirfd, rootfd
        return fd
    finally:
        if dirfd != rootfd:
            os.close(dirfd)


def _missing_or_raise(e: OSError, path: str) -> None:
    if e.errno in (errno.ENOENT, errno.ENOTDIR):
        return None
    if e.errno == errno.ELOOP:
        raise InvalidArgument(f"{path} in the image: too many levels of symbolic links") from None
    raise InvalidArgument(f"{path} in the image cannot be opened: {e.strerror}") from None


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return name
    return "not a regular file"


def _read_regular(pathfd: int, path: str, limit: int) -> bytes:
    st = os.fstat(pathfd)
    if not stat.S_ISREG(st.st_mode):
        raise InvalidArgument(f"{path} in the image is {_kind(st.st_mode)}, not a regular file")
    if st.st_size > limit:
        raise InvalidArgument(f"{path} in the image is {st.st_size} bytes, more than {limit}")
    # Reopen the very inode the O_PATH descriptor holds: nothing but this regular file is ever
    # opened for reading, whatever is renamed in meanwhile.
    flags = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    try:
        fd = os.open(f"/proc/self/fd/{pathfd}", flags)
    except FileNotFoundError:
        raise FailedPrecondition("reading files in a root filesystem needs /proc mounted") from None
    try:
        again = os.fstat(fd)
        if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino) or not stat.S_ISREG(again.st_mode):
            raise InvalidArgument(f"{path} in the image changed while it was read")
        chunks, total = [], 0
        while True:
            chunk = os.read(fd, min(1 << 16, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
            if total > limit:
                raise InvalidArgument(f"{path} in the image is more than {limit} bytes")
        return b"".join(chunks)
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Options: mounts and namespaces

def parse_mount(text: str) -> dict:
    """An OCI mount from ctr's `--mount` syntax: "type=bind,src=/a,dst=/b,options=rbind:ro".

    Keys: type, source|src, destination|dst, options (colon-separated); fields are CSV, so a
    value with a comma can be quoted. A bind mount without a bind option gets "rbind", since a
    "bind" type alone is no mount to the kernel.
    """
    if not isinstance(text, str) or not text or "\n" in text or "\r" in text or "\0" in text:
        raise InvalidArgument(f"invalid mount specification {text!r:.200}")
    import csv
    try:
        fields = next(csv.reader([text]))
    except (csv.Error, StopIteration) as e:
        raise InvalidArgument(f"invalid mount specification {text!r:.200}: {e}") from None
    mount: dict = {}
    for field in fields:
        key, sep, value = field.partition("=")
        if not sep:
            raise InvalidArgument(f"invalid mount specification {text!r:.200}: expected key=value")
        if key == "type":
            mount["type"] = value
        elif key in ("source", "src"):
            mount["source"] = value
        elif key in ("destination", "dst"):
            mount["destination"] = value
        elif key == "options":
            mount["options"] = [o for o in value.split(":") if o]
        else:
            raise InvalidArgument(f"mount option {key!r:.50} not supported")
    if "destination" not in mount:
        raise InvalidArgument(f"mount {text!r:.200} has no destination")
    mount.setdefault("options", [])
    if mount.get("type") == "bind" and not {"bind", "rbind"} & set(mount["options"]):
        mount["options"].insert(0, "rbind")
    return _check_mount(mount)


def with_mounts(mounts: Iterable[Mapping]) -> SpecOpt:
    """Append OCI mounts (dicts with destination, type, source, options), in order."""
    if isinstance(mounts, Mapping):
        raise InvalidArgument("with_mounts takes a list of mounts")
    copies = []
    for m in mounts:
        if not isinstance(m, Mapping):
            raise InvalidArgument(f"mount {m!r:.200} is not a map")
        copy = {k: list(v) if isinstance(v, (list, tuple)) else v for k, v in m.items()}
        copies.append(_check_mount(copy))

    def apply(spec: dict) -> None:
        spec.setdefault("mounts", []).extend(
            {k: list(v) if isinstance(v, list) else v for k, v in m.items()} for m in copies)
    return apply


def with_host_namespace(ns: str) -> SpecOpt:
    """Share the host's `ns` namespace (pid, ipc, uts, network, ...) instead of a new one.

    "network" also bind-mounts the host's /etc/resolv.conf and /etc/hosts read-only, as
    `ctr run --net-host` does; "uts" drops the hostname, which only a private UTS namespace can
    have. The mount namespace cannot be shared: the runtime builds the rootfs inside its own.
    """
    if not isinstance(ns, str) or ns not in NAMESPACE_TYPES:
        raise InvalidArgument(f"unknown namespace {ns!r:.50}; known: {', '.join(sorted(NAMESPACE_TYPES))}")
    if ns == "mount":
        raise InvalidArgument("the container cannot share the host's mount namespace")

    def apply(spec: dict) -> None:
        linux = spec.setdefault("linux", {})
        linux["namespaces"] = [n for n in linux.get("namespaces") or [] if n.get("type") != ns]
        if ns == "uts":
            spec.pop("hostname", None)
        if ns == "network":
            mounts = spec.setdefault("mounts", [])
            taken = {m.get("destination") for m in mounts}
            for path in ("/etc/hosts", "/etc/resolv.conf"):
                if path not in taken:
                    mounts.append({"destination": path, "type": "bind", "source": path,
                                   "options": ["rbind", "ro"]})
    return apply


def with_hostname(name: str) -> SpecOpt:
    if not isinstance(name, str) or not name or len(name.encode()) > MAX_HOSTNAME or "\0" in name:
        raise InvalidArgument(f"hostname {name!r:.100} must be 1 to {MAX_HOSTNAME} bytes")

    def apply(spec: dict) -> None:
        spec["hostname"] = name
    return apply


# ---------------------------------------------------------------------------------------------
# Options: root and resources

def with_readonly_rootfs() -> SpecOpt:
    def apply(spec: dict) -> None:
        spec.setdefault("root", {"path": "rootfs"})["readonly"] = True
    return apply


def with_memory_limit(limit: int) -> SpecOpt:
    """memory.max in bytes (linux.resources.memory.limit)."""
    if isinstance(limit, bool) or not isinstance(limit, int) or not 0 < limit <= 2**63 - 1:
        raise InvalidArgument(f"memory limit {limit!r:.50} must be a positive number of bytes")

    def apply(spec: dict) -> None:
        resources = spec.setdefault("linux", {}).setdefault("resources", {})
        resources.setdefault("memory", {})["limit"] = limit
    return apply


def with_cpus(cpus: float) -> SpecOpt:
    """A CPU quota of `cpus` CPUs over a 100 ms period, as `ctr run --cpus`."""
    if isinstance(cpus, bool) or not isinstance(cpus, (int, float)) or not math.isfinite(cpus):
        raise InvalidArgument(f"cpus {cpus!r:.50} must be a number")
    quota = int(cpus * CPU_PERIOD)
    if quota < MIN_CPU_QUOTA:
        raise InvalidArgument(f"cpus {cpus} is below the smallest quota, {MIN_CPU_QUOTA / CPU_PERIOD}")

    def apply(spec: dict) -> None:
        resources = spec.setdefault("linux", {}).setdefault("resources", {})
        cpu = resources.setdefault("cpu", {})
        cpu["quota"] = quota
        cpu["period"] = CPU_PERIOD
    return apply


def with_cgroups_path(path: str) -> SpecOpt:
    """The container's cgroup: a path under the cgroupfs root, or "slice:prefix:name" (systemd)."""
    if not isinstance(path, str) or not path or "\0" in path:
        raise InvalidArgument(f"cgroups path {path!r:.100} must be a non-empty string")
    if ".." in path.replace(":", "/").split("/"):
        raise InvalidArgument(f"cgroups path {path!r:.100} contains '..'")

    def apply(spec: dict) -> None:
        spec.setdefault("linux", {})["cgroupsPath"] = path
    return apply


def with_annotations(annotations: Mapping[str, str]) -> SpecOpt:
    """Add or replace annotations."""
    if not isinstance(annotations, Mapping) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in annotations.items()):
        raise InvalidArgument("annotations must map strings to strings")
    items = dict(annotations)

    def apply(spec: dict) -> None:
        spec.setdefault("annotations", {}).update(items)
    return apply
