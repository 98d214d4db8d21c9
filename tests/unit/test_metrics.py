"""Mixer's pure half: Istio metrics from telemetry batches, Prometheus text, rolling-window queries."""
from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mesh.metrics import (BYTES_BUCKETS, DURATION_BUCKETS_MS, LABEL_NAMES, TELEMETRY_SCHEMA, MetricStore, Window,
                          aggregate, conform, decode_batch, summarize)

NOW = 1_700_000_000.0

DEFAULTS: dict[str, Any] = {
    "node": "node-a",
    "source_workload": "productpage-v1", "source_workload_namespace": "default",
    "source_principal": "spiffe://cluster.local/ns/default/sa/bookinfo-productpage",
    "source_app": "productpage", "source_version": "v1",
    "destination_workload": "reviews-v2", "destination_workload_namespace": "default",
    "destination_principal": "spiffe://cluster.local/ns/default/sa/bookinfo-reviews",
    "destination_app": "reviews", "destination_version": "v2",
    "destination_service": "reviews.default.svc.cluster.local", "destination_service_name": "reviews",
    "destination_service_namespace": "default", "destination_canonical_service": "reviews",
    "destination_canonical_revision": "v2", "source_canonical_service": "productpage",
    "source_canonical_revision": "v1", "request_protocol": "http", "response_code": 200,
    "grpc_response_status": "", "response_flags": "-", "connection_security_policy": "none",
    "route_name": "default", "duration_ms": 3.0, "request_bytes": 120, "response_bytes": 900,
}


def make_batch(rows: list[dict[str, Any]], start: float = NOW) -> pa.RecordBatch:
    """A batch in the contract schema; each row overrides ``DEFAULTS``; ``age_s`` sets start_time."""
    full = [{**DEFAULTS, **{k: v for k, v in r.items() if k != "age_s"},
             "start_time": datetime.fromtimestamp(start - r.get("age_s", 0.0), tz=timezone.utc)} for r in rows]
    columns = []
    for f in TELEMETRY_SCHEMA:
        values = [r[f.name] for r in full]
        columns.append(pa.array(values, pa.string()).dictionary_encode() if pa.types.is_dictionary(f.type)
                       else pa.array(values, f.type))
    return pa.RecordBatch.from_arrays(columns, schema=TELEMETRY_SCHEMA)


def ipc_bytes(batch: pa.RecordBatch) -> bytes:
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, batch.schema) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def labels(reporter: str, **overrides: str) -> dict[str, str]:
    base = {n: str(DEFAULTS[n]) for n in LABEL_NAMES if n in DEFAULTS}
    base.update(reporter=reporter, source_cluster="raymesh", destination_cluster="raymesh")
    if reporter == "source":
        base["connection_security_policy"] = "unknown"
    base.update(overrides)
    return base


# -- aggregation ---------------------------------------------------------------------------------

def test_label_set_is_istios_standard_set():
    assert set(LABEL_NAMES) == {
        "reporter", "source_workload", "source_workload_namespace", "source_principal", "source_app",
        "source_version", "source_canonical_service", "source_canonical_revision", "source_cluster",
        "destination_workload", "destination_workload_namespace", "destination_principal", "destination_app",
        "destination_version", "destination_service", "destination_service_name", "destination_service_namespace",
        "destination_canonical_service", "destination_canonical_revision", "destination_cluster",
        "request_protocol", "response_code", "grpc_response_status", "response_flags",
        "connection_security_policy"}
    assert len(LABEL_NAMES) == 25


def test_envoy_default_buckets():
    expected = [0.5, 1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000,
                300000, 600000, 1800000, 3600000]
    assert list(DURATION_BUCKETS_MS) == expected
    assert list(BYTES_BUCKETS) == expected


