"""Mixer aggregation rate: telemetry rows per second one replica turns into Istio metrics.

Runs Mixer's ingest path in-process, without Ray: decode a proxy's Arrow IPC stream and
conform it (``actors.mixer._as_table``), aggregate it (``mesh.metrics.aggregate``) and apply
the series updates to the cumulative store (``MetricStore.apply``), once plainly and once
with Telemetry API metric overrides in force (a disabled metric, a removed tag and two
upserted tags, one of them a captured request header, so its ``attr:`` column joins the
group-by).  Rendering ``/metrics`` is not counted: it runs on a copy, on its own thread,
per scrape rather than per batch.

The batches are realistic: rows as the proxy's recorder writes them (dictionary-encoded
labels, LZ4-compressed IPC for large batches), 100,000 rows by default over 480 label sets
(10 source workloads x 8 destinations x 3 response codes x 2 response flags).

    .venv/bin/python benchmarks/mixer_aggregation.py [--rows 100000] [--batches 10]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from actors.mixer import _as_table  # noqa: E402
from mesh.metrics import TELEMETRY_SCHEMA, MetricStore, aggregate  # noqa: E402
from mesh.registry import RegistryState, WorkloadInstance  # noqa: E402
from mesh.resources import Resource  # noqa: E402
from mesh.telemetry_api import metric_policies  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "mixer_aggregation.json"
TARGET_ROWS_PER_S = 1_000_000
SOURCES = [f"client-{i}" for i in range(10)]
DESTINATIONS = [f"svc-{i}" for i in range(8)]
CODES = [200, 404, 503]
FLAGS = ["-", "UF"]


def make_batch(rows: int, with_header: bool) -> bytes:
    """``rows`` request rows as a proxy ships them; ``with_header`` adds a captured x-user column."""
    i = range(rows)
    src = [k % len(SOURCES) for k in i]
    dst = [(k // 7) % len(DESTINATIONS) for k in i]
    code = [(k // 3) % len(CODES) for k in i]
    flag = [(k // 11) % len(FLAGS) for k in i]

    def dict_col(values: list[str], idx: Any) -> pa.DictionaryArray:
        return pa.DictionaryArray.from_arrays(pa.array(idx, pa.int32()), pa.array(values, pa.string()))

    def const(value: str) -> pa.DictionaryArray:
        return dict_col([value], [0] * rows)

    d = [f"{s}.default.svc.cluster.local" for s in DESTINATIONS]
    columns: dict[str, pa.Array] = {
        "start_time": pa.array([1_700_000_000_000 + k for k in i], pa.int64()).cast(
            TELEMETRY_SCHEMA.field("start_time").type),
        "node": const("node-0123456789abcdef"),
        "source_workload": dict_col(SOURCES, src), "source_workload_namespace": const("default"),
        "source_principal": dict_col([f"spiffe://cluster.local/ns/default/sa/{s}" for s in SOURCES], src),
        "source_app": dict_col(SOURCES, src), "source_version": const("v1"),
        "destination_workload": dict_col([f"{s}-v1" for s in DESTINATIONS], dst),
        "destination_workload_namespace": const("default"),
        "destination_principal": dict_col([f"spiffe://cluster.local/ns/default/sa/{s}" for s in DESTINATIONS], dst),
        "destination_app": dict_col(DESTINATIONS, dst), "destination_version": const("v1"),
        "destination_service": dict_col(d, dst), "destination_service_name": dict_col(DESTINATIONS, dst),
        "destination_service_namespace": const("default"), "destination_canonical_service": dict_col(DESTINATIONS, dst),
        "destination_canonical_revision": const("v1"), "source_canonical_service": dict_col(SOURCES, src),
        "source_canonical_revision": const("v1"), "request_protocol": const("http"),
        "response_code": pa.array([CODES[c] for c in code], pa.int32()), "grpc_response_status": const(""),
        "response_flags": dict_col(FLAGS, flag), "connection_security_policy": const("mutual_tls"),
        "route_name": const("default"),
        "duration_ms": pa.array([(k % 997) * 0.37 for k in i], pa.float64()),
        "request_bytes": pa.array([k % 300 + 200 for k in i], pa.int64()),
        "response_bytes": pa.array([k % 5000 + 300 for k in i], pa.int64()),
    }
    schema = TELEMETRY_SCHEMA
    arrays = [columns[f.name] for f in schema]
    if with_header:
        schema = schema.append(pa.field("attr:request.headers['x-user']", pa.dictionary(pa.int32(), pa.string())))
        arrays.append(dict_col(["ann", "bob", "cy"], [k % 3 for k in i]))
    batch = pa.RecordBatch.from_arrays(arrays, schema=schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, schema, options=pa.ipc.IpcWriteOptions(compression="lz4")) as writer:
        writer.write_batch(batch)
    return sink.getvalue().to_pybytes()


def overrides() -> Any:
    """Telemetry for half the destinations: REQUEST_DURATION off, a tag removed, two upserted."""
    spec = {"selector": {"matchLabels": {"tier": "backend"}}, "metrics": [{"overrides": [
        {"match": {"metric": "REQUEST_DURATION", "mode": "SERVER"}, "disabled": True},
        {"match": {"metric": "REQUEST_COUNT"}, "tagOverrides": {
            "source_principal": {"operation": "REMOVE"}, "team": {"value": "'books'"},
            "user": {"value": "request.headers['x-user']"}}}]}]}
    registry = RegistryState(workloads=[
        WorkloadInstance(s, "default", "127.0.0.1", 9000 + k, 80, "n", {"app": s, "version": "v1",
                                                                        "tier": "backend" if k % 2 else "frontend"})
        for k, s in enumerate(DESTINATIONS)])
    return metric_policies([Resource("telemetry.istio.io/v1", "Telemetry", "backend", "default", spec)], registry)


def measure(data: bytes, batches: int, policies: Any) -> dict[str, Any]:
    store = MetricStore()
    per_batch: list[dict[str, float]] = []
    rows = 0
    for _ in range(batches):
        t0 = time.perf_counter()
        table = _as_table(data)
        t1 = time.perf_counter()
        updates = aggregate(table, "raymesh", policies)
        t2 = time.perf_counter()
        store.apply(updates)
        t3 = time.perf_counter()
        rows = table.num_rows
        per_batch.append({"decode_ms": (t1 - t0) * 1e3, "aggregate_ms": (t2 - t1) * 1e3, "apply_ms": (t3 - t2) * 1e3,
                          "total_ms": (t3 - t0) * 1e3, "updates": len(updates)})
    med = {k: round(statistics.median(b[k] for b in per_batch), 2) for k in per_batch[0]}
    best = min(b["total_ms"] for b in per_batch)
    return {"rows_per_batch": rows, "batches": batches, "median": med,
            "rows_per_s": round(rows / (med["total_ms"] / 1e3)), "rows_per_s_best": round(rows / (best / 1e3)),
            "series": store.series_count()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rows", type=int, default=100_000, help="rows per batch")
    p.add_argument("--batches", type=int, default=10, help="batches per case (median reported)")
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    deadline = time.monotonic() + 50          # bounded: a slow machine gets fewer batches
    result: dict[str, Any] = {
        "machine": {"cpu_model": _cpu_model(), "nproc": os.cpu_count(), "python": platform.python_version(),
                    "pyarrow": pa.__version__, "loadavg_start": os.getloadavg()[0]},
        "target_rows_per_s": TARGET_ROWS_PER_S, "cases": {}}
    cases = {"plain": (make_batch(args.rows, False), None),
             "telemetry_overrides": (make_batch(args.rows, True), overrides())}
    for name, (data, policies) in cases.items():
        measure(data, 1, policies)  # warm-up
        n = args.batches if time.monotonic() < deadline else 2
        r = measure(data, n, policies)
        r["ipc_bytes"] = len(data)
        result["cases"][name] = r
        m = r["median"]
        print(f"{name:<20} {r['rows_per_s']:>12,} rows/s (best {r['rows_per_s_best']:,})  "
              f"decode {m['decode_ms']:.1f} ms, aggregate {m['aggregate_ms']:.1f} ms, apply {m['apply_ms']:.1f} ms "
              f"per {r['rows_per_batch']:,}-row batch; {r['series']:,} series", flush=True)
    result["machine"]["loadavg_end"] = os.getloadavg()[0]
    plain = result["cases"]["plain"]["rows_per_s"]
    result["meets_target"] = plain >= TARGET_ROWS_PER_S
    print(f"target >= {TARGET_ROWS_PER_S:,} rows/s per replica: {'met' if result['meets_target'] else 'NOT met'}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"written: {args.output}")
    return 0


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
