"""Every NATS subject and KV key of the project is built here, nowhere else."""

from __future__ import annotations

from dataclasses import dataclass

from vtlha.config import is_valid_name


@dataclass(frozen=True)
class Subjects:
    cluster: str

    def __post_init__(self) -> None:
        if not is_valid_name(self.cluster):
            raise ValueError(f"invalid cluster name {self.cluster!r}")

    @property
    def _p(self) -> str:
        return f"ha.{self.cluster}"

    def hb(self, node: str = "*") -> str:
        return f"{self._p}.hb.{node}"

    def storage(self, node: str = "*") -> str:
        return f"{self._p}.storage.{node}"

    def mgmt(self, node: str = "*") -> str:
        return f"{self._p}.mgmt.{node}"

    def lease(self, node: str = "*") -> str:
        return f"{self._p}.lease.{node}"

    def promise(self, node: str = "*") -> str:
        return f"{self._p}.promise.{node}"

    def cmd(self, node: str, service: str) -> str:
        return f"{self._p}.cmd.{node}.{service}"

    def ping(self, node: str, service: str) -> str:
        """Liveness requests to one service of a node (request/reply): the heartbeat
        asks its node's executors whether they still run."""
        return f"{self._p}.ping.{node}.{service}"

    @property
    def handback(self) -> str:
        """The preferred (witness's) arbiter asks a non-preferred active arbiter to hand
        the active role back (request/reply)."""
        return f"{self._p}.arbiter.handback"

    def admin(self, verb: str) -> str:
        return f"{self._p}.admin.{verb}"

    def event(self, kind: str) -> str:
        return f"{self._p}.events.{kind}"

    @property
    def events_all(self) -> str:
        return f"{self._p}.events.>"

    def node_of(self, subject: str) -> str:
        """The node token of a per-node subject (hb, storage, mgmt, lease)."""
        return subject.split(".")[3]

    # ---- JetStream names ---------------------------------------------------
    @property
    def kv_bucket(self) -> str:
        return f"ha-{self.cluster}"

    @property
    def events_stream(self) -> str:
        return f"HA_EVENTS_{self.cluster}"

    @property
    def kv_stream(self) -> str:
        """The stream behind the KV bucket."""
        return f"KV_{self.kv_bucket}"

    def kv_subject(self, key: str = ">") -> str:
        """The subject a KV key's writes are published on (``key`` may be a wildcard)."""
        return f"$KV.{self.kv_bucket}.{key}"

    @staticmethod
    def js_api(*tokens: str) -> str:
        """A JetStream API subject: ``js_api("STREAM", "INFO", name)``."""
        return ".".join(("$JS.API", *tokens))

    @staticmethod
    def inbox_prefix(user: str) -> str:
        """A NATS user's own reply subjects (``_INBOX.<user>.>``): no user reads
        another's replies."""
        return f"_INBOX.{user}"

    @staticmethod
    def group_key(group: str) -> str:
        return f"group.{group}"

    @staticmethod
    def pair_key(pair: str) -> str:
        return f"pair.{pair}"

    @staticmethod
    def event_state_key(pair: str) -> str:
        """What decides whether the arbiter's events about a pair are due
        (``vtlha.eventstate``), written only by the active arbiter."""
        return f"events.{pair}"

    @staticmethod
    def probe_key(node: str) -> str:
        """A node's lease holder writes here to learn whether it reaches the KV when it
        holds nothing to renew (never ownership)."""
        return f"probe.{node}"

    LEADER_KEY = "arbiter.leader"
