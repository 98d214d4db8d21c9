"""TCP service ports through the proxy on loopback: real sockets, real echo servers."""
from __future__ import annotations

import asyncio
import hashlib
import random
import time
from typing import Any

import pytest

from proxy_core.server import ProxyServer
from proxy_core.snapshot import Snapshot
from tests.unit.conftest import Echo, closed_port, cluster, snapshot

pytestmark = pytest.mark.timeout(60)

DB = "db.default.svc.cluster.local"
V1, V2 = f"outbound|5432|v1|{DB}", f"outbound|5432|v2|{DB}"


def db_snapshot(vip: str, routes: list[dict[str, Any]], clusters: dict[str, Any], node: str = "nA") -> dict[str, Any]:
    """One tcp service ``db`` on ``vip`` (port 0: an ephemeral port) with ``routes``."""
    snap = snapshot(node=node, vips=[{"address": vip, "port": 0, "host": DB, "protocol": "tcp"}], clusters=clusters)
    snap["tcp_routes"] = [{"name": f"{DB}:0", "host": DB, "port": 0, "routes": routes}]
    return snap


def to(*weighted: tuple[str, int], **extra: Any) -> dict[str, Any]:
    return {"name": "r", "route": [{"cluster": c, "weight": w} for c, w in weighted], **extra}


async def exchange(port: int, payload: bytes, host: str) -> bytes:
    """Send ``payload``, half-close, read until the server closes."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(payload)
    writer.write_eof()
    out = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return out


async def settled(p: ProxyServer) -> dict[str, Any]:
    """The proxy's tcp stats once every session has finished its accounting (bounded wait)."""
    for _ in range(100):
        if not p.tcp.sessions:
            break
        await asyncio.sleep(0.02)
    return p.stats()["tcp"]


async def closed_by_proxy(port: int, host: str) -> bool:
    """Connect and wait: True when the proxy closes the connection without sending a byte."""
    reader, writer = await asyncio.open_connection(host, port)
    try:
        return await asyncio.wait_for(reader.read(), 10) == b""
    except ConnectionResetError:
        return True
    finally:
        writer.close()


# -- splice and half-close -------------------------------------------------------------------


async def test_half_close_reaches_upstream_and_reply_still_flows(env) -> None:
    echo = env.track(await Echo("v1").start())
    p = await env.proxy(db_snapshot("127.78.0.1", [to((V1, 100))], {V1: cluster(echo.port)}))
    port = p.vip_ports()["127.78.0.1:0"]
    reader, writer = await asyncio.open_connection("127.78.0.1", port)
    writer.write(b"hello")
    assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"   # echoed while both ways open
    writer.write(b" world")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b" world|v1"       # after our EOF, then EOF
    writer.close()
    tcp = await settled(p)
    assert tcp["destinations"][V1] == {"connections_opened": 1, "connections_closed": 1,
                                       "received_bytes": 11, "sent_bytes": 14}
    assert tcp["active_connections"] == 0 and tcp["response_flags"] == {}


async def test_upstream_half_close_keeps_client_direction_open(env) -> None:
    async def greet_then_listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"banner")
        writer.write_eof()                         # the server is done talking, still listens
        received.append(await reader.read())
        writer.close()

    received: list[bytes] = []
    server = await asyncio.start_server(greet_then_listen, "127.0.0.1", 0)
    try:
        up_port = server.sockets[0].getsockname()[1]
        p = await env.proxy(db_snapshot("127.78.0.2", [to((V1, 100))], {V1: cluster(up_port)}))
        reader, writer = await asyncio.open_connection("127.78.0.2", p.vip_ports()["127.78.0.2:0"])
        assert await asyncio.wait_for(reader.read(), 5) == b"banner"     # EOF from the upstream arrived
        writer.write(b"late words")
        writer.write_eof()
        for _ in range(100):
            if received:
                break
            await asyncio.sleep(0.02)
        assert received == [b"late words"]
        writer.close()
    finally:
        server.close()


# -- routing ---------------------------------------------------------------------------------


async def test_weighted_split_across_two_destinations(env) -> None:
    a, b = env.track(await Echo("v1").start()), env.track(await Echo("v2").start())
    p = await env.proxy(db_snapshot("127.78.0.3", [to((V1, 80), (V2, 20))],
                                    {V1: cluster(a.port), V2: cluster(b.port)}), rng=random.Random(7))
    port = p.vip_ports()["127.78.0.3:0"]
    n = 200
    replies = [await exchange(port, b"x", "127.78.0.3") for _ in range(n)]
    assert set(replies) == {b"x|v1", b"x|v2"}
    share = replies.count(b"x|v1") / n
    assert 0.70 <= share <= 0.90                  # 80%: binomial sd is 2.8 points at n=200
    assert (a.connections, b.connections) == (replies.count(b"x|v1"), replies.count(b"x|v2"))
    dests = p.stats()["tcp"]["destinations"]
    assert dests[V1]["connections_opened"] + dests[V2]["connections_opened"] == n


