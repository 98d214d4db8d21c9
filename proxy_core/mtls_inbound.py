"""The inbound listener's first protocol: plaintext or mTLS on the same port, told apart by the first bytes.

PERMISSIVE accepts both on one port, as Istio's inbound listener does with its TLS inspector:
a connection whose first byte is ``0x16`` (a TLS handshake record) is terminated here with the
node's SVIDs, anything else is plaintext.  A TLS connection is read until its ClientHello is
complete (``proxy_core.sni``), and its ALPN offer picks the TLS layer, as Istio's inbound
listener picks a filter chain: a byte tunnel offers ``istio`` and gets
``proxy_core.tls_stream.TlsStream``, which carries half-close; anything else (HTTP tunnels)
gets the event loop's TLS transport.  Either way the connection then belongs to the
proxy's HTTP/1.1 driver (the ``connection`` factory), which only accepts ``CONNECT`` on this
listener; the PeerAuthentication mode of the tunnel's target decides there whether a
plaintext tunnel may pass (``Mtls.admit``), since the target is only known then.

TLS runs in a protocol layered on the accepted transport (``TlsStream``, or uvloop's
``SSLProtocol`` when the loop is uvloop, asyncio's otherwise), fed the bytes already read;
its context is a ``TlsWrap``, so the record calls skip ``SSLObject``'s Python frames
(``proxy_core.tls_session``).  The handshake requires a client certificate chaining to the
trust bundle; once it completes, ``_Gate`` checks the SPIFFE id
in it and hands the decrypted stream to the driver with ``peer_principal`` set.  Every
refusal is counted by reason in ``Mtls.refused``.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from proxy_core.mtls import (ALPN_ISTIO, HANDSHAKE_FAILED, HANDSHAKE_TIMEOUT, NO_SERVER_CERT, TLS_HANDSHAKE_BYTE, Mtls,
                             PeerRejected, handshake_refusal)
from proxy_core.sni import MAX_CLIENT_HELLO, read_client_hello
from proxy_core.tls_session import TlsWrap
from proxy_core.tls_stream import TlsStream

try:
    import uvloop
    from uvloop.loop import SSLProtocol as _UvSSLProtocol
except ImportError:  # pragma: no cover - uvloop is a dependency; asyncio's protocol serves without it
    uvloop = None  # type: ignore[assignment]
    _UvSSLProtocol = None

log = logging.getLogger("proxy_core.mtls")

ConnectionFactory = Callable[[], Any]   # a fresh HttpConnection for the inbound listener


def _ssl_protocol_class(loop: asyncio.AbstractEventLoop) -> Any:
    if uvloop is not None and isinstance(loop, uvloop.Loop):
        return _UvSSLProtocol
    return asyncio.sslproto.SSLProtocol


def layer_tls(transport: asyncio.Transport, ctx: TlsWrap, app: asyncio.Protocol, data: bytes,
              on_handshake: Callable[[asyncio.Future[Any]], None]) -> None:
    """Terminate TLS on an accepted ``transport`` whose first ``data`` (the ClientHello) was
    already read: the event loop's TLS transport, fed those bytes through its buffer, with
    ``app`` as its application protocol once the handshake is done (``on_handshake`` is
    told how it ended)."""
    loop = asyncio.get_running_loop()
    waiter = loop.create_future()
    waiter.add_done_callback(on_handshake)
    tls = _ssl_protocol_class(loop)(loop, app, ctx, waiter, server_side=True, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
    transport.set_protocol(tls)
    tls.connection_made(transport)
    while data:   # the protocol's buffer is normally far larger than one ClientHello
        buf = tls.get_buffer(len(data))
        n = min(len(buf), len(data))
        buf[:n] = data[:n]
        tls.buffer_updated(n)
        data = data[n:]


class InboundSniffer(asyncio.Protocol):
    """Reads the first bytes of an inbound connection and installs the protocol they call for."""

    __slots__ = ("mtls", "connection", "transport", "seen", "timer")

    def __init__(self, mtls: Mtls, connection: ConnectionFactory) -> None:
        self.mtls = mtls
        self.connection = connection
        self.transport: asyncio.Transport | None = None
        self.seen = b""                                 # a ClientHello read so far
        self.timer: asyncio.TimerHandle | None = None   # for the ClientHello to complete

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if not self.seen and data[0] != TLS_HANDSHAKE_BYTE:
            conn = self.connection()
            transport.set_protocol(conn)
            conn.connection_made(transport)
            conn.data_received(data)
            return
        seen = self.seen = self.seen + data
        hello = read_client_hello(seen)
        if not hello.complete and len(seen) <= MAX_CLIENT_HELLO + 4096:
            if self.timer is None:
                self.timer = asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT, self._hello_timeout)
            return
        self._cancel_timer()
        self.seen = b""
        ctx = self.mtls.server_context()
        if ctx is None:
            self.mtls.refused[NO_SERVER_CERT] += 1
            transport.abort()
            return
        if ALPN_ISTIO in hello.alpn:
            self._stream(transport, ctx, seen)
        else:
            self._ssl_protocol(transport, ctx, seen)

    def _stream(self, transport: asyncio.Transport, ctx: Any, data: bytes) -> None:
        """A byte tunnel: TLS that carries half-close."""
        tls = TlsStream(_Gate(self.mtls, self.connection), TlsWrap(ctx), server_side=True,
                        handshake_timeout=HANDSHAKE_TIMEOUT)
        tls.handshake.add_done_callback(self._handshake_done)
        tls.handshake.add_done_callback(self._stream_done)
        transport.set_protocol(tls)
        tls.connection_made(transport)
        tls.data_received(data)

    def _ssl_protocol(self, transport: asyncio.Transport, ctx: Any, data: bytes) -> None:
        """An HTTP tunnel: the event loop's TLS transport."""
        layer_tls(transport, TlsWrap(ctx), _Gate(self.mtls, self.connection), data, self._handshake_done)

    def _handshake_done(self, waiter: asyncio.Future[Any]) -> None:
        if waiter.cancelled():
            return
        exc = waiter.exception()
        if exc is None:
            self.mtls.handshakes += 1
            return
        self.mtls.refused[handshake_refusal(exc)] += 1
        log.debug("inbound mTLS handshake refused: %s", exc)

    def _stream_done(self, handshake: asyncio.Future[Any]) -> None:
        if not handshake.cancelled() and handshake.exception() is None:
            self.mtls.stream_handshakes += 1

    def _hello_timeout(self) -> None:
        self.timer = None
        self.mtls.refused[HANDSHAKE_FAILED] += 1
        if self.transport is not None:
            self.transport.abort()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def eof_received(self) -> bool:
        if self.seen:
            self.mtls.refused[HANDSHAKE_FAILED] += 1   # closed in the middle of its ClientHello
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()


class HandshakeGate(asyncio.Protocol):
    """A TLS layer's first application protocol: ``connection_made`` (the handshake is done)
    checks the peer and hands the transport to the protocol that serves it, or aborts; the
    connection reaches nothing else before that, and nothing at all after a refusal."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:  # only after a refusal, before the abort lands
        pass

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        pass


class _Gate(HandshakeGate):
    """The inbound listener's gate: checks the peer's SVID, then steps aside."""

    __slots__ = ("mtls", "connection")

    def __init__(self, mtls: Mtls, connection: ConnectionFactory) -> None:
        self.mtls = mtls
        self.connection = connection

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        try:
            principal = self.mtls.peer_identity(ssl_object.getpeercert(True) if ssl_object else None)
        except (PeerRejected, ValueError) as exc:
            self.mtls.refused[getattr(exc, "reason", "bad_identity")] += 1
            log.debug("inbound mTLS peer refused: %s", exc)
            transport.abort()
            return
        if ssl_object.session_reused:
            self.mtls.resumed += 1
        conn = self.connection()
        conn.peer_principal = principal
        transport.set_protocol(conn)  # type: ignore[attr-defined]
        conn.connection_made(transport)
