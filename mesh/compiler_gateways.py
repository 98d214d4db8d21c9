"""Istio Gateways -> the ingress gateway's listeners and virtual hosts.

The ingress gateway is the proxy of the nodes chosen at install (``GatewayOptions``: the
head node by default); on those nodes it stands for the workload Istio's ingress gateway
pod is, with ``GATEWAY_LABELS`` in namespace ``istio-system``.  A Gateway applies when its
``selector`` matches those labels (an empty selector matches every gateway, as in Istio);
one that selects nothing opens nothing.

For every port of the selected Gateways' servers one listener is compiled, as Envoy's
gateway listener ``0.0.0.0_<port>`` with route configuration ``http.<port>``:

* A server's hosts are ``[namespace/]dnsName``: the namespace (``*`` any, ``.`` the
  Gateway's own; none written = ``*``) says which VirtualServices may bind to it.
* A VirtualService binds when its ``gateways`` names the Gateway (``name`` in its own
  namespace, or ``namespace/name``) and one of its hosts intersects a server host: the
  more specific of the two becomes the virtual host's domain, as Istio picks it
  (``*`` x ``*`` = ``*``; ``*.example.com`` x ``a.example.com`` = ``a.example.com``).
* Routes come from ``compiler_routes`` unchanged, with the Gateway as the scope: a match
  whose own ``gateways`` leaves this Gateway out is dropped, ``port`` compares with the
  server port, and destinations are mesh clusters (DestinationRule subsets, traffic
  policy, auto mTLS through the node tunnel, all as for any outbound request).
  Several VirtualServices for one domain are merged in (namespace, name) order, as Istio
  merges them for gateways.
* A request whose Host no domain of its port names gets 404 with flag NR, as from Envoy.

Servers whose protocol is HTTP, HTTP2, GRPC or GRPC-WEB are served (the listener accepts
HTTP/1.1 and h2c on each), and so are HTTPS servers whose ``tls.mode`` is SIMPLE, MUTUAL
or OPTIONAL_MUTUAL with certificate files (``serverCertificate``, ``privateKey``,
``caCertificates``: paths on the gateway node) or a ``credentialName``: a TLS Secret stored
in the mesh (``mesh.secrets``) in the gateway's namespace, as Istio reads it over SDS.  The
snapshot carries the Secret's name only (``credential_name``), never its material: it goes
to every node, while the gateway node's supervisor fetches the Secret itself and pushes it
to its proxy alone.  A Secret created or rotated later needs no new Gateway: every config
revision is part of the snapshot version, so the gateway's supervisor sees the change and
pushes the new material.

* An HTTP server with ``tls.httpsRedirect`` makes every virtual host it contributes to
  answer 301 to ``https://`` (Envoy's ``require_tls: ALL``); its hosts without a bound
  VirtualService get such a virtual host too, as Istio builds them.
* Each HTTPS server of a port is its own TLS filter chain, as in Envoy: the listener's
  ``servers`` keep them apart, each with its SNI names (its hosts without namespace; one
  ``*`` host = any name), its TLS settings and its own virtual hosts (Istio's route
  configuration ``https.<port>.<port name>.<gateway>.<namespace>``).  The proxy picks one
  per connection by SNI (``proxy_core.gateway_tls``).

Servers that carry TLS the gateway does not decrypt, and plain TCP, are spliced by the
proxy's L4 sessions (``proxy_core.tcp``), as Envoy's ``tcp_proxy`` behind a gateway listener:

* ``TLS`` or ``HTTPS`` servers with ``tls.mode: PASSTHROUGH`` route by the ``tls`` rules of
  the VirtualServices bound to them (``translate_tls_rules`` with the Gateway as scope).  As
  Istio builds one filter chain per rule match, each match's ``sniHosts`` are intersected
  with the server's hosts (a match left with none is dropped) and the server's SNI names
  are the union of what remains; a passthrough server no rule reaches opens no chain.  Such
  a server is one more filter chain of its port, next to any terminated HTTPS servers
  there: the proxy picks by SNI among them all (``proxy_core.gateway_tls``), then routes a
  passthrough connection by its rules in order and splices the untouched TLS bytes.
* ``TCP`` servers route by the ``tcp`` rules of the bound VirtualServices
  (``translate_tcp_rules``), in (namespace, name) then rule order; the first rule whose
  proxy-side conditions hold takes the connection.  Neither kind has a default route: a
  connection no rule takes is closed (Envoy has no filter chain or cluster for it).
* Routes carry the idle timeout of their first destination's DestinationRule
  (``connectionPool.tcp.idleTimeout``), as for tcp service ports.

``HTTPS`` and ``TLS`` servers share a port (both are TLS filter chains); the listener's
protocol is ``https`` when one of them terminates TLS, else ``tls``.

Other servers are not served: ``TLS`` servers that terminate TLS (``SIMPLE`` / ``MUTUAL``:
TLS then tcp routes), ``AUTO_PASSTHROUGH`` (Istio's multi-cluster SNI scheme, which routes by
names encoding the cluster) and ``ISTIO_MUTUAL`` (mesh-internal gateways), servers with
``credentialNames`` only (several certificates per server), and protocols such
as UDP or MONGO.  They are valid Istio configuration, so Galley accepts them but answers
the apply with a warning naming the field (``unserved_servers``; ``meshctl apply`` prints
it), and they open no port.  When two Gateways put different protocols on one port, the
first in (namespace, name) order keeps it.  A server's ``bind`` is not honoured: every
listener binds the install's gateway address.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from mesh.compiler_routes import (ServiceLookup, bound_gateways, translate_http_routes, translate_tcp_rules,
                                  translate_tls_rules)
from mesh.compiler_services import host_covers, labels_match, resolve_host
from mesh.resources import Resource

GATEWAY_NAMESPACE = "istio-system"
GATEWAY_SERVICE_ACCOUNT = "istio-ingressgateway-service-account"
GATEWAY_LABELS = {"istio": "ingressgateway", "app": "istio-ingressgateway"}
GATEWAY_WORKLOAD = "istio-ingressgateway"
SERVED_PROTOCOLS = ("HTTP", "HTTP2", "GRPC", "GRPC-WEB", "HTTPS", "TLS", "TCP")
TERMINATED_TLS_MODES = ("SIMPLE", "MUTUAL", "OPTIONAL_MUTUAL")
SERVED_TLS_MODES = (*TERMINATED_TLS_MODES, "PASSTHROUGH")
TLS_SERVER_PROTOCOLS = ("HTTPS", "TLS")   # one kind of port: TLS filter chains chosen by SNI
L4Routes = Callable[[list[dict[str, Any]]], list[dict[str, Any]]]   # adds what DestinationRules say

__all__ = ["compile_gateway_listeners", "gateway_identity", "server_domains", "unserved_servers", "GATEWAY_LABELS",
           "GATEWAY_NAMESPACE", "GATEWAY_SERVICE_ACCOUNT", "SERVED_PROTOCOLS", "SERVED_TLS_MODES",
           "TERMINATED_TLS_MODES"]


@dataclass(slots=True)
class _Port:
    """The servers of the selected Gateways on one port number."""

    number: int
    protocol: str
    servers: list[tuple[Resource, Mapping[str, Any]]] = field(default_factory=list)


def gateway_identity() -> dict[str, Any]:
    """Who the gateway is to policies and telemetry (the snapshot's ``gateway`` identity keys)."""
    return {"namespace": GATEWAY_NAMESPACE, "service_account": GATEWAY_SERVICE_ACCOUNT,
            "workload": GATEWAY_WORKLOAD, "labels": dict(GATEWAY_LABELS)}


def selects_gateway(gateway: Resource) -> bool:
    return labels_match({str(k): str(v) for k, v in (gateway.spec.get("selector") or {}).items()},
                        GATEWAY_LABELS)


def unserved_servers(gateway: Resource) -> list[tuple[str, str]]:
    """(field path, reason) for each server of ``gateway`` the ingress gateway would not serve."""
    out = []
    for i, server in enumerate(gateway.spec.get("servers") or ()):
        issue = _unserved(server)
        if issue is not None:
            out.append((f"spec.servers[{i}].{issue[0]}", issue[1]))
    return out


def _unserved(server: Mapping[str, Any]) -> tuple[str, str] | None:
    """(field below the server, reason) when the ingress gateway does not serve ``server``."""
    protocol = str(server["port"]["protocol"]).upper()
    if protocol not in SERVED_PROTOCOLS:
        return ("port.protocol", f"{server['port']['protocol']} gateway servers are not served yet "
                                 f"(served: {', '.join(SERVED_PROTOCOLS)})")
    if protocol not in TLS_SERVER_PROTOCOLS:
        return None
    tls = server.get("tls") or {}
    mode = str(tls.get("mode") or "PASSTHROUGH")
    if mode not in SERVED_TLS_MODES:
        return ("tls.mode", f"{mode} {protocol} gateway servers are not served (served: {', '.join(SERVED_TLS_MODES)}; "
                            "AUTO_PASSTHROUGH needs Istio's multi-cluster SNI names, ISTIO_MUTUAL a mesh-internal "
                            "gateway)")
    if mode == "PASSTHROUGH":
        return None
    if protocol == "TLS":
        return ("tls.mode", f"{mode} TLS gateway servers (TLS terminated, then tcp routes) are not served yet: "
                            "use PASSTHROUGH, or an HTTPS server for HTTP")
    if not tls.get("credentialName") and not tls.get("serverCertificate"):
        field = "credentialNames" if tls.get("credentialNames") else "tlsCertificates"
        return (f"tls.{field}", f"{field} (several certificates per server) is not served yet: name one Secret "
                                "with credentialName, or give serverCertificate and privateKey; "
                                "this server is not served")
    return None


def compile_gateway_listeners(gateways: Sequence[Resource], virtual_services: Sequence[Resource],
                              lookup: ServiceLookup, l4_routes: L4Routes = lambda routes: routes
                              ) -> list[dict[str, Any]]:
    """One listener dict per served port (ascending), without its bind address (per node).
    ``l4_routes`` completes tcp and tls routes (the compiler adds their idle timeouts)."""
    ports = _ports([g for g in gateways if selects_gateway(g)])
    return [_listener(p, virtual_services, lookup, l4_routes) for p in sorted(ports.values(), key=lambda p: p.number)]


def _listener(port: _Port, virtual_services: Sequence[Resource], lookup: ServiceLookup,
              l4_routes: L4Routes) -> dict[str, Any]:
    out: dict[str, Any] = {"name": f"{GATEWAY_WORKLOAD}:{port.number}", "port": port.number,
                           "protocol": port.protocol.lower(),
                           "gateways": sorted({f"{g.namespace}/{g.name}" for g, _ in port.servers}),
                           "virtual_hosts": []}
    if port.protocol == "TCP":
        out["tcp_routes"] = l4_routes(_tcp_routes(port, virtual_services, lookup))
    elif port.protocol != "TLS":
        out["virtual_hosts"] = _virtual_hosts(port.number, port.servers, virtual_services, lookup)
    else:
        servers = [_tls_server(port.number, gw, server, virtual_services, lookup, l4_routes)
                   for gw, server in port.servers]
        out["servers"] = [s for s in servers if s is not None]
        terminated = any(_tls_mode(server) != "PASSTHROUGH" for _, server in port.servers)
        out["protocol"] = "https" if terminated else "tls"
    return out


def _tls_mode(server: Mapping[str, Any]) -> str:
    return str((server.get("tls") or {}).get("mode") or "PASSTHROUGH")


def _tls_server(port: int, gw: Resource, server: Mapping[str, Any], virtual_services: Sequence[Resource],
                lookup: ServiceLookup, l4_routes: L4Routes) -> dict[str, Any] | None:
    """One filter chain of a TLS port: terminated (certificate, virtual hosts) or passthrough
    (tls routes); None for a passthrough server no rule reaches."""
    name = f"{str(server['port']['protocol']).lower()}.{port}.{server['port']['name']}.{gw.name}.{gw.namespace}"
    if _tls_mode(server) != "PASSTHROUGH":
        return {"name": name, "server_names": _server_names(server), "tls": _server_tls(server["tls"]),
                "virtual_hosts": _virtual_hosts(port, [(gw, server)], virtual_services, lookup)}
    routes = l4_routes(_passthrough_routes(port, gw, server, virtual_services, lookup))
    if not routes:
        return None
    names = list(dict.fromkeys(h for r in routes for m in r["match"] for h in m["sni_hosts"]))
    return {"name": name, "server_names": [] if "*" in names else names, "tls": {"mode": "PASSTHROUGH"},
            "tls_routes": routes}


def _bound(gw: Resource, server: Mapping[str, Any], virtual_services: Sequence[Resource]) -> list[Resource]:
    """The VirtualServices bound to ``server`` of ``gw``: naming the Gateway, with a host it admits."""
    scope = f"{gw.namespace}/{gw.name}"
    return [vs for vs in virtual_services if scope in bound_gateways(vs) and _domains(gw, server, vs)]


def _passthrough_routes(port: int, gw: Resource, server: Mapping[str, Any], virtual_services: Sequence[Resource],
                        lookup: ServiceLookup) -> list[dict[str, Any]]:
    """The tls rules bound to a passthrough server, each match's SNI names within the server's hosts."""
    out = []
    for vs in _bound(gw, server, virtual_services):
        for route in translate_tls_rules(vs, port, lookup, f"{gw.namespace}/{gw.name}"):
            matches = []
            for m in route["match"]:
                names = [d for sni in m["sni_hosts"] or ["*"] for d in server_domains(gw, server, vs.namespace, sni)]
                if names:
                    matches.append({**m, "sni_hosts": list(dict.fromkeys(names))})
            if matches:
                out.append({**route, "match": matches})
    return out


def _tcp_routes(port: _Port, virtual_services: Sequence[Resource], lookup: ServiceLookup) -> list[dict[str, Any]]:
    """The tcp rules bound to the TCP servers of ``port``, in server, VirtualService and rule order."""
    out: list[dict[str, Any]] = []
    for gw, server in port.servers:
        for vs in _bound(gw, server, virtual_services):
            for route in translate_tcp_rules(vs, port.number, lookup, f"{gw.namespace}/{gw.name}"):
                if all(r["name"] != route["name"] for r in out):
                    out.append(route)
    return out


def _server_names(server: Mapping[str, Any]) -> list[str]:
    """The SNI names that select an HTTPS server (Envoy's ``server_names``); [] = any name."""
    names = []
    for raw in server.get("hosts") or ():
        name = str(raw).rpartition("/")[2].lower()
        if name == "*":
            return []
        if name not in names:
            names.append(name)
    return names


def _server_tls(tls: Mapping[str, Any]) -> dict[str, Any]:
    """Istio ServerTLSSettings -> the snapshot's TLS settings of one HTTPS server."""
    out: dict[str, Any] = {"mode": str(tls["mode"])}
    if tls.get("credentialName"):   # the Secret's name only: its material reaches the gateway node alone
        out["credential_name"] = str(tls["credentialName"])
    else:
        out["server_certificate"] = str(tls["serverCertificate"])
        out["private_key"] = str(tls["privateKey"])
        if tls.get("caCertificates"):
            out["ca_certificates"] = str(tls["caCertificates"])
    for name, key in (("minProtocolVersion", "min_protocol_version"), ("maxProtocolVersion", "max_protocol_version")):
        if tls.get(name) and tls[name] != "TLS_AUTO":
            out[key] = str(tls[name])
    for name, key in (("cipherSuites", "cipher_suites"), ("subjectAltNames", "subject_alt_names")):
        if tls.get(name):
            out[key] = [str(x) for x in tls[name]]
    return out


def _ports(gateways: Sequence[Resource]) -> dict[int, _Port]:
    out: dict[int, _Port] = {}
    for gw in gateways:
        for server in gw.spec.get("servers") or ():
            if _unserved(server) is not None:
                continue
            protocol = str(server["port"]["protocol"]).upper()
            protocol = "TLS" if protocol in TLS_SERVER_PROTOCOLS else protocol
            number = int(server["port"]["number"])
            port = out.setdefault(number, _Port(number, protocol))
            if port.protocol == protocol:
                port.servers.append((gw, server))
    return out


def _virtual_hosts(port: int, servers: Sequence[tuple[Resource, Mapping[str, Any]]],
                   virtual_services: Sequence[Resource], lookup: ServiceLookup) -> list[dict[str, Any]]:
    """The virtual hosts of ``servers`` on ``port``: one per domain, the routes of every
    VirtualService bound to it; a domain an ``httpsRedirect`` server contributes to only
    redirects to https (as Envoy's ``require_tls: ALL``, which answers before any route)."""
    by_domain: dict[str, list[tuple[Resource, str]]] = {}
    redirect: set[str] = set()
    for gw, server in servers:
        scope = f"{gw.namespace}/{gw.name}"
        https_redirect = bool((server.get("tls") or {}).get("httpsRedirect"))
        for vs in virtual_services:
            if scope not in bound_gateways(vs):
                continue
            for domain in _domains(gw, server, vs):
                if all(bound is not vs for bound, _ in by_domain.get(domain, ())):
                    by_domain.setdefault(domain, []).append((vs, scope))
                if https_redirect:
                    redirect.add(domain)
        if https_redirect:   # Istio: the server's own hosts redirect even with no VirtualService bound
            for raw in server.get("hosts") or ():
                domain = str(raw).rpartition("/")[2].lower()
                by_domain.setdefault(domain, [])
                redirect.add(domain)
    out = []
    for domain in sorted(by_domain, key=_domain_order):
        if domain in redirect:
            routes = [{"name": "https-redirect", "match": [], "redirect": {"scheme": "https", "redirect_code": 301}}]
        else:
            routes = [r for vs, scope in by_domain[domain] for r in translate_http_routes(vs, port, lookup, scope)]
        out.append({"name": f"{domain}:{port}", "host": domain, "port": port, "domains": [domain], "routes": routes})
    return out


def _domain_order(domain: str) -> tuple[int, str]:
    """Exact domains, then wildcards, then ``*``: a stable order (the router ranks them itself)."""
    return (2 if domain == "*" else 1 if domain.startswith("*") else 0, domain)


def _domains(gw: Resource, server: Mapping[str, Any], vs: Resource) -> list[str]:
    """The hosts of ``vs`` that ``server`` of ``gw`` admits, each as the more specific of the pair."""
    out: list[str] = []
    for vs_raw in vs.spec.get("hosts") or ():
        for domain in server_domains(gw, server, vs.namespace, str(vs_raw)):
            if domain not in out:
                out.append(domain)
    return out


def server_domains(gw: Resource, server: Mapping[str, Any], vs_namespace: str, vs_host: str) -> list[str]:
    """The domains one VirtualService host (of a VirtualService in ``vs_namespace``) gets on
    ``server`` of ``gw``: empty when no server host admits it."""
    host = resolve_host(vs_host, vs_namespace)
    out: list[str] = []
    for raw in server.get("hosts") or ():
        namespace, slash, pattern = str(raw).rpartition("/")
        if slash and namespace not in ("*", vs_namespace) and not (namespace == "." and vs_namespace == gw.namespace):
            continue
        domain = _intersection(pattern.lower(), host)
        if domain is not None:
            out.append(domain)
    return out


def _intersection(server_host: str, vs_host: str) -> str | None:
    """The more specific of two hosts when one covers the other, else None."""
    if host_covers(server_host, vs_host):
        return vs_host
    if host_covers(vs_host, server_host):
        return server_host
    return None
