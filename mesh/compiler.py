"""Pilot's compiler: Istio configuration + service registry -> one proxy snapshot per node.

The output is the dict documented in ``proxy_core/snapshot.py``.  Compilation is a pure
function of its inputs and every collection is emitted in a fixed order, so two Pilot
replicas compiling the same revisions produce byte-identical snapshots and the same
``version`` (``c<config rev>.r<registry rev>.<content hash>``).

Pipeline, one small module per topic:

* ``compiler_services``: the service index (registry workloads, ServiceEntry, WorkloadEntry);
* ``compiler_routes``: VirtualService ``http`` rules -> routes, ``tcp`` rules -> tcp routes,
  Istio's default routes;
* ``compiler_clusters``: DestinationRule subsets and traffic policy -> clusters;
* ``compiler_security`` / ``compiler_ratelimit`` / ``compiler_cache``: policies -> ``security`` /
  ``rate_limits`` / ``caches``;
* ``telemetry_api``: Telemetry resources -> ``telemetry`` and the mesh-wide ``tracing.sampling``;
* ``compiler_gateways``: Gateways + the VirtualServices bound to them -> ``gateway`` (the
  ingress gateway's listeners), only in the snapshots of gateway nodes (``NodeInfo.gateway_address``);
* this module: domains, VIPs, per-node endpoint addressing (``via``), assembly, version.

A port's protocol is selected as Istio selects it (``mesh.protocols``: appProtocol, the port
name's prefix, a ServiceEntry's ``protocol``; a port with none of these is ``auto``, sniffed).
Virtual hosts exist for every (host, port).  VirtualService ``http`` rules apply to ports
whose protocol is HTTP-like (HTTP, HTTP2, GRPC, GRPC-WEB) or sniffed (``auto``); other ports
(TCP, TLS, HTTPS) keep the default route, which lets a proxy map an authority to its cluster
(CONNECT).  A port where the chosen VirtualService yields no rule (e.g. every match names
another port) falls back to the default route instead of answering 404 for the whole port.

Ports whose protocol is TCP also get ``tcp_routes`` (VirtualService ``tcp`` rules, else the
service's own cluster), which the proxy's tcp VIP listeners splice by; so do ``auto`` ports,
whose sniffing listener splices what is neither HTTP/1.1 nor HTTP/2 by them.  Clusters of
``auto`` ports carry ``"protocol": "auto"``: requests go upstream in the protocol the client
spoke (Envoy's ``use_downstream_protocol_config``, as Istio sets it for sniffed ports).  Ports
whose protocol is TLS or HTTPS get ``tls_routes`` (VirtualService ``tls`` rules matched on SNI,
then the service's own cluster), which the proxy's tls VIP listeners route by the ClientHello.  Each tcp route's
``idle_timeout`` is the ``connectionPool.tcp.idleTimeout`` of the DestinationRule (with its
subset and port-level settings) of the route's first destination, as Istio sets one
tcp_proxy idle timeout per filter chain; without one the proxy uses Envoy's 1 hour.

Short names: Istio gives a sidecar short names only for its own namespace; a node proxy
serves clients of every namespace, so ``reviews`` is a domain of one service only: the one
in namespace ``default`` if there is one, else the first namespace in alphabetical order.
The names ``name.ns`` and ``name.ns.svc`` are always unambiguous.

Endpoints on the snapshot's own node are dialled directly (``via`` None); those on another
node go through that node's inbound listener (``via``).  Remote endpoints whose node is
unknown, not alive, or has not published an inbound port yet are left out, as Envoy leaves
out unhealthy hosts.  Endpoints outside Ray (ServiceEntry, WorkloadEntry) never use ``via``.

A ServiceEntry with ``resolution: NONE`` yields clusters with no endpoints and
``"passthrough": true``: the proxy forwards to the address the client asked for.

Inputs are expected to have passed validation; malformed values (a bad duration, say)
raise ValueError rather than being guessed at.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Mapping, Sequence

from mesh.compiler_cache import compile_caches
from mesh.compiler_clusters import ClusterPlan, build_cluster_plans, merge_traffic_policy, select_destination_rule
from mesh.compiler_peerauthn import PeerAuthnPolicy, compile_peer_authentications, mtls_mode
from mesh.compiler_gateways import compile_gateway_listeners, gateway_identity
from mesh.compiler_ratelimit import compile_rate_limits
from mesh.compiler_security import ROOT_NAMESPACE, compile_security
from mesh.compiler_routes import (binds_mesh, default_route, select_virtual_service, translate_http_routes,
                                  translate_tcp_routes, translate_tls_routes)
from mesh.compiler_services import Service, ServiceEndpoint, build_service_index, resources_by_kind
from mesh.durations import parse_duration
from mesh.protocols import AUTO, HTTP_ROUTED, TCP_ROUTED
from mesh.registry import NodeInfo, RegistryState
from proxy_core.snapshot import HTTP2_PROTOCOLS
from mesh.resources import DEFAULT_NAMESPACE, Resource
from mesh.telemetry_api import compile_telemetry, mesh_sampling

__all__ = ["compile_snapshot", "compile_all", "snapshot_version"]


@dataclass(frozen=True, slots=True)
class _MeshPlan:
    """The node-independent part of every snapshot: compiled once per compile_all."""

    vips: list[dict[str, Any]]
    virtual_hosts: list[dict[str, Any]]
    clusters: dict[str, ClusterPlan]
    security: dict[str, Any]
    rate_limits: dict[str, Any]
    caches: dict[str, Any]
    tcp_routes: list[dict[str, Any]]
    tls_routes: list[dict[str, Any]]
    peer_authn: list[PeerAuthnPolicy]
    telemetry: dict[str, Any] | None      # the Telemetry API's per-workload settings (mesh.telemetry_api)
    tracing_sampling: float | None        # the mesh-wide randomSamplingPercentage
    gateway_listeners: list[dict[str, Any]]   # the ingress gateway's, without bind address


def compile_snapshot(resources: Sequence[Resource], registry: RegistryState, node_id: str, *,
                     config_revision: int = 0, registry_revision: int = 0,
                     http_proxy_port: int = 0, inbound_port: int = 0, node_ip: str = "127.0.0.1",
                     outbound_policy: str = "ALLOW_ANY") -> dict[str, Any]:
    """The snapshot for the proxy on ``node_id``."""
    plan = _plan_mesh(resources, registry)
    return _assemble(plan, registry.nodes, node_id, node_ip, http_proxy_port, inbound_port, outbound_policy,
                     config_revision, registry_revision)


def compile_all(resources: Sequence[Resource], registry: RegistryState, *, config_revision: int = 0,
                registry_revision: int = 0, outbound_policy: str = "ALLOW_ANY") -> dict[str, dict[str, Any]]:
    """node_id -> snapshot for every node of the registry, using each node's own addresses.

    The node-independent part (services, routes, cluster policies) is compiled once; only
    endpoint addressing differs per node.  Nodes marked not alive get a snapshot too, so a
    proxy that comes back finds its configuration ready.
    """
    plan = _plan_mesh(resources, registry)
    return {nid: _assemble(plan, registry.nodes, nid, n.ip, n.http_proxy_port, n.inbound_port, outbound_policy,
                           config_revision, registry_revision)
            for nid, n in sorted(registry.nodes.items())}


def snapshot_version(snapshot: Mapping[str, Any], config_revision: int, registry_revision: int) -> str:
    """``c<rev>.r<rev>.<first 10 hex of sha256 over the canonical JSON of all but version>``."""
    body = {k: v for k, v in snapshot.items() if k != "version"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:10]
    return f"c{config_revision}.r{registry_revision}.{digest}"


def _plan_mesh(resources: Sequence[Resource], registry: RegistryState) -> _MeshPlan:
    by_kind = resources_by_kind(resources)
    services = build_service_index(by_kind, registry)
    mesh_vs = [vs for vs in by_kind.get("VirtualService", []) if binds_mesh(vs)]
    rules = by_kind.get("DestinationRule", [])
    clusters = build_cluster_plans(services, rules)
    return _MeshPlan(vips=_vips(services), virtual_hosts=_virtual_hosts(services, mesh_vs),
                     clusters=clusters,
                     security=compile_security(resources), rate_limits=compile_rate_limits(resources),
                     caches=compile_caches(resources),
                     tcp_routes=_l4_routes(services, mesh_vs, rules, TCP_ROUTED, translate_tcp_routes),
                     tls_routes=_l4_routes(services, mesh_vs, rules, _TLS_PROTOCOLS, translate_tls_routes),
                     peer_authn=compile_peer_authentications(resources),
                     telemetry=compile_telemetry(resources, services, clusters),
                     tracing_sampling=mesh_sampling(resources),
                     gateway_listeners=compile_gateway_listeners(by_kind.get("Gateway", []),
                                                                 by_kind.get("VirtualService", []), services.get,
                                                                 partial(with_idle_timeouts, rules=rules)))


def _vips(services: Mapping[str, Service]) -> list[dict[str, Any]]:
    """One entry per (VIP, service port); the first service to claim an address:port keeps it."""
    out, seen = [], set()
    for svc in services.values():
        for address in svc.vips:
            for p in svc.ports:
                if (address, p.number) not in seen:
                    seen.add((address, p.number))
                    out.append({"address": address, "port": p.number, "host": svc.host, "protocol": p.protocol})
    return out


def _domain_candidates(svc: Service) -> list[tuple[str, tuple[Any, ...]]]:
    """(domain, priority) for a service; a lower priority wins a domain shared by two services."""
    out: list[tuple[str, tuple[Any, ...]]] = [(svc.host, (0,))]
    if svc.short_name is not None:
        ns_alias = f"{svc.short_name}.{svc.namespace}"
        out += [(f"{ns_alias}.svc", (1,)), (ns_alias, (1,)),
                (svc.short_name, (2, svc.namespace != DEFAULT_NAMESPACE, svc.namespace))]
    out += [(address, (0,)) for address in svc.vips]
    return out


def _domains(services: Mapping[str, Service]) -> dict[tuple[str, int], list[str]]:
    """(host, port) -> the domains its virtual host answers to, each domain owned once per port."""
    owner: dict[tuple[str, int], tuple[tuple[Any, ...], str]] = {}
    for svc in services.values():
        for domain, prio in _domain_candidates(svc):
            for p in svc.ports:
                key = (domain, p.number)
                if key not in owner or (prio, svc.host) < owner[key]:
                    owner[key] = (prio, svc.host)
    out: dict[tuple[str, int], list[str]] = {}
    for svc in services.values():
        for p in svc.ports:
            out[(svc.host, p.number)] = [d for d, _ in _domain_candidates(svc)
                                         if owner[(d, p.number)][1] == svc.host]
    return out


def _virtual_hosts(services: Mapping[str, Service], mesh_vs: Sequence[Resource]) -> list[dict[str, Any]]:
    domains = _domains(services)
    lookup = services.get
    out = []
    for svc in services.values():
        vs = select_virtual_service(svc.host, mesh_vs)
        for p in svc.ports:
            routes = translate_http_routes(vs, p.number, lookup) if vs and p.protocol in HTTP_ROUTED else []
            out.append({"name": f"{svc.host}:{p.number}", "host": svc.host, "port": p.number,
                        "domains": domains[(svc.host, p.number)],
                        "routes": routes or [default_route(svc.host, p.number)]})
    return out


_TLS_PROTOCOLS = ("tls", "https")   # ports routed by SNI: Istio sends TLS and HTTPS ports through SNI filter chains


def _l4_routes(services: Mapping[str, Service], mesh_vs: Sequence[Resource], rules: Sequence[Resource],
               protocols: Sequence[str], translate: Callable[..., list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One entry per service port of ``protocols``: its tcp (or tls) routes, each with its idle
    timeout if configured."""
    out = []
    for svc in services.values():
        vs = select_virtual_service(svc.host, mesh_vs)
        for p in svc.ports:
            if p.protocol not in protocols:
                continue
            routes = with_idle_timeouts(translate(vs, svc.host, p.number, services.get), rules)
            out.append({"name": f"{svc.host}:{p.number}", "host": svc.host, "port": p.number, "routes": routes})
    return out


