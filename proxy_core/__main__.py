"""Standalone proxy: ``python -m proxy_core --snapshot file.json [--control SOCK]``.

The access log goes to stdout (or ``--access-log FILE``) as JSON lines and, with
``--access-log-parquet DIR``, also to Parquet files in DIR, cut every
``--access-log-rotate-rows`` rows or ``--access-log-rotate-seconds`` seconds.  ``--trace-file FILE`` turns tracing on (W3C and B3
propagation, spans as JSON lines in FILE; see ``proxy_core.tracing``); so does ``--trace-zipkin URL``,
which POSTs the spans to a Zipkin v2 collector (``proxy_core.zipkin``).

Prints one JSON line ``{"event": "ready", ...}`` on stdout once every listener is bound
(the supervisor waits for it), then serves until SIGTERM/SIGINT or a control
``shutdown``: listeners close at once, in-flight requests get ``--grace`` seconds.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import signal
import sys
from typing import Callable, TextIO

import uvloop

from proxy_core import compiled_modules
from proxy_core.accesslog import DEFAULT_ROTATE_ROWS, DEFAULT_ROTATE_SECONDS, AccessLog
from proxy_core.control import ControlServer
from proxy_core.server import ProxyServer
from proxy_core.snapshot import Snapshot
from proxy_core.telemetry import DEFAULT_MAX_ROWS
from proxy_core.tracing import DEFAULT_SAMPLING, Tracer
from proxy_core.zipkin import ZipkinExporter


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m proxy_core", description=__doc__.splitlines()[0])
    p.add_argument("--snapshot", required=True, help="snapshot JSON file (see proxy_core/snapshot.py)")
    p.add_argument("--control", help="unix socket path for the supervisor's control channel")
    p.add_argument("--access-log", help="write the JSON access log to this file instead of stdout")
    p.add_argument("--no-access-log", action="store_true", help="disable the access log")
    p.add_argument("--access-log-parquet", metavar="DIR",
                   help="also write the access log as Parquet files into DIR (created if missing)")
    p.add_argument("--access-log-rotate-rows", type=_positive(int), default=DEFAULT_ROTATE_ROWS, metavar="N",
                   help="start a new Parquet file after N rows")
    p.add_argument("--access-log-rotate-seconds", type=_positive(float), default=DEFAULT_ROTATE_SECONDS,
                   metavar="S", help="start a new Parquet file once its oldest row is S seconds old")
    p.add_argument("--telemetry-buffer", type=int, default=DEFAULT_MAX_ROWS, metavar="N",
                   help="request rows kept for Mixer between two drains; beyond that rows are dropped and counted")
    p.add_argument("--no-telemetry", action="store_true", help="record no per-request telemetry")
    p.add_argument("--trace-file", metavar="FILE",
                   help="trace requests: write sampled spans to FILE as JSON lines (Zipkin v2 spans)")
    p.add_argument("--trace-zipkin", metavar="URL",
                   help="trace requests: POST sampled spans in batches to a Zipkin v2 collector "
                        "(e.g. http://zipkin:9411/api/v2/spans; Jaeger, Tempo and the OpenTelemetry "
                        "Collector accept it too)")
    p.add_argument("--trace-sampling", type=float, default=DEFAULT_SAMPLING, metavar="PERCENT",
                   help="percent of requests without a caller's trace decision that start a trace, unless the "
                        "snapshot sets tracing.sampling (default %(default)s, Istio's)")
    p.add_argument("--grace", type=float, default=5.0, help="seconds in-flight requests get on shutdown")
    args = p.parse_args(argv)
    if args.no_access_log and args.access_log_parquet:
        p.error("--access-log-parquet needs the access log: drop --no-access-log")
    if not 0.0 <= args.trace_sampling <= 100.0:
        p.error(f"--trace-sampling must be a percentage in [0, 100], got {args.trace_sampling}")
    if args.trace_zipkin:
        try:
            ZipkinExporter(args.trace_zipkin)
        except ValueError as exc:
            p.error(str(exc))
    return args


def _positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    """An argparse type: ``kind`` parsed from the text, rejected unless greater than zero."""
    def parse(text: str) -> int | float:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value" errors
    return parse


def make_access_log(args: argparse.Namespace, sink: TextIO) -> AccessLog:
    """The access log the flags ask for, JSON lines into ``sink``."""
    return AccessLog(sink, enabled=not args.no_access_log, parquet_dir=args.access_log_parquet,
                     rotate_rows=args.access_log_rotate_rows, rotate_seconds=args.access_log_rotate_seconds)


# Young-generation size that triggers the cyclic collector (CPython's default is 700).
GC_THRESHOLD = (20_000, 20, 20)


def settle_heap() -> None:
    """Take what exists now (modules, the configuration in force) out of the cyclic collector's sight.

    Per-request objects are freed by reference counting; what the collector would find
    among long-lived objects is nothing, yet its full passes walk all of them, on the event
    loop, while requests wait.  Called once serving starts and after every configuration swap.
    """
    gc.collect()
    gc.freeze()


async def serve(args: argparse.Namespace) -> None:
    with open(args.snapshot, encoding="utf-8") as f:
        snapshot = Snapshot.from_json(f.read())
    sink = open(args.access_log, "a", encoding="utf-8") if args.access_log else sys.stdout
    spans = open(args.trace_file, "a", encoding="utf-8") if args.trace_file else None
    exporter = ZipkinExporter(args.trace_zipkin) if args.trace_zipkin else None
    tracing = spans is not None or exporter is not None
    proxy = ProxyServer(snapshot, access_log=make_access_log(args, sink),
                        telemetry_rows=0 if args.no_telemetry else args.telemetry_buffer,
                        tracer=Tracer(spans, args.trace_sampling, exporter=exporter) if tracing else None)
    await proxy.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    control = None
    if args.control:
        control = ControlServer(proxy, args.control, stop.set, after_swap=settle_heap)
        await control.start()
    gc.set_threshold(*GC_THRESHOLD)
    settle_heap()
    sys.stdout.write(json.dumps({"event": "ready", "version": snapshot.version, "ports": proxy.ports,
                                 "vips": proxy.vip_ports(), "compiled": compiled_modules()}) + "\n")
    sys.stdout.flush()
    await stop.wait()
    if control is not None:
        await control.close()
    await proxy.close(grace=args.grace)
    if sink is not sys.stdout:
        sink.close()
    if spans is not None:
        spans.close()
    if exporter is not None:
        await exporter.close()


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvloop.run(serve(parse_args(argv)))


if __name__ == "__main__":
    main()
