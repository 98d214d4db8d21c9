"""The proxy server: listeners, per-connection HTTP/1.1 drivers and the request engine.

Everything on the request path is callback driven (asyncio Protocols, ``call_later``
timers); the only coroutine a request may create is the dial of a new upstream
connection.  One ``Exchange`` object carries one request through its states::

    head parsed -> route (vhost, match) -> CORS -> local rate limit -> direct response | redirect | fault
      -> cluster + endpoint pick -> [dial] -> request sent -> [mirror copies] -> response head
      -> retry (back to pick, after backoff) | stream body downstream -> done

CORS (a route's ``corsPolicy``) answers allowed preflights itself and adds the
``access-control-*`` headers to every response of an allowed origin, local replies included,
as Envoy's CORS filter does ahead of the router.  Mirroring (``mirror`` / ``mirrors``) sends
sampled copies of a complete request to other clusters through ``MirrorSender``: fire and
forget, never on the primary request's path.

Configuration is held in an immutable ``_State`` (snapshot, router, balancers, rate-limit
buckets).  An exchange captures the state current when its head arrived and keeps it to the
end, so ``ProxyServer.swap`` is hitless: in-flight requests finish on the config they started
on.  Token buckets are the one piece of live state a swap carries over (when their spec is
unchanged), so that pushing config does not refill them.

Listeners (on loopback, except the gateway's, which bind where the install says):

* ``http_proxy`` -- what ``HTTP_PROXY`` points at: absolute-form requests, origin-form
  with Host, and ``CONNECT`` tunnels to services or (``ALLOW_ANY``) arbitrary addresses.
* one listener per service VIP (``127.x.y.z:port``): origin-form requests belong to that
  service unless the Host header names another known host.  VIP sockets are bound with
  SO_REUSEPORT so several proxy processes -- the workers of one node, or the proxies of
  two nodes co-hosted on one machine (a multi-node cluster on a laptop or CI runner) --
  can all bind the same ``VIP:port``; the kernel spreads connections among them and every
  one of them has the same routes.  A VIP whose protocol is ``tcp`` is not parsed at all:
  ``proxy_core.tcp`` splices its connections to the destination of its tcp routes; one whose
  protocol is ``tls`` or ``https`` is routed by its ClientHello's SNI, then spliced the same way.
* ``gateway`` -- on gateway nodes, one per port of the ingress gateway (``snapshot.gateway``),
  bound to the install's gateway address: requests from outside the mesh, routed only by that
  port's own virtual hosts (404 NR for any other Host, no CONNECT, no passthrough), sent on as
  the workload ``istio-ingressgateway`` (its SPIFFE id for mTLS, its name in telemetry).
  TLS ports read the ClientHello first (``proxy_core.gateway_tls``); TLS passthrough and TCP
  ports splice as tcp VIPs do (``proxy_core.gateway_l4``).
* ``inbound`` -- the node-to-node entry: only ``CONNECT 127.x.y.z:port`` to an endpoint of
  this node, answered 200 and spliced.  mTLS terminates here (``proxy_core.mtls_inbound``);
  the target's PeerAuthentication mode decides whether a plaintext tunnel may pass.

WebSocket and other ``Upgrade`` requests are forwarded with their Upgrade headers; a
``101`` answer turns both connections into a raw byte pipe (Istio enables websocket
upgrades by default).  An HTTP/2 extended CONNECT arrives here as that same Upgrade request
(``proxy_core.http2``), and an upgrade always goes upstream over HTTP/1.1.
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import random
import socket
import time
import uuid
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

from proxy_core import flags, http1
from proxy_core.accesslog import AccessLog
from proxy_core.grpc_wire import http_to_grpc_status, trailers_only
from proxy_core.http2_upstream import H2UpstreamPool, StreamRefused
from proxy_core.cache import CacheFilter, CacheStats, HttpCache, build_caches, cache_stats
from proxy_core.coalesce import WriteBatch, coalescing, direct
from proxy_core.coalesce import flush as flush_held
from proxy_core.http1 import ProtocolError, RequestHead, ResponseHead
from proxy_core.lb import LoadBalancer, make_balancer
from proxy_core.mirror import MIRROR_MAX_IN_FLIGHT, MIRROR_TIMEOUT, MirrorSender
from proxy_core.mtls import Mtls, spiffe_id_of
from proxy_core.mtls_client import MtlsDialer, UpstreamTls, upstream_plan, upstream_tls
from proxy_core.mtls_inbound import InboundSniffer
from proxy_core.policy import (HOP_BY_HOP_BYTES, FaultDecision, apply_header_ops, backoff_delay, decide_cors, decide_fault,
                               mirror_sampled, redirect_location, retry_on_failure, retry_on_grpc_status,
                               retry_on_status, rewrite_target, shadow_authority)
from proxy_core.quota import Bucket, HostRateLimiter, QuotaBook, build_host_limiters
from proxy_core.resilience import ClusterResilience, build_resilience
from proxy_core.ratelimit import Clock
from proxy_core.security_filter import (DENIED_BODY, ClusterSecurity, RequestAuthorization, SecurityRuntime,
                                        build_security, source_principal)
from proxy_core.router import RequestInfo, Router, split_host_port
from proxy_core.stats import StatsRecorder
from proxy_core.snapshot import (Cluster, CorsPolicy, Endpoint, HeaderOps, LbPolicy, Route, Snapshot, Vip,
                                 WeightedCluster)
from proxy_core.source_identity import SourceWorkload
from proxy_core.tcp import TCP_PROTOCOLS, TLS_PROTOCOLS, TcpProxy, TcpSession, TlsSession
from proxy_core.tcp_telemetry import TcpTelemetry, close_tunnel, open_tunnel
from proxy_core.telemetry import DEFAULT_MAX_ROWS, TelemetryRecorder, request_head_size
from proxy_core.telemetry_policy import access_log_allowed
from proxy_core.tracing import Tracer, trace_finished, trace_upstream
from proxy_core.upstream import ConnectError, Dialer, Pipe, UpgradeRest, UpstreamConnection, UpstreamPool

log = logging.getLogger("proxy_core.server")

# Request bodies up to this size are kept so the request can be retried (Envoy's
# per_request_buffer_limit is 16 KiB by default; large enough for typical JSON APIs).
RETRY_BUFFER_LIMIT = 64 * 1024
# While no upstream connection is attached yet, stop reading the client beyond this.
_BODY_BUFFER_HIGH = 256 * 1024
PASSTHROUGH_CLUSTER = "PassthroughCluster"
BLACKHOLE_CLUSTER = "BlackHoleCluster"

_PAUSE_BACKLOG = 1   # a pipelined request waits for the one in flight
_PAUSE_BODY = 2      # request body buffered while no upstream is attached yet
_PAUSE_UPSTREAM = 4  # upstream write buffer is full
_PAUSE_TUNNEL = 8    # tunnel being established

# Kinds of request parts kept while a pipelined request waits for the one in flight.
_PART_HEAD, _PART_DATA, _PART_END, _PART_UPGRADE = range(4)

_MSG_UF = b"upstream connect error or disconnect/reset before headers. reset reason: connection failure"
_MSG_UC = b"upstream connect error or disconnect/reset before headers. reset reason: connection termination"
_MSG_UPE = b"upstream connect error or disconnect/reset before headers. reset reason: protocol error"
_MSG_UT = b"upstream request timeout"
_MSG_UH = b"no healthy upstream"
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
# ``Connection`` values that name no other header to strip (by far the common case).
_PLAIN_CONNECTION = frozenset((b"keep-alive", b"close"))
# Request headers that ``Exchange._prepare_upstream`` does not copy verbatim.
_REQUEST_SPECIAL = HOP_BY_HOP_BYTES | {b"host", b"x-forwarded-for", b"expect", b"x-forwarded-proto", b"x-request-id"}
_CONNECT_OK = b"HTTP/1.1 200 Connection established\r\n\r\n"

_RID_FORMAT = str(uuid.uuid4())[:24] + "%012x"  # "xxxxxxxx-xxxx-4xxx-yxxx-" random per process, then a count


_PROTOCOLS = {"1.1": "HTTP/1.1", "1.0": "HTTP/1.0"}


def _no_body(method: bytes, status: int) -> bool:
    return method == b"HEAD" or status in (204, 304) or status < 200


# -- configuration state -----------------------------------------------------------------------


class _State:
    """Everything derived from one snapshot; replaced as a whole on swap.

    Compiled, an extension type (``server.pxd``): every request reads several of its fields.
    """

    def __init__(self, snapshot: Snapshot, router: Router, balancers: dict[str, LoadBalancer],
                 local_endpoints: frozenset[tuple[str, int]], rate_limits: dict[str, HostRateLimiter],
                 security: dict[str, ClusterSecurity], resilience: dict[str, ClusterResilience],
                 caches: dict[str, HttpCache], gateway_routers: dict[str, Router] | None = None) -> None:
        self.snapshot = snapshot
        self.router = router
        self.balancers = balancers
        self.local_endpoints = local_endpoints
        self.rate_limits = rate_limits      # by service host; empty when no policy applies
        self.security = security            # by cluster; empty when no policy applies
        self.resilience = resilience        # by cluster; only clusters with limits or outlier detection
        self.caches = caches                # by destination service; empty when no policy applies
        self.gateway_routers = gateway_routers or {}   # by gateway listener name (or route key, HTTPS)
        self._ops: dict[int, tuple[tuple[HeaderOps, ...], tuple[HeaderOps, ...]]] = {}

    def header_ops(self, route: Route, wc: WeightedCluster) -> tuple[tuple[HeaderOps, ...], tuple[HeaderOps, ...]]:
        """Non-empty (request, response) header operations of a destination, computed once per snapshot.

        Keyed by ``id(wc)``: a WeightedCluster belongs to exactly one route of this snapshot,
        which the state keeps alive.
        """
        key = id(wc)
        ops = self._ops.get(key)
        if ops is None:
            ops = self._ops[key] = (
                tuple(o for o in (route.headers.request, wc.headers.request) if o),
                tuple(o for o in (wc.headers.response, route.headers.response) if o))
        return ops

    @classmethod
    def build(cls, snapshot: Snapshot, rng: random.Random, clock: Clock, quota: QuotaBook, security: SecurityRuntime,
              cache_counters: CacheStats, previous: "_State | None" = None) -> "_State":
        """Derive the state of ``snapshot``; rate-limit buckets, caches and circuit breakers whose
        spec is unchanged since ``previous`` keep their tokens, entries and counts, so a config
        push does not reset them."""
        resilience = build_resilience(snapshot.clusters, previous.resilience if previous else None, clock)
        balancers = {name: make_balancer(c, rng, getattr(resilience.get(name), "detector", None),
                                         snapshot.node_locality, snapshot.node_labels)
                     for name, c in snapshot.clusters.items()}
        local = frozenset((ep.address, ep.port) for c in snapshot.clusters.values() for ep in c.endpoints
                          if ep.node == snapshot.node_id and ep.via is None)
        limiters = build_host_limiters(snapshot, previous.rate_limits if previous else None, clock, quota)
        caches = build_caches(snapshot, previous.caches if previous else None, cache_counters)
        gateway_routers = {}
        for gl in snapshot.gateway.listeners if snapshot.gateway is not None else ():
            gateway_routers[gl.name] = Router(snapshot, gl.virtual_hosts)
            for srv in gl.servers:   # a terminated HTTPS server routes by its own virtual hosts
                if srv.tls is not None:
                    gateway_routers[gateway_route_key(gl.name, srv.name)] = Router(snapshot, srv.virtual_hosts)
        return cls(snapshot, Router(snapshot), balancers, local, limiters, build_security(snapshot, security),
                   resilience, caches, gateway_routers)


@dataclass(slots=True)
class Stats:
    """Connection and tunnel counters plus gauges (request totals come from ``destinations``)."""

    downstream_connections_total: int = 0
    active_connections: int = 0
    active_requests: int = 0
    tunnels_total: int = 0
    crashes: int = 0


@dataclass(slots=True)
class _Listener:
    kind: str                     # "http_proxy" | "inbound" | "vip" | "tcp" | "tls" (tcp / tls-protocol VIPs)
                                  # | "h2" | "auto" (HTTP/2 or sniffed VIPs, see proxy_core.sniff)
                                  # | "gateway" (an ingress gateway port)
    name: str                     # shown in access logs
    host: str
    config_port: int
    vip: Vip | None
    server: asyncio.AbstractServer | None = None
    port: int = 0
    tls: Any = None               # a gateway port's TLS servers (proxy_core.gateway_tls.TlsChains)
    tcp: Any = None               # a gateway TCP port's routes (TcpHost, see proxy_core.gateway_l4)
    route_key: str = ""           # gateway: the router's key when not ``name`` (an HTTPS server's)
    scheme: str = "http"          # what requests on it arrived over


# -- the server --------------------------------------------------------------------------------


class ProxyServer:
    """Owns listeners, the current configuration, the upstream pool, stats and the access log."""

    # How an accepted connection's peer identity (SPIFFE id without "spiffe://") is learnt,
    # e.g. from its mTLS handshake; None: every peer is anonymous.
    peer_identity: Callable[[asyncio.BaseTransport], str | None] | None = None

    def __init__(self, snapshot: Snapshot, *, access_log: AccessLog | None = None,
                 pool: UpstreamPool | None = None, rng: random.Random | None = None,
                 telemetry_rows: int = DEFAULT_MAX_ROWS, clock: Clock = time.monotonic,
                 mirror_limit: int = MIRROR_MAX_IN_FLIGHT, tracer: Tracer | None = None) -> None:
        self.rng = rng or random.Random()
        self.clock = clock                      # drives rate-limit token buckets
        self.quota = QuotaBook(clock)           # global rate limit leases, fetched by the supervisor
        self.security = SecurityRuntime()       # JWKS cache and authn/authz counters, kept across swaps
        self.cache_counters = CacheStats()      # HTTP cache counters, kept across swaps
        self.state = _State.build(snapshot, self.rng, clock, self.quota, self.security, self.cache_counters)
        self.access_log = access_log or AccessLog(enabled=False)
        self.mtls = Mtls()                      # SVIDs pushed by the supervisor; off until the first push
        self.pool = pool or UpstreamPool(MtlsDialer(self.mtls))
        # HTTP/1.1 connections, both sides, write once per loop iteration (proxy_core.coalesce).
        self.writes = WriteBatch()
        self.pool.writes = self.writes
        self.dialer: Dialer = self.pool.dialer
        self.h2_pool = H2UpstreamPool(self.dialer)   # clusters whose port speaks HTTP/2 (http2, grpc)
        self.mirrors = MirrorSender(self.pool, self.h2_pool, self.mtls, mirror_limit)
        self.counters = Stats()
        self.tcp = TcpProxy()                   # sessions and counters of tcp-protocol VIPs
        self.destinations = StatsRecorder()     # per destination service, for meshctl and the demo
        # Mixer's input, drained over the control channel; telemetry_rows=0 turns it off.
        self.telemetry = TelemetryRecorder(telemetry_rows) if telemetry_rows > 0 else None
        self.tcp_telemetry = TcpTelemetry() if telemetry_rows > 0 else None   # tcp VIPs and CONNECT tunnels
        self.tracer = tracer                    # None: trace headers pass through untouched, no spans
        self._listeners: dict[tuple[str, str, int], _Listener] = {}
        self._connections: set[HttpConnection] = set()
        self._rid = 0
        self._gateway_source: tuple[Any, SourceWorkload] | None = None
        self.gateway_errors: dict[str, str] = {}   # gateway listener -> why it could not be bound
        from proxy_core.gateway_tls import GatewaySecrets, GatewayTlsStats  # it builds on this module's connections
        self.gateway_tls = GatewayTlsStats()        # handshakes and refusals on HTTPS gateway ports
        self.gateway_secrets = GatewaySecrets()     # credentialName material, pushed by the supervisor
        self.loop: asyncio.AbstractEventLoop | None = None

    @property
    def snapshot(self) -> Snapshot:
        return self.state.snapshot

    # lifecycle

    async def start(self) -> None:
        # Cached: asyncio.get_running_loop() costs a getpid() syscall per call on 3.11.
        self.loop = asyncio.get_running_loop()
        self.writes.loop = self.loop
        await self._reconcile(self.state.snapshot)

    async def swap(self, snapshot: Snapshot) -> None:
        """Install ``snapshot`` atomically; on any error (bad config, bind failure) the old one stays."""
        new_state = _State.build(snapshot, self.rng, self.clock, self.quota, self.security, self.cache_counters,
                                 self.state)
        await self._reconcile(snapshot)
        self.state = new_state

    async def set_gateway_secrets(self, secrets: Any) -> None:
        """Install the TLS Secrets pushed for ``credentialName`` servers and rebuild the gateway's
        TLS contexts now (Istio's SDS: a rotated Secret needs no new snapshot); a port whose
        Secret is missing closes, with the reason in ``gateway_errors``."""
        self.gateway_secrets = secrets
        await self._reconcile(self.state.snapshot)

    async def _reconcile(self, snapshot: Snapshot) -> None:
        desired: dict[tuple[str, str, int], _Listener] = {}
        if snapshot.http_proxy is not None:
            a = snapshot.http_proxy
            desired[("http_proxy", a.address, a.port)] = _Listener("http_proxy", "http_proxy", a.address, a.port, None)
        if snapshot.inbound is not None:
            a = snapshot.inbound
            desired[("inbound", a.address, a.port)] = _Listener("inbound", "inbound", a.address, a.port, None)
        unbound: dict[str, str] = {}
        for gl in snapshot.gateway.listeners if snapshot.gateway is not None else ():
            spec = _Listener(GATEWAY, gl.name, gl.address, gl.port, None, tcp=gl.tcp)
            if gl.tls:
                spec.tls, error = _gateway_chains(gl, self.gateway_secrets)
                if error is not None:   # like a port it cannot bind: that port stays closed, the rest applies
                    unbound[gl.name] = f"{gl.address}:{gl.port}: {error}"
                    continue
            desired[(GATEWAY, gl.address, gl.port)] = spec
        for vip in snapshot.vips:
            kind = listener_kind(vip.protocol)
            if kind is not None:
                desired[(kind, vip.address, vip.port)] = _Listener(kind, f"{vip.address}:{vip.port}",
                                                                   vip.address, vip.port, vip)
        opened: list[_Listener] = []
        try:
            for key, spec in desired.items():
                if key not in self._listeners:
                    try:
                        await self._bind(spec)
                    except OSError as exc:
                        if spec.kind != GATEWAY:
                            raise
                        # A Gateway port that cannot be bound (taken, privileged) must not cost the
                        # node its whole configuration: the port stays closed, the rest applies.
                        unbound[spec.name] = f"{spec.host}:{spec.config_port}: {exc.strerror or exc}"
                        continue
                    opened.append(spec)
        except BaseException:
            for spec in opened:
                assert spec.server is not None
                spec.server.close()
            raise
        for name, error in unbound.items():
            if self.gateway_errors.get(name) != error:
                log.warning("gateway listener %s not bound: %s", name, error)
        self.gateway_errors = unbound
        for key, spec in desired.items():
            current = self._listeners.get(key)
            if spec.name in unbound and current is None:
                continue
            if current is None:
                self._listeners[key] = spec
            else:
                current.vip = spec.vip  # same socket, possibly another default host
                current.name = spec.name
                current.tls = spec.tls  # new connections: the certificates read for this snapshot
                current.tcp = spec.tcp
        for key in [k for k in self._listeners if k not in desired]:
            gone = self._listeners.pop(key)
            if gone.server is not None:
                gone.server.close()

    async def _bind(self, spec: _Listener) -> None:
        loop = asyncio.get_running_loop()
        session = {"tcp": TcpSession, "tls": TlsSession}.get(spec.kind, HttpConnection)
        factory: Callable[[], asyncio.Protocol] = partial(session, self, spec)
        if spec.kind == "inbound":
            factory = partial(InboundSniffer, self.mtls, factory)
        elif spec.kind == GATEWAY:
            from proxy_core.gateway_tls import gateway_protocol  # it builds on this module's connections
            factory = partial(gateway_protocol, self, spec)
        elif spec.kind in SNIFFED_KINDS:
            from proxy_core.sniff import ProtocolSniffer  # it builds on this module's connections
            factory = partial(ProtocolSniffer, self, spec)
        spec.server = await loop.create_server(factory, spec.host, spec.config_port,
                                               reuse_port=True, backlog=1024, family=socket.AF_INET)
        spec.port = spec.server.sockets[0].getsockname()[1]

    @property
    def ports(self) -> dict[str, int]:
        """Actual bound ports of the http_proxy and inbound listeners (port 0 resolved)."""
        return {spec.kind: spec.port for spec in self._listeners.values() if spec.kind in ("http_proxy", "inbound")}

    def vip_ports(self) -> dict[str, int]:
        """Actual bound ports of the VIP listeners, HTTP, TCP and TLS, by ``address:port`` as configured."""
        return {spec.name: spec.port for spec in self._listeners.values()
                if spec.kind in ("vip", "tcp", "tls") or spec.kind in SNIFFED_KINDS}

    def gateway_ports(self) -> dict[str, str]:
        """The ingress gateway's bound ``address:port`` by listener name (empty off gateway nodes)."""
        return {spec.name: f"{spec.host}:{spec.port}" for spec in self._listeners.values() if spec.kind == GATEWAY}

    def gateway_source(self) -> SourceWorkload:
        """The ingress gateway as the client of the requests it forwards: its SPIFFE id (once the
        trust domain is known) picks its SVID for mTLS, its workload names it in telemetry."""
        gateway = self.state.snapshot.gateway
        key = (gateway, self.mtls.trust_domain)
        cached = self._gateway_source
        if cached is None or cached[0] != key:
            if gateway is None:
                source = SourceWorkload("")
            else:
                sid = spiffe_id_of(gateway.namespace, gateway.service_account, key[1]) if key[1] else ""
                source = SourceWorkload.registered(sid, gateway.workload, gateway.namespace, gateway.labels)
            cached = self._gateway_source = (key, source)
        return cached[1]

    async def close(self, grace: float = 0.0) -> None:
        """Stop accepting, let in-flight requests finish for up to ``grace`` seconds, then close all."""
        for spec in self._listeners.values():
            if spec.server is not None:
                spec.server.close()
        self._listeners.clear()
        for conn in list(self._connections):
            if conn.active is None and conn.tunnel is None:
                conn.transport.close()
        deadline = time.monotonic() + grace
        while self.counters.active_requests and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        for conn in list(self._connections):
            conn.abort()
        self.writes.flush()   # what the last iteration left: its writes go nowhere now, its records count
        self.tcp.close()
        self.mirrors.close()
        self.pool.close()
        self.h2_pool.close()
        self.access_log.close()

    # bookkeeping used by connections and exchanges

    def next_request_id(self) -> str:
        self._rid += 1
        return _RID_FORMAT % self._rid

    def record(self, destination: str, status: int, duration_ms: float, response_flags: str) -> None:
        """One finished request; every total in ``stats()`` is derived from these records."""
        self.destinations.record(destination, status, duration_ms, response_flags)

    def stats(self) -> dict[str, Any]:
        c = self.counters
        destinations = self.destinations.to_dict()
        responses = {"1xx": 0, "2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0}
        response_flags: dict[str, int] = {}
        for d in destinations.values():
            for cls, n in d["by_class"].items():
                responses[cls] = responses.get(cls, 0) + n
            for joined, n in d["flags"].items():
                for f in joined.split(","):
                    response_flags[f] = response_flags.get(f, 0) + n
        return {"version": self.state.snapshot.version,
                "requests_total": sum(d["requests"] for d in destinations.values()),
                "responses": responses, "response_flags": response_flags,
                "downstream_connections_total": c.downstream_connections_total,
                "active_connections": c.active_connections, "active_requests": c.active_requests,
                "tunnels_total": c.tunnels_total, "handler_errors": c.crashes,
                "upstream_connects": self.pool.connects, "upstream_idle": self.pool.idle_count(),
                "upstream_h2": self.h2_pool.stats(),
                "destinations": destinations, "telemetry": self._telemetry_stats(),
                "mirror": self.mirrors.stats(), "tcp": self.tcp.stats(),
                "security": self.security.stats.to_dict(), "mtls": self.mtls.stats(),
                "gateway_errors": dict(self.gateway_errors), "gateway_tls": self.gateway_tls.to_dict(),
                "gateway_secrets": sorted(self.gateway_secrets.by_name),   # names only, never material
                "clusters": {name: r.stats() for name, r in self.state.resilience.items()},
                "cache": cache_stats(self.cache_counters, self.state.caches), "tracing": self._tracing_stats()}

    def _tracing_stats(self) -> dict[str, Any]:
        tracer = self.tracer
        if tracer is None:
            return {"enabled": False}
        out: dict[str, Any] = {"enabled": True, "spans": tracer.spans_written}
        if tracer.exporter is not None:
            out["zipkin"] = tracer.exporter.stats()
        return out

    def _telemetry_stats(self) -> dict[str, Any]:
        t = self.telemetry
        if t is None:
            return {"enabled": False, "rows_buffered": 0, "dropped_total": 0}
        return {"enabled": True, "rows_buffered": t.rows_buffered, "dropped_total": t.dropped_total}


# -- downstream connections ------------------------------------------------------------------


class HttpConnection:
    """Drives one downstream connection: parses requests, runs one ``Exchange`` at a time
    (pipelined requests wait in ``backlog``), and becomes a byte pipe after CONNECT/101."""

    __slots__ = ("server", "listener", "transport", "parser", "peer", "peer_ip", "peer_ip_bytes", "active",
                 "backlog", "paused", "tunnel", "eof", "pending_error", "peer_principal", "source", "h2_stream")

    def __init__(self, server: ProxyServer, listener: _Listener) -> None:
        self.server = server
        self.listener = listener
        self.transport: asyncio.Transport = None  # type: ignore[assignment]
        self.parser = http1.RequestParser(sink=self)
        self.peer = ""
        self.peer_ip = ""
        self.peer_ip_bytes = b""  # for x-forwarded-for, encoded once per connection
        self.peer_principal: str | None = None  # the mTLS peer's SPIFFE id (no "spiffe://"); None without mTLS
        self.active: Exchange | None = None
        self.backlog: list[tuple[int, Any]] | None = None
        self.paused = 0
        self.tunnel: asyncio.Transport | None = None
        self.eof = False
        self.pending_error: ProtocolError | None = None
        # The local client (SourceWorkload), resolved on first need; a gateway's clients are
        # outside the mesh, and the gateway itself is the source of what it forwards.
        self.source: Any = server.gateway_source() if listener.kind == GATEWAY else None
        self.h2_stream: Any = None               # the http2.DownstreamStream this connection stands for

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self.server
        self.transport = coalescing(transport, server.writes)
        peer = transport.get_extra_info("peername")
        if peer:
            self.peer_ip = peer[0]
            self.peer_ip_bytes = peer[0].encode()
            self.peer = f"{peer[0]}:{peer[1]}"
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if server.peer_identity is not None:
            self.peer_principal = server.peer_identity(transport)
        if self.listener.kind != "inbound":
            server.mtls.accepted(self)          # the local workload that opened it (policies, telemetry)
        server._connections.add(self)
        c = server.counters
        c.active_connections += 1
        c.downstream_connections_total += 1

    def data_received(self, data: bytes) -> None:
        tunnel = self.tunnel
        if tunnel is not None:
            if self.active is not None:
                self.active.bytes_received += len(data)
            tunnel.write(data)
            return
        try:
            self.parser.feed(data)  # parts arrive at on_head / on_data / on_end / on_upgrade
        except ProtocolError as exc:
            self._protocol_error(exc)

    def eof_received(self) -> bool:
        self.eof = True
        flush_held(self.transport)   # returning False closes the transport: what it holds goes first
        tunnel = self.tunnel
        if tunnel is not None:
            ex = self.active
            if tunnel.is_closing() or not tunnel.can_write_eof() or ex is None or ex.pipe is None or ex.pipe.eof:
                return False
            tunnel.write_eof()
            return True
        # A client may half-close after sending its request: answer it, then close.
        return self.active is not None

    def connection_lost(self, exc: Exception | None) -> None:
        server = self.server
        server._connections.discard(self)
        server.counters.active_connections -= 1
        if self.tunnel is not None and not self.tunnel.is_closing():
            self.tunnel.close()
        active = self.active
        if active is not None:
            active.downstream_lost()

    def pause_writing(self) -> None:
        ex = self.active
        if ex is not None:
            ex.downstream_pause_writing()

    def resume_writing(self) -> None:
        ex = self.active
        if ex is not None:
            ex.downstream_resume_writing()

    # flow control: several independent reasons may stop reading from the client

    def pause(self, reason: int) -> None:
        if not self.paused and not self.transport.is_closing():
            self.transport.pause_reading()
        self.paused |= reason

    def resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and not self.transport.is_closing():
                self.transport.resume_reading()

    # request sequencing

    # the request parser's sink: one exchange at a time; parts of pipelined requests wait

    def on_head(self, head: RequestHead) -> None:
        if self.active is not None or self.backlog is not None:
            self._defer(_PART_HEAD, head)
            return
        if self.transport.is_closing():
            return
        ex = self.active = Exchange(self, head)
        try:
            ex.start()
        except Exception:
            ex._crashed()

    def on_data(self, data: bytes) -> None:
        if self.backlog is not None:
            self.backlog.append((_PART_DATA, data))
            return
        ex = self.active
        if ex is not None:  # else: the body of a request already answered; the connection is closing
            try:
                ex.on_body(data)
            except Exception:
                ex._crashed()

    def on_end(self, trailers: list[tuple[bytes, bytes]]) -> None:
        if self.backlog is not None:
            self.backlog.append((_PART_END, trailers))
            return
        ex = self.active
        if ex is not None:
            try:
                ex.on_body_end(trailers)
            except Exception:
                ex._crashed()

    def on_upgrade(self, rest: bytes) -> None:
        if self.backlog is not None:
            self.backlog.append((_PART_UPGRADE, rest))
            return
        ex = self.active
        if ex is not None:
            try:
                ex.on_upgraded(rest)
            except Exception:
                ex._crashed()

    def _defer(self, kind: int, part: Any) -> None:
        """A pipelined request arrived while one is in flight: keep its parts for later."""
        if self.backlog is None:
            self.backlog = []
            self.pause(_PAUSE_BACKLOG)
        self.backlog.append((kind, part))

    def _replay(self, parts: list[tuple[int, Any]]) -> None:
        for i, (kind, part) in enumerate(parts):
            if kind == _PART_HEAD and self.active is not None:
                self.backlog = parts[i:]
                self.pause(_PAUSE_BACKLOG)
                return
            if kind == _PART_HEAD:
                self.on_head(part)
            elif kind == _PART_DATA:
                self.on_data(part)
            elif kind == _PART_END:
                self.on_end(part)
            else:
                self.on_upgrade(part)

    def request_done(self, ex: Exchange, keep_alive: bool) -> None:
        if self.active is not ex:
            return
        self.active = None
        if not keep_alive or self.eof:
            self.transport.close()
            return
        if self.pending_error is not None:
            err, self.pending_error = self.pending_error, None
            self._protocol_error(err)
            return
        backlog = self.backlog
        if backlog is not None:
            self.backlog = None
            self.resume(_PAUSE_BACKLOG)
            self._replay(backlog)

    def _protocol_error(self, exc: ProtocolError) -> None:
        ex = self.active
        if ex is not None:
            if ex.request_complete:
                self.pending_error = exc  # answer the request in flight first
            else:
                ex.downstream_protocol_error()
            return
        if self.transport.is_closing():
            return
        body = exc.reason.encode()
        head = http1.response_head(exc.status, None, [
            (b"content-length", b"%d" % len(body)), (b"content-type", b"text/plain"), (b"connection", b"close")])
        self.transport.write(head + body)
        self.transport.close()
        server = self.server
        server.record("unknown", exc.status, 0.0, flags.DPE)
        if server.telemetry is not None:
            server.telemetry.record(server.state.snapshot, None, None, None, None, None, time.time(), exc.status,
                                    flags.DPE, 0.0, 0, len(head) + len(body))
        server.access_log.log(time.time(), "-", "-", "HTTP/1.1", exc.status, flags.DPE, 0, len(body), 0, None,
                              None, None, None, "", None, None, None, self.peer, self.listener.name)

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


# -- one request ---------------------------------------------------------------------------------


class Exchange:
    """One request/response through the proxy, as a callback-driven state machine.

    Compiled (see setup.py), it is an extension type whose fields are C struct members
    (``server.pxd``), so setting all of them here costs next to nothing.
    """

    def __init__(self, conn: HttpConnection, head: RequestHead) -> None:
        self.conn = conn
        server = conn.server
        self.server = server
        self.state = server.state
        self.head = head
        self.loop = server.loop
        self.t0 = time.monotonic()
        self.t_wall = time.time()
        self.duration_ms = 0.0                         # set when it completes
        self.flags: list[str] = []
        self.body: list[bytes] = []
        self.tried: list[str] = []
        self.out: list[bytes] = []
        self.tunnel_pending: list[bytes] | None = None    # early tunnel bytes, CONNECT only
        self.req: RequestInfo | None = None
        self.route: Route | None = None
        self.match: Any = None
        self.wc: WeightedCluster | None = None
        self.cluster: Cluster | None = None
        self.balancer: LoadBalancer | None = None
        self.done = False
        self.request_complete = False
        self.bytes_received = 0
        self.bytes_sent = 0
        self.body_size = 0
        self.body_retriable = True
        self.trailers: list[tuple[bytes, bytes]] = []       # replaced, never mutated
        self.up_head = b""
        self.upstream: UpstreamConnection | None = None
        self.endpoint: Endpoint | None = None
        self.attempt = 0
        self.connecting: asyncio.Task[Any] | None = None
        self.try_timer: asyncio.TimerHandle | None = None
        self.route_timer: asyncio.TimerHandle | None = None
        self.retry_timer: asyncio.TimerHandle | None = None
        self.response_started = False
        self.resp_chunked = False
        self.close_after = False
        self.up_start = 0.0
        self.up_time: int | None = None
        self.request_id: str | None = None
        self.xff: str | None = None
        self.status = 0
        self.resp_ops: tuple[HeaderOps, ...] = ()
        self.set_cookie: bytes | None = None
        self.pipe: Pipe | None = None
        self.up_paused = False
        self.counted_on_start = False
        self.up_keep_alive = True
        self.resp_head_bytes = 0
        self.rl_bucket: Bucket | None = None          # set when the rate limit asks for x-ratelimit-* headers
        self.cors_ops: HeaderOps | None = None        # access-control-* headers for an allowed CORS origin
        self.mirror_pending: tuple[list[tuple[bytes, bytes]], bytes] | None = None   # (headers, path) until the body ends
        self.authz: RequestAuthorization | None = None   # set when AuthorizationPolicy applies to the destination
        self.span: Any = None                          # this hop's tracing.Span, when a tracer traces it
        self.up_tls: UpstreamTls | None = None        # the last attempt's transport security (telemetry)
        self.resilience: ClusterResilience | None = None   # the cluster's circuit breakers / outlier detection
        self.grpc_status: int | None = None            # the reply's grpc-status, for gRPC calls
        self.cache: CacheFilter | None = None          # set when the response matters to an HTTP cache
        server.counters.active_requests += 1

    # crash containment: a bug in one request never takes the proxy down

    def guard(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            self._crashed()

    def _crashed(self) -> None:
        """Log the exception being handled; answer 500, or cut the response if it had begun."""
        self.server.counters.crashes += 1
        log.exception("request handling failed: %s %s", self.head.method, self.head.target)
        if self.done:
            return
        if self.response_started:
            self._abort_downstream(None)
        else:
            self._end_attempt()
            self.local_reply(500, b"internal error", None, close=True)

    # routing

    def start(self) -> None:
        head = self.head
        conn = self.conn
        listener = conn.listener
        headers = {n.decode("latin-1"): v.decode("latin-1") for n, v in head.headers}
        if len(headers) != len(head.headers):
            headers = _joined_headers(head.headers)
        self.xff = headers.get("x-forwarded-for")
        rid = headers.get("x-request-id")
        self.request_id = rid if rid is not None else self.server.next_request_id()
        method = head.method.decode("latin-1")
        target = head.target.decode("latin-1")
        if method == "CONNECT":
            self.req = RequestInfo(method, "", target, headers, "http", 0, conn.peer_ip)
            if listener.kind == GATEWAY:   # no tunnels into the mesh from outside: Envoy finds no route
                self.local_reply(404, b"", flags.NR, close=True)
                return
            self._start_tunnel(target)
            return
        if listener.kind == "inbound":
            self.req = RequestInfo(method, target, headers.get("host", ""), headers, "http", 0, conn.peer_ip)
            self.local_reply(405, b"inbound listener accepts CONNECT only", None, close=True)
            return
        if target.startswith("/"):
            authority = headers.get("host", "")
            path = target
            if not authority and head.version == "1.1":
                self.req = RequestInfo(method, path, "", headers, "http", 0, conn.peer_ip)
                self.local_reply(400, b"missing host header", flags.DPE, close=True)
                return
        elif target[:7].lower() == "http://":
            rest = target[7:]
            i = rest.find("/")
            authority, path = (rest, "/") if i < 0 else (rest[:i], rest[i:])
            headers["host"] = authority
        else:
            self.req = RequestInfo(method, target, headers.get("host", ""), headers, "http", 0, conn.peer_ip)
            self.local_reply(400, b"unsupported request target", flags.DPE, close=True)
            return
        vip = listener.vip
        router = self.state.router
        if vip is not None:
            port, default_host = vip.port, vip.host
        elif listener.kind == GATEWAY:
            port, default_host = listener.config_port, None
            router = self.state.gateway_routers.get(listener.route_key or listener.name)
        else:
            port = split_host_port(authority)[1] or 80
            default_host = None
        req = self.req = RequestInfo(method, path, authority, headers, listener.scheme, port, conn.peer_ip)
        vhost = router.virtual_host(authority, port, default_host) if router is not None else None
        if vhost is None:
            if listener.kind == GATEWAY:   # Envoy's gateway: no virtual host for this Host
                self.local_reply(404, b"", flags.NR)
            else:
                self._no_virtual_host()
            return
        if vhost.uses_source:   # sourceLabels / sourceNamespace: who opened the connection
            req.source = self.server.mtls.workload_of(conn)
        found = router.match_with(vhost, req)
        if found is None:
            self.local_reply(404, b"", flags.NR)
            return
        route, self.match = found
        self.route = route
        if route.cors is not None and self._cors_answered(route.cors, req):
            return
        limiter = self.state.rate_limits.get(vhost.host)  # the only cost when no policy applies
        if limiter is not None and not self._within_rate_limit(limiter, route, req):
            return
        if route.direct_response is not None:
            dr = route.direct_response
            self.local_reply(dr.status, dr.body, None, ops=route.headers.response)
            return
        if route.redirect is not None:
            location = redirect_location(route.redirect, req, self.match)
            self.local_reply(route.redirect.redirect_code, b"", None,
                             extra=[(b"location", location.encode("latin-1"))], ops=route.headers.response)
            return
        if route.fault is not None:
            fault = decide_fault(route.fault, self.server.rng)
            if fault.delay is not None:
                self.flags.append(flags.DI)
                self.retry_timer = self.loop.call_later(fault.delay, self._after_delay, fault)
                return
            if fault.abort_status is not None:
                self._fault_abort(fault)
                return
        self._to_cluster()

    def _cors_answered(self, cors: CorsPolicy, req: RequestInfo) -> bool:
        """Envoy's CORS filter (see ``policy.decide_cors``): answer a preflight here, or remember
        the headers an allowed origin's response gets.  True when the request was answered.

        It runs before the rate limit, so preflights never spend tokens, and its headers reach
        local replies too (rate limit, faults, errors), as Envoy's encoder path gives them.
        """
        decision = decide_cors(cors, req.method, req.headers)
        if decision.preflight is not None:
            self.local_reply(200, b"", None, extra=list(decision.preflight))
            return True
        self.cors_ops = decision.response
        return False

    def _within_rate_limit(self, limiter: HostRateLimiter, route: Route, req: RequestInfo) -> bool:
        """Envoy's local, then global, rate limit filters: take a token (for a global limit, from
        the proxy's Mixer lease) or answer as ``HostRateLimiter.denial`` says (flag RL or RLSE).

        It runs after routing (a route may have a bucket of its own) and before fault
        injection, direct responses and the upstream, as the filter precedes the router.
        """
        if limiter.uses_principal:
            req.source_principal = source_principal(self.server.mtls, self.conn) or None   # "": anonymous
        bucket = limiter.bucket_for(route.name, req)
        if bucket is None:
            return True
        spec = limiter.spec
        if spec.response_headers:
            self.rl_bucket = bucket
        if bucket.try_consume():
            return True
        status, body, flag, extra = limiter.denial(bucket)   # local or global (proxy_core.quota)
        self.local_reply(status, body, flag, extra=extra)
        return False

    def _after_delay(self, fault: FaultDecision) -> None:
        self.retry_timer = None
        if self.done:
            return
        if fault.abort_status is not None:
            self._fault_abort(fault)
        else:
            self.guard(self._to_cluster)

    def _fault_abort(self, fault: FaultDecision) -> None:
        """Envoy's fault abort: the HTTP status, or for ``grpc_status`` a trailers-only gRPC reply."""
        if fault.abort_grpc_status is None:
            self.local_reply(fault.abort_status, b"fault filter abort", flags.FI)  # type: ignore[arg-type]
        else:
            self.local_reply(200, b"", flags.FI, extra=trailers_only(fault.abort_grpc_status, "fault filter abort"))

    def _no_virtual_host(self) -> None:
        """Istio's outbound policy for hosts the registry does not know."""
        req = self.req
        assert req is not None
        snapshot = self.state.snapshot
        if snapshot.outbound_policy == "REGISTRY_ONLY":
            self.wc = WeightedCluster(BLACKHOLE_CLUSTER)
            self.local_reply(502, b"", None, route_name="block_all")
            return
        host, port = split_host_port(req.authority)
        host = host.strip("[]")
        if not host:
            self.local_reply(404, b"", flags.NR)
            return
        if _is_ip(host):
            self._passthrough(host, port or 80)
            return
        task = self.loop.create_task(self.loop.getaddrinfo(host, port or 80, family=socket.AF_INET,
                                                            type=socket.SOCK_STREAM))
        self.connecting = task
        task.add_done_callback(self._on_resolved)

    def _on_resolved(self, task: asyncio.Task[Any]) -> None:
        if task is not self.connecting or task.cancelled():
            return
        self.connecting = None
        if task.exception() is not None or not task.result():
            self.guard(self.local_reply, 404, b"", flags.NR)
            return
        address, port = task.result()[0][4][:2]
        self.guard(self._passthrough, address, port)

    def _passthrough(self, address: str, port: int) -> None:
        """ALLOW_ANY: forward to the address the client named (Istio's PassthroughCluster)."""
        req = self.req
        assert req is not None
        self.wc = WeightedCluster(PASSTHROUGH_CLUSTER)
        self.cluster = Cluster(PASSTHROUGH_CLUSTER, "", port, "", LbPolicy("ROUND_ROBIN"), (Endpoint(address, port),))
        self.balancer = make_balancer(self.cluster)
        self._prepare_upstream(req.path, req.authority, ())

    def _to_cluster(self) -> None:
        route = self.route
        req = self.req
        assert route is not None and req is not None
        if not route.clusters:
            self.local_reply(503, b"", flags.NC)
            return
        try:
            wc = self.state.router.pick(route, self.server.rng)
        except ValueError:
            self.local_reply(503, b"", flags.NC)
            return
        self.wc = wc
        cluster = self.state.snapshot.clusters.get(wc.cluster)
        if cluster is None:
            self.local_reply(503, b"", flags.NC)
            return
        self.cluster = cluster
        self.balancer = self.state.balancers[wc.cluster]
        self.resilience = self.state.resilience.get(wc.cluster)   # the only cost when no limits apply
        if route.rewrite is None:
            path, authority = req.path, req.authority
        else:
            path, authority = rewrite_target(route, req.path, req.authority, self.match)
        ops, self.resp_ops = self.state.header_ops(route, wc)
        cookie = self.balancer.hash_cookie_to_set(req) if cluster.lb.hash_cookie else None
        if cookie is not None:
            name, value = cookie
            req.generated_cookie = value
            self.set_cookie = value.encode("latin-1") if "=" in value else f"{name}={value}".encode("latin-1")
        timeout = route.timeout
        stream = self.conn.h2_stream
        if stream is not None and stream.grpc_timeout is not None:
            timeout = stream.grpc_timeout  # the caller's deadline replaces the route's (Istio: no cap)
        if timeout:
            self.route_timer = self.loop.call_later(timeout, self._on_route_timeout)
        security = self.state.security.get(wc.cluster)  # the only cost when no policy applies
        if security is not None:
            security.admit(self, path, authority, ops, self._prepare_upstream)  # 401, or on to the upstream
            return
        self._prepare_upstream(path, authority, ops)

    def _prepare_upstream(self, path: str, authority: str, ops: tuple[HeaderOps, ...]) -> None:
        """Build the upstream request head once; every attempt reuses it."""
        head = self.head
        out: list[tuple[bytes, bytes]] = [(b"host", authority.encode("latin-1"))]
        connection_listed: bytes | None = None
        has_xfp = False
        has_rid = False
        upgrade = head.upgrade
        for h in head.headers:
            n = h[0]
            if n not in _REQUEST_SPECIAL:  # the common case: one set lookup per header
                out.append(h)
            elif n in HOP_BY_HOP_BYTES:
                if n == b"connection":
                    connection_listed = h[1]
                elif upgrade and n == b"upgrade":
                    out.append(h)
            elif n == b"x-forwarded-proto":
                has_xfp = True
                out.append(h)
            elif n == b"x-request-id":
                has_rid = True
                out.append(h)
            # host, x-forwarded-for and expect are rewritten or dropped
        if connection_listed is not None:
            listed = {t.strip().lower() for t in connection_listed.split(b",")}
            listed.discard(b"upgrade")
            if listed - {b"close", b"keep-alive"}:
                out = [h for h in out if h[0] not in listed]
        ip = self.conn.peer_ip_bytes
        out.append((b"x-forwarded-for", (self.xff.encode("latin-1") + b", " + ip) if self.xff else ip))
        if not has_xfp:
            out.append((b"x-forwarded-proto", b"https" if self.req.scheme == "https" else b"http"))
        if not has_rid:
            out.append((b"x-request-id", self.request_id.encode()))  # type: ignore[union-attr]
        for o in ops:
            out = _apply_ops(out, o)
        if self.server.tracer is not None:
            out = trace_upstream(self.server.tracer, self, out)
        route = self.route
        mirrored = not upgrade and route is not None and bool(route.mirrors)
        if mirrored:
            self.mirror_pending = (list(out), path.encode("latin-1"))
        cache = self.state.caches.get(self.cluster.service) if self.state.caches else None
        if cache is not None and not upgrade and self.authz is None and CacheFilter.start(cache, self, path, authority, out):
            return  # answered from the cache
        if upgrade:
            out.append((b"connection", b"upgrade"))
        elif head.chunked:
            out.append((b"transfer-encoding", b"chunked"))
        self.up_head = http1.request_head(head.method, path.encode("latin-1"), out)
        if head.expect_continue and not self.request_complete:
            # Envoy answers 100-continue itself and strips Expect before forwarding.
            self.conn.transport.write(_CONTINUE)
        self._attempt()
        if mirrored and self.request_complete:
            self._send_mirrors()

    def _send_mirrors(self) -> None:
        """Copy the complete request to the route's sampled mirrors (Envoy request mirroring).

        Called once the whole request is known: the copies carry the body, so only a body
        that fits the retry buffer and was read whole is mirrored; otherwise the copies are
        skipped (counted).  Each copy has the headers sent upstream (rewrites and header
        operations applied), Host ``<host>-shadow[:port]``, and a ``content-length`` framing
        its body; a request that ended with trailers is copied chunked, trailers included.
        The sender takes it to each mirror cluster as this request would travel there
        (HTTP/2 for an http2/grpc port, the node tunnel with this client's mTLS identity).
        """
        pending = self.mirror_pending
        route = self.route
        assert pending is not None and route is not None and self.req is not None
        self.mirror_pending = None
        server = self.server
        rng = server.rng
        targets = [m for m in route.mirrors if mirror_sampled(m.percentage, rng)]
        if not targets:
            return
        sender = server.mirrors
        if not self.body_retriable or self.body_size != self.bytes_received:
            sender.counters.skipped_body += len(targets)
            return
        headers, path = pending
        body = b"".join(self.body)
        head = self.head
        copy: list[tuple[bytes, bytes]] = []
        authority = b""
        for h in headers:
            n = h[0]
            if n == b"host":
                authority = h[1]
            elif n != b"content-length":
                copy.append(h)
        copy.insert(0, (b"host", shadow_authority(authority.decode("latin-1")).encode("latin-1")))
        if self.trailers:
            copy.append((b"transfer-encoding", b"chunked"))
            data = http1.request_head(head.method, path, copy) + http1.chunk(body) + http1.last_chunk(self.trailers)
        else:
            if body or head.content_length is not None or head.chunked:
                copy.append((b"content-length", b"%d" % len(body)))
            data = http1.request_head(head.method, path, copy) + body
        timeout = route.timeout or MIRROR_TIMEOUT
        for m in targets:
            sender.send(self.loop, self.state.snapshot.clusters, self.state.balancers, m.cluster, self.req, data,
                        head.method == b"HEAD", timeout, self.conn)

    # upstream attempts

    def _attempt(self) -> None:
        balancer = self.balancer
        assert balancer is not None and self.cluster is not None
        ep = balancer.pick(self.req, self.tried)
        if ep is None:
            self.local_reply(503, _MSG_UH, flags.UH)
            return
        if self.authz is not None and not self.authz.permits(self, ep):
            return  # answered 403
        self.attempt += 1
        self.endpoint = ep
        self.tried.append(ep.key)
        balancer.on_start(ep)
        self.counted_on_start = True
        retries = self.route.retries if self.route is not None else None
        if retries is not None and retries.per_try_timeout:
            self.try_timer = self.loop.call_later(retries.per_try_timeout, self._on_try_timeout)
        cluster = self.cluster
        if ep.via is None and cluster.tls is None and not cluster.http2 and not cluster.use_downstream_protocol:
            h2, tls = False, None   # loopback plaintext HTTP/1.1: upstream_plan's answer, without the call
        else:
            h2, tls = upstream_plan(self.server.mtls, ep, cluster, self.conn, self.head.upgrade)
        self.up_tls = tls
        if self.resilience is not None:   # circuit breakers: idle connection, dial, queue or 503 UO
            if not h2:
                self.resilience.dispatch(self, ep, ep.pool_key if tls is None else (ep.pool_key, tls.key), tls)
                return
            if not self.resilience.admit_stream(self):
                return    # answered 503 UO
        pool = self.server.h2_pool if h2 else self.server.pool
        conn = pool.take_idle(ep.pool_key if tls is None else (ep.pool_key, tls.key))
        if conn is not None:
            self._send(conn)
            return
        task = self.loop.create_task(pool.connect(ep, self.cluster.connect_timeout, tls))
        self.connecting = task
        task.add_done_callback(self._on_connected)

    def _on_connected(self, task: asyncio.Task[Any]) -> None:
        if task is not self.connecting:
            # A dial this exchange gave up on; a healthy fresh connection still serves the pool.
            if not task.cancelled() and task.exception() is None:
                self.server.pool.release(task.result())
            return
        self.connecting = None
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            if not isinstance(exc, ConnectError):
                log.error("dial failed unexpectedly", exc_info=exc)
            self._attempt_failed("connect-failure")
            return
        self.guard(self._send, task.result())

    def _send(self, conn: UpstreamConnection) -> None:
        self.upstream = conn
        conn.attach(self)
        if self.cache is not None:
            conn.parser.sink = self.cache   # it forwards every part to this exchange
        if self.head.method == b"HEAD":
            conn.parser.expect_head_response()
        self.up_start = time.monotonic()
        chunked = self.head.chunked
        parts = [self.up_head]
        if self.body:
            parts.extend([http1.chunk(b) for b in self.body] if chunked else self.body)
            if not self.body_retriable:
                self.body = []
        if self.request_complete and chunked:
            parts.append(http1.last_chunk(self.trailers))
        conn.transport.write(b"".join(parts) if len(parts) > 1 else parts[0])
        if self.conn.paused:
            self.conn.resume(_PAUSE_BODY)

    def _attempt_failed(self, kind: str, flag: str | None = None) -> None:
        """An attempt ended without a usable response: retry, or answer with Envoy's flag."""
        self._end_attempt()
        resilience = self.resilience
        if resilience is not None:
            resilience.report_failure(self.endpoint, kind)
        retries = self.route.retries if self.route is not None else None
        if retries is not None and self.body_retriable and retry_on_failure(retries, kind):
            if self.attempt > retries.attempts:
                self.flags.append(flags.URX)
            elif resilience is None or resilience.admit_retry(self):   # else flagged UO, answered below
                self._schedule_retry()
                return
        if kind == "timeout":
            self.local_reply(504, _MSG_UT, flags.UT)
        elif kind == "connect-failure":
            self.local_reply(503, _MSG_UF, flags.UF)
        elif flag == flags.UPE:
            self.local_reply(502, _MSG_UPE, flags.UPE)
        else:
            self.local_reply(503, _MSG_UC, flags.UC)

    def _schedule_retry(self) -> None:
        delay = backoff_delay(self.attempt, rng=self.server.rng)
        self.retry_timer = self.loop.call_later(delay, self._retry)

    def _retry(self) -> None:
        self.retry_timer = None
        if self.resilience is not None:
            self.resilience.retry_fired(self)
        if not self.done:
            self.guard(self._attempt)

    def _end_attempt(self) -> None:
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None
        if self.connecting is not None:
            task, self.connecting = self.connecting, None
            task.cancel()
        if self.counted_on_start:
            self.counted_on_start = False
            assert self.balancer is not None and self.endpoint is not None
            self.balancer.on_end(self.endpoint)
        self._release_upstream(False)
        if self.resilience is not None:
            self.resilience.attempt_ended(self)

    def _release_upstream(self, reusable: bool) -> None:
        conn = self.upstream
        if conn is None:
            return
        self.upstream = None
        conn.detach()
        if self.up_paused:
            self.up_paused = False
            if not conn.closed:
                conn.transport.resume_reading()  # type: ignore[union-attr]
        if reusable and not conn.closed:
            self.server.pool.release(conn)
        else:
            conn.close()

    # request body from downstream

    def on_body(self, data: bytes) -> None:
        self.bytes_received += len(data)
        if self.done:
            return  # answered already: the rest of the body is read and dropped
        if self.head.upgrade and self.request_complete:
            self._early_tunnel_bytes(data)
            return
        if self.body_retriable:
            self.body_size += len(data)
            if self.body_size > RETRY_BUFFER_LIMIT:
                self.body_retriable = False
        conn = self.upstream
        if conn is None:
            self.body.append(data)
            if not self.done and sum(map(len, self.body)) > _BODY_BUFFER_HIGH:
                self.conn.pause(_PAUSE_BODY)
            return
        if self.body_retriable:
            self.body.append(data)
        elif self.body:
            self.body = []
        conn.transport.write(http1.chunk(data) if self.head.chunked else data)  # type: ignore[union-attr]

    def on_body_end(self, trailers: list[tuple[bytes, bytes]]) -> None:
        self.request_complete = True
        self.trailers = trailers
        conn = self.upstream
        if conn is not None and self.head.chunked:
            conn.transport.write(http1.last_chunk(trailers))  # type: ignore[union-attr]
        if self.mirror_pending is not None:
            self._send_mirrors()
        if self.done:
            self._finish_downstream()

    def on_upgraded(self, rest: bytes) -> None:
        """The parser switched to raw bytes (CONNECT, or an Upgrade request)."""
        self.request_complete = True
        if rest:
            self._early_tunnel_bytes(rest)

    def _early_tunnel_bytes(self, data: bytes) -> None:
        """Bytes for a tunnel that has no pipe yet: kept until it is connected."""
        if self.tunnel_pending is None:
            self.tunnel_pending = []
        self.tunnel_pending.append(data)

    # responses from upstream: the exchange is the sink of its upstream's response parser

    def on_head(self, rh: ResponseHead) -> None:
        if rh.status < 200:
            if rh.status == 101 and self.head.upgrade:
                self._upgrade_response(rh)
            return  # 100 Continue / 103 Early Hints: the real response follows
        self._response_head(rh)

    def on_data(self, data: bytes) -> None:
        self.bytes_sent += len(data)
        self.out.append(http1.chunk(data) if self.resp_chunked else data)

    def on_end(self, trailers: list[tuple[bytes, bytes]]) -> None:
        out = self.out
        if self.resp_chunked:
            out.append(http1.last_chunk(trailers))
        if out:
            self.conn.transport.write(b"".join(out) if len(out) > 1 else out[0])
            self.out = []
        conn = self.upstream
        self._complete(conn is not None and not conn.parser.close_delimited and self.up_keep_alive)

    def on_upgrade(self, rest: bytes) -> None:
        if rest and self.pipe is not None:
            self.conn.transport.write(rest)

    def flush(self) -> None:
        """Write what the last upstream read produced: one downstream write per upstream read."""
        out = self.out
        if out:
            self.out = []
            self.conn.transport.write(b"".join(out) if len(out) > 1 else out[0])

    def _response_head(self, rh: ResponseHead) -> None:
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None
        status = rh.status
        self.up_time = int((time.monotonic() - self.up_start) * 1000)
        resilience = self.resilience
        if resilience is not None:
            resilience.report_status(self.endpoint, status)
        retries = self.route.retries if self.route is not None else None
        if retries is not None and (retry_on_status(retries, status) or (
                self.grpc_status is not None and retry_on_grpc_status(retries, self.grpc_status))):
            if not (self.attempt <= retries.attempts and self.body_retriable and self.request_complete):
                self.flags.append(flags.URX)
            elif resilience is None or resilience.admit_retry(self):   # else flagged UO
                self._end_attempt()  # detaches the parser: the rest of this response is dropped
                self._schedule_retry()
                return
        self.status = status
        self.response_started = True
        head = self.head
        method = head.method
        headers: list[tuple[bytes, bytes]] = []
        listed: bytes | None = None
        for n, v in rh.headers:
            if n in HOP_BY_HOP_BYTES:
                if n == b"connection":
                    listed = v
                continue
            headers.append((n, v))
        if listed is not None and listed.lower() not in _PLAIN_CONNECTION:
            names = {t.strip().lower() for t in listed.split(b",")} - _PLAIN_CONNECTION
            if names:
                headers = [h for h in headers if h[0] not in names]
        for o in self.resp_ops:
            headers = _apply_ops(headers, o)
        if self.cors_ops is not None:
            headers = _apply_ops(headers, self.cors_ops)
        if self.rl_bucket is not None:
            headers.extend(self.rl_bucket.x_ratelimit_headers())
        if self.set_cookie is not None:
            headers.append((b"set-cookie", self.set_cookie))
        keep_alive = head.keep_alive and not self.conn.eof and not head.upgrade
        if rh.content_length is None and not _no_body(method, status):
            if head.version != "1.0":  # HTTP/1.1, or an HTTP/2 stream (http2.DownstreamStream)
                self.resp_chunked = True
                headers.append((b"transfer-encoding", b"chunked"))
            else:
                keep_alive = False  # HTTP/1.0 client: the body ends when we close
        elif rh.chunked and method == b"HEAD":
            headers.append((b"transfer-encoding", b"chunked"))
        if not keep_alive:
            self.close_after = True
            headers.append((b"connection", b"close"))
        elif head.version == "1.0":
            headers.append((b"connection", b"keep-alive"))
        self.up_keep_alive = rh.keep_alive
        resp_head = http1.response_head(status, rh.reason, headers)
        self.resp_head_bytes = len(resp_head)
        self.out.append(resp_head)

    def _upgrade_response(self, rh: ResponseHead) -> None:
        """101 Switching Protocols: both connections become one byte pipe."""
        self.status = 101
        self.response_started = True
        headers = [(n, v) for n, v in rh.headers if n != b"connection" and n != b"keep-alive"]
        headers.append((b"connection", b"upgrade"))
        resp_head = http1.response_head(101, rh.reason, headers)
        self.resp_head_bytes = len(resp_head)
        self.conn.transport.write(resp_head)
        conn = self.upstream
        assert conn is not None and conn.transport is not None
        self.upstream = None
        conn.detach()
        if self.try_timer is not None:
            self.try_timer.cancel()
            self.try_timer = None
        if self.route_timer is not None:
            self.route_timer.cancel()
            self.route_timer = None
        pipe = Pipe()
        up = conn.transport = direct(conn.transport)
        up.set_protocol(pipe)
        pipe.connection_made(up)
        conn.parser.sink = UpgradeRest(pipe)   # the origin's first frames, read with the 101
        self._splice(pipe, up)

    def upstream_error(self, exc: ProtocolError) -> None:
        if self.done:
            return
        if self.response_started:
            self.flags.append(flags.UPE)
            self._abort_downstream(None)
        else:
            self._attempt_failed("reset", flags.UPE)

    def upstream_lost(self, exc: Exception | None) -> None:
        if self.done:
            return
        conn = self.upstream
        if self.response_started:
            self.flags.append(flags.UC)
            self._abort_downstream(None)
            return
        if conn is not None and conn.reused and not conn.got_data and self.attempt == 1 and self.body_retriable:
            # A pooled keep-alive connection the upstream had already closed: the request
            # never reached it, so resend on a fresh connection (not counted as a retry).
            self.upstream = None
            self._end_attempt()
            self.attempt -= 1
            self.guard(self._attempt)
            return
        self._attempt_failed("refused-stream" if isinstance(exc, StreamRefused) else "reset")

    def upstream_pause_writing(self) -> None:
        self.conn.pause(_PAUSE_UPSTREAM)

    def upstream_resume_writing(self) -> None:
        self.conn.resume(_PAUSE_UPSTREAM)

    def downstream_pause_writing(self) -> None:
        conn = self.upstream
        if conn is not None and conn.transport is not None and not self.up_paused:
            self.up_paused = True
            conn.transport.pause_reading()
        elif self.pipe is not None and self.pipe.transport is not None:
            self.pipe.transport.pause_reading()

    def downstream_resume_writing(self) -> None:
        conn = self.upstream
        if conn is not None and conn.transport is not None and self.up_paused:
            self.up_paused = False
            conn.transport.resume_reading()
        elif self.pipe is not None and self.pipe.transport is not None:
            self.pipe.transport.resume_reading()

    # timeouts

    def _on_try_timeout(self) -> None:
        self.try_timer = None
        if not self.done and not self.response_started:
            self.guard(self._attempt_failed, "timeout")

    def _on_route_timeout(self) -> None:
        self.route_timer = None
        if self.done:
            return
        if self.response_started:
            self.flags.append(flags.UT)
            self._abort_downstream(None)
            return
        if self.retry_timer is not None:
            self.retry_timer.cancel()
            self.retry_timer = None
        self._end_attempt()
        self.local_reply(504, _MSG_UT, flags.UT)

    # CONNECT tunnels

    def _start_tunnel(self, target: str) -> None:
        host, port = split_host_port(target)
        listener = self.conn.listener
        if port is None:
            self.local_reply(400, b"CONNECT needs host:port", flags.DPE, close=True)
            return
        host = host.strip("[]")
        if listener.kind == "inbound":
            if not _is_loopback(host) or (host, port) not in self.state.local_endpoints:
                self.local_reply(403, b"tunnel target is not a local endpoint", None, close=True)
                return
            refusal = self.server.mtls.admit(self.state.snapshot, self.conn.peer_principal, host, port)
            if refusal is not None:
                self.local_reply(403, refusal.encode(), None, close=True)
                return
            if not self.server.security.permits_inbound(self.state.snapshot, self.state.security,
                                                        self.conn.peer_principal, host, port):
                self.local_reply(403, DENIED_BODY, flags.RBAC, close=True)   # AuthorizationPolicy
                return
            ep = Endpoint(host, port)
            self.wc = WeightedCluster(f"inbound|{port}||")
        else:
            ep = self._tunnel_endpoint(target, host, port)  # type: ignore[assignment]
            if ep is None:
                return
        self.endpoint = ep
        self.conn.pause(_PAUSE_TUNNEL)
        self.server.counters.tunnels_total += 1
        timeout = self.cluster.connect_timeout if self.cluster is not None else 10.0
        tls = upstream_tls(self.server.mtls, ep, self.cluster, self.conn) if listener.kind != "inbound" else None
        self.up_tls = tls
        task = self.loop.create_task(self.server.dialer.open(ep, Pipe, timeout, tls))
        self.connecting = task
        task.add_done_callback(self._on_tunnel_connected)

    def _tunnel_endpoint(self, target: str, host: str, port: int) -> Endpoint | None:
        """CONNECT on the proxy listener: a known service goes through its default route's cluster."""
        state = self.state
        req = self.req
        assert req is not None
        vhost = state.router.virtual_host(target, port)
        if vhost is None:
            if state.snapshot.outbound_policy == "REGISTRY_ONLY":
                self.local_reply(502, b"", None, route_name="block_all", close=True)
                return None
            self.wc = WeightedCluster(PASSTHROUGH_CLUSTER)
            return Endpoint(host, port)
        route = next((r for r in vhost.routes if r.clusters), None)
        if route is None:
            self.local_reply(404, b"", flags.NR, close=True)
            return None
        self.route = route
        wc = self.wc = state.router.pick(route, self.server.rng)
        cluster = state.snapshot.clusters.get(wc.cluster)
        if cluster is None:
            self.local_reply(503, b"", flags.NC, close=True)
            return None
        self.cluster = cluster
        ep = state.balancers[wc.cluster].pick(req)
        if ep is None:
            self.local_reply(503, _MSG_UH, flags.UH, close=True)
            return None
        security = state.security.get(wc.cluster)  # the tunnel carries opaque bytes: TCP rules apply
        return ep if security is None or security.permits_tunnel(self, ep) else None

    def _on_tunnel_connected(self, task: asyncio.Task[Any]) -> None:
        if task is not self.connecting:
            if not task.cancelled() and task.exception() is None:
                task.result().transport.close()
            return
        self.connecting = None
        if task.cancelled():
            return
        if task.exception() is not None:
            self.conn.resume(_PAUSE_TUNNEL)
            self.local_reply(503, _MSG_UF, flags.UF, close=True)
            return
        pipe: Pipe = task.result()
        self.status = 200
        self.response_started = True
        self.conn.transport.write(_CONNECT_OK)
        assert pipe.transport is not None
        self._splice(pipe, pipe.transport)
        if self.server.tcp_telemetry is not None and self.conn.listener.kind != "inbound":
            open_tunnel(self.server.tcp_telemetry, self)

    def _splice(self, pipe: Pipe, up: asyncio.Transport) -> None:
        self.pipe = pipe
        conn = self.conn
        # A pipe half-closes and closes from the loop's callbacks: its writes go out at once.
        conn.transport = direct(conn.transport)
        pending, self.tunnel_pending = self.tunnel_pending or [], None
        if pending:
            up.write(b"".join(pending))
        conn.tunnel = up
        pipe.link(conn.transport, conn)
        pipe.on_close = self._tunnel_closed
        conn.resume(_PAUSE_TUNNEL)
        if conn.transport.is_closing():
            up.close()
        elif conn.eof and not up.is_closing() and up.can_write_eof():
            up.write_eof()     # the client half-closed before the tunnel was up

    def _tunnel_closed(self) -> None:
        if self.pipe is not None:
            self.bytes_sent = self.pipe.bytes_in
        if self.server.tcp_telemetry is not None:
            close_tunnel(self.server.tcp_telemetry, self)
        self._complete(False)

    # completion

    def local_reply(self, status: int, body: bytes, flag: str | None, *, close: bool = False,
                    extra: list[tuple[bytes, bytes]] | None = None, ops: HeaderOps | None = None,
                    route_name: str | None = None) -> None:
        """Answer from the proxy itself (errors, direct responses, redirects)."""
        if self.done:
            return
        wire_status = status
        stream = self.conn.h2_stream
        if stream is not None and stream.grpc and status != 200 and not any(n == b"grpc-status" for n, _ in extra or ()):
            # Envoy's local replies to gRPC callers: HTTP 200, trailers-only, the status mapped to a
            # gRPC code; the access log and metrics keep the HTTP status (Envoy's response code).
            message = body.decode("utf-8", "replace") or http1.reason_phrase(status).decode()
            extra = [*(extra or ()), *trailers_only(http_to_grpc_status(status), message)]
            wire_status, body = 200, b""
        headers: list[tuple[bytes, bytes]] = list(extra) if extra else []
        if body:
            headers.append((b"content-type", b"text/plain"))
        if ops:
            headers = _apply_ops(headers, ops)
        if self.cors_ops is not None:
            headers = _apply_ops(headers, self.cors_ops)
        if self.rl_bucket is not None:
            headers.extend(self.rl_bucket.x_ratelimit_headers())
        headers.append((b"content-length", b"%d" % len(body)))
        if flag is not None:
            self.flags.append(flag)
        if route_name is not None:
            self.route = Route(route_name)
        self.status = status
        self.response_started = True
        head = self.head
        if close or not head.keep_alive or head.upgrade or (head.expect_continue and not self.request_complete):
            self.close_after = True
            headers.append((b"connection", b"close"))
        if self.conn.transport.is_closing():
            self._complete(False)
            return
        resp_head = http1.response_head(wire_status, None, headers)
        self.resp_head_bytes = len(resp_head)
        self.conn.transport.write(resp_head + (body if head.method != b"HEAD" else b""))
        self.bytes_sent = len(body)
        self._complete(False)

    def _abort_downstream(self, flag: str | None) -> None:
        if flag is not None:
            self.flags.append(flag)
        self.close_after = True
        self.conn.transport.close()
        self._complete(False)

    def downstream_lost(self) -> None:
        if self.done:
            return
        if self.pipe is not None:
            return  # the pipe reports when both sides are gone
        self.flags.append(flags.DC)
        if not self.response_started:
            self.status = 0
        if self.retry_timer is not None:
            self.retry_timer.cancel()
            self.retry_timer = None
        self.close_after = True
        self._complete(False)

    def downstream_protocol_error(self) -> None:
        self.flags.append(flags.DPE)
        if self.response_started:
            self._abort_downstream(None)
        else:
            self._end_attempt()
            self.local_reply(400, b"bad request body", None, close=True)

    def _complete(self, upstream_reusable: bool) -> None:
        if self.done:
            return
        self.done = True
        if self.try_timer is not None or self.route_timer is not None or self.retry_timer is not None:
            for timer in (self.try_timer, self.route_timer, self.retry_timer):
                if timer is not None:
                    timer.cancel()
            self.try_timer = self.route_timer = self.retry_timer = None
        if self.connecting is not None:
            self.connecting.cancel()
            self.connecting = None
        if self.counted_on_start:
            self.counted_on_start = False
            self.balancer.on_end(self.endpoint)  # type: ignore[union-attr,arg-type]
        self._release_upstream(upstream_reusable)
        if self.resilience is not None:
            self.resilience.exchange_done(self)
        if self.conn.paused:
            self.conn.resume(_PAUSE_BODY)
        server = self.server
        server.counters.active_requests -= 1
        self.duration_ms = (time.monotonic() - self.t0) * 1000.0
        # Stats, telemetry, trace and access log wait until the response has left with this
        # iteration's writes (proxy_core.coalesce): the client does not wait on the bookkeeping.
        server.writes.record_later(self)
        if self.pipe is not None:
            self.conn.active = None
            return
        self._finish_downstream()

    def record(self) -> None:
        """The finished exchange's stats, telemetry, trace span and access log line."""
        server = self.server
        duration_ms = self.duration_ms
        status = self.status
        flag_list = self.flags
        response_flags = ",".join(flag_list) if flag_list else flags.NONE
        destinations = server.destinations   # ProxyServer.record, inlined
        destinations.record(self.cluster.service if self.cluster is not None else "unknown", status, duration_ms,
                            response_flags)
        telemetry = server.telemetry
        if telemetry is not None and self.head.method != b"CONNECT":
            head_bytes = len(self.up_head) if self.attempt else request_head_size(self.head)
            source = self.conn.source   # found once per connection (Mtls.workload_of)
            telemetry.record(self.state.snapshot, self.route, self.wc, self.cluster, self.endpoint, self.req,
                             self.t_wall, status, response_flags, duration_ms, self.bytes_received + head_bytes,
                             self.bytes_sent + self.resp_head_bytes,
                             source if source is not None else server.mtls.workload_of(self.conn),
                             self.up_tls is not None and self.up_tls.mesh, self.grpc_status)
        if server.tracer is not None:
            trace_finished(server.tracer, self, duration_ms, response_flags)
        alog = server.access_log
        if alog.enabled and (not self.state.snapshot.telemetry.configured or access_log_allowed(self)):
            req = self.req
            head = self.head
            headers = req.headers if req is not None else {}
            ep = self.endpoint
            alog.log(self.t_wall, req.method if req is not None else head.method.decode("latin-1"),
                     req.path if req is not None else head.target.decode("latin-1"),
                     _PROTOCOLS.get(head.version) or f"HTTP/{head.version}", status, response_flags,
                     self.bytes_received,
                     self.bytes_sent, int(duration_ms), self.up_time, self.xff,
                     headers.get("user-agent"), self.request_id, req.authority if req is not None else "",
                     ep.key if ep is not None else None, self.wc.cluster if self.wc is not None else None,
                     self.route.name if self.route is not None else None, self.conn.peer, self.conn.listener.name,
                     self.conn.peer_principal, self.grpc_status)

    def _finish_downstream(self) -> None:
        """Hand the connection back once both the response and the request body are done."""
        if self.close_after:
            self.conn.request_done(self, False)
        elif self.request_complete:
            self.conn.request_done(self, True)
        # else: the response ended before the request body; on_body_end finishes the
        # exchange once the rest of the body has been read (and dropped).


# -- helpers -------------------------------------------------------------------------------------


def listener_kind(protocol: str) -> str | None:
    """The listener a VIP port of ``protocol`` gets: HTTP/1.1 (``vip``), HTTP/2 with HTTP/1.1
    accepted too (``h2``), detected from the first bytes (``auto``), spliced (``tcp``) or
    spliced by the SNI of its TLS ClientHello (``tls``); None for protocols the proxy does
    not serve on VIPs."""
    p = protocol.lower()
    if p in ("http", "http1", "http/1.1"):
        return "vip"
    if p in ("http2", "grpc", "grpc-web", "h2c"):
        return "h2"
    if p in ("", "auto"):
        return "auto"
    if p in TCP_PROTOCOLS:
        return "tcp"
    if p in TLS_PROTOCOLS:
        return "tls"
    return None


SNIFFED_KINDS = frozenset(("h2", "auto"))
GATEWAY = "gateway"


def gateway_route_key(listener: str, server: str) -> str:
    """The router key of one HTTPS server of a gateway port (``_State.gateway_routers``)."""
    return f"{listener}/{server}"


def _gateway_chains(gl: Any, secrets: Any) -> tuple[Any, str | None]:
    """The TLS filter chains of an HTTPS gateway port, certificate files (or pushed Secrets)
    read now; or why not."""
    from proxy_core.gateway_tls import GatewayTlsError, build_chains  # it builds on this module's connections
    try:
        return build_chains(gl, lambda srv: _Listener(GATEWAY, gl.name, gl.address, gl.port, None,
                                                      route_key=gateway_route_key(gl.name, srv.name),
                                                      scheme="https"), secrets), None
    except GatewayTlsError as exc:
        return None, str(exc)


def _joined_headers(raw: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """Repeated headers folded into one comma-separated value (RFC 9110 5.3); Host keeps the first."""
    headers: dict[str, str] = {}
    for n, v in raw:
        name, value = n.decode("latin-1"), v.decode("latin-1")
        if name not in headers:
            headers[name] = value
        elif name != "host":
            headers[name] = headers[name] + "," + value
    return headers


def _apply_ops(headers: list[tuple[bytes, bytes]], ops: HeaderOps) -> list[tuple[bytes, bytes]]:
    as_text = [(n.decode("latin-1"), v.decode("latin-1")) for n, v in headers]
    return [(n.encode("latin-1"), v.encode("latin-1")) for n, v in apply_header_ops(as_text, ops)]


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False