def with_idle_timeouts(routes: list[dict[str, Any]], rules: Sequence[Resource]) -> list[dict[str, Any]]:
    """``routes`` (tcp or tls), each with the idle timeout of its first destination if configured."""
    for route in routes:
        idle = _idle_timeout(route["route"][0]["cluster"], rules)
        if idle is not None:
            route["idle_timeout"] = idle
    return routes


def _idle_timeout(cluster: str, rules: Sequence[Resource]) -> float | None:
    """``connectionPool.tcp.idleTimeout`` of the DestinationRule for ``outbound|PORT|SUBSET|HOST``."""
    _, port, subset, host = cluster.split("|", 3)
    rule = select_destination_rule(host, rules)
    if rule is None:
        return None
    subset_policy = next((s.get("trafficPolicy") for s in rule.spec.get("subsets") or ()
                          if subset and s.get("name") == subset), None)
    policy = merge_traffic_policy(rule.spec.get("trafficPolicy"), subset_policy, int(port))
    raw = ((policy.get("connectionPool") or {}).get("tcp") or {}).get("idleTimeout")
    return parse_duration(raw) if raw else None


def _endpoint(ep: ServiceEndpoint, node_id: str, nodes: Mapping[str, NodeInfo],
              peer_authn: Sequence[PeerAuthnPolicy]) -> dict[str, Any] | None:
    """A Ray workload's endpoint carries its PeerAuthentication mode (``mtls_mode``): its node's
    inbound proxy enforces it, clients use mTLS unless it is DISABLE.  Endpoints outside Ray have
    no proxy in front of them, hence no mode (clients speak plaintext to them)."""
    via = None
    if ep.in_ray and ep.node != node_id:
        node = nodes.get(ep.node)
        if node is None or not node.alive or not node.inbound_port:
            return None
        via = {"address": node.ip, "port": node.inbound_port}
    out = {"address": ep.address, "port": ep.port, "node": ep.node, "labels": dict(ep.labels), "via": via}
    locality = ep.locality or (nodes[ep.node].locality if ep.in_ray and ep.node in nodes else "")
    if locality:
        out["locality"] = locality
    if ep.service_account:
        out["namespace"], out["service_account"] = ep.namespace, ep.service_account
    if ep.in_ray:
        out["mtls_mode"] = mtls_mode(peer_authn, ep.namespace, dict(ep.labels), ep.port, ROOT_NAMESPACE)
    return out


