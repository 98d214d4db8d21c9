"""The ingress gateway's listeners in the proxy: real sockets, real upstreams, curl and http.client.

The snapshots are compiled from Istio's bookinfo-gateway.yaml (with the gateway port rewritten
to a free ephemeral one, since 8080 may be taken on a shared machine), so compiler and proxy
are tested together; the clusters' endpoints are pointed at local upstream servers."""
from __future__ import annotations

import asyncio
import io
import json
import socket
from typing import Any

import pyarrow as pa
import pytest

from mesh.compiler import compile_snapshot
from proxy_core.accesslog import AccessLog
from tests.unit.conftest import Reply, closed_port
from tests.unit.test_compiler import DESTINATION_RULE_ALL, FQDN, NODE_A, load, vs_doc
from tests.unit.test_compiler_gateways import BOOKINFO_GATEWAY, gateway_registry
from tests.unit.test_proxy_server import aget, curl, raw_exchange

pytestmark = pytest.mark.timeout(60)

PRODUCTPAGE = f"outbound|9080||{FQDN('productpage')}"


def bookinfo_gateway(port: int, upstreams: dict[str, int], *extra: Any) -> dict[str, Any]:
    """Node A's snapshot for bookinfo-gateway.yaml on ``port``; cluster -> the upstream's port."""
    resources = load(BOOKINFO_GATEWAY.replace("number: 8080", f"number: {port}"), DESTINATION_RULE_ALL) + list(extra)
    snap = compile_snapshot(resources, gateway_registry(), NODE_A, http_proxy_port=0, inbound_port=0)
    snap["listeners"]["inbound"]["port"] = 0
    for name, up_port in upstreams.items():
        snap["clusters"][name]["endpoints"] = [{"address": "127.0.0.1", "port": up_port, "node": NODE_A, "via": None}]
    snap["vips"] = []   # the test binds no service VIPs
    return snap


async def test_bookinfo_paths_reach_productpage_and_others_get_404_nr(env) -> None:
    up = await env.upstream(name="productpage")
    port = closed_port()
    sink = io.StringIO()
    p = await env.proxy(bookinfo_gateway(port, {PRODUCTPAGE: up.port}), AccessLog(sink))
    assert p.gateway_ports() == {f"istio-ingressgateway:{port}": f"127.0.0.1:{port}"}
    status, _, body, _ = await curl(f"http://127.0.0.1:{port}/productpage")
    assert (status, body) == (200, b"productpage")
    assert up.seen[0].target == "/productpage" and up.seen[0].headers["host"] == f"127.0.0.1:{port}"
    status, _, _ = await aget(port, "/api/v1/products/0", headers={"Host": "bookinfo.example.com"})
    assert status == 200
    status, _, _ = await aget(port, "/reviews/1")
    assert status == 404 and len(up.seen) == 2
    p.access_log.flush()
    lines = [json.loads(line) for line in sink.getvalue().splitlines()]
    assert [(x["response_code"], x["response_flags"], x["listener"]) for x in lines] == [
        (200, "-", f"istio-ingressgateway:{port}"), (200, "-", f"istio-ingressgateway:{port}"),
        (404, "NR", f"istio-ingressgateway:{port}")]


