"""Write coalescing: a connection's writes leave at the end of the event-loop iteration.

A request through the proxy makes two writes, the request to the upstream and the response
to the client, and on loopback each ``write`` runs the receiver's TCP input in the writer's
context and wakes the receiving process.  Written as soon as they are produced, the writes
of one loop iteration (often a dozen requests) each wake a peer that had just gone back to
sleep; a wake-up that crosses to an idle CPU costs more than the write itself.  Held until
the iteration's callbacks have run, they leave back to back: the first wakes the peer,
the rest find it awake.  Envoy defers its writes the same way (a write activates the
connection's write event; the dispatcher flushes it after the current callbacks).

``CoalescingTransport`` wraps an asyncio transport: ``write`` keeps the bytes, the first
write of an iteration registers the transport with its ``WriteBatch``, and the batch's
single ``call_soon`` callback writes each transport's bytes with one ``write``.  Everything
that ends or changes the byte stream (``close``, ``write_eof``, ``direct``) flushes first,
so nothing is reordered or lost; ``abort`` drops what was held, as it drops the transport's
own buffer.  Protocols whose transport the event loop may close on its own (``eof_received``
returning False) call ``flush`` first.

The HTTP/1.1 exchange uses it on both sides; byte tunnels switch to ``direct`` writes once
the connection becomes one (their half-close handling writes and closes from the loop's
callbacks).  A finished exchange's bookkeeping (stats, telemetry, access log) also waits for
the flush (``record_later``) and runs after the writes: a response is not held back by the
records of the requests finished before it in the same iteration, nor by its own.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging
from typing import Any

log = logging.getLogger(__name__)


class WriteBatch:
    """The transports with held writes, flushed once per loop iteration."""

    __slots__ = ("loop", "_pending", "_finished", "_scheduled", "_flush_cb", "_context")

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop     # None: the running loop, looked up at each first write of an iteration
        self._pending: list[CoalescingTransport] = []
        self._finished: list[Any] = []    # whose record() runs after the writes
        self._scheduled = False
        self._flush_cb = self.flush
        # The flush runs no code of the requests', so it needs none of their context variables:
        # a context of its own spares call_soon a copy of the current one every iteration.
        self._context = contextvars.Context()

    def add(self, transport: CoalescingTransport) -> None:
        """``transport`` holds bytes now; it is written at the end of this iteration."""
        self._pending.append(transport)
        if not self._scheduled:
            self._schedule()

    def record_later(self, item: Any) -> None:
        """Call ``item.record()`` once this iteration's writes are out: a request's bookkeeping
        (stats, telemetry, access log) need not hold back its response, nor the others'."""
        self._finished.append(item)
        if not self._scheduled:
            self._schedule()

    def _schedule(self) -> None:
        self._scheduled = True
        loop = self.loop
        if loop is None:
            loop = asyncio.get_running_loop()
        loop.call_soon(self._flush_cb, context=self._context)

    def flush(self) -> None:
        self._scheduled = False
        pending = self._pending
        if pending:
            self._pending = []
            for transport in pending:
                transport.flush()
        finished = self._finished
        if finished:
            self._finished = []
            for item in finished:
                try:
                    item.record()
                except Exception:   # a bug in one request's bookkeeping spares the others'
                    log.exception("recording a finished request failed")


class CoalescingTransport:
    """An asyncio transport whose writes are held until its batch flushes (see the module doc)."""

    __slots__ = ("transport", "batch", "_held")

    def __init__(self, transport: Any, batch: WriteBatch) -> None:
        self.transport = transport
        self.batch: WriteBatch | None = batch   # None: writes go straight through (see ``direct``)
        self._held: list[bytes] | None = None

    # writes

    def write(self, data: bytes) -> None:
        if not data:
            return
        held = self._held
        if held is not None:
            held.append(data)
            return
        batch = self.batch
        if batch is None:
            self.transport.write(data)
            return
        self._held = [data]
        batch.add(self)

    def writelines(self, lines: Any) -> None:
        for data in lines:
            self.write(data)

    def flush(self) -> None:
        """Write what is held now, as one write."""
        held = self._held
        if held is None:
            return
        self._held = None
        transport = self.transport
        if transport.is_closing():
            return   # the connection went away (reset, or closed by the loop): so do its bytes
        try:
            transport.write(b"".join(held) if len(held) > 1 else held[0])
        except Exception:   # one connection's failure must not stop the batch
            log.exception("deferred write failed")
            transport.abort()

    # the rest of the transport, with the writes held so far kept in order

    def close(self) -> None:
        self.flush()
        self.transport.close()

    def abort(self) -> None:
        self._held = None
        self.transport.abort()

    def write_eof(self) -> None:
        self.flush()
        self.transport.write_eof()

    def can_write_eof(self) -> bool:
        return self.transport.can_write_eof()

    def is_closing(self) -> bool:
        return self.transport.is_closing()

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self.transport.pause_reading()

    def resume_reading(self) -> None:
        self.transport.resume_reading()

    def is_reading(self) -> bool:
        return self.transport.is_reading()

    def set_protocol(self, protocol: Any) -> None:
        self.transport.set_protocol(protocol)

    def get_protocol(self) -> Any:
        return self.transport.get_protocol()

    def get_write_buffer_size(self) -> int:
        held = self._held
        return self.transport.get_write_buffer_size() + (sum(len(b) for b in held) if held else 0)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self.transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.transport.set_write_buffer_limits(high, low)


def coalescing(transport: Any, batch: WriteBatch | None) -> Any:
    """``transport`` with its writes coalesced by ``batch`` (as it is, without a batch)."""
    if batch is None or isinstance(transport, CoalescingTransport):
        return transport
    return CoalescingTransport(transport, batch)


def flush(transport: Any) -> None:
    """Write what ``transport`` holds, if it coalesces writes."""
    if isinstance(transport, CoalescingTransport):
        transport.flush()


def direct(transport: Any) -> Any:
    """The transport underneath, after writing what was held: for connections that become pipes."""
    if isinstance(transport, CoalescingTransport):
        transport.flush()
        transport.batch = None
        return transport.transport
    return transport
