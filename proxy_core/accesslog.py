"""Envoy-style access log, one record per request, written in batches: JSON lines, and
optionally Parquet files rotated by row count and age.

A proxy answering tens of thousands of requests per second cannot afford a syscall or a
``json.dumps`` of a dict per request: lines are built with one f-string (strings escaped
by the C JSON encoder) and appended to a list; the list is written when it is large or
on a periodic flush.  Most string fields repeat from request to request (method, host,
route, cluster, endpoint, listener, user agent, client address), so their quoted JSON form
is remembered (``_quote``, a bounded table) instead of escaped again every time.  Field names follow Envoy's default JSON access log format
(``%START_TIME%`` -> ``start_time`` ...), so existing Envoy log tooling reads them.

The Parquet sink keeps the same fields for analytics (pyarrow, DuckDB, Spark read the
files directly).  A request only appends one tuple of its values to a list: cheaper than
one append per column, and Arrow turns the rows into columns in C++.  Conversion and the
file write happen on a background thread, so the event loop never waits for a disk; a file
is first written under a hidden temporary name and then renamed, so a reader listing
``*.parquet`` only ever sees complete files.
"""
from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from json.encoder import encode_basestring as _q  # C-accelerated, returns a quoted JSON string
from typing import Any, Callable, TextIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

_FLUSH_LINES = 512
_QUOTED_MAX = 4096          # remembered quoted strings; the table starts over when full
_QUOTED: dict[str, str] = {}


def _quote(text: str) -> str:
    """``text`` as a JSON string literal, remembered: for fields whose values repeat."""
    quoted = _QUOTED.get(text)
    if quoted is None:
        if len(_QUOTED) >= _QUOTED_MAX:
            _QUOTED.clear()
        quoted = _QUOTED[text] = _q(text)
    return quoted
# "000" .. "999": the milliseconds of start_time, without a format spec per line.
_MILLIS = tuple(f"{ms:03d}" for ms in range(1000))

_FLUSH_INTERVAL = 1.0
DEFAULT_ROTATE_ROWS = 100_000
DEFAULT_ROTATE_SECONDS = 60.0

logger = logging.getLogger(__name__)

# Column order is the JSON line's field order (and log()'s argument order).
PARQUET_SCHEMA = pa.schema([
    ("start_time", pa.timestamp("ms", tz="UTC")),
    ("method", pa.string()), ("path", pa.string()), ("protocol", pa.string()),
    ("response_code", pa.int64()), ("response_flags", pa.string()),
    ("bytes_received", pa.int64()), ("bytes_sent", pa.int64()), ("duration", pa.int64()),
    ("upstream_service_time", pa.int64()),
    ("x_forwarded_for", pa.string()), ("user_agent", pa.string()), ("request_id", pa.string()),
    ("authority", pa.string()), ("upstream_host", pa.string()), ("upstream_cluster", pa.string()),
    ("route_name", pa.string()), ("downstream_remote_address", pa.string()), ("listener", pa.string()),
    ("downstream_peer_uri_san", pa.string()), ("grpc_status", pa.int64()),
])
# A buffered row as log() appends it: start_time still in float epoch seconds.
_ROW_TYPE = pa.struct([pa.field("start_time", pa.float64()), *list(PARQUET_SCHEMA)[1:]])

Row = tuple[Any, ...]


def rows_to_table(rows: list[Row]) -> pa.Table:
    """Buffered rows as a table in ``PARQUET_SCHEMA``.

    ``start_time`` is truncated to the millisecond exactly as the JSON line does
    (whole seconds plus the truncated fraction), so both sinks agree on every row.
    """
    columns = pa.array(rows, type=_ROW_TYPE).flatten()
    t = columns[0]
    sec = pc.floor(t)
    ms = pc.add(pc.multiply(sec, 1000.0), pc.floor(pc.multiply(pc.subtract(t, sec), 1000.0)))
    start_time = ms.cast(pa.int64()).cast(PARQUET_SCHEMA.field("start_time").type)
    return pa.Table.from_arrays([start_time, *columns[1:]], schema=PARQUET_SCHEMA)


