"""Endpoints outside Ray (ServiceEntry STATIC / DNS, WorkloadEntry) and bad traffic at a mesh proxy."""
from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest

pytestmark = pytest.mark.ray


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        body = json.dumps({"external": self.server.name, "path": self.path, "host": self.headers["host"]}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def external_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    server.name = "vm-1"  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def service_entry(name: str, host: str, resolution: str, **spec) -> dict:
    return {"apiVersion": "networking.istio.io/v1", "kind": "ServiceEntry", "metadata": {"name": name},
            "spec": {"hosts": [host], "ports": [{"number": 80, "name": "http", "protocol": "HTTP"}],
                     "resolution": resolution, "location": "MESH_EXTERNAL", **spec}}


def test_static_service_entry(mesh, external_server):
    port = external_server.server_address[1]
    mesh.apply(service_entry("ext", "ext.example.com", "STATIC",
                             endpoints=[{"address": "127.0.0.1", "ports": {"http": port}}]))
    for node in (0, 1):
        status, body = mesh.get_json("http://ext.example.com/static", node_index=node)
        assert status == 200 and body == {"external": "vm-1", "path": "/static", "host": "ext.example.com"}


def test_dns_service_entry_resolves_at_connect_time(mesh, external_server):
    port = external_server.server_address[1]
    mesh.apply(service_entry("dns", "dns.example.com", "DNS",
                             endpoints=[{"address": "localhost", "ports": {"http": port}}]))
    status, body = mesh.get_json("http://dns.example.com/dns")
    assert status == 200 and body["path"] == "/dns"


def test_workload_entry_selected_by_a_service_entry(mesh, external_server):
    port = external_server.server_address[1]
    mesh.apply({"apiVersion": "networking.istio.io/v1", "kind": "WorkloadEntry", "metadata": {"name": "vm-1"},
                "spec": {"address": "127.0.0.1", "labels": {"app": "legacy", "version": "v1"}, "ports": {"http": port}}},
               service_entry("legacy", "legacy.example.com", "STATIC", workloadSelector={"labels": {"app": "legacy"}}))
    status, body = mesh.get_json("http://legacy.example.com/vm")
    assert status == 200 and body["external"] == "vm-1"


def _raw(port: int, payload: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(payload)
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks)


def test_malformed_and_oversized_requests_get_400_and_431_and_the_proxy_lives_on(mesh):
    port = mesh.proxy_port(0)
    assert _raw(port, b"THIS IS NOT HTTP\r\n\r\n").startswith(b"HTTP/1.1 400")
    huge = b"GET http://echo:8000/ HTTP/1.1\r\nHost: echo\r\nx-big: " + b"a" * 100_000 + b"\r\n\r\n"
    assert _raw(port, huge).startswith(b"HTTP/1.1 431")
    mesh.deploy("echo", "v1", node_index=1)
    mesh.wait_endpoints("echo", 1)
    assert mesh.get("http://echo:8000/still-alive")[0] == 200
