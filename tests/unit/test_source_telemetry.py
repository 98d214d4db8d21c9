"""Telemetry names the workload that sent each request and whether it crossed nodes over mTLS:
real client processes, the client node's proxy and the destination node's proxy on loopback."""
from __future__ import annotations

import asyncio
import sys
from typing import Any

import pyarrow as pa
import pytest

from mesh.identity import CAKeyPair, create_root_ca, spiffe_id
from mesh.metrics import LABEL_NAMES, aggregate
from proxy_core.mtls import Credentials
from proxy_core.server import ProxyServer
from tests.unit.conftest import Echo
from tests.unit.secured import CL, HOST, PORT, URL
from tests.unit.test_mtls import issue, push
from tests.unit.test_source_principal import HTTPBIN, Client, node_snapshots, two_nodes

pytestmark = pytest.mark.timeout(60)

SLEEP = spiffe_id("bar", "sleep")
SOURCE_FIELDS = ("source_principal", "source_workload", "source_workload_namespace", "source_app",
                 "source_version", "source_canonical_service", "source_canonical_revision",
                 "connection_security_policy")
UNKNOWN_SOURCE = ("unknown", "unknown", "unknown", "unknown", "unknown", "unknown", "latest")


@pytest.fixture(scope="module")
def ca() -> CAKeyPair:
    return create_root_ca()


def push_workload(proxy: ProxyServer, ca: CAKeyPair, pid: int) -> None:
    """The credentials push as the proxy worker sends it: the pid with its registration."""
    proxy.mtls.update(Credentials.from_dict({
        "trust_domain": "cluster.local", "roots": [ca.cert_pem], "svids": [issue(ca, SLEEP)],
        "workloads": [[pid, SLEEP, {"service": "sleep", "namespace": "bar",
                                    "labels": {"app": "sleep", "version": "v1"}}]]}))


def rows(p: ProxyServer) -> list[dict[str, Any]]:
    assert p.telemetry is not None
    batch, _, _ = p.telemetry.drain()
    return pa.ipc.open_stream(batch).read_all().to_pylist()


