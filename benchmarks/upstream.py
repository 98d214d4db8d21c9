"""A fast 1 KiB HTTP/1.1 origin, used by ``proxy_bench.py`` only when nginx is not installed.

nginx is the preferred origin because it is neutral between the proxies being compared;
this server exists so the direct and raymesh rows can still be measured on a machine
without it.  It answers every request with the same 1 KiB body, keeps connections alive
and handles pipelining, with asyncio Protocols + httptools on uvloop so that the origin
costs little next to the proxy under test.

    python benchmarks/upstream.py --port 0 --port 0

prints ``{"event": "ready", "ports": [..]}`` once every port is bound, then serves until
SIGTERM/SIGINT.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

import httptools
import uvloop

BODY = b"x" * 1024
_RESPONSE = (b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: %d\r\n\r\n"
             % len(BODY)) + BODY
_RESPONSE_CLOSE = (b"HTTP/1.1 200 OK\r\ncontent-type: application/octet-stream\r\ncontent-length: %d\r\n"
                   b"connection: close\r\n\r\n" % len(BODY)) + BODY


class OriginProtocol(asyncio.Protocol):
    """One connection: every complete request adds one response; one write per read."""

    __slots__ = ("transport", "parser", "out", "close_after")

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.out: list[bytes] = []
        self.close_after = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.close()
            return
        if self.out:
            self.transport.write(b"".join(self.out))
            self.out.clear()
        if self.close_after:
            self.transport.close()

    # httptools callback
    def on_message_complete(self) -> None:
        if self.parser.should_keep_alive():
            self.out.append(_RESPONSE)
        else:
            self.out.append(_RESPONSE_CLOSE)
            self.close_after = True


async def serve(ports: list[int], host: str) -> None:
    loop = asyncio.get_running_loop()
    servers = [await loop.create_server(OriginProtocol, host, port, backlog=1024) for port in ports]
    bound = [s.sockets[0].getsockname()[1] for s in servers]
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    sys.stdout.write(json.dumps({"event": "ready", "ports": bound}) + "\n")
    sys.stdout.flush()
    await stop.wait()
    for s in servers:
        s.close()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, action="append", help="port to listen on (repeatable; 0 = any free port)")
    args = p.parse_args(argv)
    uvloop.run(serve(args.port or [0], args.host))


if __name__ == "__main__":
    main()
