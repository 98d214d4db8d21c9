"""Protocol selection on VIP listeners from a connection's first bytes.

Istio picks a port's protocol from its declaration (``protocol``, ``appProtocol``, or a
port name prefix such as ``http2-`` / ``grpc-``) and sniffs ports without one.  The proxy
gets the outcome as the VIP's protocol and installs a connection driver accordingly:

=========  ==============================================================================
``h2``     HTTP/2 (http2, grpc ports): the client preface selects HTTP/2 with prior
           knowledge (h2c); anything else is served as HTTP/1.1, as Envoy's codec ``AUTO``.
           Ingress gateway listeners (``gateway``) are driven the same way, HTTPS ones
           once TLS is terminated (``proxy_core.gateway_tls``).
``auto``   no declared protocol: the HTTP/2 preface -> HTTP/2; an HTTP/1.x request line
           -> HTTP/1.1; a TLS ClientHello or anything else -> the port's TCP routes.
=========  ==============================================================================

``classify`` is pure (bytes in, verdict out) so the rules are tested without sockets.
"""
from __future__ import annotations

import asyncio
import re
from typing import Any

from proxy_core.http2 import PREFACE, H2ServerConnection
from proxy_core.server import HttpConnection, ProxyServer, _Listener
from proxy_core.tcp import TcpSession

HTTP1, HTTP2, TCP = "http1", "http2", "tcp"
_TLS_HANDSHAKE = 0x16
_METHOD = re.compile(rb"[A-Z]{3,7} ")          # GET, HEAD, POST, PUT, DELETE, OPTIONS, PATCH, TRACE
_REQUEST_LINE = re.compile(rb"[A-Z]{3,7} \S+ HTTP/1\.[01]\r?\n")
_MAX_SNIFF = 8192                              # a request line longer than this is not HTTP we serve
_HTTP_ONLY = frozenset(("h2", "gateway"))      # listeners that serve HTTP/1.1 or h2c, never raw TCP


def classify(data: bytes, kind: str) -> str | None:
    """The protocol ``data`` (the first bytes of a connection) speaks; None: read more first."""
    if PREFACE.startswith(data[:len(PREFACE)]):
        return HTTP2 if len(data) >= len(PREFACE) else None
    if kind in _HTTP_ONLY:
        return HTTP1
    if data[0] == _TLS_HANDSHAKE:
        return TCP
    if len(data) < 8:
        return None if _METHOD.match(data + b" " * 8) or data.isupper() else TCP
    if not _METHOD.match(data):
        return TCP
    if _REQUEST_LINE.match(data):
        return HTTP1
    if b"\n" in data or len(data) >= _MAX_SNIFF:
        return TCP
    return None


class ProtocolSniffer(asyncio.Protocol):
    """Holds a new connection's first bytes until ``classify`` decides, then hands the
    transport (and those bytes) to the driver of that protocol."""

    __slots__ = ("server", "listener", "transport", "buffer", "peer_principal")

    def __init__(self, server: ProxyServer, listener: _Listener, peer_principal: str | None = None) -> None:
        self.server = server
        self.listener = listener
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.peer_principal = peer_principal   # a TLS client's identity, learnt before these bytes

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        verdict = classify(self.buffer, self.listener.kind)
        if verdict is not None:
            self._hand_over(verdict)

    def eof_received(self) -> bool:
        if self.buffer:
            self._hand_over(classify(self.buffer, self.listener.kind) or TCP)
        return False

    def _hand_over(self, verdict: str) -> None:
        transport = self.transport
        assert transport is not None
        proto: Any
        if verdict == HTTP2:
            proto = H2ServerConnection(self.server, self.listener)
        elif verdict == HTTP1:
            proto = HttpConnection(self.server, self.listener)
        else:
            proto = TcpSession(self.server, self.listener)
        data, self.buffer = self.buffer, b""
        transport.set_protocol(proto)
        proto.connection_made(transport)
        if self.peer_principal is not None:
            proto.peer_principal = self.peer_principal
        proto.data_received(data)
