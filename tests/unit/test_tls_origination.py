"""DestinationRule ``tls`` SIMPLE and MUTUAL: the proxy originates TLS to a host outside the
mesh (a real TLS origin on loopback with its own test CA), checking the server the way
Envoy's SAN matcher does, and presenting a client certificate for MUTUAL."""
from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
import ssl
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from proxy_core.accesslog import AccessLog
from tests.unit.conftest import snapshot, vhost
from tests.unit.test_mtls import get

HOST = "api.example.test"
CL = f"outbound|443||{HOST}"


@dataclass(slots=True)
class Pki:
    """A CA and the files a DestinationRule names: caCertificates, clientCertificate, privateKey."""

    directory: Path
    ca_key: Any = field(default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))
    ca_cert: Any = None

    def __post_init__(self) -> None:
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "external test CA")])
        self.ca_cert = self._builder(name, name, self.ca_key.public_key()).add_extension(
            x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(self.ca_key, hashes.SHA256())
        self.write("ca.pem", self.ca_cert.public_bytes(serialization.Encoding.PEM))

    @staticmethod
    def _builder(subject: x509.Name, issuer: x509.Name, public: Any) -> x509.CertificateBuilder:
        now = datetime.now(timezone.utc)
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(public)
                .serial_number(x509.random_serial_number()).not_valid_before(now - timedelta(minutes=5))
                .not_valid_after(now + timedelta(hours=1)))

    def write(self, name: str, data: bytes) -> str:
        path = self.directory / name
        path.write_bytes(data)
        return str(path)

    def issue(self, prefix: str, cn: str, dns: list[str], uris: tuple[str, ...] = ()) -> tuple[str, str]:
        """A leaf signed by the CA, with DNS and URI SANs; (certificate path, key path)."""
        key = ec.generate_private_key(ec.SECP256R1())
        builder = self._builder(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]), self.ca_cert.subject,
                                key.public_key())
        sans: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
        sans += [x509.UniformResourceIdentifier(u) for u in uris]
        if sans:
            builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        cert = builder.sign(self.ca_key, hashes.SHA256())
        return (self.write(f"{prefix}.pem", cert.public_bytes(serialization.Encoding.PEM)),
                self.write(f"{prefix}-key.pem", key.private_bytes(serialization.Encoding.PEM,
                                                                  serialization.PrivateFormat.PKCS8,
                                                                  serialization.NoEncryption())))

    @property
    def ca(self) -> str:
        return str(self.directory / "ca.pem")


class TlsOrigin:
    """An HTTPS origin: answers every request with what it saw (SNI, client certificate CN), and
    keeps the ALPN protocol each connection selected from those it supports (``alpn``)."""

    def __init__(self, cert: tuple[str, str], client_ca: str | None = None,
                 alpn: tuple[str, ...] = ("h2", "http/1.1")) -> None:
        self.ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        self.ctx.load_cert_chain(*cert)
        if client_ca is not None:
            self.ctx.verify_mode = ssl.CERT_REQUIRED
            self.ctx.load_verify_locations(client_ca)
        self.ctx.sni_callback = self._sni
        self.ctx.set_alpn_protocols(list(alpn))
        self.snis: list[str | None] = []
        self.alpns: list[str | None] = []    # the ALPN protocol selected on each connection
        self.server: asyncio.Server | None = None
        self.port = 0

    def _sni(self, _obj: Any, name: str | None, _ctx: Any) -> None:
        self.snis.append(name)

    async def start(self) -> "TlsOrigin":
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ctx)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.alpns.append(writer.get_extra_info("ssl_object").selected_alpn_protocol())
        peer = writer.get_extra_info("peercert") or {}
        cn = next((v for rdn in peer.get("subject", ()) for k, v in rdn if k == "commonName"), "-")
        try:
            while True:
                await reader.readuntil(b"\r\n\r\n")
                body = json.dumps({"sni": self.snis[-1] if self.snis else None, "client": cn}).encode()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def egress_snapshot(port: int, tls: dict[str, Any]) -> dict[str, Any]:
    """A ServiceEntry host reached at 127.0.0.1:port, with the DestinationRule's tls."""
    c = {"service": HOST, "port": 443, "connect_timeout": 2.0, "lb": {"policy": "ROUND_ROBIN"},
         "endpoints": [{"address": "127.0.0.1", "port": port, "node": "n1"}], "tls": tls}
    return snapshot(vhosts=[vhost(HOST, 443, [{"name": "d", "route": [{"cluster": CL}]}])], clusters={CL: c})


async def origin(env, cert: tuple[str, str], client_ca: str | None = None) -> TlsOrigin:
    return env.track(await TlsOrigin(cert, client_ca).start())


def flags_of(sink: io.StringIO, log: AccessLog) -> list[str]:
    log.flush()
    return [json.loads(line)["response_flags"] for line in sink.getvalue().splitlines()]


