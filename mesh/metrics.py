"""Istio's standard request metrics, computed from the proxies' telemetry batches.

Proxies record one row per finished request in the Arrow schema ``raymesh.telemetry.v1``
(``TELEMETRY_SCHEMA``) and hand whole batches to Mixer, so the request path never waits on it.
This module is the pure part of Mixer (no Ray, no sockets):

* ``aggregate`` turns a batch into ``MetricUpdate``s with one pyarrow group-by over Istio's
  label set: ``istio_requests_total`` and the ``istio_request_duration_milliseconds``,
  ``istio_request_bytes`` and ``istio_response_bytes`` histograms, each exported twice, for
  ``reporter="source"`` and ``reporter="destination"``, as Istio's two sidecars would;
* ``mesh.tcp_metrics`` does the same for the TCP connection batches (``istio_tcp_*``);
* ``MetricStore`` keeps the cumulative series and renders them in the Prometheus text format
  through ``prometheus_client``, so Istio's Grafana dashboards read them unchanged;
* ``Window`` keeps the raw rows of the last minutes for ``meshctl top`` and ad-hoc queries,
  whose percentiles are exact (``pyarrow.compute.quantile`` over the rows), unlike the
  bucketed estimate ``histogram_quantile`` makes from the exported histograms.
"""
from __future__ import annotations

import time
from collections import deque
from operator import itemgetter
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Mapping, Sequence

import pyarrow as pa
import pyarrow.compute as pc
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric

from proxy_core.telemetry import SCHEMA as TELEMETRY_ROW_SCHEMA
from proxy_core.telemetry import SCHEMA_NAME
from proxy_core.telemetry_expr import Attribute
from proxy_core.telemetry_policy import attribute_column

if TYPE_CHECKING:
    from mesh.telemetry_api import MetricOverride, MetricPolicies

# The row schema is the proxy's (proxy_core.telemetry): one definition for writer and reader.
TELEMETRY_SCHEMA = TELEMETRY_ROW_SCHEMA

# Istio's standard label set, in the order its stats filter (istio/proxy istio_stats.cc) lists them.
LABEL_NAMES: tuple[str, ...] = (
    "reporter",
    "source_workload", "source_workload_namespace", "source_principal", "source_app", "source_version",
    "source_canonical_service", "source_canonical_revision", "source_cluster",
    "destination_workload", "destination_workload_namespace", "destination_principal", "destination_app",
    "destination_version", "destination_service", "destination_service_name", "destination_service_namespace",
    "destination_canonical_service", "destination_canonical_revision", "destination_cluster",
    "request_protocol", "response_code", "grpc_response_status", "response_flags", "connection_security_policy",
)
# Labels that are not row columns: the reporter is chosen at export, the cluster is the mesh's.
_DERIVED = ("reporter", "source_cluster", "destination_cluster")
ROW_LABELS: tuple[str, ...] = tuple(n for n in LABEL_NAMES if n not in _DERIVED)
REPORTERS = ("source", "destination")

# Istio defines no buckets of its own: every istio_* histogram gets Envoy's default bucket
# settings (Stats::HistogramSettingsImpl::defaultBuckets) unless a pod sets the
# sidecar.istio.io/statsHistogramBuckets annotation. The decade buckets [1, 10, ..., 1e9] some
# guides show for the byte histograms were Mixer's Prometheus adapter (Istio <= 1.4), retired.
ENVOY_DEFAULT_BUCKETS: tuple[float, ...] = (
    0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
    300000, 600000, 1800000, 3600000,
)
DURATION_BUCKETS_MS = ENVOY_DEFAULT_BUCKETS
BYTES_BUCKETS = ENVOY_DEFAULT_BUCKETS

DEFAULT_CLUSTER_ID = "raymesh"
# Istio's client sidecar cannot see the server's authentication policy and reports this value.
SOURCE_SECURITY_POLICY = "unknown"


# Istio's TCP metrics carry the same labels less the request-only ones.
TCP_LABEL_NAMES: tuple[str, ...] = tuple(n for n in LABEL_NAMES if n not in ("response_code", "grpc_response_status"))


