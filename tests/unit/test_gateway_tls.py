"""HTTPS at the ingress gateway: Gateway servers with tls SIMPLE / MUTUAL terminated in the
proxy, chosen by SNI, and httpsRedirect on HTTP servers.

Real sockets and real clients: a test CA and server / client certificates made with
``cryptography`` (``Pki``), curl with ``--cacert`` and ``--resolve``, Python's ``ssl`` for what
curl does not show (the certificate each SNI gets, the ALPN protocol selected).  Snapshots are
compiled from Gateway and VirtualService resources, so compiler and proxy are tested together."""
from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import socket
import ssl
from pathlib import Path
from typing import Any

import pytest

from mesh.compiler import compile_snapshot
from mesh.resources import Resource
from proxy_core.accesslog import AccessLog
from proxy_core.gateway_tls import NO_FILTER_CHAIN, SAN_MISMATCH, GatewayTlsError, build_chains, server_context
from proxy_core.snapshot import GatewayListener, GatewayTls
from tests.unit.conftest import closed_port
from tests.unit.test_compiler import DESTINATION_RULE_ALL, FQDN, NODE_A, load, vs_doc
from tests.unit.test_compiler_gateways import gateway_doc, gateway_registry
from tests.unit.test_proxy_server import curl
from tests.unit.test_tls_origination import Pki

pytestmark = pytest.mark.timeout(60)

PRODUCTPAGE = f"outbound|9080||{FQDN('productpage')}"
DETAILS = f"outbound|9080||{FQDN('details')}"
CLIENT_URI = "spiffe://client.example/ns/outside/sa/shopper"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def https_server(port: int, hosts: list[str], cert: tuple[str, str], *, name: str = "https", mode: str = "SIMPLE",
                 **tls: Any) -> dict[str, Any]:
    return {"port": {"number": port, "name": name, "protocol": "HTTPS"}, "hosts": hosts,
            "tls": {"mode": mode, "serverCertificate": cert[0], "privateKey": cert[1], **tls}}


def to(service: str, host: str, name: str | None = None) -> Resource:
    """A VirtualService binding ``host`` on the Gateway ``gw`` to ``service``."""
    return vs_doc(host, [{"route": [{"destination": {"host": service}}]}], name=name, hosts=[host], gateways=["gw"])


def gateway_snapshot(servers: list[dict[str, Any]], upstreams: dict[str, int], *bound: Resource) -> dict[str, Any]:
    """Node A's snapshot for Gateway ``gw`` with ``servers``; cluster -> the upstream's port."""
    resources = [gateway_doc("gw", servers), *bound, *load(DESTINATION_RULE_ALL)]
    snap = compile_snapshot(resources, gateway_registry(), NODE_A, http_proxy_port=0, inbound_port=0)
    snap["listeners"]["inbound"]["port"] = 0
    for name, up_port in upstreams.items():
        snap["clusters"][name]["endpoints"] = [{"address": "127.0.0.1", "port": up_port, "node": NODE_A, "via": None}]
    snap["vips"] = []
    return snap


def resolve(host: str, port: int) -> tuple[str, str]:
    return ("--resolve", f"{host}:{port}:127.0.0.1")


def handshake(port: int, sni: str | None, cafile: str, alpn: list[str] | None = None,
              client: tuple[str, str] | None = None) -> tuple[dict[str, Any], str | None]:
    """A TLS handshake with the gateway: (the server certificate it presented, the ALPN selected)."""
    ctx = ssl.create_default_context(cafile=cafile)
    ctx.check_hostname = False
    if alpn:
        ctx.set_alpn_protocols(alpn)
    if client:
        ctx.load_cert_chain(*client)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        with ctx.wrap_socket(raw, server_hostname=sni) as tls:
            return tls.getpeercert(), tls.selected_alpn_protocol()


def dns_names(cert: dict[str, Any]) -> list[str]:
    return [value for kind, value in cert.get("subjectAltName", ()) if kind == "DNS"]


