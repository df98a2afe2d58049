"""The transfer actor gives back what a pull leaves behind: idle for `[transfer] renew_after`
seconds after a transfer, it exits and the supervisor forks a fresh one from the template. That is
no crash (no restart counted, no backoff), a pull in progress is never cut, and requests sent
across the swap are answered."""
from __future__ import annotations

import concurrent.futures
import threading

from tests.support import wait_until


def start(make_daemon, tmp_path, renew_after: float, env: dict | None = None):
    config = tmp_path / "config.toml"
    config.write_text(f"[transfer]\nrenew_after = {renew_after}\n")
    return make_daemon(args=["--config", str(config)], env=env).start()


def transfer(client) -> dict:
    return next(a for a in client.actors()["actors"] if a["name"] == "transfer")


def private_dirty_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("Private_Dirty:"))


def test_after_a_pull_the_transfer_actor_starts_afresh_and_smaller(make_daemon, tmp_path, registry, busybox_image):
    d = start(make_daemon, tmp_path, 0.5)
    ref = f"{registry.host}/busybox:latest"
    registry.push(busybox_image, "busybox:latest")
    client = d.client(timeout=60)
    client.pull(ref, plain_http=True)
    worked = transfer(client)
    worked_size = private_dirty_kib(worked["pid"])


    def fresh_one():
        t = transfer(client)
        return t["pid"] not in (None, worked["pid"]) and t["status"] == "running" and t
    fresh = wait_until(fresh_one, 20, what="a fresh transfer actor")
    assert fresh["renewals"] == 1 and fresh["restarts"] == 0, fresh
    assert private_dirty_kib(fresh["pid"]) < worked_size / 2, (worked_size, private_dirty_kib(fresh["pid"]))
    assert "restarting in" not in d.log()                 # no crash, no backoff

    # The fresh one pulls as the first did (into another namespace: all of it again).
    image = d.client("other", timeout=60).pull(ref, plain_http=True)
    assert image["name"] == ref
    assert ref in d.cli("images", "ls", "-q", namespace="other").stdout.split()


def test_a_pull_in_progress_is_not_cut_short(make_daemon, tmp_path, registry, busybox_image):
    d = start(make_daemon, tmp_path, 0.1, env={"BERTH_FAILPOINTS": "transfer.fetch=1*delay(1500)"})
    ref = f"{registry.host}/busybox:latest"
    registry.push(busybox_image, "busybox:latest")
    client = d.client(timeout=60)
    before = transfer(client)["pid"]
    seen: set[int] = set()
    done = threading.Event()

    def pull() -> dict:
        try:
            return d.client(timeout=60).pull(ref, plain_http=True)
        finally:
            done.set()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        future = pool.submit(pull)
        while not done.wait(0.05):
            seen.add(transfer(client)["pid"])
        assert future.result()["name"] == ref
    assert seen == {before}
    after = wait_until(lambda: (t := transfer(client))["renewals"] == 1 and t, 20, what="the renewal")
    assert after["restarts"] == 0


def test_requests_sent_while_it_renews_are_answered(make_daemon, tmp_path, registry, busybox_image):
    d = start(make_daemon, tmp_path, 0.2)
    ref = f"{registry.host}/busybox:latest"
    registry.push(busybox_image, "busybox:latest")
    client = d.client(timeout=30)
    client.pull(ref, plain_http=True)
    first = transfer(client)["pid"]
    answers = []
    while transfer(client)["renewals"] == 0:          # one request after another, across the swap
        answers.append(client.call("transfer", "active_transfers"))
        assert len(answers) < 10_000, "the transfer actor never renewed"
    answers.append(client.call("transfer", "active_transfers"))
    assert all(a["active"] == 0 for a in answers) and answers[-1]["worked"] is False
    assert transfer(client)["pid"] != first
