"""One size of ``bench/scale.py``, measured (on a ``Testbed``): the arbiter's steady
state (CPU, RSS, event-loop lag, heartbeats validated, decisions) and the silences (one
node at a time goes silent; when the ``node.down`` event and the claim in the KV
came), from the event stream, the KV, ``/proc`` and the arbiter's metrics."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from bench.scale_arbiter import log_summary, start_failure
from bench.scale_cluster import renewed_pairs
from bench.scale_measure import (
    cpu_seconds,
    histogram_quantile,
    parse_metrics,
    rss_mb,
    summarise,
)
from bench.scale_report import fmt_s
from bench.scale_testbed import Testbed
from vtlha.messages import Event, GroupRecord, decode

MSG_LIMIT = 64 * 1024  # vtlha.messages.MAX_MESSAGE_BYTES: what decode accepts by default


@dataclass
class Silence:
    node: str
    renewed: bool
    groups: list[str]
    last_hb: float
    down: asyncio.Future[tuple[float, float]]  # (sent_at, seen)
    claims: dict[str, asyncio.Future[tuple[float, float]]]  # group -> (since, seen)


class Coordinator(Testbed):
    """One size: start everything, measure, stop everything."""

    def __init__(self, n_pairs: int, args: argparse.Namespace, work: Path) -> None:
        super().__init__(n_pairs, args, work)
        self.events: list[dict[str, Any]] = []
        self.silences: dict[str, Silence] = {}
        self.ever_silenced: set[str] = set()

    # ---- the event stream ------------------------------------------------------------------
    async def follow_events(self) -> None:
        """Every event the stream stores, as it is stored (an ordered consumer; read raw:
        a decision event carries the whole snapshot and may exceed what ``decode``
        accepts by default, which is recorded)."""
        from nats.js.api import ConsumerConfig, DeliverPolicy

        async def on_event(msg: Any) -> None:
            seen = time.time()
            try:
                ev = orjson.loads(msg.data)
            except orjson.JSONDecodeError:
                return
            kind = ev.get("kind")
            rec = {"kind": kind, "old": ev.get("old"), "new": ev.get("new"),
                   "sent_at": ev.get("sent_at"), "seen": seen, "bytes": len(msg.data)}
            self.events.append(rec)
            if kind == "node.down":
                try:  # the real format (whatever its size)
                    decode(Event, msg.data, max_bytes=len(msg.data) + 1)
                except Exception:
                    rec["invalid"] = True
                s = self.silences.get(rec["old"])
                if s is not None and not s.down.done() and rec["sent_at"] >= s.last_hb:
                    s.down.set_result((rec["sent_at"], seen))

        cfg = ConsumerConfig(deliver_policy=DeliverPolicy.NEW)
        await self.nc.jetstream().subscribe(self.subjects.events_all, ordered_consumer=True,
                                            config=cfg, cb=on_event)

    # ---- measuring ------------------------------------------------------------------------
    async def scrape(self) -> tuple[dict[str, dict[str, float]], float, int]:
        _, body, took = await self.http("/metrics", timeout=60)
        names = ("vtlha_event_loop_lag_seconds_bucket", "vtlha_heartbeats_received_total",
                 "vtlha_decisions_total", "vtlha_arbiter_term", "vtlha_arbiter_active",
                 "vtlha_invalid_messages_total")
        return parse_metrics(body.decode(), names), took, len(body)

    async def sample(self, seconds: float, extra: Any = None) -> dict[str, Any]:
        """CPU and RSS of the arbiter, nats-server and the generators over ``seconds``
        (while ``extra``, a coroutine, runs: the silences), with the arbiter's metrics
        before and after."""
        arb = self.procs.children["arbiter"].pid
        gens = [p.pid for n, p in self.procs.children.items() if n.startswith("generator")]
        assert self.nats.proc is not None
        pids = {"arbiter": [arb], "nats": [self.nats.proc.pid], "generators": gens}
        m0, scrape_s, scrape_bytes = await self.scrape()
        g0 = await self.gen_stats(reset=True)
        cpu0 = {k: [cpu_seconds(p) or 0.0 for p in v] for k, v in pids.items()}
        t0, peak = time.monotonic(), 0.0
        task = asyncio.ensure_future(extra) if extra is not None else None
        while time.monotonic() - t0 < seconds or (task is not None and not task.done()):
            peak = max(peak, rss_mb(arb) or 0.0)
            await asyncio.sleep(0.5)
        elapsed = time.monotonic() - t0
        cpu = {k: sum((cpu_seconds(p) or 0.0) - c for p, c in zip(v, cpu0[k], strict=True))
               / elapsed for k, v in pids.items()}
        g1 = await self.gen_stats()
        m1, scrape2_s, _ = await self.scrape()
        lag0 = m0["vtlha_event_loop_lag_seconds_bucket"]
        lag1 = m1["vtlha_event_loop_lag_seconds_bucket"]
        received = sum(m1["vtlha_heartbeats_received_total"].values()) - sum(
            m0["vtlha_heartbeats_received_total"].values())

        def gsum(key: str) -> float:
            return float(sum(b[key] - a[key] for a, b in zip(g0, g1, strict=True)))

        decisions = {k.split('"')[1]: v - m0["vtlha_decisions_total"].get(k, 0.0)
                     for k, v in m1["vtlha_decisions_total"].items()
                     if v - m0["vtlha_decisions_total"].get(k, 0.0) > 0}
        out = {
            "seconds": round(elapsed, 1),
            "arbiter_cpu": round(cpu["arbiter"], 3), "arbiter_rss_mb": round(peak, 1),
            "nats_cpu": round(cpu["nats"], 3), "generators_cpu": round(cpu["generators"], 3),
            "lag_p50_s": histogram_quantile(0.5, lag0, lag1),
            "lag_p99_s": histogram_quantile(0.99, lag0, lag1),
            "hb_published_per_s": round(gsum("hb") / elapsed, 1),
            "hb_validated_per_s": round(received / elapsed, 1),
            "reports_published_per_s": round((gsum("storage") + gsum("mgmt")) / elapsed, 1),
            "renewals_ok_per_s": round(gsum("renew_ok") / elapsed, 1),
            "renewals_late": int(gsum("renew_late")),
            "renewals_skipped": int(gsum("renew_skipped")),
            "renewals_conflict": int(gsum("renew_conflict")),
            "renewals_error": int(gsum("renew_error")),
            "renew_p99_s": max((g["renew_p99"] or 0.0 for g in g1), default=None),
            "generator_slot_late_p99_s": max((g["slot_late_p99"] or 0.0 for g in g1),
                                             default=None),
            "generator_overruns": int(gsum("overruns")),
            "decisions": decisions,
            "term_changed": m1["vtlha_arbiter_term"].get("", 0) != m0["vtlha_arbiter_term"].get(
                "", 0),
            "active_at_start": m0["vtlha_arbiter_active"].get("", 0.0) == 1.0,
            "active_at_end": m1["vtlha_arbiter_active"].get("", 0.0) == 1.0,
            "metrics_scrape_s": round(max(scrape_s, scrape2_s), 2),
            "metrics_bytes": scrape_bytes, "load_1min": os.getloadavg()[0],
        }
        if task is not None:
            out["result"] = task.result()
        return out

    # ---- silences -------------------------------------------------------------------------
    async def silence(self, node: str) -> dict[str, Any]:
        """One node goes silent until it is declared down and what it owned is claimed
        (or the bound), then comes back."""
        loop = asyncio.get_running_loop()
        shard = self.shard_of[node]
        rep = await self.ctl(shard, {"op": "silence", "node": node})
        groups = rep["groups"]
        s = Silence(node, self._renewed(node), groups, rep["last_hb"], loop.create_future(),
                    {g: loop.create_future() for g in groups})
        self.silences[node] = s
        self.ever_silenced.add(node)
        subs = []
        for g in groups:
            subs.append(await self.nc.subscribe(self.subjects.kv_subject(
                self.subjects.group_key(g)), cb=self._claim_cb(s, g)))
        await asyncio.wait([s.down, *s.claims.values()], timeout=self.args.detect_bound)
        for sub in subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        await self.ctl(shard, {"op": "resume", "node": node})
        del self.silences[node]
        first_claim = min((f.result()[0] for f in s.claims.values() if f.done()), default=None)
        return {"node": node, "renewed": s.renewed, "groups": groups, "last_hb": s.last_hb,
                "down_s": s.down.result()[0] - s.last_hb if s.down.done() else None,
                "down_seen_s": s.down.result()[1] - s.last_hb if s.down.done() else None,
                "claim_s": first_claim - s.last_hb if first_claim is not None else None,
                "claimed": sum(f.done() for f in s.claims.values())}

    async def _silence_then_free(self, node: str, pair: str,
                                 busy: dict[str, float]) -> dict[str, Any]:
        try:
            return await self.silence(node)
        finally:
            busy[pair] = time.monotonic() + 2.0

    def _claim_cb(self, s: Silence, group: str) -> Any:
        async def cb(msg: Any) -> None:
            fut = s.claims[group]
            if fut.done() or not msg.data:
                return
            with contextlib.suppress(Exception):
                rec = decode(GroupRecord, msg.data)
                if rec.owner != s.node:
                    fut.set_result((rec.since, time.time()))
        return cb

    def _renewed(self, node: str) -> bool:
        rp = renewed_pairs(self.cfg, self.args.renew_budget)
        return any(nd.name == node for p in self.cfg.pairs[:rp] for nd in p.nodes)

    async def silences_run(self) -> list[dict[str, Any]]:
        """``--silences`` silences, a new one every ``--silence-every`` s, each of a node
        of a pair nobody else in it is silent (nor came back in the last 2 s)."""
        rng = random.Random(self.args.seed * 1000 + self.n_pairs)
        pairs = list(self.cfg.pairs)
        busy: dict[str, float] = {}  # pair -> until when it is left alone
        tasks = []
        for i in range(self.args.silences):
            now = time.monotonic()
            free = [p for p in pairs if busy.get(p.name, 0.0) < now]
            if not free:
                await asyncio.sleep(self.args.silence_every)
                continue
            p = rng.choice(free)
            node = rng.choice(p.nodes).name
            busy[p.name] = math.inf
            tasks.append(asyncio.ensure_future(self._silence_then_free(node, p.name, busy)))
            if (i + 1) % 5 == 0:
                self.say(f"{i + 1} of {self.args.silences} silences started")
            await asyncio.sleep(self.args.silence_every)
        return list(await asyncio.gather(*tasks))

    # ---- one size, end to end ----------------------------------------------------------------
    async def run(self) -> dict[str, Any]:
        out: dict[str, Any] = {"pairs": self.n_pairs}
        out |= await self.setup()
        out |= {"nodes": len(self.cfg.nodes), "groups": len(self.cfg.groups())}
        out |= await self.start_generators()
        await self.follow_events()
        self.start_arbiter()
        self.say("arbiter started")
        out["startup"] = await self.wait_settled()
        if "exited" in out["startup"]:
            return out  # nothing to measure: the table says why
        await asyncio.sleep(self.args.settle)
        n_ev = len(self.events)
        self.say(f"steady state: measuring {self.args.window:g} s")
        try:
            out["steady"] = await self.sample(self.args.window)
        except Exception:
            arb = self.procs.children["arbiter"]
            if arb.poll() is None:
                raise
            # it died after the settle wait (its start failed late): say so
            out["startup"]["exited"] = {"code": arb.returncode, "after_s": None,
                                        "cpu_share": None,
                                        **start_failure(self.work / "arbiter.log")}
            self.say(f"the arbiter EXITED: {out['startup']['exited']}")
            return out
        out["steady"]["events"] = self._kinds(self.events[n_ev:])
        self.say(f"steady: arbiter {out['steady']['arbiter_cpu'] * 100:.0f} % of a core, "
                 f"lag p99 {fmt_s(out['steady']['lag_p99_s'])}")
        n_ev = len(self.events)
        self.say(f"{self.args.silences} silences")
        sil = await self.sample(0.0, self.silences_run())
        rows = sil.pop("result")
        evs = self.events[n_ev:]
        sil["events"] = self._kinds(evs)
        sil["false_downs"] = sum(1 for e in evs if e["kind"] == "node.down"
                                 and e["old"] not in self.ever_silenced)
        downs = [e["bytes"] for e in self.events if e["kind"] == "node.down"]
        sil["node_down_event_bytes"] = max(downs, default=None)
        # what vtlha's own readers (decode's default limit: vtlha events) would skip
        sil["node_down_over_64k"] = sum(1 for b in downs if b > MSG_LIMIT)
        sil["silences"] = rows
        sil |= summarise(rows)
        out["silence"] = sil
        out["arbiter_log"] = log_summary(self.work / "arbiter.log")
        self.say(f"detection p50 {fmt_s(sil['down_p50_s'])} p99 {fmt_s(sil['down_p99_s'])} "
                 f"({sil['detected']} of {len(rows)} seen as node.down)")
        return out

    def _kinds(self, evs: list[dict[str, Any]]) -> dict[str, int]:
        out: dict[str, int] = {}
        for e in evs:
            out[e["kind"]] = out.get(e["kind"], 0) + 1
        return out


async def one_size(n_pairs: int, args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix=f"vtlha-scale-{n_pairs}-"))
    c = Coordinator(n_pairs, args, work)
    try:
        return await asyncio.wait_for(c.run(), args.max_minutes * 60)
    except BaseException:
        print(f"  [{n_pairs} pairs] FAILED; logs in {work} (kept)", flush=True)
        args.keep = True
        raise
    finally:
        await c.close()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
