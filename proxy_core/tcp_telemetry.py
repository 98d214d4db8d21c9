"""Per-connection TCP telemetry for Mixer: Istio's ``istio_tcp_*`` metrics, shipped as Arrow.

Envoy's Istio stats filter reports a TCP connection's bytes at a flush interval while it is
open, not only when it closes, so a long-lived connection's traffic shows up on dashboards as
it flows.  This recorder does the same: a connection registers once (with how to read its
byte counters); every drain (the supervisor's flush interval) reads each open connection's
counters and reports what moved since the last drain; a closing connection reports its rest.
Nothing runs per byte or per read: the counters are the ones the splices keep anyway
(``Pipe.bytes_in``).

A drain yields one RecordBatch in ``SCHEMA`` (``raymesh.telemetry.tcp.v1``), a separate
batch kind so the per-request HTTP rows stay as they are.  One row per label set that moved:
the report time, the labels (the same dimension values the HTTP rows carry, with
``request_protocol`` ``tcp``: the source workload that opened the connection, as the proxy
finds it through ``/proc``, and ``connection_security_policy`` ``mutual_tls`` when the
connection went to the destination's node over an mTLS tunnel), ``response_flags``, and the deltas ``connections_opened``,
``connections_closed``, ``received_bytes`` (client to upstream) and ``sent_bytes`` (upstream
to client), as Istio's ``istio_tcp_received_bytes_total`` / ``istio_tcp_sent_bytes_total``
count them at the server side.

Which connections are recorded: tcp-protocol VIP sessions (``proxy_core.tcp``) and CONNECT
tunnels accepted on the HTTP proxy listener, each by the node proxy where the client entered
the mesh.  Tunnels on the ``inbound`` listener are the mesh's own node-to-node transport: the
requests and connections inside them were recorded by the sending node (HTTP ones as HTTP),
so counting the tunnel again would report the same traffic twice, and HTTP traffic as TCP.

A connection counts as opened in the first report that includes it and carries the response
flags known then; a connection refused before it reached an upstream (``NR``, ``UH``, ``UF``,
...) is reported opened and closed at once with its flag, as Envoy's ``tcp_proxy`` does.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import pyarrow as pa

from proxy_core import flags
from proxy_core.snapshot import Cluster, Endpoint, Route, Snapshot, WeightedCluster
from proxy_core.source_identity import UNIDENTIFIED, SourceWorkload
from proxy_core.telemetry import DIMENSION_FIELDS, destination_attributes

SCHEMA_NAME = "raymesh.telemetry.tcp.v1"
PROTOCOL = "tcp"

_DICT = pa.dictionary(pa.int32(), pa.string())
# The HTTP dimension columns that mean something for a connection (gRPC status does not).
TCP_DIMENSIONS: tuple[str, ...] = tuple(n for n in DIMENSION_FIELDS if n != "grpc_response_status")
_PICK = tuple(DIMENSION_FIELDS.index(n) for n in TCP_DIMENSIONS)
_PROTOCOL_AT = TCP_DIMENSIONS.index("request_protocol")
MEASURES = ("connections_opened", "connections_closed", "received_bytes", "sent_bytes")

SCHEMA = pa.schema([("start_time", pa.timestamp("ms", tz="UTC")),
                    *((n, _DICT) for n in TCP_DIMENSIONS),
                    ("response_flags", _DICT),
                    *((m, pa.int64()) for m in MEASURES)],
                   metadata={"schema": SCHEMA_NAME})

# How to read a connection's byte counters: (client -> upstream, upstream -> client) so far.
Meter = Callable[[], tuple[int, int]]


def tcp_dimensions(snapshot: Snapshot, route: Route | None, wc: WeightedCluster | None, cluster: Cluster | None,
                   endpoint: Endpoint | None, authority: str, source: SourceWorkload = UNIDENTIFIED,
                   mutual_tls: bool = False) -> tuple[str, ...]:
    """The label values (``TCP_DIMENSIONS`` order) of a connection from ``source`` to this
    destination, carried to the destination's node over an mTLS tunnel or not: the same
    ``source_*`` and ``connection_security_policy`` values an HTTP request's row carries."""
    full = destination_attributes(snapshot.node_id, route, wc, cluster, endpoint, authority, source, mutual_tls)
    dims = [full[i] for i in _PICK]
    dims[_PROTOCOL_AT] = PROTOCOL
    return tuple(dims)


@dataclass(slots=True)
class _Connection:
    dims: tuple[str, ...]
    meter: Meter
    received: int = 0      # bytes already reported, each direction
    sent: int = 0
    opened: bool = False   # counted as opened in a report already