@dataclass(frozen=True, slots=True)
class MetricDef:
    name: str
    kind: str                              # "counter" | "histogram"
    help: str
    column: str | None = None              # the row column a histogram (or a TCP counter) sums
    buckets: tuple[float, ...] = ()
    labels: tuple[str, ...] = LABEL_NAMES  # label names, in the order a MetricUpdate's values follow


REQUESTS_TOTAL = MetricDef("istio_requests_total", "counter",
                           "Requests handled by the mesh, counted once per reporter.")
HISTOGRAMS: tuple[MetricDef, ...] = (
    MetricDef("istio_request_duration_milliseconds", "histogram",
              "Request duration: from the first request byte to the last response byte.",
              "duration_ms", DURATION_BUCKETS_MS),
    MetricDef("istio_request_bytes", "histogram", "Request size in bytes: head and body.",
              "request_bytes", BYTES_BUCKETS),
    MetricDef("istio_response_bytes", "histogram", "Response size in bytes: head and body.",
              "response_bytes", BYTES_BUCKETS),
)
TCP_COUNTERS: tuple[MetricDef, ...] = (
    MetricDef("istio_tcp_connections_opened_total", "counter", "TCP connections opened, counted once per reporter.",
              "connections_opened", labels=TCP_LABEL_NAMES),
    MetricDef("istio_tcp_connections_closed_total", "counter", "TCP connections closed, counted once per reporter.",
              "connections_closed", labels=TCP_LABEL_NAMES),
    MetricDef("istio_tcp_received_bytes_total", "counter",
              "Bytes the destination received on TCP connections (client to server).",
              "received_bytes", labels=TCP_LABEL_NAMES),
    MetricDef("istio_tcp_sent_bytes_total", "counter",
              "Bytes the destination sent on TCP connections (server to client).",
              "sent_bytes", labels=TCP_LABEL_NAMES),
)
COUNTERS: tuple[MetricDef, ...] = (REQUESTS_TOTAL, *TCP_COUNTERS)
METRICS: tuple[MetricDef, ...] = (REQUESTS_TOTAL, *HISTOGRAMS, *TCP_COUNTERS)
_BY_NAME = {m.name: m for m in METRICS}


@dataclass(frozen=True, slots=True)
class MetricUpdate:
    """An increment of one series: ``labels`` are values in ``LABEL_NAMES`` order.

    For a histogram ``buckets`` holds cumulative counts, one per finite bound (Prometheus'
    ``le`` semantics: value <= bound); ``count`` is the ``+Inf`` bucket.  ``names`` is empty for
    the metric's standard labels, else the label names ``labels`` follow (a Telemetry tag
    override removed or added some).
    """

    metric: str
    labels: tuple[str, ...]
    count: int
    sum: float = 0.0
    buckets: tuple[int, ...] = ()
    names: tuple[str, ...] = ()


# -- decoding ------------------------------------------------------------------------------------

def decode_batch(data: bytes | pa.Buffer) -> pa.Table:
    """The rows of an Arrow IPC stream as sent by a proxy (empty for ``b""``), conformed."""
    if len(data) == 0:
        return TELEMETRY_SCHEMA.empty_table()
    with pa.ipc.open_stream(pa.py_buffer(data) if isinstance(data, bytes) else data) as reader:
        return conform(reader.read_all())


def conform(table: pa.Table | pa.RecordBatch, keep_attributes: bool = False) -> pa.Table:
    """``table`` in ``TELEMETRY_SCHEMA``: columns in contract order, extra ones dropped, plain
    strings dictionary-encoded, other types cast. Raises ValueError naming a missing column.

    ``keep_attributes`` keeps the ``attr:...`` columns of captured request attributes (for
    Telemetry tag overrides) after the contract's columns."""
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    attrs = [n for n in table.column_names if n.startswith("attr:")] if keep_attributes else []
    if attrs:
        base = conform(table.drop_columns(attrs))
        for name in attrs:
            col = table[name]
            base = base.append_column(name, pc.dictionary_encode(col.cast(pa.string())) if not
                                      pa.types.is_dictionary(col.type) else col)
        return base
    return conform_to(table, TELEMETRY_SCHEMA, f"telemetry batch lacks column(s) {{}} of {SCHEMA_NAME}")


