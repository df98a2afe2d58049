"""bus.failpoints: the term grammar, counts and chains, the shared table, and the sites."""
from __future__ import annotations

import os
import re
import time

import pytest

from actors.config import Config
from bus import failpoints
from bus.errors import (DeadlineExceeded, InvalidArgument, NotFound, NotImplementedErr, PermissionDenied,
                        ResourceExhausted, Unavailable)
from bus.failpoints import Step, next_step, parse, parse_term
from tests.support import REPO


@pytest.fixture
def table(tmp_path, monkeypatch):
    """This process's failpoint table, as berthd's supervisor makes it; undone afterwards."""
    monkeypatch.setattr(failpoints, "_table", None)
    monkeypatch.setattr(failpoints, "_armed", bytearray(1))
    return failpoints.share(str(tmp_path / "failpoints.lock"), {})


# --- the grammar ----------------------------------------------------------------------------------

def test_a_step_is_an_action_with_an_optional_count():
    assert parse_term("crash") == [Step(None, "crash")]
    assert parse_term("3*crash") == [Step(3, "crash")]
    assert parse_term("error(Unavailable)") == [Step(None, "error", "Unavailable")]
    assert parse_term("1*error(NotFound)") == [Step(1, "error", "NotFound")]
    assert parse_term("delay(250)") == [Step(None, "delay", 250)]
    assert parse_term("off") == [Step(None, "off")]
    assert parse_term("0*off") == [Step(0, "off")]


def test_steps_chain_and_print_as_they_were_written():
    term = "2*off->1*error(Unavailable)->delay(10)"
    assert parse_term(term) == [Step(2, "off"), Step(1, "error", "Unavailable"), Step(None, "delay", 10)]
    assert failpoints.format_term(parse_term(term)) == term
    assert failpoints.format_term(parse_term(" 1*crash -> off ")) == "1*crash->off"


def test_every_error_code_of_the_table_is_accepted():
    for code in ("InvalidArgument", "NotFound", "AlreadyExists", "FailedPrecondition", "Unavailable",
                 "DeadlineExceeded", "PermissionDenied", "ResourceExhausted", "NotImplemented", "Internal"):
        assert parse_term(f"error({code})") == [Step(None, "error", code)]


@pytest.mark.parametrize("term", [
    "", "  ", "crush", "1*", "*crash", "-1*crash", "1**crash", "crash()", "error", "error()",
    "error(Nope)", "error(unavailable)", "delay", "delay()", "delay(x)", "delay(-5)", "delay(600001)",
    "1*crash->", "->crash", "crash->->off", "1*crash;off", "2000000000*crash", "off(1)",
])
def test_a_bad_term_is_invalid_argument_that_says_what_is_expected(term):
    with pytest.raises(InvalidArgument) as e:
        parse_term(term)
    assert "crash" in str(e.value) or "error code" in str(e.value) or "more than" in str(e.value)


def test_a_bad_error_code_lists_the_codes():
    with pytest.raises(InvalidArgument, match="one of InvalidArgument, NotFound"):
        parse_term("error(Nope)")


def test_a_spec_names_sites_and_scoped_sites():
    assert parse("content.commit=1*crash; metadata.commit = 2*off->error(Unavailable);") == {
        "content.commit": "1*crash", "metadata.commit": "2*off->error(Unavailable)"}
    assert parse("worker.dispatch.content.writer_open=delay(5);router.forward.berth-x=off") == {
        "worker.dispatch.content.writer_open": "delay(5)", "router.forward.berth-x": "off"}
    assert parse("events.publish.tasks.exec-added=crash") == {"events.publish.tasks.exec-added": "crash"}
    assert parse("content.commit=crash;content.commit=off") == {"content.commit": "off"}
    assert parse("") == {} and parse(" ; ") == {}


