"""Mutual TLS between node proxies: the node's SVIDs, TLS contexts, peer checks and counters.

The proxy never talks to Citadel: its supervisor (``actors.proxy_worker``) generates a key per
local workload identity, has Citadel sign it, renews it at half-life, and pushes the
material over the control channel (``{"op": "credentials", ...}``, see ``Credentials``).
Each push builds fresh ``ssl.SSLContext`` objects and swaps them in at once: handshakes
from then on use the new certificates, established connections (and pooled tunnels) keep
theirs, so a rotation drops nothing.  The trust bundle holds every root the trust domain
accepts, the old and the new one during a root rotation.

Who is who on a node-to-node hop:

* the client side presents the SVID of the *source* workload (found per downstream
  connection, ``proxy_core.source_identity``) and checks that the server presents the
  destination endpoint's identity (its namespace and service account from the snapshot);
* the server side (the inbound listener, ``proxy_core.mtls_inbound``) presents the SVID of
  the destination workload named by the client's SNI (``sni_for``), requires a client
  certificate that chains to the bundle, and takes the peer's SPIFFE id from it.

SVIDs are found by SNI because one node proxy serves many identities; the SNI is a digest of
the SPIFFE id, so it is a valid DNS name whatever the namespace and service account hold.

Byte tunnels (TCP sessions, TLS passthrough, ``CONNECT``) offer the ALPN protocol ``istio``,
as Istio's sidecars do for TCP over mesh mTLS, from a sibling client context per source (ALPN
is a context option); the inbound side selects it, and both ends then run the tunnel over
``proxy_core.tls_stream``, which carries half-close.  HTTP tunnels offer nothing and keep the
event loop's TLS transport.
"""
from __future__ import annotations

import hashlib
import os
import ssl
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

from cryptography import x509

from proxy_core.snapshot import Endpoint, Snapshot
from proxy_core.source_identity import UNIDENTIFIED, SourceResolver, SourceWorkload
from proxy_core.tls_session import SessionCache, harden

TLS_HANDSHAKE_BYTE = 0x16      # first byte of a TLS record carrying a ClientHello
SNI_SUFFIX = ".svid.mesh"
HANDSHAKE_TIMEOUT = 10.0
PEER_CACHE_SIZE = 1024         # parsed peer certificates kept (cleared when full)

# Refusal reasons, as counted in ``stats()["mtls"]["refused"]``.
PLAINTEXT = "plaintext"                         # STRICT destination, no TLS
NO_CLIENT_CERT = "no_client_certificate"
EXPIRED = "expired_certificate"
UNTRUSTED = "untrusted_certificate"             # does not chain to the trust bundle
BAD_IDENTITY = "bad_identity"                   # not one SPIFFE id of the trust domain
NO_SERVER_CERT = "no_server_certificate"        # this node holds no SVID to present
HANDSHAKE_FAILED = "handshake_failed"

ALPN_ISTIO = "istio"           # what a byte tunnel offers (Istio's ALPN for TCP over mesh mTLS)


