import hashlib
import os
import sqlite3
import stat
import subprocess

import pytest

from actors import content
from actors.content import MAX_READ, ContentActor, ContentStore
from bus.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound, Unavailable
from bus.worker import Bulk, Call


def dgst(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def events():
    return []


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(tmp_path, events, clock):
    s = ContentStore(str(tmp_path / "content"), publish=lambda ns, topic, ev: events.append((ns, topic, ev)),
                     clock=clock)
    yield s
    s.close()


def blob_files(store):
    return sorted(os.listdir(store.blobs))


def ingest(store, ns, ref, data, labels=None):
    store.writer_open(ns, ref, total=len(data))
    store.write(ns, ref, 0, data)
    return store.commit(ns, ref, len(data), dgst(data), labels)


def test_write_commit_info_read(store, events):
    data = b"hello, berth" * 1000
    status = store.writer_open("ns", "ref-1", total=len(data), expected=dgst(data))
    assert status["offset"] == 0 and status["total"] == len(data) and status["expected"] == dgst(data)
    assert store.write("ns", "ref-1", 0, data[:5000])["offset"] == 5000
    assert store.write("ns", "ref-1", 5000, data[5000:])["offset"] == len(data)
    info = store.commit("ns", "ref-1", len(data), dgst(data), {"a": "b"})
    assert info["digest"] == dgst(data) and info["size"] == len(data) and info["labels"] == {"a": "b"}
    assert store.info("ns", dgst(data)) == info
    path = os.path.join(store.blobs, dgst(data)[7:])
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o444
    assert os.listdir(store.ingests) == []
    assert store.read("ns", dgst(data)) == data
    assert store.read("ns", dgst(data), 3, 4) == data[3:7]
    assert store.read("ns", dgst(data), len(data) - 2, 100) == data[-2:]
    assert store.read("ns", dgst(data), len(data)) == b""
    with pytest.raises(InvalidArgument):
        store.read("ns", dgst(data), len(data) + 1)
    with pytest.raises(InvalidArgument):
        store.read("ns", dgst(data), -1)
    with pytest.raises(NotFound):
        store.status("ns", "ref-1")
    assert events == [("ns", "/content/create", {"digest": dgst(data), "size": len(data)})]


def test_read_returns_at_most_4_mib(store):
    data = os.urandom(MAX_READ + 10)
    ingest(store, "ns", "big", data)
    first = store.read("ns", dgst(data))
    assert len(first) == MAX_READ
    assert first + store.read("ns", dgst(data), MAX_READ) == data


def test_wrong_digest_is_rejected_and_nothing_lands_in_blobs(store, events):
    store.writer_open("ns", "r")
    store.write("ns", "r", 0, b"real data")
    with pytest.raises(FailedPrecondition, match="unexpected commit digest"):
        store.commit("ns", "r", 9, dgst(b"other data"))
    assert blob_files(store) == []
    with pytest.raises(NotFound):
        store.info("ns", dgst(b"other data"))
    assert store.status("ns", "r")["offset"] == 9      # the ingest stays until aborted
    assert events == []


def test_wrong_size_is_rejected_and_nothing_lands_in_blobs(store):
    store.writer_open("ns", "r")
    store.write("ns", "r", 0, b"real data")
    with pytest.raises(FailedPrecondition, match="unexpected commit size"):
        store.commit("ns", "r", 10, dgst(b"real data"))
    assert blob_files(store) == []


def test_expected_digest_given_at_open_is_enforced_at_commit(store):
    store.writer_open("ns", "r", expected=dgst(b"announced"))
    store.write("ns", "r", 0, b"sent")
    with pytest.raises(FailedPrecondition, match="unexpected commit digest"):
        store.commit("ns", "r", 4, dgst(b"sent"))
    assert blob_files(store) == []


def test_write_must_continue_at_the_end(store):
    store.writer_open("ns", "r")
    store.write("ns", "r", 0, b"abc")
    with pytest.raises(InvalidArgument, match="write at offset 5, ingest is at 3"):
        store.write("ns", "r", 5, b"x")
    with pytest.raises(InvalidArgument, match="ingest is at 3"):
        store.write("ns", "r", 1, b"XY")             # overlaps with different bytes
    assert store.write("ns", "r", 1, b"bcde")["offset"] == 5   # resent chunk: identical overlap
    assert store.commit("ns", "r", 5, dgst(b"abcde"))["size"] == 5


def test_write_beyond_total_is_rejected(store):
    store.writer_open("ns", "r", total=4)
    with pytest.raises(InvalidArgument, match="exceeds total"):
        store.write("ns", "r", 0, b"12345")
    assert store.status("ns", "r")["offset"] == 0


def test_resume_after_crash_continues_at_stored_offset(tmp_path, events):
    root = str(tmp_path / "content")
    data = os.urandom(300_000)
    first = ContentStore(root)
    first.writer_open("ns", "layer", total=len(data))
    first.write("ns", "layer", 0, data[:123_457])
    # A crash: the first store is never closed, its flock dies with it (simulated by
    # dropping its descriptors without removing anything).
    for w in first._writers.values():
        os.close(w.fd)
        os.close(w.lock_fd)
    first._writers.clear()

    second = ContentStore(root, publish=lambda *e: events.append(e))
    status = second.writer_open("ns", "layer")
    assert status["offset"] == 123_457 and status["total"] == len(data)
    second.write("ns", "layer", status["offset"], data[status["offset"]:])
    info = second.commit("ns", "layer", len(data), dgst(data))
    assert info["digest"] == dgst(data)
    assert second.read("ns", dgst(data), 0, -1) == data[:MAX_READ]
    assert events[-1][1] == "/content/create"
    second.close()


def test_write_after_restart_reopens_the_ingest_without_writer_open(tmp_path):
    root = str(tmp_path / "content")
    first = ContentStore(root)
    first.writer_open("ns", "r")
    first.write("ns", "r", 0, b"abc")
    first.close()                                  # like an actor restart
    second = ContentStore(root)
    assert second.write("ns", "r", 3, b"def")["offset"] == 6
    assert second.commit("ns", "r", 6, dgst(b"abcdef"))["size"] == 6
    with pytest.raises(NotFound):
        second.write("ns", "never-opened", 0, b"x")
    second.close()


def test_startup_removes_temporaries(tmp_path):
    root = tmp_path / "content"
    ContentStore(str(root)).close()
    (root / "blobs" / "sha256" / ".tmp-123").write_bytes(b"partial")
    (root / "ingest" / ".tmp-abc").mkdir()
    (root / "ingest" / ".tmp-abc" / "data").write_bytes(b"x")
    ContentStore(str(root)).close()
    assert os.listdir(root / "blobs" / "sha256") == [] and os.listdir(root / "ingest") == []


def test_second_writer_is_refused_until_the_first_commits(store):
    store.writer_open("ns", "r")
    with pytest.raises(Unavailable, match="ref r locked"):
        store.writer_open("ns", "r")
    store.write("ns", "r", 0, b"one")
    store.commit("ns", "r", 3, dgst(b"one"))
    assert store.writer_open("ns", "r")["offset"] == 0      # a fresh ingest under the same ref
    assert store.writer_open("other", "r")["offset"] == 0   # refs are per namespace


def test_writer_close_releases_the_lock_and_keeps_the_data(store):
    store.writer_open("ns", "r")
    store.write("ns", "r", 0, b"keep")
    store.writer_close("ns", "r")
    assert store.writer_open("ns", "r")["offset"] == 4


def test_idle_writer_is_taken_over(store, clock):
    store.writer_open("ns", "r")
    clock.now += 60
    with pytest.raises(Unavailable):
        store.writer_open("ns", "r")
    clock.now += store.stale_writer
    assert store.writer_open("ns", "r")["offset"] == 0


def test_a_writer_whose_owner_exited_is_taken_over_at_once(store):
    child = subprocess.Popen(["sleep", "60"])
    try:
        store.writer_open("ns", "r", owner=content.process_identity(child.pid))
        store.write("ns", "r", 0, b"half")
        with pytest.raises(Unavailable):
            store.writer_open("ns", "r", owner=content.process_identity())
        child.kill()
        os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)     # a zombie, not yet reaped
        assert store.writer_open("ns", "r", owner=content.process_identity())["offset"] == 4
    finally:
        child.kill()
        child.wait()


