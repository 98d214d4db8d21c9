"""Configuration analysis: what ``istioctl analyze`` reports, for raymesh's configuration.

Validation (``mesh.validation``) rejects a document that is wrong on its own.  Analysis looks
at documents together with the rest of the configuration and the service registry, and
reports what is valid but probably not what the user meant: a route to a host or subset that
does not exist, a rule no request can reach, a policy whose selector matches no workload.
Nothing here changes the configuration; each finding is a ``Message`` with Istio's code,
level and wording where Istio has the check (``IST0101`` ...), and a ``RM`` code where the
finding is about a choice raymesh makes differently from Istio (one DestinationRule per host).

``analyze(resources, services, workloads)``: ``services`` (the compiler's service index) and
``workloads`` (registry instances) are None when analysing offline, and the checks that need
them (a destination host exists, a selector or subset matches a workload) are then skipped:
without a cluster only ServiceEntries could say which hosts exist.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

from mesh.compiler_clusters import select_destination_rule
from mesh.compiler_gateways import GATEWAY_NAMESPACE, server_domains
from mesh.compiler_routes import MESH, binds_mesh, gateway_ref
from mesh.compiler_security import ROOT_NAMESPACE
from mesh.compiler_services import Service, host_covers, labels_match, resolve_host, resources_by_kind
from mesh.registry import WorkloadInstance
from mesh.resources import Resource, ResourceKey

LEVELS = ("Info", "Warning", "Error")


@dataclass(frozen=True, slots=True)
class MessageType:
    code: str
    name: str
    level: str
    template: str


REFERENCED_RESOURCE_NOT_FOUND = MessageType("IST0101", "ReferencedResourceNotFound", "Error",
                                            'Referenced {} not found: "{}"')
SCHEMA_VALIDATION_ERROR = MessageType("IST0106", "SchemaValidationError", "Error", "Schema validation error: {}")
CONFLICTING_MESH_GATEWAY_VS_HOSTS = MessageType(
    "IST0109", "ConflictingMeshGatewayVirtualServiceHosts", "Error",
    "The VirtualServices {} associated with mesh gateway define the same host {} which can lead to undefined "
    "behavior. This can be fixed by merging the conflicting VirtualServices into a single resource.")
NO_MATCHING_WORKLOADS = MessageType("IST0127", "NoMatchingWorkloadsFound", "Warning",
                                    "No matching workloads for this resource with the following labels: {}")
NO_SERVER_CERT_VERIFICATION = MessageType(
    "IST0128", "NoServerCertificateVerificationDestinationLevel", "Warning",
    "DestinationRule {} in namespace {} has TLS mode set to {} but no caCertificates are set to validate server "
    "identity for host: {}")
NO_SERVER_CERT_VERIFICATION_PORT = MessageType(
    "IST0129", "NoServerCertificateVerificationPortLevel", "Warning",
    "DestinationRule {} in namespace {} has TLS mode set to {} but no caCertificates are set to validate server "
    "identity for host: {} at port {}")
VS_UNREACHABLE_RULE = MessageType("IST0130", "VirtualServiceUnreachableRule", "Warning",
                                  "VirtualService rule {} not used ({}).")
VS_INEFFECTIVE_MATCH = MessageType("IST0131", "VirtualServiceIneffectiveMatch", "Info",
                                   "VirtualService rule {} match {} is not used (duplicate/overlapping match in rule {}).")
VS_HOST_NOT_IN_GATEWAY = MessageType("IST0132", "VirtualServiceHostNotFoundInGateway", "Warning",
                                     "one or more host {} defined in VirtualService {} not found in Gateway {}.")
MULTIPLE_TELEMETRIES_WITHOUT_SELECTOR = MessageType(
    "IST0160", "MultipleTelemetriesWithoutWorkloadSelectors", "Error",
    'The Telemetries {} in namespace "{}" have no workload selector, which can lead to undefined behavior.')
SUBSET_SELECTS_NOTHING = MessageType(
    "IST0173", "DestinationRuleSubsetNotSelectPods", "Warning",
    "The Subset {} defined in the DestinationRule does not select any workloads, which may lead to 503 UH "
    "(NoHealthyUpstream).")
SHADOWED_DESTINATION_RULE = MessageType(
    "RM0001", "ShadowedDestinationRule", "Warning",
    "This DestinationRule is not applied to host {}: {} applies there instead (raymesh applies one "
    "DestinationRule per host, the first in namespace/name order, where Istio would merge them). Merge the "
    "two into one resource.")
MULTIPLE_PEER_AUTHN_WITHOUT_SELECTOR = MessageType(
    "RM0002", "MultiplePeerAuthenticationsWithoutSelector", "Warning",
    'The PeerAuthentications {} in namespace "{}" have no workload selector; only {} is applied.')

MESSAGE_TYPES = (REFERENCED_RESOURCE_NOT_FOUND, SCHEMA_VALIDATION_ERROR, CONFLICTING_MESH_GATEWAY_VS_HOSTS,
                 NO_MATCHING_WORKLOADS, NO_SERVER_CERT_VERIFICATION, NO_SERVER_CERT_VERIFICATION_PORT,
                 VS_UNREACHABLE_RULE, VS_INEFFECTIVE_MATCH, VS_HOST_NOT_IN_GATEWAY,
                 MULTIPLE_TELEMETRIES_WITHOUT_SELECTOR, SUBSET_SELECTS_NOTHING, SHADOWED_DESTINATION_RULE,
                 MULTIPLE_PEER_AUTHN_WITHOUT_SELECTOR)


@dataclass(frozen=True, slots=True)
class Message:
    """One finding about one resource; ``reference`` is where it was read from (``file:document``)."""

    type: MessageType
    kind: str
    namespace: str
    name: str
    args: tuple[Any, ...]
    reference: str | None = None

    @property
    def level(self) -> str:
        return self.type.level

    @property
    def text(self) -> str:
        return self.type.template.format(*self.args)

    @property
    def origin(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"

    def __str__(self) -> str:
        where = self.origin + (f" {self.reference}" if self.reference else "")
        return f"{self.level} [{self.type.code}] ({where}) {self.text}"

    def to_dict(self) -> dict[str, Any]:
        out = {"code": self.type.code, "level": self.level, "origin": self.origin, "message": self.text}
        if self.reference:
            out["reference"] = self.reference
        return out


def at_least(level: str, threshold: str) -> bool:
    return LEVELS.index(level) >= LEVELS.index(threshold)


@dataclass(slots=True)
class _Context:
    by_kind: dict[str, list[Resource]]
    services: Mapping[str, Service] | None
    workloads: Sequence[WorkloadInstance] | None
    out: list[Message]

    def report(self, r: Resource, mtype: MessageType, *args: Any) -> None:
        self.out.append(Message(mtype, r.kind, r.namespace, r.name, args))


Analyzer = Callable[[_Context], None]


def analyze(resources: Iterable[Resource], services: Mapping[str, Service] | None = None,
            workloads: Sequence[WorkloadInstance] | None = None) -> list[Message]:
    """Every finding about ``resources``, ordered by resource and then by analyzer."""
    ctx = _Context(resources_by_kind(resources), services, workloads, [])
    for analyzer in ANALYZERS:
        analyzer(ctx)
    kinds = {k: i for i, k in enumerate(sorted(ctx.by_kind))}
    return sorted(ctx.out, key=lambda m: (kinds.get(m.kind, -1), m.namespace, m.name))


# -- VirtualService ------------------------------------------------------------------------------


def _destinations(spec: Mapping[str, Any]) -> Iterable[Mapping[str, Any]]:
    """Every destination a VirtualService names: routes of all three kinds, and mirrors."""
    for kind in ("http", "tcp", "tls"):
        for rule in spec.get(kind) or ():
            for route in rule.get("route") or ():
                if route.get("destination"):
                    yield route["destination"]
            if kind == "http":
                if rule.get("mirror"):
                    yield rule["mirror"]
                for m in rule.get("mirrors") or ():
                    if m.get("destination"):
                        yield m["destination"]


def _host_known(host: str, services: Mapping[str, Service]) -> bool:
    return host in services or any(h.startswith("*") and host_covers(h, host) for h in services)


def check_destinations(ctx: _Context) -> None:
    """IST0101: a destination host the mesh does not know, or a subset no DestinationRule defines."""
    rules = ctx.by_kind.get("DestinationRule", [])
    for vs in ctx.by_kind.get("VirtualService", []):
        seen: set[tuple[str, str]] = set()
        for dest in _destinations(vs.spec):
            raw = str(dest.get("host") or "")
            subset = str(dest.get("subset") or "")
            if not raw or (raw, subset) in seen:
                continue
            seen.add((raw, subset))
            host = resolve_host(raw, vs.namespace)
            if ctx.services is not None and not _host_known(host, ctx.services):
                ctx.report(vs, REFERENCED_RESOURCE_NOT_FOUND, "host", raw)
                continue
            if subset:
                dr = select_destination_rule(host, rules)
                if dr is None or subset not in {s.get("name") for s in dr.spec.get("subsets") or ()}:
                    ctx.report(vs, REFERENCED_RESOURCE_NOT_FOUND, "host+subset in destinationrule", f"{raw}+{subset}")


def check_gateway_references(ctx: _Context) -> None:
    """IST0101 for a gateway that does not exist; IST0132 for VirtualService hosts a gateway does not serve."""
    gateways = {f"{g.namespace}/{g.name}": g for g in ctx.by_kind.get("Gateway", [])}
    for vs in ctx.by_kind.get("VirtualService", []):
        refs = list(vs.spec.get("gateways") or ())
        for kind in ("http", "tcp", "tls"):
            for rule in vs.spec.get(kind) or ():
                for m in rule.get("match") or ():
                    refs += [g for g in m.get("gateways") or () if g not in refs]
        for ref in dict.fromkeys(refs):
            if ref == MESH:
                continue
            gw = gateways.get(gateway_ref(ref, vs.namespace))
            if gw is None:
                ctx.report(vs, REFERENCED_RESOURCE_NOT_FOUND, "gateway", ref)
                continue
            missing = [h for h in vs.spec.get("hosts") or ()
                       if not any(server_domains(gw, server, vs.namespace, str(h))
                                  for server in gw.spec.get("servers") or ())]
            if missing:
                ctx.report(vs, VS_HOST_NOT_IN_GATEWAY, missing, f"{vs.namespace}/{vs.name}", f"{gw.namespace}/{gw.name}")


def check_gateway_credentials(ctx: _Context) -> None:
    """IST0101 for a Gateway server whose ``tls.credentialName`` (or ``credentialNames``) names
    no Secret where the ingress gateway reads them (``istio-system``), as Istio's gateway
    secret analyzer reports it: the server's port would stay closed."""
    secrets = {s.name for s in ctx.by_kind.get("Secret", []) if s.namespace == GATEWAY_NAMESPACE}
    for gw in ctx.by_kind.get("Gateway", []):
        names: list[str] = []
        for server in gw.spec.get("servers") or ():
            tls = server.get("tls") or {}
            names += [str(n) for n in (tls.get("credentialName"), *(tls.get("credentialNames") or ())) if n]
        for name in dict.fromkeys(names):
            if name not in secrets:
                ctx.report(gw, REFERENCED_RESOURCE_NOT_FOUND, "credentialName", name)


