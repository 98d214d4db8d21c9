"""Per-request telemetry: rows recorded by a real proxy on loopback, drained as Arrow IPC batches."""
from __future__ import annotations

import asyncio
import os
import tempfile
import time
from typing import Any

import pyarrow as pa
import pytest

from proxy_core import control
from proxy_core.__main__ import parse_args
from proxy_core.http1 import RequestParser
from proxy_core.router import RequestInfo
from proxy_core.server import ProxyServer
from proxy_core.snapshot import Cluster, Endpoint, Route, Snapshot, WeightedCluster
from proxy_core.telemetry import DIMENSION_FIELDS, TelemetryRecorder, destination_attributes, request_head_size
from tests.unit.conftest import Upstream, snapshot, vhost
from tests.unit.test_proxy_server import raw_exchange

pytestmark = pytest.mark.timeout(60)

SVC = "reviews.default.svc.cluster.local"
CL = f"outbound|9080|v2|{SVC}"
RATINGS = "ratings.default.svc.cluster.local"
RATINGS_CL = f"outbound|9080||{RATINGS}"
SA = "spiffe://cluster.local/ns/default/sa/bookinfo-reviews"

D = pa.dictionary(pa.int32(), pa.string())
CONTRACT = [
    ("start_time", pa.timestamp("ms", tz="UTC")), ("node", D), ("source_workload", D),
    ("source_workload_namespace", D), ("source_principal", D), ("source_app", D), ("source_version", D),
    ("destination_workload", D), ("destination_workload_namespace", D), ("destination_principal", D),
    ("destination_app", D), ("destination_version", D), ("destination_service", D),
    ("destination_service_name", D), ("destination_service_namespace", D), ("destination_canonical_service", D),
    ("destination_canonical_revision", D), ("source_canonical_service", D), ("source_canonical_revision", D),
    ("request_protocol", D), ("response_code", pa.int32()), ("grpc_response_status", D), ("response_flags", D),
    ("connection_security_policy", D), ("route_name", D), ("duration_ms", pa.float64()),
    ("request_bytes", pa.int64()), ("response_bytes", pa.int64()),
]


def mesh(port: int, version: str = "v2") -> dict[str, Any]:
    """reviews (one labelled endpoint, a direct-response route) and ratings (no endpoints)."""
    reviews_routes = [
        {"name": "blocked", "match": [{"uri": {"prefix": "/admin"}}], "direct_response": {"status": 403, "body": "no"}},
        {"name": "to-v2", "match": [{"uri": {"prefix": "/api"}}], "route": [{"cluster": CL}]},
    ]
    clusters = {
        CL: {"service": SVC, "port": 9080, "subset": "v2", "lb": {"policy": "ROUND_ROBIN"},
             "endpoints": [{"address": "127.0.0.1", "port": port, "node": "node-a",
                            "labels": {"app": "reviews", "version": version},
                            "namespace": "default", "service_account": "bookinfo-reviews"}]},
        RATINGS_CL: {"service": RATINGS, "port": 9080, "endpoints": []},
    }
    ratings_routes = [{"name": "ratings", "route": [{"cluster": RATINGS_CL}]}]
    vhosts = [vhost("reviews", 9080, reviews_routes), vhost("ratings", 9080, ratings_routes)]
    return snapshot(node="node-a", vhosts=vhosts, clusters=clusters)


@pytest.fixture
async def upstream():
    up = await Upstream(name="reviews-v2").start()
    yield up
    await up.close()


@pytest.fixture
async def proxies():
    made: list[ProxyServer] = []

    async def start(snap: dict[str, Any], **kw: Any) -> ProxyServer:
        p = ProxyServer(Snapshot.from_dict(snap), **kw)
        await p.start()
        made.append(p)
        return p

    yield start
    for p in made:
        await p.close()


def request(path: str, host: str, body: bytes = b"") -> bytes:
    method = b"POST" if body else b"GET"
    length = b"Content-Length: %d\r\n" % len(body) if body else b""
    return b"%s %s HTTP/1.1\r\nHost: %s\r\n%sConnection: close\r\n\r\n%s" % (method, path.encode(), host.encode(),
                                                                          length, body)


def decode(batch: bytes) -> list[dict[str, Any]]:
    table = pa.ipc.open_stream(batch).read_all()
    assert table.num_rows == len(table.to_pylist())
    return table.to_pylist()


def drain_rows(p: ProxyServer) -> list[dict[str, Any]]:
    assert p.telemetry is not None
    batch, n, dropped = p.telemetry.drain()
    assert dropped == 0
    rows = decode(batch)
    assert len(rows) == n
    return rows


