"""TLS passthrough and TCP servers at the ingress gateway: Gateway servers routed by the
VirtualService ``tls`` / ``tcp`` rules bound to them and spliced by the mesh's L4 sessions.

Real sockets and real clients: ``openssl s_server`` origins with their own certificates behind
a passthrough port, Python ``ssl`` and ``openssl s_client`` clients through it, echo servers
behind a TCP port.  Snapshots are compiled from Gateway and VirtualService resources, so the
compiler and the proxy are tested together."""
from __future__ import annotations

import asyncio
import random
import ssl
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from mesh.resources import Resource
from proxy_core.snapshot import Snapshot
from tests.unit.conftest import Echo, closed_port
from tests.unit.test_compiler import FQDN, compile_checked
from tests.unit.test_compiler_gateways import gateway_doc, gateway_registry, listeners
from tests.unit.test_gateway_tls import gateway_snapshot, https_server, resolve, to
from tests.unit.test_proxy_server import curl
from tests.unit.test_tcp_proxy import closed_by_proxy, exchange, settled
from tests.unit.test_tls_passthrough import SServer, certs  # noqa: F401  (the certs fixture)
from tests.unit.test_tls_passthrough import client_hello
from tests.unit.test_tls_origination import Pki

pytestmark = pytest.mark.timeout(60)

PRODUCTPAGE = f"outbound|9080||{FQDN('productpage')}"
DETAILS = f"outbound|9080||{FQDN('details')}"
V1, V2 = f"outbound|9080|v1|{FQDN('reviews')}", f"outbound|9080|v2|{FQDN('reviews')}"


def passthrough_server(port: int, hosts: list[str], protocol: str = "TLS", name: str = "tls") -> dict[str, Any]:
    return {"port": {"number": port, "name": name, "protocol": protocol}, "hosts": hosts,
            "tls": {"mode": "PASSTHROUGH"}}


def tcp_server(port: int, name: str = "tcp") -> dict[str, Any]:
    return {"port": {"number": port, "name": name, "protocol": "TCP"}, "hosts": ["*"]}


def l4_vs(name: str, kind: str, rules: list[dict[str, Any]], hosts: list[str], gateways: list[str] | None = None
          ) -> Resource:
    spec: dict[str, Any] = {"hosts": hosts, kind: rules, "gateways": gateways or ["gw"]}
    return Resource.from_dict({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                               "metadata": {"name": name, "namespace": "default"}, "spec": spec})


def sni_rule(names: list[str], *destinations: tuple[str, int], **match: Any) -> dict[str, Any]:
    return {"match": [{"sniHosts": names, **match}],
            "route": [{"destination": {"host": host}, "weight": w} for host, w in destinations]}


def two_origins_vs(port: int) -> Resource:
    """a.example.com -> productpage, b.example.com -> details, on the passthrough server's port."""
    return l4_vs("sni", "tls", [sni_rule(["a.example.com"], ("productpage", 100), port=port),
                                sni_rule(["b.example.com"], ("details", 100))], hosts=["*.example.com"])


async def tls_peer(port: int, name: str, cafile: Path) -> tuple[str, bytes]:
    """A verified TLS connection through the gateway with SNI ``name``: (peer CN, response)."""
    ctx = ssl.create_default_context(cafile=str(cafile))
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port, ssl=ctx,
                                                                    server_hostname=name), 10)
    cert = writer.get_extra_info("peercert")
    writer.write(b"GET / HTTP/1.0\r\n\r\n")
    body = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    return next(v for rdn in cert["subject"] for k, v in rdn if k == "commonName"), body


def tcp_rows(p: Any) -> list[dict[str, Any]]:
    data, _ = p.tcp_telemetry.drain()
    return pa.ipc.open_stream(data).read_all().to_pylist() if data else []


# -- compiling -----------------------------------------------------------------------------------