async def test_simple_sends_the_sni_and_verifies_against_ca_certificates(env, pki) -> None:
    up = await origin(env, pki.issue("server", HOST, [HOST]))
    proxy = await env.proxy(egress_snapshot(up.port, {"mode": "SIMPLE", "sni": HOST, "ca_certificates": pki.ca,
                                                      "subject_alt_names": [HOST]}))
    [(status, body)] = await get(proxy.ports["http_proxy"], host=f"{HOST}:443")
    assert status == 200 and json.loads(body) == {"sni": HOST, "client": "-"}
    assert proxy.stats()["mtls"]["client_refused"] == {}
    assert up.alpns == ["http/1.1"]     # an HTTP/1.1 cluster offers http/1.1 only, though h2 was on offer
    assert proxy.stats()["mtls"]["client_alpn"] == {"http/1.1": 1}


async def test_simple_default_sni_is_the_endpoint_host_and_wildcards_match_one_label(env, pki) -> None:
    up = await origin(env, pki.issue("server", "wild", ["*.example.test"]))
    proxy = await env.proxy(egress_snapshot(up.port, {"mode": "SIMPLE", "sni": HOST, "ca_certificates": pki.ca}))
    [(status, _)] = await get(proxy.ports["http_proxy"], host=f"{HOST}:443")
    assert status == 200      # no subjectAltNames: the SNI must match, and *.example.test covers it


async def test_subject_alt_name_mismatch_is_refused_503_uf_with_a_log(env, pki, caplog) -> None:
    up = await origin(env, pki.issue("server", "other", ["other.example.test"]))
    sink = io.StringIO()
    log = AccessLog(sink)
    proxy = await env.proxy(egress_snapshot(up.port, {"mode": "SIMPLE", "sni": HOST, "ca_certificates": pki.ca,
                                                      "subject_alt_names": [HOST]}), log)
    with caplog.at_level(logging.WARNING, logger="proxy_core.mtls"):
        [(status, _)] = await get(proxy.ports["http_proxy"], host=f"{HOST}:443")
    assert status == 503 and flags_of(sink, log) == ["UF"]
    assert proxy.stats()["mtls"]["client_refused"] == {"subject_alt_name_mismatch": 1}
    message = caplog.records[0].getMessage()
    assert "subject_alt_name_mismatch" in message and "other.example.test" in message and HOST in message


async def test_a_server_outside_the_ca_certificates_fails_the_handshake(env, pki, tmp_path) -> None:
    (tmp_path / "stranger").mkdir()
    stranger = Pki(tmp_path / "stranger")
    up = await origin(env, stranger.issue("server", HOST, [HOST]))
    proxy = await env.proxy(egress_snapshot(up.port, {"mode": "SIMPLE", "sni": HOST, "ca_certificates": pki.ca}))
    [(status, _)] = await get(proxy.ports["http_proxy"], host=f"{HOST}:443")
    assert status == 503 and proxy.stats()["mtls"]["client_refused"].get("handshake_failed", 0) >= 1


async def test_mutual_presents_the_client_certificate(env, pki) -> None:
    up = await origin(env, pki.issue("server", HOST, [HOST]), client_ca=pki.ca)
    cert, key = pki.issue("client", "egress-client", [])
    proxy = await env.proxy(egress_snapshot(up.port, {"mode": "MUTUAL", "sni": HOST, "ca_certificates": pki.ca,
                                                      "client_certificate": cert, "private_key": key}))
    [(status, body)] = await get(proxy.ports["http_proxy"], host=f"{HOST}:443")
    assert status == 200 and json.loads(body) == {"sni": HOST, "client": "egress-client"}


async def test_simple_to_an_origin_requiring_a_client_certificate_is_refused(env, pki) -> None:
    up = await origin(env, pki.issue("server", HOST, [HOST]), client_ca=pki.ca)
    proxy = await env.proxy(egress_snapshot(up.port, {"mode": "SIMPLE", "sni": HOST, "ca_certificates": pki.ca}))
    [(status, _)] = await get(proxy.ports["http_proxy"], host=f"{HOST}:443")
    assert status == 503


async def test_openssl_s_server_origin(env, pki, tmp_path) -> None:
    """The same SIMPLE origination against OpenSSL's own server (``-www`` answers a status page)."""
    cert, key = pki.issue("server", HOST, [HOST])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = await asyncio.create_subprocess_exec(
        "openssl", "s_server", "-accept", f"127.0.0.1:{port}", "-cert", cert, "-key", key, "-www", "-naccept", "4",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
    try:
        for _ in range(100):
            try:
                _, w = await asyncio.open_connection("127.0.0.1", port)
                w.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        proxy = await env.proxy(egress_snapshot(port, {"mode": "SIMPLE", "sni": HOST, "ca_certificates": pki.ca,
                                                       "subject_alt_names": [HOST]}))
        reader, writer = await asyncio.open_connection("127.0.0.1", proxy.ports["http_proxy"])
        writer.write(f"GET / HTTP/1.1\r\nHost: {HOST}:443\r\n\r\n".encode())
        out = await asyncio.wait_for(reader.read(65536), 10)
        writer.close()
        assert out.startswith(b"HTTP/1.0 200 ok") or out.startswith(b"HTTP/1.1 200"), out[:200]
        assert b"TLSv1.3" in out or b"TLSv1.2" in out
    finally:
        proc.kill()
        await proc.wait()