class PeerRejected(Exception):
    """A peer certificate was refused; ``reason`` is one of the counted reasons."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason


def sni_for(spiffe_id: str) -> str:
    """The SNI a client sends to reach the inbound proxy as the workload ``spiffe_id``."""
    return hashlib.sha256(spiffe_id.encode()).hexdigest()[:32] + SNI_SUFFIX


def spiffe_id_of(ns: str, sa: str, trust_domain: str) -> str:
    return f"spiffe://{trust_domain}/ns/{ns}/sa/{sa}"


@dataclass(frozen=True, slots=True)
class Svid:
    spiffe_id: str
    cert_chain: tuple[str, ...]     # PEM, leaf first
    key: str                        # PEM (PKCS#8); stays in this process's memory
    expires: float = 0.0            # epoch seconds, for status


@dataclass(frozen=True, slots=True)
class Credentials:
    """What the supervisor pushes: the bundle, this node's SVIDs and its workload processes.

    Wire form (msgpack over the control channel)::

        {"op": "credentials", "trust_domain": "cluster.local", "roots": [PEM, ...],
         "svids": [{"spiffe_id": "spiffe://...", "cert_chain": [PEM, ...], "key": PEM, "expires": ts}],
         "workloads": [[pid, "spiffe://...", {"service": "sleep", "namespace": "default",
                                               "labels": {"app": "sleep", "version": "v1"}}], ...]}

    The registration (third item) is optional: it names the workload in telemetry.
    """

    trust_domain: str
    roots: tuple[str, ...]
    svids: tuple[Svid, ...]
    pids: Mapping[int, SourceWorkload] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Credentials":
        roots = tuple(d.get("roots") or ())
        if not roots:
            raise ValueError("credentials need at least one trust root")
        svids = tuple(Svid(s["spiffe_id"], tuple(s["cert_chain"]), s["key"], float(s.get("expires") or 0.0))
                      for s in d.get("svids") or ())
        pids = dict(SourceWorkload.from_push(item) for item in d.get("workloads") or ())
        return cls(str(d["trust_domain"]), roots, svids, pids)


def _load_chain(ctx: ssl.SSLContext, svid: Svid, directory: str) -> None:
    """``load_cert_chain`` reads files only: write them into a private directory, load, remove."""
    cert_path, key_path = os.path.join(directory, "chain.pem"), os.path.join(directory, "key.pem")
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(svid.key)
        with open(cert_path, "w") as f:
            f.write("".join(svid.cert_chain))
        ctx.load_cert_chain(cert_path, key_path)
    finally:
        for path in (cert_path, key_path):
            if os.path.exists(path):
                os.unlink(path)


def _context(purpose: int, bundle: str, svid: Svid | None, directory: str, alpn: str | None = None) -> ssl.SSLContext:
    """A mesh context; ``alpn``: offered by a client, selected when offered by a server."""
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = False            # peers are named by URI SAN, checked after the handshake
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=bundle)
    if svid is not None:
        _load_chain(ctx, svid, directory)
    if alpn is not None:
        ctx.set_alpn_protocols([alpn])
    return harden(ctx)


@dataclass(frozen=True, slots=True)
class _Material:
    """The contexts of one credentials push; replaced as a whole."""

    trust_domain: str
    client: Mapping[str, ssl.SSLContext]          # by source SPIFFE id
    client_stream: Mapping[str, ssl.SSLContext]   # the same, offering ALPN istio (byte tunnels)
    server: ssl.SSLContext | None                 # entry context: SNI picks the identity
    server_by_sni: Mapping[str, ssl.SSLContext]
    expires: Mapping[str, float]

    @classmethod
    def build(cls, creds: Credentials) -> "_Material":
        bundle = "".join(creds.roots)
        client: dict[str, ssl.SSLContext] = {}
        client_stream: dict[str, ssl.SSLContext] = {}
        by_sni: dict[str, ssl.SSLContext] = {}
        with tempfile.TemporaryDirectory(prefix="raymesh-svid-") as directory:
            for svid in creds.svids:
                client[svid.spiffe_id] = _context(ssl.PROTOCOL_TLS_CLIENT, bundle, svid, directory)
                client_stream[svid.spiffe_id] = _context(ssl.PROTOCOL_TLS_CLIENT, bundle, svid, directory, ALPN_ISTIO)
                by_sni[sni_for(svid.spiffe_id)] = _context(ssl.PROTOCOL_TLS_SERVER, bundle, svid, directory,
                                                           ALPN_ISTIO)
        server = None
        if by_sni:
            default = by_sni[min(by_sni)]

            def pick(sslobj: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
                chosen = by_sni.get(name or "")
                if chosen is not None and chosen is not default:
                    sslobj.context = chosen

            default.sni_callback = pick
            server = default
        return cls(creds.trust_domain, client, client_stream, server, by_sni,
                   {s.spiffe_id: s.expires for s in creds.svids})


def _verify_code_reason(exc: BaseException) -> str:
    if isinstance(exc, ssl.SSLCertVerificationError):
        if exc.verify_code in (9, 10):            # X509_V_ERR_CERT_NOT_YET_VALID / CERT_HAS_EXPIRED
            return EXPIRED
        return UNTRUSTED
    if isinstance(exc, ssl.SSLError):
        if exc.reason == "PEER_DID_NOT_RETURN_A_CERTIFICATE":
            return NO_CLIENT_CERT
        if exc.reason in ("CERTIFICATE_VERIFY_FAILED", "TLSV1_ALERT_UNKNOWN_CA"):
            return UNTRUSTED
        if exc.reason in ("SSLV3_ALERT_CERTIFICATE_EXPIRED",):
            return EXPIRED
    return HANDSHAKE_FAILED


def handshake_refusal(exc: BaseException) -> str:
    """The counted reason for a failed TLS handshake."""
    return _verify_code_reason(exc)


def peer_spiffe_id(der: bytes | None, trust_domain: str) -> str:
    """The SPIFFE id of a verified peer certificate; raises ``PeerRejected`` unless it carries
    exactly one URI SAN, ``spiffe://<trust_domain>/ns/<ns>/sa/<sa>``, and is not a CA."""
    return _peer(der, trust_domain)[0]


