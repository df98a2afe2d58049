from typing import Annotated

import pytest

from bus.errors import InvalidArgument
from bus.validate import (Digest, Identifier, Labels, Schema, check_digest, check_identifier,
                          check_labels, check_topic)


@pytest.mark.parametrize("good", ["a", "default", "k8s.io", "a-b_c.d", "x" * 76, "A1"])
def test_good_identifiers(good):
    assert check_identifier(good) == good


@pytest.mark.parametrize("bad", ["", "../x", "a/b", "x" * 77, "-a", "a-", "a..b", "a b", ".", "ä", 5])
def test_bad_identifiers(bad):
    with pytest.raises(InvalidArgument):
        check_identifier(bad)


@pytest.mark.parametrize("bad", ["sha256:../../x", "sha256:" + "A" * 64, "sha512:" + "a" * 64,
                                 "sha256:" + "a" * 63, "sha256:" + "a" * 65, "a" * 64])
def test_bad_digests(bad):
    with pytest.raises(InvalidArgument):
        check_digest(bad)


def test_good_digest():
    d = "sha256:" + "0123456789abcdef" * 4
    assert check_digest(d) == d


def test_labels_limit_counts_key_and_value_bytes():
    check_labels({"k": "v" * 4095})
    with pytest.raises(InvalidArgument):
        check_labels({"k": "v" * 4096})
    with pytest.raises(InvalidArgument):
        check_labels({"k": 1})


@pytest.mark.parametrize("bad", ["tasks/exit", "/", "/tasks//exit", "/tasks/../x", "/a b"])
def test_bad_topics(bad):
    with pytest.raises(InvalidArgument):
        check_topic(bad)


def test_topic():
    assert check_topic("/tasks/exit") == "/tasks/exit"


def sample(self, ns, name: Identifier, digest: Digest, labels: Labels | None = None,
           count: int = 1, tags: list[str] | None = None, ratio: float = 0.5,
           extra: Annotated[str, lambda v, w: v.upper()] = "x"):
    pass


def test_schema_binds_and_checks_types():
    schema = Schema.of(sample)
    assert set(schema.params) == {"name", "digest", "labels", "count", "tags", "ratio", "extra"}
    bound = schema.bind({"name": "a", "digest": "sha256:" + "0" * 64, "tags": ["t"], "ratio": 1,
                         "extra": "q"})
    assert bound["ratio"] == 1.0 and isinstance(bound["ratio"], float)
    assert bound["extra"] == "Q"


@pytest.mark.parametrize("args, message", [
    ({"digest": "sha256:" + "0" * 64}, "missing argument 'name'"),
    ({"name": "a", "digest": "sha256:" + "0" * 64, "bogus": 1}, "unknown argument 'bogus'"),
    ({"name": "a", "digest": "sha256:" + "0" * 64, "count": "1"}, "count must be an integer"),
    ({"name": "a", "digest": "sha256:" + "0" * 64, "count": True}, "count must be an integer"),
    ({"name": "a", "digest": "sha256:" + "0" * 64, "tags": ["a", 1]}, r"tags\[1\] must be a string"),
    ({"name": "../a", "digest": "sha256:" + "0" * 64}, "not valid"),
])
def test_schema_rejects(args, message):
    with pytest.raises(InvalidArgument, match=message):
        Schema.of(sample).bind(args)
