"""The compiler's service index: every host the mesh knows, with ports, VIPs and endpoints.

Two sources feed it, as in Istio:

* the Ray registry: ``WorkloadInstance`` records grouped by (service, namespace) become
  ``name.ns.svc.cluster.local`` with one port per distinct ``service_port``;
* ``ServiceEntry`` resources, whose endpoints come from ``spec.endpoints`` or, with a
  ``workloadSelector``, from ``WorkloadEntry`` resources and Ray workloads of the
  ServiceEntry's namespace whose labels match.

A ``WorkloadEntry`` that no ServiceEntry selects creates no service (Istio: a WorkloadEntry
only contributes endpoints to services that select it).  When two sources declare the same
host the registry wins, then the ServiceEntry first in (namespace, name) order; Istio would
merge them, but one owner per host keeps the output stable and easy to explain.
``exportTo`` is ignored: raymesh is a single cluster and every host is visible everywhere.

Everything here is independent of the node a snapshot is compiled for; which endpoints need
a tunnel (``via``) is decided when a node's snapshot is assembled.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Sequence

from mesh.protocols import port_protocol, service_entry_protocol
from mesh.registry import RegistryState, WorkloadInstance, service_fqdn
from mesh.resources import Resource


@dataclass(frozen=True, slots=True)
class ServicePort:
    number: int
    name: str
    protocol: str                      # the selected protocol (mesh.protocols): "http", "grpc", "tcp", "auto", ...
    target_port: int | None = None     # ServiceEntry targetPort


@dataclass(frozen=True, slots=True)
class ServiceEndpoint:
    """One address serving one service port."""

    address: str
    port: int                          # the port the endpoint listens on
    service_port: int                  # the service port it serves
    labels: tuple[tuple[str, str], ...]
    node: str = ""                     # Ray node id; "" for endpoints outside Ray
    in_ray: bool = False               # True for Ray workloads, which may need a node tunnel
    namespace: str = ""                # the workload's identity, for policy and telemetry
    service_account: str = ""
    locality: str = ""                 # WorkloadEntry / ServiceEntry ``locality``; Ray workloads: their node's

    def has_labels(self, selector: Mapping[str, str]) -> bool:
        return labels_match(selector, dict(self.labels))


@dataclass(frozen=True, slots=True)
class Service:
    host: str
    namespace: str
    short_name: str | None             # registry services only: "reviews" for reviews.ns.svc...
    ports: tuple[ServicePort, ...]
    vips: tuple[str, ...]
    endpoints: tuple[ServiceEndpoint, ...]
    passthrough: bool = False          # ServiceEntry resolution NONE: forward to the original destination

    def port(self, number: int) -> ServicePort | None:
        return next((p for p in self.ports if p.number == number), None)


def is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def resolve_host(host: str, namespace: str) -> str:
    """Istio's ResolveShortnameToFQDN: a name without a dot gets ``.<namespace>.svc.cluster.local``.

    Names with a dot (``reviews.default``), wildcards and IP addresses are used as written,
    exactly like Istio, so ``reviews.default`` does not name ``reviews.default.svc.cluster.local``.
    """
    host = host.lower()
    if host == "*" or "." in host or is_ip(host):
        return host
    return service_fqdn(host, namespace)


def host_covers(pattern: str, host: str) -> bool:
    """True when the (possibly wildcard) ``pattern`` names ``host``: exact, ``*`` or ``*.suffix``."""
    if pattern == host or pattern == "*":
        return True
    return pattern.startswith("*.") and host.endswith(pattern[1:])


def specificity(pattern: str, host: str) -> tuple[int, int]:
    """Sort key among patterns covering ``host``: exact first, then the longest wildcard."""
    return (0 if pattern == host else 1, -len(pattern))


def labels_match(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def _sorted_labels(labels: Mapping[str, Any]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((str(k), str(v)) for k, v in labels.items()))


def _registry_services(registry: RegistryState) -> list[Service]:
    groups: dict[tuple[str, str], list[WorkloadInstance]] = {}
    for inst in registry.workloads:
        groups.setdefault((inst.service, inst.namespace), []).append(inst)
    services = []
    for (name, namespace), insts in sorted(groups.items()):
        host = service_fqdn(name, namespace)
        by_port: dict[int, set[tuple[str, str]]] = {}
        for i in insts:
            by_port.setdefault(i.service_port, set()).add((i.port_name, port_protocol(i.port_name, i.protocol)))
        # Instances should agree on a port's name and protocol; if they do not, the smallest wins.
        ports = tuple(ServicePort(n, *min(by_port[n])) for n in sorted(by_port))
        endpoints = tuple(ServiceEndpoint(i.address, i.port, i.service_port, _sorted_labels(i.labels),
                                          node=i.node_id, in_ray=True, namespace=i.namespace,
                                          service_account=i.service_account) for i in insts)
        vip = registry.vips.get(host)
        services.append(Service(host, namespace, name, ports, (vip,) if vip else (), _sort_endpoints(endpoints)))
    return services


def _sort_endpoints(endpoints: Iterable[ServiceEndpoint]) -> tuple[ServiceEndpoint, ...]:
    return tuple(sorted(endpoints, key=lambda e: (e.service_port, e.address, e.port, e.node, e.labels)))


def _entry_port(port_map: Mapping[str, Any], sp: ServicePort) -> int:
    """ServiceEntry port mapping: the endpoint's named port, else targetPort, else the port itself."""
    mapped = port_map.get(sp.name)
    if mapped is not None:
        return int(mapped)
    return sp.target_port if sp.target_port is not None else sp.number


