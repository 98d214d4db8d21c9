"""``TlsStream`` pairs over real loopback sockets: data both ways, TLS 1.3 half-close in each
direction, a large transfer with backpressure, abort, handshake failures and timeout, and
session resumption, with certificates from a real CA (``mesh.identity``)."""
from __future__ import annotations

import asyncio
import hashlib
import random
import ssl
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import pytest

from mesh.identity import CAKeyPair, create_root_ca, spiffe_id
from proxy_core.mtls import EXPIRED, UNTRUSTED, handshake_refusal
from proxy_core.tls_session import SessionCache, harden
from proxy_core.tls_stream import TlsStream
from tests.unit.test_mtls import issue, load_svid

pytestmark = pytest.mark.timeout(60)

SERVER, CLIENT = spiffe_id("foo", "server"), spiffe_id("default", "client")


def context(purpose: int, ca: CAKeyPair, svid: dict[str, Any], version: ssl.TLSVersion | None = None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=ca.cert_pem)
    load_svid(ctx, svid)
    if version is not None:
        ctx.maximum_version = version
    return harden(ctx)


@pytest.fixture(scope="module")
def ca() -> CAKeyPair:
    return create_root_ca()


@pytest.fixture(scope="module")
def contexts(ca: CAKeyPair) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    return (context(ssl.PROTOCOL_TLS_SERVER, ca, issue(ca, SERVER)),
            context(ssl.PROTOCOL_TLS_CLIENT, ca, issue(ca, CLIENT)))


