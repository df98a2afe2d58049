"""The killer: every few seconds a random actor gets SIGKILL, and once, the whole daemon.

What is killed and when comes from the seed; the pids are whatever berthd has at that moment.
"""
from __future__ import annotations

import random
import threading
import time

from actors.registry import ACTORS
from tests.chaos.cluster import Cluster

ACTOR_NAMES = [spec.name for spec in ACTORS]
PAUSE = (2.0, 5.0)                  # seconds between two kills
RESTART_WINDOW = (0.3, 0.6)         # where in the run the whole daemon is killed


class Killer(threading.Thread):
    def __init__(self, cluster: Cluster, rng: random.Random, duration: float, say):
        super().__init__(name="killer", daemon=True)
        self.cluster, self.rng, self.say = cluster, rng, say
        self.stopping = threading.Event()
        self.restart_after = duration * rng.uniform(*RESTART_WINDOW)
        self.kills: list[tuple[float, str]] = []
        self.error = ""

    def stop(self) -> None:
        self.stopping.set()
        self.join()

    def run(self) -> None:
        try:
            self._run()
        except BaseException as e:          # reported as a violation: the chaos itself broke
            import traceback
            self.error = f"killer: {type(e).__name__}: {e}\n{traceback.format_exc()}"

    def _run(self) -> None:
        started = time.monotonic()
        restarted = False
        while not self.stopping.wait(self.rng.uniform(*PAUSE)):
            if not restarted and time.monotonic() - started >= self.restart_after:
                restarted = True
                self.say("killer: kill -9 berthd, then start it again")
                self.cluster.restart()
                self.kills.append((time.monotonic() - started, "berthd"))
                self.say("killer: berthd is ready again")
                continue
            name = self.rng.choice(ACTOR_NAMES)
            pid = self.cluster.kill_actor(name)
            if pid is not None:
                self.kills.append((time.monotonic() - started, name))
                self.say(f"killer: SIGKILL {name} (pid {pid})")
