"""Parsers of client text on any input: filters, labels, identifiers, image references.

Each takes any string to a parsed value or a clean InvalidArgument; what a well-formed input
says survives the round trip; the documented limits hold at their edges.
"""
from __future__ import annotations

import re
import string

import pytest
from hypothesis import assume, example, given
from hypothesis import strategies as st

from actors.transfer import MAX_NAME, Reference, parse_platform, parse_reference
from bus import filters, validate
from bus.errors import InvalidArgument

junk = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8)
                    | st.binary(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
                    max_leaves=8)


def syntax(chars: str, max_size: int = 40):
    """Strings mostly made of a grammar's own characters, so a parser's corners get visited."""
    return st.text(st.sampled_from(chars) | st.characters(), max_size=max_size)


def joined(words, separators, most: int):
    """A word, then up to `most` more each after a separator: `a.b-c` (cheaper than from_regex)."""
    return st.tuples(words, st.lists(st.tuples(st.sampled_from(separators), words), max_size=most)) \
        .map(lambda t: t[0] + "".join(sep + word for sep, word in t[1]))


ALNUM = string.ascii_letters + string.digits
LOWER = string.ascii_lowercase + string.digits


# --- filters -----------------------------------------------------------------------------------------

FILTER_CHARS = 'ab_-0.,"\\ \t\n=!~()[]{}*+?|^$xu7/'
objects = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=6),
                       lambda inner: st.dictionaries(st.sampled_from(["a", "b", "labels", "a.b"]), inner, max_size=3),
                       max_leaves=10)


@given(st.lists(syntax(FILTER_CHARS) | junk, max_size=3), objects)
@example(["a~=a{4294967296}"], {})
@example(["a~=" + "(" * 1500 + ")" * 1500], {})
@example([r'a=="\ud800"'], {"a": "x"})
@example(["a~=(?L)x"], {})
def test_any_filter_parses_or_is_invalid_argument(texts, obj):
    try:
        matcher = filters.parse(texts)
    except InvalidArgument as e:
        assert e.message
        return
    assert all(isinstance(t, str) for t in texts)
    assert matcher.match(obj) in (True, False)


def quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def render_field(field: str) -> str:
    return field if re.fullmatch(r"[A-Za-z0-9_-]+", field) else quote(field)


def render_value(value: str) -> str:
    bare = re.fullmatch(r"[^\s,]+", value) and value[0] not in '"=!~'
    return value if bare else quote(value)


# regular expressions with a string each matches and one it does not
PATTERNS = [("^a", "abc", "cab"), ("b$", "ab", "ba"), ("a|b", "xbx", "xyz"), ("[0-9]+", "v10", "v"),
            (r"\.", "a.b", "ab"), ("^$", "", "x"), ("é+", "café", "cafe")]

no_nul = st.characters(exclude_characters="\0")             # a filter never holds NUL
fields = st.text(ALNUM + "_-", min_size=1, max_size=6) | st.text(no_nul, max_size=6)
spaces = st.sampled_from(["", "", " ", "\t", "  "])


@st.composite
def selectors(draw) -> tuple[tuple[str, ...], str | None, str | None, str]:
    """(path, operator, value, text): a selector and how it is written."""
    path = tuple(draw(st.lists(fields, min_size=1, max_size=3)))
    operator = draw(st.sampled_from([None, "==", "!=", "~="]))
    text = (draw(spaces) + ".").join(render_field(f) for f in path) if draw(st.booleans()) \
        else ".".join(render_field(f) for f in path)
    value = None
    if operator == "~=":
        value = draw(st.sampled_from(PATTERNS))[0]
    elif operator:
        value = draw(st.text(no_nul, max_size=10))
    if operator:
        text += draw(spaces) + operator + draw(spaces) + render_value(value)
    return path, operator, value, draw(spaces) + text + draw(spaces)


def satisfying(path, operator, value, *, satisfied: bool) -> str | None:
    """A field value that makes the selector match (or fail); None leaves the field absent."""
    if operator is None:
        return "present" if satisfied else None
    if operator == "~=":
        _, yes, no = next(p for p in PATTERNS if p[0] == value)
        return yes if satisfied else no
    return value if (operator == "==") == satisfied else value + "x"


def put(obj: dict, path: tuple[str, ...], value: str) -> None:
    for key in path[:-1]:
        obj = obj.setdefault(key, {})
    obj[path[-1]] = value


@given(st.lists(selectors(), min_size=1, max_size=4), st.data())
def test_filters_round_trip_and_match_what_they_say(sels, data):
    text = ",".join(s[3] for s in sels)
    assume(len(text) <= filters.MAX_FILTER)
    matcher = filters.parse([text])
    (parsed,) = matcher.alternatives
    assert [(s.path, s.operator, s.value) for s in parsed] == [s[:3] for s in sels]

    paths = [s[0] for s in sels]
    if any(a != b and a[:len(b)] == b for a in paths for b in paths) or len(set(paths)) < len(paths):
        return                                  # one field inside another: no object satisfies both
    failing = data.draw(st.sampled_from([None, *range(len(sels))]))
    obj: dict = {}
    for i, (path, operator, value, _) in enumerate(sels):
        field = satisfying(path, operator, value, satisfied=i != failing)
        if field is not None:
            put(obj, path, field)
    assert matcher.match(obj) is (failing is None)
    assert filters.parse([text, "nosuchfield"]).match(obj) is (failing is None)    # any string may match


def test_filter_limits():
    assert filters.parse(["a" * filters.MAX_FILTER]).match({"a" * filters.MAX_FILTER: 1})
    with pytest.raises(InvalidArgument):
        filters.parse(["a" * (filters.MAX_FILTER + 1)])
    assert filters.parse(["a"] * filters.MAX_FILTERS).match({"a": 1})
    with pytest.raises(InvalidArgument):
        filters.parse(["a"] * (filters.MAX_FILTERS + 1))


