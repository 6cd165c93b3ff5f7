"""A deterministic simulator of the shipped protocol classes (issue 15).

One seed is one replayable history (STYLE.md "Simulation"): the real ``LeaseHolder``,
``HoldGate``, ``Election``, ``FencingStore`` and takeover rules run against a simulated
clock (one monotonic offset per host), network (delay, loss, duplication, reordering,
partitions), KV (compare-and-set, revisions, stale follower reads, writes that commit but
time out, stalled and replayed watches) and processes (crash, restart, pause).

- ``timings``: the timings and the liveness bound (the formula of ``docs/safety.md``)
- ``world``: the clock, the event queue, processes and the trace
- ``network``: links and message delivery
- ``kv``: the KV bucket
- ``nodes``: lease holders and executors
- ``arbiter``: the arbiters (election, term announcement, decisions, the mover)
- ``faults``: a seed's fault plan
- ``invariants``: the checks run at every step
- ``runner``: one history from a seed
"""
