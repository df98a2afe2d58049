"""Checkpoints into the content store and restores from them, through a real berthd.

CRIU itself works only where `criu check` passes; elsewhere the full round trip is skipped with
that reason, and what must hold anyway is checked: a failed checkpoint leaves the task running
and nothing behind, and a restore from what is not a usable checkpoint is a clear error that
leaves no task, mount or runtime state.
"""
from __future__ import annotations

import io
import json
import os
import tarfile

import pytest

from berth.client import CHECKPOINT_LAYER_TYPE, MANIFEST_TYPE
from tests.integration import test_run
from tests.integration.test_run import mounts_under, unique
from tests.integration.test_shim import criu_works
from tests.support import wait_until

berth = test_run.berth             # the fixture

COUNTER = ["sh", "-c", "i=0; while true; do i=$((i+1)); echo $i > /count; sleep 0.1; done"]


def _counting(berth) -> str:
    cid = unique()
    berth.cli("run", "-d", berth.image, cid, *COUNTER)
    return cid


def _scratch(berth) -> list[str]:
    root = os.path.join(berth.daemon.root, "checkpoints", berth.ns)
    return os.listdir(root) if os.path.isdir(root) else []


@pytest.mark.needs_criu
@pytest.mark.skipif(not criu_works(), reason="`criu check` fails on this host")
def test_checkpoint_into_an_image_and_restore_it(berth):
    cid = _counting(berth)
    name = berth.cli("tasks", "checkpoint", "--exit", "--image", f"checkpoint/{cid}:1", cid).stdout.strip()
    assert name == f"checkpoint/{cid}:1"
    record = berth.client.images.get(name)
    manifest = json.loads(berth.client.content.read_all(record["target"]["digest"]))
    assert [layer["mediaType"] for layer in manifest["layers"]] == [CHECKPOINT_LAYER_TYPE]
    assert _scratch(berth) == []
    berth.client.tasks.get(cid).wait(timeout=30)
    berth.cli("tasks", "rm", cid)
    berth.cli("tasks", "start", "-d", "--checkpoint", name, cid)
    task = berth.client.tasks.get(cid)
    assert task.status() == "running"
    first = berth.cli("tasks", "exec", "--exec-id", "r1", cid, "cat", "/count").stdout
    wait_until(lambda: int(berth.cli("tasks", "exec", "--exec-id", unique("r"), cid, "cat", "/count").stdout)
               > int(first), 10, what="the restored counter to go on")


def test_a_failed_checkpoint_leaves_the_task_running_and_nothing_behind(berth):
    if criu_works():
        pytest.skip("CRIU works here: the checkpoint would not fail")
    cid = _counting(berth)
    images = {i["name"] for i in berth.client.images.list()}
    r = berth.cli("tasks", "checkpoint", cid, check=False)
    assert r.returncode == 1
    assert r.stderr.startswith("berth: ") and "checkpoint" in r.stderr
    assert berth.client.tasks.get(cid).status() == "running"
    assert {i["name"] for i in berth.client.images.list()} == images
    assert _scratch(berth) == []
    assert not [s for s in berth.client.content.list_statuses() if s["ref"].startswith("checkpoint-")]


def _put_image(berth, name: str, layers: list[dict]) -> None:
    client = berth.client
    config = json.dumps({}).encode()
    cinfo = client.content.write(unique("cfg"), config)
    manifest = json.dumps({"schemaVersion": 2, "mediaType": MANIFEST_TYPE,
                           "config": {"mediaType": "application/json", "digest": cinfo["digest"],
                                      "size": len(config)},
                           "layers": layers}).encode()
    minfo = client.content.write(unique("man"), manifest)
    client.images.put(name, {"mediaType": MANIFEST_TYPE, "digest": minfo["digest"], "size": len(manifest)})


def _blob(berth, data: bytes) -> dict:
    info = berth.client.content.write(unique("blob"), data)
    return {"mediaType": CHECKPOINT_LAYER_TYPE, "digest": info["digest"], "size": len(data)}


def test_restoring_from_what_is_no_checkpoint_is_a_clear_error(berth):
    cid = unique()
    berth.cli("containers", "create", berth.image, cid, "true")
    r = berth.cli("tasks", "start", "-d", "--checkpoint", berth.image, cid, check=False)
    assert r.returncode == 1 and "is not a checkpoint" in r.stderr

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        link = tarfile.TarInfo("escape")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
        tar.addfile(link)
    _put_image(berth, "checkpoint/hostile:1", [_blob(berth, buf.getvalue())])
    r = berth.cli("tasks", "start", "-d", "--checkpoint", "checkpoint/hostile:1", cid, check=False)
    assert r.returncode == 1 and "neither a file nor a directory" in r.stderr
    berth.assert_gone(cid)

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        junk = tarfile.TarInfo("inventory.img")
        junk.size = 5
        tar.addfile(junk, io.BytesIO(b"junk!"))
    _put_image(berth, "checkpoint/junk:1", [_blob(berth, buf.getvalue())])
    r = berth.cli("tasks", "start", "-d", "--checkpoint", "checkpoint/junk:1", cid, check=False)
    assert r.returncode == 1 and r.stderr.startswith("berth: ")
    berth.assert_gone(cid)
    assert not mounts_under(berth.task_dir(cid))
    # The daemon serves on, and the container still runs from its image.
    assert berth.cli("tasks", "start", cid).returncode == 0
