"""Half-close across the node-to-node mTLS tunnel, between two real proxies on loopback.

A TCP session or ``CONNECT`` tunnel from node A reaches a server behind node B's inbound
listener over mTLS; the client's EOF must reach the server (which only answers after it),
and the server's EOF the client, with the other direction still open.  HTTP tunnels keep
the event loop's TLS layer (no ALPN ``istio``)."""
from __future__ import annotations

import asyncio
import os
import random
from typing import Any

import pytest

from mesh.identity import CAKeyPair, create_root_ca
from proxy_core.mtls import sni_for
from proxy_core.server import ProxyServer
from tests.unit.conftest import Echo, cluster, snapshot, vhost
from tests.unit.test_mtls import HTTPBIN, SLEEP, get, issue, push, two_nodes
from tests.unit.test_tcp_proxy import V1, db_snapshot, settled, to

pytestmark = pytest.mark.timeout(60)

MODES = ["STRICT", "PERMISSIVE"]


@pytest.fixture(scope="module")
def ca() -> CAKeyPair:
    return create_root_ca()


def secured(c: dict[str, Any], mode: str) -> dict[str, Any]:
    c["endpoints"][0].update(namespace="foo", service_account="httpbin", mtls_mode=mode)
    return c


async def nodes(env, ca: CAKeyPair, up_port: int, mode: str, snap_a: Any) -> tuple[ProxyServer, ProxyServer]:
    """Node B serving ``up_port`` behind its inbound listener, node A from ``snap_a(via)``; this
    test process is the workload SLEEP on node A."""
    b = await env.proxy(snapshot(node="nB", clusters={V1: secured(cluster(up_port, node="nB"), mode)}))
    push(b, [ca], [issue(ca, HTTPBIN)])
    a = await env.proxy(snap_a({"address": "127.0.0.1", "port": b.ports["inbound"]}))
    push(a, [ca], [issue(ca, SLEEP)], {os.getpid(): SLEEP})
    return a, b


def tcp_service(vip: str, up_port: int, mode: str) -> Any:
    return lambda via: db_snapshot(vip, [to((V1, 100))], {V1: secured(cluster(up_port, node="nB", via=via), mode)})


def assert_stream_tunnels(b: ProxyServer, n: int) -> None:
    mb = b.stats()["mtls"]
    assert mb["stream_handshakes"] == mb["handshakes"] == n and mb["peers"] == {SLEEP: n}
    assert mb["refused_total"] == 0


@pytest.mark.parametrize("mode", MODES)
async def test_tcp_client_half_close_gets_the_whole_reply_over_mtls(env, ca, mode) -> None:
    echo = env.track(await Echo("on-node-b").start())
    a, b = await nodes(env, ca, echo.port, mode, tcp_service("127.78.1.1", echo.port, mode))
    request = random.Random(5).randbytes(2 << 20)    # more than the socket buffers hold
    reader, writer = await asyncio.open_connection("127.78.1.1", a.vip_ports()["127.78.1.1:0"])
    writer.write(b"hello")
    assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"   # both ways open
    writer.write(request)
    writer.write_eof()
    # The echo appends its name only after our EOF, then closes: all of it, then EOF.
    assert await asyncio.wait_for(reader.read(), 10) == request + b"|on-node-b"
    writer.close()
    assert_stream_tunnels(b, 1)
    tcp = await settled(a)
    assert tcp["destinations"][V1] == {"connections_opened": 1, "connections_closed": 1,
                                       "received_bytes": 5 + len(request), "sent_bytes": 5 + len(request) + 10}


@pytest.mark.parametrize("mode", MODES)
async def test_server_half_close_keeps_the_client_direction_open_over_mtls(env, ca, mode) -> None:
    received: list[bytes] = []

    async def greet_then_listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"banner")
        writer.write_eof()                         # the server is done talking, still listens
        received.append(await reader.read())
        writer.close()

    server = await asyncio.start_server(greet_then_listen, "127.0.0.1", 0)
    try:
        up_port = server.sockets[0].getsockname()[1]
        a, b = await nodes(env, ca, up_port, mode, tcp_service("127.78.1.2", up_port, mode))
        reader, writer = await asyncio.open_connection("127.78.1.2", a.vip_ports()["127.78.1.2:0"])
        assert await asyncio.wait_for(reader.read(), 5) == b"banner"     # EOF from the server arrived
        writer.write(b"late words")
        writer.write_eof()
        for _ in range(250):
            if received:
                break
            await asyncio.sleep(0.02)
        assert received == [b"late words"]
        writer.close()
        assert_stream_tunnels(b, 1)
    finally:
        server.close()


