"""The shim's state machine (shimd.state): the table, the events each change publishes, their order."""
import itertools

import pytest

from bus.errors import AlreadyExists, FailedPrecondition, NotFound
from shimd.state import ALLOWED, EXEC, INIT, REFUSED, SILENT, TRANSITIONS, Process, Status, Task


class Recorder:
    """Collects what a process publishes and persists, in one list, in order."""

    def __init__(self):
        self.log: list[tuple] = []

    def publish(self, topic: str, event: dict) -> None:
        self.log.append(("publish", topic, dict(event)))

    def persist(self, proc: Process) -> None:
        self.log.append(("persist", proc.id, proc.exit_record()))

    @property
    def topics(self) -> list[str]:
        return [entry[1] for entry in self.log if entry[0] == "publish"]


def make(kind: str, status: Status, rec: Recorder) -> Process:
    proc = Process("c1", rec.publish, exec_id="e1" if kind == EXEC else "", bundle="/b", pid=42, status=status)
    if status in (Status.STOPPED, Status.DELETED):
        proc.exit_status, proc.exited_at = 3, 1000.5
    return proc


ALLOWED_CASES = [(kind, frm, to, topics[column])
                 for (frm, to), topics in TRANSITIONS.items()
                 for column, kind in enumerate((INIT, EXEC)) if topics[column] is not REFUSED]
REFUSED_CASES = [(kind, frm, to) for kind in (INIT, EXEC)
                 for frm, to in itertools.product(Status, Status) if to not in ALLOWED[kind][frm]]


def test_the_table_reads_as_the_style_guide_says():
    assert ALLOWED[INIT] == {
        Status.NEW: {Status.CREATED},
        Status.CREATED: {Status.RUNNING, Status.STOPPED},
        Status.RUNNING: {Status.PAUSED, Status.STOPPED},
        Status.PAUSED: {Status.RUNNING, Status.STOPPED},
        Status.STOPPED: {Status.DELETED},
        Status.DELETED: set(),
    }
    assert ALLOWED[EXEC] == {
        Status.NEW: {Status.CREATED},
        Status.CREATED: {Status.RUNNING, Status.STOPPED, Status.DELETED},
        Status.RUNNING: {Status.STOPPED},
        Status.PAUSED: set(),
        Status.STOPPED: {Status.DELETED},
        Status.DELETED: set(),
    }


@pytest.mark.parametrize("kind,frm,to,topic", ALLOWED_CASES,
                         ids=[f"{k}:{f}->{t}" for k, f, t, _ in ALLOWED_CASES])
def test_every_allowed_transition_changes_status_and_publishes_its_event(kind, frm, to, topic):
    rec = Recorder()
    proc = make(kind, frm, rec)
    proc.transition(to)
    assert proc.status is to
    assert rec.topics == ([] if topic == SILENT else [topic])


@pytest.mark.parametrize("kind,frm,to", REFUSED_CASES, ids=[f"{k}:{f}->{t}" for k, f, t in REFUSED_CASES])
def test_every_other_transition_is_refused_and_changes_nothing(kind, frm, to):
    rec = Recorder()
    proc = make(kind, frm, rec)
    with pytest.raises(FailedPrecondition) as err:
        proc.transition(to)
    assert proc.status is frm
    assert rec.log == []
    assert f"is {frm}, cannot become {to}" in str(err.value)


def test_refusals_say_what_to_do():
    rec = Recorder()
    with pytest.raises(FailedPrecondition, match=r"task c1 is running, cannot become deleted: kill it"):
        make(INIT, Status.RUNNING, rec).transition(Status.DELETED)
    with pytest.raises(FailedPrecondition, match=r"task c1 is created, cannot become deleted: kill it"):
        make(INIT, Status.CREATED, rec).transition(Status.DELETED)
    with pytest.raises(FailedPrecondition, match=r"exec e1 of task c1 is running, cannot become paused"):
        make(EXEC, Status.RUNNING, rec).transition(Status.PAUSED)
    with pytest.raises(FailedPrecondition, match=r"task c1 is stopped, cannot become running"):
        make(INIT, Status.STOPPED, rec).transition(Status.RUNNING)


def test_event_payloads():
    rec = Recorder()
    init = Process("c1", rec.publish, bundle="/bundles/c1", pid=0)
    init.pid = 42
    init.transition(Status.CREATED)
    init.transition(Status.RUNNING)
    init.transition(Status.PAUSED)
    init.transition(Status.RUNNING)
    init.exited(137, 1234.5, rec.persist)
    init.transition(Status.DELETED)
    exe = Process("c1", rec.publish, exec_id="e1")
    exe.transition(Status.CREATED)
    exe.pid = 43
    exe.transition(Status.RUNNING)
    exe.exited(0, 1235.0, rec.persist)
    assert [entry[1:] for entry in rec.log if entry[0] == "publish"] == [
        ("/tasks/create", {"container_id": "c1", "bundle": "/bundles/c1", "pid": 42}),
        ("/tasks/start", {"container_id": "c1", "pid": 42}),
        ("/tasks/paused", {"container_id": "c1"}),
        ("/tasks/resumed", {"container_id": "c1"}),
        ("/tasks/exit", {"container_id": "c1", "id": "c1", "pid": 42, "exit_status": 137, "exited_at": 1234.5}),
        ("/tasks/delete", {"container_id": "c1", "pid": 42, "exit_status": 137, "exited_at": 1234.5}),
        ("/tasks/exec-added", {"container_id": "c1", "exec_id": "e1"}),
        ("/tasks/exec-started", {"container_id": "c1", "exec_id": "e1", "pid": 43}),
        ("/tasks/exit", {"container_id": "c1", "id": "e1", "pid": 43, "exit_status": 0, "exited_at": 1235.0}),
    ]


