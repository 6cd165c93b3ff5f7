"""How ``vtlha status`` draws a ``ClusterStatus`` (rich): the problems first, errors in
red and warnings in yellow, then per pair its operator state, its nodes, its groups and
its storage paths. Nothing here reads anything."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from vtlha.clusterstatus import ClusterStatus, DeviceState, GroupStatus, NodeStatus


def _secs(x: float | None) -> str:
    if x is None:
        return "-"
    if x < 0.01:
        return f"{x * 1000:.1f} ms"
    return f"{x * 1000:.0f} ms" if x < 1 else f"{x:.1f} s"


def _yes(ok: bool | None, yes: str = "yes", no: str = "no") -> Text:
    if ok is None:
        return Text("?", style="yellow")
    return Text(yes, style="green") if ok else Text(no, style="bold red")


def _header(st: ClusterStatus) -> Text:
    t = Text(f"cluster {st.cluster}", style="bold")
    if st.arbiter is None:
        t.append(", active arbiter: none", style="bold red")
    else:
        t.append(f", active arbiter: {st.arbiter.node} (term {st.arbiter.term})")
    t.append(f" (reports heard for {_secs(st.listened_s)}; vtlha {st.version})",
             style="dim")
    return t


def _problems(st: ClusterStatus) -> RenderableType:
    if not st.problems:
        return Text("no problems", style="green")
    t = Text()
    for i, p in enumerate(st.problems):
        if i:
            t.append("\n")
        if p.severity == "error":
            t.append("ERROR   ", style="bold red")
            t.append(p.text, style="red")
        else:
            t.append("warning ", style="yellow")
            t.append(p.text)
    return t


def _checks(n: NodeStatus) -> Text:
    """"3 ok" when every check passes, else each failing one."""
    if not n.checks:
        return Text("-", style="dim")
    failing = [c for c in n.checks if not c.ok]
    if not failing:
        return Text(f"{len(n.checks)} ok", style="green")
    t = Text()
    for i, c in enumerate(failing):
        t.append(", " if i else "")
        t.append(f"{c.name} FAILING", style="bold red" if c.fatal else "yellow")
    return t


def _leases(n: NodeStatus) -> Text:
    """How many groups its lease holder holds and acquires, and the least validity left
    (each group's own is in the groups table)."""
    holding = [x for x in n.leases if x.phase == "holding"]
    acquiring = len(n.leases) - len(holding)
    if not n.leases:
        return Text("-", style="dim")
    t = Text(f"{len(holding)} held" if holding else "")
    if holding:
        t.append(f" (>= {_secs(min(x.valid_for_s for x in holding))} left)", style="dim")
    if acquiring:
        t.append((", " if holding else "") + f"{acquiring} acquiring", style="yellow")
    return t


def _mgmt(n: NodeStatus) -> Text:
    m = n.mgmt
    if m is None:
        return Text("not heard", style="yellow")
    if not m.monitored:
        return Text("not monitored", style="dim")
    if not m.healthy:
        return Text("unhealthy" + (f": {m.detail}" if m.detail else ""), style="bold red")
    return Text(f"healthy (gateway {_secs(m.latency_s)})", style="green")


def _node_table(nodes: list[NodeStatus]) -> Table:
    t = Table(title="nodes", title_justify="left", box=None, pad_edge=False)
    for col in ("node", "up", "heartbeat", "incarnation", "checks", "management", "storage",
                "leases"):
        t.add_column(col)
    for n in nodes:
        t.add_row(n.name + (" (held down)" if n.held_down else "")
                  + (" (standby)" if n.standby else ""), _yes(n.up, "up", "DOWN"),
                  f"{_secs(n.heartbeat_age_s)} ago" if n.heartbeat_age_s is not None
                  else "none", n.incarnation or "-", _checks(n), _mgmt(n),
                  _yes(n.storage_ok, "all devices", "DEVICE LOST"), _leases(n))
    return t


def _group_table(groups: list[GroupStatus]) -> Table:
    t = Table(title="groups", title_justify="left", box=None, pad_edge=False)
    for col in ("group", "home", "owner", "epoch", "state", "served", "lease age",
                "valid for", "storage", "detail"):
        t.add_column(col)
    for g in groups:
        owner = Text(g.owner or "-", style="" if g.at_home or g.owner is None else "yellow")
        t.add_row(g.name, g.home, owner, str(g.epoch or "-"), g.state or "unassigned",
                  _yes(g.served), _secs(g.lease_age_s), _secs(g.lease_valid_for_s),
                  g.storage_state or "-", g.served_detail)
    return t


def _paths(d: DeviceState | None) -> Text:
    if d is None:
        return Text("-", style="dim")
    up = sum(p.reachable for p in d.paths)
    t = Text(f"{up}/{len(d.paths)} up", style="green" if d.reachable and up == len(d.paths)
             else "yellow" if d.reachable else "bold red")
    for p in d.paths:
        if not p.reachable:
            t.append(f"; path {p.path}: {p.error or 'down'}")
    latencies = [p.latency_s for p in d.paths if p.reachable and p.latency_s is not None]
    if latencies:
        t.append(f" (slowest {_secs(max(latencies))})", style="dim")
    return t


def _path_table(nodes: list[NodeStatus]) -> Table | None:
    devices = sorted({d.device for n in nodes for d in n.devices})
    if not devices:
        return None
    t = Table(title="storage paths", title_justify="left", box=None, pad_edge=False)
    t.add_column("device")
    for n in nodes:
        t.add_column(n.name)
    for dev in devices:
        t.add_row(dev, *(_paths(next((d for d in n.devices if d.device == dev), None))
                         for n in nodes))
    return t


def render(st: ClusterStatus) -> RenderableType:
    parts: list[RenderableType] = [_header(st), _problems(st)]
    for p in st.pairs:
        nodes = [n for n in st.nodes if n.pair == p.name]
        groups = [g for g in st.groups if g.pair == p.name]
        parts += [Text(""), Text(f"pair {p.name}: failback {p.failback}, maintenance "
                                 f"{'on' if p.maintenance else 'off'}, held down: "
                                 f"{', '.join(p.held_down) or '-'}, standby: "
                                 f"{', '.join(p.standby) or '-'}", style="bold"),
                  _node_table(nodes), _group_table(groups)]
        paths = _path_table(nodes)
        if paths is not None:
            parts.append(paths)
    return Group(*parts)