def check_mesh_host_conflicts(ctx: _Context) -> None:
    """IST0109: two mesh VirtualServices for one host; only one of them is applied."""
    owners: dict[str, list[Resource]] = {}
    for vs in ctx.by_kind.get("VirtualService", []):
        if not binds_mesh(vs):
            continue
        for host in dict.fromkeys(resolve_host(str(h), vs.namespace) for h in vs.spec.get("hosts") or ()):
            owners.setdefault(host, []).append(vs)
    for host, group in owners.items():
        if len(group) > 1:
            names = ",".join(f"{v.namespace}/{v.name}" for v in group)
            for vs in group:
                ctx.report(vs, CONFLICTING_MESH_GATEWAY_VS_HOSTS, names, host)


def _canonical(match: Mapping[str, Any]) -> str:
    return json.dumps({k: v for k, v in match.items() if k != "name"}, sort_keys=True)


def check_unreachable_rules(ctx: _Context) -> None:
    """IST0130 / IST0131: rules after a catch-all, and matches an earlier rule already takes."""
    for vs in ctx.by_kind.get("VirtualService", []):
        for kind in ("http", "tcp", "tls"):
            rules = vs.spec.get(kind) or ()
            seen: dict[str, int] = {}
            catch_all: int | None = None
            for i, rule in enumerate(rules):
                where = f"{kind}[{i}]"
                matches = rule.get("match") or []
                if catch_all is not None:
                    ctx.report(vs, VS_UNREACHABLE_RULE, where, "only the last rule can have no matches")
                    continue
                if not matches or any(not _canonical(m).strip("{}") for m in matches):
                    catch_all = i
                    continue
                earlier = [seen.get(_canonical(m)) for m in matches]
                if all(e is not None for e in earlier):
                    ctx.report(vs, VS_UNREACHABLE_RULE, where,
                               f"duplicate/overlapping match in rule {kind}[{earlier[0]}]")
                else:
                    for j, e in enumerate(earlier):
                        if e is not None:
                            ctx.report(vs, VS_INEFFECTIVE_MATCH, where, f"#{j}", f"{kind}[{e}]")
                for m in matches:
                    seen.setdefault(_canonical(m), i)