async def test_destination_subnets_pick_the_route_and_unmatched_is_closed(env) -> None:
    a, b = env.track(await Echo("v1").start()), env.track(await Echo("v2").start())
    routes = [to((V2, 100), name="other-subnet", match=[{"destination_subnets": ["10.0.0.0/8"]}]),
              to((V1, 100), name="vip-subnet", match=[{"destination_subnets": ["127.78.0.0/16"]}])]
    p = await env.proxy(db_snapshot("127.78.0.4", routes, {V1: cluster(a.port), V2: cluster(b.port)}))
    port = p.vip_ports()["127.78.0.4:0"]
    assert await exchange(port, b"q", "127.78.0.4") == b"q|v1"

    await p.swap(Snapshot.from_dict(db_snapshot("127.78.0.4", routes[:1], {V1: cluster(a.port),
                                                                         V2: cluster(b.port)})))
    assert await closed_by_proxy(p.vip_ports()["127.78.0.4:0"], "127.78.0.4")
    assert p.stats()["tcp"]["response_flags"] == {"NR": 1}
    assert b.connections == 0


# -- two nodes -------------------------------------------------------------------------------


async def test_two_hops_through_the_peer_inbound_tunnel(env) -> None:
    echo = env.track(await Echo("on-node-b").start())
    node_b = await env.proxy(snapshot(node="nB", clusters={V1: cluster(echo.port, node="nB")}))
    via = {"address": "127.0.0.1", "port": node_b.ports["inbound"]}
    node_a = await env.proxy(db_snapshot("127.78.0.5", [to((V1, 100))], {V1: cluster(echo.port, node="nB", via=via)}))
    port = node_a.vip_ports()["127.78.0.5:0"]
    assert await exchange(port, b"across", "127.78.0.5") == b"across|on-node-b"
    assert node_b.stats()["tunnels_total"] == 1
    assert (await settled(node_a))["destinations"][V1]["received_bytes"] == 6


# -- volume and backpressure -------------------------------------------------------------------


async def test_large_transfer_with_a_stalled_reader_stays_bounded(env) -> None:
    echo = env.track(await Echo("big").start())
    p = await env.proxy(db_snapshot("127.78.0.6", [to((V1, 100))], {V1: cluster(echo.port)}))
    port = p.vip_ports()["127.78.0.6:0"]
    size = 20 * 1024 * 1024
    payload = random.Random(1).randbytes(size)
    reader, writer = await asyncio.open_connection("127.78.0.6", port)

    async def send() -> None:
        for i in range(0, size, 1 << 20):
            writer.write(payload[i:i + (1 << 20)])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.create_task(send())
    # The client reads nothing for a while: the echo's replies back up to the proxy, which
    # must stop reading instead of buffering them.
    peak = 0
    for _ in range(25):
        await asyncio.sleep(0.02)
        for s in p.tcp.sessions:
            assert s.transport is not None and s.upstream is not None and s.upstream.transport is not None
            peak = max(peak, s.transport.get_write_buffer_size(), s.upstream.transport.get_write_buffer_size())
    assert echo.received < size                   # the stall reached the sender
    assert peak <= 1 << 20                        # the proxy held at most about a read's worth
    got = await asyncio.wait_for(reader.read(), 30)
    await sender
    writer.close()
    assert len(got) == size + 4 and hashlib.sha256(got[:size]).digest() == hashlib.sha256(payload).digest()
    d = (await settled(p))["destinations"][V1]
    assert (d["received_bytes"], d["sent_bytes"]) == (size, size + 4)


# -- failures and timeouts -------------------------------------------------------------------


async def test_connect_failure_closes_the_client(env) -> None:
    p = await env.proxy(db_snapshot("127.78.0.7", [to((V1, 100))], {V1: cluster(closed_port())}))
    port = p.vip_ports()["127.78.0.7:0"]
    assert await closed_by_proxy(port, "127.78.0.7")
    tcp = await settled(p)
    assert tcp["response_flags"] == {"UF": 1}
    assert tcp["destinations"][V1]["connections_opened"] == tcp["destinations"][V1]["connections_closed"] == 1


async def test_no_endpoint_closes_the_client_with_uh(env) -> None:
    p = await env.proxy(db_snapshot("127.78.0.8", [to((V1, 100))], {V1: cluster()}))
    assert await closed_by_proxy(p.vip_ports()["127.78.0.8:0"], "127.78.0.8")
    assert p.stats()["tcp"]["response_flags"] == {"UH": 1}


async def test_idle_timeout_closes_both_sides_and_activity_defers_it(env) -> None:
    echo = env.track(await Echo("idle").start())
    p = await env.proxy(db_snapshot("127.78.0.9", [to((V1, 100), idle_timeout=0.3)], {V1: cluster(echo.port)}))
    reader, writer = await asyncio.open_connection("127.78.0.9", p.vip_ports()["127.78.0.9:0"])
    start = last = time.monotonic()
    for _ in range(4):                            # 0.6 s of traffic, every 0.15 s: never idle for 0.3 s
        await asyncio.sleep(0.15)
        writer.write(b"ping")
        assert await asyncio.wait_for(reader.readexactly(4), 5) == b"ping"
        last = time.monotonic()
    assert last - start >= 0.6
    assert await asyncio.wait_for(reader.read(), 5) == b""     # closed by the proxy, no "|idle"
    assert 0.25 <= time.monotonic() - last < 1.5
    writer.close()
    tcp = await settled(p)
    assert tcp["idle_timeouts"] == 1 and tcp["active_connections"] == 0
    assert tcp["destinations"][V1]["connections_closed"] == 1
