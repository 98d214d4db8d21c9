"""Istio's protocol selection (port names, appProtocol, ServiceEntry protocol) in compiled
snapshots, and a compiled unnamed port serving HTTP/1.1, h2c and raw TCP through a real proxy."""
from __future__ import annotations

import asyncio
import socket
import subprocess
from typing import Any

import pytest

from mesh.compiler import compile_snapshot
from mesh.loader import Document
from mesh.protocols import port_protocol, service_entry_protocol
from mesh.registry import NodeInfo, RegistryState, WorkloadInstance, service_fqdn
from mesh.resources import Resource
from mesh.validation import validate_documents
from proxy_core.snapshot import Snapshot
from tests.multiproto import MultiProtocolServer

pytestmark = pytest.mark.timeout(60)

NODE = "node-a"
HOST = service_fqdn("multi", "default")


@pytest.mark.parametrize(("name", "app_protocol", "want"), [
    ("http", "", "http"), ("http-web", "", "http"), ("HTTP-Web", "", "http"), ("http2", "", "http2"),
    ("http2-api", "", "http2"), ("grpc", "", "grpc"), ("grpc-api", "", "grpc"), ("grpc-web", "", "grpc-web"),
    ("grpc-web-ui", "", "grpc-web"), ("tcp", "", "tcp"), ("tcp-db", "", "tcp"), ("tls-x", "", "tls"),
    ("https-x", "", "https"), ("mongo-x", "", "tcp"), ("redis", "", "tcp"), ("mysql-x", "", "tcp"),
    ("", "", "auto"), ("web", "", "auto"), ("httpx", "", "auto"), ("grpcweb", "", "auto"),
    ("tcp-db", "grpc", "grpc"), ("http", "tcp", "tcp"), ("web", "HTTP2", "http2"),
    ("grpc", "kubernetes.io/h2c", "http2"), ("tcp", "kubernetes.io/ws", "http"),
    ("http", "kubernetes.io/wss", "https"), ("http", "custom-thing", "auto"),
])
def test_port_protocol_follows_istio(name: str, app_protocol: str, want: str) -> None:
    assert port_protocol(name, app_protocol) == want


@pytest.mark.parametrize(("declared", "want"), [
    ("HTTP", "http"), ("HTTPS", "https"), ("GRPC", "grpc"), ("HTTP2", "http2"), ("GRPC-WEB", "grpc-web"),
    ("TCP", "tcp"), ("TLS", "tls"), ("MONGO", "tcp"), ("REDIS", "tcp"), ("MYSQL", "tcp"), ("http", "http"),
    (None, "auto"), ("", "auto"),
])
def test_service_entry_protocol_is_the_declared_one(declared: str | None, want: str) -> None:
    assert service_entry_protocol(declared) == want


def workload(port_name: str, service_port: int, port: int, protocol: str = "") -> WorkloadInstance:
    return WorkloadInstance(service="multi", namespace="default", address="127.0.0.1", port=port,
                            service_port=service_port, node_id=NODE, labels={"app": "multi"},
                            protocol=protocol, port_name=port_name, uid=f"multi-{service_port}")


def registry(*workloads: WorkloadInstance, vip: str = "127.10.0.20") -> RegistryState:
    return RegistryState(workloads=list(workloads), nodes={NODE: NodeInfo(NODE, "127.0.0.1", 15006, 15001)},
                         vips={HOST: vip})


def compile_checked(docs: list[dict[str, Any]], reg: RegistryState) -> dict[str, Any]:
    assert validate_documents([Document("<test>", i, d) for i, d in enumerate(docs)]) == []
    snap = compile_snapshot([Resource.from_dict(d) for d in docs], reg, NODE)
    Snapshot.from_dict(snap)   # the proxy accepts it
    return snap


def vip_protocols(snap: dict[str, Any]) -> dict[int, str]:
    return {v["port"]: v["protocol"] for v in snap["vips"]}


def tcp_ports(snap: dict[str, Any]) -> set[tuple[str, int]]:
    return {(t["host"], t["port"]) for t in snap["tcp_routes"]}


def test_registry_ports_get_their_protocol_from_name_and_app_protocol() -> None:
    reg = registry(workload("http-web", 8080, 41001), workload("grpc-api", 50051, 41002),
                   workload("mongo-db", 27017, 41003), workload("web", 9000, 41004),
                   workload("tcp-legacy", 7000, 41005, protocol="grpc"), workload("", 9001, 41006),
                   workload("x", 8443, 41007, protocol="kubernetes.io/h2c"))
    snap = compile_checked([], reg)
    assert vip_protocols(snap) == {8080: "http", 50051: "grpc", 27017: "tcp", 9000: "auto", 7000: "grpc",
                                   9001: "auto", 8443: "http2"}
    clusters = {c["port"]: c.get("protocol") for c in snap["clusters"].values()}
    assert clusters == {8080: None, 50051: "grpc", 27017: None, 9000: "auto", 7000: "grpc", 9001: "auto",
                        8443: "http2"}
    # tcp routes: declared TCP ports and sniffed ports (their non-HTTP fallback); none for HTTP ports.
    assert tcp_ports(snap) == {(HOST, 27017), (HOST, 9000), (HOST, 9001)}
    parsed = Snapshot.from_dict(snap)
    auto = parsed.clusters[f"outbound|9000||{HOST}"]
    assert auto.use_downstream_protocol and not auto.http2
    assert not parsed.clusters[f"outbound|8080||{HOST}"].use_downstream_protocol
    fallback = parsed.tcp_routes[(HOST, 9000)].routes[0]
    assert [w.cluster for w in fallback.clusters] == [f"outbound|9000||{HOST}"]