@pytest.mark.parametrize("spec, message", [
    ("content.comit=crash", "no failpoint site 'content.comit'"),
    ("content.commit.x=crash", "no failpoint site"),             # only some sites take a scope
    ("worker.dispatch.=crash", "no failpoint site"),
    ("worker.dispatch.content info=crash", "no failpoint site"),
    ("content.commit", "expected name=term"),
    ("content.commit=", "must not be empty"),
    ("content.commit=boom", "bad failpoint step 'boom'"),
    ("worker.dispatch." + "x" * 200 + "=crash", "at most"),
])
def test_a_bad_spec_is_invalid_argument(spec, message):
    with pytest.raises(InvalidArgument, match=re.escape(message)):
        parse(spec)


def test_the_config_file_carries_a_spec(tmp_path):
    path = tmp_path / "config.toml"
    path.write_text('failpoints = "content.commit=1*crash"\n')
    assert Config.load(str(path), root=str(tmp_path)).failpoints == "content.commit=1*crash"
    path.write_text('failpoints = ["content.commit"]\n')
    with pytest.raises(InvalidArgument, match="must be a string"):
        parse(Config.load(str(path), root=str(tmp_path)).failpoints)


# --- counts and chains ------------------------------------------------------------------------------

def test_counts_run_down_and_a_chain_moves_on():
    steps = parse_term("2*off->1*error(Unavailable)")
    assert [str(next_step(steps)) for _ in range(4)] == ["1*off", "0*off", "0*error(Unavailable)", "None"]
    assert failpoints.format_term(steps) == "0*off->0*error(Unavailable)"


def test_a_step_without_a_count_runs_every_time_and_hides_what_follows():
    steps = parse_term("1*off->delay(1)->crash")
    assert [s.action for s in (next_step(steps) for _ in range(5))] == ["off", "delay", "delay", "delay", "delay"]


# --- the table and the sites ------------------------------------------------------------------------

def test_without_a_table_a_site_never_fires(monkeypatch):
    monkeypatch.setattr(failpoints, "_table", None)
    monkeypatch.setattr(failpoints, "_armed", bytearray(1))
    failpoints.fail("content.commit")                 # nothing happens, nothing to raise


def test_error_raises_the_class_of_its_code_then_the_site_is_quiet(table):
    table.set("metadata.commit", "1*off->2*error(Unavailable)->1*error(PermissionDenied)")
    failpoints.fail("metadata.commit")
    for expected in (Unavailable, Unavailable, PermissionDenied):
        with pytest.raises(expected, match=f"failpoint metadata.commit: injected {expected.code.value}"):
            failpoints.fail("metadata.commit")
    failpoints.fail("metadata.commit")
    assert table.read() == {"metadata.commit": "0*off->0*error(Unavailable)->0*error(PermissionDenied)"}
    assert not table.armed                            # nothing left to run: sites are back to one byte test


def test_delay_sleeps_and_off_does_nothing(table):
    table.set("snapshot.apply", "1*off->1*delay(120)")
    started = time.monotonic()
    failpoints.fail("snapshot.apply")
    assert time.monotonic() - started < 0.1
    failpoints.fail("snapshot.apply")
    assert time.monotonic() - started >= 0.12


def test_other_sites_are_not_touched(table):
    table.set("content.commit", "error(Internal)")
    failpoints.fail("content.write")
    failpoints.fail("worker.dispatch", "content", "commit")
    assert table.read() == {"content.commit": "error(Internal)"}


def test_the_most_specific_failpoint_with_a_step_left_fires(table):
    table.set("worker.dispatch", "error(Unavailable)")
    table.set("worker.dispatch.content", "1*error(NotFound)")
    table.set("worker.dispatch.content.commit", "1*error(DeadlineExceeded)")
    with pytest.raises(DeadlineExceeded, match="worker.dispatch.content.commit"):
        failpoints.fail("worker.dispatch", "content", "commit")
    with pytest.raises(NotFound, match="worker.dispatch.content:"):
        failpoints.fail("worker.dispatch", "content", "commit")
    with pytest.raises(Unavailable, match="worker.dispatch:"):
        failpoints.fail("worker.dispatch", "content", "commit")
    with pytest.raises(Unavailable):
        failpoints.fail("worker.dispatch", "metadata", "gc")


