"""Tracing on a real two-node mesh: installed with a span file per node and a Zipkin collector,
the client-side proxy continues a caller's sampled W3C trace with a span of its own,
propagates it (W3C and B3) to the workload on the other node, writes the span and reports it
to the collector; an unsampled caller leaves no span."""
from __future__ import annotations

import json
import secrets
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.ray

SERVICE = "traced"


def spans_of(trace_dir: Path, node_id: str, trace_id: str) -> list[dict]:
    path = trace_dir / f"spans-{node_id[:16]}.jsonl"
    if not path.exists():
        return []
    return [s for s in map(json.loads, path.read_text().splitlines()) if s["traceId"] == trace_id]


def test_sampled_caller_gets_a_span_per_hop_and_headers_upstream(mesh, trace_dir: Path, zipkin_collector) -> None:
    mesh.deploy(SERVICE, "v1", node_index=1)
    mesh.wait_endpoints(SERVICE, 1)
    trace_id, parent = secrets.token_hex(16), secrets.token_hex(8)
    status, body = mesh.get_json(f"http://{SERVICE}:8000/hello",
                                 headers={"traceparent": f"00-{trace_id}-{parent}-01"})
    assert status == 200
    seen = {k.lower(): v for k, v in body["headers"].items()}
    version, upstream_trace, span_id, flags = seen["traceparent"].split("-")
    assert (version, upstream_trace, flags) == ("00", trace_id, "01") and span_id != parent
    assert seen["x-b3-traceid"] == trace_id and seen["x-b3-spanid"] == span_id and seen["x-b3-sampled"] == "1"
    assert seen["x-b3-parentspanid"] == parent

    deadline = time.monotonic() + 10
    while not (spans := spans_of(trace_dir, mesh.nodes[0], trace_id)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(spans) == 1, spans
    span = spans[0]
    assert span["id"] == span_id and span["parentId"] == parent
    assert span["name"].startswith(f"{SERVICE}.default.svc.cluster.local:8000")
    assert span["tags"]["http.status_code"] == "200"
    assert span["tags"]["upstream_cluster"].endswith(f"|{SERVICE}.default.svc.cluster.local")
    # the same span reached the collector (batches leave every second)
    while not (reported := [s for s in zipkin_collector.spans if s["traceId"] == trace_id]) \
            and time.monotonic() < deadline + 5:
        time.sleep(0.2)
    assert reported == [span]

    # A caller that decided not to sample: propagated as such, never recorded.
    quiet = secrets.token_hex(16)
    status, body = mesh.get_json(f"http://{SERVICE}:8000/quiet",
                                 headers={"traceparent": f"00-{quiet}-{secrets.token_hex(8)}-00"})
    assert status == 200 and {k.lower(): v for k, v in body["headers"].items()}["traceparent"].endswith("-00")
    time.sleep(1.0)
    assert spans_of(trace_dir, mesh.nodes[0], quiet) == [] and spans_of(trace_dir, mesh.nodes[1], quiet) == []
    assert not [s for s in zipkin_collector.spans if s["traceId"] == quiet]