def _cluster(plan: ClusterPlan, node_id: str, nodes: Mapping[str, NodeInfo],
             peer_authn: Sequence[PeerAuthnPolicy]) -> dict[str, Any]:
    eps = [e for e in (_endpoint(ep, node_id, nodes, peer_authn) for ep in plan.endpoints) if e is not None]
    out: dict[str, Any] = {"service": plan.service, "port": plan.port, "subset": plan.subset,
                           "connect_timeout": plan.connect_timeout, "lb": copy.deepcopy(plan.lb), "endpoints": eps}
    if plan.passthrough:
        out["passthrough"] = True
    if plan.tls is not None:
        out["tls"] = copy.deepcopy(plan.tls)
    if plan.resilience:
        out.update(copy.deepcopy(dict(plan.resilience)))
    if plan.protocol in HTTP2_PROTOCOLS or plan.protocol == AUTO:
        out["protocol"] = plan.protocol
    return out


def _node(info: NodeInfo | None, node_id: str, node_ip: str) -> dict[str, Any]:
    """The snapshot's ``node``: with its locality and labels when known (locality load balancing)."""
    out: dict[str, Any] = {"id": node_id, "ip": node_ip}
    if info is not None and info.locality:
        out["locality"] = info.locality
    if info is not None and info.labels:
        out["labels"] = dict(sorted(info.labels.items()))
    return out


