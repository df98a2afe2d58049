"""Chaos: a real berthd under a real workload while its processes are killed, then its invariants.

    python -m tests.chaos --duration 600 [--seed N] [--clients 4]     (make chaos DURATION=600)

The workload (workload.py): busybox pulled from a local registry, then `run --rm` after `run --rm`
from several clients (the library, and the `berth` CLI for a share of them), each container exiting
with a random status; execs into a few long-running containers; subscribers counting every exit;
a puller pulling the image again now and then. Meanwhile (killer.py) a random actor is SIGKILLed
every few seconds, and once the whole daemon, which is started again on the same directories.
Clients retry what a kill cut off, without ever running a container twice.

Then (invariants.py): every run and exec finished with its own exit status; every exit is in the
event log exactly once, and each subscriber saw it exactly once; nothing is mounted, no shim, no
task directory and no runtime state is left beyond the running containers; every snapshot
directory has its record and every record its directory; every blob hashes to its digest; every
image, container and lease reference resolves. The long-running containers are then killed and
removed, and the same is checked of an empty daemon.

The seed is printed first and last: the same seed replays the same schedule (which actor is killed,
when, every exit status), though not the same interleaving of threads.
"""
