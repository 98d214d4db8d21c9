"""The SPIFFE Workload API on a real cluster, called by the stock ``spiffe`` client.

A host actor pinned to a node runs the node's Workload API server on its event loop, as the
proxy worker does; the servers use a runtime directory of their own, so they never meet a
server the mesh itself may run.  Workload actors register with Pilot (``mesh.workload.join``)
and fetch their SVIDs from inside their own process, which is what the server attests.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import Any, Iterator

import grpc
import pytest
import ray
from cryptography.hazmat.primitives import serialization
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy
from spiffe import WorkloadApiClient
from spiffe._proto import workload_pb2, workload_pb2_grpc

from actors.workload_api import WorkloadApiOptions, WorkloadApiServer
from mesh import workload
from mesh.client import call_any
from mesh.identity import TrustBundle, load_cert

pytestmark = pytest.mark.ray

HEADER = (("workload.spiffe.io", "true"),)

# What a workload's own subprocess runs: the same client, from a process Ray knows nothing of.
CHILD = """
import json
from spiffe import WorkloadApiClient
with WorkloadApiClient() as c:
    print(json.dumps({"spiffe_id": str(c.fetch_x509_svid(timeout=10).spiffe_id)}))
"""


def _pem(cert: Any) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


@ray.remote(num_cpus=0)
class WorkloadApiHost:
    """Stands in for the node's proxy worker: serves the Workload API on its event loop."""

    def __init__(self, node_id: str, options: dict[str, Any]) -> None:
        self.server = WorkloadApiServer(node_id, WorkloadApiOptions.from_dict(options))

    async def start(self) -> str:
        return await self.server.start()

    async def stop(self) -> None:
        await self.server.stop()


@ray.remote(num_cpus=0)
class SpiffeWorkload:
    """An application: it joins the mesh, then asks the node's Workload API who it is."""

    def __init__(self, endpoint: str) -> None:
        os.environ["SPIFFE_ENDPOINT_SOCKET"] = endpoint
        self.listener = socket.create_server(("127.0.0.1", 0))   # the port it registers

    def join(self, service: str, service_account: str = "default") -> None:
        workload.join(service, self.listener.getsockname()[1], service_account=service_account)

    def fetch(self) -> dict[str, Any]:
        """The X.509 context as PEM texts, or the error the client raised."""
        try:
            with WorkloadApiClient() as client:
                ctx = client.fetch_x509_context(timeout=10)
        except Exception as exc:  # the client's FetchX509SvidError names the gRPC status
            return {"error": str(exc)}
        bundle = ctx.x509_bundle_set.get_bundle_for_trust_domain(ctx.default_svid.spiffe_id.trust_domain)
        return {
            "svids": [{"spiffe_id": str(s.spiffe_id), "chain": [_pem(c) for c in s.cert_chain],
                       "key_matches": s.private_key.public_key() == s.leaf.public_key()} for s in ctx.x509_svids],
            "bundle": [_pem(c) for c in bundle.x509_authorities] if bundle else [],
        }

    def fetch_in_child(self) -> dict[str, Any]:
        out = subprocess.run([sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=30)
        return json.loads(out.stdout) if out.returncode == 0 else {"error": out.stderr[-2000:]}

    def watch(self, distinct: int, timeout: float) -> list[str]:
        """Leaf certificates streamed by FetchX509SVID until ``distinct`` different ones arrived."""
        leaves: list[str] = []
        done = threading.Event()

        def on_update(ctx: Any) -> None:
            leaf = _pem(ctx.default_svid.leaf)
            if leaf not in leaves:
                leaves.append(leaf)
            if len(leaves) >= distinct:
                done.set()

        with WorkloadApiClient() as client:
            handle = client.stream_x509_contexts(on_update, lambda exc: done.set())
            done.wait(timeout)
            handle.cancel()
        return leaves


def _pinned(cls: Any, node_id: str) -> Any:
    return cls.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False))


@pytest.fixture
def actors(mesh_cluster: Any) -> Iterator[list[Any]]:
    started: list[Any] = []
    yield started
    for handle in started:
        ray.kill(handle)


@pytest.fixture
def runtime_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="rmwl-")   # short: unix socket paths hold 107 bytes
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _serve(actors: list[Any], node_id: str, options: dict[str, Any]) -> str:
    host = _pinned(WorkloadApiHost, node_id).remote(node_id, options)
    actors.append(host)
    return ray.get(host.start.remote(), timeout=30)


def _raw_call(path: str, metadata: tuple[tuple[str, str], ...]) -> grpc.RpcError:
    """FetchX509SVID from this process with a plain gRPC stub; returns the status it failed with."""
    with grpc.insecure_channel(f"unix:{path}") as channel:
        stream = workload_pb2_grpc.SpiffeWorkloadAPIStub(channel).FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=metadata, timeout=10)
        with pytest.raises(grpc.RpcError) as err:
            next(stream)
    return err.value


