"""Pilot: turns configuration and the service registry into per-node proxy snapshots.

Every replica does the same deterministic work from the shared store, so any replica can
answer any proxy:

* it follows the ``config`` collection (written by Galley) and the ``registry`` collection
  (workloads, nodes, VIPs; written by any Pilot replica), on notification or by a slow poll;
* it compiles one snapshot per node (``mesh.compiler``), puts each in the object store once,
  and answers proxies' long-poll ``watch`` calls, the way xDS does: the proxy says which
  version it has, Pilot answers when a newer one exists (or after a timeout);
* it reconciles the data plane: one proxy worker per alive Ray node, created by name
  (idempotent across replicas) and pinned to its node; workloads whose actor died, and
  nodes that left, are removed from the registry.

Snapshot versions are content hashes, so two replicas agree on them and a proxy that fails
over to another replica is not sent the same snapshot again.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from actors.galley import config_store, resources_of
from actors.replicaset import find_replicas
from actors.proxy_worker import AccessLogOptions, GatewayOptions, ProxyWorker, proxy_actor_name
from actors.registry import allocate_vip, registry_state, registry_store
from actors.store import NAMESPACE
from mesh.compiler import compile_all
from mesh.registry import NodeInfo, WorkloadInstance
from mesh.records import Record

log = logging.getLogger(__name__)


@dataclass(slots=True)
class PilotOptions(Record):
    poll_interval: float = 2.0          # safety-net poll of the store
    reconcile_interval: float = 1.0     # node / workload liveness checks
    watch_timeout: float = 30.0         # long-poll timeout, as Serve's long poll
    http_proxy_port: int = 0            # 0: each proxy picks a free port (several nodes on one host)
    inbound_port: int = 0
    proxy_env: dict[str, str] = field(default_factory=dict)
    workload_api: dict[str, Any] = field(default_factory=dict)   # WorkloadApiOptions for every node
    access_log: dict[str, Any] = field(default_factory=dict)     # AccessLogOptions for every node's proxy
    tracing: dict[str, Any] = field(default_factory=dict)        # {"file": spans path, "sampling": percent}
    gateway: dict[str, Any] = field(default_factory=dict)        # GatewayOptions: ingress gateway nodes, address

    def __post_init__(self) -> None:
        AccessLogOptions.from_dict(self.access_log)   # a bad value fails the install, naming the option
        GatewayOptions.from_dict(self.gateway)
        sampling = self.tracing.get("sampling")
        if sampling is not None and not 0.0 <= float(sampling) <= 100.0:
            raise ValueError(f"tracing.sampling: must be a percentage (0-100), got {sampling}")



@ray.remote
class Pilot:
    def __init__(self, replica: int, options: dict[str, Any] | None = None) -> None:
        self.replica = replica
        self.options = PilotOptions.from_dict(options)
        self.config = config_store()
        self.registry = registry_store()
        self._config_rev = -1
        self._registry_rev = -1
        self._snapshots: dict[str, tuple[str, Any]] = {}      # node -> (version, ObjectRef of the snapshot dict)
        self._changed: dict[str, asyncio.Event] = {}
        self._wake = asyncio.Event()
        self._proxies: dict[str, Any] = {}                     # node -> proxy worker handle
        self._acks: dict[str, dict[str, Any]] = {}             # proxy name -> last watch report
        self._loop_task: asyncio.Task | None = None
        self._last_reconcile = 0.0

    # -- life cycle --------------------------------------------------------------------------

    def _ensure_loop(self) -> None:
        if self._loop_task is None or self._loop_task.done():
            self._loop_task = asyncio.get_running_loop().create_task(self._run())

    async def ready(self) -> int:
        self._ensure_loop()
        return self.replica

    async def notify(self, collection: str, revision: int) -> None:
        self._ensure_loop()
        self._wake.set()

    async def _run(self) -> None:
        while True:
            try:
                await self._refresh()
                if time.monotonic() - self._last_reconcile >= self.options.reconcile_interval:
                    self._last_reconcile = time.monotonic()
                    await self._reconcile()
            except Exception:  # never let one bad round stop the loop
                log.exception("pilot refresh failed")
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=min(self.options.poll_interval,
                                                                         self.options.reconcile_interval))
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    # -- compilation -------------------------------------------------------------------------

    async def _refresh(self) -> None:
        config = self.config.latest()
        registry = self.registry.latest()
        if (config.number, registry.number) == (self._config_rev, self._registry_rev):
            return
        snapshots = compile_all(resources_of(config.state), registry_state(registry.state),
                                config_revision=config.number, registry_revision=registry.number)
        self._config_rev, self._registry_rev = config.number, registry.number
        for node, snap in snapshots.items():
            current = self._snapshots.get(node)
            if current is not None and current[0] == snap["version"]:
                continue
            self._snapshots[node] = (snap["version"], ray.put(snap))
            event = self._changed.pop(node, None)
            if event is not None:
                event.set()

    async def watch(self, node_id: str, known_version: str | None, proxy: str = "",
                    acked_version: str | None = None, timeout: float | None = None) -> dict[str, Any] | None:
        """Long poll: returns ``{"version", "snapshot": [ref]}`` once the node's snapshot differs
        from ``known_version``, or None after ``timeout`` seconds."""
        self._ensure_loop()
        if proxy:
            self._acks[proxy] = {"node": node_id, "acked": acked_version, "seen": time.time()}
        deadline = time.monotonic() + (self.options.watch_timeout if timeout is None else timeout)
        while True:
            current = self._snapshots.get(node_id)
            if current is not None and current[0] != known_version:
                return {"version": current[0], "snapshot": [current[1]]}
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            event = self._changed.setdefault(node_id, asyncio.Event())
            try:
                await asyncio.wait_for(event.wait(), timeout=remaining)
            except asyncio.TimeoutError:
                return None

    async def status(self) -> dict[str, Any]:
        self._ensure_loop()
        await self._refresh()
        return {"replica": self.replica, "config_revision": self._config_rev,
                "registry_revision": self._registry_rev,
                "versions": {n: v for n, (v, _) in self._snapshots.items()}, "acks": dict(self._acks)}

    # -- registry writes (idempotent) ---------------------------------------------------------

    async def register_workload(self, workload: dict[str, Any]) -> str:
        wl = WorkloadInstance.from_dict(workload)
        if not wl.uid:
            wl.uid = f"{wl.namespace}/{wl.service}/{wl.actor_id or f'{wl.address}:{wl.port}'}"

        def mutate(state: dict[str, Any], _rev: int) -> dict[str, Any] | None:
            workloads = state.setdefault("workloads", {})
            if workloads.get(wl.uid) == wl.to_dict() and wl.host in state.get("vips", {}):
                return None
            workloads[wl.uid] = wl.to_dict()
            allocate_vip(state, wl.host)
            return state

        self.registry.commit(mutate)
        self._notify_all()
        return wl.uid

    async def deregister_workload(self, uid: str) -> bool:
        def mutate(state: dict[str, Any], _rev: int) -> dict[str, Any] | None:
            if uid not in state.get("workloads", {}):
                return None
            del state["workloads"][uid]
            return state

        _, changed = self.registry.commit(mutate)
        if changed:
            self._notify_all()
        return changed

    async def report_node(self, node: dict[str, Any]) -> None:
        info = NodeInfo.from_dict(node)

        def mutate(state: dict[str, Any], _rev: int) -> dict[str, Any] | None:
            nodes = state.setdefault("nodes", {})
            if nodes.get(info.node_id) == info.to_dict():
                return None
            nodes[info.node_id] = info.to_dict()
            return state

        _, changed = self.registry.commit(mutate)
        if changed:
            self._notify_all()

    async def registry_view(self) -> dict[str, Any]:
        return self.registry.latest().state

    def _notify_all(self) -> None:
        self._wake.set()
        for i, peer in enumerate(find_replicas("pilot")):
            if i != self.replica:
                peer.notify.remote("registry", 0)

    # -- reconciliation ----------------------------------------------------------------------

    async def _reconcile(self) -> None:
        alive = {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}
        for node_id, node in alive.items():
            if node_id not in self._proxies:
                self._proxies[node_id] = ProxyWorker.options(
                    name=proxy_actor_name(node_id), namespace=NAMESPACE, lifetime="detached",
                    get_if_exists=True, max_restarts=-1, max_task_retries=-1, num_cpus=0,
                    scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
                ).remote(node_id, node.get("NodeManagerAddress", "127.0.0.1"), self.options.to_dict())
            # Idempotent: (re)starts the proxy process after an actor restart.
            self._proxies[node_id].ensure_started.remote()
        state = self.registry.latest().state
        gone_nodes = [n for n in (state.get("nodes") or {}) if n not in alive]
        for node_id in [n for n in self._proxies if n not in alive]:
            ray.kill(self._proxies.pop(node_id), no_restart=True)
        dead = [uid for uid, w in (state.get("workloads") or {}).items()
                if w.get("node_id") not in alive or _actor_dead(w.get("actor_id"))]
        if not dead and not gone_nodes:
            return

        def mutate(s: dict[str, Any], _rev: int) -> dict[str, Any] | None:
            changed = False
            for uid in dead:
                changed |= s.get("workloads", {}).pop(uid, None) is not None
            for n in gone_nodes:
                changed |= s.get("nodes", {}).pop(n, None) is not None
            return s if changed else None

        _, changed = self.registry.commit(mutate)
        if changed:
            log.info("registry: removed workloads %s, nodes %s", dead, gone_nodes)
            self._notify_all()


def _actor_dead(actor_id: str | None) -> bool:
    """True when the GCS says the actor is DEAD (restarting actors are not dead)."""
    if not actor_id:
        return False
    try:
        from ray._private import state as ray_state

        info = ray_state.actors(actor_id)
    except Exception:  # unknown id or GCS hiccup: do not evict on uncertainty
        return False
    return bool(info) and info.get("State") == "DEAD"
