"""Write coalescing (proxy_core.coalesce) on real loopback sockets: held writes leave at the
end of the loop iteration, as one write, in order, and nothing held is lost or reordered by
close, write_eof or the switch to direct writes."""
from __future__ import annotations

import asyncio
import socket
from typing import Any

import pytest

from proxy_core.coalesce import CoalescingTransport, WriteBatch, coalescing, direct, flush

pytestmark = pytest.mark.timeout(30)


class _Recorder(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport


_PEERS: list[socket.socket] = []


@pytest.fixture(autouse=True)
def _close_peers() -> Any:
    yield
    while _PEERS:
        _PEERS.pop().close()


async def pair() -> tuple[Any, socket.socket]:
    """A real transport on one end of a connected loopback pair; the other end, non-blocking
    (closed after the test)."""
    loop = asyncio.get_running_loop()
    ours, theirs = socket.socketpair()
    theirs.setblocking(False)
    _PEERS.append(theirs)
    transport, _ = await loop.connect_accepted_socket(_Recorder, ours)
    return transport, theirs


def received(sock: socket.socket) -> bytes:
    """What has arrived so far, without waiting."""
    out = b""
    while True:
        try:
            data = sock.recv(65536)
        except BlockingIOError:
            return out
        if not data:
            return out + b"<EOF>"
        out += data


async def next_iteration() -> None:
    await asyncio.sleep(0)
    await asyncio.sleep(0)


async def two_on(batch: WriteBatch) -> tuple[CoalescingTransport, socket.socket, CoalescingTransport, socket.socket]:
    """Two coalescing transports sharing ``batch``, each with its peer socket."""
    (raw_a, peer_a), (raw_b, peer_b) = await pair(), await pair()
    return CoalescingTransport(raw_a, batch), peer_a, CoalescingTransport(raw_b, batch), peer_b


async def test_writes_are_held_until_the_iteration_ends_then_leave_in_order() -> None:
    a, peer_a, b, peer_b = await two_on(WriteBatch())
    a.write(b"one ")
    b.write(b"other")
    a.write(b"two ")
    a.write(b"")          # nothing to send: not a write
    a.write(b"three")
    assert received(peer_a) == b"" and received(peer_b) == b""
    assert a.get_write_buffer_size() == len(b"one two three")
    await next_iteration()
    assert received(peer_a) == b"one two three"
    assert received(peer_b) == b"other"
    a.write(b"again")     # a new iteration: held again, flushed again
    assert received(peer_a) == b""
    await next_iteration()
    assert received(peer_a) == b"again"
    a.close(); b.close()


@pytest.mark.parametrize("end, expected", [
    ("write_eof", b"last words<EOF>"), ("close", b"last words<EOF>"), ("abort", b"<EOF>")])
async def test_ending_the_stream_writes_what_was_held_first_except_abort(end: str, expected: bytes) -> None:
    a, peer, other, _ = await two_on(WriteBatch())
    a.write(b"last words")
    getattr(a, end)()
    other.close()
    await next_iteration()
    try:
        got = received(peer)
    except ConnectionResetError:   # an abort may reset rather than end the stream
        got = b"<EOF>"
    assert got == expected
    a.close()


async def test_direct_flushes_then_writes_at_once() -> None:
    batch = WriteBatch()
    raw, peer = await pair()
    t = coalescing(raw, batch)
    assert coalescing(t, batch) is t and coalescing(raw, None) is raw
    t.write(b"held ")
    assert direct(t) is raw
    assert received(peer) == b"held "
    t.write(b"through")     # the wrapper, still referenced somewhere, now writes straight away
    assert received(peer) == b"through"
    assert direct(raw) is raw
    flush(raw)              # a plain transport: nothing to do
    raw.close()


async def test_a_connection_gone_meanwhile_drops_its_bytes_and_spares_the_others() -> None:
    a, peer_a, b, peer_b = await two_on(WriteBatch())
    a.write(b"lost")
    b.write(b"kept")
    a.transport.close()     # closed underneath the wrapper, as the loop does after a peer's EOF
    await next_iteration()
    assert received(peer_a) == b"<EOF>"
    assert received(peer_b) == b"kept"
    b.close()


async def test_records_run_after_the_writes_and_one_failure_spares_the_others(caplog) -> None:
    batch = WriteBatch()
    raw, peer = await pair()
    t = CoalescingTransport(raw, batch)
    seen: list[tuple[str, bytes]] = []

    class Finished:
        def __init__(self, name: str, fail: bool = False) -> None:
            self.name, self.fail = name, fail

        def record(self) -> None:
            seen.append((self.name, received(peer)))   # what the client has by then
            if self.fail:
                raise RuntimeError("bookkeeping bug")

    t.write(b"response")
    batch.record_later(Finished("first", fail=True))
    batch.record_later(Finished("second"))
    assert seen == []
    await next_iteration()
    assert seen == [("first", b"response"), ("second", b"")]
    assert "recording a finished request failed" in caplog.text
    batch.record_later(Finished("alone"))   # no write pending: the record still runs
    await next_iteration()
    assert seen[-1] == ("alone", b"")
    t.close()
