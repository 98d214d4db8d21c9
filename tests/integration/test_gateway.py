"""The ingress gateway on a two-node Ray cluster: Istio's bookinfo-gateway.yaml, applied as a user
would, then plain HTTP clients against the gateway's port on the head node, and an HTTPS server
(tls SIMPLE, certificate files made here) on a second port, queried with curl, and a TCP server
on a third, spliced to a workload on the other node.

The Gateway's port is rewritten from 8080 to a free ephemeral port chosen here: 8080 is a
common port on a shared machine, and the gateway binds it on every test run.  Workloads run on
the other node, so requests cross nodes through the inbound tunnel, over mTLS with the
gateway's own identity."""
from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml

from mesh.client import NAMESPACE

from tests.unit.test_tls_origination import Pki

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(os.environ.get("RAYMESH_CONFORMANCE_DIR") or ROOT.parent / "shared" / "conformance" / "istio")
BOOKINFO_GATEWAY = CORPUS / "samples" / "bookinfo" / "networking" / "bookinfo-gateway.yaml"
MESHCTL = str(Path(sys.executable).with_name("meshctl"))
GATEWAY_ID = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bookinfo_gateway(port: int) -> list[dict[str, Any]]:
    """bookinfo-gateway.yaml from the conformance corpus with its server port set to ``port``."""
    if not BOOKINFO_GATEWAY.is_file():
        pytest.fail(f"Istio conformance corpus not found: {BOOKINFO_GATEWAY} is missing; "
                    "set RAYMESH_CONFORMANCE_DIR to the corpus", pytrace=False)
    docs = [d for d in yaml.safe_load_all(BOOKINFO_GATEWAY.read_text()) if d]
    gateway = next(d for d in docs if d["kind"] == "Gateway")
    assert gateway["spec"]["servers"][0]["port"]["number"] == 8080
    gateway["spec"]["servers"][0]["port"]["number"] = port
    return docs


def destination_rule(host: str, *versions: str) -> dict[str, Any]:
    return {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule", "metadata": {"name": host},
            "spec": {"host": host, "subsets": [{"name": v, "labels": {"version": v}} for v in versions]}}


def request(port: int, path: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_gateway(mesh: Any, port: int, timeout: float = 30) -> dict[str, str]:
    """proxy-status's gateway listeners once the head node's proxy serves ``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = {r["node"]: r for r in mesh.client.proxy_status()}
        gateways = rows.get(mesh.nodes[0], {}).get("gateways") or {}
        if f"127.0.0.1:{port}" in gateways.values():
            return gateways
        time.sleep(0.2)
    raise TimeoutError(f"no gateway listener on port {port}: {mesh.client.proxy_status()}")


def https_gateway(port: int, cert: tuple[str, str]) -> list[dict[str, Any]]:
    """A second Gateway: HTTPS on ``port`` for bookinfo.example.com, routed to productpage."""
    return [{"apiVersion": "networking.istio.io/v1", "kind": "Gateway", "metadata": {"name": "bookinfo-https"},
             "spec": {"selector": {"istio": "ingressgateway"}, "servers": [
                 {"port": {"number": port, "name": "https", "protocol": "HTTPS"}, "hosts": ["bookinfo.example.com"],
                  "tls": {"mode": "SIMPLE", "serverCertificate": cert[0], "privateKey": cert[1]}}]}},
            {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "bookinfo-https"},
             "spec": {"hosts": ["bookinfo.example.com"], "gateways": ["bookinfo-https"],
                      "http": [{"route": [{"destination": {"host": "productpage", "port": {"number": 9080}}}]}]}}]


def credential_gateway(port: int) -> list[dict[str, Any]]:
    """A fourth Gateway, as Istio's docs write it: HTTPS whose certificate is the Secret bookinfo-credential."""
    docs = https_gateway(port, ("", ""))
    for doc in docs:
        doc["metadata"]["name"] = "bookinfo-credential"
    docs[0]["spec"]["servers"][0]["tls"] = {"mode": "SIMPLE", "credentialName": "bookinfo-credential"}
    docs[1]["spec"]["gateways"] = ["bookinfo-credential"]
    return docs


def https_get(port: int, ca: str, path: str) -> subprocess.CompletedProcess:
    return subprocess.run(["curl", "-sS", "--max-time", "15", "--cacert", ca, "--resolve",
                           f"bookinfo.example.com:{port}:127.0.0.1", f"https://bookinfo.example.com:{port}{path}"],
                          capture_output=True, text=True, timeout=30)


def tcp_gateway(port: int) -> list[dict[str, Any]]:
    """A third Gateway: a TCP server on ``port`` whose tcp rule splices to productpage:9080."""
    return [{"apiVersion": "networking.istio.io/v1", "kind": "Gateway", "metadata": {"name": "bookinfo-tcp"},
             "spec": {"selector": {"istio": "ingressgateway"}, "servers": [
                 {"port": {"number": port, "name": "tcp", "protocol": "TCP"}, "hosts": ["*"]}]}},
            {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "bookinfo-tcp"},
             "spec": {"hosts": ["*"], "gateways": ["bookinfo-tcp"],
                      "tcp": [{"match": [{"port": port}],
                               "route": [{"destination": {"host": "productpage", "port": {"number": 9080}}}]}]}}]


