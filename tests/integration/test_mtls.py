"""Node-to-node mTLS on a real two-node Ray cluster: SVIDs from Citadel reach both proxies,
a workload's cross-node request travels over mTLS with its own identity, and STRICT refuses
a client the proxy cannot identify."""
from __future__ import annotations

import json
import time
from typing import Any

import ray

from actors.proxy_worker import proxy_actor_name
from mesh.client import NAMESPACE
from tests.integration.workloads import EchoWorkload

STRICT = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
          "metadata": {"name": "default", "namespace": "istio-system"}, "spec": {"mtls": {"mode": "STRICT"}}}
CLIENT = "spiffe://cluster.local/ns/default/sa/default"


def proxy_mtls(mesh: Any, node_index: int) -> dict[str, Any]:
    proxy = ray.get_actor(proxy_actor_name(mesh.nodes[node_index]), namespace=NAMESPACE)
    return ray.get(proxy.status.remote(), timeout=10)["stats"]["mtls"]


def wait_for(check: Any, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    raise TimeoutError("condition not met")


def test_cross_node_request_is_mutual_tls_with_the_source_identity(mesh):
    mesh.deploy("echo", "v1", node_index=1)
    client = mesh.deploy("sleep", "v1", node_index=0)      # a workload on node 0, identity default/default
    mesh.wait_endpoints("echo", 1)
    mesh.apply(STRICT)
    wait_for(lambda: CLIENT in proxy_mtls(mesh, 0)["identities"] and proxy_mtls(mesh, 1)["identities"])
    status, body = ray.get(client.fetch.remote(mesh.proxy_port(0), "http://echo:8000/m"), timeout=30)
    assert status == 200 and json.loads(body)["path"] == "/m"
    server_side = proxy_mtls(mesh, 1)
    assert server_side["peers"].get(CLIENT, 0) >= 1 and server_side["handshakes"] >= 1
    refused_before = server_side["refused"].get("plaintext", 0)
    status, _, _ = mesh.get("http://echo:8000/m", node_index=0)   # the driver is no workload: plaintext
    assert status == 503
    # refused once per attempt (the default route retries connect failures)
    assert proxy_mtls(mesh, 1)["refused"].get("plaintext", 0) > refused_before
