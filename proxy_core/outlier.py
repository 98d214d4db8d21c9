"""Outlier detection: Envoy's passive health checking, as Istio's ``outlierDetection`` sets it.

One ``OutlierDetector`` per cluster counts, per endpoint, consecutive failures of the kinds
Envoy tracks, and ejects an endpoint the moment one of its counters reaches its threshold:

==================================  ==============================================================
counter                             what increments it (any other result resets it)
==================================  ==============================================================
``consecutive_5xx``                 a 5xx response; unless split, also a local-origin failure
``consecutive_gateway_errors``      502, 503, 504; unless split, also a local-origin failure
``consecutive_local_origin_...``    with split on only: connect failure, reset, per-try timeout
==================================  ==============================================================

An ejection lasts ``base_ejection_time * times ejected``, at most
``max(max_ejection_time, base_ejection_time)``; an endpoint is let back at the first
``interval`` sweep after its time is up, and each ``base_ejection_time`` it then stays
in rotation lowers its multiplier by one (Envoy 1.20+).  An endpoint is ejected only while
``100 * (ejected + 1) / endpoints <= max_ejection_percent``.

Nothing here runs on a timer: ``sweep`` is called by the balancer before a pick and does
work at most once per interval (the clock is injected, so tests never sleep).
``version`` changes whenever the ejected set does; the health-aware balancer
(``proxy_core.locality``) rebuilds its host sets only then.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from proxy_core.snapshot import Endpoint, OutlierDetection

Clock = Callable[[], float]

LOCAL_ORIGIN_FAILURES = frozenset({"connect-failure", "reset", "timeout", "refused-stream"})
_GATEWAY = frozenset({502, 503, 504})


@dataclass(slots=True)
class _Host:
    """One endpoint's counters and ejection state."""

    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    consecutive_local: int = 0
    ejected_until: float | None = None   # None: in rotation
    ejections: int = 0                    # Envoy's num_ejections: the ejection time multiplier
    healthy_since: float = 0.0            # when it last came back (or its multiplier last dropped)


class OutlierDetector:
    """Per-cluster ejection state; survives config pushes while the cluster's settings stay the same."""

    __slots__ = ("config", "clock", "hosts", "version", "ejections_total", "by_reason", "endpoint_count",
                 "_next_sweep")

    def __init__(self, config: OutlierDetection, clock: Clock) -> None:
        self.config = config
        self.clock = clock
        self.hosts: dict[str, _Host] = {}
        self.version = 0
        self.ejections_total = 0
        self.by_reason: dict[str, int] = {}
        self.endpoint_count = 0     # set by ``track``: the base of max_ejection_percent
        self._next_sweep = clock() + config.interval

    # -- results of attempts ------------------------------------------------------------------

    def report_status(self, ep: Endpoint, status: int) -> None:
        """An upstream answered ``status``."""
        host = self._host(ep.key)
        host.consecutive_local = 0   # the endpoint was reached: a local-origin success
        if status < 500:
            host.consecutive_5xx = host.consecutive_gateway = 0
            return
        self._count_5xx(ep.key, host, status in _GATEWAY)

    def report_failure(self, ep: Endpoint, kind: str) -> None:
        """An attempt failed without a response (``kind`` as in ``policy.retry_on_failure``)."""
        host = self._host(ep.key)
        cfg = self.config
        if cfg.split_external_local_origin_errors:
            host.consecutive_local += 1
            if cfg.consecutive_local_origin_failures and host.consecutive_local >= cfg.consecutive_local_origin_failures:
                host.consecutive_local = 0
                self._eject(ep.key, host, "consecutive_local_origin_failure")
            return
        self._count_5xx(ep.key, host, True)   # Envoy maps a local-origin failure to 503

    def _count_5xx(self, key: str, host: _Host, gateway: bool) -> None:
        cfg = self.config
        host.consecutive_5xx += 1
        host.consecutive_gateway = host.consecutive_gateway + 1 if gateway else 0
        if cfg.consecutive_gateway_errors and host.consecutive_gateway >= cfg.consecutive_gateway_errors:
            host.consecutive_gateway = host.consecutive_5xx = 0
            self._eject(key, host, "consecutive_gateway_failure")
        elif cfg.consecutive_5xx and host.consecutive_5xx >= cfg.consecutive_5xx:
            host.consecutive_gateway = host.consecutive_5xx = 0
            self._eject(key, host, "consecutive_5xx")

    def _host(self, key: str) -> _Host:
        host = self.hosts.get(key)
        if host is None:
            host = self.hosts[key] = _Host()
        return host

    # -- ejection -------------------------------------------------------------------------------

    def _eject(self, key: str, host: _Host, reason: str) -> None:
        if host.ejected_until is not None:
            return
        total = self.endpoint_count or 1
        if 100.0 * (self.ejections_active + 1) / total > self.config.max_ejection_percent:
            self.by_reason["overflow"] = self.by_reason.get("overflow", 0) + 1
            return
        cfg = self.config
        host.ejections += 1
        host.ejected_until = self.clock() + min(cfg.base_ejection_time * host.ejections,
                                                max(cfg.max_ejection_time, cfg.base_ejection_time))
        self.ejections_total += 1
        self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
        self.version += 1

    def track(self, endpoints: tuple[Endpoint, ...]) -> None:
        """Follow the cluster's current endpoints: forget the state of those that left."""
        keys = {ep.key for ep in endpoints}
        for key in [k for k in self.hosts if k not in keys]:
            if self.hosts.pop(key).ejected_until is not None:
                self.version += 1
        self.endpoint_count = len(keys)

    def sweep(self) -> None:
        """Let back endpoints whose ejection time is up; at most once per ``interval``."""
        now = self.clock()
        if now < self._next_sweep:
            return
        self._next_sweep = now + self.config.interval
        base = self.config.base_ejection_time
        for host in self.hosts.values():
            until = host.ejected_until
            if until is not None:
                if now >= until:
                    host.ejected_until = None
                    host.healthy_since = now
                    host.consecutive_5xx = host.consecutive_gateway = host.consecutive_local = 0
                    self.version += 1
            elif host.ejections and now >= host.healthy_since + base:
                host.ejections -= 1
                host.healthy_since = now

    @property
    def ejections_active(self) -> int:
        return sum(1 for h in self.hosts.values() if h.ejected_until is not None)

    def ejected(self) -> frozenset[str]:
        """Keys of the endpoints out of rotation now."""
        return frozenset(k for k, h in self.hosts.items() if h.ejected_until is not None)

    def stats(self) -> dict[str, object]:
        return {"ejections_active": self.ejections_active, "ejections_total": self.ejections_total,
                "ejections_by_reason": dict(self.by_reason), "ejected": sorted(self.ejected())}
