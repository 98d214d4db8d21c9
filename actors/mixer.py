"""Mixer: turns the proxies' telemetry batches into Istio's standard metrics, off the request path.

Each proxy worker flushes its recorder every interval: it ``ray.put``s the Arrow IPC bytes
once and calls ``ingest(node_id, seq, [ref])`` on the replica its node hashes to (failing over
to another). The reference travels inside a list so Ray does not resolve it in the caller;
the replica fetches it (zero-copy on its own node), aggregates it with ``mesh.metrics`` and
appends the rows to its rolling window.

A replica serves its own series at ``http://127.0.0.1:<port>/metrics`` and writes a Prometheus
file-based service discovery file for it; since every replica aggregates only the batches of
its shard of nodes, Prometheus summing over all replicas' targets sees the whole mesh.
The counters (``istio_requests_total`` and the four ``istio_tcp_*``) are mirrored into Ray's
metrics as well, where Ray names them ``ray_istio_requests_total``, ``ray_istio_tcp_...``.

A batch's refs may hold both kinds of Arrow stream a proxy sends: request rows
(``raymesh.telemetry.v1``) and TCP connection deltas (``raymesh.telemetry.tcp.v1``); each
stream names its kind in its schema metadata.

A replica's state is its own and starts empty after a restart: Prometheus reads that as a
counter reset, and the window refills within its span.

Mixer also keeps the counters of global rate limits and grants proxies leases of tokens
ahead of need (``lease``, served on a thread of its own so that a long aggregation never
delays a lease; the arithmetic is ``mesh.quota``).  Each counter has one owner replica, by
hash of its key; the counts are written through to the GCS so that an owner's restart or a
failover continues the window.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import pyarrow as pa
import ray
from ray.exceptions import RayError

from actors.galley import config_store, resources_of
from actors.registry import registry_state, registry_store
from actors.store import GcsKV
from mesh.metrics import (COUNTERS, DEFAULT_CLUSTER_ID, TELEMETRY_SCHEMA, Filters, MetricStore, MetricUpdate, Window,
                          aggregate, conform)
from mesh.quota import QuotaLedger
from mesh.records import Record
from mesh.tcp_metrics import aggregate_tcp, conform_tcp, is_tcp_batch
from mesh.telemetry_api import MetricPolicies, MetricsPolicy, metric_policies

log = logging.getLogger(__name__)

DEFAULT_FILE_SD_DIR = "/tmp/raymesh/prometheus"
HOST = "127.0.0.1"  # loopback only: a Prometheus server on the node scrapes the replicas there
# The classic text format, which every Prometheus 2.x and 3.x reads; all names are legacy-valid.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(slots=True)
class MixerOptions(Record):
    port: int = 0                           # replica i serves port + i; 0 = an ephemeral port each
    file_sd_dir: str = DEFAULT_FILE_SD_DIR  # writes <dir>/mixer-<i>.json; "" = none
    window_s: float = 300.0                 # raw rows kept for top and queries
    window_max_rows: int = 2_000_000        # bound on those rows (oldest batches dropped first)
    cluster_id: str = DEFAULT_CLUSTER_ID    # source_cluster / destination_cluster label value
    dedupe_history: int = 1024              # batch ids remembered per node
    ray_metrics: bool = True                # mirror the counters into Ray's metrics
    telemetry_refresh_s: float = 1.0        # how often Telemetry metric overrides are re-read



BatchId = tuple[int, tuple[str, ...]]


class BatchLog:
    """The batch ids each node sent recently, so a re-sent ``ingest`` is counted once.

    A batch is named by its node and sequence number; the object ids are part of the name
    because Ray re-sends a call with the same arguments, while a restarted proxy worker that
    starts its sequence over puts new objects.
    """

    def __init__(self, per_node: int) -> None:
        self._per_node = per_node
        self._order: dict[str, deque[BatchId]] = {}
        self._seen: dict[str, set[BatchId]] = {}

    def __contains__(self, item: tuple[str, BatchId]) -> bool:
        node, batch = item
        return batch in self._seen.get(node, ())

    def add(self, node: str, batch: BatchId) -> None:
        order = self._order.setdefault(node, deque())
        seen = self._seen.setdefault(node, set())
        order.append(batch)
        seen.add(batch)
        if len(order) > self._per_node:
            seen.discard(order.popleft())


class MetricsServer:
    """``GET /metrics`` over HTTP/1.1 on loopback, on a thread and event loop of its own so that
    scrapes are answered while the actor is busy ingesting."""

    def __init__(self, render: Callable[[], bytes], port: int = 0) -> None:
        self._render = render
        self._want_port = port
        self.port = 0
        self._bound = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="mixer-metrics", daemon=True)

    def start(self, timeout: float = 10.0) -> int:
        self._thread.start()
        if not self._bound.wait(timeout):
            raise TimeoutError("metrics endpoint did not start")
        if self._error is not None:
            raise self._error
        return self.port

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            server = loop.run_until_complete(asyncio.start_server(self._serve, HOST, self._want_port))
            self.port = server.sockets[0].getsockname()[1]
        except OSError as exc:
            self._error = exc
            self._bound.set()
            return
        self._bound.set()
        try:
            loop.run_forever()
        finally:
            server.close()
            loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=10)
            method, target, _ = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ", 2)
            if target.split("?", 1)[0] != "/metrics":
                status, ctype, body = "404 Not Found", "text/plain; charset=utf-8", b"not found; try /metrics\n"
            elif method not in ("GET", "HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain; charset=utf-8", b""
            else:
                body = await asyncio.get_running_loop().run_in_executor(None, self._render)
                status, ctype = "200 OK", CONTENT_TYPE
            writer.write(f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                         "Connection: close\r\n\r\n".encode() + (b"" if method == "HEAD" else body))
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError,
                ConnectionError):
            pass
        finally:
            writer.close()


def write_file_sd(directory: str, name: str, target: str, labels: dict[str, str]) -> str:
    """Write Prometheus' file_sd JSON for one target, atomically (Prometheus may read at any time)."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, f"{name}.json")
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump([{"targets": [target], "labels": labels}], f)
    os.replace(tmp, path)
    return path