def test_an_exit_is_persisted_before_it_is_published():
    rec = Recorder()
    proc = make(INIT, Status.RUNNING, rec)
    proc.exited(7, 99.0, rec.persist)
    assert rec.log == [
        ("persist", "c1", {"container_id": "c1", "exec_id": "", "pid": 42, "exit_status": 7, "exited_at": 99.0}),
        ("publish", "/tasks/exit", {"container_id": "c1", "id": "c1", "pid": 42, "exit_status": 7, "exited_at": 99.0}),
    ]


def test_a_refused_exit_persists_nothing():
    rec = Recorder()
    proc = make(INIT, Status.STOPPED, rec)
    with pytest.raises(FailedPrecondition):
        proc.exited(1, 2.0, rec.persist)
    assert rec.log == [] and proc.exit_status == 3


def new_task(rec: Recorder) -> Task:
    task = Task("c1", "/b", rec.publish, rec.persist)
    task.created(100)
    task.init.transition(Status.RUNNING)
    return task


def test_task_lifecycle_order_create_start_exit_delete():
    rec = Recorder()
    task = new_task(rec)
    assert task.init_exited(0, 5.0) == [task.init]
    task.init.transition(Status.DELETED)
    assert rec.topics == ["/tasks/create", "/tasks/start", "/tasks/exit", "/tasks/delete"]


def test_an_exec_exit_is_published_before_the_init_exit():
    rec = Recorder()
    task = new_task(rec)
    task.add_exec("e1")
    task.exec_starting("e1")
    task.exec_started("e1", 101)
    assert task.init_exited(137, 10.0) == []            # held: an exec is still live
    assert task.init.status is Status.RUNNING and task.init_has_exited
    stopped = task.exec_exited("e1", 137, 10.1)
    assert stopped == [task.execs["e1"], task.init]
    exits = [entry for entry in rec.log if entry[0] == "publish" and entry[1] == "/tasks/exit"]
    assert [e[2]["id"] for e in exits] == ["e1", "c1"]
    assert task.init.exit_status == 137 and task.init.exited_at == 10.0
    persisted = [entry[1] for entry in rec.log if entry[0] == "persist"]
    assert persisted == ["e1", "c1"]


def test_the_init_exit_waits_for_every_live_exec():
    rec = Recorder()
    task = new_task(rec)
    for e, pid in (("e1", 101), ("e2", 102)):
        task.add_exec(e)
        task.exec_starting(e)
        task.exec_started(e, pid)
    assert task.init_exited(0, 1.0) == []
    assert task.exec_exited("e2", 1, 1.1) == [task.execs["e2"]]
    assert task.exec_exited("e1", 2, 1.2) == [task.execs["e1"], task.init]
    assert [t for t in rec.topics if t == "/tasks/exit"] == ["/tasks/exit"] * 3
    assert rec.log[-1][2]["id"] == "c1"


def test_an_exec_that_fails_to_start_releases_a_held_init_exit():
    rec = Recorder()
    task = new_task(rec)
    task.add_exec("e1")
    task.exec_starting("e1")
    assert task.init_exited(1, 3.0) == []
    assert task.exec_start_failed("e1") == [task.init]
    assert task.execs["e1"].status is Status.CREATED
    assert rec.topics[-1] == "/tasks/exit"


def test_no_exec_once_the_init_has_exited_or_before_it_runs():
    rec = Recorder()
    task = Task("c1", "/b", rec.publish, rec.persist)
    with pytest.raises(FailedPrecondition, match="it is new, not running"):
        task.add_exec("e1")
    task.created(100)
    with pytest.raises(FailedPrecondition, match="it is created, not running"):
        task.add_exec("e1")
    task.init.transition(Status.RUNNING)
    task.add_exec("e1")
    task.exec_starting("e1")
    task.exec_started("e1", 101)
    task.add_exec("e2")
    task.init_exited(0, 1.0)                      # held behind e1
    with pytest.raises(FailedPrecondition, match="it is exiting"):
        task.exec_starting("e2")
    with pytest.raises(FailedPrecondition, match="it is exiting"):
        task.add_exec("e3")


def test_exec_ids_are_unique_and_looked_up():
    rec = Recorder()
    task = new_task(rec)
    task.add_exec("e1")
    with pytest.raises(AlreadyExists):
        task.add_exec("e1")
    with pytest.raises(NotFound):
        task.process("nope")
    assert task.process("") is task.init


def test_exec_delete_removes_it_silently_and_only_when_not_running():
    rec = Recorder()
    task = new_task(rec)
    task.add_exec("e1")
    task.exec_starting("e1")
    task.exec_started("e1", 101)
    with pytest.raises(FailedPrecondition, match="exec e1 of task c1 is running, cannot become deleted"):
        task.delete_exec("e1")
    task.exec_exited("e1", 0, 2.0)
    before = list(rec.log)
    task.delete_exec("e1")
    assert rec.log == before and "e1" not in task.execs
    task.add_exec("e2")                           # never started: may go straight away
    task.delete_exec("e2")
    assert task.execs == {}


def test_a_second_exit_for_the_same_process_is_ignored():
    rec = Recorder()
    task = new_task(rec)
    task.init_exited(1, 1.0)
    assert task.init_exited(2, 2.0) == []
    assert task.init.exit_status == 1
    assert rec.topics.count("/tasks/exit") == 1


def test_report_lists_execs():
    rec = Recorder()
    task = new_task(rec)
    task.add_exec("e1")
    report = task.report()
    assert report["status"] == "running" and report["pid"] == 100 and report["bundle"] == "/b"
    assert report["execs"] == {"e1": {"id": "e1", "exec_id": "e1", "pid": 0, "status": "created",
                                      "exit_status": None, "exited_at": None}}