# --- labels and identifiers ---------------------------------------------------------------------------

@given(st.dictionaries(st.text(max_size=10) | st.integers() | st.none() | st.binary(max_size=4),
                       st.text(max_size=10) | junk, max_size=4) | junk)
def test_any_labels_are_accepted_or_invalid_argument(value):
    try:
        assert validate.check_labels(value) is value
    except InvalidArgument as e:
        assert e.message
        return
    for key, val in value.items():
        assert isinstance(key, str) and key and isinstance(val, str)
        assert len(key.encode()) + len(val.encode()) <= validate.MAX_LABEL


@given(st.text(min_size=1, max_size=40), st.sampled_from(["x", "é", "€", "𝄞"]), st.integers(-8, 8))
@example("k", "x", 0)
@example("k", "x", 1)
@example("€", "𝄞", 0)
def test_label_size_limit_counts_utf8_bytes(key, char, delta):
    room = validate.MAX_LABEL - len(key.encode())
    value = char * max(0, room // len(char.encode()) + delta)
    size = len(key.encode()) + len(value.encode())
    if size <= validate.MAX_LABEL:
        assert validate.check_labels({key: value}) == {key: value}
    else:
        with pytest.raises(InvalidArgument):
            validate.check_labels({key: value})


IDENTIFIER_DOC = re.compile(r"[A-Za-z0-9]+([._-][A-Za-z0-9]+)*")      # as docs/wire.md writes it


@given(syntax("aZ9._-/ ", 90) | junk
       | joined(st.text(ALNUM, min_size=1, max_size=30), "._-", 4))
@example("a" * validate.MAX_IDENTIFIER)
@example("a" * (validate.MAX_IDENTIFIER + 1))
@example("a\n")
def test_identifiers_are_exactly_the_documented_ones(value):
    documented = (isinstance(value, str) and IDENTIFIER_DOC.fullmatch(value) is not None
                  and len(value) <= validate.MAX_IDENTIFIER)
    try:
        assert validate.check_identifier(value) == value
        assert documented, value
    except InvalidArgument:
        assert not documented, value


@given(syntax("sha256:0123456789abcdefABCDEF", 80) | junk
       | st.text("0123456789abcdef", min_size=64, max_size=64).map(lambda h: "sha256:" + h))
@example("sha256:" + "a" * 64 + "\n")
def test_digests_are_exactly_the_documented_ones(value):
    documented = isinstance(value, str) and re.fullmatch(r"sha256:[0-9a-f]{64}", value) is not None
    try:
        assert validate.check_digest(value) == value
        assert documented, value
    except InvalidArgument:
        assert not documented, value


# --- image references ----------------------------------------------------------------------------------

REF_CHARS = "abc019AZ._-:/@[]_"
components = joined(st.text(LOWER, min_size=1, max_size=5), [".", "_", "__", "-", "--"], 2)
labels_ = st.text(ALNUM, min_size=1, max_size=1) | st.tuples(
    st.text(ALNUM, min_size=1, max_size=1), st.text(ALNUM + "-", max_size=6), st.text(ALNUM, min_size=1, max_size=1)
).map("".join)
hosts = (st.lists(labels_, min_size=2, max_size=3).map(".".join)
         | st.just("localhost") | st.sampled_from(["[::1]", "[fe80::1]", "127.0.0.1"]))
ports = st.none() | st.integers(1, 65535).map(str)
tags = st.tuples(st.text(ALNUM + "_", min_size=1, max_size=1), st.text(ALNUM + "_.-", max_size=20)).map("".join)
digests = st.text("0123456789abcdef", min_size=64, max_size=64).map(lambda h: "sha256:" + h)


@given(syntax(REF_CHARS, 60) | junk)
@example("a" * (MAX_NAME + 1))
@example("localhost:5000")
@example("[::1]:5000/x")
@example("a/b:c/d")
@example("docker.io/" + "a" * 300)
def test_any_reference_parses_or_is_invalid_argument(text):
    try:
        ref = parse_reference(text)
    except InvalidArgument as e:
        assert e.message
        return
    assert len(f"{ref.host}/{ref.repository}") <= MAX_NAME
    assert parse_reference(str(ref)) == ref


@given(st.none() | st.tuples(hosts, ports), st.lists(components, min_size=1, max_size=3),
       st.none() | tags, st.none() | digests)
@example(("index.docker.io", None), ["x"], None, None)
@example(("docker.io", None), ["library", "x"], "v1", None)
def test_well_formed_references_round_trip(host_port, path, tag, digest):
    if host_port is None:
        assume(len(path) == 1 or not ("." in path[0] or path[0] == "localhost"))
    host = None if host_port is None else host_port[0] + (f":{host_port[1]}" if host_port[1] else "")
    text = "/".join(([host] if host else []) + path) + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")
    assume(len(text) <= MAX_NAME)
    ref = parse_reference(text)
    want_host = "docker.io" if host in (None, "index.docker.io") else host
    want_path = "/".join(path)
    if want_host == "docker.io" and len(path) == 1:
        want_path = "library/" + want_path
    assert ref == Reference(want_host, want_path, tag or (None if digest else "latest"), digest)
    assert parse_reference(str(ref)) == ref


@given(syntax("linux/amd64arm64v78windows", 40) | junk)
@example("linux/arm64/v8/x")
def test_any_platform_parses_or_is_invalid_argument(text):
    try:
        os_, arch, variant = parse_platform(text)
    except InvalidArgument:
        return
    assert os_ and arch and isinstance(variant, str)
