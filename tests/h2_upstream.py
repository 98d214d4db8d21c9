"""A scriptable HTTP/2 (h2c) upstream for fault tests, built on the ``h2`` library.

Each request's ``:path`` picks the behaviour, so one server plays every misbehaving peer:

    /test.Echo/<anything>   a gRPC reply (the request message reversed, ``grpc-status: 0``)
    /reset/<code>           RST_STREAM with that error code instead of a reply
    /big/<bytes>            a 200 with that many bytes, sent as flow control allows

``goaway_after=n`` makes the first connection hold its requests until ``n`` streams arrived,
then send GOAWAY with ``last_stream_id`` the ``goaway_keep``-th stream: streams up to it are
answered, the later ones never (as a server going away does), and the connection closes.
Connections after the first behave normally.  ``log`` records what happened, per connection,
and every complete request (headers, body, trailers) as it arrived.
"""
from __future__ import annotations

import asyncio
import struct
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions
from hyperframe.frame import GoAwayFrame

from tests.loopback import LoopbackServer


def grpc_frame(message: bytes) -> bytes:
    return struct.pack(">BI", 0, len(message)) + message


@dataclass
class H2Request:
    headers: dict[bytes, bytes]
    body: bytes
    trailers: list[tuple[bytes, bytes]]


@dataclass
class H2Log:
    connections: int = 0
    streams: list[tuple[int, int, str]] = field(default_factory=list)   # (connection, stream id, path)
    resets_received: int = 0          # RST_STREAM from the proxy (a cancelled request)
    big_bytes_sent: int = 0
    requests: list[H2Request] = field(default_factory=list)


class ScriptedH2Server(LoopbackServer):
    def __init__(self, goaway_after: int = 0, goaway_keep: int = 0) -> None:
        self.goaway_after, self.goaway_keep = goaway_after, goaway_keep
        self.log = H2Log()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.log.connections += 1
        conn_no = self.log.connections
        h2c = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        h2c.initiate_connection()
        writer.write(h2c.data_to_send())
        bodies: dict[int, bytes] = {}
        paths: dict[int, str] = {}
        heads: dict[int, dict[bytes, bytes]] = {}
        trailers: dict[int, list[tuple[bytes, bytes]]] = {}
        held: list[int] = []
        big: dict[int, int] = {}
        window_open = asyncio.Event()
        going_away = conn_no == 1 and self.goaway_after > 0
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                try:
                    events = h2c.receive_data(data)
                except h2.exceptions.ProtocolError:
                    return
                for ev in events:
                    if isinstance(ev, h2.events.RequestReceived):
                        heads[ev.stream_id] = dict(ev.headers)
                        paths[ev.stream_id] = heads[ev.stream_id][b":path"].decode()
                        bodies[ev.stream_id] = b""
                        self.log.streams.append((conn_no, ev.stream_id, paths[ev.stream_id]))
                    elif isinstance(ev, h2.events.DataReceived):
                        bodies[ev.stream_id] = bodies.get(ev.stream_id, b"") + ev.data
                        h2c.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.StreamReset):
                        self.log.resets_received += 1
                        big.pop(ev.stream_id, None)
                    elif isinstance(ev, h2.events.TrailersReceived):
                        trailers[ev.stream_id] = list(ev.headers)
                    elif isinstance(ev, h2.events.WindowUpdated):
                        window_open.set()
                    elif isinstance(ev, h2.events.StreamEnded):
                        sid = ev.stream_id
                        self.log.requests.append(H2Request(heads[sid], bodies[sid], trailers.get(sid, [])))
                        if going_away:
                            held.append(sid)
                            if len(held) == self.goaway_after:
                                await self._go_away(h2c, writer, held, paths, bodies)
                                return
                            continue
                        self._answer(h2c, sid, paths[sid], bodies[sid], big)
                writer.write(h2c.data_to_send())
                await writer.drain()
                if big:
                    self._send_big(h2c, big)
                    writer.write(h2c.data_to_send())
                    await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    def _answer(self, h2c: h2.connection.H2Connection, sid: int, path: str, body: bytes,
                big: dict[int, int]) -> None:
        if path.startswith("/reset/"):
            h2c.reset_stream(sid, int(path.rsplit("/", 1)[1]))
        elif path.startswith("/big/"):
            h2c.send_headers(sid, [(":status", "200")])
            big[sid] = int(path.rsplit("/", 1)[1])
        else:
            h2c.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
            h2c.send_data(sid, grpc_frame(body[5:][::-1]))
            h2c.send_headers(sid, [("grpc-status", "0"), ("x-stream", str(sid))], end_stream=True)

    def _send_big(self, h2c: h2.connection.H2Connection, big: dict[int, int]) -> None:
        """As much of each big body as the windows allow; the rest after WINDOW_UPDATEs."""
        for sid, left in list(big.items()):
            while left:
                n = min(left, h2c.local_flow_control_window(sid), h2c.max_outbound_frame_size)
                if n <= 0:
                    break
                h2c.send_data(sid, bytes([sid % 251]) * n, end_stream=n == left)
                left -= n
                self.log.big_bytes_sent += n
            if left:
                big[sid] = left
            else:
                del big[sid]

    async def _go_away(self, h2c: h2.connection.H2Connection, writer: asyncio.StreamWriter, held: list[int],
                       paths: dict[int, str], bodies: dict[int, bytes]) -> None:
        """GOAWAY naming the ``goaway_keep``-th stream as the last processed, then answer up to it.

        The frame is written raw: the ``h2`` state machine would refuse to send anything after
        its own GOAWAY, and a real server finishes the streams it accepted."""
        ordered = sorted(held)
        last = ordered[self.goaway_keep - 1] if self.goaway_keep else 0
        writer.write(h2c.data_to_send() + GoAwayFrame(0, last_stream_id=last, error_code=0).serialize())
        await writer.drain()
        await asyncio.sleep(0.05)
        for sid in ordered[:self.goaway_keep]:
            self._answer(h2c, sid, paths[sid], bodies[sid], {})
        writer.write(h2c.data_to_send())
        await writer.drain()
        await asyncio.sleep(0.2)
