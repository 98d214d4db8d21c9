"""Install and remove the mesh on a running Ray cluster.

``install`` is idempotent (actors are created by name with ``get_if_exists``), so the head
node's start command, a CI job and a user can all run it.  It waits until every alive node
has a proxy that acked a snapshot.
"""
from __future__ import annotations

import time
from typing import Any

import ray

from actors.citadel import Citadel, CitadelOptions
from actors.galley import Galley
from actors.mixer import Mixer, MixerOptions
from actors.pilot import Pilot, PilotOptions
from actors.replicaset import deploy_replicas, find_replicas
from actors.store import GcsKV
from mesh.client import NAMESPACE, MeshClient


def install(replicas: int = 2, options: dict[str, Any] | None = None, timeout: float = 120.0,
            citadel: dict[str, Any] | None = None, mixer: dict[str, Any] | None = None) -> None:
    """Start Galley, Pilot, Citadel and Mixer replica sets; Pilot then starts one proxy worker per node."""
    opts = PilotOptions.from_dict(options).to_dict()
    galleys = deploy_replicas(Galley, "galley", replicas)
    pilots = deploy_replicas(Pilot, "pilot", replicas, opts)
    citadels = deploy_replicas(Citadel, "citadel", replicas, CitadelOptions.from_dict(citadel).to_dict())
    mixers = deploy_replicas(Mixer, "mixer", replicas, MixerOptions.from_dict(mixer).to_dict())
    ray.get([a.ready.remote() for a in (*galleys, *pilots, *citadels, *mixers)], timeout=timeout)
    wait_for_proxies(timeout=timeout)


def wait_for_proxies(timeout: float = 120.0, nodes: int | None = None) -> list[dict[str, Any]]:
    """Block until every alive node's proxy is SYNCED (and at least ``nodes`` of them)."""
    client = MeshClient()
    deadline = time.monotonic() + timeout
    while True:
        alive = {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
        rows = [r for r in client.proxy_status() if r["node"] in alive]
        want = max(len(alive), nodes or 0)
        if len(rows) >= want and all(r["status"] == "SYNCED" for r in rows):
            return rows
        if time.monotonic() > deadline:
            raise TimeoutError(f"proxies not synced after {timeout}s: {rows}")
        time.sleep(0.2)


def uninstall(purge: bool = False) -> None:
    """Stop proxies, Pilot, Galley and Citadel; with ``purge`` also forget configuration, registry
    and the root CA (which invalidates every certificate it issued)."""
    for node in ray.nodes():
        try:
            proxy = ray.get_actor(f"proxy-{node['NodeID'][:16]}", namespace=NAMESPACE)
        except ValueError:
            continue
        try:
            ray.get(proxy.stop.remote(), timeout=10)
        finally:
            ray.kill(proxy, no_restart=True)
    for component in ("pilot", "galley", "citadel", "mixer"):
        for handle in find_replicas(component):
            ray.kill(handle, no_restart=True)
    if purge:
        kv = GcsKV()
        for collection in ("config", "registry", "ca", "quota"):
            kv._kv._internal_kv_del(f"{collection}/", del_by_prefix=True, namespace=NAMESPACE)
