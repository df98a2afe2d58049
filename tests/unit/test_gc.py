"""GC: the mark over metadata roots and content labels, and the content store's sweep."""
import hashlib
import os

from actors.content import ContentStore
from actors.metadata import MetadataStore, mark, mark_snapshots, snapshot_roots


def dgst(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def put(store: ContentStore, ns: str, data: bytes, labels: dict | None = None) -> str:
    ref = f"r-{dgst(data)}"
    store.writer_open(ns, ref)
    store.write(ns, ref, 0, data)
    return store.commit(ns, ref, len(data), dgst(data), labels)["digest"]


def test_mark_follows_gc_ref_labels_from_roots():
    graph = {"a": {"idx": {"containerd.io/gc.ref.content.m.0": "man"},
                   "man": {"containerd.io/gc.ref.content.config": "cfg", "containerd.io/gc.ref.content.l.0": "l0"},
                   "cfg": {}, "l0": {}, "stray": {}, "pinned": {"containerd.io/gc.root": "x"}}}
    live = mark(graph, {"a": {"content": {"idx"}, "ingests": set(), "snapshots": set()}})
    assert live["a"] == {"idx", "man", "cfg", "l0", "pinned"}


def test_mark_does_not_cross_namespaces():
    graph = {"a": {"man": {"containerd.io/gc.ref.content.l.0": "l0"}}, "b": {"l0": {}}}
    live = mark(graph, {"a": {"content": {"man"}, "ingests": set(), "snapshots": set()}})
    assert live == {"a": {"man"}, "b": set()}


def test_whole_gc_keeps_what_images_and_leases_hold(tmp_path):
    content = ContentStore(str(tmp_path / "content"))
    meta = MetadataStore(str(tmp_path / "meta.db"))
    layer = put(content, "a", b"layer")
    manifest = put(content, "a", b"manifest", {"containerd.io/gc.ref.content.l.0": layer})
    leased = put(content, "a", b"leased")
    garbage = put(content, "a", b"garbage")
    meta.create_image("a", "img", {"mediaType": "m", "digest": manifest, "size": 8})
    lease = meta.create_lease("a")["id"]
    meta.add_lease_resource("a", lease, "content", leased)
    roots = meta.gc_roots()
    graph = content.gc_graph()
    live = mark(graph, roots)
    remove = [(ns, d) for ns, blobs in graph.items() for d in blobs if d not in live[ns]]
    assert remove == [("a", garbage)]
    result = content.gc_sweep(remove, set(), 3600)
    assert result["removed"] == 1
    assert not os.path.exists(tmp_path / "content" / "blobs" / "sha256" / garbage[7:])
    assert content.info("a", layer)["size"] == 5


def test_expired_lease_stops_holding(tmp_path):
    now = [1000.0]
    meta = MetadataStore(str(tmp_path / "meta.db"), clock=lambda: now[0])
    lease = meta.create_lease("a", expire=10)["id"]
    meta.add_lease_resource("a", lease, "content", dgst(b"x"))
    assert dgst(b"x") in meta.gc_roots()["a"]["content"]
    now[0] += 11
    assert dgst(b"x") not in meta.gc_roots().get("a", {}).get("content", set())
    assert meta.list_leases("a") == []


def test_sweep_removes_orphan_files_and_idle_unleased_ingests(tmp_path):
    now = [1000.0]
    content = ContentStore(str(tmp_path / "content"), clock=lambda: now[0])
    orphan = tmp_path / "content" / "blobs" / "sha256" / ("0" * 64)
    orphan.write_bytes(b"left by a crash")
    content.writer_open("a", "kept")
    content.write("a", "kept", 0, b"x")
    content.writer_close("a", "kept")
    content.writer_open("a", "idle")
    content.write("a", "idle", 0, b"y")
    content.writer_close("a", "idle")
    now[0] += 7200
    result = content.gc_sweep([], {("a", "kept")}, 3600)
    assert result == {"removed": 0, "orphans": 1, "ingests": 1}
    assert not orphan.exists()
    assert [s["ref"] for s in content.list_statuses("a")] == ["kept"]


def test_snapshot_roots_come_from_records_leases_and_config_labels():
    graph = {"a": {"cfg": {"containerd.io/gc.ref.snapshot.overlayfs": "sha256:top"}, "dead": {
        "containerd.io/gc.ref.snapshot.overlayfs": "sha256:gone"}}}
    roots = {"a": {"content": set(), "ingests": set(), "snapshots": {("native", "web")}}}
    held = snapshot_roots({"a": {"cfg"}}, graph, roots)
    assert held == {("overlayfs", "a", "sha256:top"), ("native", "a", "web")}


def test_mark_snapshots_keeps_parent_chains_and_gc_roots():
    rows = [{"namespace": "a", "key": "l1", "parent": "", "labels": {}},
            {"namespace": "a", "key": "l2", "parent": "l1", "labels": {}},
            {"namespace": "a", "key": "top", "parent": "l2", "labels": {}},
            {"namespace": "a", "key": "stray", "parent": "l1", "labels": {}},
            {"namespace": "a", "key": "pinned", "parent": "", "labels": {"containerd.io/gc.root": "x"}},
            {"namespace": "b", "key": "l1", "parent": "", "labels": {}}]
    live = mark_snapshots({"overlayfs": rows}, {("overlayfs", "a", "top")})
    assert live == {("overlayfs", "a", k) for k in ("l1", "l2", "top", "pinned")}
