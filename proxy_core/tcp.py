"""Plain TCP through the mesh: the VIP listener protocol for ``tcp`` service ports.

Envoy's ``tcp_proxy`` network filter, as Istio configures it for a TCP service port.  A
connection accepted on ``VIP:port`` goes, without parsing a byte, through::

    tcp route (first match on the VIP address, and on the client workload where a rule asks)
      -> destination by weight -> endpoint by the cluster's load balancer
      -> dial (direct, or the peer node's inbound tunnel) -> splice

The downstream side does not read until the upstream is connected, so early bytes wait in
the kernel instead of a Python buffer.  Once connected, two ``Pipe`` halves copy bytes with
backpressure (a full write buffer on one side pauses reading on the other) and propagate
half-close: EOF from either side becomes ``write_eof`` on the other, and the session ends
when both directions are finished or either socket closes.  Half-close crosses the mTLS
tunnel too: a byte tunnel runs over ``proxy_core.tls_stream``, where EOF is TLS 1.3's
``close_notify`` for one direction.

Failures close the client connection, as Envoy does (there is no way to say why at L4):
no matching route (``NR``), a missing cluster (``NC``), no endpoint (``UH``), a failed dial
(``UF``).  A route's idle timeout closes both sides after that long without a byte in
either direction (Envoy's ``idle_timeout``, 1 hour unless configured).  The check is one
timer per session re-armed to the last activity, so a busy session costs a timestamp per read.

Counters follow Istio's TCP metrics, counted when a connection closes (``istio_tcp_connections_opened_total``,
``..._closed_total``, ``istio_tcp_received_bytes_total`` = client to upstream,
``istio_tcp_sent_bytes_total`` = upstream to client), per destination cluster, for ``stats()``.
For Mixer a session also reports to ``proxy_core.tcp_telemetry`` (with Istio's labels, and
periodically while it is open).

TLS passthrough (``tls`` and ``https`` service ports, ``TlsSession``) is the same session with
one step first, Envoy's ``tls_inspector``: the client's first bytes are read (not decrypted)
until its ClientHello is complete (``proxy_core.sni``), the VirtualService ``tls`` route is
chosen by its SNI and the VIP address, and the ClientHello is the first thing the upstream
gets.  A client that sends no complete ClientHello within ``HELLO_TIMEOUT`` is closed.

The ingress gateway's TLS passthrough and TCP servers are these sessions too
(``proxy_core.gateway_l4``): only where the routes come from (``_select_route``) and who the
client is (the gateway itself) differ.
"""
from __future__ import annotations

import asyncio
import random
import socket
from dataclasses import dataclass, field
from typing import Any, Protocol

from proxy_core import flags
from proxy_core.lb import LoadBalancer
from proxy_core.router import Router
from proxy_core.security_filter import ClusterSecurity, source_principal
from proxy_core.sni import MAX_CLIENT_HELLO, read_client_hello
from proxy_core.snapshot import Endpoint, Snapshot, TcpRoute, TlsRoute, Vip
from proxy_core.mtls import Mtls
from proxy_core.mtls_client import upstream_tls
from proxy_core.tcp_telemetry import TcpTelemetry, open_session, refuse_session
from proxy_core.source_identity import SourceWorkload
from proxy_core.upstream import Dialer, Pipe

TCP_PROTOCOLS = frozenset({"tcp"})
TLS_PROTOCOLS = frozenset({"tls", "https"})
HELLO_TIMEOUT = 15.0   # Envoy's listener_filters_timeout


# -- what a session needs from the server -------------------------------------------------------


class TcpConfig(Protocol):
    """The parts of the server's current configuration state a session reads."""

    snapshot: Snapshot
    balancers: dict[str, LoadBalancer]
    security: dict[str, ClusterSecurity]


class TcpOwner(Protocol):
    """The server a session belongs to (``ProxyServer``); read when the connection arrives,
    so a session keeps the configuration it started with across a swap."""

    state: TcpConfig
    dialer: Dialer
    mtls: Mtls
    rng: random.Random
    tcp: "TcpProxy"
    tcp_telemetry: TcpTelemetry | None


class VipSource(Protocol):
    """The listener a session was accepted on; its VIP may be replaced by a config swap."""

    vip: Vip | None


# -- statistics ---------------------------------------------------------------------------------


