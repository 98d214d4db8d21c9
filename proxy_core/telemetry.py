"""Per-request telemetry for Mixer: one row per finished HTTP request, shipped as Arrow columns.

Istio dropped Mixer because it sat on the request path.  Here a request only appends a
few values to a Python list; every flush interval the supervisor asks for them over the
control channel (``{"op": "telemetry"}``) and gets one Arrow RecordBatch, serialized as an
Arrow IPC stream, in the schema ``raymesh.telemetry.v1`` (``SCHEMA`` below), which it hands
to Mixer through the object store.

Keeping the request path cheap: of the 28 columns, 22 depend only on where a request went
and where it came from (node, route, cluster, endpoint, source workload, mTLS or not; for
clusters without a service also the authority).  They
are computed once per destination into a row of a small *dimension* table; a request
appends the index of its dimension row and its own six values.  ``drain`` dictionary-encodes
each dimension column and takes it by the index array, so the batch is built by Arrow
kernels, not per row in Python.

Attribute values follow Istio's standard metric labels:

* ``source_*``: the local workload that sent the request, as the proxy found it through
  ``/proc`` (``proxy_core.source_identity.SourceWorkload``, named after the registration
  the proxy worker pushed with its pid): ``source_principal`` is its SPIFFE id
  (``spiffe://cluster.local/ns/<ns>/sa/<sa>``, as Istio reports it), ``source_workload``
  ``<app>-<version>``, and so on.  A client the proxy cannot identify gets Istio's values
  for an unknown peer: ``unknown``, and ``latest`` for the canonical revision.
* ``connection_security_policy``: ``mutual_tls`` when the request crossed to the
  destination's node over an mTLS tunnel, ``none`` otherwise (same node, plaintext tunnel,
  local replies).  Mixer keeps it for ``reporter="destination"``; ``reporter="source"``
  reports ``unknown``, as Istio's client sidecar does.
* ``destination_*``: from the endpoint's labels, namespace and service account and the
  cluster's service FQDN.  Clusters that are not a service (Istio's ``PassthroughCluster``
  and ``BlackHoleCluster``) report the authority host as ``destination_service`` and their
  own name as ``destination_service_name``, as Istio does; requests that reached no cluster
  (``NR``, bad requests) report ``unknown``.
* ``request_bytes``: request body bytes plus the request head's size.  The head is measured
  as the proxy forwarded it upstream (the received head plus ``x-forwarded-for``,
  ``x-forwarded-proto`` and ``x-request-id`` where the proxy added them, minus hop-by-hop
  headers), or, when nothing was forwarded (local replies), as the received head in HTTP/1.1
  wire form.  ``response_bytes``: body bytes sent downstream plus the response head the
  proxy wrote.  Istio's ``istio_request_bytes`` / ``istio_response_bytes`` likewise count
  headers and body (Envoy's ``request.total_size`` / ``response.total_size``).

CONNECT tunnels are not requests in this sense (Istio reports them as TCP connections) and
are not recorded here.
"""
from __future__ import annotations

from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from proxy_core.http1 import RequestHead
from proxy_core.router import RequestInfo
from proxy_core.snapshot import Cluster, Endpoint, Route, Snapshot, WeightedCluster
from proxy_core.source_identity import UNIDENTIFIED, SourceWorkload
from proxy_core.telemetry_policy import attribute_column, capture_values

SCHEMA_NAME = "raymesh.telemetry.v1"
DEFAULT_MAX_ROWS = 65536
TRUST_DOMAIN = "cluster.local"
UNKNOWN = "unknown"
# Istio's clusters for traffic to hosts outside the registry (the proxy's PASSTHROUGH_CLUSTER
# and BLACKHOLE_CLUSTER): their requests name the destination only by authority.
AUTHORITY_CLUSTERS = frozenset(("PassthroughCluster", "BlackHoleCluster"))

_DICT = pa.dictionary(pa.int32(), pa.string())
# Most of a batch is repeating dictionary indices (~128 bytes a row): LZ4 shrinks a large batch
# ~30x, so far fewer bytes cross the control socket and the object store, but costs ~1.5 ms
# per batch however small.  Readers (pa.ipc.open_stream) decompress transparently.
_COMPRESS_ROWS = 16384
_PLAIN = pa.ipc.IpcWriteOptions()
_LZ4 = pa.ipc.IpcWriteOptions(compression="lz4")

