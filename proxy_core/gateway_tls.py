"""HTTPS at the ingress gateway: TLS terminated per Gateway server, chosen by SNI.

Istio turns each HTTPS server of a Gateway port into one Envoy filter chain whose
``server_names`` are the server's hosts, with its own certificate, client-certificate
policy, TLS versions and ciphers, and its own route configuration.  Envoy reads the
ClientHello first (``tls_inspector``) and picks the chain before any handshake starts, so
every TLS setting is the chosen server's.  The gateway does the same: ``GatewaySniffer``
reads the ClientHello (``proxy_core.sni``), ``TlsChains.choose`` picks the server (exact
name, then the longest ``*.suffix``, then a server with host ``*``), and TLS runs with that
server's ``SSLContext`` (``proxy_core.mtls_inbound.layer_tls``).  ``SSLContext.sni_callback``
cannot do this: switching the context there swaps the certificate only, while the
client-certificate requirement, versions and ciphers stay those of the first context.

A ClientHello no server's names cover (or none at all, or not TLS) is refused by closing
the connection, as Envoy does when no filter chain matches; clients see a handshake
failure.  Once the handshake is done, ``subjectAltNames`` (MUTUAL) is checked against the
client certificate's SANs (Envoy's ``match_subject_alt_names``), and the decrypted stream
goes to ``ProtocolSniffer`` with the listener of that server, so HTTP/1.1 and h2 (offered by
ALPN: ``h2``, ``http/1.1``) are served exactly as on a plain gateway port, routed by that
server's virtual hosts.  The client certificate's URI SAN becomes the connection's peer
principal (access logs' ``downstream_peer_uri_san``).

Contexts are built when a snapshot is swapped in (``build_chains``): certificate files are
read then, and any file that is missing or unreadable, or a key that does not match, raises
``GatewayTlsError`` naming the field and path; the server leaves that port unbound and shows
the error in ``gateway_errors``, as for a port it cannot bind.

A ``PASSTHROUGH`` server is one more filter chain of its port, chosen by SNI the same way
(its names are those of its tls rules' ``sniHosts``): it has no context, and its connections
go, ClientHello and all, to a ``proxy_core.gateway_l4`` session that routes by those rules and
splices the bytes without decrypting them.  So one port mixes terminated and passthrough
servers as Envoy's filter chains do on one listener.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

from proxy_core.gateway_l4 import GatewayTcpSession, pass_through
from proxy_core.mtls import HANDSHAKE_TIMEOUT, handshake_refusal
from proxy_core.mtls_inbound import HandshakeGate, layer_tls
from proxy_core.sni import MAX_CLIENT_HELLO, read_client_hello
from proxy_core.snapshot import GatewayListener, GatewayTls, GatewayTlsServer
from proxy_core.sniff import ProtocolSniffer
from proxy_core.tls_session import TlsWrap, harden

log = logging.getLogger("proxy_core.gateway_tls")

ALPN = ["h2", "http/1.1"]
NO_FILTER_CHAIN = "no_filter_chain"          # no server covers the SNI (or the bytes are not TLS)
SAN_MISMATCH = "subject_alt_name_mismatch"   # the client certificate has none of subjectAltNames
_VERSIONS = {"TLSV1_0": ssl.TLSVersion.TLSv1, "TLSV1_1": ssl.TLSVersion.TLSv1_1,
             "TLSV1_2": ssl.TLSVersion.TLSv1_2, "TLSV1_3": ssl.TLSVersion.TLSv1_3}
_DEFAULT_MIN = "TLSV1_2"                     # Envoy's default for downstream TLS


class GatewayTlsError(Exception):
    """An HTTPS server's TLS settings cannot be loaded (the message names the field)."""


@dataclass(slots=True)
class GatewayTlsStats:
    """Handshakes completed and connections refused (by reason) on HTTPS gateway ports."""

    handshakes: int = 0
    refused: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {"handshakes": self.handshakes, "refused": dict(self.refused)}


@dataclass(frozen=True, slots=True)
class TlsChain:
    """One TLS server ready to serve: its context (None: passthrough), and the listener its
    connections carry (the port's name, this server's routes, scheme ``https``)."""

    server: GatewayTlsServer
    context: ssl.SSLContext | None
    listener: Any


@dataclass(frozen=True, slots=True)
class TlsChains:
    """The HTTPS servers of one port, indexed as Envoy matches ``server_names``."""

    exact: dict[str, TlsChain]
    wildcard: dict[str, TlsChain]     # by suffix with its dot: ".example.com" for *.example.com
    any: TlsChain | None

    def choose(self, sni: str | None) -> TlsChain | None:
        """The chain for ``sni``: exact name, then the longest wildcard, then a server for any name."""
        if sni:
            name = sni.lower().rstrip(".")
            chain = self.exact.get(name)
            if chain is not None:
                return chain
            dot = name.find(".")
            while dot >= 0:
                chain = self.wildcard.get(name[dot:])
                if chain is not None:
                    return chain
                dot = name.find(".", dot + 1)
        return self.any


def build_chains(gl: GatewayListener, listener_for: Callable[[GatewayTlsServer], Any]) -> TlsChains:
    """Contexts for the TLS servers of ``gl`` (files read now; passthrough servers have none);
    the first server claiming a name keeps it.  Raises ``GatewayTlsError``."""
    exact: dict[str, TlsChain] = {}
    wildcard: dict[str, TlsChain] = {}
    catch_all: TlsChain | None = None
    for srv in gl.servers:
        chain = TlsChain(srv, server_context(srv.tls) if srv.tls is not None else None, listener_for(srv))
        if not srv.server_names and catch_all is None:
            catch_all = chain
        for name in srv.server_names:
            if name.startswith("*."):
                wildcard.setdefault(name[1:], chain)
            else:
                exact.setdefault(name, chain)
    return TlsChains(exact, wildcard, catch_all)


