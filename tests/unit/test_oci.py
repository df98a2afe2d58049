"""OCI spec generation: containerd's defaults, each option, composition, and user resolution in
hostile root filesystems."""
import builtins
import json
import os

import pytest

from berth import oci
from berth.oci import (SpecContext, compose, default_spec, generate, parse_mount, read_rootfs_file,
                       resolve_user, validate, with_annotations, with_cgroups_path, with_cpus,
                       with_cwd, with_env, with_host_namespace, with_hostname, with_image_config,
                       with_memory_limit, with_mounts, with_new_privileges, with_process_args,
                       with_readonly_rootfs, with_rlimit, with_tty, with_user)
from bus.errors import FailedPrecondition, InvalidArgument, NotFound

# What containerd's populateDefaultUnixSpec, defaultMounts and WithDefaultUnixDevices set, written
# down from their behaviour, to compare against.
CONTAINERD_CAPS = {
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
}
CONTAINERD_NAMESPACES = ["pid", "ipc", "uts", "mount", "network"]
CONTAINERD_MASKED = {
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
    "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi",
}
CONTAINERD_READONLY = {"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"}
CONTAINERD_MOUNTS = {
    "/proc": ("proc", "proc", ["nosuid", "noexec", "nodev"]),
    "/dev": ("tmpfs", "tmpfs", ["nosuid", "strictatime", "mode=755", "size=65536k"]),
    "/dev/pts": ("devpts", "devpts",
                 ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]),
    "/dev/shm": ("tmpfs", "shm", ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]),
    "/dev/mqueue": ("mqueue", "mqueue", ["nosuid", "noexec", "nodev"]),
    "/sys": ("sysfs", "sysfs", ["nosuid", "noexec", "nodev", "ro"]),
    "/run": ("tmpfs", "tmpfs", ["nosuid", "strictatime", "mode=755", "size=65536k"]),
}
CONTAINERD_DEVICES = {("c", 1, 3), ("c", 1, 8), ("c", 1, 7), ("c", 5, 0), ("c", 1, 5), ("c", 1, 9),
                      ("c", 5, 1), ("c", 136, None), ("c", 5, 2)}
DEFAULT_PATH = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

PASSWD = """\
root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/usr/sbin/nologin
# a comment, and a malformed line follow
broken:x:notanumber:5::/:/bin/sh
bob:x:1000:1000:Bob:/home/bob:/bin/sh
alice:x:1001:100::/home/alice:/bin/sh
"""
GROUP = """\
root:x:0:
daemon:x:1:
users:x:100:
bob:x:1000:bob
wheel:x:10:root,bob
audio:x:29: alice , bob
staff:x:50:alice
"""


def gen(*opts, **kw):
    return generate("default", "c1", *opts, **kw)


def cmd(*args):
    return with_process_args(*(args or ("sh",)))


@pytest.fixture
def rootfs(tmp_path):
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    return root


@pytest.fixture(params=["openat2", "walk"])
def resolver(request, monkeypatch):
    """Run a test with openat2 (RESOLVE_IN_ROOT) and with the component-wise fallback."""
    if request.param == "openat2" and not oci._openat2.available:
        pytest.skip("openat2 is not available here")
    if request.param == "walk":
        monkeypatch.setattr(oci._openat2, "available", False)
    return request.param


# --- defaults ---------------------------------------------------------------------------------