def _gateway(plan: _MeshPlan, info: NodeInfo | None) -> dict[str, Any] | None:
    """The ingress gateway of a gateway node: its identity and listeners on the node's gateway address."""
    if info is None or not info.gateway_address or not plan.gateway_listeners:
        return None
    listeners = [{**copy.deepcopy(listener), "address": info.gateway_address} for listener in plan.gateway_listeners]
    return {**gateway_identity(), "listeners": listeners}


def _assemble(plan: _MeshPlan, nodes: Mapping[str, NodeInfo], node_id: str, node_ip: str, http_proxy_port: int,
              inbound_port: int, outbound_policy: str, config_revision: int, registry_revision: int) -> dict[str, Any]:
    """One node's snapshot; nothing is shared with other nodes' snapshots (callers may mutate them).

    The HTTP proxy listener serves local clients only and binds loopback; the inbound
    listener is what other nodes dial (``via`` = the node's ip), so it binds the node's ip.
    """
    snap: dict[str, Any] = {
        "node": _node(nodes.get(node_id), node_id, node_ip),
        "listeners": {"http_proxy": {"host": "127.0.0.1", "port": http_proxy_port},
                      "inbound": {"host": node_ip, "port": inbound_port}},
        "outbound_policy": outbound_policy,
        "vips": copy.deepcopy(plan.vips),
        "virtual_hosts": copy.deepcopy(plan.virtual_hosts),
        "clusters": {name: _cluster(c, node_id, nodes, plan.peer_authn) for name, c in plan.clusters.items()},
        "security": copy.deepcopy(plan.security),
        "rate_limits": copy.deepcopy(plan.rate_limits),
        "tcp_routes": copy.deepcopy(plan.tcp_routes),
    }
    if plan.tracing_sampling is not None:
        snap["tracing"] = {"sampling": plan.tracing_sampling}
    if plan.telemetry is not None:
        snap["telemetry"] = copy.deepcopy(plan.telemetry)
    if plan.caches:
        snap["caches"] = copy.deepcopy(plan.caches)
    if plan.tls_routes:
        snap["tls_routes"] = copy.deepcopy(plan.tls_routes)
    gateway = _gateway(plan, nodes.get(node_id))
    if gateway is not None:
        snap["gateway"] = gateway
    return {"version": snapshot_version(snap, config_revision, registry_revision), **snap}