# -- DestinationRule -----------------------------------------------------------------------------


def _without_verification(tls: Mapping[str, Any] | None) -> str | None:
    """The TLS mode when it originates TLS without a CA to verify the server against."""
    if not tls or tls.get("mode") not in ("SIMPLE", "MUTUAL"):
        return None
    if tls.get("caCertificates") or tls.get("credentialName") or tls.get("insecureSkipVerify"):
        return None
    return str(tls["mode"])


def check_destination_rules(ctx: _Context) -> None:
    """IST0128 / IST0129 (TLS without server verification), IST0173 (a subset selecting nothing)
    and RM0001 (a rule another one shadows)."""
    rules = ctx.by_kind.get("DestinationRule", [])
    first: dict[str, Resource] = {}
    for dr in rules:
        raw = str(dr.spec.get("host") or "")
        host = resolve_host(raw, dr.namespace)
        owner = first.setdefault(host, dr)
        if owner is not dr:
            ctx.report(dr, SHADOWED_DESTINATION_RULE, host, f"{owner.namespace}/{owner.name}")
        policies = [dr.spec.get("trafficPolicy") or {}] + [s.get("trafficPolicy") or {}
                                                           for s in dr.spec.get("subsets") or ()]
        for policy in policies:
            mode = _without_verification(policy.get("tls"))
            if mode:
                ctx.report(dr, NO_SERVER_CERT_VERIFICATION, dr.name, dr.namespace, mode, raw)
            for entry in policy.get("portLevelSettings") or ():
                mode = _without_verification(entry.get("tls"))
                if mode:
                    port = (entry.get("port") or {}).get("number")
                    ctx.report(dr, NO_SERVER_CERT_VERIFICATION_PORT, dr.name, dr.namespace, mode, raw, port)
        if ctx.services is None:
            continue
        covered = [s for h, s in ctx.services.items() if host_covers(host, h)]
        if not covered:
            continue   # a rule for a host the mesh does not know yet: nothing to select
        for subset in dr.spec.get("subsets") or ():
            labels = subset.get("labels") or {}
            if labels and not any(ep.has_labels(labels) for s in covered for ep in s.endpoints):
                ctx.report(dr, SUBSET_SELECTS_NOTHING, subset.get("name"))