def test_passthrough_servers_compile_the_bound_tls_rules_within_their_hosts() -> None:
    gw = gateway_doc("gw", [passthrough_server(9443, ["*.example.com"])])
    rules = l4_vs("sni", "tls", [
        sni_rule(["a.example.com"], ("productpage", 100), port=9443),
        sni_rule(["b.example.com", "other.org"], ("reviews", 100)),      # other.org: outside the server's hosts
        sni_rule(["c.example.com"], ("details", 100), gateways=["mesh"]),   # not for this gateway
        sni_rule(["d.example.com"], ("details", 100), port=1234),           # another port
        sni_rule(["*"], ("details", 100))], hosts=["*.example.com", "other.org"])
    unbound = l4_vs("elsewhere", "tls", [sni_rule(["e.example.com"], ("details", 100))], hosts=["e.example.com"],
                    gateways=["other-gw"])
    snap = compile_checked([gw, rules, unbound], gateway_registry())
    gl = listeners(snap)[9443]
    assert (gl["protocol"], gl["virtual_hosts"]) == ("tls", [])
    [server] = gl["servers"]
    assert server["name"] == "tls.9443.tls.gw.default" and server["tls"] == {"mode": "PASSTHROUGH"}
    assert [(r["name"], r["match"], [d["cluster"] for d in r["route"]]) for r in server["tls_routes"]] == [
        ("default/sni/0", [{"sni_hosts": ["a.example.com"]}], [PRODUCTPAGE]),
        ("default/sni/1", [{"sni_hosts": ["b.example.com"]}], [f"outbound|9080||{FQDN('reviews')}"]),
        ("default/sni/4", [{"sni_hosts": ["*.example.com"]}], [DETAILS])]   # ``*`` x the server's host
    assert server["server_names"] == ["a.example.com", "b.example.com", "*.example.com"]
    parsed = Snapshot.from_dict(snap).gateway
    assert parsed is not None
    chain = parsed.listeners[0].servers[0]
    assert chain.tls is None and chain.passthrough is not None
    assert chain.passthrough.route_for("b.example.com", "127.0.0.1").name == "default/sni/1"
    assert chain.passthrough.route_for("z.example.com", "127.0.0.1").name == "default/sni/4"
    assert chain.passthrough.route_for("z.example.org", "127.0.0.1") is None


def test_tcp_servers_compile_the_bound_tcp_rules_with_weights_and_idle_timeouts() -> None:
    gw = gateway_doc("gw", [tcp_server(9000), tcp_server(9001, name="tcp-other")])
    split = l4_vs("split", "tcp", [
        {"match": [{"port": 9001}], "route": [{"destination": {"host": "details"}}]},
        {"match": [{"port": 9000, "gateways": ["gw"]}, {"port": 9000, "sourceLabels": {"istio": "ingressgateway"}}],
         "route": [{"destination": {"host": "reviews", "subset": "v1"}, "weight": 80},
                   {"destination": {"host": "reviews", "subset": "v2"}, "weight": 20}]}], hosts=["*"])
    idle = Resource.from_dict({"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                               "metadata": {"name": "reviews-idle", "namespace": "default"},
                               "spec": {"host": "reviews", "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                                                       {"name": "v2", "labels": {"version": "v2"}}],
                                        "trafficPolicy": {"connectionPool": {"tcp": {"idleTimeout": "30s"}}}}})
    snap = compile_checked([gw, split, idle], gateway_registry())
    by_port = listeners(snap)
    assert by_port[9000]["protocol"] == "tcp"
    assert by_port[9000]["tcp_routes"] == [
        {"name": "default/split/1", "match": [{}, {"source_labels": {"istio": "ingressgateway"}}],
         "route": [{"cluster": V1, "weight": 80}, {"cluster": V2, "weight": 20}], "idle_timeout": 30.0}]
    assert [r["route"] for r in by_port[9001]["tcp_routes"]] == [[{"cluster": DETAILS, "weight": 100}]]


# -- TLS passthrough through the gateway ---------------------------------------------------------


async def origins(env, certs: Path) -> tuple[SServer, SServer]:
    a, b = env.track(SServer(certs, "a")), env.track(SServer(certs, "b"))
    await asyncio.gather(a.ready(), b.ready())
    return a, b