def log_lines(p: Any, sink: io.StringIO) -> list[dict[str, Any]]:
    p.access_log.flush()
    return [json.loads(line) for line in sink.getvalue().splitlines()]


async def test_simple_https_over_http1_and_h2_with_curl(env, pki) -> None:
    up = await env.upstream(name="productpage")
    port = closed_port()
    cert = pki.issue("shop", "shop.example.com", ["shop.example.com"])
    sink = io.StringIO()
    p = await env.proxy(gateway_snapshot([https_server(port, ["shop.example.com"], cert)], {PRODUCTPAGE: up.port},
                                         to("productpage", "shop.example.com")), AccessLog(sink))
    assert p.gateway_ports() == {f"istio-ingressgateway:{port}": f"127.0.0.1:{port}"}
    url = f"https://shop.example.com:{port}/productpage?x=1"
    status, _, body, err = await curl("--cacert", pki.ca, *resolve("shop.example.com", port), "--http1.1", url)
    assert (status, body) == (200, b"productpage"), err
    status, _, body, err = await curl("--cacert", pki.ca, *resolve("shop.example.com", port), "--http2", url)
    assert (status, body) == (200, b"productpage"), err
    assert [(s.target, s.headers["x-forwarded-proto"]) for s in up.seen] == [("/productpage?x=1", "https")] * 2
    lines = log_lines(p, sink)
    assert [(x["protocol"], x["response_code"], x["listener"], x["downstream_peer_uri_san"]) for x in lines] == [
        ("HTTP/1.1", 200, f"istio-ingressgateway:{port}", None), ("HTTP/2", 200, f"istio-ingressgateway:{port}", None)]
    assert p.stats()["gateway_tls"] == {"handshakes": 2, "refused": {}}
    # A Host no VirtualService of this server names: 404 NR, as on a plain gateway port.
    status, _, _, err = await curl("--cacert", pki.ca, *resolve("shop.example.com", port),
                                   "-H", "Host: other.example.com", url)
    assert status == 404, err


async def test_alpn_offers_h2_then_http1_and_h2_is_served_on_it(env, pki) -> None:
    up = await env.upstream(name="productpage")
    port = closed_port()
    cert = pki.issue("shop", "shop.example.com", ["shop.example.com"])
    await env.proxy(gateway_snapshot([https_server(port, ["*"], cert)], {PRODUCTPAGE: up.port},
                                     to("productpage", "*")))
    assert (await asyncio.to_thread(handshake, port, "shop.example.com", pki.ca, ["h2", "http/1.1"]))[1] == "h2"
    assert (await asyncio.to_thread(handshake, port, "shop.example.com", pki.ca, ["http/1.1"]))[1] == "http/1.1"
    assert (await asyncio.to_thread(handshake, port, "shop.example.com", pki.ca))[1] is None
    # Without ALPN the decrypted bytes are sniffed: h2 with prior knowledge still works.
    status, _, body, err = await curl("--cacert", pki.ca, *resolve("shop.example.com", port),
                                      "--http2-prior-knowledge", f"https://shop.example.com:{port}/productpage")
    assert (status, body) == (200, b"productpage"), err


