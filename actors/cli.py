"""The ``meshctl`` entry point: every command of ``mesh.cli`` plus installing the mesh itself."""
from __future__ import annotations

import argparse
import sys
from typing import Sequence, TextIO

from mesh import cli


def cmd_install(args: argparse.Namespace, out: TextIO) -> int:
    from actors.deploy import install
    from mesh.client import connect

    connect(args.address)
    install(replicas=args.replicas, options={"http_proxy_port": args.http_proxy_port,
                                             "inbound_port": args.inbound_port})
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
    p.set_defaults(handler=cmd_install)
    p = sub.add_parser("uninstall", help="remove the mesh from the Ray cluster")
    p.add_argument("--purge", action="store_true", help="also delete stored configuration and registry")
    p.set_defaults(handler=cmd_uninstall)


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(cli.run(argv, parser=cli.build_parser(add_commands)))


if __name__ == "__main__":
    main()