def svid_facts(cert: x509.Certificate) -> tuple[bool, list[str]]:
    """What an X509-SVID check reads first: whether ``cert`` is a CA, and its URI SANs."""
    try:
        is_ca = bool(cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca)
    except x509.ExtensionNotFound:
        is_ca = False
    try:
        uris = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
            x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    return is_ca, uris


def _peer(der: bytes | None, trust_domain: str) -> tuple[str, float]:
    """``peer_spiffe_id`` and the certificate's notAfter (epoch seconds)."""
    if not der:
        raise PeerRejected(NO_CLIENT_CERT, "no peer certificate")
    cert = x509.load_der_x509_certificate(der)
    is_ca, uris = svid_facts(cert)
    if is_ca:
        raise PeerRejected(BAD_IDENTITY, "peer certificate is a CA")
    if len(uris) != 1:
        raise PeerRejected(BAD_IDENTITY, f"peer certificate carries {len(uris)} URI SANs, want exactly one")
    uri = uris[0]
    prefix = f"spiffe://{trust_domain}/"
    parts = uri[len(prefix):].split("/") if uri.startswith(prefix) else []
    if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa" or not parts[1] or not parts[3]:
        raise PeerRejected(BAD_IDENTITY, f"peer identity {uri!r} is not a SPIFFE id of trust domain {trust_domain}")
    return uri, cert.not_valid_after_utc.timestamp()


