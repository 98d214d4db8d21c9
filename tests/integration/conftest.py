"""One two-node Ray cluster (both nodes on 127.0.0.1) with the mesh installed, shared by the
integration tests; tests that break things start their own (see test_replication)."""
from __future__ import annotations

import http.client
import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

import pytest
import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.deploy import install, uninstall, wait_for_proxies
from actors.local_cluster import LocalCluster
from mesh.client import MeshClient
from mesh.loader import Document
from tests.integration.workloads import EchoWorkload, TcpEchoWorkload
from tests.unit.test_zipkin import Collector


class Mesh:
    """Handles and helpers over a running cluster with the mesh installed."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.cluster = cluster
        self.client = MeshClient()
        self._actors: list[Any] = []
        self._ports: dict[str, int] = {}

    @property
    def nodes(self) -> list[str]:
        return self.cluster.node_ids()

    def proxy_port(self, node_index: int = 0) -> int:
        """The HTTP proxy port of a node (remembered: it stays while the proxy process lives)."""
        node = self.nodes[node_index]
        if node in self._ports:
            return self._ports[node]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            info = (self.client.registry().get("nodes") or {}).get(node)
            if info and info.get("http_proxy_port"):
                self._ports[node] = int(info["http_proxy_port"])
                return self._ports[node]
            time.sleep(0.1)
        raise TimeoutError(f"node {node} has no proxy port")

    def deploy(self, service: str, version: str, node_index: int, service_port: int = 8000) -> Any:
        actor = EchoWorkload.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(self.nodes[node_index], soft=False)
        ).remote(service, version, service_port)
        ray.get(actor.start.remote(), timeout=60)
        self._actors.append(actor)
        return actor

    def deploy_tcp(self, service: str, version: str, node_index: int, service_port: int,
                   after_eof: bytes = b"") -> Any:
        """A raw TCP echo server as an endpoint of ``service``'s tcp port ``service_port``."""
        actor = TcpEchoWorkload.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(self.nodes[node_index], soft=False)
        ).remote(service, version, service_port, after_eof=after_eof)
        ray.get(actor.start.remote(), timeout=60)
        self._actors.append(actor)
        return actor

    def apply(self, *docs: dict[str, Any]) -> dict[str, Any]:
        reply = self.client.apply([Document("<test>", i, d) for i, d in enumerate(docs)])
        self.sync()
        return reply

    def delete(self, *docs: dict[str, Any]) -> None:
        self.client.delete([{"kind": d["kind"], "name": d["metadata"]["name"],
                             "namespace": d["metadata"].get("namespace", "default")} for d in docs])
        self.sync()

    def sync(self, timeout: float = 30) -> None:
        wait_for_proxies(timeout=timeout)

    def wait_endpoints(self, service: str, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            wls = (self.client.registry().get("workloads") or {}).values()
            if sum(1 for w in wls if w["service"] == service) >= count:
                self.sync()
                return
            time.sleep(0.1)
        raise TimeoutError(f"{service}: fewer than {count} endpoints registered")

    def get(self, url: str, node_index: int = 0, headers: dict[str, str] | None = None, method: str = "GET",
            timeout: float = 15) -> tuple[int, dict[str, str], bytes]:
        """One request through node ``node_index``'s HTTP proxy (absolute-form, like HTTP_PROXY)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.proxy_port(node_index), timeout=timeout)
        try:
            conn.request(method, url, headers=headers or {})
            resp = conn.getresponse()
            return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
        finally:
            conn.close()

    def get_json(self, url: str, **kw: Any) -> tuple[int, dict[str, Any]]:
        status, _, body = self.get(url, **kw)
        try:
            return status, json.loads(body)
        except ValueError:
            return status, {"raw": body.decode(errors="replace")}

    def cleanup(self) -> None:
        for a in self._actors:
            ray.kill(a)
        self._actors.clear()
        items = self.client.get()["items"]
        if items:
            self.delete(*items)


ROOT = Path(__file__).resolve().parents[2]


# The proxies' Parquet access log (test_accesslog_parquet): files cut small and often, so a
# test sees rotation by rows and by age within seconds.
ACCESS_LOG_ROTATE_ROWS = 25
ACCESS_LOG_ROTATE_SECONDS = 1.0


@pytest.fixture(scope="session")
def access_log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where every node's proxy writes its Parquet access log (both nodes share this machine)."""
    return tmp_path_factory.mktemp("access-log")


@pytest.fixture(scope="session")
def trace_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where every node's proxy writes its spans (``spans-<node>.jsonl``); sampling is 0, so
    only requests whose caller asked for a trace are recorded (test_tracing)."""
    return tmp_path_factory.mktemp("traces")


@pytest.fixture(scope="session")
def zipkin_collector() -> Iterator[Collector]:
    """A Zipkin v2 collector on loopback that every node's proxy also reports its spans to."""
    collector = Collector()
    yield collector
    collector.server.shutdown()
    collector.server.server_close()


@pytest.fixture(scope="session")
def mesh_cluster(access_log_dir: Path, trace_dir: Path, zipkin_collector: Collector) -> Iterator[LocalCluster]:
    # Ray workers import the test workload classes by module path: the cluster's processes
    # inherit this environment, so they find ``tests.integration.workloads``.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    cluster = LocalCluster(nodes=2)
    try:
        install(replicas=2, options={"access_log": {"parquet_dir": str(access_log_dir),
                                                    "rotate_rows": ACCESS_LOG_ROTATE_ROWS,
                                                    "rotate_seconds": ACCESS_LOG_ROTATE_SECONDS},
                                     "tracing": {"file": str(trace_dir / "spans-{node}.jsonl"), "sampling": 0,
                                                 "zipkin": zipkin_collector.url}})
        yield cluster
    finally:
        try:
            uninstall(purge=True)
        finally:
            cluster.shutdown()


@pytest.fixture
def mesh(mesh_cluster: LocalCluster) -> Iterator[Mesh]:
    m = Mesh(mesh_cluster)
    yield m
    m.cleanup()
