"""TLS passthrough and TCP at the ingress gateway: the mesh's L4 sessions on gateway ports.

Istio serves a Gateway's ``PASSTHROUGH`` servers and ``TCP`` servers with the same Envoy
``tcp_proxy`` it gives TCP service ports; only the filter chain in front differs.  So do we:
a connection on such a gateway port is a ``proxy_core.tcp`` session (``TcpSession`` /
``TlsSession``: weighted destination, endpoint by the cluster's balancer, the node tunnel
with auto mTLS for endpoints on other nodes, splice with half-close, idle timeout, TCP
telemetry), and the classes here change two things:

* **Where the routes come from**: a TCP port's ``tcp`` routes (``GatewayListener.tcp``, on
  the listener spec as of the last swap), or the ``tls`` routes of the passthrough server
  its ClientHello's SNI chose (``proxy_core.gateway_tls`` picks among the port's filter
  chains, terminated ones included, and hands the connection over with the bytes it read).
  No rule taking the connection closes it (``NR``): a gateway has no default destination.
* **Who the client is**: the gateway itself (``ProxyServer.gateway_source``), as for HTTP
  at the gateway.  Its SPIFFE id is presented on mTLS tunnels, AuthorizationPolicies see
  its principal, ``sourceLabels`` matches test its labels, and telemetry reports
  ``source_workload="istio-ingressgateway"``.

Route matches left for the proxy are the source conditions (the gateway's labels, which
hold or not for every connection alike) and ``destinationSubnets``, tested against the
gateway's bind address.
"""
from __future__ import annotations

import asyncio
from typing import Any

from proxy_core.snapshot import TcpRoute, TlsRoute
from proxy_core.tcp import TcpSession, TlsSession


class GatewayTcpSession(TcpSession):
    """A connection on a gateway ``tcp`` port, spliced by that port's tcp routes."""

    __slots__ = ()

    def __init__(self, owner: Any, listener: Any) -> None:
        super().__init__(owner, listener)
        self.source = owner.gateway_source()

    def _select_route(self) -> TcpRoute | None:
        routes = self.listener.tcp
        if routes is None:
            return None
        return routes.route_for(self.listener.host, self._source_if(routes.uses_source))

    def _authority(self) -> str:
        return str(self.listener.name)


class GatewayTlsSession(TlsSession):
    """A connection on a gateway TLS port whose SNI chose a passthrough server: routed by that
    server's tls routes, its ClientHello (already read by the gateway) spliced first."""

    __slots__ = ("routes",)

    def __init__(self, owner: Any, listener: Any, routes: Any) -> None:
        super().__init__(owner, listener)
        self.routes = routes     # the chosen server's TlsHost
        self.source = owner.gateway_source()

    def _select_route(self) -> TlsRoute | None:
        routes = self.routes
        return routes.route_for(self.sni, self.listener.host, self._source_if(routes.uses_source))

    def _authority(self) -> str:
        return self.sni or str(self.listener.name)


def pass_through(server: Any, listener: Any, routes: Any, transport: asyncio.Transport, seen: bytes) -> None:
    """Turn a gateway connection whose ClientHello ``seen`` chose a passthrough server into a
    ``GatewayTlsSession``: it reads the same ClientHello again (cheap, and no special case)
    and routes by its SNI."""
    session = GatewayTlsSession(server, listener, routes)
    transport.set_protocol(session)
    session.connection_made(transport)
    session.data_received(seen)
