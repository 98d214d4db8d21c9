"""Distributed tracing at the proxy: W3C Trace Context and B3 propagation, sampling, one span per hop.

What Envoy's tracer does for Istio, without a collector on the request path:

* **Continue or start.**  A request carrying ``traceparent`` (W3C), or B3 (``x-b3-traceid`` /
  ``x-b3-spanid`` / ``x-b3-sampled``, or the single ``b3`` header) continues that trace: this
  hop gets a new span id whose parent is the caller's span.  A request without one starts a
  trace when the dice say so, at the sampling rate (percent: the destination's Telemetry
  ``randomSamplingPercentage``, else the snapshot's mesh-wide ``tracing.sampling``, else the
  proxy's default, 1% like Istio's ``meshConfig.defaultConfig.tracing.sampling``); a
  destination with ``disableSpanReporting`` still propagates the decision but writes no span.
* **Follow the caller's decision.**  An incoming sampled flag (W3C ``01``/``00``, B3
  ``1``/``0``/``d``) is obeyed: a trace the caller sampled is recorded here too, one it did
  not is only propagated.  Only a context without a decision (B3 ids without a flag) is
  sampled at this proxy's rate.
* **Propagate both formats.**  A traced request goes upstream with ``traceparent`` and the B3
  headers (``x-b3-traceid``, ``x-b3-spanid``, ``x-b3-parentspanid``, ``x-b3-sampled``) naming
  this hop's span, replacing the incoming ones; ``tracestate`` passes unchanged.  Istio's
  proxies speak B3 and W3C, so applications instrumented for either keep one trace.
* **Record.**  A sampled span is written, when the request completes, as one JSON line in the
  Zipkin v2 span format (what Envoy's Zipkin tracer sends), and/or handed to a
  ``proxy_core.zipkin.ZipkinExporter`` that POSTs batches to a collector: ids, ``name``
  ``<service>:<port>/*`` as Istio names the outbound operation (the authority's when the
  destination is not a service), ``kind`` ``CLIENT``, ``timestamp``/``duration`` in
  microseconds, and Envoy's tags (``http.status_code``, ``response_flags``,
  ``upstream_cluster``, ``node_id``, ``guid:x-request-id``, ``error`` for 5xx ...).

Off the request path's cost: without a tracer the proxy forwards trace headers untouched and
does nothing else.  With one, a request with no trace headers costs three dict lookups and a
random draw; unsampled requests get no headers and no span.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from typing import Any, TextIO

from proxy_core.telemetry_policy import report_spans, sampling_rate

DEFAULT_SAMPLING = 1.0   # percent, Istio's default
_HEX = frozenset("0123456789abcdef")
_ZERO_TRACE = "0" * 32
_ZERO_SPAN = "0" * 16
# Incoming trace headers that a traced hop replaces with its own.
TRACE_HEADERS = frozenset((b"traceparent", b"b3", b"x-b3-traceid", b"x-b3-spanid", b"x-b3-parentspanid",
                           b"x-b3-sampled", b"x-b3-flags"))


@dataclass(slots=True)
class Span:
    """This hop's span: ``parent_id`` is the caller's span ("" for a trace started here)."""

    trace_id: str        # 32 lowercase hex digits
    span_id: str         # 16 lowercase hex digits
    parent_id: str
    sampled: bool


def _is_hex(value: str, size: int) -> bool:
    return len(value) == size and set(value) <= _HEX


def _trace_id(value: str) -> str | None:
    """A B3 trace id (64 or 128 bits) as 32 hex digits; None when malformed or all zero."""
    value = value.lower()
    if len(value) == 16:
        value = "0" * 16 + value
    return value if _is_hex(value, 32) and value != _ZERO_TRACE else None


def _span_id(value: str) -> str | None:
    value = value.lower()
    return value if _is_hex(value, 16) and value != _ZERO_SPAN else None


def _b3_sampled(flag: str | None) -> bool | None:
    if flag is None:
        return None
    flag = flag.strip().lower()
    if flag in ("1", "d", "true"):
        return True
    if flag in ("0", "false"):
        return False
    return None


def parse_context(headers: dict[str, str]) -> tuple[str, str, bool | None] | None:
    """The caller's ``(trace id, span id, sampled or None)`` from W3C or B3 headers, W3C first;
    None when the request carries no valid context (a malformed one restarts the trace)."""
    tp = headers.get("traceparent")
    if tp is not None:
        parts = tp.strip().lower().split("-")
        if (len(parts) >= 4 and _is_hex(parts[0], 2) and parts[0] != "ff" and _is_hex(parts[1], 32)
                and parts[1] != _ZERO_TRACE and _is_hex(parts[2], 16) and parts[2] != _ZERO_SPAN
                and _is_hex(parts[3], 2) and (parts[0] != "00" or len(parts) == 4)):
            return parts[1], parts[2], bool(int(parts[3], 16) & 1)
    single = headers.get("b3")
    if single is not None:
        parts = single.strip().split("-")
        if len(parts) >= 2:
            trace, span = _trace_id(parts[0]), _span_id(parts[1])
            if trace is not None and span is not None:
                return trace, span, _b3_sampled(parts[2] if len(parts) > 2 else None)
    trace_hdr = headers.get("x-b3-traceid")
    if trace_hdr is not None:
        trace, span = _trace_id(trace_hdr), _span_id(headers.get("x-b3-spanid", ""))
        if trace is not None and span is not None:
            sampled = True if headers.get("x-b3-flags") == "1" else _b3_sampled(headers.get("x-b3-sampled"))
            return trace, span, sampled
    return None


def propagation_headers(span: Span) -> list[tuple[bytes, bytes]]:
    """The W3C and B3 headers that name ``span`` to the next hop."""
    flag = b"1" if span.sampled else b"0"
    trace, sid = span.trace_id.encode(), span.span_id.encode()
    out = [(b"traceparent", b"00-" + trace + b"-" + sid + (b"-01" if span.sampled else b"-00")),
           (b"x-b3-traceid", trace), (b"x-b3-spanid", sid)]
    if span.parent_id:
        out.append((b"x-b3-parentspanid", span.parent_id.encode()))
    out.append((b"x-b3-sampled", flag))
    return out


class Tracer:
    """Sampling decisions, span ids and where spans go: a JSON-lines ``sink`` (its owner opens
    and closes it; each span is flushed as written, so a reader sees it at once) and/or a
    collector ``exporter`` (``proxy_core.zipkin.ZipkinExporter``)."""

    __slots__ = ("sink", "exporter", "sampling", "rng", "spans_written")

    def __init__(self, sink: TextIO | None, sampling: float = DEFAULT_SAMPLING, rng: random.Random | None = None,
                 exporter: Any = None) -> None:
        if not 0.0 <= sampling <= 100.0:
            raise ValueError(f"trace sampling must be a percentage in [0, 100], got {sampling}")
        if sink is None and exporter is None:
            raise ValueError("a tracer needs a span file or a collector to report to")
        self.sink = sink
        self.exporter = exporter
        self.sampling = sampling
        self.rng = rng or random.Random()
        self.spans_written = 0

    def _sample(self, rate: float | None) -> bool:
        rate = self.sampling if rate is None else rate
        return rate >= 100.0 or (rate > 0.0 and self.rng.random() * 100.0 < rate)

    def start(self, headers: dict[str, str], rate: float | None = None) -> Span | None:
        """This hop's span for a request with ``headers``; None when no trace goes on.

        ``rate`` is the snapshot's sampling percentage, None for the proxy's default."""
        if "traceparent" not in headers and "b3" not in headers and "x-b3-traceid" not in headers:
            if not self._sample(rate):
                return None
            return Span(f"{self.rng.getrandbits(128):032x}", self._new_span_id(), "", True)
        context = parse_context(headers)
        if context is None:   # no usable ids; a lone ``b3: 0|1|d`` is still the caller's decision
            single = headers.get("b3", "-")
            decision = None if "-" in single else _b3_sampled(single)
            sampled = self._sample(rate) if decision is None else decision
            return Span(f"{self.rng.getrandbits(128):032x}", self._new_span_id(), "", True) if sampled else None
        trace, parent, sampled = context
        return Span(trace, self._new_span_id(), parent, self._sample(rate) if sampled is None else sampled)

    def _new_span_id(self) -> str:
        while True:
            sid = self.rng.getrandbits(64)
            if sid:
                return f"{sid:016x}"

    def record(self, span: Span, node_id: str, ex: Any, duration_ms: float, response_flags: str) -> None:
        """Report ``span`` for the finished exchange ``ex`` (``server.Exchange``) as a Zipkin v2 span."""
        req = ex.req
        cluster = ex.cluster
        status = ex.status
        authority = req.authority if req is not None else ""
        if cluster is not None and cluster.service:
            name = f"{cluster.service}:{cluster.port}/*"
        else:
            name = f"{authority or '-'}/*"
        tags = {"component": "proxy", "node_id": node_id,
                "http.method": req.method if req is not None else ex.head.method.decode("latin-1"),
                "http.url": f"http://{authority}{req.path}" if req is not None else "",
                "http.protocol": f"HTTP/{ex.head.version}",
                "http.status_code": str(status), "response_flags": response_flags,
                "upstream_cluster": ex.wc.cluster if ex.wc is not None else "-",
                "guid:x-request-id": ex.request_id or "",
                "request_size": str(ex.bytes_received), "response_size": str(ex.bytes_sent)}
        if ex.route is not None and ex.route.name:
            tags["route_name"] = ex.route.name
        if ex.endpoint is not None:
            tags["upstream_address"] = ex.endpoint.key
        if status >= 500 or status == 0:
            tags["error"] = "true"
        doc: dict[str, Any] = {"traceId": span.trace_id, "id": span.span_id, "name": name, "kind": "CLIENT",
                               "timestamp": int(ex.t_wall * 1_000_000), "duration": max(1, int(duration_ms * 1000)),
                               "localEndpoint": {"serviceName": node_id or "raymesh"}, "tags": tags}
        if span.parent_id:
            doc["parentId"] = span.parent_id
        if self.sink is not None:
            self.sink.write(json.dumps(doc, separators=(",", ":")) + "\n")
            self.sink.flush()
        if self.exporter is not None:
            self.exporter.add(doc)
        self.spans_written += 1


# -- the two hooks of server.Exchange ------------------------------------------------------------


def trace_upstream(tracer: Tracer, ex: Any, out: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """Decide this hop's span (kept on ``ex.span``) and return the upstream headers ``out`` with
    its propagation headers in place of the caller's; ``out`` itself when nothing is traced."""
    req = ex.req
    span = tracer.start(req.headers if req is not None else {}, sampling_rate(ex))
    ex.span = span
    if span is None:
        return out
    return [h for h in out if h[0] not in TRACE_HEADERS] + propagation_headers(span)


def trace_finished(tracer: Tracer, ex: Any, duration_ms: float, response_flags: str) -> None:
    """Record the span of a completed exchange; a request answered by the proxy itself (no
    upstream head was built) gets its sampling decision here."""
    if ex.head.method == b"CONNECT":
        return
    span = ex.span
    if span is None and not ex.up_head:
        req = ex.req
        span = tracer.start(req.headers if req is not None else {}, sampling_rate(ex))
    if span is not None and span.sampled and report_spans(ex):
        tracer.record(span, ex.state.snapshot.node_id, ex, duration_ms, response_flags)

