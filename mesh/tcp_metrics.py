"""Istio's TCP metrics from the proxies' TCP connection batches (``raymesh.telemetry.tcp.v1``).

Proxies report, per flush interval and label set, how many connections opened and closed and
how many bytes moved each way (``proxy_core.tcp_telemetry``; an open connection reports its
bytes as they flow, not only at close).  ``aggregate_tcp`` sums those deltas with one pyarrow
group-by into the four counters ``istio_tcp_connections_opened_total``,
``istio_tcp_connections_closed_total``, ``istio_tcp_received_bytes_total`` and
``istio_tcp_sent_bytes_total``, for ``reporter="source"`` and ``reporter="destination"`` as
``mesh.metrics.aggregate`` does for requests.
"""
from __future__ import annotations

import pyarrow as pa

from typing import TYPE_CHECKING

from mesh.metrics import (DEFAULT_CLUSTER_ID, REPORTERS, SOURCE_SECURITY_POLICY, TCP_COUNTERS, TCP_LABEL_NAMES,
                          MetricUpdate, apply_tag_overrides, conform_to)
from proxy_core.tcp_telemetry import SCHEMA as TCP_SCHEMA
from proxy_core.tcp_telemetry import SCHEMA_NAME as TCP_SCHEMA_NAME

if TYPE_CHECKING:
    from mesh.telemetry_api import MetricPolicies

_DERIVED = ("reporter", "source_cluster", "destination_cluster")
TCP_ROW_LABELS: tuple[str, ...] = tuple(n for n in TCP_LABEL_NAMES if n not in _DERIVED)


def is_tcp_batch(schema: pa.Schema) -> bool:
    """Whether an Arrow stream's schema names itself a TCP connection batch."""
    return (schema.metadata or {}).get(b"schema") == TCP_SCHEMA_NAME.encode()


def conform_tcp(table: pa.Table | pa.RecordBatch) -> pa.Table:
    """``table`` in the TCP batch schema; raises ValueError naming a missing column."""
    if isinstance(table, pa.RecordBatch):
        table = pa.Table.from_batches([table])
    return conform_to(table, TCP_SCHEMA, f"TCP telemetry batch lacks column(s) {{}} of {TCP_SCHEMA_NAME}")


def aggregate_tcp(batch: pa.Table | pa.RecordBatch, cluster_id: str = DEFAULT_CLUSTER_ID,
                  policies: "MetricPolicies | None" = None) -> list[MetricUpdate]:
    """The counter increments of one TCP batch, for both reporters (zero increments omitted),
    after the Telemetry metric overrides in ``policies`` as ``mesh.metrics.aggregate`` applies
    them (request attributes are ``unknown`` for a TCP connection)."""
    with_policies = policies is not None and not policies.empty
    table = conform_tcp(batch)
    if table.num_rows == 0:
        return []
    measures = [m.column for m in TCP_COUNTERS]
    grouped = (table.select([*TCP_ROW_LABELS, *measures]).unify_dictionaries()
               .group_by(list(TCP_ROW_LABELS), use_threads=False)
               .aggregate([(c, "sum") for c in measures]).to_pydict())
    updates: list[MetricUpdate] = []
    for g in range(len(grouped[f"{measures[0]}_sum"])):
        row = {n: "unknown" if grouped[n][g] is None else str(grouped[n][g]) for n in TCP_ROW_LABELS}
        for reporter in REPORTERS:
            values = dict(row, reporter=reporter, source_cluster=cluster_id, destination_cluster=cluster_id)
            if reporter == "source":
                values["connection_security_policy"] = SOURCE_SECURITY_POLICY
            labels = tuple(values[n] for n in TCP_LABEL_NAMES)
            side = "destination" if reporter == "destination" else "source"
            policy = policies.lookup(row[f"{side}_workload_namespace"], row[f"{side}_workload"]) \
                if with_policies else {}  # type: ignore[union-attr]
            for m in TCP_COUNTERS:
                total = int(grouped[f"{m.column}_sum"][g] or 0)
                if not total:
                    continue
                override = policy.get((m.name, reporter))
                if override is None:
                    updates.append(MetricUpdate(m.name, labels, total))
                elif not override.disabled:
                    names, relabelled = apply_tag_overrides(m.labels, labels, override, row)
                    updates.append(MetricUpdate(m.name, relabelled, total, names=names))
    return updates