def test_a_topic_scopes_events_publish(table):
    table.set("events.publish.tasks.exit", "1*error(Unavailable)")
    failpoints.fail("events.publish", "/tasks/start")
    with pytest.raises(Unavailable, match="events.publish.tasks.exit"):
        failpoints.fail("events.publish", "/tasks/exit")


def test_counts_are_shared_with_forked_processes_and_a_crash_spends_its_step_first(table):
    table.set("content.commit", "1*off->1*crash")
    pid = os.fork()
    if pid == 0:
        failpoints.fail("content.commit")              # off: the child goes on
        failpoints.fail("content.commit")              # crash
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == failpoints.CRASH_EXIT
    assert table.read() == {"content.commit": "0*off->0*crash"}
    failpoints.fail("content.commit")                  # spent for every process: no second crash


def test_a_table_larger_than_its_region_is_refused(table):
    with pytest.raises(ResourceExhausted):
        for n in range(1000):
            table.set(f"worker.dispatch.content.{'m' * 130}{n}", "1*delay(1)->1*delay(2)->1*error(Unavailable)")
    assert 100 < len(table.read()) < 1000              # what fitted is still there, readable


# --- the berth service's methods ------------------------------------------------------------------

def test_the_service_lists_sets_and_clears(table):
    assert failpoints.serve("failpoints", {}) == []
    assert failpoints.serve("set_failpoint", {"name": "content.commit", "term": "1*crash"}) == \
        {"name": "content.commit", "term": "1*crash"}
    failpoints.serve("set_failpoint", {"name": "router.forward.content", "term": "delay(5)"})
    assert failpoints.serve("failpoints", {}) == [{"name": "content.commit", "term": "1*crash"},
                                                  {"name": "router.forward.content", "term": "delay(5)"}]
    assert failpoints.serve("clear_failpoints", {"name": "content.commit"}) == {"cleared": ["content.commit"]}
    with pytest.raises(NotFound, match="content.commit is not set"):
        failpoints.serve("clear_failpoints", {"name": "content.commit"})
    assert failpoints.serve("clear_failpoints", {}) == {"cleared": ["router.forward.content"]}
    assert failpoints.serve("failpoints", {}) == []


@pytest.mark.parametrize("method, args", [
    ("set_failpoint", {"name": "content.commit"}),
    ("set_failpoint", {"name": "content.commit", "term": 5}),
    ("set_failpoint", {"name": 5, "term": "crash"}),
    ("set_failpoint", {"name": "nowhere", "term": "crash"}),
    ("set_failpoint", {"name": "content.commit", "term": "crash->"}),
    ("clear_failpoints", {"name": ["content.commit"]}),
])
def test_the_service_refuses_bad_arguments(table, method, args):
    with pytest.raises(InvalidArgument):
        failpoints.serve(method, args)
    assert failpoints.serve("failpoints", {}) == []


def test_the_service_has_no_other_methods(table):
    with pytest.raises(NotImplementedErr):
        failpoints.serve("set_failpoints", {})


# --- the sites in the code and in the documentation --------------------------------------------------

def test_every_site_in_the_code_is_known_and_documented():
    calls = set()
    for directory in ("bus", "actors", "shimd", "berth"):
        for dirpath, _, names in os.walk(os.path.join(REPO, directory)):
            for name in names:
                if name.endswith(".py"):
                    with open(os.path.join(dirpath, name)) as f:
                        calls |= set(re.findall(r'failpoints\.fail\("([a-z.]+)"', f.read()))
    assert calls == failpoints.SITES
    with open(os.path.join(REPO, "docs", "failpoints.md")) as f:
        documented = set(re.findall(r"^\| `([a-z]+\.[a-z.]+)` \|", f.read(), re.M))
    assert documented == failpoints.SITES
