"""containerd's filter syntax, shared by every list method and by event subscriptions.

    filter    := selector ("," selector)*       every selector must match
    selector  := fieldpath [operator value]     without an operator: the field is present
    fieldpath := field ("." field)*
    field     := [A-Za-z0-9_-]+ | quoted        quote label keys: labels."io.berth/gc.root"
    operator  := "==" | "!=" | "~="             "~=" is an unanchored regular expression search,
                                                in RE2's syntax (as containerd's Go regexp)
    value     := quoted | [^\\s,]+
    quoted    := a double-quoted string with Go's escapes

Several filter strings match when any one does; none at all (or "") matches everything.

One departure from containerd: only `"` quotes. containerd also quotes with `/` and `|`, which
forces users to write `topic=="/tasks/exit"`; here `topic==/tasks/exit` works as written, and a
value with a comma or a space in it is put in double quotes.

Objects are plain dicts and a field path walks nested dicts. A field is present when it holds a
scalar (strings as they are, booleans as `true`/`false`, numbers in decimal); None, maps, lists
and missing keys are absent, and an absent field fails `==`, `!=` and `~=` alike, as in
containerd's adaptors.

Regular expressions run on RE2, in time linear in the text: a pattern a client sends cannot stall
the actor matching it (Python's backtracking `re` would take forever on `(a+)+$`). Backreferences
and look-arounds, which RE2 refuses, are refused here with InvalidArgument as containerd does.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Iterable

from bus.errors import InvalidArgument

MAX_FILTER = 4096          # characters in one filter string
MAX_FILTERS = 64           # filter strings in one request

_SPACE = re.compile(r"\s*")
_FIELD = re.compile(r"[A-Za-z0-9_-]+")
_QUOTED = re.compile(r'"(?:[^"\\\n]|\\.)*"')
_OPERATOR = re.compile(r"[=!~]+")
_VALUE = re.compile(r"[^\s,]+")
_ESCAPE = re.compile(r"\\(x[0-9a-fA-F]{2}|u[0-9a-fA-F]{4}|U[0-9a-fA-F]{8}|[0-7]{3}|.)")
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v",
                   "\\": "\\", '"': '"'}


@dataclasses.dataclass(frozen=True, slots=True)
class Selector:
    path: tuple[str, ...]
    operator: str | None = None          # None: presence
    value: str | None = None
    pattern: object | None = None        # a compiled RE2 pattern, over UTF-8 bytes

    def match(self, obj: dict) -> bool:
        value = field_value(obj, self.path)
        if value is None:
            return False
        if self.operator is None:
            return True
        if self.operator == "==":
            return value == self.value
        if self.operator == "!=":
            return value != self.value
        return self.pattern.search(value.encode("utf-8", "surrogatepass")) is not None


@dataclasses.dataclass(frozen=True, slots=True)
class Matcher:
    """Any of `alternatives` matches when all of its selectors do; no alternatives matches all."""
    alternatives: tuple[tuple[Selector, ...], ...] = ()

    def match(self, obj: dict) -> bool:
        return not self.alternatives or any(all(s.match(obj) for s in alt) for alt in self.alternatives)


def field_value(obj: object, path: Iterable[str]) -> str | None:
    """The string form of the scalar at `path`, or None where the field is absent."""
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return None
        obj = obj[key]
    if isinstance(obj, bool):
        return "true" if obj else "false"
    if isinstance(obj, str):
        return obj
    if isinstance(obj, (int, float)):
        return str(obj)
    return None


def parse(filters: Iterable[str]) -> Matcher:
    filters = list(filters)
    if len(filters) > MAX_FILTERS:
        raise InvalidArgument(f"at most {MAX_FILTERS} filters")
    return Matcher(tuple(_Parser(f).filter() for f in filters))


class _Parser:
    def __init__(self, text: str):
        if not isinstance(text, str):
            raise InvalidArgument("a filter must be a string")
        if len(text) > MAX_FILTER:
            raise InvalidArgument(f"filter is longer than {MAX_FILTER} characters")
        if "\0" in text:
            raise InvalidArgument("filter contains a NUL character")
        self.text = text
        self.pos = 0

    def filter(self) -> tuple[Selector, ...]:
        if not self.text.strip():
            return ()
        selectors = [self.selector()]
        while self.take(","):
            selectors.append(self.selector())
        self.skip_space()
        if self.pos < len(self.text):
            self.fail("unexpected input")
        return tuple(selectors)

    def selector(self) -> Selector:
        path = [self.field()]
        while self.take("."):
            path.append(self.field())
        self.skip_space()
        if self.pos == len(self.text) or self.text[self.pos] == ",":
            return Selector(tuple(path))
        operator = self.expect(_OPERATOR, 'an operator ("==", "!=" or "~=")')
        if operator not in ("==", "!=", "~="):
            self.fail(f"unsupported operator {operator!r}", self.pos - len(operator))
        self.skip_space()
        start = self.pos
        value = self.quoted() if self.peek('"') else self.expect(_VALUE, "a value")
        if operator != "~=":
            return Selector(tuple(path), operator, value)
        try:
            return Selector(tuple(path), operator, value, _compile_regex(value))
        except ValueError as e:
            self.fail(f"bad regular expression: {e}", start)

    def field(self) -> str:
        self.skip_space()
        return self.quoted() if self.peek('"') else self.expect(_FIELD, "a field name or a quoted field")

    def quoted(self) -> str:
        start = self.pos
        raw = self.expect(_QUOTED, "a terminated quoted string")[1:-1]
        try:
            return _ESCAPE.sub(_unescape, raw)
        except ValueError as e:
            self.fail(str(e), start)

    # --- scanning ---------------------------------------------------------------------------

    def skip_space(self) -> None:
        self.pos = _SPACE.match(self.text, self.pos).end()

    def peek(self, char: str) -> bool:
        return self.text.startswith(char, self.pos)

    def take(self, char: str) -> bool:
        self.skip_space()
        if self.peek(char):
            self.pos += 1
            return True
        return False

    def expect(self, pattern: re.Pattern, what: str) -> str:
        m = pattern.match(self.text, self.pos)
        if m is None:
            self.fail(f"expected {what}")
        self.pos = m.end()
        return m.group()

    def fail(self, message: str, pos: int | None = None):
        pos = self.pos if pos is None else pos
        raise InvalidArgument(f"filter {self.text!r}: {message} at position {pos}")


def _compile_regex(text: str):
    """`text` compiled by RE2 (imported at the first `~=`), or ValueError saying why not."""
    import re2
    options = re2.Options()
    options.log_errors = False                      # refused patterns are the client's error, not ours
    try:
        return re2.compile(text.encode("utf-8", "surrogatepass"), options=options)
    except re2.error as e:
        reason = e.args[0] if e.args else "refused"
        raise ValueError(reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)) from None


def _unescape(m: re.Match) -> str:
    seq = m.group(1)
    if seq in _SIMPLE_ESCAPES:
        return _SIMPLE_ESCAPES[seq]
    if seq[0] in "xuU" and len(seq) > 1:
        if int(seq[1:], 16) > 0x10FFFF:
            raise ValueError(f"escape \\{seq} is past U+10FFFF")
        return chr(int(seq[1:], 16))
    if len(seq) == 3:
        return chr(int(seq, 8))
    raise ValueError(f"illegal escape sequence \\{seq}")
