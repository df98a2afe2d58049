import pytest

from actors.metadata import MetadataStore, apply_fieldpaths, lease_expired
from bus.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound


@pytest.fixture
def store(tmp_path):
    published = []
    s = MetadataStore(str(tmp_path / "meta.db"), lambda ns, topic, event: published.append((ns, topic, event)))
    s.published = published
    yield s
    s.close()


def test_namespace_lifecycle_publishes_an_event_per_change(store):
    store.create_namespace("a", {"team": "x"})
    store.update_namespace("a", {"env": "prod"}, ["labels.env"])
    store.delete_namespace("a")
    assert [t for _, t, _ in store.published] == ["/namespaces/create", "/namespaces/update", "/namespaces/delete"]
    with pytest.raises(NotFound):
        store.get_namespace("a")


def test_namespace_create_twice_is_already_exists(store):
    store.create_namespace("a")
    with pytest.raises(AlreadyExists):
        store.create_namespace("a")


def test_labels_update_only_named_fieldpaths(store):
    store.create_namespace("a", {"keep": "1", "drop": "2"})
    ns = store.update_namespace("a", {"drop": "", "new": "3"}, ["labels.drop", "labels.new"])
    assert ns["labels"] == {"keep": "1", "new": "3"}


def test_oversized_label_is_invalid(store):
    with pytest.raises(InvalidArgument):
        store.create_namespace("a", {"k": "v" * 5000})


def test_store_survives_reopening(tmp_path):
    path = str(tmp_path / "meta.db")
    MetadataStore(path).create_namespace("kept")
    assert [n["name"] for n in MetadataStore(path).list_namespaces()] == ["kept"]


def test_apply_fieldpaths_without_paths_replaces():
    assert apply_fieldpaths({"a": "1"}, {"b": "2", "c": ""}, []) == {"b": "2"}


DIGEST = "sha256:" + "ab" * 32
TARGET = {"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": DIGEST, "size": 10}


def test_image_create_brings_its_namespace_into_being(store):
    store.create_image("fresh", "reg.local/busybox:1", TARGET, {"a": "b"})
    assert store.get_namespace("fresh")["name"] == "fresh"
    assert store.get_image("fresh", "reg.local/busybox:1")["target"] == TARGET
    assert ("fresh", "/namespaces/create") in [(ns, t) for ns, t, _ in store.published]


def test_images_are_namespaced(store):
    store.create_image("a", "img", TARGET)
    with pytest.raises(NotFound):
        store.get_image("b", "img")
    assert store.list_images("b") == []


def test_image_descriptor_is_checked(store):
    for bad in ({"mediaType": "x", "digest": "sha256:../../x", "size": 1},
                {"mediaType": "x", "digest": DIGEST, "size": -1},
                {"digest": DIGEST, "size": 1}):
        with pytest.raises(InvalidArgument):
            store.create_image("a", "img", bad)


def test_put_image_retargets_an_existing_image(store):
    store.put_image("a", "img", TARGET)
    other = dict(TARGET, digest="sha256:" + "cd" * 32)
    assert store.put_image("a", "img", other)["target"]["digest"] == other["digest"]


def test_list_images_with_filters(store):
    store.create_image("a", "x/one", TARGET, {"env": "prod"})
    store.create_image("a", "x/two", TARGET, {"env": "dev"})
    assert [i["name"] for i in store.list_images("a", ['labels.env==prod'])] == ["x/one"]
    assert [i["name"] for i in store.list_images("a", ['name~=two$'])] == ["x/two"]


def test_namespace_with_objects_cannot_be_deleted(store):
    store.create_image("a", "img", TARGET)
    with pytest.raises(FailedPrecondition):
        store.delete_namespace("a")
    store.delete_image("a", "img")
    store.delete_namespace("a")


def test_container_record_roundtrip(store):
    spec = {"ociVersion": "1.1.0", "process": {"args": ["sh"]}}
    c = store.create_container("a", "web", {"name": "io.containerd.runc.v2", "options": {}}, spec,
                               image="img", snapshotter="overlayfs", snapshot_key="web",
                               labels={"k": "v"}, extensions={"x": b"\x00raw"})
    assert c["spec"] == spec and c["extensions"] == {"x": b"\x00raw"}
    with pytest.raises(AlreadyExists):
        store.create_container("a", "web", {"name": "r"})
    updated = store.update_container("a", "web", labels={"k": "", "n": "1"}, fieldpaths=["labels.k", "labels.n"])
    assert updated["labels"] == {"n": "1"}
    assert store.delete_container("a", "web")["id"] == "web"
    with pytest.raises(NotFound):
        store.get_container("a", "web")


def test_container_create_can_release_the_lease_that_held_its_snapshot(store):
    lease = store.create_lease("a", expire=600)["id"]
    store.add_lease_resource("a", lease, "snapshots/overlayfs", "web")
    kept = store.create_lease("a", expire=600)["id"]
    store.create_container("a", "web", {"name": "runc"}, snapshotter="overlayfs", snapshot_key="web",
                           release_lease=lease)
    assert [x["id"] for x in store.list_leases("a")] == [kept]
    assert ("overlayfs", "web") in store.gc_roots()["a"]["snapshots"]      # the record holds it now
    store.create_container("a", "db", {"name": "runc"})                    # no release: leases stay
    assert [x["id"] for x in store.list_leases("a")] == [kept]


def test_failed_container_create_keeps_the_lease(store):
    store.create_container("a", "web", {"name": "runc"})
    lease = store.create_lease("a", expire=600)["id"]
    with pytest.raises(AlreadyExists):
        store.create_container("a", "web", {"name": "runc"}, release_lease=lease)
    assert [x["id"] for x in store.list_leases("a")] == [lease]


def test_container_id_is_an_identifier(store):
    with pytest.raises(InvalidArgument):
        store.create_container("a", "../web", {"name": "r"})


def test_lease_resources_and_expiry(store):
    lease = store.create_lease("a", labels={"purpose": "pull"}, expire=60)
    assert lease["id"].startswith("berth-")
    store.add_lease_resource("a", lease["id"], "content", DIGEST)
    store.add_lease_resource("a", lease["id"], "snapshots/overlayfs", "sha256:chain")
    assert store.list_lease_resources("a", lease["id"]) == [
        {"type": "content", "id": DIGEST}, {"type": "snapshots/overlayfs", "id": "sha256:chain"}]
    assert not lease_expired(lease["labels"], store.clock())
    assert lease_expired(lease["labels"], store.clock() + 61)
    with pytest.raises(InvalidArgument):
        store.add_lease_resource("a", lease["id"], "bogus", "x")
    store.delete_lease("a", lease["id"])
    with pytest.raises(NotFound):
        store.list_lease_resources("a", lease["id"])
