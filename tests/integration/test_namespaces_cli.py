"""`berth namespaces` end to end, and namespaces refusing deletion while anything lives in them."""


def test_create_label_list_remove(daemon):
    daemon.cli("namespaces", "create", "builds", "team=ci", "tier=2")
    assert "builds  team=ci,tier=2" in daemon.cli("namespaces", "ls").stdout
    assert daemon.cli("namespaces", "label", "builds", "tier=").stdout.strip() == "team=ci"
    assert daemon.cli("namespaces", "ls", "-q").stdout.split() == ["builds"]
    assert daemon.cli("namespaces", "rm", "builds").stdout.strip() == "builds"
    assert daemon.cli("namespaces", "ls", "-q").stdout.split() == []


def test_events_for_each_namespace_change(daemon):
    head = daemon.client().events.head()
    daemon.cli("namespaces", "create", "watched")
    daemon.cli("namespaces", "label", "watched", "a=b")
    daemon.cli("namespaces", "rm", "watched")
    topics = [e["topic"] for e in daemon.client().events.replay(head)]
    assert topics == ["/namespaces/create", "/namespaces/update", "/namespaces/delete"]


def test_bad_names_are_one_line_errors(daemon):
    for bad in ("../x", "a/b", "x" * 77):
        result = daemon.cli("namespaces", "create", bad, check=False)
        assert result.returncode == 1
        assert result.stderr.count("\n") == 1 and result.stderr.startswith("berth: "), result.stderr


def test_namespace_holding_only_content_cannot_be_deleted(daemon):
    client = daemon.client("held")
    info = client.content.write("blob-1", b"payload")
    result = daemon.cli("namespaces", "rm", "held", check=False)
    assert result.returncode == 1 and "still has content" in result.stderr
    client.content.delete(info["digest"])
    assert daemon.cli("namespaces", "rm", "held").stdout.strip() == "held"


def test_namespace_holding_only_a_snapshot_cannot_be_deleted(daemon):
    client = daemon.client("snaps")
    client.namespaces.create("snaps")
    client.snapshots.prepare("scratch")
    result = daemon.cli("namespaces", "rm", "snaps", check=False)
    assert result.returncode == 1 and "overlayfs snapshots" in result.stderr
    client.snapshots.remove("scratch")
    daemon.cli("namespaces", "rm", "snaps")


def test_containers_are_isolated_by_namespace(daemon):
    daemon.client("a").containers.create("web")
    assert daemon.cli("containers", "ls", "-q", namespace="a").stdout.split() == ["web"]
    assert daemon.cli("containers", "ls", "-q", namespace="b").stdout.split() == []
    missing = daemon.cli("containers", "info", "web", namespace="b", check=False)
    assert missing.returncode == 1 and "not found" in missing.stderr
    daemon.client("b").containers.create("web")          # the same id, another namespace
    assert daemon.cli("containers", "ls", "-q", namespace="b").stdout.split() == ["web"]