async def test_batch_schema_matches_the_contract(upstream, proxies) -> None:
    p = await proxies(mesh(upstream.port))
    await raw_exchange(p.ports["http_proxy"], request("/api/a", "reviews:9080"))
    assert p.telemetry is not None
    batch, rows, dropped = p.telemetry.drain()
    reader = pa.ipc.open_stream(batch)
    assert [(f.name, f.type) for f in reader.schema] == CONTRACT
    assert reader.schema.metadata == {b"schema": b"raymesh.telemetry.v1"}
    batches = list(reader)
    assert len(batches) == 1 and batches[0].num_rows == rows == 1 and dropped == 0


async def test_routed_request_carries_destination_labels_and_sizes(upstream, proxies) -> None:
    p = await proxies(mesh(upstream.port))
    before = time.time()
    sent = request("/api/items?x=1", "reviews:9080", body=b"hello")
    reply = await raw_exchange(p.ports["http_proxy"], sent)
    after = time.time()
    assert reply.startswith(b"HTTP/1.1 200 ")
    [row] = drain_rows(p)
    seen = upstream.seen[0]
    forwarded_head = (len(f"POST {seen.target} HTTP/1.1\r\n") + sum(len(n) + len(v) + 4 for n, v in seen.raw_headers)
                      + 2)
    assert row["request_bytes"] == forwarded_head + 5
    assert row["response_bytes"] == len(reply)  # head + body, exactly what the client read
    assert row["response_code"] == 200 and row["response_flags"] == "-" and row["route_name"] == "to-v2"
    assert before - 0.002 <= row["start_time"].timestamp() <= after
    assert 0.0 <= row["duration_ms"] <= (after - before) * 1000.0
    assert {k: row[k] for k in DIMENSION_FIELDS if k.startswith("destination")} == {
        "destination_workload": "reviews-v2", "destination_workload_namespace": "default",
        "destination_principal": SA, "destination_app": "reviews", "destination_version": "v2",
        "destination_service": SVC, "destination_service_name": "reviews",
        "destination_service_namespace": "default", "destination_canonical_service": "reviews",
        "destination_canonical_revision": "v2"}
    assert row["node"] == "node-a" and row["request_protocol"] == "http" and row["grpc_response_status"] == ""
    assert row["connection_security_policy"] == "none"
    assert {k: row[k] for k in DIMENSION_FIELDS if k.startswith("source")} == {
        "source_workload": "unknown", "source_workload_namespace": "unknown", "source_principal": "unknown",
        "source_app": "unknown", "source_version": "unknown", "source_canonical_service": "unknown",
        "source_canonical_revision": "latest"}


async def test_local_replies_nr_uh_direct_blackhole_and_bad_request(upstream, proxies) -> None:
    p = await proxies(mesh(upstream.port))
    port = p.ports["http_proxy"]
    sent = [request("/other", "reviews:9080"), request("/", "ratings:9080"), request("/admin/x", "reviews:9080"),
            request("/", "nowhere.example:8080")]
    replies = [await raw_exchange(port, s) for s in sent]
    garbage = b"\x16\x03\x01\x02\x00garbage\r\n\r\n"
    replies.append(await raw_exchange(port, garbage))
    assert [r[9:12] for r in replies] == [b"404", b"503", b"403", b"502", b"400"]
    nr, uh, direct, blackhole, bad = drain_rows(p)
    assert [r["response_code"] for r in (nr, uh, direct, blackhole, bad)] == [404, 503, 403, 502, 400]
    assert [r["response_flags"] for r in (nr, uh, direct, blackhole, bad)] == ["NR", "UH", "-", "-", "DPE"]
    # Nothing was forwarded: the request is counted as received (no body), the reply as written.
    for row, s, reply in zip((nr, uh, direct, blackhole), sent, replies):
        assert (row["request_bytes"], row["response_bytes"]) == (len(s), len(reply))
    assert (bad["request_bytes"], bad["response_bytes"]) == (0, len(replies[4]))
    for row in (nr, direct, bad):
        assert row["destination_service"] == row["destination_workload"] == "unknown"
        assert row["destination_service_name"] == row["destination_canonical_service"] == "unknown"
    assert (nr["route_name"], direct["route_name"], bad["route_name"]) == ("unknown", "blocked", "unknown")
    assert {k: uh[k] for k in ("destination_service", "destination_service_name", "destination_service_namespace",
                               "destination_workload", "destination_workload_namespace", "destination_principal",
                               "destination_app", "destination_canonical_service",
                               "destination_canonical_revision", "route_name")} == {
        "destination_service": RATINGS, "destination_service_name": "ratings",
        "destination_service_namespace": "default", "destination_workload": "unknown",
        "destination_workload_namespace": "default", "destination_principal": "unknown",
        "destination_app": "unknown", "destination_canonical_service": "ratings",
        "destination_canonical_revision": "latest", "route_name": "ratings"}
    assert (blackhole["destination_service"], blackhole["destination_service_name"], blackhole["route_name"],
            blackhole["destination_workload"]) == ("nowhere.example", "BlackHoleCluster", "block_all", "unknown")