def conform_to(table: pa.Table, schema: pa.Schema, missing_message: str) -> pa.Table:
    """``table`` in ``schema``: its columns in order, extra ones dropped, plain strings
    dictionary-encoded, other types cast; a missing column is a ValueError (``missing_message``
    with ``{}`` for the names)."""
    if table.schema.equals(schema, check_metadata=False):
        return table
    missing = [f.name for f in schema if f.name not in table.column_names]
    if missing:
        raise ValueError(missing_message.format(", ".join(missing)))
    columns = []
    for f in schema:
        col = table[f.name]
        if col.type != f.type:
            col = pc.dictionary_encode(col) if pa.types.is_dictionary(f.type) and pa.types.is_string(col.type) \
                else col.cast(f.type)
        columns.append(col)
    return pa.table(columns, schema=schema)


# -- aggregation ---------------------------------------------------------------------------------

def _bucket_column(metric: MetricDef, index: int) -> str:
    return f"{metric.column}:le{index}"


def aggregate(batch: pa.RecordBatch | pa.Table, cluster_id: str = DEFAULT_CLUSTER_ID,
              policies: "MetricPolicies | None" = None) -> list[MetricUpdate]:
    """The metric increments of one batch, for both reporters.

    One hash group-by over the row labels computes every series at once: the request count,
    each histogram's count and sum, and its cumulative bucket counts as sums of ``value <=
    bound`` booleans, so no Python code runs per row.

    ``policies`` (Istio's Telemetry metric overrides, ``mesh.telemetry_api``) are applied per
    label set: a disabled metric yields no update, tag overrides change its labels.  When
    they read captured request attributes, those ``attr:...`` columns join the group-by.
    """
    with_policies = policies is not None and not policies.empty
    table = conform(batch, keep_attributes=with_policies)
    if table.num_rows == 0:
        return []
    keys: list[str] = list(ROW_LABELS) + [n for n in table.column_names if n.startswith("attr:")]
    names: list[str] = list(keys)
    arrays: list[pa.ChunkedArray] = [table[n] for n in keys]
    aggs: list[tuple] = [("response_code", "count", pc.CountOptions(mode="all"))]
    for m in HISTOGRAMS:
        assert m.column is not None
        values = table[m.column]
        names.append(m.column)
        arrays.append(values)
        aggs += [(m.column, "count"), (m.column, "sum")]
        for i, bound in enumerate(m.buckets):
            names.append(_bucket_column(m, i))
            arrays.append(pc.less_equal(values, bound))
            aggs.append((_bucket_column(m, i), "sum"))
    grouped = (pa.table(arrays, names=names).unify_dictionaries()
               .group_by(keys, use_threads=False).aggregate(aggs).to_pydict())
    # Per label set, Python touches whole columns (list comprehensions, zip, itemgetter), not
    # cells by name: with ~4 series per label set and reporter this is most of the time.
    label_columns = [["unknown" if v is None else str(v) for v in grouped[n]] for n in keys]
    histograms = [(m, grouped[f"{m.column}_count"], grouped[f"{m.column}_sum"],
                   list(zip(*(grouped[f"{_bucket_column(m, i)}_sum"] for i in range(len(m.buckets))))))
                  for m in HISTOGRAMS]
    requests_column = grouped["response_code_count"]
    pick = {reporter: itemgetter(*_label_plan(keys, reporter)) for reporter in REPORTERS}
    extras = {"destination": ("destination", cluster_id, SOURCE_SECURITY_POLICY),
              "source": ("source", cluster_id, SOURCE_SECURITY_POLICY)}
    updates: list[MetricUpdate] = []
    for g, values in enumerate(zip(*label_columns)):
        measures = [(m, counts[g], sums[g] or 0.0, _no_nulls(buckets[g])) for m, counts, sums, buckets in histograms]
        requests = requests_column[g]
        row = dict(zip(keys, values)) if with_policies else None
        for reporter in REPORTERS:
            labels = pick[reporter](values + extras[reporter])
            if row is None:
                updates.append(MetricUpdate(REQUESTS_TOTAL.name, labels, requests))
                updates.extend(MetricUpdate(m.name, labels, count, float(total), buckets)
                               for m, count, total, buckets in measures if count)
                continue
            policy = policies.lookup(*_workload_of(row, reporter))  # type: ignore[union-attr]
            for m, count, total, buckets in ((REQUESTS_TOTAL, requests, 0.0, ()), *measures):
                if not count:
                    continue
                override = policy.get((m.name, reporter))
                if override is None:
                    updates.append(MetricUpdate(m.name, labels, count, float(total), buckets))
                elif not override.disabled:
                    names_, relabelled = apply_tag_overrides(m.labels, labels, override, row)
                    updates.append(MetricUpdate(m.name, relabelled, count, float(total), buckets, names_))
    return updates


