"""Scheduling priority of the HA services.

A lease is only as good as the process renewing it: on a busy host (a backup job, a
rebuild, a test run on a 2-core machine) a service at the default priority can wait
hundreds of milliseconds for a CPU, its notices arrive after they lapse, and the node
lets go of its own groups for nothing (seen in the lab at load 5 on 2 cores: the
ip-manager's 0.1 s loops ran 0.4 s late and dropped node-b's own addresses). Corosync
(SCHED_RR) and keepalived (``vrrp_rt_priority``) raise their priority for the same
reason. Here the services raise their *nice* value (``scheduling.nice``, default -10:
about nine times the CPU share of a default process under contention), not a real-time
class: a service that spins at a real-time priority could starve the host itself.

Raising needs root or ``CAP_SYS_NICE`` (the rendered containers have it); without it
the service says so once and runs at its inherited priority.

``python3 -m vtlha.priority NICE COMMAND [ARG...]`` runs a program that does not raise
itself (the containers' nats-server) at ``NICE`` the same way: an absolute value,
raised only, a warning when not allowed, then ``exec``. (coreutils ``nice -n`` adds to
the inherited value: a container started from a niced shell would get less.)"""

from __future__ import annotations

import logging
import os
import sys

_warned = False  # the warning is given once per process (a lab raises many children)


def raise_priority(nice: int, log: logging.Logger, pid: int = 0) -> bool:
    """Set process ``pid`` (0: this one) to ``nice`` if that raises its priority; False
    (and, the first time, a warning) if the host does not allow it. Never lowers a
    priority."""
    try:
        current = os.getpriority(os.PRIO_PROCESS, pid)
    except ProcessLookupError:
        return False
    if nice >= current:
        return True
    try:
        os.setpriority(os.PRIO_PROCESS, pid, nice)
    except PermissionError:
        global _warned
        if _warned:
            return False
        _warned = True
        log.warning("cannot raise the scheduling priority (needs root or CAP_SYS_NICE): "
                    "running at the default; under CPU contention leases may lapse",
                    extra={"nice": nice, "current": current})
        return False
    except ProcessLookupError:
        return False
    log.info("scheduling priority raised", extra={"nice": nice, "pid": pid or os.getpid()})
    return True


def main(argv: list[str]) -> int:
    """``NICE COMMAND [ARG...]``: raise this process to ``NICE``, then exec COMMAND."""
    if len(argv) < 2 or not argv[0].lstrip("-").isdigit():
        print("usage: python3 -m vtlha.priority NICE COMMAND [ARG...]", file=sys.stderr)
        return 2
    from vtlha.log import setup_logging

    raise_priority(int(argv[0]), setup_logging("priority", os.uname().nodename))
    try:
        os.execvp(argv[1], argv[1:])
    except OSError as exc:
        print(f"{argv[1]}: {exc.strerror}", file=sys.stderr)
        return 127


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
