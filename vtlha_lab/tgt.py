"""A real iSCSI target for the lab and the tests: Debian's ``tgtd`` (userspace, no
kernel module), set up with ``tgtadm`` (``PLATFORM.md``, "A real iSCSI target").

One :class:`Tgtd` is one daemon with its own control port (``-C``: the control socket is
``/var/run/tgtd/socket.<port>``, a file, not per network namespace), one target IQN, one
LUN per device backing file (LUN 1, 2, ... in the order given) and one portal per path
(``host:port``), bound to every initiator (``ALL``). ``prefix`` runs it elsewhere, e.g.
``["ip", "netns", "exec", NS]`` for the witness's namespace.

tgtd ignores SIGTERM. :meth:`Tgtd.stop` deletes the target (``--force``: sessions and
all) and then the system (``tgtadm --op delete --mode system``), and SIGKILLs the daemon
when that does not end it in time; the control socket files are removed either way.
Nothing persists across a restart (no APTPL in tgt): registrations and reservations are
gone, the backing files stay. Needs root (the control socket's directory). ``nice``
runs it at the services' priority (``scheduling.nice``, ``vtlha.priority``): every one
of its threads, since they are made after the priority is raised.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from vtlha.errors import FatalError
from vtlha.priority import raise_priority

LOG = logging.getLogger("vtlha_lab.tgt")

SOCKET_DIR = Path("/var/run/tgtd")
TGTD = "tgtd"
TGTADM = "tgtadm"


@dataclass(frozen=True)
class Lun:
    name: str          # the device's name in the cluster file
    backing: Path
    lun: int


@dataclass
class TgtdSpec:
    iqn: str
    portals: list[str]                        # "host:port", one per path
    devices: dict[str, Path]                  # device name -> backing file
    control_port: int = 0                     # 0: pick one nobody uses
    block_size: int = 512
    #: device name -> LUN number (the cluster file's ``devices.X.lun``); default 1, 2, ...
    numbers: dict[str, int] | None = None
    luns: list[Lun] = field(default_factory=list, init=False)

    def __post_init__(self) -> None:
        if not self.portals:
            raise ValueError("tgtd needs at least one portal")
        numbers = self.numbers or {name: i + 1 for i, name in enumerate(self.devices)}
        self.luns = [Lun(name, Path(p), numbers[name]) for name, p in self.devices.items()]
        if len({lun.lun for lun in self.luns}) != len(self.luns) or \
                any(lun.lun < 1 for lun in self.luns):
            raise ValueError(f"LUN numbers must be distinct and at least 1: {numbers}")

    def lun_of(self, device: str) -> int:
        for lun in self.luns:
            if lun.name == device:
                return lun.lun
        raise KeyError(device)


def free_control_port(start: int = 17000, end: int = 17999) -> int:
    """A control port whose socket file does not exist (tgtd's -C is not a TCP port)."""
    for port in range(start + os.getpid() % (end - start), end):
        if not (SOCKET_DIR / f"socket.{port}").exists() and \
                not (SOCKET_DIR / f"socket.{port}.lock").exists():
            return port
    for port in range(start, end):
        if not (SOCKET_DIR / f"socket.{port}").exists():
            return port
    raise FatalError(f"no free tgtd control port in {start}-{end}")


class Tgtd:
    def __init__(self, spec: TgtdSpec, log_path: Path, prefix: list[str] | None = None,
                 nice: int | None = None) -> None:
        self.spec = spec
        self.log_path = log_path
        self.prefix = prefix or []
        # raised to this when allowed (vtlha.priority), as the services and nats-servers;
        # before the LUNs are added, so that tgtd's I/O threads (made then) inherit it
        self.nice = nice
        self.proc: subprocess.Popen[bytes] | None = None
        if not spec.control_port:
            spec.control_port = free_control_port()

    # -- tgtadm --------------------------------------------------------------------

    def adm(self, *args: str, check: bool = True, timeout: float = 10.0) -> str:
        argv = [*self.prefix, TGTADM, "-C", str(self.spec.control_port), *args]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
        if check and r.returncode != 0:
            raise FatalError(f"{' '.join(argv)} exited {r.returncode}: "
                             f"{(r.stderr or r.stdout).strip()}")
        return r.stdout

    def _iscsi(self, *args: str, check: bool = True) -> str:
        return self.adm("--lld", "iscsi", *args, check=check)

    # -- life cycle ----------------------------------------------------------------

    def start(self, timeout: float = 10.0) -> None:
        """Start the daemon with the first portal, wait for its control socket, add the
        other portals, the target, its LUNs and the ACL. Stops it again on failure."""
        if os.geteuid() != 0:
            raise FatalError("tgtd needs root (its control socket is in /var/run/tgtd)")
        for lun in self.spec.luns:
            if not lun.backing.exists():
                raise FatalError(f"backing file {lun.backing} of {lun.name} does not exist")
        log = open(self.log_path, "ab")  # noqa: SIM115 - owned by the child
        self.proc = subprocess.Popen(
            [*self.prefix, TGTD, "-f", "-C", str(self.spec.control_port),
             "--iscsi", f"portal={self.spec.portals[0]}"],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        if self.nice is not None:
            raise_priority(self.nice, LOG, self.proc.pid)
        try:
            self._wait_ready(timeout)
            self._configure()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise FatalError(f"tgtd exited with {self.proc.returncode}; see {self.log_path}")
            out = self.adm("--op", "show", "--mode", "system", check=False)
            if "State: ready" in out:
                return
            if time.monotonic() > deadline:
                raise FatalError(f"tgtd not ready in {timeout} s; see {self.log_path}")
            time.sleep(0.05)

    def _configure(self) -> None:
        for portal in self.spec.portals[1:]:
            self._iscsi("--op", "new", "--mode", "portal", "--param", f"portal={portal}")
        self._iscsi("--op", "new", "--mode", "target", "--tid", "1",
                    "--targetname", self.spec.iqn)
        for lun in self.spec.luns:
            self._iscsi("--op", "new", "--mode", "logicalunit", "--tid", "1",
                        "--lun", str(lun.lun), "--backing-store", str(lun.backing),
                        "--blocksize", str(self.spec.block_size))
        self._iscsi("--op", "bind", "--mode", "target", "--tid", "1",
                    "--initiator-address", "ALL")

    def sessions(self) -> dict[int, str]:
        """The target's iSCSI sessions: session id -> initiator name."""
        out: dict[int, str] = {}
        sid = None
        for line in self._iscsi("--op", "show", "--mode", "conn", "--tid", "1").splitlines():
            words = line.split()
            if words[:1] == ["Session:"]:
                sid = int(words[1])
            elif words[:1] == ["Initiator:"] and sid is not None:
                out[sid] = words[1]
        return out

    def drop_sessions(self, initiator: str) -> int:
        """Close every connection of ``initiator`` from the target's side (a path cut
        seen by the target); how many."""
        sids = [sid for sid, name in self.sessions().items() if name == initiator]
        for sid in sids:
            self._iscsi("--op", "delete", "--mode", "conn", "--tid", "1", "--sid", str(sid),
                        "--cid", "0")
        return len(sids)

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        """Send ``sig`` to the daemon (SIGSTOP/SIGCONT for a hung target)."""
        if self.alive:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)

    def stop(self, timeout: float = 5.0) -> None:
        """Delete the target and the system through tgtadm, else SIGKILL; always remove
        the control socket files. Idempotent."""
        if self.proc is not None:
            if self.alive:
                self.signal(signal.SIGCONT)   # a stopped daemon answers nothing
                with contextlib.suppress(subprocess.TimeoutExpired, FatalError):
                    self._iscsi("--op", "delete", "--mode", "target", "--tid", "1",
                                "--force", check=False)
                    self.adm("--op", "delete", "--mode", "system", check=False, timeout=timeout)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                self.proc.wait(timeout)
        for suffix in ("", ".lock"):
            with contextlib.suppress(FileNotFoundError):
                (SOCKET_DIR / f"socket.{self.spec.control_port}{suffix}").unlink()

    def kill(self) -> None:
        """SIGKILL: the target dies with every registration and reservation."""
        self.signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(5)

    def __enter__(self) -> Tgtd:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


#: the lab's target name and first portal port (a portal per path on the next ports)
LAB_IQN = "iqn.2026-12.org.vtlha:lab"
LAB_PORT = 3260


def use_iscsi(raw: dict[str, object], port: int = LAB_PORT, iqn: str = LAB_IQN,
              paths: int = 2) -> None:
    """Change a cluster file (as loaded from YAML) to ``san.kind: iscsi`` on the lab's
    tgtd: the witness's service address, a portal per path (``port``, ``port + 1``, ...),
    a LUN per device in the file's order."""
    witness = raw["witness"]
    devices = raw["devices"]
    assert isinstance(witness, dict) and isinstance(devices, dict)
    w = str(witness["service_ip"]).split("/")[0]
    raw["san"] = {"kind": "iscsi", "host": witness["host"], "port": port, "iqn": iqn,
                  "portals": [f"{w}:{port + i}" for i in range(paths)]}
    for k, dev in enumerate(devices.values()):
        dev["lun"] = k + 1


def set_online(tgtd: Tgtd, lun: int, online: bool) -> None:
    """Take a LUN's medium away (``online`` False: every READ and WRITE then ends with
    NOT READY, MEDIUM NOT PRESENT, on every path — the device failing, as the chaos
    suite's ``device-fail``) or give it back. Registrations and the reservation stay."""
    tgtd.adm("--lld", "iscsi", "--op", "update", "--mode", "logicalunit", "--tid", "1",
             "--lun", str(lun), "--params", f"removable=1,online={1 if online else 0}")
