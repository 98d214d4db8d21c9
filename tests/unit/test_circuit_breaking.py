"""Circuit breakers and connection pool settings through a real ProxyServer and real upstream sockets."""
from __future__ import annotations

import asyncio
import random
import socket
import time
from typing import Any

import pytest

from tests.unit.conftest import Reply, Seen, cluster, snapshot, vhost
from tests.unit.test_proxy_server import aget

pytestmark = pytest.mark.timeout(60)

CL = "outbound|9080||reviews"
HOST = {"Host": "reviews:9080"}


def snap(*ports: int, pool: dict[str, Any] | None = None, retries: dict[str, Any] | None = None,
         timeout: float | None = None, **extra: Any) -> dict[str, Any]:
    c = cluster(*ports)
    if pool is not None:
        c["connection_pool"] = pool
    c.update(extra)
    route: dict[str, Any] = {"name": "r", "route": [{"cluster": CL}]}
    if retries is not None:
        route["retries"] = retries
    if timeout is not None:
        route["timeout"] = timeout
    return snapshot(vhosts=[vhost("reviews", 9080, [route])], clusters={CL: c})


async def burst(port: int, n: int) -> list[tuple[int, dict[str, str], bytes]]:
    return list(await asyncio.gather(*(aget(port, "/", headers=HOST) for _ in range(n))))


class SlowRng(random.Random):
    """Backoff draws its top value (almost 25 ms for a first retry), so retries that fail together
    are all still in backoff when the last failure is seen."""

    def random(self) -> float:
        return 0.99


async def test_overflow_beyond_connections_and_pending_queue_is_503_uo(env) -> None:
    up = await env.upstream(lambda s: Reply(body=b"done", delay=0.4))
    p = await env.proxy(snap(up.port, pool={"max_connections": 1, "max_pending_requests": 1}))
    # A request dialing a connection is pending too (as in Envoy): warm the pool first.
    assert (await aget(p.ports["http_proxy"], "/", headers=HOST))[0] == 200
    t = time.monotonic()
    results = await burst(p.ports["http_proxy"], 4)
    statuses = sorted(r[0] for r in results)
    assert statuses == [200, 200, 503, 503]
    assert all(r[2].endswith(b"reset reason: overflow") for r in results if r[0] == 503)
    # One connection carried both admitted requests, one after the other: the second waited.
    assert [s.conn_id for s in up.seen] == [1, 1, 1] and up.connections == 1
    assert time.monotonic() - t >= 0.75
    assert p.stats()["response_flags"] == {"UO": 2}
    c = p.stats()["clusters"][CL]
    assert c["upstream_rq_pending_overflow"] == 2 and c["rq_active"] == 0 and c["rq_pending"] == 0


async def test_max_requests_overflow_is_immediate(env) -> None:
    up = await env.upstream(lambda s: Reply(delay=0.5))
    p = await env.proxy(snap(up.port, pool={"max_requests": 1}))
    t = time.monotonic()
    first = asyncio.ensure_future(aget(p.ports["http_proxy"], "/", headers=HOST))
    await asyncio.sleep(0.1)
    status, _, _ = await aget(p.ports["http_proxy"], "/", headers=HOST)
    assert status == 503 and time.monotonic() - t < 0.4     # not queued behind the slow one
    assert (await first)[0] == 200
    assert p.stats()["clusters"][CL]["upstream_rq_overflow"] == 1


async def test_waiting_request_leaves_the_queue_on_route_timeout(env) -> None:
    up = await env.upstream(lambda s: Reply(delay=0.6))
    p = await env.proxy(snap(up.port, pool={"max_connections": 1, "max_pending_requests": 5}, timeout=0.3))
    statuses = sorted(r[0] for r in await burst(p.ports["http_proxy"], 2))
    assert statuses == [504, 504]
    await asyncio.sleep(0.4)   # the slow answer arrives, the connection comes back
    c = p.stats()["clusters"][CL]
    assert (c["rq_active"], c["rq_pending"]) == (0, 0) and len(up.seen) == 1
    up.handler = lambda s: Reply(body=b"fast")
    assert (await aget(p.ports["http_proxy"], "/", headers=HOST))[0] == 200


async def test_max_requests_per_connection_retires_connections(env) -> None:
    up = await env.upstream()
    p = await env.proxy(snap(up.port, pool={"max_requests_per_connection": 2}))
    for _ in range(5):
        assert (await aget(p.ports["http_proxy"], "/", headers=HOST))[0] == 200
    assert [s.conn_id for s in up.seen] == [1, 1, 2, 2, 3]
    assert p.stats()["clusters"][CL]["upstream_cx_max_requests"] == 2


