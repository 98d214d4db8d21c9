"""TLS passthrough: SNI read from real ClientHellos (sans-IO), and the proxy routing TLS by SNI
to ``openssl s_server`` origins, with python ``ssl`` and ``openssl s_client`` clients."""
from __future__ import annotations

import asyncio
import random
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from mesh.compiler import compile_snapshot
from mesh.loader import Document
from mesh.registry import NodeInfo, RegistryState
from mesh.validation import to_resources
from proxy_core.sni import NEED_MORE, NOT_TLS, ClientHello, read_client_hello
from proxy_core.server import ProxyServer
from proxy_core.snapshot import Snapshot
from proxy_core.source_identity import UNIDENTIFIED, SourceWorkload
from tests.unit.conftest import Echo, closed_port, cluster, snapshot

pytestmark = pytest.mark.timeout(60)

WEB = "web.default.svc.cluster.local"
A, B = f"outbound|443|a|{WEB}", f"outbound|443|b|{WEB}"
VIP = "127.79.0.1"


# -- ClientHello bytes ---------------------------------------------------------------------------


def client_hello(server_name: str | None, alpn: list[str] | None = None) -> bytes:
    """The first flight of a real TLS client (Python's ssl over memory BIOs)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    conn = ctx.wrap_bio(incoming, outgoing, server_hostname=server_name)
    with pytest.raises(ssl.SSLWantReadError):
        conn.do_handshake()
    return outgoing.read()


def split_records(hello: bytes, at: int) -> bytes:
    """The same handshake message carried in two TLS records, cut ``at`` bytes into it."""
    header, body = hello[:5], hello[5:]
    first, second = body[:at], body[at:]
    return (header[:3] + len(first).to_bytes(2, "big") + first + header[:3] + len(second).to_bytes(2, "big")
            + second)


def test_sni_from_a_real_client_hello_fed_byte_by_byte() -> None:
    hello = client_hello("API.Example.com")
    for i in range(len(hello)):
        assert read_client_hello(hello[:i]) == NEED_MORE
    assert read_client_hello(hello) == ClientHello(True, True, "api.example.com")
    assert read_client_hello(hello + b"trailing") == ClientHello(True, True, "api.example.com")


def test_client_hello_over_two_records_and_without_sni() -> None:
    hello = client_hello("b.example.com")
    two = split_records(hello, 40)
    assert read_client_hello(two[:60]) == NEED_MORE
    assert read_client_hello(two) == ClientHello(True, True, "b.example.com")
    assert read_client_hello(client_hello(None)) == ClientHello(True, True, None)


def test_alpn_protocols_from_a_real_client_hello() -> None:
    hello = client_hello("x.svid.mesh", ["istio", "h2", "http/1.1"])
    for i in range(len(hello)):
        assert read_client_hello(hello[:i]) == NEED_MORE
    assert read_client_hello(hello) == ClientHello(True, True, "x.svid.mesh", ("istio", "h2", "http/1.1"))
    assert read_client_hello(split_records(hello, 100)).alpn == ("istio", "h2", "http/1.1")
    assert read_client_hello(client_hello(None, ["istio"])) == ClientHello(True, True, None, ("istio",))
    assert read_client_hello(client_hello("a.example")).alpn == ()


def test_a_truncated_alpn_list_keeps_the_whole_names_before_the_cut() -> None:
    from proxy_core.sni import _protocols
    assert _protocols(b"\x00\x0c\x05istio\x02h2\x03htt") == ("istio", "h2")   # the last name runs past the end
    assert _protocols(b"\x00\x03\x05istio") == ()                       # list length shorter than the name
    assert _protocols(b"") == ()


@pytest.mark.parametrize("data", [b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00",
                                  b"\x17\x03\x03\x00\x10" + b"x" * 16, b"\x16\x03\x01\x00\x00"])
def test_anything_else_is_not_tls(data: bytes) -> None:
    assert read_client_hello(data) == NOT_TLS


# -- the proxy ---------------------------------------------------------------------------------


def web_snapshot(routes: list[dict[str, Any]], clusters: dict[str, Any], protocol: str = "tls") -> dict[str, Any]:
    snap = snapshot(vips=[{"address": VIP, "port": 0, "host": WEB, "protocol": protocol}], clusters=clusters)
    snap["tls_routes"] = [{"name": f"{WEB}:0", "host": WEB, "port": 0, "routes": routes}]
    return snap


def sni_route(name: str, hosts: list[str], *weighted: tuple[str, int], **match: Any) -> dict[str, Any]:
    return {"name": name, "match": [{"sni_hosts": hosts, **match}],
            "route": [{"cluster": c, "weight": w} for c, w in weighted]}


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Self-signed certificates for a.example.com and b.example.com, and a bundle trusting both."""
    d = tmp_path_factory.mktemp("certs")
    for name in ("a", "b"):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
                        "-days", "1", "-subj", f"/CN={name}.example.com",
                        "-addext", f"subjectAltName=DNS:{name}.example.com",
                        "-keyout", str(d / f"{name}.key"), "-out", str(d / f"{name}.pem")],
                       check=True, capture_output=True, timeout=30)
    (d / "ca.pem").write_bytes((d / "a.pem").read_bytes() + (d / "b.pem").read_bytes())
    return d


