"""The reference SAN target: test and demo infrastructure standing in for a real SAN.

On the appliance the nodes reach their shared devices through a SAN that enforces
SCSI-3 persistent reservations, so that a writer cannot fence itself: a node paused
between its lease check and its write has its late write refused by the SAN, not by
its own (stale) belief. This package is a small stand-in for that SAN, outside the
nodes, so that the storage fence is enforced for real in tests and demos:

- :mod:`vtlha.san.protocol`: length-prefixed frames (JSON header + binary payload);
- the target itself (asyncio TCP, one port per path index, reservations persisted, an
  audit log of every write and reservation change) is lab infrastructure:
  :mod:`vtlha_lab.santarget`, never imported by the runtime;
- :mod:`vtlha.san.client`: an asyncio client for one path of one node.

It is not a SCSI implementation and not meant for production data.
"""

from vtlha.san.client import SanClient, SanConnectionError, SanError, SanRefused, SanTimeout

__all__ = [
    "SanClient",
    "SanConnectionError",
    "SanError",
    "SanRefused",
    "SanTimeout",
]