async def test_connect_tunnel_carries_half_close_over_mtls(env, ca) -> None:
    echo = env.track(await Echo("e").start())

    def with_vhost(via: dict[str, Any]) -> dict[str, Any]:
        return snapshot(node="nA", vhosts=[vhost("reviews", 9080, [{"name": "d", "route": [{"cluster": V1}]}])],
                        clusters={V1: secured(cluster(echo.port, node="nB", via=via), "STRICT")})

    a, b = await nodes(env, ca, echo.port, "STRICT", with_vhost)
    reader, writer = await asyncio.open_connection("127.0.0.1", a.ports["http_proxy"])
    writer.write(b"CONNECT reviews:9080 HTTP/1.1\r\nHost: reviews:9080\r\n\r\nearly")
    writer.write_eof()                   # before the tunnel is even up
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 200 Connection established\r\n\r\n"
    assert await asyncio.wait_for(reader.read(), 5) == b"early|e"
    writer.close()
    assert_stream_tunnels(b, 1)
    assert b.stats()["tunnels_total"] == 1


async def test_http_tunnels_keep_the_event_loop_tls_layer(env, ca) -> None:
    up, a, b = await two_nodes(env, ca, "STRICT")
    assert await get(a.ports["http_proxy"], n=2) == [(200, b"httpbin")] * 2
    mb = b.stats()["mtls"]
    assert mb["handshakes"] == 1 and mb["stream_handshakes"] == 0


async def test_byte_tunnels_resume_their_own_sessions(env, ca) -> None:
    echo = env.track(await Echo("r").start())
    a, b = await nodes(env, ca, echo.port, "STRICT", tcp_service("127.78.1.3", echo.port, "STRICT"))
    for i in range(3):
        reader, writer = await asyncio.open_connection("127.78.1.3", a.vip_ports()["127.78.1.3:0"])
        writer.write(b"x%d" % i)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 5) == b"x%d|r" % i
        writer.close()
    assert b.stats()["mtls"]["resumed"] == 2 and a.stats()["mtls"]["client_sessions"]["resumed"] == 2
    assert_stream_tunnels(b, 3)


# -- the inbound listener picks its TLS layer by ALPN --------------------------------------------


async def test_inbound_selects_istio_for_a_client_offering_it(env, ca) -> None:
    from tests.unit.test_mtls import client_context
    echo = env.track(await Echo("e").start())
    a, b = await nodes(env, ca, echo.port, "STRICT", tcp_service("127.78.1.4", echo.port, "STRICT"))
    ctx = client_context(ca.cert_pem, issue(ca, SLEEP))
    ctx.set_alpn_protocols(["h2", "istio"])
    reader, writer = await asyncio.wait_for(asyncio.open_connection(
        "127.0.0.1", b.ports["inbound"], ssl=ctx, server_hostname=sni_for(HTTPBIN)), 10)
    assert writer.get_extra_info("ssl_object").selected_alpn_protocol() == "istio"
    writer.write(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\nabc" % echo.port)
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200 ")
    assert await asyncio.wait_for(reader.readexactly(3), 5) == b"abc"
    writer.close()
    assert_stream_tunnels(b, 1)


async def test_an_incomplete_client_hello_is_cut_after_the_handshake_timeout(env, ca, monkeypatch) -> None:
    from proxy_core import mtls_inbound
    monkeypatch.setattr(mtls_inbound, "HANDSHAKE_TIMEOUT", 0.3)
    echo = env.track(await Echo("e").start())
    a, b = await nodes(env, ca, echo.port, "STRICT", tcp_service("127.78.1.5", echo.port, "STRICT"))
    reader, writer = await asyncio.open_connection("127.0.0.1", b.ports["inbound"])
    writer.write(b"\x16\x03\x01\x02\x00\x01")          # a handshake record that never completes
    try:
        assert await asyncio.wait_for(reader.read(), 5) == b""
    except ConnectionResetError:
        pass
    writer.close()
    assert b.stats()["mtls"]["refused"] == {"handshake_failed": 1}