def test_sniffed_port_takes_virtual_service_http_and_tcp_rules() -> None:
    reg = registry(workload("web", 9000, 41004), workload("tcp-db", 7000, 41005))
    vs = {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
          "metadata": {"name": "multi", "namespace": "default"},
          "spec": {"hosts": ["multi"],
                   "http": [{"name": "slow", "match": [{"uri": {"prefix": "/slow"}}],
                             "timeout": "3s", "route": [{"destination": {"host": "multi"}}]}],
                   "tcp": [{"match": [{"port": 9000}], "route": [{"destination": {"host": "multi",
                                                                                  "port": {"number": 9000}}}]}]}}
    snap = compile_checked([vs], reg)
    vh = {v["port"]: v for v in snap["virtual_hosts"]}
    assert [r["name"] for r in vh[9000]["routes"]] == ["slow"]
    assert vh[9000]["routes"][0]["timeout"] == 3.0
    assert vh[7000]["routes"][0]["name"] == "default"     # a TCP port keeps the default route
    by_port = {t["port"]: t["routes"] for t in snap["tcp_routes"]}
    assert by_port[9000][0]["name"] == "default/multi/0"
    assert by_port[7000][0]["name"] == "default"          # the rule matches port 9000 only


def test_service_entry_ports_honour_their_declared_protocol() -> None:
    se = {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry",
          "metadata": {"name": "ext", "namespace": "default"},
          "spec": {"hosts": ["ext.example.com"], "addresses": ["127.10.0.30"], "location": "MESH_EXTERNAL",
                   "resolution": "STATIC", "endpoints": [{"address": "127.0.0.1"}],
                   "ports": [{"number": 80, "name": "web", "protocol": "HTTP"},
                             {"number": 443, "name": "https", "protocol": "HTTPS"},
                             {"number": 50051, "name": "tcp-rpc", "protocol": "GRPC"},
                             {"number": 27017, "name": "http-db", "protocol": "MONGO"},
                             {"number": 9443, "name": "tls", "protocol": "TLS"},
                             {"number": 9000, "name": "grpc-unset"}]}}
    snap = compile_checked([se], RegistryState(nodes={NODE: NodeInfo(NODE, "127.0.0.1", 15006, 15001)}))
    # The name never decides on a ServiceEntry: "tcp-rpc" is GRPC, "http-db" is MONGO (tcp), "grpc-unset" is sniffed.
    assert vip_protocols(snap) == {80: "http", 443: "https", 50051: "grpc", 27017: "tcp", 9443: "tls", 9000: "auto"}
    assert tcp_ports(snap) == {("ext.example.com", 27017), ("ext.example.com", 9000)}
    assert snap["clusters"]["outbound|50051||ext.example.com"]["protocol"] == "grpc"


def free_port(address: str) -> int:
    with socket.socket() as s:
        s.bind((address, 0))
        return s.getsockname()[1]


def curl(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(["curl", "-s", "--max-time", "20", *args], capture_output=True)


async def test_unnamed_port_serves_http1_h2c_and_raw_tcp_through_the_proxy(env) -> None:
    """A workload joins with an unnamed port: the compiled VIP sniffs each connection, and each
    protocol reaches the workload as the client spoke it (h2c upstream as HTTP/2, raw bytes spliced)."""
    upstream = env.track(await MultiProtocolServer().start())
    vip = "127.79.0.20"
    service_port = free_port(vip)
    snap = compile_checked([], registry(workload("", service_port, upstream.port), vip=vip))
    snap["listeners"] = {"http_proxy": {"host": "127.0.0.1", "port": 0}}
    assert vip_protocols(snap) == {service_port: "auto"}
    proxy = await env.proxy(snap)
    url = f"http://{vip}:{service_port}"
    h1 = await asyncio.to_thread(curl, f"{url}/one")
    assert h1.stdout == b"h1 /one"
    h2 = await asyncio.to_thread(curl, "--http2-prior-knowledge", "-w", " %{http_version}", f"{url}/two")
    assert h2.stdout == b"h2 /two 2"                       # HTTP/2 to the proxy and from it
    reader, writer = await asyncio.open_connection(vip, service_port)
    writer.write(b"\x00\x01binary hello")
    assert await asyncio.wait_for(reader.readexactly(18), 5) == b"raw \x00\x01binary hello"
    writer.write(b" more")
    assert await asyncio.wait_for(reader.readexactly(5), 5) == b" more"
    writer.close()
    assert upstream.served == ["h1", "h2", "raw"]
    stats = proxy.stats()
    assert stats["upstream_h2"]["connects"] == 1
    assert stats["tcp"]["downstream_connections_total"] == 1
