"""The ``meshctl`` entry point: every command of ``mesh.cli`` plus installing the mesh itself."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence, TextIO

from mesh import cli
from proxy_core.accesslog import DEFAULT_ROTATE_ROWS, DEFAULT_ROTATE_SECONDS
from proxy_core.zipkin import ZipkinExporter


def cmd_install(args: argparse.Namespace, out: TextIO) -> int:
    from actors.deploy import install
    from actors.proxy_worker import AccessLogOptions, GatewayOptions
    from mesh.client import connect

    access_log = {"parquet_dir": args.access_log_parquet, "rotate_rows": args.access_log_rotate_rows,
                  "rotate_seconds": args.access_log_rotate_seconds} if args.access_log_parquet else {}
    tracing = {"file": args.trace_file, "zipkin": args.trace_zipkin, "sampling": args.trace_sampling} \
        if args.trace_file or args.trace_zipkin else {}
    gateway = {"nodes": args.gateway_nodes, "address": args.gateway_address}
    try:
        AccessLogOptions.from_dict(access_log)
        GatewayOptions.from_dict(gateway)
        if not 0.0 <= args.trace_sampling <= 100.0:
            raise ValueError(f"--trace-sampling must be a percentage (0-100), got {args.trace_sampling}")
        if args.trace_zipkin:
            ZipkinExporter(args.trace_zipkin)   # a malformed URL fails here, not on every node
    except ValueError as exc:
        print(f"meshctl install: {exc}", file=sys.stderr)
        return 2
    connect(args.address)
    install(replicas=args.replicas, options={"http_proxy_port": args.http_proxy_port,
                                             "inbound_port": args.inbound_port, "access_log": access_log,
                                             "tracing": tracing, "gateway": gateway})
    print(f"raymesh installed: galley x{args.replicas}, pilot x{args.replicas}, one proxy per node", file=out)
    return 0


def cmd_uninstall(args: argparse.Namespace, out: TextIO) -> int:
    from actors.deploy import uninstall
    from mesh.client import connect

    connect(args.address)
    uninstall(purge=args.purge)
    print("raymesh uninstalled" + (" (configuration purged)" if args.purge else ""), file=out)
    return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("install", help="deploy the control plane and per-node proxies on the Ray cluster")
    p.add_argument("--replicas", type=int, default=2)
    p.add_argument("--http-proxy-port", type=int, default=15001)
    p.add_argument("--inbound-port", type=int, default=15006)
    p.add_argument("--access-log-parquet", metavar="DIR", default=None,
                   help="every node's proxy also writes its access log as Parquet files into DIR (on its node)")
    p.add_argument("--access-log-rotate-rows", type=int, default=DEFAULT_ROTATE_ROWS, metavar="N",
                   help="start a new Parquet file after N rows (default %(default)s)")
    p.add_argument("--access-log-rotate-seconds", type=float, default=DEFAULT_ROTATE_SECONDS, metavar="S",
                   help="start a new Parquet file once its oldest row is S seconds old (default %(default)s)")
    p.add_argument("--trace-file", metavar="FILE", default=None,
                   help="every node's proxy records spans as Zipkin JSON lines into FILE (on its node)")
    p.add_argument("--trace-zipkin", metavar="URL", default=None,
                   help="every node's proxy POSTs its spans to this Zipkin v2 collector "
                        "(e.g. http://zipkin.example:9411/api/v2/spans; Jaeger, Tempo and the "
                        "OpenTelemetry Collector accept it too)")
    p.add_argument("--trace-sampling", type=float, default=1.0, metavar="PERCENT",
                   help="percent of requests without a trace context that start one (default %(default)s; "
                        "a Telemetry resource's randomSamplingPercentage overrides it)")
    p.add_argument("--gateway-nodes", default="head", metavar="head|all|none|KEY=VALUE",
                   help="which nodes' proxies serve Istio Gateways (the ingress gateway): the head node "
                        "(default), every node, none, or the nodes with that Ray node label")
    p.add_argument("--gateway-address", default="127.0.0.1", metavar="IP",
                   help="the address gateway listeners bind (default %(default)s: this machine only; "
                        "0.0.0.0 exposes Gateway ports to the network)")
    p.set_defaults(handler=cmd_install)
    p = sub.add_parser("uninstall", help="remove the mesh from the Ray cluster")
    p.add_argument("--purge", action="store_true", help="also delete stored configuration and registry")
    p.set_defaults(handler=cmd_uninstall)


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(cli.run(argv, parser=cli.build_parser(add_commands)))


if __name__ == "__main__":
    main()
