"""A tiny FUSE filesystem whose reads hang on demand (test infrastructure).

    python tests/fusehang.py MOUNTPOINT BACKINGDIR CONTROLFILE [WRITECONTROLFILE]

Mounts BACKINGDIR (a flat directory of regular files) at MOUNTPOINT, passing reads
and writes through to the real files. While CONTROLFILE exists, every ``read`` blocks
(polling for the file, at most ``HANG_LIMIT`` s, then EIO) until it is removed: a hung
device for the process reading a file of the mount. Only reads hang: ``getattr``,
``open`` and writes go on, so a reader that already opened its file sees exactly a
device that stops answering reads.

While WRITECONTROLFILE exists, a ``write`` whose data starts with that file's content
(a marker; every write when it is empty) blocks the same way until the file is removed,
and then goes through; ``WRITECONTROLFILE.hit`` is created while one is blocked. Other
writes go on: one writer's write stalls in the device, the others' do not.

Mounted with ``direct_io`` (no page cache: every read reaches this process, also a
read of a block read before) and ``allow_other``; runs in the foreground until
SIGTERM/SIGINT (libfuse unmounts then) or an unmount. A read stuck here keeps the
reading thread in the kernel until it is answered, so a test removes CONTROLFILE
before it stops the reader, and aborts the connection
(``/sys/fs/fuse/connections/<minor of st_dev>/abort``) when this process cannot be
stopped. Needs root (``/dev/fuse``), ``libfuse.so.2`` and ``fusepy``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import time
from typing import Any

from fuse import FUSE, FuseOSError, Operations

HANG_LIMIT = 120.0  # a read never blocks longer than this (then EIO)
POLL = 0.01  # seconds between looks at the control file
STAT_KEYS = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size",
             "st_uid", "st_blocks")
STATVFS_KEYS = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree",
                "f_files", "f_flag", "f_frsize", "f_namemax")


class HangFS(Operations):  # type: ignore[misc]
    def __init__(self, root: str, control: str, write_control: str | None = None) -> None:
        self.root = os.path.realpath(root)
        self.control = control
        self.write_control = write_control

    def _full(self, path: str) -> str:
        return os.path.join(self.root, path.lstrip("/"))

    def _wait_while_hung(self, control: str | None = None) -> None:
        control = control or self.control
        if not os.path.exists(control):
            return
        deadline = time.monotonic() + HANG_LIMIT
        while os.path.exists(control):
            if time.monotonic() > deadline:
                raise FuseOSError(errno.EIO)
            time.sleep(POLL)

    # ---- metadata ------------------------------------------------------------------
    def getattr(self, path: str, fh: int | None = None) -> dict[str, Any]:
        st = os.lstat(self._full(path))
        return {k: getattr(st, k) for k in STAT_KEYS}

    def readdir(self, path: str, fh: int) -> list[str]:
        return [".", "..", *os.listdir(self._full(path))]

    def statfs(self, path: str) -> dict[str, Any]:
        sv = os.statvfs(self._full(path))
        return {k: getattr(sv, k) for k in STATVFS_KEYS}

    def truncate(self, path: str, length: int, fh: int | None = None) -> None:
        os.truncate(self._full(path), length)

    # ---- files ---------------------------------------------------------------------
    def open(self, path: str, flags: int) -> int:
        return os.open(self._full(path), flags)

    def create(self, path: str, mode: int, fi: Any = None) -> int:
        return os.open(self._full(path), os.O_RDWR | os.O_CREAT | os.O_TRUNC, mode)

    def read(self, path: str, size: int, offset: int, fh: int) -> bytes:
        self._wait_while_hung()
        return os.pread(fh, size, offset)

    def write(self, path: str, data: bytes, offset: int, fh: int) -> int:
        wc = self.write_control
        if wc is not None and self._marked(wc, data):
            hit = wc + ".hit"
            open(hit, "w").close()
            try:
                self._wait_while_hung(wc)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(hit)
        return os.pwrite(fh, data, offset)

    @staticmethod
    def _marked(control: str, data: bytes) -> bool:
        try:
            with open(control, "rb") as f:
                marker = f.read()
        except FileNotFoundError:
            return False
        return data.startswith(marker)

    def flush(self, path: str, fh: int) -> int:
        return 0

    def fsync(self, path: str, datasync: int, fh: int) -> int:
        (os.fdatasync if datasync else os.fsync)(fh)
        return 0

    def release(self, path: str, fh: int) -> int:
        os.close(fh)
        return 0


def main(argv: list[str]) -> int:
    if len(argv) not in (3, 4):
        print(__doc__, file=sys.stderr)
        return 2
    mountpoint, backing, control = argv[:3]
    write_control = argv[3] if len(argv) == 4 else None
    FUSE(HangFS(backing, control, write_control), mountpoint, foreground=True, nothreads=False,
         direct_io=True, allow_other=True, fsname="fusehang")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