# Columns that hold one value per request, in the order ``record`` appends them after the
# dimension index.
_ROW_FIELDS = ("start_time", "response_code", "response_flags", "duration_ms", "request_bytes", "response_bytes")
# After them, per row: None, or the request attributes that metric tag overrides read
# ({column: value}, see proxy_core.telemetry_policy); drain adds them as ``attr:...`` columns.

SCHEMA = pa.schema([
    ("start_time", pa.timestamp("ms", tz="UTC")),
    ("node", _DICT),
    ("source_workload", _DICT),
    ("source_workload_namespace", _DICT),
    ("source_principal", _DICT),
    ("source_app", _DICT),
    ("source_version", _DICT),
    ("destination_workload", _DICT),
    ("destination_workload_namespace", _DICT),
    ("destination_principal", _DICT),
    ("destination_app", _DICT),
    ("destination_version", _DICT),
    ("destination_service", _DICT),
    ("destination_service_name", _DICT),
    ("destination_service_namespace", _DICT),
    ("destination_canonical_service", _DICT),
    ("destination_canonical_revision", _DICT),
    ("source_canonical_service", _DICT),
    ("source_canonical_revision", _DICT),
    ("request_protocol", _DICT),
    ("response_code", pa.int32()),
    ("grpc_response_status", _DICT),
    ("response_flags", _DICT),
    ("connection_security_policy", _DICT),
    ("route_name", _DICT),
    ("duration_ms", pa.float64()),
    ("request_bytes", pa.int64()),
    ("response_bytes", pa.int64()),
], metadata={"schema": SCHEMA_NAME})

# The dimension columns, in schema order: one tuple of these per destination.
DIMENSION_FIELDS: tuple[str, ...] = tuple(f.name for f in SCHEMA if f.name not in _ROW_FIELDS)
_STRIDE = 2 + len(_ROW_FIELDS)

MUTUAL_TLS = "mutual_tls"
NONE = "none"

_CANONICAL_NAME = "service.istio.io/canonical-name"
_CANONICAL_REVISION = "service.istio.io/canonical-revision"


def request_head_size(head: RequestHead) -> int:
    """Bytes of ``head`` in HTTP/1.1 wire form: request line, ``name: value`` lines, blank line."""
    size = len(head.method) + len(head.target) + 14  # 2 spaces, "HTTP/1.1", 2 CRLF
    for name, value in head.headers:
        size += len(name) + len(value) + 4
    return size


def principal(namespace: str, service_account: str) -> str:
    """The SPIFFE identity Citadel issues to a workload running as ``service_account``."""
    if not namespace or not service_account:
        return UNKNOWN
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"


def source_attributes(source: SourceWorkload) -> dict[str, str]:
    """The ``source_*`` columns of requests from ``source`` (Istio's unknown-peer values for
    ``UNIDENTIFIED``)."""
    return {"source_workload": source.workload, "source_workload_namespace": source.namespace,
            "source_principal": source.spiffe_id or UNKNOWN, "source_app": source.app,
            "source_version": source.version, "source_canonical_service": source.canonical_service,
            "source_canonical_revision": source.canonical_revision}


