"""How a workload joins the mesh, from the code where it serves.

Call ``join`` inside a Ray actor (or task) once the server listens::

    from mesh import workload
    workload.join("reviews", port=bound_port, service_port=9080, labels={"version": "v2"})

The port's protocol is chosen as Istio chooses it for a Kubernetes Service port
(``mesh.protocols``): ``protocol`` is the port's appProtocol and wins; otherwise
``port_name``'s prefix decides (``grpc-api``, ``http2``, ``tcp-db``...).  Without either the
port is named ``http``; ``port_name=""`` (or a name naming no protocol) leaves it to
protocol sniffing, with raw TCP as the fallback.

The registration records the Ray node and actor, so it follows the actor's life: when the
actor dies Pilot removes the endpoint.  ``local_proxy_url`` gives the node's HTTP proxy, for
clients that use ``HTTP_PROXY``; ``service_vip`` gives a service's virtual address on
loopback, for clients that connect directly.
"""
from __future__ import annotations

import asyncio
import os
import time

import ray

from mesh.client import NAMESPACE, acall_any, call_any
from mesh.registry import WorkloadInstance, service_fqdn


def join(service: str, port: int, *, service_port: int | None = None, namespace: str = "default",
         labels: dict[str, str] | None = None, protocol: str = "", port_name: str | None = None,
         service_account: str = "default", address: str = "127.0.0.1") -> WorkloadInstance:
    """Register the calling actor as an endpoint of ``service`` and return the registration."""
    wl = _instance(service, port, service_port, namespace, labels, protocol, port_name, service_account, address)
    wl.uid = call_any("pilot", "register_workload", wl.to_dict())
    return wl


async def join_async(service: str, port: int, *, service_port: int | None = None, namespace: str = "default",
                     labels: dict[str, str] | None = None, protocol: str = "", port_name: str | None = None,
                     service_account: str = "default", address: str = "127.0.0.1") -> WorkloadInstance:
    """``join`` for async actors: awaits the registration instead of blocking the event loop."""
    wl = _instance(service, port, service_port, namespace, labels, protocol, port_name, service_account, address)
    wl.uid = await acall_any("pilot", "register_workload", wl.to_dict())
    return wl


def _instance(service: str, port: int, service_port: int | None, namespace: str, labels: dict[str, str] | None,
              protocol: str, port_name: str | None, service_account: str, address: str) -> WorkloadInstance:
    ctx = ray.get_runtime_context()
    labels = dict(labels or {})
    labels.setdefault("app", service)
    return WorkloadInstance(service=service, namespace=namespace, address=address, port=port,
                            service_port=service_port or port, node_id=ctx.get_node_id(), labels=labels,
                            protocol=protocol, port_name=(protocol or "http") if port_name is None else port_name,
                            service_account=service_account,
                            actor_id=ctx.get_actor_id())


def leave(wl: WorkloadInstance) -> None:
    call_any("pilot", "deregister_workload", wl.uid)


WORKLOAD_API_RUNTIME_DIR = "/tmp/raymesh"


def workload_api_path(node_id: str, runtime_dir: str = WORKLOAD_API_RUNTIME_DIR) -> str:
    """Where a node's SPIFFE Workload API listens (a unix socket)."""
    return os.path.join(runtime_dir, node_id[:16], "workload.sock")


def workload_api_socket(node_id: str | None = None) -> str:
    """``unix:///tmp/raymesh/<node>/workload.sock`` of this node (or ``node_id``): the value for
    ``SPIFFE_ENDPOINT_SOCKET``, so a stock SPIFFE client fetches this workload's SVID."""
    return "unix://" + workload_api_path(node_id or ray.get_runtime_context().get_node_id())


def local_proxy_url(timeout: float = 60.0) -> str:
    """``http://127.0.0.1:PORT`` of the HTTP proxy on the node this code runs on."""
    deadline = time.monotonic() + timeout
    while True:
        proxy = _local_proxy()
        if proxy is not None:
            return ray.get(proxy.http_proxy_url.remote(), timeout=timeout)
        if time.monotonic() > deadline:
            raise TimeoutError("no proxy on this node: is the mesh installed?")
        time.sleep(0.2)


async def local_proxy_url_async(timeout: float = 60.0) -> str:
    """``local_proxy_url`` for async actors."""
    deadline = time.monotonic() + timeout
    while True:
        proxy = _local_proxy()
        if proxy is not None:
            return await proxy.http_proxy_url.remote()
        if time.monotonic() > deadline:
            raise TimeoutError("no proxy on this node: is the mesh installed?")
        await asyncio.sleep(0.2)


def _local_proxy():
    """This node's proxy worker actor, or None until Pilot (reconciling every second) made it."""
    node_id = ray.get_runtime_context().get_node_id()
    try:
        return ray.get_actor(f"proxy-{node_id[:16]}", namespace=NAMESPACE)
    except ValueError:
        return None


def service_vip(service: str, namespace: str = "default") -> str | None:
    """The loopback virtual address (127.10.x.y) of a service, once it has one."""
    return (call_any("pilot", "registry_view").get("vips") or {}).get(service_fqdn(service, namespace))
