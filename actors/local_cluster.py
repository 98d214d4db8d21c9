"""An embedded multi-node Ray cluster on this machine (node IP 127.0.0.1), for the demo and tests.

Each extra node is a real raylet with its own node id, so the mesh treats them as separate
machines: traffic between workloads on different nodes really goes proxy -> proxy.
"""
from __future__ import annotations

import logging
import os
import socket
from typing import Any

import ray
from ray._private import ray_constants
from ray.cluster_utils import Cluster

from mesh.client import NAMESPACE

LOOPBACK = "127.0.0.1"


def pin_loopback() -> None:
    """Keep every process of this cluster on 127.0.0.1.

    Ray rewrites a loopback bootstrap address to the machine's external address
    (``services.resolve_ip_for_localhost``) unless multi-machine clusters are disabled, which
    is what this switch does.  The environment variable reaches every process the cluster
    starts (raylets, workers, job drivers such as ``ray job submit -- meshctl``); the constant
    is patched for this already-imported process.
    """
    os.environ[ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR] = "0"
    ray_constants.ENABLE_RAY_CLUSTER = False


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(self, nodes: int = 2, cpus_per_node: int = 2, namespace: str = NAMESPACE,
                 dashboard: bool = True) -> None:
        pin_loopback()
        # The dashboard also serves the job API (``ray job submit``); it listens on loopback only,
        # on a free port so that several embedded clusters (a demo beside a test run) can coexist.
        self.cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": cpus_per_node, "node_ip_address": LOOPBACK, "include_dashboard": dashboard,
            "dashboard_host": LOOPBACK, "dashboard_port": _free_port(),
        })
        self.nodes = [self.cluster.head_node]
        for _ in range(nodes - 1):
            self.nodes.append(self.cluster.add_node(num_cpus=cpus_per_node, node_ip_address=LOOPBACK))
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, namespace=namespace, _node_ip_address=LOOPBACK,
                 logging_level=logging.WARNING, log_to_driver=os.environ.get("RAYMESH_LOG_TO_DRIVER") == "1")

    @property
    def address(self) -> str:
        """The GCS address (``RAY_ADDRESS`` for processes joining this cluster)."""
        return self.cluster.address

    @property
    def dashboard_url(self) -> str:
        return f"http://{self.cluster.head_node.address_info['webui_url']}"

    def node_ids(self) -> list[str]:
        """Alive node ids, head first."""
        head = self.cluster.head_node.node_id
        alive = [n["NodeID"] for n in ray.nodes() if n.get("Alive")]
        return sorted(alive, key=lambda n: n != head)

    def add_node(self, **kwargs: Any) -> Any:
        node = self.cluster.add_node(num_cpus=kwargs.pop("num_cpus", 2), node_ip_address=LOOPBACK, **kwargs)
        self.nodes.append(node)
        self.cluster.wait_for_nodes()
        return node

    def remove_node(self, node: Any) -> None:
        self.cluster.remove_node(node)
        self.nodes.remove(node)

    def shutdown(self) -> None:
        ray.shutdown()
        self.cluster.shutdown()

    def __enter__(self) -> "LocalCluster":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