class TcpTelemetry:
    """Open connections and the deltas not yet drained, per (labels, response flags).

    ``open``/``close`` run once per connection, ``drain`` once per flush; the label sets
    are few (one per destination endpoint and flag), so the pending table stays small.
    """

    __slots__ = ("_live", "_pending")

    def __init__(self) -> None:
        self._live: dict[Any, _Connection] = {}
        self._pending: dict[tuple[tuple[str, ...], str], list[int]] = {}

    @property
    def open_connections(self) -> int:
        return len(self._live)

    def open(self, key: Any, dims: tuple[str, ...], meter: Meter) -> None:
        """Start reporting the connection ``key`` (any hashable owner object)."""
        self._live[key] = _Connection(dims, meter)

    def close(self, key: Any, response_flags: str = flags.NONE) -> None:
        """The connection ended: report its remaining bytes and count it closed (no-op if unknown)."""
        conn = self._live.pop(key, None)
        if conn is not None:
            self._report(conn, response_flags, closed=True)

    def refused(self, dims: tuple[str, ...], response_flag: str) -> None:
        """A connection that ended before reaching an upstream: opened and closed with its flag."""
        totals = self._pending.setdefault((dims, response_flag), [0, 0, 0, 0])
        totals[0] += 1
        totals[1] += 1

    def _report(self, conn: _Connection, response_flags: str, closed: bool) -> None:
        received, sent = conn.meter()
        d_recv, d_sent = received - conn.received, sent - conn.sent
        if conn.opened and not closed and not d_recv and not d_sent:
            return
        conn.received, conn.sent = received, sent
        totals = self._pending.setdefault((conn.dims, response_flags), [0, 0, 0, 0])
        if not conn.opened:
            conn.opened = True
            totals[0] += 1
        if closed:
            totals[1] += 1
        totals[2] += d_recv
        totals[3] += d_sent

    def drain(self, now: float | None = None) -> tuple[bytes, int]:
        """Everything moved since the last drain, as ``(Arrow IPC stream bytes, rows)``;
        ``b""`` and 0 when nothing did.  Open connections report their bytes so far."""
        for conn in self._live.values():
            self._report(conn, flags.NONE, closed=False)
        pending, self._pending = self._pending, {}
        if not pending:
            return b"", 0
        keys = list(pending)
        values = list(pending.values())
        millis = int((time.time() if now is None else now) * 1000)
        columns: list[pa.Array] = [pa.array([millis] * len(keys), pa.int64()).cast(SCHEMA.field(0).type)]
        for i in range(len(TCP_DIMENSIONS)):
            columns.append(pa.array([k[0][i] for k in keys], pa.string()).dictionary_encode())
        columns.append(pa.array([k[1] for k in keys], pa.string()).dictionary_encode())
        for i in range(len(MEASURES)):
            columns.append(pa.array([v[i] for v in values], pa.int64()))
        batch = pa.RecordBatch.from_arrays(columns, schema=SCHEMA)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, SCHEMA) as writer:
            writer.write_batch(batch)
        return sink.getvalue().to_pybytes(), len(keys)


# -- the hooks of the two kinds of connection ----------------------------------------------------


def open_tunnel(telemetry: TcpTelemetry, ex: Any) -> None:
    """A CONNECT tunnel on the HTTP proxy listener was spliced (``server.Exchange``): report it
    until ``close_tunnel``.  Client bytes are counted in ``bytes_received``, the upstream's in
    its pipe.  The source is the workload that opened the downstream connection; the tunnel
    is ``mutual_tls`` when its upstream leg (``ex.up_tls``) is a mesh mTLS tunnel."""
    req = ex.req
    up_tls = ex.up_tls
    dims = tcp_dimensions(ex.state.snapshot, ex.route, ex.wc, ex.cluster, ex.endpoint,
                          req.authority if req is not None else "", ex.server.mtls.workload_of(ex.conn),
                          up_tls is not None and up_tls.mesh)
    telemetry.open(ex, dims, lambda: (ex.bytes_received, ex.pipe.bytes_in if ex.pipe is not None else 0))


def close_tunnel(telemetry: TcpTelemetry, ex: Any) -> None:
    telemetry.close(ex, ",".join(ex.flags) if ex.flags else flags.NONE)


def open_session(telemetry: TcpTelemetry, session: Any, snapshot: Snapshot, route: Any, wc: WeightedCluster,
                 cluster: Cluster, endpoint: Endpoint, authority: str, source: SourceWorkload,
                 mutual_tls: bool) -> None:
    """A tcp VIP session (``tcp.TcpSession``) picked its destination: report it until ``close``.
    The session's downstream half counts client bytes, its upstream half the server's."""
    dims = tcp_dimensions(snapshot, route, wc, cluster, endpoint, authority, source, mutual_tls)
    telemetry.open(session, dims, lambda: (session.bytes_in,
                                           session.upstream.bytes_in if session.upstream is not None else 0))


def refuse_session(telemetry: TcpTelemetry, snapshot: Snapshot, route: Any, wc: WeightedCluster | None,
                   cluster: Cluster | None, authority: str, response_flag: str, source: SourceWorkload) -> None:
    """A tcp VIP session closed before it reached an upstream (no route, no endpoint, denied):
    no tunnel was opened, so never ``mutual_tls``."""
    telemetry.refused(tcp_dimensions(snapshot, route, wc, cluster, None, authority, source), response_flag)