def server_context(tls: GatewayTls) -> ssl.SSLContext:
    """The ``SSLContext`` of one HTTPS server; raises ``GatewayTlsError`` naming the field."""
    for name, path in (("serverCertificate", tls.server_certificate), ("privateKey", tls.private_key),
                       ("caCertificates", tls.ca_certificates)):
        if path:
            _readable(name, path)
    ctx = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    try:
        ctx.minimum_version = _VERSIONS[tls.min_protocol_version or _DEFAULT_MIN]
        if tls.max_protocol_version:
            ctx.maximum_version = _VERSIONS[tls.max_protocol_version]
    except ValueError as exc:
        raise GatewayTlsError(f"minProtocolVersion/maxProtocolVersion: {exc}") from None
    try:
        ctx.load_cert_chain(tls.server_certificate, tls.private_key)
    except (ssl.SSLError, ValueError) as exc:
        raise GatewayTlsError(f"serverCertificate {tls.server_certificate} / privateKey {tls.private_key}: "
                              f"not a certificate and its matching key ({exc})") from None
    if tls.cipher_suites:
        try:
            ctx.set_ciphers(":".join(tls.cipher_suites))
        except ssl.SSLError as exc:
            raise GatewayTlsError(f"cipherSuites {list(tls.cipher_suites)}: {exc}") from None
    if tls.mode != "SIMPLE":
        try:
            ctx.load_verify_locations(cafile=tls.ca_certificates)
        except ssl.SSLError as exc:
            raise GatewayTlsError(f"caCertificates {tls.ca_certificates}: no certificate in it ({exc})") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.mode == "MUTUAL" else ssl.CERT_OPTIONAL
    ctx.set_alpn_protocols(ALPN)
    return ctx


def _readable(name: str, path: str) -> None:
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise GatewayTlsError(f"{name} {path}: {exc.strerror or exc}") from None


def gateway_protocol(server: Any, spec: Any) -> asyncio.Protocol:
    """The first protocol of a connection accepted on gateway port ``spec`` (as of now: a swap
    may change it): the ClientHello first on a TLS port, a spliced session on a TCP port,
    else HTTP at once."""
    if spec.tls is not None:
        return GatewaySniffer(server, spec)
    if spec.tcp is not None:
        return GatewayTcpSession(server, spec)
    return ProtocolSniffer(server, spec)


class GatewaySniffer(asyncio.Protocol):
    """Reads a ClientHello, picks the TLS server by its SNI, and starts TLS with that server's
    context, or hands a passthrough server's connection to its L4 session."""

    __slots__ = ("server", "spec", "transport", "seen", "timer")

    def __init__(self, server: Any, spec: Any) -> None:
        self.server = server
        self.spec = spec
        self.transport: asyncio.Transport | None = None
        self.seen = b""
        self.timer: asyncio.TimerHandle | None = None   # for the ClientHello to complete

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.timer = asyncio.get_running_loop().call_later(HANDSHAKE_TIMEOUT, self._refuse, "handshake_timeout")

    def data_received(self, data: bytes) -> None:
        seen = self.seen = self.seen + data
        hello = read_client_hello(seen)
        if not hello.complete and len(seen) <= MAX_CLIENT_HELLO + 4096:
            return
        chains = self.spec.tls
        chain = chains.choose(hello.sni) if hello.tls and chains is not None else None
        if chain is None:
            log.debug("gateway %s: no HTTPS server for SNI %r", self.spec.name, hello.sni)
            self._refuse(NO_FILTER_CHAIN)
            return
        self._cancel_timer()
        self.seen = b""
        assert self.transport is not None
        if chain.context is None:   # PASSTHROUGH: spliced untouched, routed by its tls rules
            pass_through(self.server, chain.listener, chain.server.passthrough, self.transport, seen)
            return
        layer_tls(self.transport, TlsWrap(chain.context), _Gate(self.server, chain), seen, self._handshake_done)

    def _handshake_done(self, waiter: asyncio.Future[Any]) -> None:
        if waiter.cancelled():
            return
        exc = waiter.exception()
        if exc is not None:
            self.server.gateway_tls.refused[handshake_refusal(exc)] += 1
            log.debug("gateway %s: TLS handshake failed: %s", self.spec.name, exc)

    def _refuse(self, reason: str) -> None:
        self._cancel_timer()
        self.server.gateway_tls.refused[reason] += 1
        if self.transport is not None:
            self.transport.abort()

    def _cancel_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()


class _Gate(HandshakeGate):
    """The gateway's gate: checks the client's SANs, then hands the decrypted stream to the
    HTTP drivers."""

    __slots__ = ("server", "chain")

    def __init__(self, server: Any, chain: TlsChain) -> None:
        self.server = server
        self.chain = chain

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        cert = ssl_object.getpeercert() if ssl_object is not None else None
        sans = [(kind, str(value)) for kind, value in (cert or {}).get("subjectAltName", ())]
        wanted = self.chain.server.tls.subject_alt_names
        if wanted and cert and not any(value in wanted for _, value in sans):
            self.server.gateway_tls.refused[SAN_MISMATCH] += 1
            log.debug("gateway client certificate SANs %s are none of %s", sans, list(wanted))
            transport.abort()
            return
        self.server.gateway_tls.handshakes += 1
        uri = next((value for kind, value in sans if kind == "URI"), None)
        sniffer = ProtocolSniffer(self.server, self.chain.listener,
                                  uri.removeprefix("spiffe://") if uri is not None else None)
        transport.set_protocol(sniffer)  # type: ignore[attr-defined]
        sniffer.connection_made(transport)