def test_counts_per_label_set_for_both_reporters():
    batch = make_batch([{"response_code": 200}] * 3 + [{"response_code": 503, "response_flags": "UF"}] * 2
                       + [{"destination_service": "ratings.default.svc.cluster.local"}])
    store = MetricStore()
    updates = aggregate(batch)
    store.apply(updates)
    assert {u.metric for u in updates} == {"istio_requests_total", "istio_request_duration_milliseconds",
                                           "istio_request_bytes", "istio_response_bytes"}
    assert all(len(u.labels) == len(LABEL_NAMES) for u in updates)
    for reporter in ("source", "destination"):
        assert store.get("istio_requests_total", labels(reporter)).count == 3
        assert store.get("istio_requests_total", labels(reporter, response_code="503", response_flags="UF")).count == 2
        assert store.get("istio_requests_total", labels(
            reporter, destination_service="ratings.default.svc.cluster.local")).count == 1
    # six rows, counted once by each reporter
    assert sum(s.count for _, s in store.series("istio_requests_total")) == 12


def test_source_reporter_does_not_know_the_security_policy():
    store = MetricStore()
    store.apply(aggregate(make_batch([{"connection_security_policy": "mutual_tls"}])))
    policies = {lab["reporter"]: lab["connection_security_policy"] for lab, _ in store.series("istio_requests_total")}
    assert policies == {"source": "unknown", "destination": "mutual_tls"}


def test_counters_accumulate_across_batches():
    store = MetricStore()
    store.apply(aggregate(make_batch([{}] * 2)))
    store.apply(aggregate(make_batch([{}] * 5)))
    assert store.get("istio_requests_total", labels("destination")).count == 7


def test_histogram_bucket_placement_is_le_inclusive():
    durations = [0.2, 0.5, 0.6, 1.0, 7.0, 4000.0, 5_000_000.0]
    store = MetricStore()
    store.apply(aggregate(make_batch([{"duration_ms": d} for d in durations])))
    s = store.get("istio_request_duration_milliseconds", labels("destination"))
    cumulative = dict(zip(DURATION_BUCKETS_MS, s.buckets))
    assert cumulative[0.5] == 2        # 0.2 and exactly 0.5
    assert cumulative[1] == 4          # + 0.6 and exactly 1.0
    assert cumulative[5] == 4
    assert cumulative[10] == 5         # + 7
    assert cumulative[5000] == 6       # + 4000
    assert cumulative[3600000] == 6    # 5e6 only in +Inf
    assert s.count == 7
    assert s.sum == pytest.approx(sum(durations))


def test_byte_histograms():
    store = MetricStore()
    store.apply(aggregate(make_batch([{"request_bytes": 0, "response_bytes": 2000},
                                      {"request_bytes": 300, "response_bytes": 20000}])))
    req = store.get("istio_request_bytes", labels("source"))
    resp = store.get("istio_response_bytes", labels("source"))
    assert (req.count, req.sum, resp.sum) == (2, 300, 22000)
    assert dict(zip(BYTES_BUCKETS, req.buckets))[0.5] == 1
    assert dict(zip(BYTES_BUCKETS, req.buckets))[500] == 2
    assert dict(zip(BYTES_BUCKETS, resp.buckets))[2500] == 1
    assert dict(zip(BYTES_BUCKETS, resp.buckets))[30000] == 2


def test_missing_column_is_rejected_by_name():
    batch = make_batch([{}])
    with pytest.raises(ValueError, match="destination_service_name"):
        aggregate(batch.drop_columns(["destination_service_name"]))


def test_plain_string_columns_are_accepted():
    batch = make_batch([{}] * 2)
    plain = pa.table([c.cast(pa.string()) if pa.types.is_dictionary(c.type) else c for c in batch.columns],
                     names=batch.schema.names)
    assert conform(plain).schema.equals(TELEMETRY_SCHEMA, check_metadata=False)
    store = MetricStore()
    store.apply(aggregate(plain))
    assert store.get("istio_requests_total", labels("source")).count == 2


def test_ipc_stream_roundtrip_and_empty_batch():
    table = decode_batch(ipc_bytes(make_batch([{}] * 4)))
    assert table.num_rows == 4
    assert decode_batch(b"").num_rows == 0
    assert aggregate(decode_batch(b"")) == []


# -- Prometheus exposition -------------------------------------------------------------------------