def test_a_writer_whose_owner_lives_keeps_its_lock(store):
    store.writer_open("ns", "r", owner=content.process_identity())
    with pytest.raises(Unavailable):
        store.writer_open("ns", "r")


@pytest.mark.parametrize("owner", ["", "1", "0:5", "12:x", "12:5:6", "-1:5"])
def test_malformed_owners_are_refused(store, owner):
    with pytest.raises(InvalidArgument, match="process identity"):
        store.writer_open("ns", "r", owner=owner)


def test_lock_is_exclusive_across_store_instances(tmp_path):
    """Two processes on one root: flock, not only the in-process table, refuses the second."""
    root = str(tmp_path / "content")
    a, b = ContentStore(root), ContentStore(root)
    a.writer_open("ns", "r")
    with pytest.raises(Unavailable):
        b.writer_open("ns", "r")
    a.writer_close("ns", "r")
    assert b.writer_open("ns", "r")["offset"] == 0
    a.close()
    b.close()


def test_abort(store):
    store.writer_open("ns", "r")
    store.write("ns", "r", 0, b"junk")
    store.abort("ns", "r")
    assert os.listdir(store.ingests) == []
    with pytest.raises(NotFound):
        store.abort("ns", "r")
    with pytest.raises(NotFound):
        store.status("ns", "r")