def _workload_endpoints(spec: Mapping[str, Any], ports: Sequence[ServicePort]) -> list[ServiceEndpoint]:
    """Endpoints for an inline ServiceEntry endpoint or a WorkloadEntry spec (same shape)."""
    address = spec.get("address")
    if not address:
        return []
    port_map = spec.get("ports") or {}
    labels = _sorted_labels(spec.get("labels") or {})
    locality = str(spec.get("locality") or "")
    return [ServiceEndpoint(str(address), _entry_port(port_map, sp), sp.number, labels, locality=locality)
            for sp in ports]


def _selected_endpoints(se: Resource, ports: Sequence[ServicePort], workload_entries: Sequence[Resource],
                        registry: RegistryState) -> list[ServiceEndpoint]:
    """Endpoints of a ServiceEntry with a ``workloadSelector``.

    WorkloadEntries and Ray workloads of the ServiceEntry's namespace whose labels match are
    selected.  A Ray workload serves a ServiceEntry port when its ``service_port`` equals the
    port's targetPort (or number), the way a selected pod serves its container port.
    """
    selector = (se.spec.get("workloadSelector") or {}).get("labels") or {}
    out: list[ServiceEndpoint] = []
    for we in workload_entries:
        if we.namespace == se.namespace and labels_match(selector, we.spec.get("labels") or {}):
            out.extend(_workload_endpoints(we.spec, ports))
    for inst in registry.workloads:
        if inst.namespace != se.namespace or not labels_match(selector, inst.labels):
            continue
        for sp in ports:
            if inst.service_port == (sp.target_port if sp.target_port is not None else sp.number):
                out.append(ServiceEndpoint(inst.address, inst.port, sp.number, _sorted_labels(inst.labels),
                                           node=inst.node_id, in_ray=True, namespace=inst.namespace,
                                           service_account=inst.service_account))
    return out


def _service_entry_services(entries: Sequence[Resource], workload_entries: Sequence[Resource],
                            registry: RegistryState, taken: set[str]) -> list[Service]:
    services = []
    for se in entries:
        spec = se.spec
        ports = tuple(ServicePort(int(p["number"]), str(p.get("name") or ""), service_entry_protocol(p.get("protocol")),
                                  int(p["targetPort"]) if p.get("targetPort") is not None else None)
                      for p in spec.get("ports") or ())
        resolution = str(spec.get("resolution") or "NONE").upper()
        if spec.get("workloadSelector"):
            endpoints = _selected_endpoints(se, ports, workload_entries, registry)
        else:
            endpoints = [e for ep in spec.get("endpoints") or () for e in _workload_endpoints(ep, ports)]
        addresses = [str(a) for a in spec.get("addresses") or () if is_ip(str(a))]  # CIDRs get no VIP
        for raw_host in spec.get("hosts") or ():
            host = str(raw_host).lower()
            if host in taken:
                continue
            taken.add(host)
            vips = list(addresses)
            if registry.vips.get(host) and registry.vips[host] not in vips:
                vips.append(registry.vips[host])
            host_eps = endpoints
            if resolution == "NONE":
                host_eps = []
            elif resolution == "DNS" and not endpoints and not host.startswith("*"):
                # DNS without endpoints: the host name itself is resolved at connect time.
                host_eps = [ServiceEndpoint(host, sp.target_port if sp.target_port is not None else sp.number,
                                            sp.number, ()) for sp in ports]
            services.append(Service(host, se.namespace, None, ports, tuple(vips), _sort_endpoints(host_eps),
                                    passthrough=resolution == "NONE"))
    return services


def build_service_index(by_kind: Mapping[str, Sequence[Resource]], registry: RegistryState) -> dict[str, Service]:
    """host -> Service for the registry and every ServiceEntry, in host order.

    ``by_kind`` is ``resources_by_kind(resources)``: the (namespace, name) order inside each
    kind decides which ServiceEntry owns a host two of them declare.
    """
    services = _registry_services(registry)
    taken = {s.host for s in services}
    services += _service_entry_services(by_kind.get("ServiceEntry", ()), by_kind.get("WorkloadEntry", ()),
                                        registry, taken)
    return {s.host: s for s in sorted(services, key=lambda s: s.host)}


def resources_by_kind(resources: Iterable[Resource]) -> dict[str, list[Resource]]:
    """Resources grouped by kind, each group in (namespace, name) order: the compiler's tie-breaker."""
    out: dict[str, list[Resource]] = {}
    for r in sorted(resources, key=lambda r: (r.kind, r.namespace, r.name)):
        out.setdefault(r.kind, []).append(r)
    return out