# -- workload selectors --------------------------------------------------------------------------

_SELECTORS = {
    "AuthorizationPolicy": ("selector", "matchLabels"),
    "RequestAuthentication": ("selector", "matchLabels"),
    "PeerAuthentication": ("selector", "matchLabels"),
    "Telemetry": ("selector", "matchLabels"),
    "DestinationRule": ("workloadSelector", "matchLabels"),
}


def check_selectors(ctx: _Context) -> None:
    """IST0127: a policy whose workload selector matches no workload of its namespace (any
    namespace for the root namespace)."""
    if ctx.workloads is None:
        return
    for kind, (field, inner) in _SELECTORS.items():
        for r in ctx.by_kind.get(kind, []):
            labels = (r.spec.get(field) or {}).get(inner) or {}
            if not labels:
                continue
            if not any(labels_match(labels, w.labels) for w in ctx.workloads
                       if r.namespace == ROOT_NAMESPACE or w.namespace == r.namespace):
                ctx.report(r, NO_MATCHING_WORKLOADS, ",".join(f"{k}={v}" for k, v in sorted(labels.items())))


def check_namespace_wide_duplicates(ctx: _Context) -> None:
    """IST0160 (Telemetry) and RM0002 (PeerAuthentication): two namespace-wide resources of one
    kind in one namespace; raymesh applies the first by name."""
    for kind, mtype in (("Telemetry", MULTIPLE_TELEMETRIES_WITHOUT_SELECTOR),
                        ("PeerAuthentication", MULTIPLE_PEER_AUTHN_WITHOUT_SELECTOR)):
        groups: dict[str, list[Resource]] = {}
        for r in ctx.by_kind.get(kind, []):
            if not (r.spec.get("selector") or {}).get("matchLabels") and not r.spec.get("targetRefs") \
                    and not r.spec.get("targetRef"):
                groups.setdefault(r.namespace, []).append(r)
        for namespace, group in groups.items():
            if len(group) < 2:
                continue
            names = [r.name for r in group]
            for r in group:
                if mtype is MULTIPLE_TELEMETRIES_WITHOUT_SELECTOR:
                    ctx.report(r, mtype, names, namespace)
                else:
                    ctx.report(r, mtype, names, namespace, group[0].name)


ANALYZERS: tuple[Analyzer, ...] = (check_destinations, check_gateway_references, check_gateway_credentials,
                                   check_mesh_host_conflicts,
                                   check_unreachable_rules, check_destination_rules, check_selectors,
                                   check_namespace_wide_duplicates)


def with_references(messages: Iterable[Message], references: Mapping[ResourceKey, str]) -> list[Message]:
    """The messages with ``reference`` set for resources read from files."""
    out = []
    for m in messages:
        ref = references.get(ResourceKey(m.kind, m.namespace, m.name))
        out.append(m if ref is None else Message(m.type, m.kind, m.namespace, m.name, m.args, ref))
    return out