def test_status_and_list_statuses(store, clock):
    store.writer_open("ns", "a", total=10)
    clock.now += 5
    store.write("ns", "a", 0, b"12")
    store.writer_open("ns", "b")
    store.writer_open("other", "a")
    st = store.status("ns", "a")
    assert st == {"ref": "a", "offset": 2, "total": 10, "expected": None,
                  "started_at": 1000.0, "updated_at": 1005.0}
    store.writer_close("ns", "a")
    assert store.status("ns", "a") == st            # the same, read back from disk
    assert [s["ref"] for s in store.list_statuses("ns")] == ["a", "b"]
    assert [s["ref"] for s in store.list_statuses("ns", ["ref==b"])] == ["b"]
    assert [s["ref"] for s in store.list_statuses("other")] == ["a"]


def test_namespace_isolation(store):
    data = b"shared layer"
    ingest(store, "a", "r", data)
    with pytest.raises(NotFound):
        store.info("b", dgst(data))
    with pytest.raises(NotFound):
        store.read("b", dgst(data))
    assert store.list("b") == []
    assert [i["digest"] for i in store.list("a")] == [dgst(data)]
    # b must still send (and so prove) the data; then the file on disk is shared.
    store.writer_open("b", "r")
    store.write("b", "r", 0, b"not it")
    with pytest.raises(FailedPrecondition):
        store.commit("b", "r", len(data), dgst(data))
    store.abort("b", "r")
    ingest(store, "b", "r", data, {"who": "b"})
    assert store.info("b", dgst(data))["labels"] == {"who": "b"}
    assert store.info("a", dgst(data))["labels"] == {}
    assert blob_files(store) == [dgst(data)[7:]]


def test_commit_of_a_blob_already_visible_is_already_exists(store):
    ingest(store, "ns", "r1", b"x")
    with pytest.raises(AlreadyExists):
        store.writer_open("ns", "r2", expected=dgst(b"x"))
    store.writer_open("ns", "r2")
    store.write("ns", "r2", 0, b"x")
    with pytest.raises(AlreadyExists):
        store.commit("ns", "r2", 1, dgst(b"x"))
    assert os.listdir(store.ingests) == []