def destination_attributes(node: str, route: Route | None, wc: WeightedCluster | None, cluster: Cluster | None,
                           endpoint: Endpoint | None, authority: str, source: SourceWorkload = UNIDENTIFIED,
                           mutual_tls: bool = False, grpc_status: int | None = None) -> tuple[str, ...]:
    """The dimension row (``DIMENSION_FIELDS`` order) of requests from ``source`` that went to
    this destination, over an mTLS tunnel or not, with their gRPC status for gRPC calls."""
    cluster_name = wc.cluster if wc is not None else ""
    is_service = cluster is not None and bool(cluster.service)
    service_name = UNKNOWN
    service_namespace = UNKNOWN
    if is_service:
        service = cluster.service  # type: ignore[union-attr]
    elif cluster_name in AUTHORITY_CLUSTERS:
        service = _host(authority) or UNKNOWN
        service_name = cluster_name
    elif cluster_name.startswith("outbound|"):
        service = cluster_name.rsplit("|", 1)[1]  # a route to a cluster this snapshot lacks (NC)
    else:
        service = UNKNOWN
    if service != UNKNOWN:
        parts = service.split(".")
        if service_name == UNKNOWN:
            service_name = parts[0]
        if len(parts) > 2 and parts[2] == "svc":
            service_namespace = parts[1]
    labels = dict(endpoint.labels) if endpoint is not None else {}
    app = labels.get("app", "")
    version = labels.get("version", "")
    base = app or (service_name if is_service else "")
    workload = (f"{base}-{version}" if version else base) if endpoint is not None and base else UNKNOWN
    namespace = (endpoint.namespace if endpoint is not None else "") or service_namespace
    values = source_attributes(source)
    values.update(
        node=node or UNKNOWN,
        destination_workload=workload,
        destination_workload_namespace=namespace,
        destination_principal=principal(namespace if namespace != UNKNOWN else "",
                                        endpoint.service_account if endpoint is not None else ""),
        destination_app=app or UNKNOWN,
        destination_version=version or UNKNOWN,
        destination_service=service,
        destination_service_name=service_name,
        destination_service_namespace=service_namespace,
        destination_canonical_service=labels.get(_CANONICAL_NAME) or app or (service_name if is_service else UNKNOWN),
        destination_canonical_revision=labels.get(_CANONICAL_REVISION) or version or "latest",
        request_protocol="http" if grpc_status is None else "grpc",
        grpc_response_status="" if grpc_status is None else str(grpc_status),
        connection_security_policy=MUTUAL_TLS if mutual_tls else NONE,
        route_name=route.name if route is not None and route.name else UNKNOWN,
    )
    return tuple(values[name] for name in DIMENSION_FIELDS)


def _host(authority: str) -> str:
    """``authority`` without its port; an IPv6 literal without its brackets."""
    if authority.startswith("["):
        return authority[1:authority.find("]")] if "]" in authority else authority
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


def _dimension_columns(dims: list[tuple[str, ...]], index: pa.Array) -> dict[str, pa.Array]:
    """Each dimension column as a dictionary array over the rows that ``index`` points at.

    A column's distinct values become its dictionary; a request's code is found through
    its dimension row.  Columns that map dimension rows to codes the same way (every
    constant column, and usually the destination labels of one workload) share one
    ``take`` over the rows.
    """
    columns: dict[str, pa.Array] = {}
    taken: dict[tuple[int, ...], pa.Array] = {}
    for name, values in zip(DIMENSION_FIELDS, zip(*dims)):
        codes: dict[str, int] = {}
        mapping = tuple(codes.setdefault(v, len(codes)) for v in values)
        indices = taken.get(mapping)
        if indices is None:
            indices = taken[mapping] = pa.array(mapping, pa.int32()).take(index)
        columns[name] = pa.DictionaryArray.from_arrays(indices, pa.array(list(codes), pa.string()))
    return columns


