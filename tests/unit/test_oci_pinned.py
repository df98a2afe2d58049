"""Whole specs pinned: the exact config.json `generate` makes for a few sets of options, so a
change anywhere in berth.oci (or in how it is loaded) that alters a single field shows here.

The expected specs are in oci_specs.json, next to this file; `cases()` is what produced them.
Also pinned: which options get the context, decided without inspect for plain functions.
"""
import json
import os

import pytest

from berth import oci

HERE = os.path.dirname(os.path.abspath(__file__))
PASSWD = "root:x:0:0:root:/root:/bin/sh\nbob:x:1000:1000:Bob:/home/bob:/bin/sh\n"
GROUP = "root:x:0:\nusers:x:100:bob\nbob:x:1000:\nwheel:x:10:root,bob\n"
IMAGE_CONFIG = {
    "architecture": "amd64", "os": "linux",
    "config": {"Env": ["PATH=/usr/bin:/bin", "HOME=/root", "BARE"], "Entrypoint": ["/bin/entry"],
               "Cmd": ["serve", "--port", "80"], "WorkingDir": "/srv", "User": ""},
    "rootfs": {"type": "layers", "diff_ids": []},
}


def cases(rootfs: str) -> dict[str, dict]:
    """The specs pinned, by name: as `berth run` builds them, and with the other options."""
    with_bob = json.loads(json.dumps(IMAGE_CONFIG))
    with_bob["config"]["User"] = "bob"

    def one_argument(spec):
        spec["process"]["env"].append("ONE=1")

    def with_context(spec, ctx):
        spec["annotations"]["ctx"] = f"{ctx.namespace}/{ctx.container_id}"

    return {
        "default": oci.generate("default", "c1", oci.with_process_args("sh")),
        "run_options": oci.generate(
            "builds", "web.1", oci.with_image_config(IMAGE_CONFIG, args=["sh", "-c", "true"]),
            oci.with_env(["A=1", "HOME=/home/x"]),
            oci.with_mounts([oci.parse_mount('type=bind,src=/srv/data,dst=/data,options=ro'),
                             oci.parse_mount('type=tmpfs,"dst=/a,b",options=size=1m:mode=0755')]),
            oci.with_host_namespace("network"), oci.with_memory_limit(64 << 20), oci.with_cpus(1.5),
            oci.with_cwd("/work"), oci.with_user("1000:1000"), oci.with_readonly_rootfs(),
            oci.with_hostname("host-1"), oci.with_tty(),
            rootfs=rootfs, image_config=IMAGE_CONFIG),
        "image_user": oci.generate(
            "default", "c2", oci.with_image_config(), oci.with_env({"X": "1", "HOME": None}),
            oci.compose(oci.with_rlimit("RLIMIT_NPROC", 100, 200), oci.with_new_privileges()),
            oci.with_host_namespace("pid"), oci.with_cgroups_path("/custom/c2"),
            oci.with_annotations({"k": "v"}), one_argument, with_context,
            rootfs=rootfs, image_config=json.dumps(with_bob)),
        "root_groups": oci.generate("default", "c3", oci.with_image_config(IMAGE_CONFIG), rootfs=rootfs),
    }


@pytest.fixture
def rootfs(tmp_path):
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "passwd").write_text(PASSWD)
    (root / "etc" / "group").write_text(GROUP)
    return str(root)


@pytest.mark.parametrize("name", ["default", "run_options", "image_user", "root_groups"])
def test_spec_is_exactly_as_pinned(rootfs, name):
    with open(os.path.join(HERE, "oci_specs.json")) as f:
        expected = json.load(f)[name]
    got = cases(rootfs)[name]
    assert got == expected
    assert json.dumps(got) == json.dumps(expected)     # key order too: config.json is written as is


def _by_signature(opt) -> bool:
    """What decides whether an option gets the context, as inspect.signature reads it."""
    import inspect
    params = inspect.signature(opt).parameters.values()
    return any(p.kind is p.VAR_POSITIONAL for p in params) or \
        sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) >= 2


def test_which_options_get_the_context():
    import functools

    def one(spec): pass
    def two(spec, ctx): pass
    def two_default(spec, ctx=None): pass
    def star(*a): pass
    def positional_only(spec, ctx, /): pass
    def keyword_ctx(spec, *, ctx=None): pass

    @functools.wraps(one)
    def wraps_one(spec, ctx): pass

    class Callable:
        def __call__(self, spec, ctx): pass

    class Method:
        def apply(self, spec): pass

    options = [one, two, two_default, star, positional_only, keyword_ctx, wraps_one, Callable(),
               Method().apply, functools.partial(two, {}), lambda spec: None, oci.with_tty(),
               oci.with_user("0:0"), oci.with_image_config({})]
    got = [oci._takes_context(opt) for opt in options]
    assert got == [_by_signature(opt) for opt in options]
    assert got == [False, True, True, True, True, False, False, True, False, False, False, False, True, True]
