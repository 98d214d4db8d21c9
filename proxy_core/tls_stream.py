"""A TLS transport for byte tunnels that carries half-close.

The event loop's TLS transport (uvloop's ``SSLProtocol``, or asyncio's) cannot ``write_eof``,
and it closes the whole connection when the peer's ``close_notify`` arrives.  That is right
for HTTP, whose messages say where they end, but a TCP session tunnelled between two node
proxies must keep each direction open until its own sender is done: a client that sends its
request and shuts down its write side (``nc -N``, HTTP/1.0-style clients, many simple
protocols) still waits for the whole answer.

TLS 1.3 can say this: ``close_notify`` ends only the sender's direction (RFC 8446 6.1), and
a peer that has received it may go on writing.  ``TlsStream`` drives an ``ssl.SSLObject``
over memory BIOs itself so that it can:

* ``write_eof``: ``SSLObject.unwrap()`` sends ``close_notify`` and keeps reading (OpenSSL
  answers ``SSLWantReadError``: the peer's own ``close_notify`` has not come yet);
* on the peer's ``close_notify`` (``read`` gives ``b""`` or ``SSLZeroReturnError``) call the
  application protocol's ``eof_received`` and stay open for writing if it returns True.

It is one object on both sides of the layer: the ``asyncio.Protocol`` of the raw TCP
transport and the ``asyncio.Transport`` of the application protocol.  Flow control passes
straight through: the application's ``pause_reading`` pauses the socket (and stops decrypting
what was already read), and the socket's ``pause_writing`` pauses the application, since
encrypted bytes go to the raw transport's buffer as soon as they are written.

The mesh uses it for byte tunnels only (TCP sessions, TLS passthrough, ``CONNECT``), which
offer the ALPN protocol ``istio`` so the inbound side can pick it as well; HTTP tunnels keep
the event loop's faster transport.  The context may be a ``proxy_core.tls_session.TlsWrap``,
which binds the record calls directly and offers a saved session.
"""
from __future__ import annotations

import asyncio
import ssl
from typing import Any

RECORD_SIZE = 16 * 1024         # the most plaintext one TLS record holds (one SSLObject.read)
DELIVER_SIZE = 256 * 1024       # plaintext gathered into one data_received: one write downstream


