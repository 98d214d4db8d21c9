"""The proxy honours the Telemetry API per destination workload: access log enablement and
filter, trace sampling and span reporting, request attributes captured for metric tags."""
from __future__ import annotations

import io
import json
import random
from typing import Any

import pyarrow as pa
import pytest

from proxy_core.accesslog import AccessLog
from proxy_core.tracing import Tracer
from tests.unit.conftest import Reply, cluster, snapshot, vhost
from tests.unit.test_proxy_server import aget

pytestmark = pytest.mark.timeout(60)

A = "outbound|80||a.default.svc.cluster.local"
B = "outbound|80||b.default.svc.cluster.local"


def two_services(port_a: int, port_b: int, telemetry: dict[str, Any]) -> dict[str, Any]:
    snap = snapshot(vhosts=[vhost("a", 80, [{"name": "a", "route": [{"cluster": A}]}]),
                            vhost("b", 80, [{"name": "b", "route": [{"cluster": B}]}])],
                    clusters={A: {**cluster(port_a), "service": "a.default.svc.cluster.local"},
                              B: {**cluster(port_b), "service": "b.default.svc.cluster.local"}})
    snap["telemetry"] = telemetry
    return snap


def policies(*entries: dict[str, Any]) -> list[dict[str, Any]]:
    base = {"access_log": True, "filter": None, "sampling": None, "report_spans": True}
    return [{**base, **e} for e in entries]


async def start(env, telemetry_for: Any, **kw: Any) -> tuple[Any, Any, Any]:
    up_a = await env.upstream(lambda seen: Reply(status=503 if seen.target == "/fail" else 200, body=b"a"))
    up_b = await env.upstream(lambda seen: Reply(body=b"b"))
    p = await env.proxy(two_services(up_a.port, up_b.port, telemetry_for(up_a.port, up_b.port)), **kw)
    return up_a, up_b, p


async def call(p: Any, host: str, path: str = "/", headers: dict[str, str] | None = None) -> int:
    status, _, _ = await aget(p.ports["http_proxy"], path, headers={"Host": f"{host}:80", **(headers or {})})
    return status


async def test_access_log_disabled_for_one_workload_and_filtered_for_another(env) -> None:
    sink = io.StringIO()
    log = AccessLog(sink)

    def tel(port_a: int, port_b: int) -> dict[str, Any]:
        return {"policies": policies({}, {"filter": "response.code >= 400"}, {"access_log": False}),
                "default": 0, "endpoints": {f"127.0.0.1:{port_a}": 1, f"127.0.0.1:{port_b}": 2}, "clusters": {}}

    _, _, p = await start(env, tel, log=log)
    for path in ("/ok", "/fail", "/ok2"):
        await call(p, "a", path)
    for _ in range(3):
        assert await call(p, "b") == 200
    assert await call(p, "nowhere") == 502     # no workload: the mesh default logs it
    log.flush()
    lines = [json.loads(line) for line in sink.getvalue().splitlines()]
    assert [(line["authority"], line["path"], line["response_code"]) for line in lines] == [
        ("a:80", "/fail", 503), ("nowhere:80", "/", 502)]


async def test_sampling_100_and_0_per_destination_and_disabled_span_reporting(env) -> None:
    sink = io.StringIO()

    def tel(port_a: int, port_b: int) -> dict[str, Any]:
        return {"policies": policies({}, {"sampling": 100.0}, {"sampling": 0.0}, {"sampling": 100.0, "report_spans": False}),
                "default": 0, "endpoints": {f"127.0.0.1:{port_b}": 3}, "clusters": {A: 1, B: 2}}

    up_a, up_b, p = await start(env, tel, tracer=Tracer(sink, 50.0, random.Random(7)))
    for _ in range(10):
        assert await call(p, "a") == 200
        assert await call(p, "b") == 200
    # a: 100% -> every request starts a trace, spans written
    assert all("traceparent" in s.headers for s in up_a.seen)
    spans = [json.loads(line) for line in sink.getvalue().splitlines()]
    assert len(spans) == 10 and {s["name"] for s in spans} == {"a.default.svc.cluster.local:80/*"}
    # b: 0% -> nothing starts; a caller's sampled trace is continued (its decision wins), but
    # b's workload disables span reporting, so no span is written for it
    assert all("traceparent" not in s.headers for s in up_b.seen)
    caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    assert await call(p, "b", headers={"traceparent": caller}) == 200
    assert up_b.seen[-1].headers["traceparent"].startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")
    assert len(sink.getvalue().splitlines()) == 10


async def test_recorder_captures_the_attributes_tags_read(env) -> None:
    def tel(port_a: int, port_b: int) -> dict[str, Any]:
        return {"policies": policies({}), "default": 0, "endpoints": {}, "clusters": {},
                "capture": ["request.headers['x-user']", "request.host"]}

    _, _, p = await start(env, tel)
    assert await call(p, "a", headers={"X-User": "ann"}) == 200
    assert await call(p, "b") == 200
    data, rows, _ = p.telemetry.drain()
    with pa.ipc.open_stream(pa.py_buffer(data)) as reader:
        table = reader.read_all()
    assert rows == 2
    assert table.column("attr:request.headers['x-user']").to_pylist() == ["ann", None]
    assert table.column("attr:request.host").to_pylist() == ["a:80", "b:80"]


async def test_without_capture_the_batch_has_only_the_contract_columns(env) -> None:
    _, _, p = await start(env, lambda a, b: {})
    assert await call(p, "a") == 200
    data, _, _ = p.telemetry.drain()
    with pa.ipc.open_stream(pa.py_buffer(data)) as reader:
        assert not [n for n in reader.schema.names if n.startswith("attr:")]
