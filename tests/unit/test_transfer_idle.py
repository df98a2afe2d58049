"""When the transfer actor asks to be forked afresh: only after a transfer, once idle for
`renew_after` seconds, and never with a request in hand or waiting (the worker is a stand-in:
this is the decision alone; tests/integration/test_transfer_renew.py runs the real thing)."""
from __future__ import annotations

from actors.transfer import TransferActor


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Socket:
    def __init__(self):
        self.waiting = 0

    def poll(self, timeout: int) -> int:
        return self.waiting


class Worker:
    def __init__(self):
        self.in_flight = 0
        self.sock = Socket()
        self.stopped = False

    def stop(self) -> None:
        self.stopped = True


def actor() -> tuple[TransferActor, Clock, Worker]:
    clock = Clock()
    transfer = TransferActor(renew_after=5.0, clock=clock)
    transfer.worker = Worker()
    return transfer, clock, transfer.worker


def finish_a_transfer(transfer: TransferActor) -> None:
    assert list(transfer._with_progress(lambda progress: progress({"status": "done"}) or "ok")) == \
        [{"progress": {"status": "done"}}]


def test_an_actor_that_never_transferred_stays():
    transfer, clock, worker = actor()
    clock.now += 3600
    transfer._renew_when_idle()
    assert not worker.stopped and not transfer.renew


def test_it_renews_once_idle_long_enough_after_a_transfer():
    transfer, clock, worker = actor()
    finish_a_transfer(transfer)
    clock.now += 4.9
    transfer._renew_when_idle()
    assert not worker.stopped
    clock.now += 0.1
    transfer._renew_when_idle()
    assert worker.stopped and transfer.renew


def test_it_stays_while_a_request_is_in_hand_or_waiting():
    transfer, clock, worker = actor()
    finish_a_transfer(transfer)
    clock.now += 60
    worker.in_flight = 1
    transfer._renew_when_idle()
    worker.in_flight, worker.sock.waiting = 0, 1
    transfer._renew_when_idle()
    transfer.active, worker.sock.waiting = 1, 0
    transfer._renew_when_idle()
    assert not worker.stopped
    transfer.active = 0
    transfer._renew_when_idle()
    assert worker.stopped


def test_idle_time_counts_from_the_end_of_the_last_transfer():
    transfer, clock, worker = actor()
    finish_a_transfer(transfer)
    clock.now += 4
    finish_a_transfer(transfer)
    clock.now += 4
    transfer._renew_when_idle()
    assert not worker.stopped
    clock.now += 1
    transfer._renew_when_idle()
    assert worker.stopped