def _workload_of(row: Mapping[str, str], reporter: str) -> tuple[str, str]:
    """(namespace, workload) whose Telemetry governs ``reporter``'s view of a row: the server's
    for ``destination``, the client's for ``source``, as each sidecar reports for itself."""
    side = "destination" if reporter == "destination" else "source"
    return row[f"{side}_workload_namespace"], row[f"{side}_workload"]


def apply_tag_overrides(names: tuple[str, ...], values: tuple[str, ...], override: "MetricOverride",
                        row: Mapping[str, str]) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """A series' labels after ``tagOverrides``: REMOVE drops a label, UPSERT sets one (a new
    label goes last).  ``names`` is returned empty when the result is the standard set."""
    labels = dict(zip(names, values))
    for tag in override.tags:
        if tag.remove:
            labels.pop(tag.name, None)
        else:
            labels[tag.name] = tag_value(tag.value, row)
    out_names = tuple(labels)
    if out_names == names:
        return (), tuple(labels.values())
    return out_names, tuple(labels.values())


# Attributes a Mixer row carries as columns; captured request attributes come as attr:... columns.
_ROW_ATTRIBUTES = {"response.code": "response_code", "request.protocol": "request_protocol"}


def tag_value(value: "Attribute | str | None", row: Mapping[str, str]) -> str:
    """An UPSERT's value for one row: a literal, or an attribute's value (``unknown`` when the
    row cannot tell, as Istio's stats filter writes for an expression it cannot evaluate)."""
    if value is None:
        return "unknown"
    if isinstance(value, str):
        return value
    column = _ROW_ATTRIBUTES.get(value.name) or attribute_column(value)
    return row.get(column, "unknown")


def _label_plan(keys: Sequence[str], reporter: str) -> list[int]:
    """Where each of ``LABEL_NAMES`` comes from in ``values + (reporter, cluster_id,
    SOURCE_SECURITY_POLICY)``, ``values`` being a group's label values in ``keys`` order.  As
    in Istio, the source reporter cannot know the server's security policy."""
    n = len(keys)
    derived = {"reporter": n, "source_cluster": n + 1, "destination_cluster": n + 1}
    if reporter == "source":
        derived["connection_security_policy"] = n + 2
    return [derived[name] if name in derived else keys.index(name) for name in LABEL_NAMES]


def _no_nulls(buckets: tuple[int | None, ...]) -> tuple[int, ...]:
    return buckets if None not in buckets else tuple(b or 0 for b in buckets)  # type: ignore[misc]


# -- cumulative store and Prometheus exposition --------------------------------------------------

@dataclass(slots=True)
class Series:
    count: int = 0
    sum: float = 0.0
    buckets: list[int] = field(default_factory=list)


# A series' key: its label values in the metric's standard order, or (names, values) when
# Telemetry tag overrides gave it other labels.
SeriesKey = "tuple[str, ...] | tuple[tuple[str, ...], tuple[str, ...]]"