class ParquetFiles:
    """Rows waiting for the next file, and the thread that writes the files.

    A file is cut when ``rotate_rows`` rows are waiting, when the oldest waiting row is
    ``rotate_seconds`` old (checked from the access log's flush timer), and on close.
    Names are ``access-<UTC time of the cut>-<pid>-<seq>.parquet``: they sort in cut order,
    and the pid keeps proxy processes sharing one directory from overwriting each other.
    """

    __slots__ = ("directory", "rotate_rows", "rotate_seconds", "clock", "rows", "opened", "rows_dropped",
                 "_seq", "_pool", "_closed")

    def __init__(self, directory: str, rotate_rows: int = DEFAULT_ROTATE_ROWS,
                 rotate_seconds: float = DEFAULT_ROTATE_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        if rotate_rows < 1 or rotate_seconds <= 0:
            raise ValueError("rotate_rows and rotate_seconds must be positive")
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.rotate_rows = rotate_rows
        self.rotate_seconds = rotate_seconds
        self.clock = clock
        self.rows: list[Row] = []
        self.opened = 0.0          # clock() when the oldest waiting row arrived
        self.rows_dropped = 0      # rows lost to failed writes (logged)
        self._seq = 0
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="accesslog-parquet")
        self._closed = False

    def due(self) -> bool:
        """Whether the oldest waiting row has waited ``rotate_seconds``."""
        return bool(self.rows) and self.clock() - self.opened >= self.rotate_seconds

    def rotate(self) -> None:
        """Cut a file from the waiting rows; the write runs on the writer thread."""
        if not self.rows:
            return
        rows, self.rows = self.rows, []
        self._seq += 1
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        name = f"access-{stamp}-{os.getpid()}-{self._seq:06d}.parquet"
        if self._closed:  # a straggler logged after close(): no thread left to hand it to
            self._write(rows, name)
        else:
            self._pool.submit(self._write, rows, name)

    def _write(self, rows: list[Row], name: str) -> None:
        final = os.path.join(self.directory, name)
        tmp = os.path.join(self.directory, f".{name}.tmp")
        try:
            table = rows_to_table(rows)
            with open(tmp, "wb") as f:
                pq.write_table(table, f)
                f.flush()
                os.fsync(f.fileno())  # the rename must not outlive the data on a crash
            os.replace(tmp, final)
        except (OSError, pa.ArrowException):
            self.rows_dropped += len(rows)
            logger.exception("access log: dropped %d rows, writing %s failed", len(rows), final)
            try:
                os.unlink(tmp)
            except OSError:
                pass

    def close(self) -> None:
        """Write the waiting rows and wait until every file is on disk."""
        self.rotate()
        self._closed = True
        self._pool.shutdown(wait=True)


