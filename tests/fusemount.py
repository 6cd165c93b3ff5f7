"""Test infrastructure: ``tests/fusehang.py`` run as its own process, a FUSE mount of
files whose reads (and marked writes) block on demand — a hung device. Used by the lab's
hung-device test and by the iSCSI tests' stalled-write test."""

from __future__ import annotations

import contextlib
import ctypes.util
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from vtlha_lab.ports import free_port
from vtlha_lab.tgt import Tgtd, TgtdSpec

FUSEHANG = Path(__file__).resolve().parent / "fusehang.py"


def fuse_missing() -> str | None:
    """Why FUSE cannot be used here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "no /dev/fuse"
    if ctypes.util.find_library("fuse") is None:
        return "no libfuse.so.2 (make sysdeps installs libfuse2)"
    try:
        import fuse  # noqa: F401
    except (ImportError, OSError) as exc:
        return f"fusepy not usable: {exc}"
    return None


@dataclass
class HangMount:
    """``tests/fusehang.py`` serving ``backing`` at ``mount``; reads block while
    ``control`` exists, writes starting with a marker while ``write_control`` does."""

    mount: Path
    backing: Path
    control: Path
    write_control: Path
    log: Path
    proc: subprocess.Popen[bytes] | None = None
    conn: int | None = None  # the FUSE connection's number (minor of the mount's st_dev)

    @classmethod
    def start(cls, base: Path, files: dict[str, int]) -> HangMount:
        """Mount under ``base`` with a sparse file ``<name>.img`` of each size."""
        m = cls(base / "fuse", base / "fuse-backing", base / "fuse-hang",
                base / "fuse-hang-writes", base / "fusehang.log")
        m.mount.mkdir()
        m.backing.mkdir()
        # A target opens the backing O_RDWR and takes its size as the device's size.
        for name, size in files.items():
            with open(m.backing / f"{name}.img", "wb") as f:
                f.truncate(size)
        with open(m.log, "wb") as log:
            m.proc = subprocess.Popen(
                [sys.executable, str(FUSEHANG), str(m.mount), str(m.backing), str(m.control),
                 str(m.write_control)],
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 10
        while not os.path.ismount(m.mount):
            if m.proc.poll() is not None or time.monotonic() > deadline:
                m.close()
                raise RuntimeError(f"the FUSE mount did not come up: {m.log.read_text()}")
            time.sleep(0.02)
        m.conn = os.minor(os.stat(m.mount).st_dev)
        return m

    def file(self, name: str) -> Path:
        return self.mount / f"{name}.img"

    def hang(self) -> None:
        self.control.touch()

    def hang_writes(self, marker: bytes) -> None:
        """Writes whose data starts with ``marker`` block from now on."""
        self.write_control.write_bytes(marker)

    def write_blocked(self) -> bool:
        """A marked write is blocked in the mount right now."""
        return Path(f"{self.write_control}.hit").exists()

    def unstick(self) -> None:
        self.control.unlink(missing_ok=True)
        self.write_control.unlink(missing_ok=True)

    def _abort(self) -> None:
        """Abort the FUSE connection (stuck reads get an error at once), when fusectl
        is mounted; killing the daemon (its /dev/fuse closed) aborts it too."""
        if self.conn is not None:
            with contextlib.suppress(OSError):
                Path(f"/sys/fs/fuse/connections/{self.conn}/abort").write_text("1")

    def close(self) -> None:
        """Unstick, then stop the daemon (libfuse unmounts on SIGTERM); abort, SIGKILL
        and lazily unmount what does not go away."""
        self.unstick()
        p = self.proc
        if p is not None and p.poll() is None:
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                self._abort()
                p.kill()
                p.wait(5)
        if os.path.ismount(self.mount):
            self._abort()
            subprocess.run(["umount", "-l", str(self.mount)], check=False, timeout=10,
                           capture_output=True)
        assert not os.path.ismount(self.mount), f"{self.mount} still mounted"


@contextlib.contextmanager
def stalling_target(base: Path, iqn: str, lun_bytes: int, block: int,
                    device: str = "lun") -> Iterator[tuple[HangMount, Tgtd]]:
    """A tgtd on 127.0.0.1 (one portal) whose only LUN (1, ``device``) is a file of a
    :class:`HangMount`: writes marked with ``hang_writes`` stall in the target's backing
    store. Everything is stopped and unmounted afterwards."""
    missing = fuse_missing()
    assert missing is None, f"a stalling target needs FUSE: {missing}"
    fs = HangMount.start(base, {"lun": lun_bytes})
    spec = TgtdSpec(iqn, [f"127.0.0.1:{free_port()}"], {device: fs.file("lun")},
                    block_size=block)
    daemon = Tgtd(spec, base / "tgtd.log")
    try:
        daemon.start()
        yield fs, daemon
    finally:
        fs.unstick()
        daemon.stop()
        fs.close()
