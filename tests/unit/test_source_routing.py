"""VirtualService ``sourceLabels`` / ``sourceNamespace`` routes in the node proxy: HTTP, TCP and
TLS rules taken by one client workload and not by another.

Each client is a real process: the proxy tells them apart the way it does in production, by
the pid owning the connection's socket (``proxy_core.source_identity``), among the pids of a
credentials push that carries each workload's registration (namespace and labels).  The
test process itself is in no push: its connections are those of an unidentified client.
"""
from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest

from mesh.identity import CAKeyPair, create_root_ca, spiffe_id
from proxy_core.mtls import Credentials
from proxy_core.server import ProxyServer
from proxy_core.snapshot import Snapshot, SourceMatch
from proxy_core.source_identity import UNIDENTIFIED, SourceWorkload
from tests.unit.conftest import Echo, cluster, closed_port, snapshot, vhost
from tests.unit.test_compiler import FQDN, vs_doc
from tests.unit.test_gateway_listener import bookinfo_gateway
from tests.unit.test_proxy_server import aget
from tests.unit.test_tls_passthrough import client_hello

pytestmark = pytest.mark.timeout(60)

# name -> (SPIFFE id, namespace, labels) of the workloads the tests push
WORKLOADS = {
    "v2-client": (spiffe_id("bar", "sleep"), "bar", {"app": "sleep", "version": "v2"}),
    "baz-client": (spiffe_id("baz", "sleep"), "baz", {"app": "sleep", "version": "v1"}),
    "app-only": (spiffe_id("bar", "sleep"), "bar", {"app": "sleep"}),
}

# A client process: waits for "go", then for each argv item opens a connection to
# argv[1]:argv[2] and, in "http" mode, sends "GET <item>" (absolute-form, Connection: close)
# and prints "<status>:<body>"; in "tcp" mode sends the item, half-closes and prints everything
# read until EOF; in "tls" mode sends the item (a ClientHello in hex) likewise and prints what
# came after the echoed bytes' last "|" (the echo server's name).
_CLIENT = r"""
import socket, sys
host, port, mode = sys.argv[1], int(sys.argv[2]), sys.argv[3]
sys.stdin.readline()
for item in sys.argv[4:]:
    s = socket.create_connection((host, port), timeout=10)
    if mode == "http":
        s.sendall(f"GET {item} HTTP/1.1\r\nHost: {item.split('/')[2]}\r\nConnection: close\r\n\r\n".encode())
    else:
        s.sendall(bytes.fromhex(item) if mode == "tls" else item.encode())
        s.shutdown(socket.SHUT_WR)
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except ConnectionResetError:
        pass
    s.close()
    if mode == "http":
        head, _, body = out.partition(b"\r\n\r\n")
        print((head.split(b" ")[1] + b":" + body).decode() if head else "closed", flush=True)
    else:
        print((out.rpartition(b"|")[2] if mode == "tls" else out).decode() or "closed", flush=True)
"""


