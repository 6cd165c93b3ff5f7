"""The reference tape data service: what fails over must be real enough to lose data.

- :mod:`vtlha.tape.service`: the data service of one data group, on its owner. It
  presents the group's devices to clients over TCP on the group's portal address and
  writes through the SAN target at the group's epoch (so the target refuses it once
  the companion has preempted); it acknowledges a block only after the target has
  written it with FUA.
- :mod:`vtlha.tape.agent`: its resource agent (``builtin:tape``): start, stop,
  monitor.
- :mod:`vtlha_lab.tapeclient`: a client that writes numbered blocks and reads them back
  (``vtlha-lab tape write|verify``), reconnecting across failovers.

The service and its agent ship with the runtime (the default resource of a data group,
started by the storage-monitor); a site replaces it with its VTL daemon's agent.
"""
