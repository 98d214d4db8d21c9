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
the error in ``gateway_errors``, as for a port it cannot bind.  A server with
``credential_name`` takes its certificate from the Secrets the supervisor pushed
(``GatewaySecrets``, Istio's SDS): a push rebuilds the contexts at once, so a rotated Secret
serves new handshakes without a new Gateway, and a Secret that is missing leaves the port
unbound the same way (Envoy serves no certificate there) until it arrives.

A ``PASSTHROUGH`` server is one more filter chain of its port, chosen by SNI the same way
(its names are those of its tls rules' ``sniHosts``): it has no context, and its connections
go, ClientHello and all, to a ``proxy_core.gateway_l4`` session that routes by those rules and
splices the bytes without decrypting them.  So one port mixes terminated and passthrough
servers as Envoy's filter chains do on one listener.
"""
from __future__ import annotations

import asyncio
import logging
import os
import ssl
import tempfile
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from proxy_core.gateway_l4 import GatewayTcpSession, pass_through
from proxy_core.mtls import HANDSHAKE_TIMEOUT, handshake_refusal
from proxy_core.mtls_inbound import HandshakeGate, layer_tls
from proxy_core.sni import MAX_CLIENT_HELLO, read_client_hello
from proxy_core.snapshot import CACERT_SUFFIX, GatewayListener, GatewayTls, GatewayTlsServer
from proxy_core.snapshot import SECRET_CA as CA
from proxy_core.snapshot import SECRET_CERT as CERT
from proxy_core.snapshot import SECRET_KEY as KEY
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


@dataclass(frozen=True, slots=True)
class GatewaySecrets:
    """The TLS Secrets of the gateway's namespace that the supervisor pushed (``gateway_secrets``
    on the control channel): name -> PEM text by key (``tls.crt``, ``tls.key``, ``ca.crt``).
    Only gateway nodes get them, and only those the snapshot's ``credential_name``s reach."""

    by_name: Mapping[str, Mapping[str, str]] = field(default_factory=dict)

    def material(self, tls: GatewayTls) -> tuple[str, str, str]:
        """(certificate chain, key, client CA or "") for a ``credential_name`` server.  As Istio:
        MUTUAL's CA is the Secret's ``ca.crt``, else ``ca.crt`` of the Secret ``<name>-cacert``."""
        name = tls.credential_name
        secret = self.by_name.get(name)
        if secret is None:
            raise GatewayTlsError(f"credentialName {name}: no Secret {name} in the gateway's namespace "
                                  f"(meshctl create secret tls {name} --cert FILE --key FILE -n istio-system)")
        if not secret.get(CERT) or not secret.get(KEY):
            raise GatewayTlsError(f"credentialName {name}: Secret {name} has no {CERT} and {KEY}")
        ca = ""
        if tls.mode != "SIMPLE":
            ca = secret.get(CA) or (self.by_name.get(name + CACERT_SUFFIX) or {}).get(CA) or ""
            if not ca:
                raise GatewayTlsError(f"credentialName {name}: {tls.mode} needs the client CA: {CA} in Secret "
                                      f"{name} or in Secret {name}{CACERT_SUFFIX}")
        return secret[CERT], secret[KEY], ca


NO_SECRETS = GatewaySecrets()


def build_chains(gl: GatewayListener, listener_for: Callable[[GatewayTlsServer], Any],
                 secrets: GatewaySecrets = NO_SECRETS) -> TlsChains:
    """Contexts for the TLS servers of ``gl`` (files read now, or ``secrets``; passthrough servers
    have none); the first server claiming a name keeps it.  Raises ``GatewayTlsError``."""
    exact: dict[str, TlsChain] = {}
    wildcard: dict[str, TlsChain] = {}
    catch_all: TlsChain | None = None
    for srv in gl.servers:
        chain = TlsChain(srv, server_context(srv.tls, secrets) if srv.tls is not None else None, listener_for(srv))
        if not srv.server_names and catch_all is None:
            catch_all = chain
        for name in srv.server_names:
            if name.startswith("*."):
                wildcard.setdefault(name[1:], chain)
            else:
                exact.setdefault(name, chain)
    return TlsChains(exact, wildcard, catch_all)


def server_context(tls: GatewayTls, secrets: GatewaySecrets = NO_SECRETS) -> ssl.SSLContext:
    """The ``SSLContext`` of one HTTPS server; raises ``GatewayTlsError`` naming the field."""
    material = secrets.material(tls) if tls.credential_name else None
    for name, path in (("serverCertificate", tls.server_certificate), ("privateKey", tls.private_key),
                       ("caCertificates", tls.ca_certificates)):
        if path and material is None:
            _readable(name, path)
    ctx = harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    try:
        ctx.minimum_version = _VERSIONS[tls.min_protocol_version or _DEFAULT_MIN]
        if tls.max_protocol_version:
            ctx.maximum_version = _VERSIONS[tls.max_protocol_version]
    except ValueError as exc:
        raise GatewayTlsError(f"minProtocolVersion/maxProtocolVersion: {exc}") from None
    _load_identity(ctx, tls, material)
    if tls.cipher_suites:
        try:
            ctx.set_ciphers(":".join(tls.cipher_suites))
        except ssl.SSLError as exc:
            raise GatewayTlsError(f"cipherSuites {list(tls.cipher_suites)}: {exc}") from None
    if tls.mode != "SIMPLE":
        try:
            if material is None:
                ctx.load_verify_locations(cafile=tls.ca_certificates)
            else:
                ctx.load_verify_locations(cadata=material[2])
        except ssl.SSLError as exc:
            where = f"caCertificates {tls.ca_certificates}" if material is None else \
                f"credentialName {tls.credential_name}: {CA}"
            raise GatewayTlsError(f"{where}: no certificate in it ({exc})") from None
        ctx.verify_mode = ssl.CERT_REQUIRED if tls.mode == "MUTUAL" else ssl.CERT_OPTIONAL
    ctx.set_alpn_protocols(ALPN)
    return ctx


def _load_identity(ctx: ssl.SSLContext, tls: GatewayTls, material: tuple[str, str, str] | None) -> None:
    """The server's certificate and key: from its files, or from its Secret's PEM."""
    try:
        if material is None:
            ctx.load_cert_chain(tls.server_certificate, tls.private_key)
        else:
            _load_pem_chain(ctx, material[0], material[1])
    except (ssl.SSLError, ValueError) as exc:
        where = (f"serverCertificate {tls.server_certificate} / privateKey {tls.private_key}" if material is None
                 else f"credentialName {tls.credential_name}: {CERT} / {KEY}")
        raise GatewayTlsError(f"{where}: not a certificate and its matching key ({exc})") from None


def _load_pem_chain(ctx: ssl.SSLContext, cert_pem: str, key_pem: str) -> None:
    """``ssl`` loads a certificate and key from files only: write them to a private directory
    (0700, files 0600, which ``mkdtemp`` and ``O_EXCL`` guarantee), load, and remove it."""
    with tempfile.TemporaryDirectory(prefix="raymesh-gateway-tls-") as private:
        paths = []
        for name, pem in ((CERT, cert_pem), (KEY, key_pem)):
            path = os.path.join(private, name)
            with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
                f.write(pem)
            paths.append(path)
        ctx.load_cert_chain(paths[0], paths[1])


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