async def test_idle_timeout_and_max_connection_duration_close_connections(env) -> None:
    up = await env.upstream()
    p = await env.proxy(snap(up.port, pool={"idle_timeout": 0.2}))
    for _ in range(2):
        assert (await aget(p.ports["http_proxy"], "/", headers=HOST))[0] == 200
        await asyncio.sleep(0.4)
    assert up.connections == 2 and p.stats()["clusters"][CL]["upstream_cx_idle_timeout"] == 2
    assert p.stats()["clusters"][CL]["cx_active"] == 0

    up2 = await env.upstream()
    p2 = await env.proxy(snap(up2.port, pool={"max_connection_duration": 0.3}))
    assert (await aget(p2.ports["http_proxy"], "/", headers=HOST))[0] == 200
    assert (await aget(p2.ports["http_proxy"], "/", headers=HOST))[0] == 200   # same connection
    await asyncio.sleep(0.45)
    assert (await aget(p2.ports["http_proxy"], "/", headers=HOST))[0] == 200
    assert [s.conn_id for s in up2.seen] == [1, 1, 2]


async def test_tcp_keepalive_is_set_on_upstream_sockets(env) -> None:
    up = await env.upstream()
    ka = {"time": 30, "interval": 5, "probes": 4}
    p = await env.proxy(snap(up.port, pool={"tcp_keepalive": ka}))
    assert (await aget(p.ports["http_proxy"], "/", headers=HOST))[0] == 200
    idle = [c for stack in p.pool._idle.values() for c in stack]
    assert len(idle) == 1
    sock = idle[0].transport.get_extra_info("socket")
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 30
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 5
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 4


async def _all_fail_together(n: int) -> tuple[Any, list[Seen]]:
    """An upstream whose first ``n`` requests are held until all arrived, then answered 503 at once."""
    arrived = asyncio.Event()
    held: list[Seen] = []

    async def handler(seen: Seen) -> Reply:
        held.append(seen)
        if len(held) <= n:
            if len(held) == n:
                arrived.set()
            await arrived.wait()
            return Reply(503, b"busy")
        return Reply(body=b"ok")

    return handler, held


async def test_max_retries_caps_concurrent_retries_with_uo(env) -> None:
    handler, held = await _all_fail_together(3)
    up = await env.upstream(handler)
    p = await env.proxy(snap(up.port, pool={"max_retries": 1}, retries={"attempts": 2, "retry_on": ["5xx"]}),
                        rng=SlowRng())
    results = await burst(p.ports["http_proxy"], 3)
    assert sorted(r[0] for r in results) == [200, 503, 503]
    assert len(held) == 4                       # three first tries, one retry
    assert p.stats()["response_flags"] == {"UO": 2}
    assert p.stats()["clusters"][CL]["upstream_rq_retry_overflow"] == 2


async def test_retry_budget_limits_retries_to_its_share(env) -> None:
    handler, held = await _all_fail_together(4)
    up = await env.upstream(handler)
    # 4 requests fail together: 25% of the requests active and pending then (3, later 2, ...)
    # is below 1, so the floor of min_retry_concurrency=2 decides: two retries, two refusals.
    p = await env.proxy(snap(up.port, retry_budget={"percent": 25.0, "min_retry_concurrency": 2},
                             retries={"attempts": 2, "retry_on": ["5xx"]}), rng=SlowRng())
    results = await burst(p.ports["http_proxy"], 4)
    assert sorted(r[0] for r in results) == [200, 200, 503, 503]
    assert len(held) == 6
    assert p.stats()["clusters"][CL]["upstream_rq_retry_overflow"] == 2


async def test_retry_budget_of_zero_answers_the_failure(env) -> None:
    up = await env.upstream(lambda s: Reply(503, b"busy"))
    p = await env.proxy(snap(up.port, retry_budget={"percent": 0.0, "min_retry_concurrency": 0},
                             retries={"attempts": 3, "retry_on": ["5xx"]}))
    status, _, body = await aget(p.ports["http_proxy"], "/", headers=HOST)
    assert (status, body, len(up.seen)) == (503, b"busy", 1)
    assert p.stats()["response_flags"] == {"UO": 1}


async def test_unlimited_cluster_has_no_circuit_breaker_state(env) -> None:
    up = await env.upstream()
    p = await env.proxy(snap(up.port))
    assert (await aget(p.ports["http_proxy"], "/", headers=HOST))[0] == 200
    assert p.stats()["clusters"] == {} and p.state.resilience == {}
