"""A server that speaks three protocols on one port, as a workload on a port with no declared
protocol may: HTTP/2 with prior knowledge (h2c, via the ``h2`` library), HTTP/1.1, and raw
TCP (an echo).  Each reply names the protocol that served it, so a test sees how the proxy
forwarded each kind of client.
"""
from __future__ import annotations

import asyncio

import h2.config
import h2.connection
import h2.events

from tests.loopback import LoopbackServer

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class MultiProtocolServer(LoopbackServer):
    """On 127.0.0.1 (an ephemeral port): replies ``h2 <path>``, ``h1 <path>`` or ``raw <bytes>``."""

    def __init__(self) -> None:
        self.served: list[str] = []          # "h2" / "h1" / "raw", one per request or connection

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            first = await reader.read(65536)
            while first and PREFACE.startswith(first[:len(PREFACE)]) and len(first) < len(PREFACE):
                more = await reader.read(65536)
                if not more:
                    break
                first += more
            if first.startswith(PREFACE):
                await self._h2(first, reader, writer)
            elif first[:4] in (b"GET ", b"POST", b"HEAD"):
                await self._h1(first, reader, writer)
            else:
                await self._raw(first, reader, writer)
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _h2(self, data: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        conn.initiate_connection()
        paths: dict[int, str] = {}
        while data:
            for ev in conn.receive_data(data):
                if isinstance(ev, h2.events.RequestReceived):
                    paths[ev.stream_id] = dict(ev.headers)[b":path"].decode()
                elif isinstance(ev, h2.events.DataReceived):
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                elif isinstance(ev, h2.events.StreamEnded):
                    self.served.append("h2")
                    body = f"h2 {paths.pop(ev.stream_id)}".encode()
                    conn.send_headers(ev.stream_id, [(":status", "200"), ("content-length", str(len(body)))])
                    conn.send_data(ev.stream_id, body, end_stream=True)
            writer.write(conn.data_to_send())
            await writer.drain()
            data = await reader.read(65536)

    async def _h1(self, data: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while data:
            while b"\r\n\r\n" not in data:   # bodiless requests only: the head is the request
                more = await reader.read(65536)
                if not more:
                    return
                data += more
            head, data = data.split(b"\r\n\r\n", 1)
            self.served.append("h1")
            body = b"h1 " + head.split(b" ", 2)[1]
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            data = data or await reader.read(65536)

    async def _raw(self, data: bytes, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.served.append("raw")
        writer.write(b"raw " + data)
        while data := await reader.read(65536):
            writer.write(data)
        await writer.drain()
