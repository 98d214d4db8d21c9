"""Node-to-node mTLS on a real two-node Ray cluster: SVIDs from Citadel reach both proxies,
a workload's cross-node request travels over mTLS with its own identity, STRICT refuses
a client the proxy cannot identify, and a TCP client's half-close crosses the tunnel."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import ray
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from actors.proxy_worker import proxy_actor_name
from mesh import workload
from mesh.client import NAMESPACE

STRICT = {"apiVersion": "security.istio.io/v1", "kind": "PeerAuthentication",
          "metadata": {"name": "default", "namespace": "istio-system"}, "spec": {"mtls": {"mode": "STRICT"}}}
CLIENT = "spiffe://cluster.local/ns/default/sa/default"
MESHCTL = str(Path(sys.executable).parent / "meshctl")


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


def test_meshctl_prints_the_svids_the_proxies_hold(mesh, tmp_path):
    mesh.deploy("echo", "v1", node_index=1)        # identity default/default, registered on node 1
    mesh.wait_endpoints("echo", 1)
    wait_for(lambda: CLIENT in proxy_mtls(mesh, 1)["identities"])
    env = dict(os.environ, RAY_ADDRESS=mesh.cluster.address)

    def meshctl(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([MESHCTL, "ca", *args], capture_output=True, text=True, env=env, timeout=120)

    table = meshctl("svid", "default", "-n", "default")
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].split()[:3] == ["NODE", "SPIFFE", "ID"]
    assert any(mesh.nodes[1][:16] in line and CLIENT in line for line in table.stdout.splitlines()[1:])

    pem = meshctl("svid", "default", "-n", "default", "--node", mesh.nodes[1], "-o", "pem")
    assert pem.returncode == 0, pem.stderr
    leaf = x509.load_pem_x509_certificates(pem.stdout.encode())[0]
    sans = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert sans.get_values_for_type(x509.UniformResourceIdentifier) == [CLIENT]
    (tmp_path / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "bundle.pem").write_text(meshctl("bundle").stdout)
    verify = subprocess.run(["openssl", "verify", "-CAfile", str(tmp_path / "bundle.pem"), str(tmp_path / "leaf.pem")],
                            capture_output=True, text=True, timeout=30)
    assert verify.returncode == 0 and verify.stdout.strip().endswith("OK"), verify.stdout + verify.stderr
    assert "PRIVATE KEY" not in pem.stdout + table.stdout

    missing = meshctl("svid", "nobody", "-n", "default")
    assert missing.returncode != 0 and "no proxy holds a matching SVID" in missing.stderr


HALF_CLOSE_SERVICE = "halfclose"
HALF_CLOSE_PORT = 9410


@pytest.mark.parametrize("strict", [False, True], ids=["auto-mtls", "strict"])
def test_tcp_half_close_crosses_the_mtls_tunnel(mesh, strict):
    """A workload on node 0 sends a request to a tcp service on node 1 and shuts down its write
    side; the server answers only after that EOF.  Connections the kernel gives node 0's proxy
    cross the mTLS tunnel (the rest are served by node 1's proxy directly): every one of them
    must get the whole echo, the reply, then EOF."""
    mesh.deploy_tcp(HALF_CLOSE_SERVICE, "v1", node_index=1, service_port=HALF_CLOSE_PORT, after_eof=b"|after-eof")
    client = mesh.deploy("sleep", "v1", node_index=0)
    mesh.wait_endpoints(HALF_CLOSE_SERVICE, 1)
    if strict:
        mesh.apply(STRICT)
    wait_for(lambda: CLIENT in proxy_mtls(mesh, 0)["identities"] and proxy_mtls(mesh, 1)["identities"])
    vip = workload.service_vip(HALF_CLOSE_SERVICE)
    request = os.urandom(1 << 20)        # more than the socket buffers hold on the way
    before = proxy_mtls(mesh, 1)
    crossed = 0
    for _ in range(40):
        reply = ray.get(client.tcp_half_close.remote(vip, HALF_CLOSE_PORT, request), timeout=60)
        assert len(reply) == len(request) + 10 and reply == request + b"|after-eof"
        crossed = proxy_mtls(mesh, 1)["stream_handshakes"] - before["stream_handshakes"]
        if crossed >= 3:
            break
    assert crossed >= 3
    after = proxy_mtls(mesh, 1)
    assert after["peers"].get(CLIENT, 0) - before["peers"].get(CLIENT, 0) >= 3
    assert after["refused_total"] == before["refused_total"]