class AccessLog:
    """Buffered JSON-lines writer plus an optional Parquet sink; ``enabled=False`` makes
    ``log`` a cheap no-op.  ``clock`` (monotonic seconds) decides when a Parquet file is due."""

    __slots__ = ("sink", "enabled", "parquet", "_lines", "_timer", "_interval", "_sec", "_sec_text")

    def __init__(self, sink: TextIO | None = None, enabled: bool = True, parquet_dir: str | None = None,
                 rotate_rows: int = DEFAULT_ROTATE_ROWS, rotate_seconds: float = DEFAULT_ROTATE_SECONDS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.sink = sink if sink is not None else sys.stdout
        self.enabled = enabled
        self.parquet = ParquetFiles(parquet_dir, rotate_rows, rotate_seconds, clock) \
            if parquet_dir is not None and enabled else None
        self._lines: list[str] = []
        self._timer: asyncio.TimerHandle | None = None
        # The flush timer also checks the Parquet file's age, so it must tick at least that often.
        self._interval = _FLUSH_INTERVAL if self.parquet is None else min(_FLUSH_INTERVAL, rotate_seconds)
        self._sec = -1
        self._sec_text = ""

    def _second(self, sec: int) -> str:
        """``YYYY-MM-DDTHH:MM:SS`` of ``sec``, formatted once per second."""
        self._sec = sec
        text = self._sec_text = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
        return text

    def log(self, start_time: float, method: str, path: str, protocol: str, response_code: int,
            response_flags: str, bytes_received: int, bytes_sent: int, duration_ms: int,
            upstream_service_time: int | None, x_forwarded_for: str | None, user_agent: str | None,
            request_id: str | None, authority: str, upstream_host: str | None, upstream_cluster: str | None,
            route_name: str | None, downstream_remote_address: str, listener: str,
            downstream_peer_uri_san: str | None = None, grpc_status: int | None = None) -> None:
        """Append one request's line; ``None`` values render as JSON null (Envoy's ``-``).

        ``downstream_peer_uri_san`` is the mTLS peer's SPIFFE id on the inbound listener
        (Envoy's ``%DOWNSTREAM_PEER_URI_SAN%``); ``grpc_status`` the gRPC call's status code
        (Envoy's ``%GRPC_STATUS_NUMBER%``), null for other requests."""
        if not self.enabled:
            return
        # Everything inline (no helper call per field): this runs once per request.
        sec = int(start_time)
        day_time = self._sec_text if sec == self._sec else self._second(sec)
        self._lines.append(
            f'{{"start_time":"{day_time}.{_MILLIS[int((start_time - sec) * 1000)]}Z","method":{_quote(method)},'
            f'"path":{_quote(path)},"protocol":"{protocol}","response_code":{response_code},'
            f'"response_flags":"{response_flags}","bytes_received":{bytes_received},"bytes_sent":{bytes_sent},'
            f'"duration":{duration_ms},'
            f'"upstream_service_time":{"null" if upstream_service_time is None else upstream_service_time},'
            f'"x_forwarded_for":{"null" if x_forwarded_for is None else _q(x_forwarded_for)},'
            f'"user_agent":{"null" if user_agent is None else _quote(user_agent)},'
            f'"request_id":{"null" if request_id is None else _q(request_id)},"authority":{_quote(authority)},'
            f'"upstream_host":{"null" if upstream_host is None else _quote(upstream_host)},'
            f'"upstream_cluster":{"null" if upstream_cluster is None else _quote(upstream_cluster)},'
            f'"route_name":{"null" if route_name is None else _quote(route_name)},'
            f'"downstream_remote_address":{_quote(downstream_remote_address)},"listener":{_quote(listener)},'
            f'"downstream_peer_uri_san":{"null" if downstream_peer_uri_san is None else _quote(downstream_peer_uri_san)},'
            f'"grpc_status":{"null" if grpc_status is None else grpc_status}}}\n')
        parquet = self.parquet
        if parquet is not None:
            rows = parquet.rows
            if not rows:
                parquet.opened = parquet.clock()
            rows.append((start_time, method, path, protocol, response_code, response_flags, bytes_received,
                         bytes_sent, duration_ms, upstream_service_time, x_forwarded_for, user_agent, request_id,
                         authority, upstream_host, upstream_cluster, route_name, downstream_remote_address,
                         listener, downstream_peer_uri_san, grpc_status))
            if len(rows) >= parquet.rotate_rows:
                parquet.rotate()
        if len(self._lines) >= _FLUSH_LINES:
            self.flush()
        elif self._timer is None:
            self._arm()

    def _arm(self) -> None:
        try:
            self._timer = asyncio.get_running_loop().call_later(self._interval, self._on_timer)
        except RuntimeError:  # no loop: flushed by the next large batch or close()
            pass

    def _on_timer(self) -> None:
        self._timer = None
        self.flush()
        parquet = self.parquet
        if parquet is not None and parquet.rows:
            if parquet.due():
                parquet.rotate()
            else:
                self._arm()

    def flush(self) -> None:
        """Write the buffered JSON lines (Parquet files follow their own rotation)."""
        if not self._lines:
            return
        text = "".join(self._lines)
        self._lines.clear()
        self.sink.write(text)
        self.sink.flush()

    def close(self) -> None:
        """Flush both sinks; returns once the last Parquet file is renamed into place."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.flush()
        if self.parquet is not None:
            self.parquet.close()
