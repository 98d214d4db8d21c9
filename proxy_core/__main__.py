"""Standalone proxy: ``python -m proxy_core --snapshot file.json [--control SOCK]``.

Prints one JSON line ``{"event": "ready", ...}`` on stdout once every listener is bound
(the supervisor waits for it), then serves until SIGTERM/SIGINT or a control
``shutdown``: listeners close at once, in-flight requests get ``--grace`` seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys

import uvloop

from proxy_core.accesslog import AccessLog
from proxy_core.control import ControlServer
from proxy_core.server import ProxyServer
from proxy_core.snapshot import Snapshot
from proxy_core.telemetry import DEFAULT_MAX_ROWS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m proxy_core", description=__doc__.splitlines()[0])
    p.add_argument("--snapshot", required=True, help="snapshot JSON file (see proxy_core/snapshot.py)")
    p.add_argument("--control", help="unix socket path for the supervisor's control channel")
    p.add_argument("--access-log", help="write the JSON access log to this file instead of stdout")
    p.add_argument("--no-access-log", action="store_true", help="disable the access log")
    p.add_argument("--telemetry-buffer", type=int, default=DEFAULT_MAX_ROWS, metavar="N",
                   help="request rows kept for Mixer between two drains; beyond that rows are dropped and counted")
    p.add_argument("--no-telemetry", action="store_true", help="record no per-request telemetry")
    p.add_argument("--grace", type=float, default=5.0, help="seconds in-flight requests get on shutdown")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    with open(args.snapshot, encoding="utf-8") as f:
        snapshot = Snapshot.from_json(f.read())
    sink = open(args.access_log, "a", encoding="utf-8") if args.access_log else sys.stdout
    proxy = ProxyServer(snapshot, access_log=AccessLog(sink, enabled=not args.no_access_log),
                        telemetry_rows=0 if args.no_telemetry else args.telemetry_buffer)
    await proxy.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    control = None
    if args.control:
        control = ControlServer(proxy, args.control, stop.set)
        await control.start()
    sys.stdout.write(json.dumps({"event": "ready", "version": snapshot.version, "ports": proxy.ports,
                                 "vips": proxy.vip_ports()}) + "\n")
    sys.stdout.flush()
    await stop.wait()
    if control is not None:
        await control.close()
    await proxy.close(grace=args.grace)
    if sink is not sys.stdout:
        sink.close()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvloop.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