class RayMirror:
    """The counters (``istio_requests_total``, ``istio_tcp_*``) as Ray counters, which Ray
    exports with its ``ray_`` prefix.

    Only counters are mirrored: Ray's Histogram takes one observation per call, so mirroring
    the histograms would cost a Python call per request and per histogram.
    """

    def __init__(self) -> None:
        from ray.util.metrics import Counter

        self._counters = {m.name: (Counter(m.name, description=m.help, tag_keys=m.labels), m.labels)
                          for m in COUNTERS}

    def record(self, updates: Sequence[MetricUpdate]) -> None:
        for u in updates:
            counter = self._counters.get(u.metric)
            # Ray's counters have fixed tag keys: series relabelled by a Telemetry tag override
            # are on the Mixer endpoints only.
            if counter is not None and u.count > 0 and not u.names:
                counter[0].inc(u.count, tags=dict(zip(counter[1], u.labels)))


def _show_policy(policy: MetricsPolicy) -> dict[str, Any]:
    return {f"{metric}/{reporter}": {"disabled": o.disabled,
                                      "tags": {t.name: "REMOVE" if t.remove else str(t.value) for t in o.tags}}
            for (metric, reporter), o in policy.items()}


def _as_table(payload: Any) -> pa.Table:
    """One proxy stream (or an in-process table) conformed to its kind's schema."""
    if isinstance(payload, (pa.Table, pa.RecordBatch)):
        return conform_tcp(payload) if is_tcp_batch(payload.schema) else conform(payload, keep_attributes=True)
    if isinstance(payload, (bytearray, memoryview)):
        payload = bytes(payload)
    if len(payload) == 0:
        return TELEMETRY_SCHEMA.empty_table()
    with pa.ipc.open_stream(pa.py_buffer(payload) if isinstance(payload, bytes) else payload) as reader:
        table = reader.read_all()
    return conform_tcp(table) if is_tcp_batch(table.schema) else conform(table, keep_attributes=True)