async def test_two_servers_on_one_port_are_chosen_by_sni_each_with_its_certificate_and_routes(env, pki) -> None:
    shop_up, api_up = await env.upstream(name="productpage"), await env.upstream(name="details")
    port = closed_port()
    shop = pki.issue("shop", "shop.example.com", ["shop.example.com"])
    api = pki.issue("api", "api.example.org", ["*.example.org"])
    servers = [https_server(port, ["shop.example.com"], shop, name="https-shop"),
               https_server(port, ["*.example.org"], api, name="https-api")]
    # Each server routes only by the VirtualServices bound to its own hosts.
    p = await env.proxy(gateway_snapshot(servers, {PRODUCTPAGE: shop_up.port, DETAILS: api_up.port},
                                         to("productpage", "shop.example.com"), to("details", "*.example.org")))
    for host, body in (("shop.example.com", b"productpage"), ("v1.example.org", b"details")):
        status, _, got, err = await curl("--cacert", pki.ca, *resolve(host, port), f"https://{host}:{port}/")
        assert (status, got) == (200, body), err
    cert, _ = await asyncio.to_thread(handshake, port, "shop.example.com", pki.ca)
    assert dns_names(cert) == ["shop.example.com"]
    cert, _ = await asyncio.to_thread(handshake, port, "deep.v1.example.org", pki.ca)
    assert dns_names(cert) == ["*.example.org"]
    # The shop server's connection does not route the api server's hosts.
    status, _, _, err = await curl("--cacert", pki.ca, *resolve("shop.example.com", port),
                                   "-H", "Host: v1.example.org", f"https://shop.example.com:{port}/")
    assert status == 404, err
    # A name no server covers (and no SNI at all): no filter chain, the connection is closed.
    for sni in ("nothing.example.net", None):
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await asyncio.to_thread(handshake, port, sni, pki.ca)
    assert p.stats()["gateway_tls"]["refused"] == {NO_FILTER_CHAIN: 2}
    assert len(shop_up.seen) == 1 and len(api_up.seen) == 1


async def test_mutual_requires_a_client_certificate_from_the_ca_and_logs_its_uri_san(env, pki, tmp_path) -> None:
    up = await env.upstream(name="productpage")
    port = closed_port()
    cert = pki.issue("shop", "shop.example.com", ["shop.example.com"])
    client = pki.issue("client", "shopper", [], uris=(CLIENT_URI,))
    sink = io.StringIO()
    p = await env.proxy(gateway_snapshot([https_server(port, ["shop.example.com"], cert, mode="MUTUAL",
                                                       caCertificates=pki.ca)],
                                         {PRODUCTPAGE: up.port}, to("productpage", "shop.example.com")),
                        AccessLog(sink))
    url = f"https://shop.example.com:{port}/productpage"
    args = ("--cacert", pki.ca, *resolve("shop.example.com", port))
    status, _, body, err = await curl(*args, "--cert", client[0], "--key", client[1], url)
    assert (status, body) == (200, b"productpage"), err
    [line] = log_lines(p, sink)
    assert line["downstream_peer_uri_san"] == CLIENT_URI.removeprefix("spiffe://")
    # Without a client certificate, or with one from another CA: refused, nothing forwarded.
    status, _, _, err = await curl(*args, url)
    assert status == 0 and err, err
    (tmp_path / "other").mkdir()
    foreign = Pki(tmp_path / "other").issue("foreign", "shopper", [], uris=(CLIENT_URI,))
    status, _, _, err = await curl(*args, "--cert", foreign[0], "--key", foreign[1], url)
    assert status == 0 and err, err
    assert len(up.seen) == 1
    refused = p.stats()["gateway_tls"]["refused"]
    assert sum(refused.values()) == 2 and NO_FILTER_CHAIN not in refused, refused


async def test_mutual_subject_alt_names_and_tls_versions(env, pki) -> None:
    up = await env.upstream(name="productpage")
    port = closed_port()
    cert = pki.issue("shop", "shop.example.com", ["shop.example.com"])
    client = pki.issue("client", "shopper", [], uris=(CLIENT_URI,))
    other = pki.issue("other", "intruder", ["intruder.example.com"])
    server = https_server(port, ["*"], cert, mode="MUTUAL", caCertificates=pki.ca, subjectAltNames=[CLIENT_URI],
                          minProtocolVersion="TLSV1_3")
    p = await env.proxy(gateway_snapshot([server], {PRODUCTPAGE: up.port}, to("productpage", "*")))
    args = ("--cacert", pki.ca, *resolve("shop.example.com", port))
    url = f"https://shop.example.com:{port}/productpage"
    status, _, _, err = await curl(*args, "--cert", client[0], "--key", client[1], url)
    assert status == 200, err
    status, _, _, err = await curl(*args, "--cert", other[0], "--key", other[1], url)
    assert status == 0, err
    assert p.stats()["gateway_tls"]["refused"] == {SAN_MISMATCH: 1}
    # minProtocolVersion TLSV1_3: a TLS 1.2 client is refused in the handshake.
    status, _, _, err = await curl(*args, "--cert", client[0], "--key", client[1], "--tls-max", "1.2", url)
    assert status == 0 and "(35)" in err, err   # a TLS connect error
    assert len(up.seen) == 1


