"""Runs the Bookinfo sample (``mesh.samples.bookinfo``) as Ray actors that join the mesh."""
from __future__ import annotations

from typing import Any, Sequence

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from mesh import workload
from mesh.samples.bookinfo import SERVICE_PORT, Bookinfo, ServiceSpec

# (app, version) of every Bookinfo workload, as in Istio's bookinfo.yaml.
WORKLOADS: tuple[tuple[str, str], ...] = (
    ("productpage", "v1"), ("details", "v1"), ("reviews", "v1"), ("reviews", "v2"), ("reviews", "v3"), ("ratings", "v1"),
)


@ray.remote(num_cpus=0)
class BookinfoService:
    """One Bookinfo workload: serves on its node's loopback and registers with the mesh."""

    def __init__(self, app: str, version: str) -> None:
        self.spec = ServiceSpec(app, version)
        self.service: Bookinfo | None = None
        self.registration = None

    async def start(self) -> dict[str, Any]:
        if self.service is None:
            proxy_url = await workload.local_proxy_url_async()
            self.service = Bookinfo(self.spec, proxy_url)
            port = await self.service.start()
            self.registration = await workload.join_async(
                self.spec.app, port, service_port=SERVICE_PORT,
                labels={"app": self.spec.app, "version": self.spec.version},
                service_account=f"bookinfo-{self.spec.app}")
        return {"app": self.spec.app, "version": self.spec.version, "port": self.service.port,
                "node": ray.get_runtime_context().get_node_id()}


def deploy(node_ids: Sequence[str], workloads: Sequence[tuple[str, str]] = WORKLOADS) -> list[Any]:
    """Start every workload, placed round-robin over ``node_ids`` so calls cross nodes."""
    actors = [
        BookinfoService.options(
            name=f"bookinfo-{app}-{version}", namespace="bookinfo", lifetime="detached", get_if_exists=True,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_ids[i % len(node_ids)], soft=False),
        ).remote(app, version)
        for i, (app, version) in enumerate(workloads)
    ]
    ray.get([a.start.remote() for a in actors], timeout=120)
    return actors