def test_workload_fetches_its_svid_with_the_stock_client(mesh, actors, runtime_dir) -> None:
    node0, node1 = mesh.nodes[:2]
    path = _serve(actors, node0, {"runtime_dir": runtime_dir})
    app = _pinned(SpiffeWorkload, node0).remote(f"unix://{path}")
    actors.append(app)

    # An actor of this node that registered nothing has no identity.
    assert "PERMISSION_DENIED" in ray.get(app.fetch.remote(), timeout=30)["error"]

    ray.get(app.join.remote("wlapi-app"), timeout=30)
    got = ray.get(app.fetch.remote(), timeout=30)
    assert "error" not in got, got
    [svid] = got["svids"]
    assert svid["spiffe_id"] == "spiffe://cluster.local/ns/default/sa/default"
    assert svid["key_matches"]
    assert len(svid["chain"]) == 1                          # the leaf; the root travels in the bundle
    assert sorted(got["bundle"]) == sorted(call_any("citadel", "trust_bundle"))
    bundle = TrustBundle.from_pems(got["bundle"])
    assert bundle.verify(svid["chain"]) == svid["spiffe_id"]

    # A second registration with another service account: one SVID per identity.
    ray.get(app.join.remote("wlapi-reader", "reader"), timeout=30)
    ids = [s["spiffe_id"] for s in ray.get(app.fetch.remote(), timeout=30)["svids"]]
    assert sorted(ids) == ["spiffe://cluster.local/ns/default/sa/default",
                           "spiffe://cluster.local/ns/default/sa/reader"]

    # A process the workload started shares its identity.
    assert ray.get(app.fetch_in_child.remote(), timeout=60) == {"spiffe_id": ids[0]}

    # A registered workload of another node is not this node's to serve.
    other = _pinned(SpiffeWorkload, node1).remote(f"unix://{path}")
    actors.append(other)
    ray.get(other.join.remote("wlapi-other"), timeout=30)
    assert "PERMISSION_DENIED" in ray.get(other.fetch.remote(), timeout=30)["error"]

    # The test driver is no Ray actor at all; and the spec's security header is required.
    assert _raw_call(path, HEADER).code() == grpc.StatusCode.PERMISSION_DENIED
    missing = _raw_call(path, ())
    assert missing.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "security header" in missing.details()


def test_svid_is_rotated_at_half_life_on_the_stream(mesh, actors, runtime_dir) -> None:
    node = mesh.nodes[1]
    path = _serve(actors, node, {"runtime_dir": runtime_dir, "svid_ttl_seconds": 4, "refresh_seconds": 1})
    app = _pinned(SpiffeWorkload, node).remote(f"unix://{path}")
    actors.append(app)
    ray.get(app.join.remote("wlapi-rotating"), timeout=30)

    leaves = ray.get(app.watch.remote(2, 10.0), timeout=30)
    assert len(leaves) == 2, "no renewed SVID arrived on the stream within 10 s (TTL 4 s: due after 2 s)"
    bundle = TrustBundle.from_pems(call_any("citadel", "trust_bundle"))
    assert {bundle.verify([leaf]) for leaf in leaves} == {"spiffe://cluster.local/ns/default/sa/default"}
    first, second = (load_cert(leaf) for leaf in leaves)
    assert first.public_key() != second.public_key()                      # a new key for each SVID
    # Both are backdated alike, so notBefore (whole seconds) tells when each was issued: the
    # renewal came at half-life (2 s), not at expiry (4 s).
    issued_apart = (second.not_valid_before_utc - first.not_valid_before_utc).total_seconds()
    assert 1 <= issued_apart <= 3, issued_apart


def test_a_restarted_server_takes_over_a_dead_ones_socket(mesh, actors, runtime_dir) -> None:
    node = mesh.nodes[0]
    options = {"runtime_dir": runtime_dir}
    first = _pinned(WorkloadApiHost, node).remote(node, options)
    second = _pinned(WorkloadApiHost, node).remote(node, options)
    actors.extend([first, second])
    path = ray.get(first.start.remote(), timeout=30)
    with pytest.raises(RuntimeError, match="already listens"):
        ray.get(second.start.remote(), timeout=30)

    ray.kill(first)    # as a proxy worker dies: no clean stop, its socket file stays behind
    deadline = time.monotonic() + 15
    while True:
        try:
            assert ray.get(second.start.remote(), timeout=30) == path
            break
        except RuntimeError:   # the killed process may still hold the socket for a moment
            assert time.monotonic() < deadline, "the dead server's socket was never taken over"
            time.sleep(0.2)
    assert _raw_call(path, HEADER).code() == grpc.StatusCode.PERMISSION_DENIED   # served again


def test_every_node_proxy_serves_the_workload_api(mesh, actors) -> None:
    """The mesh installs one Workload API per node (started by the node's proxy worker) at the
    path ``mesh.workload.workload_api_socket`` gives applications."""
    for node in mesh.nodes:
        deadline = time.monotonic() + 30
        path = workload.workload_api_path(node)
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert os.path.exists(path), path
    node0 = mesh.nodes[0]
    app = _pinned(SpiffeWorkload, node0).remote(workload.workload_api_socket(node0))
    actors.append(app)
    ray.get(app.join.remote("wlapi-installed"), timeout=30)
    got = ray.get(app.fetch.remote(), timeout=30)
    assert "error" not in got, got
    assert [s["spiffe_id"] for s in got["svids"]] == ["spiffe://cluster.local/ns/default/sa/default"]