def sources(table: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    return [tuple(r[f] for f in SOURCE_FIELDS) for r in table]


SLEEP_ROW = (SLEEP, "sleep-v1", "bar", "sleep", "v1", "sleep", "v1")


@pytest.mark.parametrize("mode,policy", [("PERMISSIVE", "mutual_tls"), ("STRICT", "mutual_tls"),
                                         ("DISABLE", "none")])
async def test_cross_node_rows_name_the_source_workload_and_mutual_tls(env, ca, mode: str, policy: str) -> None:
    up, a, _ = await two_nodes(env, ca, [], mode)
    client = await Client.start(a.ports["http_proxy"], f"GET {URL}/a", f"GET {URL}/b")
    push_workload(a, ca, client.pid)
    assert await client.run() == ["200", "200"]
    assert sources(rows(a)) == [(*SLEEP_ROW, policy)] * 2
    anonymous = await Client.start(a.ports["http_proxy"], f"GET {URL}/c")     # no push names it
    expected = "200" if mode != "STRICT" else "503"
    assert await anonymous.run() == [expected]
    assert sources(rows(a)) == [(*UNKNOWN_SOURCE, "none")]


async def test_same_node_rows_name_the_source_without_mutual_tls(env, ca) -> None:
    up, _, b = await two_nodes(env, ca, [])
    client = await Client.start(b.ports["http_proxy"], f"GET {URL}/a")
    push_workload(b, ca, client.pid)
    assert await client.run() == ["200"]
    assert sources(rows(b)) == [(*SLEEP_ROW, "none")]


async def test_mixer_reports_mutual_tls_for_the_destination_and_unknown_for_the_source(env, ca) -> None:
    up, a, _ = await two_nodes(env, ca, [], "STRICT")
    client = await Client.start(a.ports["http_proxy"], f"GET {URL}/a")
    push_workload(a, ca, client.pid)
    assert await client.run() == ["200"]
    assert a.telemetry is not None
    batch, _, _ = a.telemetry.drain()
    updates = [u for u in aggregate(pa.ipc.open_stream(batch).read_all()) if u.metric == "istio_requests_total"]
    labels = {dict(zip(LABEL_NAMES, u.labels))["reporter"]: dict(zip(LABEL_NAMES, u.labels)) for u in updates}
    assert labels["destination"]["connection_security_policy"] == "mutual_tls"
    assert labels["source"]["connection_security_policy"] == "unknown"
    for reporter in ("source", "destination"):
        assert labels[reporter]["source_principal"] == SLEEP
        assert labels[reporter]["source_workload"] == "sleep-v1"
        assert labels[reporter]["source_workload_namespace"] == "bar"


# -- TCP connections: the same source labels and mTLS flag as requests -------------------------

TCP_VIP = "127.78.3.1"
TCP_FIELDS = (*SOURCE_FIELDS, "request_protocol", "destination_service")

# A raw TCP client process: waits for "go", sends argv[3] to argv[1]:argv[2], prints what
# came back once the echo is complete or the connection closed, and closes.
_TCP_CLIENT = r"""
import socket, sys
sys.stdin.readline()
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=10)
s.sendall(sys.argv[3].encode())
out = b""
try:
    while len(out) < len(sys.argv[3]) and (chunk := s.recv(65536)):
        out += chunk
except ConnectionResetError:
    pass
print(out.decode() or "closed", flush=True)
s.close()
"""


async def tcp_client(port: int, payload: str) -> Client:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _TCP_CLIENT, TCP_VIP, str(port), payload,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    return Client(proc)


async def tcp_two_nodes(env, ca, mode: str) -> tuple[ProxyServer, ProxyServer]:
    """httpbin's port as a tcp service on node B (an echo server), with a VIP on node A."""
    echo = env.track(await Echo("b").start())
    _, snap_b = node_snapshots(echo.port, 0, [], mode)
    b = await env.proxy(snap_b)
    push(b, [ca], [issue(ca, HTTPBIN)])
    snap_a, _ = node_snapshots(echo.port, b.ports["inbound"], [], mode)
    snap_a["vips"] = [{"address": TCP_VIP, "port": 0, "host": HOST, "protocol": "tcp"}]
    snap_a["tcp_routes"] = [{"name": f"{HOST}:0", "host": HOST, "port": 0,
                             "routes": [{"name": "r", "route": [{"cluster": CL, "weight": 100}]}]}]
    return await env.proxy(snap_a), b


def tcp_rows(p: ProxyServer) -> list[dict[str, Any]]:
    assert p.tcp_telemetry is not None
    data, _ = p.tcp_telemetry.drain()
    return pa.ipc.open_stream(data).read_all().to_pylist() if data else []


async def drained(p: ProxyServer) -> list[dict[str, Any]]:
    """The TCP rows once every connection has closed (bounded wait)."""
    for _ in range(100):
        if p.tcp_telemetry is not None and p.tcp_telemetry.open_connections == 0 and not p.tcp.sessions:
            break
        await asyncio.sleep(0.02)
    return tcp_rows(p)


def tcp_labels(rows_: list[dict[str, Any]]) -> dict[tuple[str, ...], tuple[int, int, int, int]]:
    """Per label set: (opened, closed, received, sent) summed over the rows."""
    out: dict[tuple[str, ...], tuple[int, int, int, int]] = {}
    for r in rows_:
        key = tuple(r[f] for f in TCP_FIELDS)
        prev = out.get(key, (0, 0, 0, 0))
        out[key] = tuple(a + b for a, b in zip(prev, (r["connections_opened"], r["connections_closed"],
                                                       r["received_bytes"], r["sent_bytes"])))  # type: ignore[assignment]
    return out


@pytest.mark.parametrize("mode,policy", [("STRICT", "mutual_tls"), ("DISABLE", "none")])
async def test_tcp_vip_session_rows_name_the_source_workload_and_mutual_tls(env, ca, mode: str, policy: str) -> None:
    a, b = await tcp_two_nodes(env, ca, mode)
    port = a.vip_ports()[f"{TCP_VIP}:0"]
    client = await tcp_client(port, "hello")
    push_workload(a, ca, client.pid)
    assert await client.run() == ["hello"]
    got = tcp_labels(await drained(a))
    [(labels, (opened, closed, received, sent))] = got.items()
    assert labels == (*SLEEP_ROW, policy, "tcp", HOST)
    # In plaintext the client's close reaches the echo as EOF, which may still send its "|b".
    assert (opened, closed, received) == (1, 1, 5) and sent in (5, 7)
    anonymous = await tcp_client(port, "hi")         # no push names it: plaintext, which STRICT refuses
    out = await anonymous.run()
    assert out == (["closed"] if mode == "STRICT" else ["hi"])
    got = tcp_labels(await drained(a))
    assert list(got) == [(*UNKNOWN_SOURCE, "none", "tcp", HOST)]
    assert tcp_rows(b) == []                         # node B's inbound leg is transport, not recorded


async def test_tcp_session_refused_before_an_upstream_names_its_source(env, ca) -> None:
    echo = env.track(await Echo("b").start())
    snap_a, _ = node_snapshots(echo.port, 0, [], "PERMISSIVE")
    snap_a["vips"] = [{"address": TCP_VIP, "port": 0, "host": HOST, "protocol": "tcp"}]
    snap_a["tcp_routes"] = [{"name": f"{HOST}:0", "host": HOST, "port": 0,
                             "routes": [{"name": "r", "route": [{"cluster": "outbound|1||absent", "weight": 100}]}]}]
    a = await env.proxy(snap_a)
    client = await tcp_client(a.vip_ports()[f"{TCP_VIP}:0"], "x")
    push_workload(a, ca, client.pid)
    assert await client.run() == ["closed"]
    [r] = await drained(a)
    assert (tuple(r[f] for f in SOURCE_FIELDS), r["response_flags"]) == ((*SLEEP_ROW, "none"), "NC")


@pytest.mark.parametrize("mode,policy", [("PERMISSIVE", "mutual_tls"), ("DISABLE", "none")])
async def test_connect_tunnel_rows_name_the_source_workload_and_mutual_tls(env, ca, mode: str, policy: str) -> None:
    up, a, b = await two_nodes(env, ca, [], mode)
    client = await Client.start(a.ports["http_proxy"], f"CONNECT {HOST}:{PORT}")
    push_workload(a, ca, client.pid)
    assert await client.run() == ["200"]
    got = tcp_labels(await drained(a))
    assert [k for k in got] == [(*SLEEP_ROW, policy, "tcp", HOST)]
    assert got[(*SLEEP_ROW, policy, "tcp", HOST)][:2] == (1, 1)
    anonymous = await Client.start(a.ports["http_proxy"], f"CONNECT {HOST}:{PORT}")
    assert await anonymous.run() == ["200"]
    assert list(tcp_labels(await drained(a))) == [(*UNKNOWN_SOURCE, "none", "tcp", HOST)]
    assert tcp_rows(b) == []