async def test_passthrough_routes_by_sni_to_each_origin_with_its_own_certificate(env, certs: Path) -> None:
    a, b = await origins(env, certs)
    port = closed_port()
    p = await env.proxy(gateway_snapshot([passthrough_server(port, ["*.example.com"])],
                                         {PRODUCTPAGE: a.port, DETAILS: b.port}, two_origins_vs(port)))
    assert p.gateway_ports() == {f"istio-ingressgateway:{port}": f"127.0.0.1:{port}"}
    for name, expected in (("a.example.com", "a.example.com"), ("b.example.com", "b.example.com"),
                           ("A.Example.COM", "a.example.com")):
        cn, body = await tls_peer(port, name, certs / "ca.pem")
        assert cn == expected and body.startswith(b"HTTP/1.0 200 ok")
    # openssl s_client: the origin's certificate verifies end to end (the gateway never decrypts).
    proc = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-connect", f"127.0.0.1:{port}", "-servername", "b.example.com",
        "-CAfile", str(certs / "ca.pem"), "-verify_return_error", "-brief", "-ign_eof",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(b"GET / HTTP/1.0\r\n\r\n"), 20)
    text = out.decode("latin-1")
    assert "Peer certificate: CN = b.example.com" in text and "Verification: OK" in text, text
    tcp = await settled(p)
    assert tcp["sni"] == {"a.example.com": 2, "b.example.com": 2}
    dests = tcp["destinations"]
    assert (dests[PRODUCTPAGE]["connections_opened"], dests[DETAILS]["connections_closed"]) == (2, 2)
    assert p.stats()["gateway_tls"] == {"handshakes": 0, "refused": {}}   # nothing terminated here
    rows = tcp_rows(p)
    assert {(r["source_workload"], r["source_workload_namespace"], r["destination_service"]) for r in rows} == {
        ("istio-ingressgateway", "istio-system", FQDN("productpage")),
        ("istio-ingressgateway", "istio-system", FQDN("details"))}
    assert sum(r["connections_closed"] for r in rows) == 4 and all(r["sent_bytes"] > 0 for r in rows)


async def test_passthrough_closes_unknown_sni_and_non_tls(env, certs: Path) -> None:
    a, b = await origins(env, certs)
    port = closed_port()
    p = await env.proxy(gateway_snapshot([passthrough_server(port, ["*.example.com"])],
                                         {PRODUCTPAGE: a.port, DETAILS: b.port}, two_origins_vs(port)))
    for name in ("c.example.com", "a.example.org"):
        with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
            await tls_peer(port, name, certs / "ca.pem")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: a.example.com\r\n\r\n")
    try:
        assert await asyncio.wait_for(reader.read(), 10) == b""
    except ConnectionResetError:
        pass
    writer.close()
    assert p.stats()["gateway_tls"]["refused"] == {"no_filter_chain": 3}
    assert (await settled(p))["destinations"] == {}


async def test_one_port_mixes_terminated_https_and_passthrough_servers(env, certs: Path, tmp_path: Path) -> None:
    a, _ = await origins(env, certs)
    up = await env.upstream(name="shop")
    pki = Pki(tmp_path)
    shop_cert = pki.issue("shop", "shop.example.com", ["shop.example.com"])
    port = closed_port()
    servers = [https_server(port, ["shop.example.com"], shop_cert, name="https"),
               passthrough_server(port, ["a.example.com"], protocol="HTTPS", name="https-pass")]
    pass_vs = l4_vs("pass", "tls", [sni_rule(["a.example.com"], ("productpage", 100))], hosts=["a.example.com"])
    p = await env.proxy(gateway_snapshot(servers, {PRODUCTPAGE: a.port, DETAILS: up.port}, pass_vs,
                                         to("details", "shop.example.com")))
    assert p.snapshot.gateway is not None and p.snapshot.gateway.listeners[0].protocol == "https"
    status, _, body, err = await curl("--cacert", pki.ca, *resolve("shop.example.com", port),
                                      f"https://shop.example.com:{port}/x")
    assert (status, body) == (200, b"shop"), err                     # terminated, routed over HTTP
    cn, body = await tls_peer(port, "a.example.com", certs / "ca.pem")
    assert cn == "a.example.com" and body.startswith(b"HTTP/1.0 200 ok")   # passed through
    assert p.stats()["gateway_tls"]["handshakes"] == 1


