"""What keeps TLS cheap on the proxy's connections: direct record calls, session resumption,
and context options.

The event loop's TLS transport (uvloop's ``SSLProtocol``, or asyncio's) drives an
``ssl.SSLObject`` over memory BIOs and calls its ``read``, ``write`` and ``pending`` for
every record.  ``SSLObject`` implements those as Python methods that only forward to the C
object underneath; ``direct`` binds the C methods onto the instance, so each record costs no
Python frame.  The transport gets the object from ``wrap_bio`` of the context it was given,
and it only ever calls that method, so a ``TlsWrap`` (one per new connection) can stand in
for the ``ssl.SSLContext``: it wraps, binds and, on the client side, offers a saved session.

Session resumption on new tunnels: asyncio's ``create_connection`` takes no TLS session, so
the client side passes ``TlsWrap(context, session)`` as its ``ssl`` argument.  Sessions are
saved per ``SessionCache`` key (source identity, peer address, SNI) once they hold a TLS 1.3
ticket, i.e. after the first bytes from the server (the ``CONNECT`` answer on a tunnel),
which OpenSSL reads after the tickets.  A resumed TLS 1.3 handshake skips both signatures
and both certificate-chain verifications (PSK with (EC)DHE: forward secrecy is kept).  The
server's ticket key belongs to its ``SSLContext``, which a credentials push replaces, so a
renewed certificate or trust bundle always ends resumption with the old material.
"""
from __future__ import annotations

import ssl
from typing import Any

MAX_SESSIONS = 4096         # bounded: cleared when full (one per source, peer node and destination identity)
SERVER_TICKETS = 1          # TLS 1.3 tickets a server sends per handshake (OpenSSL's default: 2)


def harden(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Options for every context the proxy builds: no renegotiation (TLS 1.2; TLS 1.3 has none),
    no compression (already Python's default), one ticket per server handshake."""
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    if ctx.protocol == ssl.PROTOCOL_TLS_SERVER:
        ctx.num_tickets = SERVER_TICKETS
    return ctx


def direct(obj: ssl.SSLObject) -> ssl.SSLObject:
    """Make ``obj.read``/``write``/``pending`` the C methods themselves (same signatures:
    ``read(len[, buffer])``, ``write(data)``, ``pending()``), skipping ``SSLObject``'s
    forwarding frames on every record."""
    inner = getattr(obj, "_sslobj", None)
    if inner is not None:
        obj.read = inner.read            # type: ignore[method-assign]
        obj.write = inner.write          # type: ignore[method-assign]
        obj.pending = inner.pending      # type: ignore[method-assign]
    return obj


class TlsWrap:
    """Stands in for an ``ssl.SSLContext`` as a TLS transport's context: one per connection."""

    __slots__ = ("context", "session")

    def __init__(self, context: ssl.SSLContext, session: ssl.SSLSession | None = None) -> None:
        self.context = context
        self.session = session

    def wrap_bio(self, incoming: ssl.MemoryBIO, outgoing: ssl.MemoryBIO, server_side: bool = False,
                 server_hostname: str | None = None, session: ssl.SSLSession | None = None) -> ssl.SSLObject:
        return direct(self.context.wrap_bio(incoming, outgoing, server_side, server_hostname or None,
                                            session or self.session))


SessionKey = tuple[str, str, int, str]   # (security key, peer host, peer port, SNI)


class SessionCache:
    """The latest resumable session per key; replaced as a whole with the client contexts."""

    __slots__ = ("sessions", "offered", "resumed")

    def __init__(self) -> None:
        self.sessions: dict[SessionKey, ssl.SSLSession] = {}
        self.offered = 0      # handshakes that offered a saved session
        self.resumed = 0      # ... and that the server resumed

    def wrap(self, context: ssl.SSLContext, key: SessionKey) -> TlsWrap:
        session = self.sessions.get(key)
        if session is not None:
            self.offered += 1
        return TlsWrap(context, session)

    def save(self, key: SessionKey, ssl_object: Any) -> None:
        """Remember ``ssl_object``'s session if it can be resumed (it holds a ticket or an id)."""
        if ssl_object is None:
            return
        if ssl_object.session_reused:
            self.resumed += 1
        session = ssl_object.session
        if session is None or not (session.has_ticket or session.id):
            return
        if len(self.sessions) >= MAX_SESSIONS and key not in self.sessions:
            self.sessions.clear()
        self.sessions[key] = session

    def stats(self) -> dict[str, int]:
        return {"sessions": len(self.sessions), "offered": self.offered, "resumed": self.resumed}
