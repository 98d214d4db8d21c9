"""The inbound listener's first protocol: plaintext or mTLS on the same port, told apart by the first byte.

PERMISSIVE accepts both on one port, as Istio's inbound listener does with its TLS inspector:
a connection whose first byte is ``0x16`` (a TLS handshake record) is terminated here with the
node's SVIDs, anything else is plaintext.  Either way the connection then belongs to the
proxy's HTTP/1.1 driver (the ``connection`` factory), which only accepts ``CONNECT`` on this
listener; the PeerAuthentication mode of the tunnel's target decides there whether a
plaintext tunnel may pass (``Mtls.admit``), since the target is only known then.

TLS runs in an ``SSLProtocol`` layered on the accepted transport (uvloop's when the loop is
uvloop, asyncio's otherwise), fed the bytes already read; its context is a ``TlsWrap``, so the
record calls skip ``SSLObject``'s Python frames (``proxy_core.tls_session``).  The handshake requires a client
certificate chaining to the trust bundle; once it completes, ``_Gate`` checks the SPIFFE id
in it and hands the decrypted stream to the driver with ``peer_principal`` set.  Every
refusal is counted by reason in ``Mtls.refused``.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Any, Callable

from proxy_core.mtls import HANDSHAKE_TIMEOUT, NO_SERVER_CERT, TLS_HANDSHAKE_BYTE, Mtls, PeerRejected, handshake_refusal
from proxy_core.tls_session import TlsWrap

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


class InboundSniffer(asyncio.Protocol):
    """Reads the first bytes of an inbound connection and installs the protocol they call for."""

    __slots__ = ("mtls", "connection", "transport")

    def __init__(self, mtls: Mtls, connection: ConnectionFactory) -> None:
        self.mtls = mtls
        self.connection = connection
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        transport = self.transport
        assert transport is not None
        if data[0] != TLS_HANDSHAKE_BYTE:
            conn = self.connection()
            transport.set_protocol(conn)
            conn.connection_made(transport)
            conn.data_received(data)
            return
        ctx = self.mtls.server_context()
        if ctx is None:
            self.mtls.refused[NO_SERVER_CERT] += 1
            transport.abort()
            return
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        waiter.add_done_callback(self._handshake_done)
        tls = _ssl_protocol_class(loop)(loop, _Gate(self.mtls, self.connection), TlsWrap(ctx), waiter,
                                        server_side=True, ssl_handshake_timeout=HANDSHAKE_TIMEOUT)
        transport.set_protocol(tls)
        tls.connection_made(transport)
        buf = tls.get_buffer(len(data))
        n = min(len(buf), len(data))
        buf[:n] = data[:n]
        tls.buffer_updated(n)
        if n < len(data):   # the protocol's buffer is normally far larger than one read
            rest = data[n:]
            buf = tls.get_buffer(len(rest))
            buf[:len(rest)] = rest
            tls.buffer_updated(len(rest))

    def _handshake_done(self, waiter: asyncio.Future[Any]) -> None:
        if waiter.cancelled():
            return
        exc = waiter.exception()
        if exc is None:
            self.mtls.handshakes += 1
            return
        self.mtls.refused[handshake_refusal(exc)] += 1
        log.debug("inbound mTLS handshake refused: %s", exc)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        pass


class _Gate(asyncio.Protocol):
    """The TLS layer's first application protocol: checks the peer, then steps aside."""

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

    def data_received(self, data: bytes) -> None:  # only after a refusal, before the abort lands
        pass

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        pass
