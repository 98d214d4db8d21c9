"""Request mirroring (Istio ``mirror`` / ``mirrors``, Envoy's request_mirror_policies).

The server builds a complete copy of a request once it has been read and hands it to
``MirrorSender``, which sends it on its own connection and forgets it: the primary request
never waits for, retries or reports a mirror.

A copy travels the way a request routed to its cluster would (``mtls_client.upstream_plan``):
over HTTP/2 to a cluster whose port speaks http2/grpc (a stream on the endpoint's shared
connection in ``http2_upstream.H2UpstreamPool``), over HTTP/1.1 otherwise, through the peer
node's tunnel with the source workload's mTLS identity for a remote endpoint.  The copy is
written as HTTP/1.1 bytes either way, as the exchange writes its requests: the HTTP/2 stream
translates them, so gRPC messages and request trailers reach an h2c or gRPC-only mirror intact.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from typing import Any, Mapping

from proxy_core.http1 import HeaderList, ProtocolError, ResponseHead
from proxy_core.http2_upstream import H2UpstreamPool
from proxy_core.lb import LoadBalancer
from proxy_core.mtls import Mtls
from proxy_core.mtls_client import UpstreamTls, upstream_plan
from proxy_core.router import RequestInfo
from proxy_core.snapshot import Cluster, Endpoint
from proxy_core.upstream import ConnectError, UpstreamConnection, UpstreamPool

log = logging.getLogger("proxy_core.mirror")

# Mirror copies in flight per proxy; beyond this a copy is dropped (and counted), so a slow
# mirror cluster cannot pile up sockets and buffered bodies.
MIRROR_MAX_IN_FLIGHT = 64
# A copy on a route without a timeout gives up after Envoy's default route timeout.
MIRROR_TIMEOUT = 15.0


class _MirrorSink:
    """Upstream sink of one mirror copy: reads the response to its end and drops it.

    ``done`` resolves True when the response was read completely, False when the upstream
    failed first; ``keep_alive`` says whether the connection may go back to the pool.
    ``grpc_status`` is set by an HTTP/2 stream on every response head (read by nobody here).
    """

    __slots__ = ("done", "keep_alive", "grpc_status")

    def __init__(self, done: asyncio.Future[bool]) -> None:
        self.done = done
        self.keep_alive = False
        self.grpc_status: int | None = None

    def _finish(self, ok: bool) -> None:
        if not self.done.done():
            self.done.set_result(ok)

    def on_head(self, head: ResponseHead) -> None:
        self.keep_alive = head.keep_alive

    def on_data(self, data: bytes) -> None:
        pass

    def on_end(self, trailers: HeaderList) -> None:
        self._finish(True)

    def on_upgrade(self, rest: bytes) -> None:
        self.keep_alive = False
        self._finish(False)

    def flush(self) -> None:
        pass

    def upstream_error(self, exc: ProtocolError) -> None:
        self._finish(False)

    def upstream_lost(self, exc: Exception | None) -> None:
        self._finish(False)

    def upstream_pause_writing(self) -> None:
        pass

    def upstream_resume_writing(self) -> None:
        pass


@dataclass(slots=True)
class MirrorCounters:
    """Outcomes of mirror copies; none of them ever shows in the primary request's status."""

    sent: int = 0          # copies written to a mirror upstream
    completed: int = 0     # their responses read to the end (any status)
    errors: int = 0        # no cluster or endpoint, connect failure, reset, timeout, bad response
    dropped: int = 0       # over the in-flight bound
    skipped_body: int = 0  # body over the retry buffer, or not read whole before the response ended


class MirrorSender:
    """Fire-and-forget request copies (Envoy request mirroring, Istio ``mirror``/``mirrors``).

    A copy is independent of the request it came from: it picks its own endpoint, takes its
    own connection (or HTTP/2 stream) from the shared pools, or dials one, is never retried,
    and its response is read and discarded.  Failures are only counted, so a slow or dead
    mirror cluster can neither delay nor fail primary traffic.  At most ``limit`` copies are
    in flight; more are dropped rather than queued.
    """

    def __init__(self, pool: UpstreamPool, h2_pool: H2UpstreamPool, mtls: Mtls,
                 limit: int = MIRROR_MAX_IN_FLIGHT) -> None:
        self.pool = pool
        self.h2_pool = h2_pool
        self.mtls = mtls
        self.limit = limit
        self.counters = MirrorCounters()
        self.by_cluster: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def send(self, loop: asyncio.AbstractEventLoop, clusters: Mapping[str, Cluster],
             balancers: Mapping[str, LoadBalancer], cluster_name: str, req: RequestInfo,
             data: bytes, head_request: bool, timeout: float, downstream: Any) -> None:
        """Start one copy of ``data`` (a complete HTTP/1.1 request) to ``cluster_name``, sent as
        a request from ``downstream`` (the client's connection) would be."""
        c = self.counters
        if len(self._tasks) >= self.limit:
            c.dropped += 1
            return
        cluster = clusters.get(cluster_name)
        endpoint = balancers[cluster_name].pick(req) if cluster is not None else None
        if cluster is None or endpoint is None:
            c.errors += 1
            return
        try:
            h2, tls = upstream_plan(self.mtls, endpoint, cluster, downstream)
        except ConnectError:    # unusable TLS settings: the primary request reports them
            c.errors += 1
            return
        task = loop.create_task(self._run(balancers[cluster_name], cluster, endpoint, data, head_request,
                                          timeout, self.h2_pool if h2 else self.pool, tls))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, balancer: LoadBalancer, cluster: Cluster, endpoint: Endpoint, data: bytes,
                   head_request: bool, timeout: float, pool: UpstreamPool | H2UpstreamPool,
                   tls: UpstreamTls | None) -> None:
        c = self.counters
        conn: UpstreamConnection | None = None
        sink: _MirrorSink | None = None
        ok = cancelled = False
        balancer.on_start(endpoint)
        try:
            async with asyncio.timeout(timeout):
                conn = pool.take_idle(endpoint.pool_key if tls is None else (endpoint.pool_key, tls.key))
                if conn is None:
                    conn = await pool.connect(endpoint, cluster.connect_timeout, tls)
                sink = _MirrorSink(asyncio.get_running_loop().create_future())
                conn.attach(sink)
                if head_request:
                    conn.parser.expect_head_response()
                assert conn.transport is not None
                conn.transport.write(data)
                c.sent += 1
                self.by_cluster[cluster.name] = self.by_cluster.get(cluster.name, 0) + 1
                ok = await sink.done
        except (ConnectError, OSError, TimeoutError):
            pass
        except asyncio.CancelledError:
            cancelled = True   # the proxy is closing: not a mirror failure
            raise
        except Exception:
            log.exception("mirror request to %s failed unexpectedly", cluster.name)
        finally:
            balancer.on_end(endpoint)
            if ok:
                c.completed += 1
            elif not cancelled:
                c.errors += 1
            if conn is not None:
                if ok and sink is not None and sink.keep_alive and not conn.closed:
                    pool.release(conn)
                else:
                    conn.detach()
                    conn.close()     # an HTTP/2 stream is reset if unfinished; its connection stays

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()

    def stats(self) -> dict[str, Any]:
        c = self.counters
        return {"sent": c.sent, "completed": c.completed, "errors": c.errors, "dropped": c.dropped,
                "skipped_body": c.skipped_body, "in_flight": self.in_flight, "by_cluster": dict(self.by_cluster)}
