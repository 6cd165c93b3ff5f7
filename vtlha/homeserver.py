"""Keep a service connected to a NATS server that reaches the KV's raft leader, its own
node's server first (issue 14; ``docs/safety.md``, "Which server a service uses").

nats-py reconnects to the next server of its list when its server dies, and stays there.
Two faults follow from that alone:

- after a rolling restart of the servers a node's services sit on the companion's
  server, so a fault of the companion (even a 0.5 s link cut) cuts them off from the bus
  as well: the companion's fault costs this node its own groups;
- a server that is up but cannot reach the KV's leader (its node cut from the witness
  only: NATS routes do not forward from one server to another, so the node's server
  reaches the witness's through no one) keeps its clients, which then cannot renew,
  although the companion's server, one hop away, reaches everything.

``HomeServer`` asks each configured server every ``interval`` for the KV's last
``arbiter.leader`` record (``$JS.API.STREAM.MSG.GET``, which only the stream's raft leader
answers; a stream-info request is not enough: a server cut off from the leader answers it
itself), over a small connection of its own per server (no reconnects; re-made when it
breaks): an answer in time ("not found" included) means that server reaches the leader.
Each server's answers go through a ``Hysteresis`` (``rise`` answers in a row to become
good, ``fall`` misses to become bad), and ``choose`` (pure) decides where the service's
connection belongs:

- the own server is good and the connection is elsewhere: go home;
- the server in use is bad and another is good: go to the first good one, in the
  configured order (own node's first), if in each of the last ``fall`` probes the one
  in use did not answer and that one did (``at_fault``: after a KV election every
  server fails at once, and they come back a probe apart);
- the connection left the own server without being moved (nats-py reconnected
  elsewhere): the own server is bad until ``rise`` fresh answers (``note_left_home``).

Moving is ``set_server_pool`` with the chosen server first, then ``force_reconnect``
(~5 ms; subscriptions are re-made by nats-py). Nothing moves while every server is bad
(a KV election: no server would do better) or before each server has been asked once.

A request in flight when the connection moves loses its reply (it waits out its
timeout). A move home away from a server that still works is never urgent, so it waits
for the service's ``ready`` (the lease holder's: no renewal in flight, one just
renewed; chaos iteration 131: a renewal lost to a move home let node-b's leases lapse);
a move away from a server that does not reach the KV leader does not wait.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from urllib.parse import urlsplit

import nats
import nats.errors
import orjson
from nats.aio.client import Client as NATS

from vtlha.health import Hysteresis
from vtlha.natsauth import NONE, ClientAuth
from vtlha.subjects import Subjects

log = logging.getLogger("vtlha.homeserver")

#: defaults: ask every second; good after 3 answers in a row, bad after 2 misses
INTERVAL = 1.0
RISE = 3
FALL = 2
CHANGES_KEPT = 64  # state changes remembered (for status and tests; bounded)


def netloc(url: str) -> str:
    return urlsplit(url).netloc


def choose(urls: Sequence[str], current: str | None,
           good: dict[str, bool | None]) -> str | None:
    """Where the connection belongs: a URL of ``urls`` to move to, or None to stay.
    ``urls`` is the configured order (own node's server first), ``current`` the URL in
    use (None: not connected; nats-py's own reconnect is at work), ``good`` each URL's
    state after hysteresis (None: not known yet)."""
    if current is None or any(good.get(u) is None for u in urls):
        return None
    home = urls[0]
    if current != home and good[home]:
        return home
    if good.get(current) is False:
        for u in urls:
            if u != current and good[u]:
                return u
    return None


class HomeServer:
    """Runs ``choose`` over the service connection ``nc`` (see the module's doc)."""

    def __init__(self, nc: NATS, urls: Sequence[str], subjects: Subjects, name: str,
                 interval: float = INTERVAL, rise: int = RISE, fall: int = FALL,
                 auth: ClientAuth = NONE,
                 ready: Callable[[], Awaitable[bool]] | None = None) -> None:
        self.nc = nc
        #: asked before a move home from a server that still works (False: not now;
        #: the next step asks again)
        self.ready = ready
        self.deferred = 0
        self.urls = list(urls)
        self.auth = auth
        self.subject = Subjects.js_api("STREAM", "MSG", "GET", subjects.kv_stream)
        self.body = orjson.dumps({"last_by_subj": subjects.kv_subject(Subjects.LEADER_KEY)})
        self.name = name
        self.interval = interval
        self.timeout = min(1.0, interval / 2)
        self.rise, self.fall = rise, fall
        self.states = {u: Hysteresis(rise, fall) for u in self.urls}
        self.probes: dict[str, NATS] = {}
        self.moves = 0
        #: the last server the connection was seen on (None: not seen yet)
        self.last_seen: str | None = None
        #: the last changes of a server's state, in order: (url, reaches the KV leader)
        self.changes: deque[tuple[str, bool]] = deque(maxlen=CHANGES_KEPT)
        #: each of the last ``fall`` steps' raw answers: url -> answered
        self.answers: deque[dict[str, bool]] = deque(maxlen=fall)

    def current(self) -> str | None:
        if not self.nc.is_connected or self.nc.connected_url is None:
            return None
        now = self.nc.connected_url.netloc
        # a server nats-py discovered (INFO connect_urls) is none of ours: never home
        return next((u for u in self.urls if netloc(u) == now), f"nats://{now}")

    def status(self) -> dict[str, object]:
        return {"server": self.current(), "home": self.urls[0], "moves": self.moves,
                "deferred": self.deferred,
                "reaches_kv_leader": {u: h.state for u, h in self.states.items()}}

    async def run(self, stop: asyncio.Event) -> None:
        try:
            while not stop.is_set():
                try:
                    await self.step()
                except Exception as exc:  # one failed step must not end the watch
                    log.error("nats home check failed", extra={
                        "client": self.name, "error": repr(exc)}, exc_info=exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval)
        finally:
            await self.close()

    async def close(self) -> None:
        """Close the probe connections (the service connection is not ours)."""
        for p in self.probes.values():
            with contextlib.suppress(Exception):
                await p.close()
        self.probes.clear()

    async def step(self) -> str | None:
        """Ask every server once, then move if ``choose`` says so; returns the URL moved
        to (None: stayed)."""
        self.note_left_home()
        answers = await asyncio.gather(*(self._ask(u) for u in self.urls))
        for u, ok in zip(self.urls, answers, strict=True):
            h = self.states[u]
            h.update(ok)
            if h.changed:
                self.changes.append((u, ok))
                log.info("nats server " + ("reaches" if ok else "does not reach")
                         + " the KV leader", extra={"server": u, "client": self.name})
        self.answers.append(dict(zip(self.urls, answers, strict=True)))
        self.note_left_home()
        cur = self.current()
        to = choose(self.urls, cur, {u: h.state for u, h in self.states.items()})
        if to is None or self.nc.is_closed or self.nc.is_reconnecting:
            return None
        still_works = cur is not None and cur in self.states and self.states[cur].state is True
        if not still_works and cur in self.states and not at_fault(self.answers, cur, to,
                                                                   self.fall):
            return None  # they failed together: the server in use is not the one at fault
        if still_works:  # a move home, not away from a bad server: it can wait
            if self.ready is not None and not await self.ready():
                self.deferred += 1
                log.info("moving home deferred: the service is not ready to move", extra={
                    "from": cur, "to": to, "client": self.name})
                return None
            if self.nc.is_closed or self.nc.is_reconnecting or self.current() != cur:
                return None  # the connection changed while we waited
        log.warning("moving to another nats server", extra={
            "from": cur, "to": to, "client": self.name,
            "why": "own node's server reaches the KV leader again" if to == self.urls[0]
            else "the server in use does not reach the KV leader"})
        self.nc.set_server_pool([to, *[u for u in self.urls if u != to]])
        await self.nc.force_reconnect()
        self.moves += 1
        return to

    def note_left_home(self) -> None:
        """The connection left the own server without being moved (nats-py reconnected
        elsewhere: the server died or cut it off): the own server is bad from here
        until ``rise`` answers in a row say otherwise. Else a server down for less than
        ``fall`` probes would still count as good and the connection would go back the
        moment it restarts, before its routes carry the subscriptions' interest (seen:
        the heartbeat's beats went nowhere for 0.3 s and its node was failed over)."""
        cur, home = self.current(), self.urls[0]
        if cur is None:
            return
        if self.last_seen == home and cur != home and self.states[home].state is not False:
            self.states[home] = Hysteresis(self.rise, self.fall, initial=False)
            self.changes.append((home, False))
            log.info("left the own nats server: it must answer again before going back",
                     extra={"server": home, "now_on": cur, "client": self.name})
        self.last_seen = cur

    async def _ask(self, url: str) -> bool:
        try:
            p = self.probes.get(url)
            if p is None or not p.is_connected:
                if p is not None:
                    with contextlib.suppress(Exception):
                        await p.close()
                p = self.probes[url] = await asyncio.wait_for(nats.connect(
                    servers=[url], name=f"{self.name}-probe", connect_timeout=self.timeout,
                    allow_reconnect=False, error_cb=_quiet, **self.auth.connect_options()),
                    self.timeout * 2)
            reply = await p.request(self.subject, self.body, timeout=self.timeout)
            body = orjson.loads(reply.data)
        except (OSError, nats.errors.Error, TimeoutError, ValueError):
            return False
        return is_leader_answer(body)


def at_fault(answers: Sequence[dict[str, bool]], current: str, to: str, fall: int) -> bool:
    """The server in use is the one at fault: in each of the last ``fall`` steps it did
    not answer and ``to`` did. After every server failed together (the KV's leader being
    elected again, e.g. a stream leader asked to step down) they come back a probe apart,
    and the first good one is no reason to leave a server that answers again: seen, a
    node's ip-manager moved off its own server to the companion's 0.1 s before the
    companion's links were cut, and its groups lapsed."""
    return len(answers) >= fall and all(not a.get(current, False) and a.get(to, False)
                                        for a in list(answers)[-fall:])


def is_leader_answer(body: object) -> bool:
    """A MSG.GET reply from the stream's leader: the message, or "no message found"
    (404); anything else (503 no leader, a timeout) is not."""
    if not isinstance(body, dict):
        return False
    err = body.get("error")
    return err is None or (isinstance(err, dict) and err.get("code") == 404)


async def _quiet(exc: Exception) -> None:
    pass