def test_prometheus_text_parses_with_istio_names_and_labels():
    store = MetricStore()
    store.apply(aggregate(make_batch([{"duration_ms": 3.0}, {"duration_ms": 30.0, "response_code": 500}])))
    families = {f.name: f for f in text_string_to_metric_families(store.render_prometheus())}
    assert families["istio_requests"].type == "counter"
    totals = {(s.labels["reporter"], s.labels["response_code"]): s.value
              for s in families["istio_requests"].samples if s.name == "istio_requests_total"}
    assert totals == {("source", "200"): 1, ("destination", "200"): 1, ("source", "500"): 1, ("destination", "500"): 1}
    sample = next(s for s in families["istio_requests"].samples if s.name == "istio_requests_total")
    assert set(sample.labels) == set(LABEL_NAMES)

    hist = families["istio_request_duration_milliseconds"]
    assert hist.type == "histogram"
    dest_200 = [s for s in hist.samples
                if s.labels["reporter"] == "destination" and s.labels["response_code"] == "200"]
    buckets = {s.labels["le"]: s.value for s in dest_200 if s.name.endswith("_bucket")}
    assert list(buckets)[:3] == ["0.5", "1", "5"] and "1.8e+06" in buckets
    assert buckets["1"] == 0 and buckets["5"] == 1 and buckets["+Inf"] == 1
    assert {s.name: s.value for s in dest_200 if not s.name.endswith("_bucket")} == {
        "istio_request_duration_milliseconds_sum": 3.0, "istio_request_duration_milliseconds_count": 1}
    assert "istio_request_bytes" in families and "istio_response_bytes" in families


# -- window queries --------------------------------------------------------------------------------

def test_top_percentiles_rps_and_success_rate():
    window = Window(span_s=300, clock=lambda: NOW)
    reviews = [{"duration_ms": float(d), "response_code": 503 if d > 90 else 200} for d in range(1, 101)]
    ratings = [{"destination_service": "ratings.default.svc.cluster.local", "duration_ms": 2.0}] * 10
    window.append(decode_batch(ipc_bytes(make_batch(reviews + ratings))))
    top = window.top(since_s=10).to_pylist()
    assert [r["destination_service"] for r in top] == ["reviews.default.svc.cluster.local",
                                                       "ratings.default.svc.cluster.local"]
    r = top[0]
    assert r["requests"] == 100 and r["rps"] == pytest.approx(10.0)
    assert r["success_rate"] == pytest.approx(90.0)
    assert r["p50_ms"] == pytest.approx(50.5)      # linear interpolation over 1..100
    assert r["p90_ms"] == pytest.approx(90.1)
    assert r["p99_ms"] == pytest.approx(99.01)
    assert top[1]["requests"] == 10 and top[1]["p99_ms"] == 2.0 and top[1]["success_rate"] == 100.0


def test_since_filters_on_start_time_and_old_batches_expire():
    clock = [NOW]
    window = Window(span_s=60, clock=lambda: clock[0])
    window.append(conform(make_batch([{"age_s": 30}] * 3 + [{"age_s": 1}] * 2)))
    assert window.top(since_s=10).to_pylist()[0]["requests"] == 2
    assert window.top(since_s=60).to_pylist()[0]["requests"] == 5
    clock[0] = NOW + 61
    assert window.num_rows == 5
    assert window.top(since_s=600).num_rows == 0
    assert window.num_rows == 0


def test_window_keeps_at_most_max_rows():
    window = Window(span_s=300, max_rows=5, clock=lambda: NOW)
    for _ in range(4):
        window.append(conform(make_batch([{}] * 2)))
    assert window.num_rows == 4   # the two newest batches: a third would exceed 5 rows


