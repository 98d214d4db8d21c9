"""TCP connection telemetry: recorded by a real proxy over real sockets, aggregated exactly by Mixer's code."""
from __future__ import annotations

import asyncio
from typing import Any

import pyarrow as pa
import pytest

from mesh.metrics import MetricStore, TCP_LABEL_NAMES
from mesh.tcp_metrics import aggregate_tcp, conform_tcp, is_tcp_batch
from proxy_core.server import ProxyServer
from proxy_core.tcp_telemetry import SCHEMA, SCHEMA_NAME
from tests.unit.conftest import Echo, closed_port, cluster, snapshot, vhost
from tests.unit.test_tcp_proxy import DB, V1, db_snapshot, settled, to

pytestmark = pytest.mark.timeout(60)

CL = "outbound|9080||reviews.default.svc.cluster.local"


def rows(p: ProxyServer) -> list[dict[str, Any]]:
    """Drain the proxy's TCP telemetry and decode the Arrow stream as a Mixer replica would."""
    assert p.tcp_telemetry is not None
    data, n = p.tcp_telemetry.drain()
    if not data:
        assert n == 0
        return []
    with pa.ipc.open_stream(pa.py_buffer(data)) as reader:
        table = reader.read_all()
    assert is_tcp_batch(table.schema) and table.num_rows == n
    return table.to_pylist()


def measures(row: dict[str, Any]) -> tuple[int, int, int, int]:
    return row["connections_opened"], row["connections_closed"], row["received_bytes"], row["sent_bytes"]


async def test_open_connection_reports_bytes_each_drain_then_its_close(env) -> None:
    echo = env.track(await Echo("v1").start())
    p = await env.proxy(db_snapshot("127.78.1.1", [to((V1, 100))], {V1: cluster(echo.port)}))
    reader, writer = await asyncio.open_connection("127.78.1.1", p.vip_ports()["127.78.1.1:0"])
    writer.write(b"hello")
    assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
    first = rows(p)          # the connection is still open: its bytes so far, counted opened
    assert [measures(r) for r in first] == [(1, 0, 5, 5)]
    r = first[0]
    assert (r["request_protocol"], r["destination_service"], r["response_flags"], r["node"]) == ("tcp", "svc", "-", "nA")
    assert r["destination_workload"] == "svc" and r["connection_security_policy"] == "none"
    assert rows(p) == []     # nothing moved since
    writer.write(b" world")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b" world|v1"
    writer.close()
    await settled(p)
    assert [measures(r) for r in rows(p)] == [(0, 1, 6, 9)]
    assert p.tcp_telemetry is not None and p.tcp_telemetry.open_connections == 0


async def test_refused_connections_are_opened_and_closed_with_their_flag(env) -> None:
    p = await env.proxy(db_snapshot("127.78.1.2", [to((V1, 100))], {V1: cluster(closed_port())}))
    port = p.vip_ports()["127.78.1.2:0"]
    for _ in range(2):
        reader, writer = await asyncio.open_connection("127.78.1.2", port)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()
    await settled(p)
    got = rows(p)
    assert sum(r["connections_opened"] for r in got) == 2
    assert [(r["response_flags"], r["connections_closed"]) for r in got if r["connections_closed"]] == [("UF", 2)]
    assert all(r["destination_service"] == "svc" for r in got)

    empty = await env.proxy(db_snapshot("127.78.1.3", [to((V1, 100))], {V1: cluster()}))
    reader, writer = await asyncio.open_connection("127.78.1.3", empty.vip_ports()["127.78.1.3:0"])
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    await settled(empty)
    [r] = rows(empty)
    assert (r["response_flags"], measures(r)) == ("UH", (1, 1, 0, 0))