async def test_https_redirect_answers_301_to_https_keeping_path_and_query(env, pki) -> None:
    up = await env.upstream(name="productpage")
    port = closed_port()
    plain = {"port": {"number": port, "name": "http", "protocol": "HTTP"},
             "hosts": ["shop.example.com", "*.example.org"], "tls": {"httpsRedirect": True}}
    await env.proxy(gateway_snapshot([plain], {PRODUCTPAGE: up.port}, to("productpage", "shop.example.com")))
    for host in ("shop.example.com", "v1.example.org"):   # bound by a VirtualService, or only a server host
        status, headers, _, err = await curl(*resolve(host, port), f"http://{host}:{port}/productpage?a=1&b=2")
        assert (status, headers.get("location")) == (301, f"https://{host}:{port}/productpage?a=1&b=2"), err
    status, _, _, err = await curl(*resolve("else.example.net", port), f"http://else.example.net:{port}/")
    assert status == 404, err
    assert up.seen == []


async def test_unreadable_certificate_leaves_that_port_unbound_and_the_rest_served(env, pki, tmp_path) -> None:
    up = await env.upstream(name="productpage")
    http_port, https_port = closed_port(), closed_port()
    cert = pki.issue("shop", "shop.example.com", ["shop.example.com"])
    missing = str(tmp_path / "not-yet.pem")
    servers = [{"port": {"number": http_port, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]},
               https_server(https_port, ["*"], (missing, cert[1]))]
    snap = gateway_snapshot(servers, {PRODUCTPAGE: up.port}, to("productpage", "*"))
    p = await env.proxy(snap)
    assert p.gateway_ports() == {f"istio-ingressgateway:{http_port}": f"127.0.0.1:{http_port}"}
    assert p.stats()["gateway_errors"] == {
        f"istio-ingressgateway:{https_port}": f"127.0.0.1:{https_port}: serverCertificate {missing}: "
                                              "No such file or directory"}
    assert p.snapshot.version == snap["version"]
    status, _, _, err = await curl(f"http://127.0.0.1:{http_port}/productpage")
    assert status == 200, err
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", https_port)
    # Once the file is there, the next push binds the port; a key that does not match unbinds it again.
    Path(missing).write_bytes(Path(cert[0]).read_bytes())
    await p.swap(type(p.snapshot).from_dict({**snap, "version": "files-in-place"}))
    assert p.stats()["gateway_errors"] == {}
    status, _, _, err = await curl("--cacert", pki.ca, *resolve("shop.example.com", https_port),
                                   f"https://shop.example.com:{https_port}/productpage")
    assert status == 200, err
    wrong_key = pki.issue("wrong", "wrong", ["wrong.example.com"])[1]
    bad = gateway_snapshot([servers[0], https_server(https_port, ["*"], (cert[0], wrong_key))],
                           {PRODUCTPAGE: up.port}, to("productpage", "*"))
    await p.swap(type(p.snapshot).from_dict({**bad, "version": "wrong-key"}))
    [error] = p.stats()["gateway_errors"].values()
    assert error.startswith(f"127.0.0.1:{https_port}: serverCertificate {cert[0]} / privateKey {wrong_key}: ")
    with pytest.raises(OSError):
        await asyncio.open_connection("127.0.0.1", https_port)
    assert (await curl(f"http://127.0.0.1:{http_port}/productpage"))[0] == 200


