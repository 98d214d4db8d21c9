"""Istio API objects (and raymesh's own ``policy.raymesh.io`` kinds) as raymesh stores them.

A resource keeps the user's document as it was written (``spec`` stays a plain dict with
Istio's camelCase field names), plus the identity Galley needs: group/version/kind,
namespace, name, and the store revision at which it last changed (``resourceVersion``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from mesh.secrets import secret_spec

DEFAULT_NAMESPACE = "default"

# kind -> API group.  Versions accepted per group are in API_VERSIONS.
KIND_GROUPS: dict[str, str] = {
    "VirtualService": "networking.istio.io",
    "DestinationRule": "networking.istio.io",
    "Gateway": "networking.istio.io",
    "ServiceEntry": "networking.istio.io",
    "WorkloadEntry": "networking.istio.io",
    "PeerAuthentication": "security.istio.io",
    "RequestAuthentication": "security.istio.io",
    "AuthorizationPolicy": "security.istio.io",
    "Telemetry": "telemetry.istio.io",
    # raymesh's own kind: Istio configures rate limits through EnvoyFilter, which raymesh does not
    # accept (it patches Envoy internals), so local rate limits get a first-class resource.
    "RateLimitPolicy": "policy.raymesh.io",
    # raymesh's own kind: Istio has no HTTP cache API (Envoy's cache filter is reached only
    # through EnvoyFilter), so a destination's response cache gets a first-class resource.
    "CachePolicy": "policy.raymesh.io",
}

API_VERSIONS: dict[str, tuple[str, ...]] = {
    "networking.istio.io": ("v1", "v1beta1", "v1alpha3"),
    "security.istio.io": ("v1", "v1beta1"),
    "telemetry.istio.io": ("v1", "v1alpha1"),
    "policy.raymesh.io": ("v1alpha1",),
}

# Lower-case names and short names accepted by ``meshctl get`` (as kubectl does); the short
# names are the ``shortNames`` of Istio's CRDs.
KIND_ALIASES: dict[str, str] = {}
for _kind, _aliases in {
    "VirtualService": ("virtualservice", "virtualservices", "vs"),
    "DestinationRule": ("destinationrule", "destinationrules", "dr"),
    "Gateway": ("gateway", "gateways", "gw"),
    "ServiceEntry": ("serviceentry", "serviceentries", "se"),
    "WorkloadEntry": ("workloadentry", "workloadentries", "we"),
    "PeerAuthentication": ("peerauthentication", "peerauthentications", "pa"),
    "RequestAuthentication": ("requestauthentication", "requestauthentications", "ra"),
    "AuthorizationPolicy": ("authorizationpolicy", "authorizationpolicies", "ap"),
    "Telemetry": ("telemetry", "telemetries"),  # Istio's short name is the singular itself
    "RateLimitPolicy": ("ratelimitpolicy", "ratelimitpolicies", "rlp"),
    "CachePolicy": ("cachepolicy", "cachepolicies", "cp"),
    "Secret": ("secret", "secrets"),
}.items():
    for _a in _aliases:
        KIND_ALIASES[_a] = _kind

# Kubernetes core kinds the mesh stores (group "", apiVersion "v1"): the ingress gateway's TLS
# secrets (``mesh.secrets``).  They have no ``spec``: ``Resource.spec`` holds their ``type`` and
# ``data``, and ``to_dict`` writes them back at the top level.
CORE_KINDS: dict[str, str] = {"Secret": "v1"}


def resolve_kind(name: str) -> str | None:
    """Map ``vs``, ``virtualservices``, ``VirtualService`` ... to the canonical kind, or None."""
    if name in KIND_GROUPS or name in CORE_KINDS:
        return name
    return KIND_ALIASES.get(name.lower())


@dataclass(frozen=True, slots=True)
class ResourceKey:
    kind: str
    namespace: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.namespace}/{self.name}"


@dataclass(slots=True)
class Resource:
    api_version: str
    kind: str
    name: str
    namespace: str = DEFAULT_NAMESPACE
    spec: dict[str, Any] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    resource_version: int = 0
    generation: int = 1

    @property
    def key(self) -> ResourceKey:
        return ResourceKey(self.kind, self.namespace, self.name)

    @property
    def group(self) -> str:
        group, slash, _ = self.api_version.partition("/")
        return group if slash else ""   # the core group ("v1")

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> "Resource":
        """Build from an already validated Kubernetes-style document."""
        meta = doc.get("metadata") or {}
        spec = secret_spec(doc) if doc["kind"] in CORE_KINDS else dict(doc.get("spec") or {})
        return cls(
            api_version=doc["apiVersion"],
            kind=doc["kind"],
            name=meta["name"],
            namespace=meta.get("namespace") or DEFAULT_NAMESPACE,
            spec=spec,
            labels=dict(meta.get("labels") or {}),
            annotations=dict(meta.get("annotations") or {}),
            resource_version=int(meta.get("resourceVersion") or 0),
            generation=int(meta.get("generation") or 1),
        )

    def to_dict(self) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": self.name, "namespace": self.namespace}
        if self.labels:
            meta["labels"] = dict(self.labels)
        if self.annotations:
            meta["annotations"] = dict(self.annotations)
        if self.resource_version:
            meta["resourceVersion"] = str(self.resource_version)
            meta["generation"] = self.generation
        if self.kind in CORE_KINDS:
            return {"apiVersion": self.api_version, "kind": self.kind, "metadata": meta, **self.spec}
        return {"apiVersion": self.api_version, "kind": self.kind, "metadata": meta, "spec": self.spec}

    def same_content(self, other: "Resource") -> bool:
        """True when applying ``other`` over ``self`` would change nothing a user wrote."""
        return (self.api_version, self.spec, self.labels, self.annotations) == (
            other.api_version, other.spec, other.labels, other.annotations)