def test_delete_keeps_the_file_while_another_namespace_sees_it(store, events):
    data = b"layer"
    ingest(store, "a", "r", data)
    ingest(store, "b", "r", data)
    path = os.path.join(store.blobs, dgst(data)[7:])
    store.delete("a", dgst(data))
    assert os.path.exists(path)
    with pytest.raises(NotFound):
        store.info("a", dgst(data))
    assert store.read("b", dgst(data)) == data
    store.delete("b", dgst(data))
    assert not os.path.exists(path)
    with pytest.raises(NotFound):
        store.delete("b", dgst(data))
    assert [e for e in events if e[1] == "/content/delete"] == [
        ("a", "/content/delete", {"digest": dgst(data)}), ("b", "/content/delete", {"digest": dgst(data)})]


def test_update_labels(store, clock):
    d = dgst(b"x")
    ingest(store, "ns", "r", b"x", {"keep": "1", "change": "old", "drop": "me"})
    clock.now += 1
    info = store.update("ns", d, {"change": "new", "add": "2", "ignored": "z"},
                        ["labels.change", "labels.add", "labels.drop"])
    assert info["labels"] == {"keep": "1", "change": "new", "add": "2"}
    assert info["updated_at"] == 1001.0 and info["created_at"] == 1000.0
    assert store.info("ns", d) == info
    assert store.update("ns", d, {"only": "this"})["labels"] == {"only": "this"}
    assert store.update("ns", d, {"a": "b", "c": ""}, ["labels"])["labels"] == {"a": "b"}
    with pytest.raises(InvalidArgument):
        store.update("ns", d, {}, ["size"])
    with pytest.raises(InvalidArgument):
        store.update("ns", d, {"k": "v" * 5000})
    with pytest.raises(NotFound):
        store.update("other", d, {"a": "b"})


def test_list_filters(store):
    ingest(store, "ns", "1", b"one", {"kind": "layer", "io.berth/gc.root": "yes"})
    ingest(store, "ns", "2", b"two", {"kind": "config"})
    assert {i["digest"] for i in store.list("ns", ["labels.kind==layer"])} == {dgst(b"one")}
    assert {i["digest"] for i in store.list("ns", ['labels."io.berth/gc.root"'])} == {dgst(b"one")}
    assert {i["digest"] for i in store.list("ns", [f"digest=={dgst(b'two')}"])} == {dgst(b"two")}
    assert len(store.list("ns", ["labels.kind~=^(layer|config)$"])) == 2
    with pytest.raises(InvalidArgument):
        store.list("ns", ["labels.kind="])


class NoDisk:
    def __getattr__(self, name):
        raise AssertionError(f"os.{name} used before the digest was checked")


@pytest.mark.parametrize("bad", ["sha256:../../x", "sha256:" + "A" * 64, "sha512:" + "a" * 64, "", None])
def test_bad_digests_are_refused_before_touching_the_disk(store, monkeypatch, bad):
    monkeypatch.setattr(content, "os", NoDisk())        # no path built, no file touched
    monkeypatch.setattr(content, "shutil", NoDisk())
    monkeypatch.setattr(content, "open", lambda *a, **k: NoDisk().open, raising=False)
    calls = [lambda: store.info("ns", bad), lambda: store.read("ns", bad),
             lambda: store.delete("ns", bad), lambda: store.update("ns", bad, {}),
             lambda: store.commit("ns", "r", 0, bad)]
    if bad is not None:                                 # None there means "no expected digest"
        calls.append(lambda: store.writer_open("ns", "r", expected=bad))
    for call in calls:
        with pytest.raises(InvalidArgument):
            call()


@pytest.mark.parametrize("bad", ["", "x" * 257, "a\0b", None])
def test_bad_refs_are_refused(store, bad):
    with pytest.raises(InvalidArgument):
        store.writer_open("ns", bad)
    assert os.listdir(store.ingests) == []


