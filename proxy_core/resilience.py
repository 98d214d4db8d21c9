"""Per-cluster circuit breaking, upstream connection options, retry limits and outlier reports.

A cluster whose DestinationRule sets ``connectionPool``, ``outlierDetection`` or
``retryBudget`` gets one ``ClusterResilience``; an exchange routed to it hands its upstream
attempts here (``dispatch``) instead of taking a pooled connection itself.  Clusters
without them have no entry, so their requests pay one dict lookup and a None check.

Circuit breakers, as Envoy's HTTP/1.1 connection pool enforces them:

* ``max_requests`` (``http2MaxRequests``): requests admitted to the cluster at once --
  sending, dialing or waiting; one more is answered ``503`` with flag ``UO`` at once.
* ``max_connections`` (``tcp.maxConnections``): open and opening connections, cluster wide.
  A request that finds no idle connection and no room for a new one waits in a FIFO queue
  for a connection to its endpoint to come free (or for room to dial).  As in Envoy, an
  endpoint with no connection at all may always open one, so no endpoint starves.
* ``max_pending_requests`` (``http1MaxPendingRequests``): requests waiting for a
  connection (queued or dialing); one more is ``503 UO``.  A waiting request leaves the
  queue when it ends for any other reason (client gone, route or per-try timeout).
* ``max_retries`` (``maxRetries``), or the retry budget when one is set (Envoy's
  ``retry_budget`` replaces the fixed limit): retries waiting out their backoff at once.
  A retry beyond it is not made: the failure is answered as it is, flagged ``UO`` (Envoy's
  router reports a retry overflow as upstream overflow), and counted.

Connection options: ``max_requests_per_connection`` and ``max_connection_duration`` retire a
connection when it comes back from a request (an idle one is closed when its lifetime ends),
``idle_timeout`` closes one idle that long, ``tcp_keepalive`` sets SO_KEEPALIVE and the
probe timing on each new upstream socket.  The cluster's connections are pooled apart from
other clusters' (the pool key carries the cluster name), so its counts are its own.
"""
from __future__ import annotations

import asyncio
import socket
import time
from typing import Any, Callable, Hashable

from proxy_core.outlier import OutlierDetector
from proxy_core.snapshot import Cluster, ConnectionPool, Endpoint, RetryBudget
from proxy_core.upstream import UpstreamConnection, UpstreamPool

MSG_OVERFLOW = b"upstream connect error or disconnect/reset before headers. reset reason: overflow"
_NO_LIMITS = ConnectionPool()


