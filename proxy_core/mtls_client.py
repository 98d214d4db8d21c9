"""Client-side transport security for upstream connections: auto mTLS on node tunnels, and
DestinationRule ``tls`` (ISTIO_MUTUAL, DISABLE, SIMPLE, MUTUAL).

Which security a new upstream connection gets (``upstream_tls``), as Istio decides it:

* the cluster's DestinationRule sets ``tls.mode``:
  ``DISABLE`` -> plaintext; ``ISTIO_MUTUAL`` -> mTLS with the source workload's SVID (on a
  tunnel to another node; a same-node endpoint is reached over loopback, where the inbound
  side is this very proxy); ``SIMPLE`` / ``MUTUAL`` -> TLS originated to the endpoint itself
  (a ServiceEntry host), with ``sni``, ``caCertificates`` (system roots without it),
  ``clientCertificate`` + ``privateKey`` (MUTUAL) and ``subjectAltNames`` checked on the
  server certificate (its DNS names and URIs);  the ClientHello offers the ALPN protocol of
  the pool the request travels on (``h2`` for an HTTP/2 cluster, ``http/1.1`` otherwise,
  none for TCP), and an ``h2`` connection is only used when the server selected ``h2``;
* otherwise auto mTLS: a tunnel to another node's endpoint uses mTLS unless the endpoint's
  PeerAuthentication mode is DISABLE (``Mtls.tunnel_source``).

A mesh tunnel for bytes (``alpn`` None: a TCP session, TLS passthrough, ``CONNECT``) offers
ALPN ``istio`` and runs over ``proxy_core.tls_stream.TlsStream``, which carries half-close
(``stream``); an HTTP tunnel keeps the event loop's TLS transport, which is faster.

The answer's ``key`` joins the pool key, so a connection is only reused by requests that
would have opened the same one: one source identity's tunnel never carries another's traffic.
The answer for a tunnel is cached per (endpoint, source) until the next credentials push,
since it is asked for on every request.

A new connection offers the last TLS session saved for its (key, peer address, SNI)
(``proxy_core.tls_session``): a tunnel resumes the session of the one before it, which costs
the two proxies a fraction of a full handshake.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
from dataclasses import dataclass, field
from typing import Any, Callable, TypeVar

from cryptography import x509

from proxy_core.mtls import ALPN_ISTIO, HANDSHAKE_TIMEOUT, Mtls, PeerRejected, sni_for
from proxy_core.snapshot import Cluster, ClusterTls, Endpoint
from proxy_core.tls_session import harden
from proxy_core.tls_stream import TlsStream
from proxy_core.upstream import ConnectError, Dialer, _TunnelHandshake

P = TypeVar("P", bound=asyncio.Protocol)
log = logging.getLogger("proxy_core.mtls")

SERVER_IDENTITY_MISMATCH = "server_identity_mismatch"
SAN_MISMATCH = "subject_alt_name_mismatch"
ALPN_MISMATCH = "alpn_mismatch"

ALPN_H2 = "h2"              # what an HTTP/2 cluster offers, and needs the server to select
ALPN_HTTP11 = "http/1.1"    # what an HTTP/1.1 cluster offers (a server may select nothing)


@dataclass(frozen=True, slots=True)
class UpstreamTls:
    """How to secure one upstream connection; ``key`` separates pools."""

    key: str
    context: ssl.SSLContext = field(compare=False)
    server_hostname: str | None
    expected: tuple[str, ...] = ()      # acceptable server SANs; empty: any certificate the context trusts
    mesh: bool = True                   # mesh mTLS (SPIFFE id check) or originated TLS (SAN check)
    alpn: str | None = None             # the ALPN protocol offered (originated TLS only)
    stream: bool = False                # a mesh byte tunnel: ALPN istio over ``TlsStream`` (half-close)


def upstream_tls(mtls: Mtls, ep: Endpoint, cluster: Cluster | None, conn: Any,
                 alpn: str | None = None) -> UpstreamTls | None:
    """The security of a new connection to ``ep`` for downstream ``conn``; None: plaintext.

    ``alpn`` is the protocol the connection will speak (``ALPN_H2`` or ``ALPN_HTTP11``; None
    for bytes, as on TCP and CONNECT tunnels); only originated TLS offers it, since a mesh
    tunnel carries whatever its client speaks to the peer proxy."""
    tls = cluster.tls if cluster is not None else None
    if tls is not None and tls.mode in ("SIMPLE", "MUTUAL"):
        return mtls_originate(tls, ep, alpn)
    if ep.via is None or (tls is not None and tls.mode == "DISABLE"):
        return None
    if tls is None:
        source = mtls.tunnel_source(ep, conn)
    else:  # ISTIO_MUTUAL: mTLS whatever the endpoint's mode says
        source = mtls.source_of(conn) if mtls.material is not None else None
    if not source:
        return None
    stream = alpn is None
    key = (ep.pool_key, ep.namespace, ep.service_account, source, stream)
    found: UpstreamTls | None = mtls.tunnel_tls.get(key)
    if found is None:
        ctx = mtls.client_context(source, stream)
        if ctx is None:
            return None
        expected = mtls.expected_peer(ep)
        # Sessions belong to the context that made them: the stream context keeps its own.
        found = UpstreamTls(f"{source}|{ALPN_ISTIO}" if stream else source, ctx,
                            sni_for(expected) if expected else None, (expected,) if expected else (), stream=stream)
        if len(mtls.tunnel_tls) >= _TUNNEL_TLS_CACHE:
            mtls.tunnel_tls.clear()
        mtls.tunnel_tls[key] = found
    return found


def upstream_plan(mtls: Mtls, ep: Endpoint, cluster: Cluster, conn: Any,
                  upgrade: bool = False) -> tuple[bool, UpstreamTls | None]:
    """How a request from downstream ``conn`` travels to ``ep``: over HTTP/2 or not (the
    cluster's port speaks http2/grpc, or ``auto`` and the client spoke HTTP/2; never for an
    ``upgrade``, which only HTTP/1.1 carries), and the security of a new connection
    (``upstream_tls``).  One answer for primary requests and their mirror copies, so a copy
    reaches its cluster the way a request routed there would."""
    h2 = not upgrade and (cluster.http2 or (conn.h2_stream is not None and cluster.use_downstream_protocol))
    if ep.via is None and cluster.tls is None:
        return h2, None     # loopback, plaintext: the common case, decided without a call
    return h2, upstream_tls(mtls, ep, cluster, conn, ALPN_H2 if h2 else ALPN_HTTP11)


_TUNNEL_TLS_CACHE = 4096       # cached upstream_tls answers (cleared when full)
_ORIGINATE: dict[tuple[ClusterTls, str | None], ssl.SSLContext] = {}


def mtls_originate(tls: ClusterTls, ep: Endpoint, alpn: str | None = None) -> UpstreamTls:
    """SIMPLE / MUTUAL TLS to the endpoint itself; contexts are built once per setting and
    ALPN protocol (ALPN is a context option, and each context's id keys its own pools)."""
    ctx = _ORIGINATE.get((tls, alpn))
    if ctx is None:
        ctx = harden(ssl.create_default_context(cafile=tls.ca_certificates))
        ctx.check_hostname = False           # SNI and SANs are checked below, as Envoy's SAN matcher does
        if tls.insecure_skip_verify:
            ctx.verify_mode = ssl.CERT_NONE
        if tls.mode == "MUTUAL":
            if not (tls.client_certificate and tls.private_key):
                raise ConnectError("tls mode MUTUAL needs clientCertificate and privateKey")
            ctx.load_cert_chain(tls.client_certificate, tls.private_key)
        if alpn is not None:
            ctx.set_alpn_protocols([alpn])
        _ORIGINATE[(tls, alpn)] = ctx
    sni = tls.sni or (None if _is_ip(ep.address) else ep.address)
    expected = tls.subject_alt_names or ((sni,) if sni and not tls.insecure_skip_verify else ())
    return UpstreamTls(f"{tls.mode}:{id(ctx)}", ctx, sni, expected, mesh=False, alpn=alpn)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _server_names(der: bytes) -> set[str]:
    cert = x509.load_der_x509_certificate(der)
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return set()
    names = set(san.get_values_for_type(x509.DNSName)) | set(san.get_values_for_type(x509.UniformResourceIdentifier))
    return names | {str(ip) for ip in san.get_values_for_type(x509.IPAddress)}


def _san_matches(expected: str, names: set[str]) -> bool:
    if expected in names:
        return True
    # A wildcard DNS SAN covers one leftmost label.
    head, _, rest = expected.partition(".")
    return bool(rest) and f"*.{rest}" in names


async def _handshake(stream: TlsStream) -> None:
    """Wait for a ``TlsStream``'s handshake; cancelled (the dial's timeout), drop the socket."""
    try:
        await stream.handshake
    except asyncio.CancelledError:
        stream.abort()
        raise


class MtlsDialer(Dialer):
    """A ``Dialer`` that secures a connection when asked (``tls``), checking who answered."""

    def __init__(self, mtls: Mtls) -> None:
        self.mtls = mtls

    async def open(self, endpoint: Endpoint, factory: Callable[[], P], timeout: float,
                   tls: UpstreamTls | None = None) -> P:
        if tls is None:
            return await super().open(endpoint, factory, timeout)
        loop = asyncio.get_running_loop()
        proto = factory()
        via = endpoint.via
        first: asyncio.Protocol = proto if via is None else _TunnelHandshake(endpoint.key, proto)
        host, port = (endpoint.address, endpoint.port) if via is None else (via.address, via.port)
        sessions = self.mtls.sessions
        session_key = (tls.key, host, port, tls.server_hostname or "")
        wrap = sessions.wrap(tls.context, session_key)
        handshake_timeout = min(timeout, HANDSHAKE_TIMEOUT)
        try:
            async with asyncio.timeout(timeout):
                if tls.stream:
                    _, transport = await loop.create_connection(
                        lambda: TlsStream(first, wrap, server_side=False, server_hostname=tls.server_hostname,
                                          handshake_timeout=handshake_timeout), host, port)
                    await _handshake(transport)
                else:
                    transport, _ = await loop.create_connection(
                        lambda: first, host, port, ssl=wrap, server_hostname=tls.server_hostname or "",
                        ssl_handshake_timeout=handshake_timeout)
                try:
                    self._check_server(transport, tls, f"{host}:{port}")
                    if isinstance(first, _TunnelHandshake):
                        await first.done     # the server's session tickets came before its answer
                except BaseException:
                    transport.close()
                    raise
                sessions.save(session_key, transport.get_extra_info("ssl_object"))
                return proto
        except ssl.SSLError as exc:
            raise self._refuse("handshake_failed", f"TLS handshake with {host}:{port} failed: {exc}") from None
        except (OSError, TimeoutError) as exc:
            raise ConnectError(f"{type(exc).__name__}: {exc}") from None

    def _refuse(self, reason: str, message: str) -> ConnectError:
        """Count and log a connection this proxy will not use; the request fails with 503 UF."""
        self.mtls.client_refused[reason] += 1
        log.warning("upstream TLS refused (%s): %s", reason, message)
        return ConnectError(message)

    def _check_server(self, transport: asyncio.BaseTransport, tls: UpstreamTls, peer_address: str) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        der = ssl_object.getpeercert(True) if ssl_object is not None else None
        if tls.mesh:
            try:
                peer = self.mtls.peer_identity(der)
            except PeerRejected as exc:
                raise self._refuse(exc.reason, f"peer proxy {peer_address} refused: {exc}") from None
            if tls.expected and peer not in tls.expected:
                raise self._refuse(SERVER_IDENTITY_MISMATCH,
                                   f"peer proxy {peer_address} presented {peer}, expected {tls.expected[0]}")
            return
        if tls.expected and der is not None:
            names = _server_names(der)
            if not any(_san_matches(e, names) for e in tls.expected):
                raise self._refuse(SAN_MISMATCH, f"{peer_address} (SNI {tls.server_hostname}): server certificate "
                                                 f"names {sorted(names)}, none of subjectAltNames {list(tls.expected)}")
        if tls.alpn is not None:
            selected = ssl_object.selected_alpn_protocol() if ssl_object is not None else None
            self.mtls.client_alpn[selected or "none"] += 1
            # HTTP/2 frames to a server that did not agree to h2 would be read as a broken
            # HTTP/1.1 request: refuse the connection (503 UF) rather than guess.
            if tls.alpn == ALPN_H2 and selected != ALPN_H2:
                raise self._refuse(ALPN_MISMATCH, f"{peer_address} (SNI {tls.server_hostname}): the cluster speaks "
                                                  f"HTTP/2 but the server selected ALPN {selected or 'nothing'}, not h2")
