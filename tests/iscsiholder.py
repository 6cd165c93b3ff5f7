"""A stand-in for a data service of a node's, run inside that node's namespace by the
lab's iSCSI tests (``python -m tests.iscsiholder``): one session to one LUN through one
path, made the holder with the node's key at an epoch **only with the node's permit**
(the storage-monitor's permit file, ``vtlha.iscsi.permitfile``), as a data service is.

Commands on stdin, one per line; one JSON answer per line on stdout:

    take            take() with the permit read now -> {ok, how | error}
    write LBA BYTE  a block of BYTE (one character) at LBA -> {ok, error, attentions}
    read LBA        -> {ok, byte: the block's first byte, uniform: bool}
    quit

Every call is bounded by the session's timeout."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path
from typing import Any

import orjson

from vtlha.config import load_config
from vtlha.iscsi.permitfile import read_permit
from vtlha.iscsi.reservation import take
from vtlha.iscsi.scsi import IscsiError, NotPermitted, make_key
from vtlha.iscsi.session import Session, Target, initiator_name

TIMEOUT = 1.0


def say(obj: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(obj).decode() + "\n")
    sys.stdout.flush()


async def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    assert cfg.san.iqn is not None
    lun = cfg.devices[args.device].lun
    assert lun is not None
    target = Target(cfg.san.portals[args.path], cfg.san.iqn, lun)
    key = make_key(cfg.cluster, args.node, args.epoch)
    s = await Session.open(target, initiator_name(cfg.cluster, args.node, "standin"), TIMEOUT)
    say({"ok": True, "open": str(target), "block_size": s.block_size})
    loop = asyncio.get_running_loop()
    try:
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            words = line.split()
            if not words or words[0] == "quit":
                return 0
            before = len(s.attentions)
            try:
                if words[0] == "take":
                    permit = read_permit(Path(args.permit_file), args.group, args.epoch)
                    if permit is None:
                        raise NotPermitted("no permit for the group at this epoch")
                    r = await take(s, key, permit)
                    say({"ok": True, "how": r.how.value})
                elif words[0] == "write":
                    await s.write(int(words[1]), words[2].encode()[:1] * s.block_size)
                    say({"ok": True})
                elif words[0] == "read":
                    data = await s.read(int(words[1]), 1)
                    say({"ok": True, "byte": data[:1].decode(errors="replace"),
                         "uniform": data == data[:1] * len(data)})
                else:
                    say({"ok": False, "error": f"unknown command {words[0]!r}"})
            except IscsiError as exc:
                say({"ok": False, "error": f"{type(exc).__name__}: {exc}",
                     "attentions": [str(a) for a in s.attentions[before:]]})
    finally:
        await s.close()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--config", required=True)
    p.add_argument("--node", required=True)
    p.add_argument("--group", required=True)
    p.add_argument("--epoch", type=int, required=True)
    p.add_argument("--device", required=True)
    p.add_argument("--path", type=int, default=0)
    p.add_argument("--permit-file", required=True)
    sys.exit(asyncio.run(run(p.parse_args())))


if __name__ == "__main__":
    main()