async def test_full_buffer_drops_and_counts(upstream, proxies) -> None:
    p = await proxies(mesh(upstream.port), telemetry_rows=2)
    for _ in range(5):
        await raw_exchange(p.ports["http_proxy"], request("/api/a", "reviews:9080"))
    assert p.stats()["telemetry"] == {"enabled": True, "rows_buffered": 2, "dropped_total": 3}
    assert p.telemetry is not None
    batch, rows, dropped = p.telemetry.drain()
    assert (rows, dropped, len(decode(batch))) == (2, 3, 2)
    assert p.telemetry.drain() == (b"", 0, 0)
    await raw_exchange(p.ports["http_proxy"], request("/api/a", "reviews:9080"))
    assert p.stats()["telemetry"] == {"enabled": True, "rows_buffered": 1, "dropped_total": 3}


async def test_control_op_round_trip(upstream, proxies) -> None:
    p = await proxies(mesh(upstream.port))
    path = os.path.join(tempfile.mkdtemp(), "ctl.sock")
    ctl = control.ControlServer(p, path, lambda: None)
    await ctl.start()
    try:
        empty = await control.acall(path, {"op": "telemetry"})
        assert empty == {"ok": True, "batch": b"", "rows": 0, "dropped": 0, "tcp_batch": b"", "tcp_rows": 0}
        for path_ in ("/api/1", "/api/2", "/nope"):
            await raw_exchange(p.ports["http_proxy"], request(path_, "reviews:9080"))
        status = await control.acall(path, {"op": "status"})
        assert status["stats"]["telemetry"]["rows_buffered"] == 3
        reply = await control.acall(path, {"op": "telemetry"})
        assert reply["ok"] and reply["rows"] == 3 and reply["dropped"] == 0
        assert [r["response_code"] for r in decode(reply["batch"])] == [200, 200, 404]
        assert (await control.acall(path, {"op": "telemetry"}))["rows"] == 0
    finally:
        await ctl.close()


async def test_disabled_telemetry_records_nothing(upstream, proxies) -> None:
    p = await proxies(mesh(upstream.port), telemetry_rows=0)
    path = os.path.join(tempfile.mkdtemp(), "ctl.sock")
    ctl = control.ControlServer(p, path, lambda: None)
    await ctl.start()
    try:
        assert (await raw_exchange(p.ports["http_proxy"], request("/api/a", "reviews:9080")))[9:12] == b"200"
        assert p.telemetry is None
        assert p.stats()["telemetry"] == {"enabled": False, "rows_buffered": 0, "dropped_total": 0}
        assert await control.acall(path, {"op": "telemetry"}) == {"ok": False, "error": "telemetry is disabled"}
    finally:
        await ctl.close()


async def test_snapshot_swap_relabels_the_same_endpoint(upstream, proxies) -> None:
    p = await proxies(mesh(upstream.port, version="v2"))
    port = p.ports["http_proxy"]
    await raw_exchange(port, request("/api/a", "reviews:9080"))
    new = mesh(upstream.port, version="v3")
    new["version"] = "v-next"
    await p.swap(Snapshot.from_dict(new))
    await raw_exchange(port, request("/api/a", "reviews:9080"))
    rows = drain_rows(p)
    assert [(r["destination_workload"], r["destination_version"]) for r in rows] == [
        ("reviews-v2", "v2"), ("reviews-v3", "v3")]


async def test_connect_tunnels_are_not_requests(upstream, proxies) -> None:
    p = await proxies(mesh(upstream.port))
    reader, writer = await asyncio.open_connection("127.0.0.1", p.ports["http_proxy"])
    writer.write(b"CONNECT reviews:9080 HTTP/1.1\r\nHost: reviews:9080\r\n\r\n")
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 200 ")
    writer.write(request("/api/t", "reviews:9080"))
    assert (await asyncio.wait_for(reader.readuntil(b"reviews-v2"), 10)).startswith(b"HTTP/1.1 200 ")
    writer.close()
    for _ in range(100):
        if p.counters.active_requests == 0:
            break
        await asyncio.sleep(0.01)
    assert p.counters.active_requests == 0 and p.counters.tunnels_total == 1
    assert p.telemetry is not None and p.telemetry.drain() == (b"", 0, 0)


# -- attribute derivation without a proxy -----------------------------------------------------------


def attrs(route: Route | None, wc: WeightedCluster | None, cluster: Cluster | None, endpoint: Endpoint | None,
          authority: str = "") -> dict[str, str]:
    return dict(zip(DIMENSION_FIELDS, destination_attributes("n", route, wc, cluster, endpoint, authority)))