class ClusterResilience:
    """Limits, counters and the outlier detector of one cluster; kept across config pushes
    while the cluster's settings are unchanged (in-flight counts stay true)."""

    __slots__ = ("name", "limits", "budget", "detector", "requests", "pending", "retrying", "connections",
                 "per_key", "counters", "spec")

    def __init__(self, cluster: Cluster, detector: OutlierDetector | None) -> None:
        self.name = cluster.name
        self.limits = cluster.connection_pool or _NO_LIMITS
        self.budget: RetryBudget | None = cluster.retry_budget
        self.detector = detector
        self.spec = settings_of(cluster)
        self.requests: set[Any] = set()              # exchanges admitted (sending, dialing or waiting)
        self.pending: dict[Any, tuple[Endpoint, Hashable, Any] | None] = {}  # waiting (a tuple) or dialing (None)
        self.retrying: set[Any] = set()              # exchanges in retry backoff
        self.connections = 0
        self.per_key: dict[Hashable, int] = {}
        self.counters = {"upstream_rq_pending_overflow": 0, "upstream_rq_overflow": 0, "upstream_cx_overflow": 0,
                         "upstream_rq_retry_overflow": 0, "upstream_rq_pending_total": 0,
                         "upstream_cx_max_requests": 0, "upstream_cx_max_duration_reached": 0,
                         "upstream_cx_idle_timeout": 0}

    # -- attempts ------------------------------------------------------------------------------

    def dispatch(self, ex: Any, ep: Endpoint, key: Hashable, tls: Any) -> None:
        """Start ``ex``'s attempt on ``ep``: an idle connection, a new one, the queue, or 503 UO."""
        limits = self.limits
        if len(self.requests) >= limits.max_requests:
            self._overflow(ex, "upstream_rq_overflow")
            return
        ckey = (key, self.name)
        pool: UpstreamPool = ex.server.pool
        conn = pool.take_idle(ckey)
        if conn is not None:
            self.requests.add(ex)
            ex._send(conn)
            return
        if len(self.pending) >= limits.max_pending_requests:
            self._overflow(ex, "upstream_rq_pending_overflow")
            return
        self.requests.add(ex)
        self.counters["upstream_rq_pending_total"] += 1
        if self.connections < limits.max_connections or not self.per_key.get(ckey):
            self._dial(ex, ep, ckey, tls)
        else:
            self.counters["upstream_cx_overflow"] += 1
            self.pending[ex] = (ep, ckey, tls)

    def admit_stream(self, ex: Any) -> bool:
        """An HTTP/2 attempt: its stream shares the endpoint's one connection, so of the pool
        limits only ``http2MaxRequests`` (requests in flight) applies, as Envoy's HTTP/2 circuit
        breaker; beyond it, 503 UO.  False when it answered."""
        if len(self.requests) >= self.limits.max_requests:
            self._overflow(ex, "upstream_rq_overflow")
            return False
        self.requests.add(ex)
        return True

    def _dial(self, ex: Any, ep: Endpoint, ckey: Hashable, tls: Any) -> None:
        self.pending[ex] = None
        # Counted from now, not when the task first runs: requests dispatched meanwhile must see it.
        self.connections += 1
        self.per_key[ckey] = self.per_key.get(ckey, 0) + 1
        task = ex.loop.create_task(self._connect(ex.server.pool, ep, ex.cluster.connect_timeout, tls, ckey))
        ex.connecting = task
        task.add_done_callback(lambda t: self._dialed(ex, ckey, t))
        task.add_done_callback(ex._on_connected)

    def _dialed(self, ex: Any, ckey: Hashable, task: asyncio.Task[UpstreamConnection]) -> None:
        self.pending.pop(ex, None)
        if task.cancelled() or task.exception() is not None:
            self._gone(ckey)

    async def _connect(self, pool: UpstreamPool, ep: Endpoint, timeout: float, tls: Any,
                       ckey: Hashable) -> UpstreamConnection:
        conn = await pool.connect(ep, timeout, tls)
        conn.key = ckey
        conn.circuit = self
        conn.created = time.monotonic()
        limits = self.limits
        if limits.tcp_keepalive is not None:
            set_keepalive(conn.transport, limits.tcp_keepalive)
        if limits.max_connection_duration is not None:
            asyncio.get_running_loop().call_later(limits.max_connection_duration, self._expire, conn)
        if conn.closed:          # lost before this coroutine resumed: connection_lost saw no circuit
            self._gone(ckey)
        return conn

    def attempt_ended(self, ex: Any) -> None:
        """``ex``'s attempt is over (answered, failed, or abandoned): free its places."""
        self.requests.discard(ex)
        self.pending.pop(ex, None)

    def exchange_done(self, ex: Any) -> None:
        self.requests.discard(ex)
        self.pending.pop(ex, None)
        self.retrying.discard(ex)

    def _overflow(self, ex: Any, counter: str) -> None:
        self.counters[counter] += 1
        ex.local_reply(503, MSG_OVERFLOW, "UO")

    # -- retries -------------------------------------------------------------------------------

    def admit_retry(self, ex: Any) -> bool:
        """Whether ``ex`` may retry now; if not, flag it ``UO`` and count the overflow."""
        budget = self.budget
        if budget is not None:
            allowed = max(float(budget.min_retry_concurrency),
                          budget.percent / 100.0 * (len(self.requests) + len(self.pending)))
        else:
            allowed = float(self.limits.max_retries)
        if len(self.retrying) >= allowed:
            self.counters["upstream_rq_retry_overflow"] += 1
            ex.flags.append("UO")
            return False
        self.retrying.add(ex)
        return True

    def retry_fired(self, ex: Any) -> None:
        """The backoff is over: the retry becomes an ordinary attempt."""
        self.retrying.discard(ex)

    # -- outlier detection ---------------------------------------------------------------------

    def report_status(self, ep: Endpoint, status: int) -> None:
        if self.detector is not None:
            self.detector.report_status(ep, status)

    def report_failure(self, ep: Endpoint, kind: str) -> None:
        if self.detector is not None:
            self.detector.report_failure(ep, kind)

    # -- connections (called by upstream.py) -----------------------------------------------------

    def reclaim(self, conn: UpstreamConnection) -> bool:
        """A connection came back from a request: retire it, hand it to a waiting request
        (True: the pool must not keep it), or let the pool keep it idle (False)."""
        conn.requests += 1
        limits = self.limits
        if limits.max_requests_per_connection and conn.requests >= limits.max_requests_per_connection:
            self.counters["upstream_cx_max_requests"] += 1
            conn.close()
            return True
        if limits.max_connection_duration is not None and \
                time.monotonic() - conn.created >= limits.max_connection_duration:
            self.counters["upstream_cx_max_duration_reached"] += 1
            conn.close()
            return True
        for ex, waiting in self.pending.items():
            if waiting is not None and waiting[1] == conn.key:
                del self.pending[ex]
                asyncio.get_running_loop().call_soon(self._hand_over, ex, waiting, conn)
                return True
        if limits.idle_timeout is not None:
            asyncio.get_running_loop().call_later(limits.idle_timeout, self._idle_check, conn)
        return False

    def _hand_over(self, ex: Any, waiting: tuple[Endpoint, Hashable, Any], conn: UpstreamConnection) -> None:
        if ex.done or ex not in self.requests:
            if not conn.closed:
                conn.requests -= 1             # it carried no request: release counts one again
                ex.server.pool.release(conn)
            return
        if conn.closed:
            self._dial(ex, waiting[0], waiting[1], waiting[2])
            return
        conn.reused = True
        ex.guard(ex._send, conn)

    def connection_closed(self, conn: UpstreamConnection) -> None:
        """A connection of this cluster is gone: room for a waiting request to dial."""
        self._gone(conn.key)

    def _gone(self, ckey: Hashable) -> None:
        self.connections -= 1
        n = self.per_key.get(ckey, 0) - 1
        if n > 0:
            self.per_key[ckey] = n
        else:
            self.per_key.pop(ckey, None)
        if self.connections < self.limits.max_connections:
            for ex, waiting in self.pending.items():
                if waiting is not None:
                    ex.guard(self._dial, ex, *waiting)
                    return

    def _idle_check(self, conn: UpstreamConnection) -> None:
        timeout = self.limits.idle_timeout
        if timeout is not None and conn.sink is None and not conn.closed \
                and time.monotonic() - conn.idle_since >= timeout * 0.999:
            self.counters["upstream_cx_idle_timeout"] += 1
            conn.close()

    def _expire(self, conn: UpstreamConnection) -> None:
        if conn.sink is None and not conn.closed:
            self.counters["upstream_cx_max_duration_reached"] += 1
            conn.close()

    # -- reporting -----------------------------------------------------------------------------

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {"rq_active": len(self.requests), "rq_pending": len(self.pending),
                               "rq_retrying": len(self.retrying), "cx_active": self.connections, **self.counters}
        if self.detector is not None:
            out["outlier_detection"] = self.detector.stats()
        return out