def test_query_filters_and_group_by_across_batches_with_different_dictionaries():
    window = Window(clock=lambda: NOW)
    window.append(conform(make_batch([{"response_code": 200}] * 3 + [{"response_code": 404}])))
    window.append(conform(make_batch([{"destination_service": "details.default.svc.cluster.local",
                                       "source_workload": "productpage-v2"}] * 2 + [{"response_code": 404}])))
    rows = window.query(filters={"response_code": [200, 404]}, group_by=["destination_service", "response_code"],
                        since_s=60).to_pylist()
    got = {(r["destination_service"], r["response_code"]): r["requests"] for r in rows}
    assert got == {("reviews.default.svc.cluster.local", 200): 3, ("reviews.default.svc.cluster.local", 404): 2,
                   ("details.default.svc.cluster.local", 200): 2}
    only = window.query(filters={"source_workload": "productpage-v2"}, group_by=["source_workload"], since_s=60)
    assert only.to_pylist()[0]["requests"] == 2 and only.num_rows == 1
    overall = window.query(group_by=[], since_s=60).to_pylist()
    assert overall[0]["requests"] == 7 and overall[0]["success_rate"] == 100.0


def test_query_rejects_unknown_columns():
    window = Window(clock=lambda: NOW)
    with pytest.raises(ValueError, match="nope"):
        window.query(filters={"nope": "x"})
    with pytest.raises(ValueError, match="nope"):
        window.query(group_by=["nope"])


def test_summaries_of_rows_from_several_windows_are_exact():
    a, b = Window(clock=lambda: NOW), Window(clock=lambda: NOW)
    a.append(conform(make_batch([{"duration_ms": float(d)} for d in range(1, 51)])))
    b.append(conform(make_batch([{"duration_ms": float(d)} for d in range(51, 101)])))
    cols = ["destination_service", "response_code", "duration_ms"]
    merged = summarize(pa.concat_tables([a.rows(60, None, cols), b.rows(60, None, cols)]),
                       ["destination_service"], 60).to_pylist()
    assert merged[0]["requests"] == 100 and merged[0]["p50_ms"] == pytest.approx(50.5)


def test_empty_window_summarizes_to_an_empty_table():
    assert Window(clock=lambda: NOW).top().num_rows == 0


# -- Mixer's helpers that need no cluster ----------------------------------------------------------

def test_batch_log_remembers_recent_ids_per_node():
    from actors.mixer import BatchLog

    log = BatchLog(per_node=2)
    log.add("a", (1, ("ref1",)))
    assert ("a", (1, ("ref1",))) in log
    assert ("b", (1, ("ref1",))) not in log          # another node's seq 1
    assert ("a", (1, ("ref9",))) not in log          # a restarted worker's new object
    log.add("a", (2, ("ref2",)))
    log.add("a", (3, ("ref3",)))
    assert ("a", (1, ("ref1",))) not in log and ("a", (3, ("ref3",))) in log


def test_metrics_endpoint_serves_rendered_text_on_loopback():
    import http.client

    from actors.mixer import MetricsServer

    store = MetricStore()
    store.apply(aggregate(make_batch([{}] * 2)))
    server = MetricsServer(lambda: store.render_prometheus().encode())
    port = server.start()

    def get(path: str) -> tuple[int, str, str]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", path)
            resp = conn.getresponse()
            return resp.status, resp.getheader("Content-Type", ""), resp.read().decode()
        finally:
            conn.close()

    status, ctype, body = get("/metrics")
    assert status == 200 and ctype.startswith("text/plain; version=0.0.4")
    families = {f.name for f in text_string_to_metric_families(body)}
    assert {"istio_requests", "istio_request_duration_milliseconds"} <= families
    assert get("/other")[0] == 404


def test_file_sd_is_prometheus_target_group_json(tmp_path):
    import json

    from actors.mixer import write_file_sd

    path = write_file_sd(str(tmp_path / "sd"), "mixer-0", "127.0.0.1:9999", {"mixer_replica": "mixer-0"})
    assert json.loads(open(path).read()) == [{"targets": ["127.0.0.1:9999"], "labels": {"mixer_replica": "mixer-0"}}]
    write_file_sd(str(tmp_path / "sd"), "mixer-0", "127.0.0.1:1111", {})
    assert json.loads(open(path).read())[0]["targets"] == ["127.0.0.1:1111"]
    assert [p.name for p in (tmp_path / "sd").iterdir()] == ["mixer-0.json"]   # no temporary files left
