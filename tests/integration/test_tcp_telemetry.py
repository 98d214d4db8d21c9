"""Raw TCP through a tcp service VIP on a two-node cluster becomes Istio's TCP metrics on Mixer.

The echo server runs on the second node; both nodes' proxies listen on the service's VIP
(SO_REUSEPORT), so connections are served by the proxy on the echo's node and, through the
inbound tunnel, by the other one. A long-lived connection's bytes must show up while it is
still open (periodic reporting), and the totals must be exact.
"""
from __future__ import annotations

import socket
import time
from typing import Callable

import pytest
import ray

from actors.proxy_worker import proxy_actor_name
from mesh import workload
from tests.integration.test_telemetry import _scrape_total

pytestmark = pytest.mark.ray

SERVICE = "tcpecho"
FQDN = f"{SERVICE}.default.svc.cluster.local"
PORT = 9400
CONNECTIONS = 12
PAYLOAD = 1000


def dest(**labels: str) -> dict[str, str]:
    return {"reporter": "destination", "destination_service": FQDN, **labels}


def wait_until(read: Callable[[], float], want: float, timeout: float = 20) -> float:
    deadline, value = time.monotonic() + timeout, read()
    while value != want and time.monotonic() < deadline:
        time.sleep(0.5)
        value = read()
    return value


def echo_once(vip: str, data: bytes) -> bytes:
    with socket.create_connection((vip, PORT), timeout=10) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_tcp_echo_through_vip_is_reported_while_open_and_exactly_at_close(mesh):
    echo = mesh.deploy_tcp(SERVICE, "v1", node_index=1, service_port=PORT)
    mesh.wait_endpoints(SERVICE, 1)
    vip = workload.service_vip(SERVICE)
    assert vip and vip.startswith("127.")
    metric = "istio_tcp_received_bytes_total"

    # A long-lived connection: its bytes reach Mixer while it stays open.
    long_lived = socket.create_connection((vip, PORT), timeout=10)
    try:
        long_lived.sendall(b"x" * 500)
        got = b""
        while len(got) < 500:
            got += long_lived.recv(65536)
        assert wait_until(lambda: _scrape_total(metric, **dest()), 500) == 500
        assert _scrape_total("istio_tcp_sent_bytes_total", **dest()) == 500
        assert _scrape_total("istio_tcp_connections_opened_total", **dest()) == 1
        assert _scrape_total("istio_tcp_connections_closed_total", **dest()) == 0
    finally:
        long_lived.close()

    for i in range(CONNECTIONS):
        data = bytes([65 + i % 26]) * PAYLOAD
        assert echo_once(vip, data) == data
    total = 500 + CONNECTIONS * PAYLOAD
    assert wait_until(lambda: _scrape_total("istio_tcp_connections_closed_total", **dest()), CONNECTIONS + 1) \
        == CONNECTIONS + 1
    assert wait_until(lambda: _scrape_total(metric, **dest()), total) == total
    assert _scrape_total("istio_tcp_sent_bytes_total", **dest()) == total
    assert _scrape_total("istio_tcp_connections_opened_total", **dest()) == CONNECTIONS + 1
    # Istio's labels: both reporters, the destination workload, protocol tcp.
    assert _scrape_total(metric, **dest(destination_workload=f"{SERVICE}-v1", destination_app=SERVICE,
                                        destination_version="v1", request_protocol="tcp",
                                        response_flags="-")) == total
    assert _scrape_total(metric, reporter="source", destination_service=FQDN,
                         connection_security_policy="unknown") == total
    assert ray.get(echo.seen.remote(), timeout=10) == (CONNECTIONS + 1, total)

    # Both nodes' proxies served some of the connections: one of them through the inbound tunnel.
    opened = []
    for node in mesh.nodes:
        status = ray.get(ray.get_actor(proxy_actor_name(node), namespace="raymesh").status.remote(), timeout=30)
        opened.append(status["stats"]["tcp"]["destinations"].get(f"outbound|{PORT}||{FQDN}", {})
                      .get("connections_opened", 0))
    assert sum(opened) == CONNECTIONS + 1 and all(opened), opened
