"""The service registry in the shared store: workloads, nodes and service VIPs.

Pilot replicas write it (registrations, node reports, evictions); Citadel and the Workload
API read it to check that an identity belongs to a workload on the asking node.
"""
from __future__ import annotations

from typing import Any

from actors.store import GcsKV, RevisionedStore
from mesh.registry import RegistryState

REGISTRY_COLLECTION = "registry"
VIP_BASE = (127, 10)  # services get 127.10.x.y


def registry_store() -> RevisionedStore:
    return RevisionedStore(GcsKV(), REGISTRY_COLLECTION)


def registry_state(state: dict[str, Any]) -> RegistryState:
    return RegistryState.from_state(state)


def allocate_vip(state: dict[str, Any], host: str) -> None:
    """Give ``host`` the next free 127.10.x.y address, once; addresses are never reused."""
    vips = state.setdefault("vips", {})
    if host in vips:
        return
    n = int(state.get("vip_next", 0)) + 1
    state["vip_next"] = n
    vips[host] = f"{VIP_BASE[0]}.{VIP_BASE[1]}.{n // 254}.{n % 254 + 1}"