class Mtls:
    """The proxy's mTLS state and counters; ``ProxyServer.mtls``."""

    def __init__(self) -> None:
        self.material: _Material | None = None
        self.sources = SourceResolver()
        self.refused: Counter[str] = Counter()        # inbound refusals by reason
        self.client_refused: Counter[str] = Counter()  # tunnels this proxy gave up on, by reason
        self.client_alpn: Counter[str] = Counter()    # originated TLS handshakes by ALPN selected ("none")
        self.peers: Counter[str] = Counter()          # accepted inbound tunnels by peer principal
        self.handshakes = 0
        self.resumed = 0                              # ... of which resumed a TLS session
        self.stream_handshakes = 0                    # ... of which on the byte-tunnel layer (ALPN istio)
        self.updates = 0
        self.sessions = SessionCache()                # client side: sessions to offer on new tunnels
        self.tunnel_tls: dict[tuple[Any, ...], Any] = {}   # mtls_client.upstream_tls answers, per material
        self._peers: dict[tuple[bytes, str], tuple[str, float]] = {}
        self._pushed: tuple[Any, ...] | None = None
        self._modes: tuple[Snapshot | None, dict[tuple[str, int], str]] = (None, {})

    # credentials

    def update(self, creds: Credentials) -> None:
        """Install a credentials push; contexts are built first, so a bad push changes nothing.

        A push that only changes the workload pids keeps the contexts, and with them the
        server's ticket key and the client's saved sessions: resumption survives it.  New
        certificates or roots replace both, so no handshake resumes a session made with them."""
        pushed = (creds.trust_domain, creds.roots, creds.svids)
        if pushed != self._pushed:
            self.material = _Material.build(creds)
            self._pushed = pushed
            self.sessions = SessionCache()
            self.tunnel_tls = {}
        self.sources = SourceResolver(creds.pids)
        self.updates += 1

    def peer_identity(self, der: bytes | None) -> str:
        """``peer_spiffe_id`` of a peer certificate the handshake verified, cached by its bytes:
        a peer presents the same certificate on every tunnel until it renews it.  A resumed
        handshake does not verify the certificate again, so its expiry is checked here."""
        key = (der or b"", self.trust_domain or "")
        found = self._peers.get(key)
        if found is None:
            found = _peer(der, key[1])
            if len(self._peers) >= PEER_CACHE_SIZE:
                self._peers.clear()
            self._peers[key] = found
        if time.time() > found[1]:
            raise PeerRejected(EXPIRED, f"peer certificate of {found[0]} has expired")
        return found[0]

    @property
    def trust_domain(self) -> str | None:
        return self.material.trust_domain if self.material is not None else None

    def server_context(self) -> ssl.SSLContext | None:
        return self.material.server if self.material is not None else None

    def client_context(self, source: str, stream: bool = False) -> ssl.SSLContext | None:
        """The context presenting ``source``'s SVID; ``stream``: the one for byte tunnels."""
        if self.material is None:
            return None
        return (self.material.client_stream if stream else self.material.client).get(source)

    # client side

    def workload_of(self, conn: Any) -> SourceWorkload:
        """The workload that opened downstream ``conn`` (``UNIDENTIFIED`` when unknown), cached
        on the connection (``conn.source``)."""
        source = conn.source
        if source is None:
            transport = conn.transport
            source = self.sources.resolve(transport.get_extra_info("peername"),
                                          transport.get_extra_info("sockname")) or UNIDENTIFIED
            conn.source = source
        return source

    def accepted(self, conn: Any) -> None:
        """Find the client of a new downstream connection now, while its socket surely exists:
        a client that closes as soon as its response arrives may be gone by the time the
        request's telemetry is written.  Nothing to find before a push names workload pids."""
        if self.sources.pids:
            self.workload_of(conn)

    def source_of(self, conn: Any) -> str:
        """The SPIFFE id of the workload that opened downstream ``conn``; "" when unknown."""
        return self.workload_of(conn).spiffe_id

    def tunnel_source(self, ep: Endpoint, conn: Any) -> str | None:
        """The identity to present on a tunnel to ``ep`` (auto mTLS), or None for plaintext.

        mTLS is used towards a peer node's endpoint unless its PeerAuthentication mode is
        DISABLE, when this node holds an SVID for the source workload.  An unknown source
        travels in plaintext, which a STRICT destination refuses.
        """
        if ep.mtls_mode == "DISABLE" or self.material is None:
            return None
        source = self.source_of(conn)
        return source if source in self.material.client else None

    def expected_peer(self, ep: Endpoint) -> str | None:
        """The identity the server side must present for ``ep``: its workload's SPIFFE id."""
        if not (ep.namespace and ep.service_account) or self.material is None:
            return None
        return spiffe_id_of(ep.namespace, ep.service_account, self.material.trust_domain)

    # server side

    def local_mode(self, snapshot: Snapshot, host: str, port: int) -> str:
        """The PeerAuthentication mode of the local endpoint ``host:port`` (PERMISSIVE if unknown)."""
        cached, modes = self._modes
        if cached is not snapshot:
            modes = {(ep.address, ep.port): ep.mtls_mode for c in snapshot.clusters.values() for ep in c.endpoints
                     if ep.via is None and ep.node == snapshot.node_id and ep.mtls_mode}
            self._modes = (snapshot, modes)
        return modes.get((host, port)) or "PERMISSIVE"

    def admit(self, snapshot: Snapshot, principal: str | None, host: str, port: int) -> str | None:
        """Check a tunnel to a local endpoint against its mode; a refusal message, or None."""
        if principal is None:
            if self.local_mode(snapshot, host, port) == "STRICT":
                self.refused[PLAINTEXT] += 1
                return "mTLS required: PeerAuthentication STRICT"
            return None
        self.peers[principal] += 1
        return None

    def stats(self) -> dict[str, Any]:
        m = self.material
        return {"enabled": m is not None, "trust_domain": m.trust_domain if m else None,
                "identities": sorted(m.client) if m else [], "expires": dict(m.expires) if m else {},
                "updates": self.updates, "handshakes": self.handshakes, "resumed": self.resumed,
                "stream_handshakes": self.stream_handshakes,
                "client_sessions": self.sessions.stats(),
                "refused": dict(self.refused), "refused_total": sum(self.refused.values()),
                "client_refused": dict(self.client_refused), "client_alpn": dict(self.client_alpn),
                "peers": dict(self.peers),
                "source_lookups": self.sources.lookups, "source_unknown": self.sources.unknown}