class MetricStore:
    """Cumulative series since this store was created (a restart resets them, which Prometheus'
    ``rate`` treats as a counter reset). Not thread-safe: the owner serializes access."""

    def __init__(self) -> None:
        self._series: dict[str, dict[SeriesKey, Series]] = {m.name: {} for m in METRICS}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_IstioCollector(self))

    def apply(self, updates: Iterable[MetricUpdate]) -> None:
        for u in updates:
            series = self._series[u.metric]
            key = (u.names, u.labels) if u.names else u.labels
            s = series.get(key)
            if s is None:
                s = series[key] = Series(buckets=[0] * len(_BY_NAME[u.metric].buckets))
            s.count += u.count
            s.sum += u.sum
            for i, n in enumerate(u.buckets):
                s.buckets[i] += n

    def copy(self) -> "MetricStore":
        """A snapshot to render while this store keeps changing (rendering is the slow part)."""
        other = MetricStore()
        other._series = {name: {key: Series(s.count, s.sum, list(s.buckets)) for key, s in series.items()}
                         for name, series in self._series.items()}
        return other

    def get(self, metric: str, labels: Mapping[str, str]) -> Series | None:
        """The series with exactly these labels."""
        names = _BY_NAME[metric].labels
        if set(labels) == set(names):
            return self._series[metric].get(tuple(labels[n] for n in names))
        return next((s for lab, s in self.series(metric) if lab == dict(labels)), None)

    def series(self, metric: str) -> Iterator[tuple[dict[str, str], Series]]:
        for key, s in self._series[metric].items():
            yield _label_dict(metric, key), s

    def series_count(self) -> int:
        return sum(len(s) for s in self._series.values())

    def render_prometheus(self) -> str:
        return generate_latest(self.registry).decode()

    def families(self) -> Iterator[Metric]:
        for m in COUNTERS:
            counters = CounterMetricFamily(m.name, m.help, labels=m.labels)
            for key, s in self._series[m.name].items():
                if key and isinstance(key[0], tuple):  # relabelled by a tag override
                    counters.add_sample(m.name, _label_dict(m.name, key), s.count)
                else:
                    counters.add_metric(key, s.count)
            yield counters
        for m in HISTOGRAMS:
            family = HistogramMetricFamily(m.name, m.help, labels=LABEL_NAMES)
            les = [format(b, "g") for b in m.buckets]   # Go's %g, as Envoy writes le: "0.5", "1", "1.8e+06"
            for key, s in self._series[m.name].items():
                buckets = list(zip(les, s.buckets)) + [("+Inf", s.count)]
                if key and isinstance(key[0], tuple):
                    labels = _label_dict(m.name, key)
                    for le, n in buckets:
                        family.add_sample(f"{m.name}_bucket", {**labels, "le": le}, n)
                    family.add_sample(f"{m.name}_count", labels, s.count)
                    family.add_sample(f"{m.name}_sum", labels, s.sum)
                else:
                    family.add_metric(key, buckets, s.sum)
            yield family


def _label_dict(metric: str, key: SeriesKey) -> dict[str, str]:
    if key and isinstance(key[0], tuple):
        names, values = key  # type: ignore[misc]
        return dict(zip(names, values))
    return dict(zip(_BY_NAME[metric].labels, key))  # type: ignore[arg-type]


class _IstioCollector:
    def __init__(self, store: MetricStore) -> None:
        self._store = store

    def collect(self) -> Iterator[Metric]:
        return self._store.families()

    def describe(self) -> list[Metric]:
        return []  # the families are dynamic; nothing to check for duplicates at registration


# -- rolling window of raw rows ------------------------------------------------------------------

QUANTILES = (0.5, 0.9, 0.99)
Filters = Mapping[str, "str | int | Sequence[str | int]"]


