"""Spans to a tracing backend: batches POSTed to a Zipkin v2 collector.

Istio's proxies report spans to Zipkin's HTTP API (``/api/v2/spans``), which Zipkin, Jaeger's
collector, Grafana Tempo and the OpenTelemetry Collector's ``zipkin`` receiver all accept.
``ZipkinExporter`` does the same for the spans ``proxy_core.tracing`` records, off the request
path: a finished span is appended to a buffer; the buffer leaves as one JSON array per
``FLUSH_INTERVAL`` (or sooner once ``BATCH`` spans wait), on its own connection, so a slow or
absent collector never delays a request.

Nothing grows without bound: at most ``max_buffered`` spans wait (later ones are dropped and
counted), one POST is in flight at a time, and a POST that fails or takes longer than
``timeout`` drops its batch (counted, logged at most once a minute): spans are telemetry,
not data to retry forever.
"""
from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("proxy_core.zipkin")

FLUSH_INTERVAL = 1.0      # seconds between batches
BATCH = 500               # spans that start a batch before the interval is up
MAX_BUFFERED = 10_000     # spans waiting at most; more are dropped
TIMEOUT = 5.0             # seconds a POST may take
_LOG_EVERY = 60.0         # seconds between two warnings about a failing collector


class ZipkinExporter:
    """Buffers span documents (Zipkin v2 dicts) and POSTs them to ``url`` in batches."""

    def __init__(self, url: str, *, max_buffered: int = MAX_BUFFERED, interval: float = FLUSH_INTERVAL,
                 timeout: float = TIMEOUT) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"Zipkin collector URL must be http(s)://host[:port]/path, got {url!r}")
        self.url = url
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.tls = ssl.create_default_context() if parts.scheme == "https" else None
        self.path = (parts.path or "/api/v2/spans") + (f"?{parts.query}" if parts.query else "")
        self.authority = parts.netloc
        self.max_buffered = max_buffered
        self.interval = interval
        self.timeout = timeout
        self._spans: list[dict[str, Any]] = []
        self._task: asyncio.Task[None] | None = None   # the POST in flight
        self._timer: asyncio.TimerHandle | None = None
        self._last_warning = float("-inf")
        self.exported = 0          # spans the collector accepted (2xx)
        self.dropped = 0           # spans lost: buffer full, or their batch failed
        self.failed_batches = 0

    def add(self, span: dict[str, Any]) -> None:
        """Queue one span; called from the event loop when a traced request completes."""
        if len(self._spans) >= self.max_buffered:
            self.dropped += 1
            return
        self._spans.append(span)
        if len(self._spans) >= BATCH and self._task is None:
            self._send()
        elif self._timer is None and self._task is None:
            self._timer = asyncio.get_running_loop().call_later(self.interval, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._spans and self._task is None:
            self._send()

    def _send(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch = self._spans[:BATCH]
        del self._spans[:BATCH]
        self._task = asyncio.get_running_loop().create_task(self._post(batch))
        self._task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._task = None
        if self._spans:   # what queued meanwhile leaves after the interval (or at once when a batch is full)
            if len(self._spans) >= BATCH:
                self._send()
            else:
                self._timer = asyncio.get_running_loop().call_later(self.interval, self._on_timer)

    async def _post(self, batch: list[dict[str, Any]]) -> None:
        body = json.dumps(batch, separators=(",", ":")).encode()
        head = (f"POST {self.path} HTTP/1.1\r\nhost: {self.authority}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\nuser-agent: raymesh-proxy\r\n\r\n").encode()
        writer = None
        try:
            async with asyncio.timeout(self.timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.tls)
                writer.write(head + body)
                status_line = await reader.readline()
            parts = status_line.split()
            status = int(parts[1]) if len(parts) >= 2 and parts[1].isdigit() else 0
            if not 200 <= status < 300:
                raise ConnectionError(f"collector answered {status_line.decode(errors='replace').strip() or 'nothing'}")
            self.exported += len(batch)
        except (OSError, TimeoutError, ConnectionError, ValueError) as exc:
            self.dropped += len(batch)
            self.failed_batches += 1
            now = time.monotonic()
            if now - self._last_warning >= _LOG_EVERY:
                self._last_warning = now
                log.warning("zipkin: %d spans dropped, POST %s failed: %s", len(batch), self.url, exc)
        finally:
            if writer is not None:
                writer.close()

    async def close(self) -> None:
        """Send what is buffered (one last try each), then stop."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        while self._spans:
            batch = self._spans[:BATCH]
            del self._spans[:BATCH]
            await self._post(batch)

    def stats(self) -> dict[str, Any]:
        return {"url": self.url, "exported": self.exported, "dropped": self.dropped,
                "failed_batches": self.failed_batches, "buffered": len(self._spans)}