async def test_connect_tunnel_on_proxy_listener_is_recorded_once_not_on_inbound(env) -> None:
    echo = env.track(await Echo("e").start())
    node_b = await env.proxy(snapshot(node="nB", vhosts=[vhost("reviews", 9080, [{"name": "d", "route": [{"cluster": CL}]}])],
                                      clusters={CL: cluster(echo.port, node="nB")}))
    via = {"address": "127.0.0.1", "port": node_b.ports["inbound"]}
    node_a = await env.proxy(snapshot(node="nA", vhosts=[vhost("reviews", 9080, [{"name": "d", "route": [{"cluster": CL}]}])],
                                      clusters={CL: cluster(echo.port, node="nB", via=via)}))
    reader, writer = await asyncio.open_connection("127.0.0.1", node_a.ports["http_proxy"])
    writer.write(b"CONNECT reviews:9080 HTTP/1.1\r\nHost: reviews:9080\r\n\r\n")
    assert await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5) == b"HTTP/1.1 200 Connection established\r\n\r\n"
    writer.write(b"abcdefg")
    assert await asyncio.wait_for(reader.readexactly(7), 5) == b"abcdefg"
    assert [measures(r) for r in rows(node_a)] == [(1, 0, 7, 7)]
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b"|e"
    writer.close()
    for _ in range(100):
        if node_a.tcp_telemetry.open_connections == 0:  # type: ignore[union-attr]
            break
        await asyncio.sleep(0.02)
    [r] = rows(node_a)
    assert measures(r) == (0, 1, 0, 2)
    assert (r["destination_service"], r["route_name"], r["request_protocol"]) == \
        ("svc", "d", "tcp")
    assert node_b.stats()["tunnels_total"] == 1 and rows(node_b) == []   # the node-to-node leg is transport


async def test_telemetry_off_records_no_connections(env) -> None:
    echo = env.track(await Echo("v1").start())
    p = await env.proxy(db_snapshot("127.78.1.4", [to((V1, 100))], {V1: cluster(echo.port)}), telemetry_rows=0)
    assert p.tcp_telemetry is None
    reader, writer = await asyncio.open_connection("127.78.1.4", p.vip_ports()["127.78.1.4:0"])
    writer.write(b"x")
    writer.write_eof()
    assert await asyncio.wait_for(reader.read(), 5) == b"x|v1"
    writer.close()


# -- aggregation -------------------------------------------------------------------------------


def tcp_batch(entries: list[dict[str, Any]]) -> pa.Table:
    base = {f.name: "unknown" for f in SCHEMA if pa.types.is_dictionary(f.type)}
    base.update(request_protocol="tcp", response_flags="-", connection_security_policy="none", node="n1")
    out: dict[str, list[Any]] = {f.name: [] for f in SCHEMA}
    for e in entries:
        row = {**base, "start_time": 0, "connections_opened": 0, "connections_closed": 0, "received_bytes": 0,
               "sent_bytes": 0, **e}
        for name in out:
            out[name].append(row[name])
    return pa.table({n: pa.array(v) for n, v in out.items()})   # plain strings: conform encodes them


def test_aggregate_sums_deltas_per_label_set_for_both_reporters() -> None:
    table = tcp_batch([
        {"destination_service": DB, "connections_opened": 1, "received_bytes": 100, "sent_bytes": 40},
        {"destination_service": DB, "received_bytes": 50, "sent_bytes": 10, "connections_closed": 1},
        {"destination_service": DB, "response_flags": "UF", "connections_opened": 3, "connections_closed": 3},
    ])
    updates = aggregate_tcp(table, "c1")
    store = MetricStore()
    store.apply(updates)
    labels = dict.fromkeys(TCP_LABEL_NAMES, "unknown")
    labels.update(reporter="destination", destination_service=DB, request_protocol="tcp", response_flags="-",
                  connection_security_policy="none", source_cluster="c1", destination_cluster="c1",
                  source_canonical_revision="unknown")
    def value(metric: str, **over: str) -> int | None:
        s = store.get(metric, {**labels, **over})
        return None if s is None else s.count
    assert value("istio_tcp_received_bytes_total") == 150
    assert value("istio_tcp_sent_bytes_total") == 50
    assert value("istio_tcp_connections_opened_total") == 1
    assert value("istio_tcp_connections_closed_total") == 1
    assert value("istio_tcp_connections_opened_total", response_flags="UF") == 3
    assert value("istio_tcp_received_bytes_total", response_flags="UF") is None    # zero: no series
    # The source reporter cannot see the server's policy, as in Istio.
    assert value("istio_tcp_sent_bytes_total", reporter="source", connection_security_policy="unknown") == 50
    text = store.render_prometheus()
    line = next(ln for ln in text.splitlines() if ln.startswith("istio_tcp_received_bytes_total{")
                and 'reporter="destination"' in ln and 'response_flags="-"' in ln)
    assert line.endswith(" 150.0") and 'request_protocol="tcp"' in line and "response_code" not in line


def test_conform_names_a_missing_column_and_schema_names_itself() -> None:
    with pytest.raises(ValueError, match="sent_bytes"):
        conform_tcp(tcp_batch([{}]).drop_columns(["sent_bytes"]))
    assert SCHEMA.metadata[b"schema"] == SCHEMA_NAME.encode()
    assert aggregate_tcp(SCHEMA.empty_table()) == []