@ray.remote(concurrency_groups={"quota": 1})
class Mixer:
    """One replica. Telemetry calls are serialized (a threaded actor of concurrency 1); the
    metrics endpoint's thread reads the store under ``_lock``; leases run in the ``quota``
    concurrency group, on their own thread, against the ledger's own lock."""

    def __init__(self, replica: int, options: dict[str, Any] | None = None) -> None:
        self.replica = replica
        self.name = ray.get_runtime_context().get_actor_name() or f"mixer-{replica}"
        self.options = MixerOptions.from_dict(options)
        self._lock = threading.Lock()
        self._store = MetricStore()
        self._window = Window(self.options.window_s, self.options.window_max_rows)
        self._batches = BatchLog(self.options.dedupe_history)
        self._counts = {"batches": 0, "rows": 0, "tcp_rows": 0, "duplicates": 0, "rejected": 0}
        self._mirror = RayMirror() if self.options.ray_metrics else None
        self._policies = MetricPolicies()
        self._policy_revisions = (-1, -1)
        self._policy_checked = float("-inf")
        self._quota = QuotaLedger(GcsKV())
        self._server = MetricsServer(self._render, self.options.port + replica if self.options.port else 0)
        self.port = self._server.start()
        self._file_sd: str | None = None
        if self.options.file_sd_dir:
            self._file_sd = write_file_sd(self.options.file_sd_dir, self.name, self.endpoint(), {
                "mixer_replica": self.name, "ray_node_id": ray.get_runtime_context().get_node_id()})

    def ready(self) -> int:
        return self.replica

    def endpoint(self) -> str:
        return f"{HOST}:{self.port}"

    def ingest(self, node_id: str, seq: int, refs: list[ray.ObjectRef]) -> dict[str, Any]:
        """Aggregate the batch ``seq`` of ``node_id`` (its Arrow IPC bytes behind ``refs``).

        Never raises for a bad or lost batch (it is counted as rejected), so a caller's flush
        loop does not die on one."""
        batch: BatchId = (int(seq), tuple(ref.hex() for ref in refs))
        with self._lock:
            if (node_id, batch) in self._batches:
                self._counts["duplicates"] += 1
                return {"ok": True, "duplicate": True, "rows": 0}
        try:
            tables = [_as_table(payload) for payload in ray.get(list(refs), timeout=60)]
            tcp = [t for t in tables if is_tcp_batch(t.schema)]
            tables = [t for t in tables if not is_tcp_batch(t.schema)]
            policies = self._metric_policies()
            updates = [u for t in tables for u in aggregate(t, self.options.cluster_id, policies)]
            updates += [u for t in tcp for u in aggregate_tcp(t, self.options.cluster_id, policies)]
        except (RayError, pa.ArrowException, ValueError, TypeError) as exc:
            log.warning("rejected telemetry batch %s/%s: %s", node_id, seq, exc)
            with self._lock:
                self._counts["rejected"] += 1
            return {"ok": False, "duplicate": False, "rows": 0, "error": str(exc)}
        rows = sum(t.num_rows for t in tables)
        with self._lock:
            self._store.apply(updates)
            for t in tables:
                self._window.append(conform(t))
            self._batches.add(node_id, batch)
            self._counts["batches"] += 1
            self._counts["rows"] += rows
            self._counts["tcp_rows"] += sum(t.num_rows for t in tcp)
        if self._mirror is not None:
            self._mirror.record(updates)
        return {"ok": True, "duplicate": False, "rows": rows}

    def _metric_policies(self) -> MetricPolicies:
        """Telemetry metric overrides resolved per workload (``mesh.telemetry_api``), re-read
        from the config and registry collections at most every ``telemetry_refresh_s``."""
        now = time.monotonic()
        if now - self._policy_checked < self.options.telemetry_refresh_s:
            return self._policies
        self._policy_checked = now
        try:
            config, registry = config_store().latest(), registry_store().latest()
            if (config.number, registry.number) != self._policy_revisions:
                self._policies = metric_policies(resources_of(config.state), registry_state(registry.state))
                self._policy_revisions = (config.number, registry.number)
        except (RayError, ValueError, KeyError, TypeError) as exc:
            log.warning("keeping the previous Telemetry metric overrides: %s", exc)
        return self._policies

    def telemetry_policies(self) -> dict[str, Any]:
        """The metric overrides in force, for inspection: by workload, namespace and mesh-wide."""
        p = self._metric_policies()
        return {"workloads": {f"{ns}/{w}": _show_policy(v) for (ns, w), v in p.workloads.items()},
                "namespaces": {ns: _show_policy(v) for ns, v in p.namespaces.items()}, "mesh": _show_policy(p.mesh)}

    @ray.method(concurrency_group="quota")
    def lease(self, client: str, asks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Global rate limit leases for the counters this replica owns (see ``mesh.quota``)."""
        return self._quota.lease(client, asks)

    def metrics_text(self) -> str:
        return self._render().decode()

    def top(self, since_s: float = 60.0) -> list[dict[str, Any]]:
        """This replica's shard only; ``MeshClient.top`` merges the rows of every replica."""
        with self._lock:
            return self._window.top(since_s).to_pylist()

    def query(self, filters: Filters | None = None, group_by: Sequence[str] = ("destination_service",),
              since_s: float | None = None) -> list[dict[str, Any]]:
        with self._lock:
            return self._window.query(filters, group_by, since_s).to_pylist()

    def rows(self, filters: Filters | None = None, columns: Sequence[str] | None = None,
             since_s: float | None = None) -> pa.Table:
        """Raw window rows, for summaries over all replicas (``mesh.metrics.summarize``)."""
        with self._lock:
            return self._window.rows(since_s, filters, columns)

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {"replica": self.name, "endpoint": self.endpoint(), "file_sd": self._file_sd,
                    **self._counts, "window_rows": self._window.num_rows, "series": self._store.series_count(),
                    "quota": dict(self._quota.counts)}

    def _render(self) -> bytes:
        with self._lock:
            snapshot = self._store.copy()
        return snapshot.render_prometheus().encode()
