"""Telemetry names the workload that sent each request and whether it crossed nodes over mTLS:
real client processes, the client node's proxy and the destination node's proxy on loopback."""
from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from mesh.identity import CAKeyPair, create_root_ca, spiffe_id
from mesh.metrics import LABEL_NAMES, aggregate
from proxy_core.mtls import Credentials
from proxy_core.server import ProxyServer
from tests.unit.secured import URL
from tests.unit.test_mtls import issue
from tests.unit.test_source_principal import Client, two_nodes

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