class Client:
    """A client process, started before the credentials push names its pid."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, host: str, port: int, mode: str, *items: str) -> "Client":
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _CLIENT, host, str(port), mode, *items,
                                                    stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        return cls(proc)

    async def run(self) -> list[str]:
        out, _ = await asyncio.wait_for(self.proc.communicate(b"go\n"), 20)
        return out.decode().split()


@pytest.fixture(scope="module")
def ca() -> CAKeyPair:
    return create_root_ca()


def push(proxy: ProxyServer, ca: CAKeyPair, clients: dict[str, Client]) -> None:
    """The credentials push as the proxy worker sends it: each pid with its registration."""
    proxy.mtls.update(Credentials.from_dict({
        "trust_domain": "cluster.local", "roots": [ca.cert_pem], "svids": [],
        "workloads": [[c.proc.pid, WORKLOADS[name][0], {"service": "sleep", "namespace": WORKLOADS[name][1],
                                                         "labels": WORKLOADS[name][2]}]
                      for name, c in clients.items()]}))


async def from_each(proxy: ProxyServer, ca: CAKeyPair, host: str, port: int, mode: str,
                    *items: str) -> dict[str, list[str]]:
    """``items`` sent by each workload of ``WORKLOADS`` and by an unidentified client."""
    clients = {name: await Client.start(host, port, mode, *items) for name in WORKLOADS}
    push(proxy, ca, clients)
    out = {name: await c.run() for name, c in clients.items()}
    out["anonymous"] = await (await Client.start(host, port, mode, *items)).run()
    return out


# -- HTTP -------------------------------------------------------------------------------------

HTTP_ROUTES = [
    {"name": "from-v2", "match": [{"source_labels": {"app": "sleep", "version": "v2"}}],
     "route": [{"cluster": "v2", "weight": 100}]},
    {"name": "from-baz", "match": [{"uri": {"prefix": "/"}, "source_namespace": "baz"}],
     "route": [{"cluster": "baz", "weight": 100}]},
    {"name": "rest", "route": [{"cluster": "v1", "weight": 100}]},
]


async def http_proxy(env, routes: list[dict[str, Any]], **kw: Any) -> ProxyServer:
    ups = {name: await env.upstream(name=name) for name in ("v1", "v2", "baz")}
    return await env.proxy(snapshot(vhosts=[vhost("svc", 80, routes), vhost("plain", 80, [routes[-1]])],
                                    clusters={name: cluster(up.port) for name, up in ups.items()}), **kw)


async def test_http_routes_by_source_labels_and_namespace_fall_through_otherwise(env, ca) -> None:
    p = await http_proxy(env, HTTP_ROUTES)
    got = await from_each(p, ca, "127.0.0.1", p.ports["http_proxy"], "http", "http://svc/a", "http://svc/b")
    assert got == {"v2-client": ["200:v2"] * 2,      # carries every label of the first rule
                   "baz-client": ["200:baz"] * 2,    # sourceNamespace baz
                   "app-only": ["200:v1"] * 2,       # lacks version=v2, not in baz: the catch-all
                   "anonymous": ["200:v1"] * 2}      # unidentified: no source condition holds


async def test_http_source_is_looked_up_only_for_hosts_with_a_source_match(env) -> None:
    p = await http_proxy(env, HTTP_ROUTES, telemetry_rows=0)   # telemetry would look every client up
    port = p.ports["http_proxy"]
    assert (await aget(port, "http://plain/x"))[2] == b"v1"
    assert p.mtls.sources.lookups == 0               # no source condition on that host: no kernel query
    assert (await aget(port, "http://svc/x"))[2] == b"v1"
    assert p.mtls.sources.lookups == 1 and p.mtls.sources.unknown == 1


async def test_http2_streams_share_their_connection_s_lookup(env, ca) -> None:
    """Six requests on one HTTP/2 connection (h2load, two streams at a time): one kernel lookup
    for the connection, and every stream routed by its client's labels."""
    vip = "127.79.0.9"
    ups = {name: await env.upstream(name=name) for name in ("v1", "v2", "baz")}
    p = await env.proxy(snapshot(vips=[{"address": vip, "port": 0, "host": "svc", "protocol": "http2"}],
                                 vhosts=[vhost("svc", 0, HTTP_ROUTES)],
                                 clusters={name: cluster(up.port) for name, up in ups.items()}))
    # the shell waits for "go" then becomes h2load (exec keeps the pid the push names)
    proc = await asyncio.create_subprocess_exec(
        "sh", "-c", 'read _ && exec h2load -n 6 -c 1 -m 2 "$1"', "sh", f"http://{vip}:{p.vip_ports()[f'{vip}:0']}/",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    push(p, ca, {"v2-client": Client(proc)})
    out, _ = await asyncio.wait_for(proc.communicate(b"go\n"), 20)
    assert "6 succeeded" in out.decode(), out.decode()
    assert (len(ups["v2"].seen), len(ups["v1"].seen)) == (6, 0)
    assert p.mtls.sources.lookups == 1


async def test_gateway_listener_source_is_the_gateway_itself(env) -> None:
    v1, v2 = await env.upstream(name="reviews-v1"), await env.upstream(name="reviews-v2")
    port = closed_port()
    vs = vs_doc("reviews-gw", [
        {"match": [{"sourceLabels": {"app": "sleep"}}], "route": [{"destination": {"host": "reviews", "subset": "v2"}}]},
        {"match": [{"sourceLabels": {"istio": "ingressgateway"}, "sourceNamespace": "istio-system"}],
         "route": [{"destination": {"host": "reviews", "subset": "v1"}}]},
        {"route": [{"destination": {"host": "reviews", "subset": "v2"}}]}],
        hosts=["reviews.example.com"], gateways=["bookinfo-gateway"])
    clusters = {f"outbound|9080|v1|{FQDN('reviews')}": v1.port, f"outbound|9080|v2|{FQDN('reviews')}": v2.port}
    p = await env.proxy(bookinfo_gateway(port, clusters, vs))
    for _ in range(3):
        assert (await aget(port, "/", headers={"Host": "reviews.example.com"}))[2] == b"reviews-v1"
    assert p.mtls.sources.lookups == 0               # the gateway's clients are never looked up


# -- TCP and TLS --------------------------------------------------------------------------------

VIP = "127.78.4.1"


def l4_snapshot(protocol: str, ports: dict[str, int], match: dict[str, Any]) -> dict[str, Any]:
    """Service ``db`` on ``VIP``: a rule with ``match`` to cluster ``batch``, else cluster ``main``."""
    host = {"name": "db:0", "host": "db", "port": 0, "routes": [
        {"name": "batch", "match": [match], "route": [{"cluster": "batch", "weight": 100}]},
        {"name": "main", "route": [{"cluster": "main", "weight": 100}]}]}
    snap = snapshot(vips=[{"address": VIP, "port": 0, "host": "db", "protocol": protocol}],
                    clusters={name: cluster(port) for name, port in ports.items()})
    snap[f"{protocol}_routes"] = [host]
    return snap


async def test_tcp_route_by_source_labels_sends_one_client_elsewhere(env, ca) -> None:
    main, batch = env.track(await Echo("main").start()), env.track(await Echo("batch").start())
    p = await env.proxy(l4_snapshot("tcp", {"main": main.port, "batch": batch.port},
                                    {"source_labels": {"version": "v2"}}))
    got = await from_each(p, ca, VIP, p.vip_ports()[f"{VIP}:0"], "tcp", "hello", "again")
    assert got == {"v2-client": ["hello|batch", "again|batch"], "baz-client": ["hello|main", "again|main"],
                   "app-only": ["hello|main", "again|main"], "anonymous": ["hello|main", "again|main"]}
    assert (batch.connections, main.connections) == (2, 6)


async def test_tls_route_by_sni_and_source_namespace(env, ca) -> None:
    main, batch = env.track(await Echo("main").start()), env.track(await Echo("batch").start())
    p = await env.proxy(l4_snapshot("tls", {"main": main.port, "batch": batch.port},
                                    {"sni_hosts": ["db.example.com"], "source_namespace": "baz"}))
    hello = client_hello("db.example.com").hex()
    got = await from_each(p, ca, VIP, p.vip_ports()[f"{VIP}:0"], "tls", hello)
    # The echo returns the ClientHello untouched, then "|<its name>".
    assert got == {"v2-client": ["main"], "baz-client": ["batch"], "app-only": ["main"], "anonymous": ["main"]}
    assert (batch.connections, main.connections) == (1, 3)


# -- the snapshot's source conditions -----------------------------------------------------------

def test_source_conditions_parse_and_reject_bad_input() -> None:
    source = SourceMatch.from_dict({"source_labels": {"version": "v2", "app": "sleep"}, "source_namespace": "bar"})
    assert source == SourceMatch((("app", "sleep"), ("version", "v2")), "bar")
    assert SourceMatch.from_dict({"source_labels": {}}) is None and SourceMatch.from_dict({"uri": {}}) is None
    _, v2 = SourceWorkload.from_push([1, WORKLOADS["v2-client"][0], {"service": "sleep", "namespace": "bar",
                                                                     "labels": WORKLOADS["v2-client"][2]}])
    _, bare = SourceWorkload.from_push([2, "spiffe://cluster.local/sa/x"])    # no namespace known
    assert source.matches(v2) and not source.matches(bare) and not source.matches(UNIDENTIFIED)
    assert not source.matches(None)
    assert not SourceMatch((), "unknown").matches(bare)    # an unknown namespace matches no condition
    with pytest.raises(ValueError, match="source_labels must be a map"):
        Snapshot.from_dict(snapshot(vhosts=[vhost("svc", 80, [{"name": "r", "match": [{"source_labels": ["app"]}],
                                                               "direct_response": {"status": 200}}])]))