def test_canonical_labels_win_and_unlabelled_endpoints_use_the_service_name() -> None:
    cluster = Cluster.from_dict("outbound|80||web.shop.svc.cluster.local", {"service": "web.shop.svc.cluster.local"})
    wc = WeightedCluster(cluster.name)
    labelled = Endpoint("127.0.0.1", 1, labels=(("app", "web"), ("service.istio.io/canonical-name", "storefront"),
                                                ("service.istio.io/canonical-revision", "2024-06"),
                                                ("version", "v7")), service_account="web")
    a = attrs(Route("r"), wc, cluster, labelled)
    assert (a["destination_canonical_service"], a["destination_canonical_revision"]) == ("storefront", "2024-06")
    assert (a["destination_workload"], a["destination_workload_namespace"], a["destination_principal"]) == (
        "web-v7", "shop", "spiffe://cluster.local/ns/shop/sa/web")
    bare = attrs(Route("r"), wc, cluster, Endpoint("127.0.0.1", 2))
    assert (bare["destination_workload"], bare["destination_app"], bare["destination_canonical_service"],
            bare["destination_canonical_revision"], bare["destination_principal"]) == (
        "web", "unknown", "web", "latest", "unknown")


def test_passthrough_and_missing_cluster() -> None:
    passthrough = Cluster.from_dict("PassthroughCluster", {"port": 8080})
    a = attrs(None, WeightedCluster("PassthroughCluster"), passthrough, Endpoint("10.1.2.3", 8080),
              "api.example.com:8080")
    assert (a["destination_service"], a["destination_service_name"], a["destination_service_namespace"],
            a["destination_workload"], a["destination_canonical_service"]) == (
        "api.example.com", "PassthroughCluster", "unknown", "unknown", "unknown")
    nc = attrs(Route("r"), WeightedCluster("outbound|80|v9|cart.shop.svc.cluster.local"), None, None)
    assert (nc["destination_service"], nc["destination_service_name"], nc["destination_service_namespace"]) == (
        "cart.shop.svc.cluster.local", "cart", "shop")


def test_passthrough_rows_are_keyed_by_authority() -> None:
    snap = Snapshot.from_dict({"version": "v", "node": {"id": "n"}})
    rec = TelemetryRecorder(10)
    cluster = Cluster.from_dict("PassthroughCluster", {"port": 443})
    wc = WeightedCluster("PassthroughCluster")
    for host in ("a.example.com", "b.example.com", "a.example.com"):
        req = RequestInfo("GET", "/", host, {})
        rec.record(snap, None, wc, cluster, Endpoint("10.0.0.1", 443), req, time.time(), 200, "-", 1.0, 10, 20)
    rows = decode(rec.drain()[0])
    assert [r["destination_service"] for r in rows] == ["a.example.com", "b.example.com", "a.example.com"]


def test_request_head_size_is_the_wire_size() -> None:
    raw = b"PUT /a/b?c=d HTTP/1.1\r\nHost: x:1\r\nX-Long: " + b"v" * 300 + b"\r\nAccept: */*\r\n\r\n"
    parser = RequestParser()
    [head] = parser.feed(raw)[:1]
    assert request_head_size(head) == len(raw)


def test_cli_flags() -> None:
    args = parse_args(["--snapshot", "s.json", "--telemetry-buffer", "1000"])
    assert (args.telemetry_buffer, args.no_telemetry) == (1000, False)
    assert parse_args(["--snapshot", "s.json", "--no-telemetry"]).no_telemetry


def test_large_batch_round_trips() -> None:
    """Big batches are written LZ4-compressed; a plain IPC reader still gets every row back."""
    snap = Snapshot.from_dict({"version": "v", "node": {"id": "n"}})
    cluster = Cluster.from_dict("outbound|80||web.shop.svc.cluster.local", {"service": "web.shop.svc.cluster.local"})
    endpoints = [Endpoint("127.0.0.1", 1000 + i, labels=(("app", "web"), ("version", f"v{i}"))) for i in range(3)]
    rec = TelemetryRecorder(20_000)
    wc = WeightedCluster(cluster.name)
    for i in range(20_000):
        rec.record(snap, Route("r"), wc, cluster, endpoints[i % 3], None, 1_700_000_000.0 + i, 200 + i % 2,
                   "-", 0.5, i, 2 * i)
    batch, rows, dropped = rec.drain()
    assert (rows, dropped) == (20_000, 0) and len(batch) < rows * 20
    table = pa.ipc.open_stream(batch).read_all()
    assert table.column("request_bytes").to_pylist() == list(range(20_000))
    assert table.column("destination_version").to_pylist()[:4] == ["v0", "v1", "v2", "v0"]
    assert table.column("response_code").to_pylist()[-2:] == [200, 201]
    assert table.column("start_time")[1].as_py().timestamp() == 1_700_000_001.0
