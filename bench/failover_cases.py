"""The failover benchmark's cases and settings (``bench/failover.py``): what each case
does to node-a and what it measures, the probes' rates, the default trials, where the
state file and the plot go."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.common import RESULTS
from bench.labkit import NODES

ROOT = Path(__file__).resolve().parent.parent
LOG = logging.getLogger("bench.failover")
BIN = Path(sys.executable).parent
A, B = NODES
MGMT_VIP = "203.0.113.101"  # node-a's management address in examples/cluster.yaml
FAILBACK_HOLD = 2.0  # s: the pair's failback_hold_time here, as in the chaos suite
DEFAULT_TRIALS = {0.1: 30, 1.0: 10}
STATE = RESULTS / "failover-state.jsonl"
PLOT = ROOT / "docs" / "img" / "failover-outage.png"
TCP_INTERVAL, TCP_TIMEOUT, ARP_INTERVAL = 0.005, 0.05, 0.01
#: the client's TCP probe starts an attempt every TCP_INTERVAL whatever the earlier ones
#: are doing ("overlapping"): a sequential probe lets one attempt to a silent (fenced)
#: address hold the next back for TCP_TIMEOUT, which a killed holder that keeps answering
#: (keepalived's) never does — up to 55 ms charged to the safe side alone. Recorded in
#: every trial ("tcp_probe"); the runs before 2026-12-07 22:40 UTC were "sequential".
TCP_PROBE = "overlapping"
TAPE_INTERVAL = 0.02
#: the ``data-reconnect`` case's tape client gives a connect up after this and sends a
#: new SYN (the ``data`` case's client waits 2 s, and TCP sends a lost SYN again after 1 s)
TAPE_RECONNECT = 0.2
EXIT_PAUSED = 75
OWNER = os.getpid()  # this process; pyroute2 forks helpers that must own nothing


@dataclass(frozen=True)
class Case:
    name: str
    does: str
    measured: str
    keepalived: bool = False
    mgmt: bool = False  # probed on the management network (node-a's management address)


CASES = {c.name: c for c in (
    Case("links", "node-a's links down", "fault -> node-b answers", keepalived=True),
    Case("crash", "every process of node-a SIGKILLed, links up", "fault -> node-b answers",
         keepalived=True),
    Case("frozen", "every process of node-a SIGSTOPped (nats-server too)",
         "fault -> node-b answers", keepalived=True),
    Case("fatal", "node-a's fatal check fails (pid file removed)",
         "check failing -> node-b answers"),
    Case("mgmt", "node-a's management link down", "fault -> node-b answers (mgmt address)",
         mgmt=True),
    Case("switchover", "`vtlha switchover node-a-data`", "last node-a -> first node-b answer"),
    Case("data", "node-a crashes under the tape client", "longest gap between acked blocks"),
    Case("data-reconnect", "as data; the client gives a connect up after 0.2 s",
         "longest gap between acked blocks"),
    Case("split", "node-a and node-b cut from each other", "longest gap in the answers",
         keepalived=True),
)}