# -- TCP through the gateway ---------------------------------------------------------------------


def tcp_snapshot(port: int, upstreams: dict[str, int], *rules: dict[str, Any]) -> dict[str, Any]:
    return gateway_snapshot([tcp_server(port)], upstreams, l4_vs("db", "tcp", list(rules), hosts=["*"]))


def weighted(*destinations: tuple[str, int]) -> dict[str, Any]:
    return {"route": [{"destination": {"host": "reviews", "subset": s}, "weight": w} for s, w in destinations]}


async def test_tcp_server_splits_by_weight_with_half_close(env) -> None:
    v1, v2 = env.track(await Echo("v1").start()), env.track(await Echo("v2").start())
    port = closed_port()
    p = await env.proxy(tcp_snapshot(port, {V1: v1.port, V2: v2.port}, weighted(("v1", 50), ("v2", 50))),
                        rng=random.Random(3))
    replies = [await exchange(port, b"ping", "127.0.0.1") for _ in range(20)]
    assert set(replies) == {b"ping|v1", b"ping|v2"}        # the reply after our EOF: half-close went through
    # Both directions open: an echo comes back before we half-close.
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"hello")
    assert await asyncio.wait_for(reader.readexactly(5), 5) == b"hello"
    writer.write_eof()
    assert (await asyncio.wait_for(reader.read(), 5)) in (b"|v1", b"|v2")
    writer.close()
    tcp = await settled(p)
    assert tcp["destinations"][V1]["connections_closed"] + tcp["destinations"][V2]["connections_closed"] == 21
    rows = tcp_rows(p)
    assert {(r["source_workload"], r["destination_service"]) for r in rows} == {
        ("istio-ingressgateway", FQDN("reviews"))}
    assert sum(r["connections_closed"] for r in rows) == 21


async def test_tcp_server_idle_timeout_and_no_route(env) -> None:
    v1 = env.track(await Echo("v1").start())
    port = closed_port()
    snap = tcp_snapshot(port, {V1: v1.port}, weighted(("v1", 100)))
    snap["gateway"]["listeners"][0]["tcp_routes"][0]["idle_timeout"] = 0.3
    p = await env.proxy(snap)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"x")
    assert await asyncio.wait_for(reader.readexactly(1), 5) == b"x"
    assert await asyncio.wait_for(reader.read(), 5) == b""     # closed after 0.3 s without a byte
    writer.close()
    assert (await settled(p))["idle_timeouts"] == 1
    # No tcp rule for this port: every connection is closed (NR), nothing is dialled.
    other = closed_port()
    bare = gateway_snapshot([tcp_server(other)], {V1: v1.port})
    q = await env.proxy({**bare, "version": "bare"})
    before = v1.connections
    assert await closed_by_proxy(other, "127.0.0.1")
    assert (await settled(q))["response_flags"] == {"NR": 1} and v1.connections == before
    assert [(r["response_flags"], r["source_workload"]) for r in tcp_rows(q)] == [("NR", "istio-ingressgateway")]


async def test_passthrough_client_hello_is_spliced_byte_for_byte(env) -> None:
    one = env.track(await Echo("one").start())
    port = closed_port()
    vs = l4_vs("sni", "tls", [sni_rule(["w.example.com"], ("productpage", 100))], hosts=["*"])
    await env.proxy(gateway_snapshot([passthrough_server(port, ["*"])], {PRODUCTPAGE: one.port}, vs))
    hello = client_hello("w.example.com")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for i in range(0, len(hello), 100):          # the ClientHello in small pieces
        writer.write(hello[i:i + 100])
        await writer.drain()
    writer.write_eof()
    out = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert out == hello + b"|one"
