"""Client API of a running mesh: talks to the control-plane replicas by name.

Used by ``meshctl`` (directly, or inside ``ray job submit``), by workloads joining the mesh
and by tests.  Replicas are found by their well-known names (``galley-0``, ``pilot-1``, ...
in the ``raymesh`` Ray namespace); a call goes to a random replica and fails over to the
others when one is down, which is safe because every state-changing call is idempotent.
"""
from __future__ import annotations

import logging
import random
from typing import Any, Sequence

import pyarrow as pa
import ray
from ray.exceptions import GetTimeoutError, RayActorError

from mesh.errors import MeshError
from mesh.loader import Document
from mesh.metrics import TELEMETRY_SCHEMA, summarize

log = logging.getLogger(__name__)

NAMESPACE = "raymesh"
MAX_REPLICAS = 16

# What a call can fail with when a replica is restarting or gone; the next replica is tried.
FAILOVER_ERRORS: tuple[type[BaseException], ...] = (RayActorError, GetTimeoutError)


def connect(address: str = "auto") -> None:
    """Join the running Ray cluster (no-op when already connected)."""
    if not ray.is_initialized():
        ray.init(address=address, namespace=NAMESPACE, logging_level=logging.WARNING, log_to_driver=False)


def find_replicas(component: str) -> list[Any]:
    """Handles of the replicas of ``component`` that exist, by name, in index order.

    One missing index does not end the scan (a replica may be gone for good while the
    others serve); two missing in a row do.
    """
    found, misses = [], 0
    for i in range(MAX_REPLICAS):
        try:
            found.append(ray.get_actor(f"{component}-{i}", namespace=NAMESPACE))
            misses = 0
        except ValueError:
            misses += 1
            if misses == 2:
                break
    return found


def _shuffled_replicas(component: str) -> list[Any]:
    candidates = find_replicas(component)
    if not candidates:
        raise RuntimeError(f"no {component} replica is running: is the mesh installed? (meshctl install)")
    random.shuffle(candidates)  # spread load; any replica serves any call
    return candidates


def call_any(component: str, method: str, *args: Any, timeout: float = 60.0, **kwargs: Any) -> Any:
    """Call ``method`` on one replica, failing over to the others; raises the last error."""
    last: BaseException | None = None
    for handle in _shuffled_replicas(component):
        try:
            return ray.get(getattr(handle, method).remote(*args, **kwargs), timeout=timeout)
        except FAILOVER_ERRORS as exc:
            log.info("%s.%s failed on one replica (%s); trying another", component, method, exc)
            last = exc
    raise last  # type: ignore[misc]


async def acall_any(component: str, method: str, *args: Any, **kwargs: Any) -> Any:
    """``call_any`` for code running on an event loop (async actors): awaits instead of blocking."""
    last: BaseException | None = None
    for handle in _shuffled_replicas(component):
        try:
            return await getattr(handle, method).remote(*args, **kwargs)
        except FAILOVER_ERRORS as exc:
            log.info("%s.%s failed on one replica (%s); trying another", component, method, exc)
            last = exc
    raise last  # type: ignore[misc]


def _checked(reply: dict[str, Any]) -> dict[str, Any]:
    if not reply.get("ok"):
        raise MeshError(reply.get("errors") or ["request failed"])
    return reply


