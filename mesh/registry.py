"""The service registry model: who serves what, where.

Workloads join the mesh by registering a ``WorkloadInstance`` (see ``mesh.workload``);
ServiceEntry and WorkloadEntry resources add endpoints outside Ray (the compiler merges
those).  Proxies on every node learn about nodes (their inbound tunnel address) through
``NodeInfo``.  This module is pure data: the actors keep it in the shared store.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from mesh.records import Record

CLUSTER_DOMAIN = "cluster.local"


def service_fqdn(name: str, namespace: str, domain: str = CLUSTER_DOMAIN) -> str:
    return f"{name}.{namespace}.svc.{domain}"


@dataclass(slots=True)
class WorkloadInstance(Record):
    """One serving endpoint of a service, usually a Ray actor listening on its node's loopback."""

    service: str                      # short service name, e.g. "reviews"
    namespace: str                    # e.g. "default"
    address: str                      # where it listens, e.g. "127.0.0.1"
    port: int                         # the port it listens on (target port)
    service_port: int                 # the port clients address, e.g. 9080
    node_id: str                      # Ray node id hosting it
    labels: dict[str, str] = field(default_factory=dict)      # e.g. {"app": "reviews", "version": "v1"}
    protocol: str = ""                # the port's appProtocol ("grpc", "kubernetes.io/h2c", ...); "": none
    port_name: str = "http"           # Istio selects the protocol by its prefix ("grpc-api") without one
    service_account: str = "default"
    actor_id: str | None = None       # Ray actor whose life the registration follows
    uid: str = ""                     # stable id of the registration

    @property
    def host(self) -> str:
        return service_fqdn(self.service, self.namespace)


@dataclass(slots=True)
class NodeInfo(Record):
    """A Ray node with a proxy: the addresses other proxies use to reach it."""

    node_id: str
    ip: str
    inbound_port: int = 0
    http_proxy_port: int = 0
    alive: bool = True
    locality: str = ""                # "region/zone/subzone" from the node's labels (see node_locality)
    labels: dict[str, str] = field(default_factory=dict)   # the node's topology labels
    gateway_address: str = ""         # where its ingress gateway listeners bind; "": not a gateway node


# Node labels that give a node its locality, most preferred first for each part: Ray's own
# (``ray.io/availability-region`` / ``-zone``, set by the autoscaler on cloud nodes or by
# ``ray start --labels``), then the Kubernetes topology labels KubeRay copies from the pod.
# Ray has no subzone label; raymesh reads Istio's ``topology.istio.io/subzone``.
REGION_LABELS = ("ray.io/availability-region", "topology.kubernetes.io/region")
ZONE_LABELS = ("ray.io/availability-zone", "topology.kubernetes.io/zone")
SUBZONE_LABELS = ("topology.istio.io/subzone",)
TOPOLOGY_LABELS = REGION_LABELS + ZONE_LABELS + SUBZONE_LABELS


def node_locality(labels: dict[str, str]) -> str:
    """A node's Istio locality ``region/zone/subzone`` from its labels; "" when it has no region."""
    def first(keys: tuple[str, ...]) -> str:
        return next((str(labels[k]) for k in keys if labels.get(k)), "")

    region, zone, subzone = first(REGION_LABELS), first(ZONE_LABELS), first(SUBZONE_LABELS)
    if not region:
        return ""
    return "/".join(p for p in (region, zone, subzone if zone else "") if p)


@dataclass(slots=True)
class RegistryState:
    """Everything the compiler needs besides configuration."""

    workloads: list[WorkloadInstance] = field(default_factory=list)
    nodes: dict[str, NodeInfo] = field(default_factory=dict)
    vips: dict[str, str] = field(default_factory=dict)        # service FQDN -> VIP (127.x.y.z)

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> "RegistryState":
        """From the shared store's state (``workloads`` and ``nodes`` keyed by id, ``vips``)."""
        return cls(
            workloads=[WorkloadInstance.from_dict(w) for _, w in sorted((state.get("workloads") or {}).items())],
            nodes={k: NodeInfo.from_dict(v) for k, v in (state.get("nodes") or {}).items()},
            vips=dict(state.get("vips") or {}),
        )