@dataclass(slots=True)
class _DestinationCounters:
    connections_opened: int = 0
    connections_closed: int = 0
    received_bytes: int = 0     # client -> upstream
    sent_bytes: int = 0         # upstream -> client

    def to_dict(self) -> dict[str, int]:
        return {"connections_opened": self.connections_opened, "connections_closed": self.connections_closed,
                "received_bytes": self.received_bytes, "sent_bytes": self.sent_bytes}


@dataclass(slots=True)
class TcpProxy:
    """Live TCP sessions of one server and their counters (``ProxyServer.stats()["tcp"]``)."""

    downstream_connections_total: int = 0
    failures: dict[str, int] = field(default_factory=dict)           # response flag -> connections
    idle_timeouts: int = 0
    hello_timeouts: int = 0           # TLS ports: no complete ClientHello in time
    sni: dict[str, int] = field(default_factory=dict)                # TLS ports: connections per SNI ("-": none)
    destinations: dict[str, _DestinationCounters] = field(default_factory=dict)   # by cluster
    sessions: set["TcpSession"] = field(default_factory=set)

    def fail(self, flag: str) -> None:
        self.failures[flag] = self.failures.get(flag, 0) + 1

    def destination(self, cluster: str) -> _DestinationCounters:
        d = self.destinations.get(cluster)
        if d is None:
            d = self.destinations[cluster] = _DestinationCounters()
        return d

    def stats(self) -> dict[str, Any]:
        dests = self.destinations.values()
        return {"downstream_connections_total": self.downstream_connections_total,
                "active_connections": len(self.sessions),
                "connections_opened": sum(d.connections_opened for d in dests),
                "connections_closed": sum(d.connections_closed for d in dests),
                "received_bytes": sum(d.received_bytes for d in dests),
                "sent_bytes": sum(d.sent_bytes for d in dests),
                "response_flags": dict(self.failures), "idle_timeouts": self.idle_timeouts,
                "hello_timeouts": self.hello_timeouts, "sni": dict(self.sni),
                "destinations": {name: d.to_dict() for name, d in sorted(self.destinations.items())}}

    def close(self) -> None:
        """Abort every live session (server shutdown)."""
        for session in list(self.sessions):
            session.abort()


# -- the session --------------------------------------------------------------------------------


class _Half(Pipe):
    """A Pipe that may see EOF before it is linked (the event loop can read ahead of the
    dial's completion): the EOF is kept and forwarded by ``TcpSession._connected``."""

    __slots__ = ()

    def eof_received(self) -> bool:
        if self.peer is None:
            self.eof = True
            return True
        return Pipe.eof_received(self)


class _UpstreamSide(_Half):
    """The upstream half of a session: stamps activity for the idle timer."""

    __slots__ = ("session",)

    def __init__(self, session: "TcpSession") -> None:
        super().__init__()
        self.session = session

    def data_received(self, data: bytes) -> None:
        self.session.last_active = self.session.loop.time()
        Pipe.data_received(self, data)


