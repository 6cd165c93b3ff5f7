"""``vtlha-lab``: the lab's own command line (test, demo and chaos tooling, root for the
network lab). The runtime package and the service images never import this package.

    vtlha-lab up|status|down       the network lab (namespaces, root)
    vtlha-lab demo                 a local two-node cluster, a node crashed, the failover
    vtlha-lab san serve|status     the reference SAN target (test/demo stand-in for a SAN)
    vtlha-lab tape write|verify|status   a client of the tape data service
    vtlha-lab chaos run|check|docs  the chaos suite (vtlha_lab.chaos)
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Any

import click

from vtlha.cli import _config_opt, _load


@click.group(help="vtl-ha's lab: network lab, demo, reference SAN target, tape client, chaos.")
def main() -> None:
    pass



@main.command("up", help="Build a lab for a cluster file and start every service in it. "
             "It keeps running after this command returns (use `vtlha-lab down`), unless "
             "--foreground, which waits for Ctrl-C and then removes it.")
@click.option("--config", "config_path", default="examples/cluster.yaml", show_default=True,
              type=click.Path(dir_okay=False, exists=True))
@click.option("--work-dir", default=None, type=click.Path(file_okay=False),
              help="State, logs and NATS data (default: a new temporary directory).")
@click.option("--no-services", is_flag=True, help="Build the network only.")
@click.option("--foreground", is_flag=True, help="Stay attached; Ctrl-C removes the lab.")
def lab_up(config_path: str, work_dir: str | None, no_services: bool, foreground: bool) -> None:
    import tempfile
    import time

    import yaml

    from vtlha.errors import FatalError
    from vtlha_lab.lab import Lab

    _load(config_path)
    wd = Path(work_dir or tempfile.mkdtemp(prefix="vtlha-lab-"))
    wd.mkdir(parents=True, exist_ok=True)
    raw = yaml.safe_load(Path(config_path).read_text())
    raw["state_dir"] = str(wd / "state")
    cfg = wd / "cluster.yaml"
    cfg.write_text(yaml.safe_dump(raw, sort_keys=False))
    try:
        the_lab = Lab(cfg, wd)
    except FatalError as exc:
        click.echo(f"vtlha-lab up: {exc}", err=True)
        sys.exit(2)
    try:
        if no_services:
            the_lab.record.save()
            the_lab.build_network()
        else:
            click.echo("building the lab and starting nats-servers and services ...")
            the_lab.start()
    except BaseException:
        the_lab.stop()
        raise
    _print_lab(the_lab.record)
    if foreground:
        click.echo("running; Ctrl-C removes the lab")
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            the_lab.stop()
            click.echo(f"lab {the_lab.lab_id} removed")


def _print_lab(rec: Any) -> None:
    from vtlha_lab import netns

    click.echo(f"lab {rec.lab_id}   work dir {rec.work_dir}")
    click.echo(f"  uplink   {rec.uplink_host_if} {rec.uplink_host_ip} (host) <-> "
               f"{rec.uplink_peer_ip} (witness)")
    click.echo(f"  NATS     {rec.nats_url}   e.g. vtlha status --config {rec.work_dir}/cluster.yaml"
               f" --nats {rec.nats_url}")
    for role, ns in rec.namespaces.items():
        state = "present" if netns.exists(ns) else "MISSING"
        click.echo(f"  {role:<8} {ns}  ({state})   ip netns exec {ns} ...")


@main.command("status", help="List the labs on this machine and what each is running.")
def lab_status() -> None:
    import os

    from vtlha_lab.lab import registered_labs

    labs = registered_labs()
    if not labs:
        click.echo("no lab is up")
        return
    for rec in labs:
        _print_lab(rec)
        alive = 0
        for pid in rec.pids:
            try:
                os.kill(pid, 0)
                alive += 1
            except ProcessLookupError:
                pass
        click.echo(f"  processes: {alive} of {len(rec.pids)} running")


@main.command("down", help="Remove a lab (by id), or every lab with --all: processes, "
             "namespaces (with their veths and bridges) and the uplink.")
@click.argument("lab_id", required=False)
@click.option("--all", "all_", is_flag=True, help="Remove every lab on this machine.")
def lab_down(lab_id: str | None, all_: bool) -> None:
    from vtlha_lab.lab import registered_labs, teardown

    labs = registered_labs()
    if lab_id:
        labs = [r for r in labs if r.lab_id == lab_id]
        if not labs:
            click.echo(f"no lab {lab_id!r} (see `vtlha-lab status`)", err=True)
            sys.exit(2)
    elif not all_ and len(labs) > 1:
        click.echo(f"{len(labs)} labs are up ({', '.join(r.lab_id for r in labs)}): name one "
                   "or use --all", err=True)
        sys.exit(2)
    for rec in labs:
        removed = teardown(rec)
        click.echo(f"lab {rec.lab_id} removed ({len(removed)} namespaces and links)")
    if not labs:
        click.echo("no lab is up")


@main.command(help="Start a local two-node cluster, crash node-a, show the failover "
              "(in the network lab as root, on loopback otherwise).")
@click.option("--config", "config_path", default=None, type=click.Path(dir_okay=False),
              help="Cluster file (default: examples/cluster.yaml).")
@click.option("--work-dir", default=None, type=click.Path(file_okay=False),
              help="Where state and logs go (default: a new temporary directory).")
@click.option("--keep", is_flag=True, help="Keep the work directory afterwards.")
@click.option("--loopback", is_flag=True, help="Loopback mode even as root (no network lab).")
def demo(config_path: str | None, work_dir: str | None, keep: bool, loopback: bool) -> None:
    from vtlha_lab.demo import run_demo

    default = Path(__file__).parent.parent / "examples" / "cluster.yaml"
    src = Path(config_path) if config_path else default
    sys.exit(run_demo(src, Path(work_dir) if work_dir else None, keep, loopback))


# ---- the reference SAN target ------------------------------------------------------

@main.group(help="The reference SAN target: test and demo infrastructure standing in "
            "for a real SAN. It serves the cluster file's devices over TCP (one port per "
            "path index: san.port + index) and enforces SCSI-3-style persistent "
            "reservations, so that a node that lost a device cannot write to it.")
def san() -> None:
    pass


@san.command("serve", help="Run the reference SAN target (test/demo infrastructure, not a "
             "real SAN) until SIGTERM/SIGINT. It listens on PORT_BASE + i for each path "
             "index i, serves the devices of the cluster file (a relative `backing` is under "
             "the state root; missing files are created sparse), keeps reservations in "
             "STATE_ROOT/san/reservations.json and logs every write accepted or refused, "
             "and every reservation change, to STATE_ROOT/san/san-log.jsonl. Its own logs "
             "are JSON lines on stderr.")
@_config_opt
@click.option("--state-dir", default=None, type=click.Path(file_okay=False),
              help="State root (default: the cluster file's state_dir).")
@click.option("--host", default="0.0.0.0", show_default=True,
              help="Bind address (127.0.0.1 for loopback-only tests).")
@click.option("--port-base", default=None, type=click.IntRange(1, 65535),
              help="Port of path 0 (default: the cluster file's san.port).")
@click.option("--io-timeout", default=5.0, show_default=True, type=click.FloatRange(min=0.01),
              help="Seconds a device read/write may take before ETIMEDOUT is replied.")
@click.option("--create-size", default=16 * 1024 * 1024, show_default=True,
              type=click.IntRange(min=0),
              help="Size in bytes of backing files created when missing (0: do not create).")
@click.option("--log-level", default="info", show_default=True)
def san_serve(config_path: str, state_dir: str | None, host: str, port_base: int | None,
              io_timeout: float, create_size: int, log_level: str) -> None:
    import signal

    from vtlha.errors import FatalError
    from vtlha.log import setup_logging
    from vtlha_lab.santarget import SanTarget

    cfg = _load(config_path)
    log = setup_logging("san-target", cfg.san.host, log_level)
    root = Path(state_dir) if state_dir else Path(cfg.state_dir)

    async def _serve() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        target = SanTarget(cfg, root, host=host, port_base=port_base,
                           io_timeout=io_timeout, create_size=create_size)
        try:
            await target.start()
        except (FatalError, OSError) as exc:
            log.error("san target not started", extra={"error": str(exc)})
            return 2
        try:
            await stop.wait()
            log.info("shutting down")
        finally:
            await target.stop()
        return 0

    sys.exit(asyncio.run(_serve()))


@san.command("status", help="Print each device's reservation (holder, epoch, registered "
             "nodes) and the target's counters, asked of a running reference SAN target "
             "over path 0 (an anonymous connection, status only).")
@_config_opt
@click.option("--host", default="127.0.0.1", show_default=True, help="Target address.")
@click.option("--port-base", default=None, type=click.IntRange(1, 65535),
              help="Port of path 0 (default: the cluster file's san.port).")
@click.option("--timeout", default=3.0, show_default=True, type=click.FloatRange(min=0.01),
              help="Seconds to wait for the connection and for the reply.")
@click.option("--json", "as_json", is_flag=True, help="Print the raw status reply as JSON.")
def san_status(config_path: str, host: str, port_base: int | None, timeout: float,
               as_json: bool) -> None:
    import orjson

    from vtlha.san.client import SanClient, SanError

    cfg = _load(config_path)

    async def _ask() -> dict[str, Any]:
        async with SanClient.for_path(cfg, None, 0, host=host, port_base=port_base,
                                      timeout=timeout) as c:
            return await c.status()

    try:
        st = asyncio.run(_ask())
    except SanError as exc:
        click.echo(f"vtlha-lab san status: {exc}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(orjson.dumps(st, option=orjson.OPT_INDENT_2).decode())
        return
    click.echo(f"SAN target of cluster {st.get('cluster')}: ports {st.get('ports')}")
    click.echo(f"{'device':<16} {'holder':<10} {'epoch':>6}  {'blocks':>8}  registered")
    for name, d in sorted(st.get("devices", {}).items()):
        click.echo(f"{name:<16} {d['holder'] or '-':<10} {d['epoch']:>6}  {d['blocks']:>8}  "
                   f"{', '.join(d['registrants']) or '-'}")
    counters = st.get("counters", {})
    click.echo("counters: " + ", ".join(f"{k} {v}" for k, v in counters.items()))


@main.group(help="A client of the reference tape data service (test/demo infrastructure): "
            "write numbered blocks, read them back.")
def tape() -> None:
    pass


_portal_arg = click.argument("portal", metavar="HOST:PORT")


@tape.command("write", help="Write blocks 0, 1, 2, ... to the tape data service at PORTAL, "
              "each sent again until acknowledged (across failovers); every acknowledgement "
              "is appended to LOG (JSON lines). Resumes after the last block in LOG. Stops "
              "after --count blocks, or on SIGTERM/Ctrl-C.")
@_portal_arg
@click.option("--log", "log_path", required=True, type=click.Path(dir_okay=False),
              help="Acknowledgement log (JSON lines).")
@click.option("--count", default=None, type=click.IntRange(min=1),
              help="Stop after this many blocks (default: until stopped).")
@click.option("--interval", default=0.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds to wait after each acknowledged block.")
@click.option("--connect-timeout", default=None, type=click.FloatRange(min=0.01),
              help="Seconds a connect may take before it is given up and tried again "
              "(default: the request timeout, 2 s; TCP itself sends a lost SYN again "
              "only after 1 s).")
def tape_write(portal: str, log_path: str, count: int | None, interval: float,
               connect_timeout: float | None) -> None:
    import signal

    from vtlha_lab.tapeclient import write_blocks

    async def _run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        return await write_blocks(portal, Path(log_path), count, interval, stop,
                                  connect_timeout=connect_timeout)

    try:
        n = asyncio.run(_run())
    except ValueError as exc:
        click.echo(f"vtlha-lab tape write: {exc}", err=True)
        sys.exit(2)
    click.echo(f"{n} block(s) acknowledged in all; log {log_path}")


@tape.command("verify", help="Read back every block acknowledged in LOG from PORTAL and "
              "compare; exit 0 when every one is intact, 1 otherwise.")
@_portal_arg
@click.option("--log", "log_path", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Acknowledgement log written by `vtlha-lab tape write`.")
@click.option("--deadline", default=30.0, show_default=True, type=click.FloatRange(min=0),
              help="Seconds to keep retrying while the portal is unreachable.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def tape_verify(portal: str, log_path: str, deadline: float, as_json: bool) -> None:
    import orjson

    from vtlha_lab.tapeclient import TapeError, read_acks, verify_blocks

    acks = read_acks(Path(log_path))
    try:
        out = asyncio.run(verify_blocks(portal, acks, deadline))
    except (TapeError, ValueError) as exc:
        click.echo(f"vtlha-lab tape verify: {exc}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(orjson.dumps(out).decode())
    else:
        click.echo(f"{out['checked']} block(s) read back, {len(out['bad'])} bad; served by "
                   + ", ".join(f"{n} ({k})" for n, k in sorted(out["nodes"].items())))
    sys.exit(1 if out["bad"] else 0)


@tape.command("status", help="Ask the tape data service at PORTAL who serves it (node, "
              "epoch, devices, path).")
@_portal_arg
def tape_status(portal: str) -> None:
    import orjson

    from vtlha_lab.tapeclient import TapeError, status

    try:
        click.echo(orjson.dumps(asyncio.run(status(portal)), option=orjson.OPT_INDENT_2).decode())
    except (TapeError, ValueError) as exc:
        click.echo(f"vtlha-lab tape status: {exc}", err=True)
        sys.exit(1)


from vtlha_lab.chaos.cli import chaos  # noqa: E402 - registered last, after the group

main.add_command(chaos)

if __name__ == "__main__":
    main()