class MeshClient:
    """The operations behind ``meshctl``; each returns plain data."""

    def apply(self, docs: Sequence[Document]) -> dict[str, Any]:
        payload = [{"source": d.source, "index": d.index, "body": d.body, "item": d.item} for d in docs]
        return _checked(call_any("galley", "apply", payload))

    def delete(self, targets: Sequence[dict[str, str]]) -> dict[str, Any]:
        return _checked(call_any("galley", "delete", list(targets)))

    def get(self, kind: str | None = None, name: str | None = None, namespace: str | None = None) -> dict[str, Any]:
        return _checked(call_any("galley", "get", kind, name, namespace))

    def registry(self) -> dict[str, Any]:
        return call_any("pilot", "registry_view")

    def ca_info(self) -> dict[str, Any]:
        return call_any("citadel", "info")

    def trust_bundle(self) -> list[str]:
        return call_any("citadel", "trust_bundle")

    def ca_import(self, cert_pem: str, key_pem: str) -> dict[str, Any]:
        return call_any("citadel", "import_ca", cert_pem, key_pem)

    def ca_rotate(self, expected: str | None = None) -> dict[str, Any]:
        return call_any("citadel", "rotate_root", expected)

    def _telemetry_rows(self, filters: dict[str, Any] | None, columns: Sequence[str] | None,
                        since_s: float) -> pa.Table:
        """Window rows from every Mixer replica: each holds its shard of nodes, and percentiles
        only add up over the rows themselves.  ``columns=None``: every column a replica keeps
        (replicas may differ in captured ``attr:...`` columns; a missing one reads null)."""
        handles = find_replicas("mixer")
        if not handles:
            raise RuntimeError("no mixer replica is running: is the mesh installed? (meshctl install)")
        wanted = None if columns is None else list(columns)
        tables = []
        for handle in handles:
            try:
                tables.append(ray.get(handle.rows.remote(filters, wanted, since_s), timeout=30))
            except FAILOVER_ERRORS as exc:
                log.warning("a mixer replica did not answer (%s); its shard is missing", exc)
        if not tables:
            empty = TELEMETRY_SCHEMA.empty_table()
            return empty if wanted is None else empty.select(wanted)
        return pa.concat_tables(tables, promote_options="default")

    def top(self, since_s: float = 60.0) -> list[dict[str, Any]]:
        rows = self._telemetry_rows(None, ["destination_service", "response_code", "duration_ms"], since_s)
        return summarize(rows, ["destination_service"], since_s).to_pylist()

    def telemetry_query(self, filters: dict[str, Any] | None = None,
                        group_by: Sequence[str] = ("destination_service",), since_s: float = 60.0) -> list[dict[str, Any]]:
        return self.telemetry_summary(filters, group_by, since_s).to_pylist()

    def telemetry_summary(self, filters: dict[str, Any] | None = None,
                          group_by: Sequence[str] = ("destination_service",), since_s: float = 60.0) -> pa.Table:
        """``telemetry_query`` as an Arrow table (``mesh.metrics.summarize``'s schema)."""
        columns = list(dict.fromkeys([*group_by, "response_code", "duration_ms"]))
        return summarize(self._telemetry_rows(filters, columns, since_s), group_by, since_s)

    def telemetry_rows(self, filters: dict[str, Any] | None = None, since_s: float = 60.0) -> pa.Table:
        """The requests of the last ``since_s`` seconds that match ``filters``, one row each with
        every column of ``raymesh.telemetry.v1`` (and captured ``attr:...`` columns), unsummarized."""
        return self._telemetry_rows(filters, None, since_s)

    def mixer_stats(self) -> list[dict[str, Any]]:
        return ray.get([h.stats.remote() for h in find_replicas("mixer")], timeout=30)

    def pilot_status(self) -> dict[str, Any]:
        return call_any("pilot", "status")

    def svids(self) -> list[dict[str, Any]]:
        """The SVIDs every node proxy holds (``istioctl proxy-config secret``): node, SPIFFE id,
        certificate chain; proxies that do not answer are left out."""
        out: list[dict[str, Any]] = []
        for node_id in sorted(self.registry().get("nodes") or {}):
            try:
                out.extend(ray.get(ray.get_actor(f"proxy-{node_id[:16]}", namespace=NAMESPACE).svids.remote(),
                                   timeout=10))
            except (ValueError, *FAILOVER_ERRORS):
                log.warning("the proxy of node %s did not answer", node_id)
        return out

    def proxy_config(self, proxy: str) -> dict[str, Any]:
        """What one proxy runs (``ProxyWorker.config``): ``proxy`` is its name (``proxy-<node>``,
        as ``proxy_status`` lists it) or the start of its node id.  LookupError when none or
        several match, or when it does not answer."""
        nodes = sorted(self.registry().get("nodes") or {})
        matches = [n for n in nodes if f"proxy-{n[:16]}" == proxy] or [n for n in nodes if n.startswith(proxy)]
        if len(matches) != 1:
            known = ", ".join(f"proxy-{n[:16]}" for n in nodes) or "none"
            raise LookupError(f"{'no' if not matches else 'more than one'} proxy matches {proxy!r} (proxies: {known})")
        name = f"proxy-{matches[0][:16]}"
        try:
            return ray.get(ray.get_actor(name, namespace=NAMESPACE).config.remote(), timeout=10)
        except (ValueError, *FAILOVER_ERRORS) as exc:
            raise LookupError(f"{name} did not answer: {exc}") from None

    def proxy_status(self) -> list[dict[str, Any]]:
        """One row per proxy: its node, acked version, Pilot's latest version and SYNCED/STALE."""
        latest = self.pilot_status()["versions"]
        nodes = self.registry().get("nodes") or {}
        rows = []
        for node_id in sorted(set(nodes) | set(latest)):
            name = f"proxy-{node_id[:16]}"
            row = {"proxy": name, "node": node_id, "latest": latest.get(node_id), "acked": None, "status": "NOT CONNECTED"}
            try:
                st = ray.get(ray.get_actor(name, namespace=NAMESPACE).status.remote(), timeout=10)
            except (ValueError, *FAILOVER_ERRORS):
                rows.append(row)
                continue
            row["acked"] = st.get("version")
            row["ports"] = st.get("ports")
            row["gateways"] = st.get("gateways") or {}    # ingress gateway listener -> address:port
            row["gateway_errors"] = (st.get("stats") or {}).get("gateway_errors") or {}   # ports it could not bind
            row["status"] = "SYNCED" if row["acked"] is not None and row["acked"] == row["latest"] else "STALE"
            rows.append(row)
        return rows
