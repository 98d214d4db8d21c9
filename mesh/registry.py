"""The service registry model: who serves what, where.

Workloads join the mesh by registering a ``WorkloadInstance`` (see ``mesh.workload``);
ServiceEntry and WorkloadEntry resources add endpoints outside Ray (the compiler merges
those).  Proxies on every node learn about nodes (their inbound tunnel address) through
``NodeInfo``.  This module is pure data: the actors keep it in the shared store.
"""
from __future__ import annotations

from dataclasses import dataclass, field
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
    protocol: str = "http"            # http | tcp
    port_name: str = "http"
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


@dataclass(slots=True)
class RegistryState:
    """Everything the compiler needs besides configuration."""

    workloads: list[WorkloadInstance] = field(default_factory=list)
    nodes: dict[str, NodeInfo] = field(default_factory=dict)
    vips: dict[str, str] = field(default_factory=dict)        # service FQDN -> VIP (127.x.y.z)