def test_odd_refs_stay_inside_the_ingest_directory(store):
    store.writer_open("ns", "../../escape/..")
    assert len(os.listdir(store.ingests)) == 1
    assert not os.path.exists(os.path.join(store.root, "..", "escape"))


def test_visibility_is_recorded_in_meta_db(store):
    ingest(store, "ns", "r", b"x", {"k": "v"})
    db = sqlite3.connect(os.path.join(store.root, "meta.db"))
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.execute("SELECT namespace, digest, size FROM blobs").fetchall() == [("ns", dgst(b"x"), 1)]
    db.close()


def test_actor_adapter_passes_frames_and_bulk(store):
    actor = ContentActor(store)
    actor.call = lambda service, method, args=None, **kw: None     # no other actors in a unit test
    assert {"write", "read", "commit"} <= {n for n, m in actor.methods.items() if m.blocking}
    no_lease = Call(1, "ns", None, None, [])
    actor.writer_open("ns", "r", no_lease)
    with pytest.raises(InvalidArgument):
        actor.write("ns", "r", 0, Call(1, "ns", None, None, []))
    actor.write("ns", "r", 0, Call(1, "ns", None, None, [b"bulk"]))
    actor.commit("ns", "r", 4, dgst(b"bulk"), no_lease)
    result = actor.read("ns", dgst(b"bulk"), 1, 2)
    assert isinstance(result, Bulk) and result.result == {"offset": 1, "size": 2} and result.frames == [b"ul"]
    schema = actor.methods["info"].schema
    with pytest.raises(InvalidArgument):
        schema.bind({"digest": "sha256:../../x"})


def test_a_failing_publisher_does_not_fail_the_commit(tmp_path):
    def broken(ns, topic, event):
        raise OSError("spool full")
    s = ContentStore(str(tmp_path / "content"), publish=broken)
    s.writer_open("ns", "r")
    s.write("ns", "r", 0, b"x")
    assert s.commit("ns", "r", 1, dgst(b"x"))["digest"] == dgst(b"x")
    assert s.info("ns", dgst(b"x"))["size"] == 1
    s.close()