class App(asyncio.Protocol):
    """Records what one side's application sees; ``on_eof`` answers ``eof_received``."""

    def __init__(self, on_eof: Callable[["App"], bool] = lambda app: True) -> None:
        loop = asyncio.get_running_loop()
        self.on_eof = on_eof
        self.transport: Any = None
        self.data = bytearray()
        self.made = loop.create_future()
        self.eof = loop.create_future()
        self.lost: asyncio.Future[Exception | None] = loop.create_future()
        self.pauses = 0

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.made.set_result(transport)

    def data_received(self, data: bytes) -> None:
        self.data += data

    def eof_received(self) -> bool:
        self.eof.set_result(bytes(self.data))
        return self.on_eof(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost.set_result(exc)

    def pause_writing(self) -> None:
        self.pauses += 1

    def resume_writing(self) -> None:
        pass


class Pair:
    """A listening ``TlsStream`` server and the client streams dialled to it."""

    def __init__(self, server_ctx: Any, server_app: Callable[[], App], handshake_timeout: float = 10.0) -> None:
        self.server_ctx = server_ctx
        self.server_app = server_app
        self.handshake_timeout = handshake_timeout
        self.accepted: list[tuple[App, TlsStream]] = []
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def __aenter__(self) -> "Pair":
        def accept() -> TlsStream:
            app = self.server_app()
            stream = TlsStream(app, self.server_ctx, server_side=True, handshake_timeout=self.handshake_timeout)
            self.accepted.append((app, stream))
            return stream
        self.server = await asyncio.get_running_loop().create_server(accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self.server is not None
        self.server.close()
        for _, stream in self.accepted:
            stream.abort()

    async def dial(self, ctx: Any, app: App | None = None) -> tuple[App, TlsStream]:
        app = app or App()
        _, stream = await asyncio.get_running_loop().create_connection(
            lambda: TlsStream(app, ctx, server_side=False, server_hostname="server.mesh"), "127.0.0.1", self.port)
        await asyncio.wait_for(stream.handshake, 10)
        return app, stream


async def until(check: Callable[[], Any], timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


# -- data and half-close ---------------------------------------------------------------------------


async def test_data_both_ways_and_the_transport_interface(contexts) -> None:
    server_ctx, client_ctx = contexts
    async with Pair(server_ctx, App) as pair:
        app, stream = await pair.dial(client_ctx)
        stream.writelines([b"ping", b"-", b"1"])
        await until(lambda: pair.accepted and pair.accepted[0][0].data == b"ping-1")
        server_app, server_stream = pair.accepted[0]
        server_stream.write(b"pong")
        await until(lambda: app.data == b"pong")
        assert stream.can_write_eof() and server_stream.can_write_eof()
        assert stream.get_extra_info("ssl_object").version() == "TLSv1.3"
        assert stream.get_extra_info("sockname")[0] == "127.0.0.1" and stream.get_extra_info("peername")[1] == pair.port
        assert stream.get_extra_info("socket") is not None
        assert stream.get_extra_info("sslcontext") is client_ctx
        assert server_stream.get_extra_info("peercert")["subjectAltName"] == (("URI", CLIENT),)
        assert stream.get_protocol() is app and stream.is_reading() and not stream.is_closing()
        stream.close()
        assert stream.is_closing()
        assert await asyncio.wait_for(server_app.eof, 5) == b"ping-1"    # close_notify reached the app
        assert await asyncio.wait_for(app.lost, 5) is None
        assert await asyncio.wait_for(server_app.lost, 5) is None


async def test_client_half_close_still_gets_the_whole_reply(contexts) -> None:
    reply = random.Random(7).randbytes(3 << 20)

    def answer_after_eof(app: App) -> bool:
        app.transport.write(b"got " + bytes(app.data) + b"|" + reply)
        app.transport.close()
        return True

    server_ctx, client_ctx = contexts
    async with Pair(server_ctx, lambda: App(answer_after_eof)) as pair:
        app, stream = await pair.dial(client_ctx)
        stream.write(b"request")
        stream.write_eof()
        with pytest.raises(RuntimeError):
            stream.write(b"more")
        assert not stream.is_closing()
        assert await asyncio.wait_for(app.eof, 10) == b"got request|" + reply   # then the server's EOF
        assert await asyncio.wait_for(app.lost, 5) is None
        assert await asyncio.wait_for(pair.accepted[0][0].lost, 5) is None


async def test_server_half_close_keeps_the_client_direction_open(contexts) -> None:
    server_ctx, client_ctx = contexts
    async with Pair(server_ctx, App) as pair:
        app, stream = await pair.dial(client_ctx)
        await until(lambda: pair.accepted)
        server_app, server_stream = pair.accepted[0]
        server_stream.write(b"banner")
        server_stream.write_eof()
        assert await asyncio.wait_for(app.eof, 5) == b"banner"
        stream.write(b"late words")               # the client's direction is still open
        stream.write_eof()                        # both directions done: both ends close
        assert await asyncio.wait_for(server_app.eof, 5) == b"late words"
        assert await asyncio.wait_for(app.lost, 5) is None
        assert await asyncio.wait_for(server_app.lost, 5) is None


async def test_eof_received_false_closes_the_connection(contexts) -> None:
    server_ctx, client_ctx = contexts
    async with Pair(server_ctx, lambda: App(lambda app: False)) as pair:
        app, stream = await pair.dial(client_ctx)
        stream.write(b"bye")
        stream.write_eof()
        assert await asyncio.wait_for(app.eof, 5) == b""       # the server closed without a word
        assert await asyncio.wait_for(pair.accepted[0][0].lost, 5) is None


async def test_tls_12_cannot_half_close(ca, contexts) -> None:
    server_ctx, _ = contexts
    tls12 = context(ssl.PROTOCOL_TLS_CLIENT, ca, issue(ca, CLIENT), ssl.TLSVersion.TLSv1_2)
    async with Pair(server_ctx, App) as pair:
        app, stream = await pair.dial(tls12)
        assert not stream.can_write_eof()
        with pytest.raises(NotImplementedError):
            stream.write_eof()
        stream.write(b"still works")
        await until(lambda: pair.accepted and pair.accepted[0][0].data == b"still works")
        stream.close()
        assert await asyncio.wait_for(app.lost, 5) is None


# -- flow control --------------------------------------------------------------------------------


async def test_large_transfer_with_backpressure_both_ways(contexts) -> None:
    size = 16 << 20
    payload = random.Random(3).randbytes(size)
    server_ctx, client_ctx = contexts
    async with Pair(server_ctx, App) as pair:
        app, stream = await pair.dial(client_ctx)
        await until(lambda: pair.accepted)
        server_app, server_stream = pair.accepted[0]
        server_stream.pause_reading()           # the server's application stops reading
        assert not server_stream.is_reading()
        stream.set_write_buffer_limits(high=256 * 1024)
        for i in range(0, size, 1 << 20):
            stream.write(payload[i:i + (1 << 20)])
        stream.write_eof()
        await until(lambda: app.pauses > 0)     # the socket buffer filled: the writer is told to pause
        assert len(server_app.data) < size and stream.get_write_buffer_size() > 0
        server_stream.resume_reading()
        assert hashlib.sha256(await asyncio.wait_for(server_app.eof, 20)).digest() == hashlib.sha256(payload).digest()
        await until(lambda: stream.get_write_buffer_size() == 0)


# -- failures ------------------------------------------------------------------------------------


async def test_abort_reaches_the_peer_as_a_lost_connection(contexts) -> None:
    server_ctx, client_ctx = contexts
    async with Pair(server_ctx, App) as pair:
        app, stream = await pair.dial(client_ctx)
        await until(lambda: pair.accepted)
        stream.abort()
        assert stream.is_closing()
        await asyncio.wait_for(app.lost, 5)
        server_app = pair.accepted[0][0]
        await asyncio.wait_for(server_app.lost, 5)


async def test_untrusted_and_expired_certificates_fail_the_handshake_with_counted_reasons(ca, contexts) -> None:
    server_ctx, _ = contexts
    other = create_root_ca()
    past = datetime.now(timezone.utc) - timedelta(hours=3)
    cases = {UNTRUSTED: context(ssl.PROTOCOL_TLS_CLIENT, ca, issue(other, CLIENT)),
             EXPIRED: context(ssl.PROTOCOL_TLS_CLIENT, ca, issue(ca, CLIENT, timedelta(hours=1), past))}
    for reason, ctx in cases.items():
        async with Pair(server_ctx, App) as pair:
            # TLS 1.3: the client's handshake is over before the server has checked its
            # certificate; the server's alert ends the connection as the client reads.
            app, stream = await pair.dial(ctx)
            stream.write(b"never read")
            assert isinstance(await asyncio.wait_for(app.lost, 5), ssl.SSLError)
            server_app, server_stream = pair.accepted[0]
            assert handshake_refusal(server_stream.handshake.exception()) == reason
            assert not server_app.made.done() and server_app.data == b""   # its application never saw it
            assert server_stream.is_closing()


async def test_a_client_refusing_the_server_certificate_fails_its_handshake(ca, contexts) -> None:
    server_ctx, _ = contexts
    trusts_another_root = context(ssl.PROTOCOL_TLS_CLIENT, create_root_ca(), issue(ca, CLIENT))
    async with Pair(server_ctx, App) as pair:
        app = App()
        with pytest.raises(ssl.SSLCertVerificationError) as failed:
            await pair.dial(trusts_another_root, app)
        assert handshake_refusal(failed.value) == UNTRUSTED and not app.made.done()
        await until(lambda: pair.accepted and pair.accepted[0][1].handshake.done())
        server_app, server_stream = pair.accepted[0]
        assert handshake_refusal(server_stream.handshake.exception()) == UNTRUSTED   # the client's alert
        assert server_stream.is_closing() and not server_app.made.done()


async def test_handshake_timeout_closes_a_silent_client(contexts) -> None:
    server_ctx, _ = contexts
    async with Pair(server_ctx, App, handshake_timeout=0.3) as pair:
        reader, writer = await asyncio.open_connection("127.0.0.1", pair.port)
        try:
            assert await asyncio.wait_for(reader.read(), 5) == b""     # nothing sent, then closed
        except ConnectionResetError:
            pass
        finally:
            writer.close()
        exc = pair.accepted[0][1].handshake.exception()
        assert isinstance(exc, ConnectionAbortedError) and "longer than 0.3 seconds" in str(exc)


# -- resumption ----------------------------------------------------------------------------------


async def test_a_second_connection_resumes_the_session_saved_from_the_first(contexts) -> None:
    server_ctx, client_ctx = contexts
    cache = SessionCache()
    key = ("client", "127.0.0.1", 0, "server.mesh")
    def answer(app: App) -> bool:
        app.transport.write(b"hi")
        app.transport.close()
        return True

    async with Pair(server_ctx, lambda: App(answer)) as pair:
        for _ in range(2):
            app, stream = await pair.dial(cache.wrap(client_ctx, key))
            stream.write_eof()
            assert await asyncio.wait_for(app.eof, 5) == b"hi"     # the tickets came before it
            cache.save(key, stream.get_extra_info("ssl_object"))
            stream.close()
            await asyncio.wait_for(app.lost, 5)
        assert cache.stats() == {"sessions": 1, "offered": 1, "resumed": 1}
        assert pair.accepted[1][1].get_extra_info("ssl_object").session_reused