class TlsStream(asyncio.Protocol, asyncio.Transport):
    """TLS over a raw transport; ``handshake`` resolves once it completes (or with its error).

    ``app`` gets ``connection_made(self)`` after the handshake; a failed or timed-out
    handshake closes the connection, fails ``handshake`` and never reaches ``app``.
    """

    def __init__(self, app: asyncio.BaseProtocol, context: Any, *, server_side: bool,
                 server_hostname: str | None = None, handshake_timeout: float = 10.0,
                 handshake: asyncio.Future[None] | None = None) -> None:
        super().__init__()
        self._loop = asyncio.get_running_loop()
        self._app: Any = app
        self._incoming = ssl.MemoryBIO()
        self._outgoing = ssl.MemoryBIO()
        self._ssl = context.wrap_bio(self._incoming, self._outgoing, server_side=server_side,
                                     server_hostname=server_hostname or None)
        self.handshake = handshake if handshake is not None else self._loop.create_future()
        self._handshake_timeout = handshake_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._raw: asyncio.Transport | None = None
        self._open = False              # handshake done: the application has the connection
        self._closing = False
        self._eof_sent = False          # our close_notify is out
        self._eof_received = False      # the peer's close_notify came
        self._paused = False            # the application paused reading
        self._read_scheduled = False
        self._error: BaseException | None = None   # why the record stream broke, for connection_lost

    # -- the raw transport's protocol ----------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._raw = transport  # type: ignore[assignment]
        self._timer = self._loop.call_later(self._handshake_timeout, self._handshake_expired)
        self._do_handshake()   # the client's first flight (the server's call only finds nothing to read)

    def data_received(self, data: bytes) -> None:
        self._incoming.write(data)
        if self._open:
            self._read()
        elif not self._closing:
            self._do_handshake()

    def eof_received(self) -> bool:
        """The socket ended without ``close_notify`` (or after it): nothing more can be read."""
        if not self._open:
            self._fail_handshake(ConnectionResetError("connection closed during the TLS handshake"))
        elif not self._eof_received:
            self._eof_received = True
            self._app.eof_received()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._closing = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if not self._open:
            self._fail_handshake(exc or ConnectionResetError("connection closed during the TLS handshake"))
            return
        self._open = False
        app, self._app = self._app, None
        app.connection_lost(exc or self._error)  # type: ignore[arg-type]

    def pause_writing(self) -> None:
        if self._open:
            self._app.pause_writing()

    def resume_writing(self) -> None:
        if self._open:
            self._app.resume_writing()

    # -- handshake -------------------------------------------------------------------------------

    def _do_handshake(self) -> None:
        try:
            self._ssl.do_handshake()
        except ssl.SSLWantReadError:
            self._flush()
            return
        except (ssl.SSLError, ValueError) as exc:
            self._flush()               # the alert telling the peer why
            self._fail_handshake(exc)
            return
        self._flush()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._open = True
        if not self.handshake.done():
            self.handshake.set_result(None)
        self._app.connection_made(self)
        if not self._closing:
            self._read()                # application data that came with the handshake's last flight

    def _handshake_expired(self) -> None:
        self._timer = None
        self._fail_handshake(ConnectionAbortedError(
            f"TLS handshake is taking longer than {self._handshake_timeout} seconds: aborting the connection"))

    def _fail_handshake(self, exc: BaseException) -> None:
        if not self.handshake.done():
            self.handshake.set_exception(exc)
        if self._raw is not None and not self._closing:
            self._closing = True
            if isinstance(exc, ssl.SSLError):
                self._raw.close()       # let the alert out
            else:
                self._raw.abort()

    # -- reading -----------------------------------------------------------------------------------

    def _read(self) -> None:
        """Decrypt and deliver what the incoming BIO holds, until it is empty or reading pauses.

        ``SSLObject.read`` returns one record at most; the records of one socket read are
        delivered together, so a splice writes them to the other side at once."""
        self._read_scheduled = False
        ssl_object = self._ssl
        eof = False
        while not (self._paused or self._closing):
            chunks: list[bytes] = []
            size = 0
            try:
                while size < DELIVER_SIZE:
                    chunk = ssl_object.read(RECORD_SIZE)
                    if not chunk:
                        eof = True
                        break
                    chunks.append(chunk)
                    size += len(chunk)
            except ssl.SSLWantReadError:
                pass
            except ssl.SSLZeroReturnError:
                eof = True
            except ssl.SSLError as exc:
                self._fatal(exc)
                return
            if chunks:
                self._app.data_received(chunks[0] if len(chunks) == 1 else b"".join(chunks))
            if eof or size < DELIVER_SIZE:
                break
        self._flush()                   # post-handshake messages (tickets, key updates) may answer
        if eof:
            self._peer_eof()

    def _peer_eof(self) -> None:
        if self._eof_received or self._closing:
            return
        self._eof_received = True
        keep_open = self._app.eof_received()
        if self._eof_sent or not keep_open:
            self.close()

    def pause_reading(self) -> None:
        self._paused = True
        if self._raw is not None and not self._closing:
            self._raw.pause_reading()

    def resume_reading(self) -> None:
        if not self._paused:
            return
        self._paused = False
        if self._raw is not None and not self._closing:
            self._raw.resume_reading()
        if self._open and not self._read_scheduled and (self._incoming.pending or self._ssl.pending()):
            self._read_scheduled = True
            self._loop.call_soon(self._read)

    def is_reading(self) -> bool:
        return not self._paused and not self._closing

    # -- writing -----------------------------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self._eof_sent:
            raise RuntimeError("Cannot call write() after write_eof()")
        if self._closing or not data:
            return
        try:
            self._ssl.write(data)
        except ssl.SSLError as exc:
            self._fatal(exc)
            return
        self._flush()

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def can_write_eof(self) -> bool:
        """Half-close is TLS 1.3's: a TLS 1.2 peer answers ``close_notify`` by closing."""
        return self._open and self._ssl.version() == "TLSv1.3"

    def write_eof(self) -> None:
        if self._eof_sent or self._closing:
            return
        if not self.can_write_eof():
            raise NotImplementedError("TLS half-close needs TLS 1.3")
        self._send_close_notify()
        self._flush()

    def _send_close_notify(self) -> None:
        self._eof_sent = True
        try:
            self._ssl.unwrap()
        except ssl.SSLWantReadError:
            pass                        # sent; the peer's close_notify has not come yet
        except (ssl.SSLError, ValueError):
            pass                        # the connection is going anyway

    def _flush(self) -> None:
        if self._outgoing.pending and self._raw is not None and not self._raw.is_closing():
            self._raw.write(self._outgoing.read())

    def get_write_buffer_size(self) -> int:
        return self._raw.get_write_buffer_size() if self._raw is not None else 0

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        if self._raw is not None:
            self._raw.set_write_buffer_limits(high, low)

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._raw.get_write_buffer_limits() if self._raw is not None else (0, 0)

    # -- closing -----------------------------------------------------------------------------------

    def close(self) -> None:
        """Flush, say ``close_notify`` (unless said already), close the socket after its buffer."""
        if self._closing:
            return
        self._closing = True
        if self._open and not self._eof_sent:
            self._send_close_notify()
            self._flush()
        if self._raw is not None:
            self._raw.close()

    def abort(self) -> None:
        self._closing = True
        if self._raw is not None:
            self._raw.abort()

    def _fatal(self, exc: BaseException) -> None:
        """A broken record stream: drop the connection; ``connection_lost`` reports ``exc``."""
        self._error = exc
        self.abort()

    def is_closing(self) -> bool:
        return self._closing

    # -- the rest of the Transport interface -----------------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "ssl_object":
            return self._ssl
        if name == "peercert":
            return self._ssl.getpeercert() if self._open else default
        if name == "sslcontext":
            return self._ssl.context
        if name == "cipher":
            return self._ssl.cipher()
        return self._raw.get_extra_info(name, default) if self._raw is not None else default

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._app = protocol

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._app