def test_fsck_reports_a_blob_corrupted_on_disk_and_files_that_are_no_blob(store):
    good, bad, gone = b"good" * 1000, b"bad" * (1 << 19), b"gone"
    for i, data in enumerate((good, bad, gone)):
        ingest(store, "ns", f"r{i}", data)
    ingest(store, "other", "r", bad)
    assert store.fsck() == {"checked": 3, "bytes": len(good) + len(bad) + len(gone), "corrupt": [],
                            "missing": [], "orphans": [], "unknown": []}

    rotten = bytearray(bad)
    rotten[len(bad) // 2] ^= 1                       # one bit, past the first hashing chunk
    path = os.path.join(store.blobs, dgst(bad)[7:])
    os.chmod(path, 0o644)
    with open(path, "r+b") as f:
        f.write(rotten)
    os.unlink(os.path.join(store.blobs, dgst(gone)[7:]))
    stray = b"no row names this"
    with open(os.path.join(store.blobs, dgst(stray)[7:]), "wb") as f:
        f.write(stray)
    with open(os.path.join(store.blobs, "notes.txt"), "w") as f:
        f.write("not a blob")

    assert ContentActor.methods["fsck"].blocking          # it reads the whole store: off the loop
    report = store.fsck()
    assert report["corrupt"] == [{"digest": dgst(bad), "namespaces": ["ns", "other"], "problem": "digest mismatch",
                                  "size": len(bad), "actual_size": len(bad), "actual_digest": dgst(bytes(rotten))}]
    assert report["missing"] == [{"digest": dgst(gone), "namespaces": ["ns"]}]
    assert report["orphans"] == [dgst(stray)] and report["unknown"] == ["notes.txt"]
    assert report["checked"] == 2 and report["bytes"] == len(good) + len(bad)


def test_fsck_reports_a_truncated_blob_and_one_replaced_by_a_symlink(store):
    short, linked = b"short" * 100, b"linked"
    ingest(store, "ns", "a", short)
    ingest(store, "ns", "b", linked)
    os.truncate(os.path.join(store.blobs, dgst(short)[7:]), 10)
    target = os.path.join(store.blobs, dgst(linked)[7:])
    os.unlink(target)
    os.symlink("/etc/hostname", target)
    report = store.fsck()
    problems = {d["digest"]: (d["problem"], d["actual_size"]) for d in report["corrupt"]}
    assert problems == {dgst(short): ("digest mismatch", 10), dgst(linked): ("not a regular file", None)}


def _json(store, ns, ref, doc):
    """`doc` stored as a JSON blob; its descriptor."""
    import json
    data = json.dumps(doc).encode()
    return {"digest": ingest(store, ns, ref, data)["digest"], "size": len(data)}


def test_image_config_through_an_index_for_the_platform(store):
    config = b'{"rootfs": {"diff_ids": []}}'
    config_desc = {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": dgst(config),
                   "size": len(config)}
    ingest(store, "ns", "config", config)
    other = _json(store, "ns", "other", {"config": {"digest": dgst(b"x"), "size": 1}})
    manifest = _json(store, "ns", "manifest", {"config": config_desc, "layers": []})
    index = _json(store, "ns", "index", {"manifests": [
        dict(other, platform={"os": "linux", "architecture": "s390x"}),
        dict(manifest, platform={"os": "linux", "architecture": "amd64"})]})
    index["mediaType"] = "application/vnd.oci.image.index.v1+json"
    assert store.image_config("ns", index, "linux/amd64") == (config_desc, config)
    assert store.image_config("ns", manifest, "linux/arm64") == (config_desc, config)   # a manifest is for any
    with pytest.raises(NotFound, match="no manifest for linux/arm64"):
        store.image_config("ns", index, "linux/arm64")
    with pytest.raises(NotFound):                       # namespaces see only their own content
        store.image_config("other-ns", manifest, "linux/amd64")


def test_image_config_of_a_bad_manifest_is_invalid(store):
    no_config = _json(store, "ns", "m1", {"layers": []})
    with pytest.raises(InvalidArgument, match="names no config"):
        store.image_config("ns", no_config, "linux/amd64")
    ingest(store, "ns", "m2", b"not json")
    with pytest.raises(InvalidArgument, match="not JSON"):
        store.image_config("ns", {"digest": dgst(b"not json"), "size": 8}, "linux/amd64")
    with pytest.raises(InvalidArgument):
        store.image_config("ns", {"digest": "sha256:nothex"}, "linux/amd64")


def test_image_config_leaves_a_config_too_big_for_one_read_to_the_caller(store):
    big = {"digest": dgst(b"big"), "size": MAX_READ + 1}
    manifest = _json(store, "ns", "m", {"config": big})
    assert store.image_config("ns", manifest, "linux/amd64") == (big, None)


def test_image_config_takes_the_index_entry_a_pull_takes(store):
    """Ranked as transfer.PlatformMatcher ranks for a pull: the exact platform before one that
    names none, and a bad platform is no match rather than an error."""
    config = b'{"rootfs": {"diff_ids": ["sha256:' + b"a" * 64 + b'"]}}'
    config_desc = {"digest": dgst(config), "size": len(config)}
    ingest(store, "ns", "config", config)
    manifest = _json(store, "ns", "manifest", {"config": config_desc, "layers": []})
    anywhere = _json(store, "ns", "anywhere", {"config": {"digest": dgst(b"x"), "size": 1}})
    index = _json(store, "ns", "index", {"manifests": [
        anywhere, dict(anywhere, platform={"os": 7}), "junk",
        dict(manifest, platform={"os": "linux", "architecture": "aarch64"})]})
    assert store.image_config("ns", index, "linux/arm64") == (config_desc, config)
    with pytest.raises(InvalidArgument):
        store.image_config("ns", index, "not a platform")