async def test_unknown_host_is_404_never_passthrough_and_connect_is_refused(env) -> None:
    up = await env.upstream(name="web")
    port = closed_port()
    only_shop = vs_doc("shop", [{"route": [{"destination": {"host": "productpage"}}]}],
                       hosts=["shop.example.com"], gateways=["bookinfo-gateway"])
    snap = bookinfo_gateway(port, {PRODUCTPAGE: up.port}, only_shop)
    snap["outbound_policy"] = "ALLOW_ANY"
    p = await env.proxy(snap)
    assert (await aget(port, "/", headers={"Host": "shop.example.com"}))[0] == 200
    # A Host no virtual host names, even an address the proxy could reach, is not forwarded.
    assert (await aget(port, "/", headers={"Host": f"127.0.0.1:{up.port}"}))[0] == 404
    reply = await raw_exchange(port, f"CONNECT 127.0.0.1:{up.port} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert reply.startswith(b"HTTP/1.1 404")
    assert len(up.seen) == 1 and p.stats()["tunnels_total"] == 0


async def test_h2c_clients_are_served_on_an_http_gateway_port(env) -> None:
    up = await env.upstream(name="productpage")
    port = closed_port()
    await env.proxy(bookinfo_gateway(port, {PRODUCTPAGE: up.port}))
    status, _, body, err = await curl("--http2-prior-knowledge", f"http://127.0.0.1:{port}/productpage")
    assert (status, body) == (200, b"productpage"), err


async def test_weighted_and_header_routes_through_the_gateway(env) -> None:
    v1, v2 = await env.upstream(name="reviews-v1"), await env.upstream(name="reviews-v2")
    port = closed_port()
    vs = vs_doc("reviews-gw", [
        {"match": [{"headers": {"end-user": {"exact": "jason"}}}],
         "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
        {"route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 50},
                   {"destination": {"host": "reviews", "subset": "v2"}, "weight": 50}]}],
        hosts=["reviews.example.com"], gateways=["bookinfo-gateway"])
    clusters = {f"outbound|9080|v1|{FQDN('reviews')}": v1.port, f"outbound|9080|v2|{FQDN('reviews')}": v2.port}
    await env.proxy(bookinfo_gateway(port, clusters, vs))
    host = {"Host": "reviews.example.com"}
    for _ in range(5):
        assert (await aget(port, "/", headers={**host, "end-user": "jason"}))[2] == b"reviews-v2"
    bodies = {(await aget(port, "/", headers=host))[2] for _ in range(40)}
    assert bodies == {b"reviews-v1", b"reviews-v2"}


async def test_gateway_is_the_source_workload_in_telemetry(env) -> None:
    up = await env.upstream(name="productpage")
    port = closed_port()
    p = await env.proxy(bookinfo_gateway(port, {PRODUCTPAGE: up.port}))
    assert (await aget(port, "/productpage"))[0] == 200
    batch, rows, _ = p.telemetry.drain()
    table = pa.ipc.open_stream(batch).read_all()
    row = {k: v[0] for k, v in table.to_pydict().items()}
    assert rows == 1
    assert (row["source_workload"], row["source_workload_namespace"], row["source_app"]) == (
        "istio-ingressgateway", "istio-system", "istio-ingressgateway")
    assert row["destination_service"] == FQDN("productpage")


async def test_swap_opens_and_closes_gateway_ports(env) -> None:
    up = await env.upstream(name="productpage")
    port = closed_port()
    snap = bookinfo_gateway(port, {PRODUCTPAGE: up.port})
    without = {k: v for k, v in snap.items() if k != "gateway"}
    p = await env.proxy({**without, "version": "no-gateway"})
    assert p.gateway_ports() == {}
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)
    await p.swap(type(p.snapshot).from_dict(snap))
    assert (await aget(port, "/productpage"))[0] == 200
    await p.swap(type(p.snapshot).from_dict({**without, "version": "gone"}))
    assert p.gateway_ports() == {}
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", port)


async def test_upstream_errors_keep_envoy_semantics_through_the_gateway(env) -> None:
    up = await env.upstream(lambda seen: Reply(status=503, body=b"busy"), name="productpage")
    port = closed_port()
    await env.proxy(bookinfo_gateway(port, {PRODUCTPAGE: up.port}))
    status, _, body = await aget(port, "/productpage")
    # Istio's default retry policy retries 503 twice, as for any outbound request.
    assert (status, body, len(up.seen)) == (503, b"busy", 3)


async def test_a_port_that_cannot_be_bound_leaves_the_rest_of_the_config_applied(env) -> None:
    up = await env.upstream(name="productpage")
    blocker = socket.socket()
    blocker.bind(("127.0.0.1", 0))
    blocker.listen()
    port = blocker.getsockname()[1]
    try:
        snap = bookinfo_gateway(port, {PRODUCTPAGE: up.port})
        p = await env.proxy(snap)
        assert p.gateway_ports() == {}
        [(name, error)] = p.stats()["gateway_errors"].items()
        assert name == f"istio-ingressgateway:{port}" and error.startswith(f"127.0.0.1:{port}: ")
        assert p.snapshot.version == snap["version"] and p.ports["http_proxy"]
    finally:
        blocker.close()
    # The next push binds it once the port is free.
    await p.swap(type(p.snapshot).from_dict({**snap, "version": "again"}))
    assert p.stats()["gateway_errors"] == {}
    assert (await aget(port, "/productpage"))[0] == 200