class SServer:
    """``openssl s_server -www`` on a free loopback port, serving one name's certificate."""

    def __init__(self, certs: Path, name: str) -> None:
        self.port = closed_port()
        self.proc = subprocess.Popen(["openssl", "s_server", "-accept", f"127.0.0.1:{self.port}",
                                      "-cert", str(certs / f"{name}.pem"), "-key", str(certs / f"{name}.key"),
                                      "-www", "-quiet"],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def ready(self) -> "SServer":
        for _ in range(250):
            try:
                _, w = await asyncio.open_connection("127.0.0.1", self.port)
                w.close()
                return self
            except OSError:
                await asyncio.sleep(0.02)
        raise AssertionError("openssl s_server did not start")

    async def close(self) -> None:
        self.proc.terminate()
        await asyncio.to_thread(self.proc.wait, 10)


async def https_get(port: int, name: str, certs: Path) -> tuple[str, bytes]:
    """A verified TLS connection to the VIP with SNI ``name``: (peer certificate CN, response)."""
    ctx = ssl.create_default_context(cafile=str(certs / "ca.pem"))
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(VIP, port, ssl=ctx, server_hostname=name), 10)
    cert = writer.get_extra_info("peercert")
    writer.write(b"GET / HTTP/1.0\r\n\r\n")
    body = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    cn = next(v for rdn in cert["subject"] for k, v in rdn if k == "commonName")
    return cn, body


async def origins(env, certs: Path) -> tuple[SServer, SServer]:
    a = env.track(SServer(certs, "a"))
    b = env.track(SServer(certs, "b"))
    await asyncio.gather(a.ready(), b.ready())
    return a, b


async def test_two_sni_names_reach_two_origins(env, certs: Path) -> None:
    a, b = await origins(env, certs)
    p = await env.proxy(web_snapshot([sni_route("to-a", ["a.example.com"], (A, 100)),
                                      sni_route("to-b", ["*.example.com"], (B, 100))],
                                     {A: cluster(a.port), B: cluster(b.port)}))
    port = p.vip_ports()[f"{VIP}:0"]
    for name, expected in (("a.example.com", "a.example.com"), ("b.example.com", "b.example.com"),
                           ("A.Example.COM", "a.example.com")):
        cn, body = await https_get(port, name, certs)
        assert cn == expected and body.startswith(b"HTTP/1.0 200 ok")
    stats = await settled(p)
    assert stats["destinations"][A]["connections_opened"] == 2 and stats["destinations"][B]["connections_opened"] == 1
    assert stats["sni"] == {"a.example.com": 2, "b.example.com": 1}


async def test_openssl_s_client_through_the_proxy(env, certs: Path) -> None:
    a, b = await origins(env, certs)
    p = await env.proxy(web_snapshot([sni_route("to-a", ["a.example.com"], (A, 100)),
                                      sni_route("to-b", ["b.example.com"], (B, 100))],
                                     {A: cluster(a.port), B: cluster(b.port)}, protocol="https"))
    port = p.vip_ports()[f"{VIP}:0"]
    proc = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-connect", f"{VIP}:{port}", "-servername", "b.example.com",
        "-CAfile", str(certs / "ca.pem"), "-verify_return_error", "-brief", "-ign_eof",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(b"GET / HTTP/1.0\r\n\r\n"), 20)
    text = out.decode("latin-1")
    assert "Peer certificate: CN = b.example.com" in text and "Verification: OK" in text, text
    assert "HTTP/1.0 200 ok" in text


async def test_unknown_sni_and_no_tls_take_the_catch_all_or_are_closed(env, certs: Path) -> None:
    a, b = await origins(env, certs)
    clusters = {A: cluster(a.port), B: cluster(b.port)}
    only_a = await env.proxy(web_snapshot([sni_route("to-a", ["a.example.com"], (A, 100))], clusters))
    port = only_a.vip_ports()[f"{VIP}:0"]
    with pytest.raises((ConnectionError, ssl.SSLError, asyncio.IncompleteReadError)):
        await https_get(port, "b.example.com", certs)       # no route: closed (NR)
    stats = await settled(only_a)
    assert stats["response_flags"] == {"NR": 1}
    fallback = await env.proxy(web_snapshot([sni_route("to-a", ["a.example.com"], (A, 100)),
                                             {"name": "default", "match": [], "route": [{"cluster": B}]}], clusters))
    port = fallback.vip_ports()[f"{VIP}:0"]
    assert (await https_get(port, "b.example.com", certs))[0] == "b.example.com"


