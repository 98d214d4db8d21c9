"""Global rate limits, Mixer side: per-window counters and the leases granted from them.

Proxies never ask Mixer whether one request may pass.  They ask, ahead of need, for a
*lease*: a number of tokens of one counter's current (or next) fixed window, sized by their
recent demand (see ``proxy_core.quota``).  The counter's owner -- one Mixer replica, chosen
by ``owner_index`` -- keeps how many tokens of the window it has granted and never grants
beyond the limit, so the leases of all proxies together never exceed it.  Requests a proxy
allowed on credit are reported as ``debt`` and counted as granted too.

Windows are fixed and aligned to the epoch (window ``n`` of a 60 s unit is
``[60n, 60n + 60)`` in wall-clock seconds), as in Envoy's rate limit service, so every
replica and proxy agrees on them without coordination.  A lease tells the proxy how long
it is valid in *relative* seconds, which the proxy turns into its own monotonic clock.

Every grant is written through to the shared store (Ray's GCS KV; any object with
``get``/``put``/``delete``), and the owner takes the larger of its own count and the
stored one before granting: a restarted replica, or the replica a counter fails over to,
continues the window where the last owner left it instead of starting from zero.
"""
from __future__ import annotations

import hashlib
import math
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

__all__ = ["QuotaLedger", "owner_index", "window_of", "UNITS"]

UNITS = {"second": 1.0, "minute": 60.0, "hour": 3600.0, "day": 86400.0}
KEY_PREFIX = "quota/"


class QuotaStore(Protocol):
    def get(self, key: str) -> bytes | None: ...
    def put(self, key: str, value: bytes) -> None: ...
    def delete(self, key: str) -> None: ...


def owner_index(key: str, replicas: int) -> int:
    """The replica that owns counter ``key`` among ``replicas`` live ones (callers fail over
    to the following indexes, wrapping around)."""
    return zlib.crc32(key.encode()) % replicas


def window_of(now: float, unit: float) -> int:
    return math.floor(now / unit)


@dataclass(slots=True)
class _Window:
    ends: float                       # wall-clock end of the window
    granted: int = 0
    clients: set[str] = field(default_factory=set)


class QuotaLedger:
    """The counters this replica owns; thread-safe (Mixer serves leases on a thread of their own)."""

    def __init__(self, store: QuotaStore | None = None, clock: Callable[[], float] = time.time) -> None:
        self._store = store
        self._clock = clock
        self._windows: dict[tuple[str, int], _Window] = {}
        self._lock = threading.Lock()
        self.counts = {"asks": 0, "granted": 0, "debt": 0, "denied_asks": 0}

    def lease(self, client: str, asks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Grant one lease per ask (``key``, ``limit``, ``unit`` seconds, ``want``, ``debt``,
        ``next``); a grant of 0 tokens with ``remaining`` 0 tells the proxy the window is spent."""
        now = self._clock()
        with self._lock:
            self._forget(now)
            return [self._grant(client, ask, now) for ask in asks]

    def _grant(self, client: str, ask: dict[str, Any], now: float) -> dict[str, Any]:
        key, limit, unit = str(ask["key"]), int(ask["limit"]), float(ask["unit"])
        window = window_of(now, unit) + (1 if ask.get("next") else 0)
        state = self._window(key, window, (window + 1) * unit)
        state.clients.add(client)
        state.granted += max(0, int(ask.get("debt", 0)))
        remaining = max(0, limit - state.granted)
        # Leave room for the other proxies: those that asked in this window, or in the one before
        # (the first asker of a window would otherwise get all of it).
        before = self._windows.get((key, window - 1))
        clients = max(len(state.clients), len(before.clients) if before is not None else 0)
        share = math.ceil(remaining / clients)
        tokens = max(0, min(int(ask.get("want", 1)), remaining, share))
        state.granted += tokens
        self._persist(key, window, state.granted)
        self.counts["asks"] += 1
        self.counts["granted"] += tokens
        self.counts["debt"] += max(0, int(ask.get("debt", 0)))
        if tokens == 0:
            self.counts["denied_asks"] += 1
        start = window * unit
        return {"key": key, "window": window, "tokens": tokens, "remaining": limit - state.granted,
                "starts_in": max(0.0, start - now), "expires_in": start + unit - now, "next": bool(ask.get("next"))}

    def granted(self, key: str, unit: float, now: float | None = None) -> int:
        """Tokens granted so far in the window of ``now`` (for tests and ``stats``)."""
        window = window_of(self._clock() if now is None else now, unit)
        with self._lock:
            state = self._windows.get((key, window))
            return state.granted if state is not None else 0

    def _window(self, key: str, window: int, ends: float) -> _Window:
        state = self._windows.get((key, window))
        if state is None:
            state = self._windows[(key, window)] = _Window(ends)
        stored = self._load(key, window)
        if stored > state.granted:
            state.granted = stored
        return state

    def _forget(self, now: float) -> None:
        """Drop counters of windows that have ended, once there are many (stored copies are
        deleted by the writes two windows on)."""
        if len(self._windows) >= 1024:
            for k in [k for k, w in self._windows.items() if w.ends <= now]:
                del self._windows[k]

    @staticmethod
    def _store_key(key: str, window: int) -> str:
        return f"{KEY_PREFIX}{hashlib.sha1(key.encode()).hexdigest()[:24]}/{window}"

    def _load(self, key: str, window: int) -> int:
        if self._store is None:
            return 0
        raw = self._store.get(self._store_key(key, window))
        return int(raw) if raw else 0

    def _persist(self, key: str, window: int, granted: int) -> None:
        if self._store is None:
            return
        self._store.put(self._store_key(key, window), str(granted).encode())
        self._store.delete(self._store_key(key, window - 2))