def raw_http(port: int, path: str) -> bytes:
    """An HTTP/1.1 request written as bytes on a plain TCP connection; everything until the close."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: productpage\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while data := s.recv(65536):
            chunks.append(data)
        return b"".join(chunks)


def meshctl(mesh: Any, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_ADDRESS=mesh.cluster.address)
    return subprocess.run([MESHCTL, *args], capture_output=True, text=True, env=env, timeout=120)


def test_bookinfo_gateway_routes_into_the_mesh(mesh, tmp_path) -> None:
    port = free_port()
    mesh.deploy("productpage", "v1", node_index=1, service_port=9080)
    mesh.deploy("reviews", "v1", node_index=1, service_port=9080)
    mesh.deploy("reviews", "v2", node_index=1, service_port=9080)
    mesh.wait_endpoints("productpage", 1)
    mesh.wait_endpoints("reviews", 2)
    reviews_vs = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "reviews-gw"},
                  "spec": {"hosts": ["reviews.example.com"], "gateways": ["bookinfo-gateway"], "http": [
                      {"match": [{"headers": {"end-user": {"exact": "jason"}}}],
                       "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
                      {"route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 50},
                                 {"destination": {"host": "reviews", "subset": "v2"}, "weight": 50}]}]}}
    applied = tmp_path / "bookinfo-gateway.yaml"
    applied.write_text(yaml.safe_dump_all(bookinfo_gateway(port)))
    r = meshctl(mesh, "apply", "-f", str(applied))
    assert r.returncode == 0 and "gateway.networking.istio.io/bookinfo-gateway created" in r.stdout, r.stderr
    mesh.apply(destination_rule("productpage", "v1"), destination_rule("reviews", "v1", "v2"), reviews_vs)
    gateways = wait_gateway(mesh, port)
    r = meshctl(mesh, "proxy-status")
    assert "GATEWAY" in r.stdout and f"127.0.0.1:{port}" in r.stdout, r.stdout
    assert gateways == {f"istio-ingressgateway:{port}": f"127.0.0.1:{port}"}
    # Only the head node is a gateway node (the default): the worker node's proxy has no listeners.
    worker = next(r for r in mesh.client.proxy_status() if r["node"] == mesh.nodes[1])
    assert not worker.get("gateways")

    status, body = request(port, "/productpage")
    assert status == 200, body
    seen = json.loads(body)
    assert (seen["service"], seen["path"], seen["node"]) == ("productpage", "/productpage", mesh.nodes[1])
    assert request(port, "/api/v1/products/1")[0] == 200
    assert request(port, "/no-such-path")[0] == 404                 # no route: Envoy's 404 NR
    assert request(port, "/", {"Host": "unknown.example.org"})[0] == 404

    host = {"Host": "reviews.example.com"}
    for _ in range(5):
        status, body = request(port, "/r", {**host, "end-user": "jason"})
        assert (status, json.loads(body)["version"]) == (200, "v2")
    versions = set()
    for _ in range(60):
        status, body = request(port, "/r", host)
        assert status == 200
        versions.add(json.loads(body)["version"])
        if versions == {"v1", "v2"}:
            break
    assert versions == {"v1", "v2"}

    # Telemetry names the gateway as the source, and the hop to the other node was mTLS.
    deadline, rows = time.monotonic() + 20, []
    while time.monotonic() < deadline:
        rows = mesh.client.telemetry_query({"source_workload": ["istio-ingressgateway"],
                                            "destination_service": ["productpage.default.svc.cluster.local"]},
                                           ("source_workload_namespace", "source_principal",
                                            "connection_security_policy", "response_code"), 120)
        if sum(r["requests"] for r in rows if r["response_code"] == 200) >= 2:
            break
        time.sleep(0.5)
    ok = [r for r in rows if r["response_code"] == 200]
    assert ok and all((r["source_workload_namespace"], r["source_principal"], r["connection_security_policy"])
                      == ("istio-system", GATEWAY_ID, "mutual_tls") for r in ok), rows

    # HTTPS on another port of the same gateway, terminated there, then into the mesh as above.
    https_port = free_port()
    (tmp_path / "pki").mkdir()
    pki = Pki(tmp_path / "pki")
    mesh.apply(*https_gateway(https_port, pki.issue("bookinfo", "bookinfo.example.com", ["bookinfo.example.com"])))
    wait_gateway(mesh, https_port)
    out = subprocess.run(["curl", "-sS", "--max-time", "15", "--cacert", pki.ca, "--http2", "--resolve",
                          f"bookinfo.example.com:{https_port}:127.0.0.1",
                          f"https://bookinfo.example.com:{https_port}/productpage"],
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert (seen["service"], seen["path"], seen["node"]) == ("productpage", "/productpage", mesh.nodes[1])

    # credentialName: the Gateway first (its port stays closed, the reason in proxy-status), then
    # the Secret with meshctl create secret tls, as Istio's docs do it with kubectl.
    cred_port = free_port()
    applied = tmp_path / "credential-gateway.yaml"
    applied.write_text(yaml.safe_dump_all(credential_gateway(cred_port)))
    assert meshctl(mesh, "apply", "-f", str(applied)).returncode == 0
    deadline, errors = time.monotonic() + 30, {}
    while time.monotonic() < deadline and not errors:
        head = next(r for r in mesh.client.proxy_status() if r["node"] == mesh.nodes[0])
        errors = {k: v for k, v in (head.get("gateway_errors") or {}).items() if str(cred_port) in k}
        time.sleep(0.2)
    assert "no Secret bookinfo-credential" in next(iter(errors.values()), ""), errors
    cert = pki.issue("cred", "bookinfo.example.com", ["bookinfo.example.com"])
    r = meshctl(mesh, "create", "secret", "tls", "bookinfo-credential", "--cert", cert[0], "--key", cert[1])
    assert r.returncode == 0 and "secret/bookinfo-credential created" in r.stdout, r.stderr
    wait_gateway(mesh, cred_port)
    out = https_get(cred_port, pki.ca, "/productpage")
    assert out.returncode == 0 and json.loads(out.stdout)["node"] == mesh.nodes[1], out.stderr
    r = meshctl(mesh, "get", "secret", "-n", "istio-system", "-o", "yaml")
    assert r.returncode == 0 and "REDACTED" in r.stdout and "BEGIN" not in r.stdout
    assert Path(cert[1]).read_text().splitlines()[1] not in r.stdout
    r = meshctl(mesh, "get", "secret", "-n", "istio-system")
    assert r.stdout.split("\n")[0].split() == ["NAMESPACE", "NAME", "TYPE", "DATA", "SUBJECT", "EXPIRES"], r.stdout
    assert "bookinfo-credential   kubernetes.io/tls   tls.crt,tls.key   CN=bookinfo.example.com" in r.stdout, r.stdout
    # The worker node is no gateway: its proxy never received the Secret.
    stats = {node: ray.get(ray.get_actor(f"proxy-{node[:16]}", namespace=NAMESPACE).status.remote())["stats"]
             for node in mesh.nodes[:2]}
    assert (stats[mesh.nodes[0]]["gateway_secrets"], stats[mesh.nodes[1]]["gateway_secrets"]) == (
        ["bookinfo-credential"], [])

    # A TCP server: bytes spliced (not parsed) to productpage on the other node, over the tunnel.
    tcp_port = free_port()
    mesh.apply(*tcp_gateway(tcp_port))
    wait_gateway(mesh, tcp_port)
    reply = raw_http(tcp_port, "/over-tcp")
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), reply[:200]
    seen = json.loads(body)
    assert (seen["service"], seen["path"], seen["node"]) == ("productpage", "/over-tcp", mesh.nodes[1])