async def test_weighted_destinations_and_bytes_spliced_untouched(env) -> None:
    one, two = env.track(await Echo("one").start()), env.track(await Echo("two").start())
    p = await env.proxy(web_snapshot([sni_route("split", ["w.example.com"], (A, 50), (B, 50))],
                                     {A: cluster(one.port), B: cluster(two.port)}), rng=random.Random(7))
    port = p.vip_ports()[f"{VIP}:0"]
    hello = client_hello("w.example.com")
    seen = set()
    for _ in range(24):
        reader, writer = await asyncio.open_connection(VIP, port)
        for i in range(0, len(hello), 100):          # the ClientHello in small pieces
            writer.write(hello[i:i + 100])
            await writer.drain()
        writer.write_eof()
        out = await asyncio.wait_for(reader.read(), 10)
        writer.close()
        assert out[:len(hello)] == hello             # the origin got the handshake byte for byte
        seen.add(out[len(hello):])
    assert seen == {b"|one", b"|two"}


async def test_client_that_never_finishes_its_hello_is_closed(env, monkeypatch: pytest.MonkeyPatch) -> None:
    from proxy_core import tcp
    monkeypatch.setattr(tcp, "HELLO_TIMEOUT", 0.3)
    echo = env.track(await Echo().start())
    p = await env.proxy(web_snapshot([sni_route("r", ["a.example.com"], (A, 100))], {A: cluster(echo.port)}))
    port = p.vip_ports()[f"{VIP}:0"]
    reader, writer = await asyncio.open_connection(VIP, port)
    writer.write(client_hello("a.example.com")[:20])
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert (await settled(p))["hello_timeouts"] == 1 and echo.connections == 0


async def settled(p: ProxyServer) -> dict[str, Any]:
    for _ in range(100):
        if not p.tcp.sessions:
            break
        await asyncio.sleep(0.02)
    return p.stats()["tcp"]


# -- compiling VirtualService tls rules ----------------------------------------------------------


def test_virtual_service_tls_rules_compile_per_port_with_a_default() -> None:
    text = """
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: web, namespace: default}
spec:
  hosts: [web.example.com, "*.web.example.com"]
  ports: [{number: 443, name: tls, protocol: TLS}, {number: 8443, name: https, protocol: HTTPS},
          {number: 80, name: http, protocol: HTTP}]
  resolution: STATIC
  endpoints: [{address: 127.0.0.9, labels: {v: a}}, {address: 127.0.0.10, labels: {v: b}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: web, namespace: default}
spec:
  host: web.example.com
  subsets: [{name: a, labels: {v: a}}, {name: b, labels: {v: b}}]
  trafficPolicy: {connectionPool: {tcp: {idleTimeout: 30s}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: web, namespace: default}
spec:
  hosts: [web.example.com, "*.web.example.com"]
  tls:
  - match: [{sniHosts: [a.web.example.com], port: 443, destinationSubnets: [127.10.0.0/16]},
            {sniHosts: [b.web.example.com], sourceLabels: {app: x}}]
    route:
    - {destination: {host: web.example.com, subset: a}, weight: 80}
    - {destination: {host: web.example.com, subset: b}, weight: 20}
  - match: [{sniHosts: ["*.web.example.com"], port: 8443}]
    route: [{destination: {host: web.example.com, subset: b, port: {number: 8443}}}]
"""
    docs = [Document("web.yaml", i, body) for i, body in enumerate(yaml.safe_load_all(text))]
    snap = compile_snapshot(to_resources(docs), RegistryState(nodes={"n": NodeInfo("n", "127.0.0.1")}), "n")
    by_port = {t["port"]: t for t in snap["tls_routes"] if t["host"] == "web.example.com"}
    assert sorted(by_port) == [443, 8443]                 # not the HTTP port
    assert by_port[443]["routes"] == [
        {"name": "default/web/0", "match": [{"sni_hosts": ["a.web.example.com"],
                                             "destination_subnets": ["127.10.0.0/16"]},
                                            {"sni_hosts": ["b.web.example.com"], "source_labels": {"app": "x"}}],
         "route": [{"cluster": "outbound|443|a|web.example.com", "weight": 80},
                   {"cluster": "outbound|443|b|web.example.com", "weight": 20}], "idle_timeout": 30.0},
        {"name": "default", "match": [], "route": [{"cluster": "outbound|443||web.example.com", "weight": 100}],
         "idle_timeout": 30.0}]
    # The portless source match of rule 0 applies to 8443 as well.
    assert [r["name"] for r in by_port[8443]["routes"]] == ["default/web/0", "default/web/1", "default"]
    assert by_port[8443]["routes"][0]["match"] == [{"sni_hosts": ["b.web.example.com"], "source_labels": {"app": "x"}}]
    assert by_port[8443]["routes"][1]["match"] == [{"sni_hosts": ["*.web.example.com"]}]
    # The source condition holds only for a client workload labelled app=x.
    tls_host = Snapshot.from_dict(snap).tls_routes[("web.example.com", 443)]
    x = SourceWorkload.registered("spiffe://cluster.local/ns/default/sa/x", "x", "default", {"app": "x"})
    assert tls_host.uses_source
    assert tls_host.route_for("b.web.example.com", "127.30.0.1", x) is tls_host.routes[0]
    assert tls_host.route_for("b.web.example.com", "127.30.0.1", UNIDENTIFIED) is tls_host.routes[1]
    assert tls_host.route_for("b.web.example.com", "127.30.0.1") is tls_host.routes[1]