async def test_a_port_turning_from_http_to_https_serves_tls_on_the_same_socket(env, pki) -> None:
    up = await env.upstream(name="productpage")
    port = closed_port()
    cert = pki.issue("shop", "shop.example.com", ["shop.example.com"])
    plain = gateway_snapshot([{"port": {"number": port, "name": "http", "protocol": "HTTP"}, "hosts": ["*"]}],
                             {PRODUCTPAGE: up.port}, to("productpage", "*"))
    p = await env.proxy(plain)
    assert (await curl(f"http://127.0.0.1:{port}/productpage"))[0] == 200
    tls = gateway_snapshot([https_server(port, ["*"], cert)], {PRODUCTPAGE: up.port}, to("productpage", "*"))
    await p.swap(type(p.snapshot).from_dict({**tls, "version": "tls"}))
    status, _, _, err = await curl("--cacert", pki.ca, *resolve("shop.example.com", port),
                                   f"https://shop.example.com:{port}/productpage")
    assert status == 200, err
    assert (await curl(f"http://127.0.0.1:{port}/productpage"))[0] == 0   # plaintext: no filter chain


def test_sni_picks_the_exact_name_then_the_longest_wildcard_then_the_server_for_any_name(pki) -> None:
    cert = pki.issue("any", "any", ["any.example.com"])
    tls = {"mode": "SIMPLE", "server_certificate": cert[0], "private_key": cert[1]}
    listener = GatewayListener.from_dict({"name": "gw:443", "port": 443, "servers": [
        {"name": name, "server_names": names, "tls": tls} for name, names in (
            ("exact", ["a.example.com"]), ("short", ["*.example.com"]), ("long", ["*.b.example.com", "*.c.d"]),
            ("any", []), ("later-any", []), ("dup", ["a.example.com"]))]})
    chains = build_chains(listener, lambda srv: srv.name)
    picks = {sni: chains.choose(sni).listener for sni in (  # type: ignore[union-attr]
        "a.example.com", "A.Example.COM.", "x.example.com", "x.b.example.com", "b.example.com", "y.x.c.d",
        "example.com", "c.d", None, "")}
    assert picks == {"a.example.com": "exact", "A.Example.COM.": "exact", "x.example.com": "short",
                     "x.b.example.com": "long", "b.example.com": "short", "y.x.c.d": "long",
                     "example.com": "any", "c.d": "any", None: "any", "": "any"}
    without_any = GatewayListener.from_dict({"name": "gw:443", "port": 443, "servers": [
        {"name": "exact", "server_names": ["a.example.com"], "tls": tls}]})
    assert build_chains(without_any, lambda srv: srv.name).choose("b.example.com") is None


def test_snapshot_refuses_tls_settings_it_cannot_serve() -> None:
    base = {"mode": "SIMPLE", "server_certificate": "/c", "private_key": "/k"}
    for bad, message in (({"mode": "PASSTHROUGH"}, "gateway tls mode 'PASSTHROUGH'"),
                         ({"mode": "MUTUAL"}, "MUTUAL needs ca_certificates"),
                         ({"min_protocol_version": "SSLV3"}, "min_protocol_version 'SSLV3'")):
        with pytest.raises(ValueError, match=message):
            GatewayTls.from_dict({**base, **bad})


def test_bad_cipher_suites_and_ca_files_name_the_field(pki) -> None:
    cert = pki.issue("shop", "shop", ["shop.example.com"])
    simple = GatewayTls.from_dict({"mode": "SIMPLE", "server_certificate": cert[0], "private_key": cert[1]})
    with pytest.raises(GatewayTlsError, match=r"^cipherSuites \['NO-SUCH-CIPHER'\]: "):
        server_context(dataclasses.replace(simple, cipher_suites=("NO-SUCH-CIPHER",)))
    with pytest.raises(GatewayTlsError, match=rf"^caCertificates {cert[1]}: no certificate in it"):
        server_context(dataclasses.replace(simple, mode="MUTUAL", ca_certificates=cert[1]))
    with pytest.raises(GatewayTlsError, match=r"^privateKey /nowhere/key.pem: No such file or directory$"):
        server_context(dataclasses.replace(simple, private_key="/nowhere/key.pem"))