class TcpSession(_Half):
    """The downstream half of one TCP proxy session, and the session's bookkeeping."""

    __slots__ = ("owner", "listener", "loop", "upstream", "cluster", "endpoint", "balancer", "dialing",
                 "idle_timeout", "idle_timer", "last_active", "finished", "peer_principal", "source")

    def __init__(self, owner: TcpOwner, listener: VipSource) -> None:
        super().__init__()
        self.owner = owner
        self.listener = listener
        self.loop = asyncio.get_running_loop()
        self.upstream: _UpstreamSide | None = None
        self.cluster = ""
        self.endpoint: Endpoint | None = None
        self.balancer: LoadBalancer | None = None
        self.dialing: asyncio.Task[_UpstreamSide] | None = None
        self.idle_timeout: float | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.last_active = 0.0
        self.finished = False
        self.peer_principal: str | None = None   # the mTLS peer's SPIFFE id; None without mTLS
        self.source: SourceWorkload | None = None    # the local client, resolved on first need

    # asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._accept(transport)
        assert self.transport is not None
        self.transport.pause_reading()   # until the upstream is connected
        self._route()

    def _accept(self, transport: asyncio.BaseTransport) -> None:
        """What every accepted session does first: no Nagle, counted, finished on close."""
        Pipe.connection_made(self, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        tcp = self.owner.tcp
        tcp.downstream_connections_total += 1
        tcp.sessions.add(self)
        self.on_close = self._finish

    def data_received(self, data: bytes) -> None:
        self.last_active = self.loop.time()
        Pipe.data_received(self, data)

    # routing and dialing

    def _select_route(self) -> TcpRoute | TlsRoute | None:
        """The route of this connection (None: no route, ``NR``): the tcp routes of the VIP's port."""
        vip = self.listener.vip
        tcp_host = self.owner.state.snapshot.tcp_routes.get((vip.host, vip.port)) if vip is not None else None
        if tcp_host is None:
            return None
        return tcp_host.route_for(vip.address, self._source_if(tcp_host.uses_source))

    def _authority(self) -> str:
        """What the client asked for, for telemetry's ``destination_service`` when no cluster says."""
        vip = self.listener.vip
        return vip.host if vip is not None else ""

    def _source_if(self, needed: bool) -> SourceWorkload | None:
        """The client workload when a route tests it (``sourceLabels``), else None: the
        lookup is a kernel query the common case does without."""
        return self.owner.mtls.workload_of(self) if needed else None

    def _route(self) -> None:
        state = self.owner.state
        route = self._select_route()
        if route is None:
            self._reject(flags.NR, None, None, None)
            return
        try:
            wc = Router.pick(route, self.owner.rng)
        except ValueError:  # no destination with a positive weight
            self._reject(flags.NC, route, None, None)
            return
        cluster = state.snapshot.clusters.get(wc.cluster)
        if cluster is None:
            self._reject(flags.NC, route, wc, None)
            return
        balancer = state.balancers[wc.cluster]
        ep = balancer.pick(None)
        if ep is None:
            self._reject(flags.UH, route, wc, cluster)
            return
        security = state.security.get(wc.cluster)
        if security is not None and not security.permits_connection(
                self._peer_ip(), source_principal(self.owner.mtls, self), ep):
            self._reject(flags.RBAC, route, wc, cluster)    # AuthorizationPolicy: the connection is closed
            return
        self.cluster, self.endpoint, self.balancer = wc.cluster, ep, balancer
        self.idle_timeout = route.idle_timeout
        self.owner.tcp.destination(wc.cluster).connections_opened += 1
        balancer.on_start(ep)
        tls = upstream_tls(self.owner.mtls, ep, cluster, self) if ep.via is not None or cluster.tls is not None else None
        if self.owner.tcp_telemetry is not None:
            open_session(self.owner.tcp_telemetry, self, state.snapshot, route, wc, cluster, ep, self._authority(),
                         self.owner.mtls.workload_of(self), tls is not None and tls.mesh)
        task = self.loop.create_task(self.owner.dialer.open(ep, lambda: _UpstreamSide(self), cluster.connect_timeout,
                                                            tls))
        self.dialing = task
        task.add_done_callback(self._connected)

    def _peer_ip(self) -> str:
        assert self.transport is not None
        peer = self.transport.get_extra_info("peername")
        return peer[0] if peer else ""

    def _reject(self, flag: str, route: Any, wc: Any, cluster: Any) -> None:
        self.owner.tcp.fail(flag)
        if self.owner.tcp_telemetry is not None:
            refuse_session(self.owner.tcp_telemetry, self.owner.state.snapshot, route, wc, cluster,
                           self._authority(), flag, self.owner.mtls.workload_of(self))
        assert self.transport is not None
        self.transport.close()

    def _connected(self, task: asyncio.Task[_UpstreamSide]) -> None:
        self.dialing = None
        if task.cancelled():
            return
        if task.exception() is not None:
            self.owner.tcp.fail(flags.UF)
            if self.owner.tcp_telemetry is not None:
                self.owner.tcp_telemetry.close(self, flags.UF)
            assert self.transport is not None
            self.transport.close()
            return
        up = task.result()
        assert up.transport is not None and self.transport is not None
        if self.finished or self.transport.is_closing():
            up.transport.close()   # the client left while we dialled
            return
        self.upstream = up
        up.on_close = self._finish
        up.link(self.transport, self)
        self.link(up.transport, up)
        if up.transport.is_closing() or (self.eof and up.eof):
            self.transport.close()     # everything was said before we linked: flush and end
            up.transport.close()
            return
        if self.eof:
            if up.transport.can_write_eof():   # a tunnel over the event loop's TLS cannot (as Pipe.eof_received)
                up.transport.write_eof()
        elif up.eof:
            self.transport.write_eof()
        self.last_active = self.loop.time()
        if self.idle_timeout is not None:
            self.idle_timer = self.loop.call_at(self.last_active + self.idle_timeout, self._check_idle)
        self.transport.resume_reading()

    # idle timeout and teardown

    def _check_idle(self) -> None:
        assert self.idle_timeout is not None
        deadline = self.last_active + self.idle_timeout
        if self.loop.time() < deadline:
            self.idle_timer = self.loop.call_at(deadline, self._check_idle)
            return
        self.idle_timer = None
        self.owner.tcp.idle_timeouts += 1
        self.abort()

    def abort(self) -> None:
        """Close both sides now, without flushing (Envoy closes idle sessions with NoFlush)."""
        if self.dialing is not None:
            self.dialing.cancel()
        for t in (self.transport, self.upstream.transport if self.upstream is not None else None):
            if t is not None:
                t.abort()

    def _finish(self) -> None:
        """Both halves' ``connection_lost`` land here; the first one does the accounting."""
        if self.finished:
            return
        self.finished = True
        tcp = self.owner.tcp
        tcp.sessions.discard(self)
        if self.owner.tcp_telemetry is not None:
            self.owner.tcp_telemetry.close(self)
        if self.idle_timer is not None:
            self.idle_timer.cancel()
            self.idle_timer = None
        if self.dialing is not None:
            self.dialing.cancel()
        if self.balancer is not None and self.endpoint is not None:
            self.balancer.on_end(self.endpoint)
            d = tcp.destination(self.cluster)
            d.connections_closed += 1
            d.received_bytes += self.bytes_in
            if self.upstream is not None:
                d.sent_bytes += self.upstream.bytes_in



class TlsSession(TcpSession):
    """A TLS passthrough session: reads the ClientHello, routes by its SNI, then splices.

    The bytes read while waiting for the ClientHello are kept by ``Pipe`` (``pending``) and
    written to the upstream when the halves are linked, so the origin sees the client's
    handshake untouched.
    """

    __slots__ = ("sni", "hello_timer", "routed")

    def __init__(self, owner: TcpOwner, listener: VipSource) -> None:
        super().__init__(owner, listener)
        self.sni: str | None = None
        self.hello_timer: asyncio.TimerHandle | None = None
        self.routed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._accept(transport)     # reading goes on: the ClientHello decides the route
        self.hello_timer = self.loop.call_later(HELLO_TIMEOUT, self._hello_timeout)

    def data_received(self, data: bytes) -> None:
        TcpSession.data_received(self, data)
        if self.routed:
            return
        seen = b"".join(self.pending)
        hello = read_client_hello(seen)
        if not hello.complete and len(seen) <= MAX_CLIENT_HELLO + 4096:
            return
        self._inspected(hello.sni)

    def eof_received(self) -> bool:
        keep_open = _Half.eof_received(self)
        if not self.routed:
            self._inspected(None)   # the client said all it will say before the hello was complete
        return keep_open

    def _inspected(self, sni: str | None) -> None:
        """The ClientHello is complete (or will not be): stop reading until the upstream is dialled."""
        self.routed = True
        self.sni = sni
        if self.hello_timer is not None:
            self.hello_timer.cancel()
            self.hello_timer = None
        tcp = self.owner.tcp
        key = sni or "-"
        tcp.sni[key] = tcp.sni.get(key, 0) + 1
        assert self.transport is not None
        if not self.transport.is_closing():
            self.transport.pause_reading()
        self._route()

    def _hello_timeout(self) -> None:
        self.hello_timer = None
        self.owner.tcp.hello_timeouts += 1
        self.abort()

    def _select_route(self) -> TlsRoute | None:
        vip = self.listener.vip
        tls_host = self.owner.state.snapshot.tls_routes.get((vip.host, vip.port)) if vip is not None else None
        if tls_host is None:
            return None
        return tls_host.route_for(self.sni, vip.address, self._source_if(tls_host.uses_source))

    def _finish(self) -> None:
        if self.hello_timer is not None:
            self.hello_timer.cancel()
            self.hello_timer = None
        TcpSession._finish(self)