class Window:
    """The rows received in the last ``span_s`` seconds (at most ``max_rows``, oldest batches
    dropped first), for queries that need the raw distribution."""

    def __init__(self, span_s: float = 300.0, max_rows: int = 2_000_000,
                 clock: Callable[[], float] = time.time) -> None:
        self.span_s = span_s
        self.max_rows = max_rows
        self._clock = clock
        self._batches: deque[tuple[float, pa.Table]] = deque()
        self.num_rows = 0

    def append(self, table: pa.Table) -> None:
        now = self._clock()
        if table.num_rows:
            self._batches.append((now, table))
            self.num_rows += table.num_rows
        self._prune(now)

    def _prune(self, now: float) -> None:
        while self._batches and (self._batches[0][0] < now - self.span_s or
                                 (self.num_rows > self.max_rows and len(self._batches) > 1)):
            self.num_rows -= self._batches.popleft()[1].num_rows

    def rows(self, since_s: float | None = None, filters: Filters | None = None,
             columns: Sequence[str] | None = None) -> pa.Table:
        """Rows that started in the last ``since_s`` seconds and match ``filters`` (column ->
        value or values), projected on ``columns``."""
        _check_columns([*(filters or {}), *(columns or ())])
        now = self._clock()
        self._prune(now)
        table = (pa.concat_tables([t for _, t in self._batches]) if self._batches
                 else TELEMETRY_SCHEMA.empty_table())
        mask = None
        if since_s is not None:
            cutoff = pa.scalar(datetime.fromtimestamp(now - since_s, tz=timezone.utc), TELEMETRY_SCHEMA.field("start_time").type)
            mask = pc.greater_equal(table["start_time"], cutoff)
        for column, wanted in (filters or {}).items():
            values = [wanted] if isinstance(wanted, (str, int)) else list(wanted)
            value_type = TELEMETRY_SCHEMA.field(column).type
            value_set = pa.array(values, value_type.value_type if pa.types.is_dictionary(value_type) else value_type)
            cond = pc.is_in(table[column], value_set=value_set)
            mask = cond if mask is None else pc.and_(mask, cond)
        if mask is not None:
            table = table.filter(mask)
        return table.select(list(columns)) if columns is not None else table

    def query(self, filters: Filters | None = None, group_by: Sequence[str] = ("destination_service",),
              since_s: float | None = None) -> pa.Table:
        columns = list(dict.fromkeys([*group_by, "response_code", "duration_ms"]))
        rows = self.rows(since_s, filters, columns)
        return summarize(rows, group_by, since_s if since_s is not None else self.span_s)

    def top(self, since_s: float = 60.0) -> pa.Table:
        """Per destination service: rps, success rate and latency percentiles, busiest first."""
        return self.query(None, ("destination_service",), since_s)


def _check_columns(names: Iterable[str]) -> None:
    unknown = [n for n in names if n not in TELEMETRY_SCHEMA.names]
    if unknown:
        raise ValueError(f"unknown column(s) {', '.join(map(repr, unknown))} (not in {SCHEMA_NAME})")


def summarize(rows: pa.Table, group_by: Sequence[str], interval_s: float) -> pa.Table:
    """Per group of ``rows``: request count, rate over ``interval_s``, success rate (percent of
    responses that are not 5xx, as Istio's dashboards define it) and exact duration percentiles.

    Pure over its input, so rows gathered from several Mixer replicas summarize exactly.
    """
    keys = list(group_by)
    _check_columns(keys)
    out_fields = [pa.field(k, pa.int32() if k == "response_code" else pa.string()) for k in keys] + [
        pa.field("requests", pa.int64()), pa.field("rps", pa.float64()), pa.field("success_rate", pa.float64()),
        *(pa.field(f"p{round(q * 100)}_ms", pa.float64()) for q in QUANTILES)]
    schema = pa.schema(out_fields)
    if rows.num_rows == 0:
        return schema.empty_table()
    code = rows["response_code"]
    table = pa.table({**{k: rows[k] for k in keys}, "duration_ms": rows["duration_ms"],
                      "_5xx": pc.and_(pc.greater_equal(code, 500), pc.less_equal(code, 599))})
    group_keys = keys or ["_all"]
    if not keys:  # a hash group-by needs a key: one constant group
        table = table.append_column("_all", pa.array([0] * table.num_rows, pa.int8()))
    grouped = (table.unify_dictionaries().group_by(group_keys, use_threads=False)
               .aggregate([("duration_ms", "list"), ("_5xx", "sum")]).to_pydict())
    result: dict[str, list] = {f.name: [] for f in out_fields}
    for g, durations in enumerate(grouped["duration_ms_list"]):
        requests = len(durations)
        errors = grouped["_5xx_sum"][g] or 0
        for k in keys:
            result[k].append(grouped[k][g])
        result["requests"].append(requests)
        result["rps"].append(requests / interval_s if interval_s > 0 else 0.0)
        result["success_rate"].append(100.0 * (requests - errors) / requests)
        quantiles = pc.quantile(pa.array(durations, pa.float64()), q=list(QUANTILES)).to_pylist()
        for q, v in zip(QUANTILES, quantiles):
            result[f"p{round(q * 100)}_ms"].append(v)
    return pa.table(result, schema=schema).sort_by([("requests", "descending")] + [(k, "ascending") for k in keys])