class TelemetryRecorder:
    """A bounded buffer of request rows; ``record`` runs once per request, ``drain`` once per flush.

    Rows live in one flat list, ``2 + len(_ROW_FIELDS)`` entries per request: one ``extend``
    is cheaper than an ``append`` per column, and ``drain`` slices the columns back out with
    a stride.  When ``max_rows`` rows are buffered, further requests are counted as dropped:
    telemetry never blocks or slows a request.
    """

    __slots__ = ("max_rows", "dropped_total", "_rows", "_free", "_dropped", "_dims", "_index", "_snapshot")

    def __init__(self, max_rows: int = DEFAULT_MAX_ROWS) -> None:
        if max_rows <= 0:
            raise ValueError("max_rows must be positive")
        self.max_rows = max_rows
        self.dropped_total = 0
        self._rows: list[Any] = []
        self._free = max_rows
        self._dropped = 0
        self._dims: list[tuple[str, ...]] = []
        # destination and source key -> index into _dims; valid for one snapshot and one batch.
        self._index: dict[tuple[Any, ...], int] = {}
        self._snapshot: Snapshot | None = None

    @property
    def rows_buffered(self) -> int:
        return self.max_rows - self._free

    def record(self, snapshot: Snapshot, route: Route | None, wc: WeightedCluster | None, cluster: Cluster | None,
               endpoint: Endpoint | None, req: RequestInfo | None, start_time: float, response_code: int,
               response_flags: str, duration_ms: float, request_bytes: int, response_bytes: int,
               source: SourceWorkload = UNIDENTIFIED, mutual_tls: bool = False, grpc_status: int | None = None) -> None:
        """Buffer one finished request.  ``snapshot`` is the one the request was routed with;
        ``source`` the workload that sent it; ``mutual_tls`` whether it crossed nodes over mTLS.

        ``grpc_status`` marks a gRPC call: its ``request_protocol`` is ``grpc`` and its
        ``grpc_response_status`` the code (Istio's labels); it is part of the dimension key."""
        if self._free <= 0:
            self._dropped += 1
            self.dropped_total += 1
            return
        self._free -= 1
        if snapshot is not self._snapshot:
            # Labels of an address may change between snapshots: keys are per snapshot.
            self._snapshot = snapshot
            self._index = {}
        route_name = route.name if route is not None else None
        cluster_name = wc.cluster if wc is not None else None
        endpoint_key = endpoint.key if endpoint is not None else None
        if cluster is not None and cluster.service:
            key: tuple[Any, ...] = (route_name, cluster_name, endpoint_key, source, mutual_tls)
        else:  # the destination service, if any, is the authority the client named
            key = (route_name, cluster_name, endpoint_key, source, mutual_tls, req.authority if req is not None else "")
        if grpc_status is not None:
            key = (*key, grpc_status)
        dim = self._index.get(key)
        if dim is None:
            dim = self._index[key] = len(self._dims)
            self._dims.append(destination_attributes(snapshot.node_id, route, wc, cluster, endpoint,
                                                     req.authority if req is not None else "", source, mutual_tls,
                                                     grpc_status))
        capture = snapshot.telemetry.capture
        attrs = ({attribute_column(a): v for a, v in zip(capture, capture_values(capture, req))}
                 if capture else None)
        self._rows.extend((dim, start_time, response_code, response_flags, duration_ms, request_bytes,
                           response_bytes, attrs))

    def drain(self) -> tuple[bytes, int, int]:
        """Take everything buffered as ``(Arrow IPC stream bytes, rows, dropped since last drain)``.

        The stream holds one RecordBatch in ``SCHEMA``, plus one ``attr:...`` string column per
        request attribute the snapshot asked to capture; with nothing buffered it is ``b""``.
        """
        rows, dims, dropped = self._rows, self._dims, self._dropped
        self._rows, self._dims, self._index, self._dropped = [], [], {}, 0
        self._free = self.max_rows
        n = len(rows) // _STRIDE
        if n == 0:
            return b"", 0, dropped
        index = pa.array(rows[0::_STRIDE], pa.int32())
        columns = _dimension_columns(dims, index)
        millis = pc.multiply(pa.array(rows[1::_STRIDE], pa.float64()), 1000.0).cast(pa.int64(), safe=False)
        columns["start_time"] = millis.cast(SCHEMA.field("start_time").type)
        columns["response_code"] = pa.array(rows[2::_STRIDE], pa.int32())
        columns["response_flags"] = pa.array(rows[3::_STRIDE], pa.string()).dictionary_encode()
        columns["duration_ms"] = pa.array(rows[4::_STRIDE], pa.float64())
        columns["request_bytes"] = pa.array(rows[5::_STRIDE], pa.int64())
        columns["response_bytes"] = pa.array(rows[6::_STRIDE], pa.int64())
        schema = SCHEMA
        arrays = [columns[f.name] for f in SCHEMA]
        captured = rows[7::_STRIDE]
        names = sorted({c for attrs in captured if attrs for c in attrs})
        for name in names:
            schema = schema.append(pa.field(name, _DICT))
            arrays.append(pa.array([attrs.get(name) if attrs else None for attrs in captured],
                                   pa.string()).dictionary_encode())
        batch = pa.RecordBatch.from_arrays(arrays, schema=schema)
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, schema, options=_LZ4 if n >= _COMPRESS_ROWS else _PLAIN) as writer:
            writer.write_batch(batch)
        return sink.getvalue().to_pybytes(), n, dropped
