"""Istio's protocol selection: which protocol a service port speaks, from how it is declared.

Kubernetes-style ports (Ray workloads joining the mesh) follow Istio's ``ConvertProtocol``:

1. ``appProtocol`` when set, with Kubernetes' standard names ``kubernetes.io/h2c`` (HTTP2),
   ``kubernetes.io/ws`` (HTTP) and ``kubernetes.io/wss`` (HTTPS);
2. otherwise the port name: ``grpc-web`` as a prefix, else the part before the first ``-``
   (``http2-api`` -> HTTP2, ``grpc`` -> GRPC, ``tcp-db`` -> TCP);
3. a name (or appProtocol) that names no protocol leaves the port to protocol sniffing:
   ``auto``.

ServiceEntry ports carry ``protocol`` (HTTP, HTTPS, GRPC, HTTP2, TCP, TLS, MONGO, ...) and
no name-based selection; an unset protocol is sniffed too (Istio parses it as unsupported).

The result is the snapshot's port protocol.  MONGO, REDIS and MYSQL are spliced as TCP
(Istio enables their filters only on request, and without them they are plain TCP), so they
become ``tcp``; HTTP_PROXY is HTTP.  ``auto`` ports are routed both ways: VirtualService
``http`` rules for what the proxy sniffs as HTTP, ``tcp`` routes for everything else.
"""
from __future__ import annotations

HTTP, HTTP2, GRPC, GRPC_WEB = "http", "http2", "grpc", "grpc-web"
TCP, TLS, HTTPS, UDP, AUTO = "tcp", "tls", "https", "udp", "auto"

# Istio protocol names (case-insensitive, protocol.Parse) -> the snapshot's port protocol.
_PARSE: dict[str, str] = {
    "http": HTTP, "http_proxy": HTTP, "http2": HTTP2, "grpc": GRPC, "grpc-web": GRPC_WEB,
    "tcp": TCP, "mongo": TCP, "redis": TCP, "mysql": TCP,
    "tls": TLS, "https": HTTPS, "udp": UDP,
}
_KUBERNETES_APP_PROTOCOLS: dict[str, str] = {
    "kubernetes.io/h2c": HTTP2, "kubernetes.io/ws": HTTP, "kubernetes.io/wss": HTTPS,
}

# Port protocols whose traffic VirtualService ``http`` rules route (sniffed HTTP included).
HTTP_ROUTED = frozenset({HTTP, HTTP2, GRPC, GRPC_WEB, AUTO})
# Port protocols whose connections the proxy splices by ``tcp`` routes (sniffed non-HTTP included).
TCP_ROUTED = frozenset({TCP, AUTO})


def parse_protocol(name: str | None) -> str:
    """Istio's ``protocol.Parse``: a protocol name, case-insensitive; anything else is ``auto``."""
    return _PARSE.get((name or "").lower(), AUTO)


def port_protocol(port_name: str, app_protocol: str = "") -> str:
    """The protocol of a Kubernetes-style port (``ConvertProtocol``): appProtocol, else the name."""
    name = app_protocol or port_name
    if app_protocol in _KUBERNETES_APP_PROTOCOLS:
        return _KUBERNETES_APP_PROTOCOLS[app_protocol]
    lowered = name.lower()
    if lowered.startswith(GRPC_WEB):
        return GRPC_WEB
    return parse_protocol(lowered.split("-", 1)[0])


def service_entry_protocol(protocol: str | None) -> str:
    """A ServiceEntry port's declared ``protocol``; unset is sniffed."""
    return parse_protocol(protocol)
