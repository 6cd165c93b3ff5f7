"""Hostile input on every subject of a cluster: malformed JSON, wrong types, huge and
negative numbers, NaN, oversized messages, and well-formed commands with stale terms.
Every one must be counted and dropped (or refused) and move nothing. Built by hand, not
with the runtime's schemas, so it tests them rather than agreeing with them."""

from __future__ import annotations

import contextlib
import json
import time

import nats
import nats.errors

SERVICES = ("heartbeat", "ip-manager", "storage-monitor")
VERBS = ("switchover", "failback", "maintenance", "clear-hold", "standby", "failback-mode")


def payloads(cluster: str, node: str, group: str) -> list[bytes]:
    env = {"v": 1, "cluster": cluster, "node": node, "sent_at": time.time()}
    return [
        b"", b"not json", b"{", b"[]", b"null", b'"string"', b"\xff\xfe\x00",
        b'{"v": 1}',
        json.dumps({"v": "one", "cluster": 7, "node": None, "sent_at": "now"}).encode(),
        b'{"v": 1, "cluster": "' + cluster.encode() + b'", "sent_at": NaN}',
        json.dumps({**env, "seq": -1, "incarnation": 10**30, "interval": -5}).encode(),
        json.dumps({**env, "group": group, "epoch": -1, "valid_until": 1e308}).encode(),
        json.dumps({**env, "term": 0, "epoch": 0, "group": group, "action": "release"}).encode(),
        json.dumps({**env, "term": 1, "epoch": 1, "group": group, "action": "acquire"}).encode(),
        json.dumps({**env, "verb": "failback", "pair": "x" * 5000}).encode(),
        b"{" + b'"k": 1,' * 12000 + b'"z": 0}',  # ~84 KiB
    ]


def subjects(cluster: str, nodes: list[str]) -> list[str]:
    out = []
    for n in nodes:
        out += [f"ha.{cluster}.{k}.{n}" for k in ("hb", "storage", "mgmt", "lease", "promise")]
        out += [f"ha.{cluster}.cmd.{n}.{s}" for s in SERVICES]
        out += [f"ha.{cluster}.ping.{n}.{s}" for s in SERVICES]
    out += [f"ha.{cluster}.admin.{v}" for v in VERBS]
    out.append(f"ha.{cluster}.events.chaos.hostile")
    return out


async def send_hostile(urls: list[str], cluster: str, nodes: list[str]) -> int:
    """Publish (and request, where someone answers) every payload on every subject;
    returns how many messages were sent."""
    nc = await nats.connect(urls, connect_timeout=2, allow_reconnect=False)
    sent = 0
    try:
        for subject in subjects(cluster, nodes):
            node = subject.split(".")[3] if subject.split(".")[3] in nodes else nodes[0]
            group = f"{nodes[0]}-data"
            for data in payloads(cluster, node, group):
                with contextlib.suppress(nats.errors.Error, TimeoutError):
                    if ".cmd." in subject or ".admin." in subject or ".promise." in subject:
                        await nc.request(subject, data, timeout=0.2)
                    else:
                        await nc.publish(subject, data)
                sent += 1
        await nc.flush(timeout=2)
    finally:
        await nc.close()
    return sent