def test_defaults_match_containerd():
    s = default_spec("default", "c1")
    assert s["ociVersion"] == "1.1.0"
    p = s["process"]
    assert p["terminal"] is False
    assert p["user"] == {"uid": 0, "gid": 0}
    assert p["args"] == []
    assert p["env"] == [DEFAULT_PATH]
    assert p["cwd"] == "/"
    assert p["noNewPrivileges"] is True
    caps = p["capabilities"]
    assert set(caps) == {"bounding", "effective", "permitted"}
    for kind in ("bounding", "effective", "permitted"):
        assert set(caps[kind]) == CONTAINERD_CAPS and len(caps[kind]) == len(CONTAINERD_CAPS)
    assert p["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}]
    assert s["root"] == {"path": "rootfs", "readonly": False}
    assert s["hostname"] == "c1"
    mounts = {m["destination"]: (m["type"], m["source"], m["options"]) for m in s["mounts"]}
    assert mounts == CONTAINERD_MOUNTS
    assert [m["destination"] for m in s["mounts"]][:2] == ["/proc", "/dev"]
    linux = s["linux"]
    assert [n["type"] for n in linux["namespaces"]] == CONTAINERD_NAMESPACES
    assert all(set(n) == {"type"} for n in linux["namespaces"])      # new, not joined
    assert set(linux["maskedPaths"]) == CONTAINERD_MASKED
    assert set(linux["readonlyPaths"]) == CONTAINERD_READONLY
    assert linux["cgroupsPath"] == "/default/c1"
    devices = linux["resources"]["devices"]
    assert devices[0] == {"allow": False, "access": "rwm"}
    assert all(d["allow"] and d["access"] == "rwm" for d in devices[1:])
    assert {(d["type"], d["major"], d.get("minor")) for d in devices[1:]} == CONTAINERD_DEVICES


def test_default_spec_is_fresh_each_time():
    a = default_spec("default", "c1")
    a["process"]["capabilities"]["bounding"].clear()
    a["mounts"][0]["options"].append("x")
    b = default_spec("default", "c1")
    assert len(b["process"]["capabilities"]["bounding"]) == 14
    assert "x" not in b["mounts"][0]["options"]


@pytest.mark.parametrize("ns,cid", [("../x", "c1"), ("default", "a/b"), ("", "c1"), ("default", "")])
def test_default_spec_rejects_bad_identifiers(ns, cid):
    with pytest.raises(InvalidArgument):
        default_spec(ns, cid)


def test_long_container_id_gives_kernel_sized_hostname():
    cid = "a" * 63 + "-" + "b" * 12
    s = generate("default", cid, cmd())
    assert s["hostname"] == "a" * 63
    assert s["linux"]["cgroupsPath"] == f"/default/{cid}"


def test_generated_spec_is_plain_json():
    s = gen(with_image_config({"config": {"Cmd": ["sh"], "Env": ["A=1"]}}), with_tty(),
            with_mounts([parse_mount("type=bind,src=/a,dst=/b,options=rbind:ro")]),
            with_host_namespace("network"), with_memory_limit(1 << 26), with_cpus(1.5),
            with_rlimit("nofile", 10, 20), with_annotations({"a": "b"}))
    assert json.loads(json.dumps(s, allow_nan=False)) == s


# --- validation -------------------------------------------------------------------------------

def test_no_command_is_invalid():
    with pytest.raises(InvalidArgument, match="no command specified"):
        gen()
    with pytest.raises(InvalidArgument, match="no command specified"):
        gen(with_image_config({"config": {}}))
    with pytest.raises(InvalidArgument, match="no command specified"):
        gen(with_process_args(""))


def test_relative_cwd_is_invalid():
    with pytest.raises(InvalidArgument, match="absolute"):
        gen(cmd(), with_image_config({"config": {"Cmd": ["sh"], "WorkingDir": "app"}}))
    with pytest.raises(InvalidArgument):
        with_cwd("relative")


@pytest.mark.parametrize("dst", ["relative", "/a/../../etc", "/..", "", "/a\0b"])
def test_bad_mount_destinations(dst):
    with pytest.raises(InvalidArgument):
        with_mounts([{"destination": dst, "type": "bind", "source": "/x"}])
    with pytest.raises(InvalidArgument):
        gen(cmd(), lambda s: s["mounts"].append({"destination": dst, "type": "tmpfs"}))


def test_validate_catches_what_custom_options_break():
    with pytest.raises(InvalidArgument, match="plain JSON"):
        gen(cmd(), lambda s: s.__setitem__("annotations", {"a": ("tuple",)}))
    with pytest.raises(InvalidArgument):
        gen(cmd(), lambda s: s["process"]["env"].append("NOEQUALS"))
    with pytest.raises(InvalidArgument):
        gen(cmd(), lambda s: s["process"]["user"].__setitem__("uid", -1))
    with pytest.raises(InvalidArgument, match="twice"):
        gen(cmd(), lambda s: s["linux"]["namespaces"].append({"type": "pid"}))
    assert validate(gen(cmd())) is not None


def test_non_callable_option():
    with pytest.raises(InvalidArgument):
        gen("not an option")


# --- options ----------------------------------------------------------------------------------

def test_with_process_args():
    assert gen(with_process_args("redis-server", "--port", "6380"))["process"]["args"] == \
        ["redis-server", "--port", "6380"]
    with pytest.raises(InvalidArgument):
        with_process_args(["a", "b"])


def test_with_env_replaces_appends_and_unsets():
    s = gen(cmd(), with_env(["A=1", "B=2"]), with_env(["A=3", "C=4", "B"]))
    assert s["process"]["env"] == [DEFAULT_PATH, "A=3", "C=4"]
    s = gen(cmd(), with_env({"PATH": "/bin", "X": "y=z"}), with_env({"X": None}))
    assert s["process"]["env"] == ["PATH=/bin"]


@pytest.mark.parametrize("bad", [["=x"], [""], [5], "A=1", {"A=B": "c"}, {"A": 1}, ["A=\0"]])
def test_with_env_rejects(bad):
    with pytest.raises(InvalidArgument):
        with_env(bad)


def test_with_image_config():
    config = {"architecture": "amd64", "os": "linux", "config": {
        "Entrypoint": ["/entry.sh"], "Cmd": ["serve", "--port=80"],
        "Env": ["PATH=/opt/bin:/bin", "LANG=C.UTF-8", "BROKEN", "=nokey"],
        "WorkingDir": "/srv", "User": ""}}
    s = gen(with_image_config(config))
    p = s["process"]
    assert p["args"] == ["/entry.sh", "serve", "--port=80"]
    assert p["env"] == ["PATH=/opt/bin:/bin", "LANG=C.UTF-8"]     # bad entries dropped
    assert p["cwd"] == "/srv"
    assert p["user"] == {"uid": 0, "gid": 0, "additionalGids": [0]}


def test_with_image_config_accepts_inner_config_bytes_and_context():
    inner = {"Cmd": ["true"], "Env": ["A=1"]}
    for form in (inner, {"config": inner}, json.dumps({"config": inner}).encode()):
        p = gen(with_image_config(form))["process"]
        assert p["args"] == ["true"]
        assert p["env"] == [DEFAULT_PATH, "A=1"]                    # PATH added when missing
        assert p["cwd"] == "/"
    assert gen(with_image_config(), image_config={"config": inner})["process"]["args"] == ["true"]
    with pytest.raises(InvalidArgument):
        gen(with_image_config())


def test_with_image_config_args_replace_cmd_keep_entrypoint():
    cfg = {"config": {"Entrypoint": ["tini", "--"], "Cmd": ["serve"]}}
    assert gen(with_image_config(cfg, args=["sh"]))["process"]["args"] == ["tini", "--", "sh"]
    # with_process_args replaces everything, entrypoint included (containerd's WithProcessArgs)
    assert gen(with_image_config(cfg), with_process_args("sh"))["process"]["args"] == ["sh"]


@pytest.mark.parametrize("bad", [
    {"config": {"Cmd": "sh -c true"}}, {"config": {"Env": "A=1"}}, {"config": {"Cmd": [1]}},
    {"config": {"WorkingDir": 5}}, {"config": {"User": 0}}, {"config": []}, [], b"{not json",
])
def test_with_image_config_rejects_malformed(bad):
    with pytest.raises(InvalidArgument):
        gen(with_image_config(bad), cmd())


def test_image_env_sits_under_earlier_options():
    s = gen(with_env(["A=mine", "B=mine"]),
            with_image_config({"config": {"Cmd": ["sh"], "Env": ["PATH=/img", "A=image"]}}))
    assert s["process"]["env"] == ["PATH=/img", "A=mine", "B=mine"]


def test_hostile_workdir_is_only_a_string(rootfs, monkeypatch):
    """WORKDIR /proc/self/fd/7 is for the runtime to resolve in the container; berth opens,
    stats or enters nothing by that name on the host."""
    seen = []
    for mod, name in ((os, "open"), (os, "stat"), (os, "lstat"), (os, "chdir"), (os, "listdir"),
                      (builtins, "open")):
        real = getattr(mod, name)

        def spy(path, *a, _real=real, **kw):
            seen.append(str(path))
            return _real(path, *a, **kw)
        monkeypatch.setattr(mod, name, spy)
    s = gen(with_image_config({"config": {"Cmd": ["sh"], "WorkingDir": "/proc/self/fd/7",
                                          "User": "bob"}}), rootfs=str(rootfs))
    monkeypatch.undo()
    assert s["process"]["cwd"] == "/proc/self/fd/7"
    assert not any("fd/7" in p for p in seen)


def test_with_mounts_and_parse_mount():
    m = parse_mount("type=bind,src=/a,dst=/b,options=rbind:ro")
    assert m == {"type": "bind", "source": "/a", "destination": "/b", "options": ["rbind", "ro"]}
    s = gen(cmd(), with_mounts([m, {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"}]))
    assert s["mounts"][-2:] == [m, {"destination": "/tmp", "type": "tmpfs", "source": "tmpfs"}]
    m["options"].append("mutated")                       # the option holds its own copy
    assert "mutated" not in s["mounts"][-2]["options"]


@pytest.mark.parametrize("text,expected", [
    ("type=bind,source=/a,destination=/b", {"type": "bind", "source": "/a", "destination": "/b",
                                            "options": ["rbind"]}),
    ("type=tmpfs,dst=/t,options=size=10m:mode=1777", {"type": "tmpfs", "destination": "/t",
                                                      "options": ["size=10m", "mode=1777"]}),
    ('type=bind,"src=/a,b",dst=/c,options=bind', {"type": "bind", "source": "/a,b",
                                                  "destination": "/c", "options": ["bind"]}),
    ("dst=/only", {"destination": "/only", "options": []}),
])
def test_parse_mount(text, expected):
    assert parse_mount(text) == expected


@pytest.mark.parametrize("text", ["", "type=bind,src=/a", "type=bind,dst=/b,bogus=1", "dst",
                                  "dst=relative", "dst=/a/../b", "dst=/a\nb", "dst=/a\0"])
def test_parse_mount_rejects(text):
    with pytest.raises(InvalidArgument):
        parse_mount(text)


def test_with_host_namespace():
    s = gen(cmd(), with_host_namespace("pid"))
    assert [n["type"] for n in s["linux"]["namespaces"]] == ["ipc", "uts", "mount", "network"]
    s = gen(cmd(), with_host_namespace("network"), with_host_namespace("network"))
    assert "network" not in [n["type"] for n in s["linux"]["namespaces"]]
    binds = [m for m in s["mounts"] if m["destination"] in ("/etc/hosts", "/etc/resolv.conf")]
    assert sorted(m["destination"] for m in binds) == ["/etc/hosts", "/etc/resolv.conf"]
    for m in binds:
        assert m["type"] == "bind" and m["source"] == m["destination"]
        assert m["options"] == ["rbind", "ro"]
    s = gen(cmd(), with_host_namespace("uts"))
    assert "hostname" not in s
    with pytest.raises(InvalidArgument, match="UTS"):
        gen(cmd(), with_host_namespace("uts"), with_hostname("x"))
    for bad in ("mount", "net", "bogus", None):
        with pytest.raises(InvalidArgument):
            with_host_namespace(bad)


def test_with_tty():
    s = gen(cmd(), with_tty())
    assert s["process"]["terminal"] is True
    assert "TERM=xterm" in s["process"]["env"]
    s = gen(cmd(), with_env(["TERM=vt100"]), with_tty())
    assert [e for e in s["process"]["env"] if e.startswith("TERM=")] == ["TERM=vt100"]


def test_resources():
    s = gen(cmd(), with_memory_limit(256 << 20), with_cpus(1.5))
    r = s["linux"]["resources"]
    assert r["memory"] == {"limit": 256 << 20}
    assert r["cpu"] == {"quota": 150_000, "period": 100_000}
    assert r["devices"][0] == {"allow": False, "access": "rwm"}
    for bad in (0, -1, 1.5, True, "1g"):
        with pytest.raises(InvalidArgument):
            with_memory_limit(bad)
    for bad in (0, 0.001, -1, float("nan"), float("inf"), "2"):
        with pytest.raises(InvalidArgument):
            with_cpus(bad)


def test_root_cwd_hostname_cgroups_annotations_privileges():
    s = gen(cmd(), with_readonly_rootfs(), with_cwd("/work"), with_hostname("box"),
            with_cgroups_path("/custom/c1"), with_annotations({"a": "1"}), with_annotations({"b": "2"}),
            with_new_privileges())
    assert s["root"] == {"path": "rootfs", "readonly": True}
    assert s["process"]["cwd"] == "/work"
    assert s["hostname"] == "box"
    assert s["linux"]["cgroupsPath"] == "/custom/c1"
    assert s["annotations"] == {"a": "1", "b": "2"}
    assert s["process"]["noNewPrivileges"] is False
    for bad in ("", "x" * 65, None):
        with pytest.raises(InvalidArgument):
            with_hostname(bad)
    for bad in ("", "/a/../b", None):
        with pytest.raises(InvalidArgument):
            with_cgroups_path(bad)
    with pytest.raises(InvalidArgument):
        with_annotations({"a": 1})


def test_with_rlimit():
    s = gen(cmd(), with_rlimit("RLIMIT_NOFILE", 4096, 8192), with_rlimit("nproc", 100))
    assert s["process"]["rlimits"] == [{"type": "RLIMIT_NOFILE", "hard": 8192, "soft": 4096},
                                       {"type": "RLIMIT_NPROC", "hard": 100, "soft": 100}]
    for args in (("bogus", 1), ("nofile", 10, 5), ("nofile", -1), ("nofile", 2**64)):
        with pytest.raises(InvalidArgument):
            with_rlimit(*args)


# --- composition ------------------------------------------------------------------------------

def test_later_options_override_earlier():
    s = gen(with_process_args("a"), with_cwd("/one"), with_hostname("h1"),
            with_process_args("b"), with_cwd("/two"), with_hostname("h2"), with_memory_limit(1),
            with_memory_limit(2))
    assert s["process"]["args"] == ["b"]
    assert s["process"]["cwd"] == "/two"
    assert s["hostname"] == "h2"
    assert s["linux"]["resources"]["memory"]["limit"] == 2
    img = with_image_config({"config": {"Cmd": ["image-cmd"], "WorkingDir": "/img"}})
    assert gen(img, with_process_args("x"))["process"]["args"] == ["x"]
    assert gen(with_process_args("x"), img)["process"]["args"] == ["image-cmd"]
    assert gen(with_cwd("/mine"), img)["process"]["cwd"] == "/img"


def test_compose_and_one_argument_options():
    def mine(spec):                         # the STYLE.md shape: no context needed
        spec["process"]["args"] = ["mine"]
    seen = []

    def needs_ctx(spec, ctx):
        seen.append(ctx)
    s = gen(compose(with_cwd("/x"), mine, needs_ctx), rootfs="/somewhere")
    assert s["process"]["args"] == ["mine"] and s["process"]["cwd"] == "/x"
    assert seen == [SpecContext("default", "c1", "/somewhere", None)]
    spec = default_spec("default", "c1")
    with_process_args("direct")(spec)       # options also apply to a bare spec
    assert spec["process"]["args"] == ["direct"]


def test_an_option_is_reusable():
    opt = with_mounts([{"destination": "/m", "type": "tmpfs", "options": ["a"]}])
    a = gen(cmd(), opt)
    a["mounts"][-1]["options"].append("b")
    assert gen(cmd(), opt)["mounts"][-1]["options"] == ["a"]


# --- users ------------------------------------------------------------------------------------

@pytest.mark.parametrize("user,uid,gid,gids", [
    ("root", 0, 0, [0, 10]),
    ("bob", 1000, 1000, [1000, 10, 29]),            # the group named bob is not supplementary
    ("alice", 1001, 100, [100, 29, 50]),            # member lists with spaces
    ("1000", 1000, 1000, [1000, 10, 29]),
    ("4242", 4242, 0, [0]),                         # unknown uid: gid 0, no error (containerd)
    ("bob:audio", 1000, 29, [29, 10]),
    ("bob:7", 1000, 7, [7, 10, 29]),
    ("1001:wheel", 1001, 10, [10, 29, 50]),
    ("1000:1000", 1000, 1000, [1000, 10, 29]),
    ("daemon", 1, 1, [1]),
])
def test_user_resolution(rootfs, resolver, user, uid, gid, gids):
    s = gen(cmd(), with_user(user), rootfs=str(rootfs))
    assert s["process"]["user"] == {"uid": uid, "gid": gid, "additionalGids": gids}
    assert resolve_user(str(rootfs), user) == (uid, gid, gids)


@pytest.mark.parametrize("user,error", [
    ("nobody", NotFound), ("bob:nogroup", NotFound), ("broken", NotFound),
    ("a:b:c", InvalidArgument), ("", InvalidArgument), (":5", InvalidArgument),
    ("5:", InvalidArgument), ("4294967295", InvalidArgument), (5, InvalidArgument),
])
def test_user_resolution_errors(rootfs, user, error):
    with pytest.raises(error):
        gen(cmd(), with_user(user), rootfs=str(rootfs))


def test_user_without_rootfs():
    s = gen(cmd(), with_user("1000:1000"))
    assert s["process"]["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [1000]}
    for user in ("bob", "1000", "bob:1", "1:wheel"):
        with pytest.raises(FailedPrecondition):
            gen(cmd(), with_user(user))
    with pytest.raises(FailedPrecondition):
        gen(cmd(), with_user("bob"), rootfs="/nonexistent/rootfs")


def test_user_without_passwd_or_group(tmp_path):
    root = tmp_path / "empty"
    root.mkdir()
    assert resolve_user(str(root), "1000") == (1000, 0, [0])
    with pytest.raises(NotFound):
        resolve_user(str(root), "bob")
    (root / "etc").mkdir()
    (root / "etc" / "passwd").write_text("bob:x:1000:1000::/:/bin/sh\n")
    assert resolve_user(str(root), "bob") == (1000, 1000, [1000])


def test_image_user_and_root_groups(rootfs):
    p = gen(with_image_config({"config": {"Cmd": ["sh"], "User": "bob"}}), rootfs=str(rootfs))
    assert p["process"]["user"] == {"uid": 1000, "gid": 1000, "additionalGids": [1000, 10, 29]}
    # no User: root's supplementary groups, as containerd's WithAdditionalGIDs("root")
    p = gen(with_image_config({"config": {"Cmd": ["sh"]}}), rootfs=str(rootfs))
    assert p["process"]["user"] == {"uid": 0, "gid": 0, "additionalGids": [0, 10]}
    # an explicit user after the image config wins
    p = gen(with_image_config({"config": {"Cmd": ["sh"], "User": "bob"}}), with_user("alice"),
            rootfs=str(rootfs))
    assert p["process"]["user"]["uid"] == 1001
    with pytest.raises(FailedPrecondition):
        gen(with_image_config({"config": {"Cmd": ["sh"], "User": "bob"}}))


def test_too_many_groups(tmp_path):
    root = tmp_path / "r"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text("u:x:1:1::/:/\n")
    (root / "etc" / "group").write_text("".join(f"g:x:{i + 10}:u\n" for i in range(65536)))
    with pytest.raises(InvalidArgument, match="groups"):
        resolve_user(str(root), "u")


# --- hostile root filesystems -----------------------------------------------------------------

def _hostile(root, kind):
    etc = root / "etc"
    target = etc / "passwd"
    target.unlink()
    if kind == "symlink-dev-zero":
        target.symlink_to("/dev/zero")
    elif kind == "symlink-host-passwd":
        target.symlink_to("/etc/passwd")
    elif kind == "symlink-dotdot":
        target.symlink_to("../../../../../../../../etc/passwd")
    elif kind == "fifo":
        os.mkfifo(target)
    elif kind == "directory":
        target.mkdir()
    elif kind == "huge-sparse":
        with open(target, "wb") as f:
            f.truncate(8 << 30)
    elif kind == "just-over-limit":
        target.write_bytes(b"#" * (oci.MAX_ID_FILE + 1))
    elif kind == "char-device":
        os.mknod(target, 0o600 | 0o020000, os.makedev(1, 5))
    elif kind == "socket":
        import socket
        s = socket.socket(socket.AF_UNIX)
        s.bind(str(target))
        s.close()


HOSTILE = ["symlink-dev-zero", "symlink-host-passwd", "symlink-dotdot", "fifo", "directory",
           "huge-sparse", "just-over-limit", "char-device", "socket"]


@pytest.mark.timeout(10)
@pytest.mark.parametrize("kind", HOSTILE)
def test_hostile_passwd_is_refused(rootfs, resolver, kind):
    if kind == "char-device" and os.geteuid() != 0:
        pytest.skip("mknod needs root")
    _hostile(rootfs, kind)
    for user in ("bob", "1000", "bob:wheel"):
        with pytest.raises(InvalidArgument, match="/etc/passwd"):
            gen(cmd(), with_user(user), rootfs=str(rootfs))
    # the image config path reads the same files
    with pytest.raises(InvalidArgument, match="/etc/passwd"):
        gen(with_image_config({"config": {"Cmd": ["sh"], "User": "1000"}}), rootfs=str(rootfs))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("kind", ["fifo", "symlink-dev-zero", "huge-sparse"])
def test_hostile_group_is_refused(rootfs, resolver, kind):
    (rootfs / "etc" / "group").unlink()
    (rootfs / "etc" / "group").symlink_to("/dev/zero") if kind == "symlink-dev-zero" else None
    if kind == "fifo":
        os.mkfifo(rootfs / "etc" / "group")
    if kind == "huge-sparse":
        with open(rootfs / "etc" / "group", "wb") as f:
            f.truncate(8 << 30)
    with pytest.raises(InvalidArgument, match="/etc/group"):
        gen(cmd(), with_user("bob"), rootfs=str(rootfs))
    with pytest.raises(InvalidArgument, match="/etc/group"):
        gen(with_image_config({"config": {"Cmd": ["sh"]}}), rootfs=str(rootfs))


@pytest.mark.timeout(10)
@pytest.mark.parametrize("link", ["absolute", "dotdot"])
def test_etc_symlinked_out_of_rootfs_never_reads_the_outside(tmp_path, resolver, link):
    outside = tmp_path / "outside" / "etc"
    outside.mkdir(parents=True)
    (outside / "passwd").write_text("marker:x:4242:4242::/:/bin/sh\n")
    root = tmp_path / "rootfs"
    root.mkdir()
    (root / "etc").symlink_to(str(outside) if link == "absolute" else "../../../../../../" + str(outside))
    if resolver == "openat2":
        # followed, but inside the rootfs, where there is no such directory
        assert read_rootfs_file(str(root), "/etc/passwd") is None
        with pytest.raises(NotFound):
            resolve_user(str(root), "marker")
    else:
        with pytest.raises(InvalidArgument, match="symbolic link"):
            resolve_user(str(root), "marker")


def test_symlinked_etc_inside_rootfs_is_followed_with_openat2(tmp_path):
    if not oci._openat2.available:
        pytest.skip("openat2 is not available here")
    root = tmp_path / "rootfs"
    (root / "real").mkdir(parents=True)
    (root / "real" / "passwd").write_text("bob:x:1000:1000::/:/bin/sh\n")
    (root / "etc").symlink_to("/real")
    assert resolve_user(str(root), "bob") == (1000, 1000, [1000])


def test_read_rootfs_file_paths(rootfs):
    assert read_rootfs_file(str(rootfs), "/etc/passwd") == PASSWD.encode()
    assert read_rootfs_file(str(rootfs), "/etc/shadow") is None
    assert read_rootfs_file(str(rootfs), "/etc/passwd/x") is None
    for bad in ("/etc/../../x", "", "/", "/a\0"):
        with pytest.raises(InvalidArgument):
            read_rootfs_file(str(rootfs), bad)
    with pytest.raises(InvalidArgument, match="more than"):
        read_rootfs_file(str(rootfs), "/etc/passwd", limit=10)


def test_rootfs_must_be_absolute():
    with pytest.raises(InvalidArgument):
        gen(cmd(), rootfs="relative/rootfs")
