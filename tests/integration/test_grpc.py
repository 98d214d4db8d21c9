"""gRPC across nodes: a grpcio server joins the mesh on node 1 with a port named ``grpc``; a
grpcio client in a workload on node 0 calls the service's VIP.  Both nodes' proxies listen on the VIP
(SO_REUSEPORT), so the client opens several connections: those the node-0 proxy accepts go
upstream as HTTP/2 through node 1's inbound mTLS tunnel.  Unary calls keep their trailing
metadata, bidi streams echo every message, and the node-0 proxy shows it forwarded them.
"""
from __future__ import annotations

import time
from typing import Any

import pytest
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.proxy_worker import proxy_actor_name
from mesh import workload
from mesh.client import NAMESPACE
from tests.integration.workloads import GrpcEchoWorkload

pytestmark = pytest.mark.ray

SERVICE = "grpcecho"
FQDN = f"{SERVICE}.default.svc.cluster.local"
PORT = 9500
CHANNELS = 12
WORDS = [b"alpha", b"beta", b"gamma" * 1000]
CLIENT = "spiffe://cluster.local/ns/default/sa/default"


def proxy_stats(node_id: str) -> dict[str, Any]:
    proxy = ray.get_actor(proxy_actor_name(node_id), namespace=NAMESPACE)
    return ray.get(proxy.status.remote(), timeout=30)["stats"]


def wait_for(check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError("condition not met")


def deploy(mesh: Any, service: str, node_index: int) -> Any:
    actor = GrpcEchoWorkload.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(mesh.nodes[node_index], soft=False)
    ).remote(service, "v1", PORT)
    ray.get(actor.start.remote(), timeout=60)
    mesh._actors.append(actor)
    return actor


def test_grpc_unary_and_bidi_cross_nodes_with_trailers(mesh) -> None:
    server = deploy(mesh, SERVICE, 1)
    client = deploy(mesh, "grpcclient", 0)     # a workload too: its calls carry its identity over mTLS
    mesh.wait_endpoints(SERVICE, 1)
    wait_for(lambda: CLIENT in proxy_stats(mesh.nodes[0])["mtls"]["identities"]
             and proxy_stats(mesh.nodes[1])["mtls"]["identities"])
    vip = workload.service_vip(SERVICE)
    assert vip and vip.startswith("127.")
    before, inbound_before = proxy_stats(mesh.nodes[0]), proxy_stats(mesh.nodes[1])

    results = ray.get(client.call_vip.remote(f"{vip}:{PORT}", CHANNELS, WORDS), timeout=120)

    assert len(results) == CHANNELS
    for r in results:
        assert r["unary_code"] == "OK" and r["unary"] == b"olleh"
        assert r["unary_trailers"].get("x-echo-trailer") == "t-5"
        assert r["bidi_code"] == "OK" and r["bidi"] == [b"echo:" + w for w in WORDS]
    assert ray.get(server.calls.remote()) == {"Unary": CHANNELS, "Bidi": CHANNELS}

    after, inbound_after = proxy_stats(mesh.nodes[0]), proxy_stats(mesh.nodes[1])
    forwarded = after["destinations"].get(FQDN, {}).get("requests", 0) \
        - before["destinations"].get(FQDN, {}).get("requests", 0)
    assert forwarded > 0, "no connection reached node 0's proxy"
    assert after["destinations"][FQDN]["by_class"] == {"2xx": after["destinations"][FQDN]["requests"]}
    # Node 0's proxy reached the node-1 endpoint over HTTP/2, through node 1's inbound mTLS listener.
    assert after["upstream_h2"]["connects"] > before["upstream_h2"]["connects"]
    assert inbound_after["tunnels_total"] > inbound_before["tunnels_total"]
    assert inbound_after["mtls"]["handshakes"] > inbound_before["mtls"]["handshakes"], {k: after["mtls"][k] for k in ("source_lookups", "source_unknown", "client_refused", "updates")}
    assert inbound_after["mtls"]["peers"].get(CLIENT, 0) > inbound_before["mtls"]["peers"].get(CLIENT, 0)
