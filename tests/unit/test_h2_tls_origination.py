"""HTTP/2 over TLS with ALPN where the proxy originates TLS (DestinationRule ``tls`` SIMPLE /
MUTUAL on an HTTP/2 cluster): a grpcio client calls the proxy's VIP in cleartext (prior
knowledge) and the proxy reaches a grpcio server over TLS, offering ALPN ``h2`` and checking
the server's certificate and its ALPN answer (``stats()["mtls"]["client_alpn"]`` counts what
each originated handshake selected; grpcio's server also drops a TLS connection without
``h2``)."""
from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.grpc_echo import EchoServer, method
from tests.unit.conftest import snapshot, vhost
from tests.unit.test_http2_grpc import proxy_with_log
from tests.unit.test_tls_origination import Pki, TlsOrigin

pytestmark = pytest.mark.timeout(60)

HOST = "grpc.example.test"
CL = f"outbound|443||{HOST}"
VIP = "127.79.0.9"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def tls_echo(pki: Pki, names: list[str], client_ca: bool = False) -> EchoServer:
    """A grpcio ``EchoServer`` over TLS with a certificate for ``names`` from ``pki``."""
    cert, key = pki.issue("grpc-server", names[0], names)
    creds = grpc.ssl_server_credentials([(Path(key).read_bytes(), Path(cert).read_bytes())],
                                        root_certificates=Path(pki.ca).read_bytes() if client_ca else None,
                                        require_client_auth=client_ca)
    return EchoServer(credentials=creds)


def h2_egress(port: int, tls: dict[str, Any]) -> dict[str, Any]:
    """A ServiceEntry host with port protocol GRPC at 127.0.0.1:port, its DestinationRule's tls,
    and a VIP for the client to call in cleartext."""
    c = {"service": HOST, "port": 443, "connect_timeout": 2.0, "lb": {"policy": "ROUND_ROBIN"}, "protocol": "grpc",
         "endpoints": [{"address": "127.0.0.1", "port": port, "node": "n1"}], "tls": tls}
    return snapshot(vips=[{"address": VIP, "port": 443, "host": HOST, "protocol": "grpc"}],
                    vhosts=[vhost(HOST, 443, [{"name": "r", "route": [{"cluster": CL, "weight": 100}]}])],
                    clusters={CL: c})


def target(p: Any) -> str:
    return f"{VIP}:{p.vip_ports()[f'{VIP}:443']}"


def unary_and_stream(addr: str) -> dict[str, Any]:
    with grpc.insecure_channel(addr) as ch:
        reply, call = method(ch, "unary_unary", "Unary").with_call(b"hello", timeout=5)
        stream = method(ch, "unary_stream", "ServerStream")(b"3", timeout=5)
        parts = list(stream)
        return {"unary": reply, "unary_trailers": dict(call.trailing_metadata()), "parts": parts,
                "stream_trailers": dict(stream.trailing_metadata())}


def failing_call(addr: str) -> grpc.StatusCode:
    with grpc.insecure_channel(addr) as ch:
        with pytest.raises(grpc.RpcError) as info:
            method(ch, "unary_unary", "Unary")(b"hello", timeout=5)
        return info.value.code()


async def test_simple_tls_with_alpn_h2_carries_unary_and_streaming_grpc_with_trailers(env, pki) -> None:
    server = env.track(tls_echo(pki, [HOST]).start())
    p, lines, log = await proxy_with_log(env, h2_egress(server.port, {
        "mode": "SIMPLE", "sni": HOST, "ca_certificates": pki.ca, "subject_alt_names": [HOST]}))
    out = await asyncio.to_thread(unary_and_stream, target(p))
    assert out["unary"] == b"olleh" and out["unary_trailers"]["x-echo-trailer"] == "t-5"
    assert out["parts"] == [b"part-0", b"part-1", b"part-2"] and out["stream_trailers"]["x-parts"] == "3"
    log.flush()
    assert [(x["path"], x["grpc_status"], x["response_code"], x["response_flags"]) for x in lines.lines] == [
        ("/test.Echo/Unary", 0, 200, "-"), ("/test.Echo/ServerStream", 0, 200, "-")]
    stats = p.stats()
    assert stats["upstream_h2"]["connects"] == 1 and stats["mtls"]["client_refused"] == {}
    assert stats["mtls"]["client_alpn"] == {"h2": 1}


async def test_mutual_tls_with_alpn_h2_presents_the_client_certificate(env, pki) -> None:
    server = env.track(tls_echo(pki, [HOST], client_ca=True).start())
    cert, key = pki.issue("client", "egress-client", [])
    p, _, _ = await proxy_with_log(env, h2_egress(server.port, {
        "mode": "MUTUAL", "sni": HOST, "ca_certificates": pki.ca, "client_certificate": cert, "private_key": key}))
    out = await asyncio.to_thread(unary_and_stream, target(p))
    assert out["unary"] == b"olleh" and out["stream_trailers"]["x-parts"] == "3"
    assert p.stats()["mtls"]["client_alpn"] == {"h2": 1}


async def test_server_certificate_outside_subject_alt_names_is_refused_503_uf(env, pki, caplog) -> None:
    server = env.track(tls_echo(pki, ["other.example.test"]).start())
    p, lines, log = await proxy_with_log(env, h2_egress(server.port, {
        "mode": "SIMPLE", "sni": HOST, "ca_certificates": pki.ca, "subject_alt_names": [HOST]}))
    with caplog.at_level(logging.WARNING, logger="proxy_core.mtls"):
        code = await asyncio.to_thread(failing_call, target(p))
    assert code == grpc.StatusCode.UNAVAILABLE
    log.flush()
    assert [(x["response_code"], x["response_flags"]) for x in lines.lines] == [(503, "UF")]
    assert p.stats()["mtls"]["client_refused"] == {"subject_alt_name_mismatch": 1}
    assert server.service.calls == {}
    assert any("other.example.test" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("server_alpn", [("http/1.1",), ()], ids=["http1-only", "no-alpn"])
async def test_a_server_that_does_not_select_h2_is_refused_503_uf(env, pki, caplog, server_alpn) -> None:
    """An origin that answers without ``h2`` (HTTP/1.1 only, or no ALPN at all) never receives
    HTTP/2 frames: the connection is refused before any request is written."""
    up = env.track(await TlsOrigin(pki.issue("server", HOST, [HOST]), alpn=server_alpn).start())
    p, lines, log = await proxy_with_log(env, h2_egress(up.port, {
        "mode": "SIMPLE", "sni": HOST, "ca_certificates": pki.ca, "subject_alt_names": [HOST]}))
    with caplog.at_level(logging.WARNING, logger="proxy_core.mtls"):
        code = await asyncio.to_thread(failing_call, target(p))
    assert code == grpc.StatusCode.UNAVAILABLE
    log.flush()
    assert [(x["response_code"], x["response_flags"]) for x in lines.lines] == [(503, "UF")]
    assert p.stats()["mtls"]["client_refused"] == {"alpn_mismatch": 1}
    assert p.stats()["mtls"]["client_alpn"] == {"none": 1}
    assert any("selected ALPN nothing, not h2" in r.getMessage() for r in caplog.records)