def settings_of(cluster: Cluster) -> tuple[Any, ...]:
    """What decides whether a config push may keep a cluster's ``ClusterResilience``."""
    return (cluster.connection_pool, cluster.retry_budget, cluster.outlier_detection)


def set_keepalive(transport: Any, keepalive: Any) -> None:
    """SO_KEEPALIVE plus TCP_KEEPIDLE / TCP_KEEPINTVL / TCP_KEEPCNT where set (Linux names)."""
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None:
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for opt, value in ((getattr(socket, "TCP_KEEPIDLE", None), keepalive.time),
                       (getattr(socket, "TCP_KEEPINTVL", None), keepalive.interval),
                       (getattr(socket, "TCP_KEEPCNT", None), keepalive.probes)):
        if opt is not None and value is not None:
            sock.setsockopt(socket.IPPROTO_TCP, opt, max(1, int(value)))


def build_resilience(clusters: dict[str, Cluster], previous: dict[str, ClusterResilience] | None,
                     clock: Callable[[], float]) -> dict[str, ClusterResilience]:
    """The clusters that need one, reusing ``previous`` entries whose settings are unchanged."""
    out: dict[str, ClusterResilience] = {}
    for name, c in clusters.items():
        if c.connection_pool is None and c.outlier_detection is None and c.retry_budget is None:
            continue
        old = (previous or {}).get(name)
        if old is not None and old.spec == settings_of(c):
            out[name] = old
            continue
        detector = OutlierDetector(c.outlier_detection, clock) if c.outlier_detection is not None else None
        out[name] = ClusterResilience(c, detector)
    return out
