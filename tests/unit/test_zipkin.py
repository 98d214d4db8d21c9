"""Spans reported to a Zipkin v2 collector over HTTP, by a real proxy, off the request path.

The collector is the standard library's HTTP server on loopback, answering as Zipkin does
(``202 Accepted`` for ``POST /api/v2/spans``), or failing, or too slow, as a real one may.
"""
from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from proxy_core.tracing import Tracer
from proxy_core.zipkin import ZipkinExporter
from tests.unit.test_proxy_server import aget
from tests.unit.test_tracing import CL, TRACE, reviews
from tests.unit.conftest import Reply

pytestmark = pytest.mark.timeout(60)

ROOT = Path(__file__).resolve().parents[2]


class Collector:
    """A Zipkin-like collector: records each POST (path, headers, JSON body) and answers ``status``."""

    def __init__(self, status: int = 202, delay: float = 0.0) -> None:
        self.posts: list[tuple[str, dict[str, str], Any]] = []
        self.status = status
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (the standard library's name)
                body = self.rfile.read(int(self.headers["content-length"]))
                time.sleep(delay)
                collector.posts.append((self.path, {k.lower(): v for k, v in self.headers.items()}, json.loads(body)))
                self.send_response(collector.status)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/api/v2/spans"

    @property
    def spans(self) -> list[dict[str, Any]]:
        return [span for _, _, body in self.posts for span in body]

    async def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def until(predicate: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def zipkin_proxy(env: Any, collector_url: str, **exporter: Any) -> tuple[Any, Any, ZipkinExporter]:
    up = await env.upstream(lambda seen: Reply(body=b"ok"))
    zipkin = ZipkinExporter(collector_url, interval=0.05, **exporter)
    p = await env.proxy(reviews(up.port), tracer=Tracer(None, 100.0, exporter=zipkin))
    return up, p, zipkin


async def call(p: Any, headers: dict[str, str] | None = None) -> int:
    status, _, _ = await aget(p.ports["http_proxy"], "/r", headers={"Host": "reviews:9080", **(headers or {})})
    return status


async def test_spans_reach_the_collector_in_batches(env) -> None:
    collector = env.track(Collector())
    up, p, zipkin = await zipkin_proxy(env, collector.url)
    assert await call(p, {"traceparent": f"00-{TRACE}-00f067aa0ba902b7-01"}) == 200
    for _ in range(9):
        assert await call(p) == 200
    await until(lambda: len(collector.spans) == 10)
    path, headers, _ = collector.posts[0]
    assert path == "/api/v2/spans" and headers["content-type"] == "application/json"
    assert len(collector.posts) < 10       # batched, not one POST per span
    first = next(s for s in collector.spans if s["traceId"] == TRACE)
    assert first["parentId"] == "00f067aa0ba902b7" and first["kind"] == "CLIENT"
    assert first["name"] == "reviews.default.svc.cluster.local:9080/*"
    assert first["tags"]["http.status_code"] == "200" and first["tags"]["upstream_cluster"] == CL
    assert first["tags"]["guid:x-request-id"] == up.seen[0].headers["x-request-id"]
    assert len({s["traceId"] for s in collector.spans}) == 10
    assert zipkin.stats() == {"url": collector.url, "exported": 10, "dropped": 0, "failed_batches": 0, "buffered": 0}
    assert p.stats()["tracing"] == {"enabled": True, "spans": 10, "zipkin": zipkin.stats()}


async def test_a_failing_or_absent_collector_never_fails_requests(env) -> None:
    broken = env.track(Collector(status=500))
    _, p, zipkin = await zipkin_proxy(env, broken.url)
    assert [await call(p) for _ in range(5)] == [200] * 5
    await until(lambda: zipkin.dropped == 5)
    assert zipkin.exported == 0 and zipkin.failed_batches >= 1 and len(broken.spans) == 5

    with __import__("socket").socket() as s:      # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{s.getsockname()[1]}/api/v2/spans"
    _, p2, absent = await zipkin_proxy(env, closed)
    assert [await call(p2) for _ in range(5)] == [200] * 5
    await until(lambda: absent.dropped == 5)
    assert absent.exported == 0


async def test_a_slow_collector_leaves_a_bounded_buffer(env) -> None:
    slow = env.track(Collector(delay=1.0))
    _, p, zipkin = await zipkin_proxy(env, slow.url, max_buffered=3)
    started = time.monotonic()
    assert [await call(p) for _ in range(12)] == [200] * 12
    assert time.monotonic() - started < 1.0        # the requests did not wait for the collector
    await until(lambda: zipkin.exported + zipkin.dropped == 12, timeout=15)
    assert zipkin.dropped > 0 and zipkin.exported == len(slow.spans) > 0


def test_collector_url_is_checked_where_it_is_given() -> None:
    for bad in ("ftp://zipkin:21/x", "zipkin:9411", "http:///api/v2/spans"):
        with pytest.raises(ValueError, match="Zipkin collector URL"):
            ZipkinExporter(bad)
    r = subprocess.run([sys.executable, "-m", "proxy_core", "--snapshot", "/nonexistent.json",
                        "--trace-zipkin", "zipkin:9411"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "Zipkin collector URL" in r.stderr
    meshctl = str(Path(sys.executable).parent / "meshctl")
    r = subprocess.run([meshctl, "--address", "127.0.0.1:1", "install", "--trace-zipkin", "ftp://x/y"],
                       capture_output=True, text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert r.returncode == 2 and "Zipkin collector URL" in r.stderr


async def test_standalone_proxy_sends_its_last_spans_on_shutdown(env, tmp_path: Path) -> None:
    collector = env.track(Collector())
    up = await env.upstream(lambda seen: Reply(body=b"ok"))
    snap = tmp_path / "snap.json"
    snap.write_text(json.dumps(reviews(up.port)))
    proc = subprocess.Popen([sys.executable, "-m", "proxy_core", "--snapshot", str(snap), "--no-access-log",
                             "--trace-zipkin", collector.url, "--trace-sampling", "100"],
                            stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        ready = json.loads(await asyncio.to_thread(proc.stdout.readline))   # type: ignore[union-attr]
        port = ready["ports"]["http_proxy"]
        for _ in range(3):
            status, _, _ = await aget(port, "/r", headers={"Host": "reviews:9080"})
            assert status == 200
    finally:
        proc.terminate()
        await asyncio.to_thread(proc.wait, 30)
    assert proc.returncode == 0
    assert len(collector.spans) == 3       # buffered spans left before the process ended
