"""HTTP caching at the client-side proxy: a shared cache with the semantics of RFC 9111.

A destination service with a CachePolicy (``snapshot.caches``) gets one ``HttpCache``: entries
keyed by the upstream request's authority and path (what the origin was asked), with the
request headers the response ``Vary``\\ s on as a secondary key, kept in LRU order under
``max_bytes``.  The module is sans-IO apart from ``CacheFilter``, which sits between an
``Exchange`` and its upstream response parser (Envoy's cache filter, ahead of the router):

* a ``GET`` (or ``HEAD``, served from the ``GET`` entry) whose entry is fresh is answered
  from the cache with an ``Age`` header and response flag ``RFCF``; a client's own
  ``If-None-Match`` / ``If-Modified-Since`` that the entry satisfies gets ``304``;
* a stale entry, or one that must be revalidated (response ``no-cache``, request ``no-cache``
  or ``max-age=0``), sends a conditional request upstream (``If-None-Match`` /
  ``If-Modified-Since``); a ``304`` refreshes the entry's headers and freshness and the
  stored body is served (``RFCF``); any other answer replaces the entry or passes through;
* a miss streams the response to the client while copying a body of at most
  ``max_entry_bytes`` into a new entry, stored when the response ends;
* a non-error response to an unsafe method invalidates the URL and its ``Location`` /
  ``Content-Location`` on the same authority (RFC 9111 4.4).

Not stored (RFC 9111 3 for a shared cache, plus choices that keep users' data apart):
``no-store`` either way, ``private``, ``Vary: *``, ``Set-Cookie``, status codes outside
``STORABLE_STATUSES``, partial content (requests with ``Range``), responses with trailers,
responses to requests with ``Authorization`` unless ``public``, ``s-maxage`` or
``must-revalidate`` allow it, and responses with neither a freshness lifetime nor a validator.
Freshness follows RFC 9111 4.2: ``s-maxage``, then ``max-age``, then ``Expires - Date``, then
the policy's ``default_ttl`` as the heuristic (off when 0) for heuristically cacheable codes;
age is the ``corrected_initial_age + resident_time`` of 4.2.3, from ``Date``, ``Age`` and the
request and response times.  Request directives ``max-age``, ``min-fresh``, ``max-stale``
(never past ``must-revalidate``), ``no-cache``, ``no-store`` and ``only-if-cached`` (``504``
when nothing usable is stored) are honoured; ``Pragma: no-cache`` counts as ``no-cache`` when
there is no ``Cache-Control``.

A request bypasses the cache when the destination has an AuthorizationPolicy that is decided
per endpoint (a stored answer has no endpoint to check), and for WebSocket upgrades.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass
from email.utils import formatdate, parsedate_to_datetime
from typing import Any, Callable, Mapping

from proxy_core import flags
from proxy_core.http1 import HeaderList, ResponseHead
from proxy_core.policy import HOP_BY_HOP_BYTES, retry_on_status
from proxy_core.snapshot import CacheSpec, Snapshot

Clock = Callable[[], float]

# Final status codes a shared cache understands and may store (RFC 9110 15.1: heuristically
# cacheable codes, plus the redirects whose lifetime the origin states).  5xx never: a retry
# policy might want another try at the origin.
STORABLE_STATUSES = frozenset({200, 203, 204, 300, 301, 302, 307, 308, 404, 405, 410, 414})
HEURISTIC_STATUSES = frozenset({200, 203, 204, 300, 301, 308, 404, 405, 410, 414})
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
# Headers a stored entry never keeps: framing is the proxy's, Age is recomputed on every use.
_NOT_STORED = HOP_BY_HOP_BYTES | {b"content-length", b"age"}
# Headers of a 304 that must not overwrite the stored ones (RFC 9111 4.3.4).
_NOT_UPDATED = _NOT_STORED | {b"content-type", b"content-encoding", b"content-range"}
# Headers a 304 made from an entry carries (RFC 9110 15.4.5).
_NOT_MODIFIED_HEADERS = frozenset({b"cache-control", b"content-location", b"date", b"etag", b"expires", b"vary"})
_ENTRY_OVERHEAD = 128   # bytes counted per entry beyond its body and headers

Directives = dict[str, "str | None"]


# -- header parsing --------------------------------------------------------------------------


def parse_cache_control(value: str | None) -> Directives:
    """``max-age=60, no-cache="set-cookie", private`` -> {"max-age": "60", "no-cache": "set-cookie", ...}.

    Directive names are case-insensitive; the first occurrence of a duplicate wins.
    """
    out: Directives = {}
    if not value:
        return out
    for part in _split_list(value):
        name, eq, arg = part.partition("=")
        name = name.strip().lower()
        if name and name not in out:
            arg = arg.strip()
            out[name] = (arg[1:-1] if len(arg) >= 2 and arg[0] == arg[-1] == '"' else arg) if eq else None
    return out


def _split_list(value: str) -> list[str]:
    """Split on commas outside quoted strings."""
    parts, buf, quoted = [], [], False
    for ch in value:
        if ch == '"':
            quoted = not quoted
        if ch == "," and not quoted:
            parts.append("".join(buf))
            buf = []
        else:
            buf.append(ch)
    parts.append("".join(buf))
    return [p.strip() for p in parts if p.strip()]


def _seconds(directives: Directives, name: str) -> int | None:
    """A delta-seconds directive; an invalid value is treated as 0 (RFC 9111 1.2.2: stale)."""
    if name not in directives:
        return None
    raw = directives[name]
    try:
        return max(0, int(raw or ""))
    except ValueError:
        return 0


def http_date(value: str | None) -> float | None:
    """An HTTP-date as a POSIX timestamp, None when absent or unparseable."""
    if not value:
        return None
    try:
        return parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None


def _etags(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


def _weak_match(a: str, b: str) -> bool:
    """RFC 9110 8.8.3.2 weak comparison: equal opaque tags, W/ prefixes ignored."""
    return a.removeprefix("W/") == b.removeprefix("W/")


# -- entries ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Entry:
    """One stored response and what RFC 9111 needs to judge it."""

    status: int
    reason: bytes
    headers: HeaderList                 # end-to-end headers, without framing and Age
    body: bytes
    vary: VaryKey                       # the request headers it was selected by
    request_time: float                 # when the request that got it was sent
    response_time: float                # when its head arrived
    date: float                         # its Date header (response_time when absent)
    age: float                          # its Age header
    lifetime: float                     # freshness lifetime, seconds
    no_cache: bool                      # response no-cache: every use is revalidated
    must_revalidate: bool               # never served stale (must-revalidate, proxy-revalidate, s-maxage)
    etag: str | None
    last_modified: str | None
    size: int = 0

    def current_age(self, now: float) -> float:
        """RFC 9111 4.2.3."""
        apparent = max(0.0, self.response_time - self.date)
        corrected = self.age + (self.response_time - self.request_time)
        return max(apparent, corrected) + (now - self.response_time)


def _freshness(status: int, directives: Directives, headers: Mapping[bytes, str], date: float,
               default_ttl: float) -> float:
    """RFC 9111 4.2.1 (explicit) then 4.2.2 (heuristic, only without an explicit expiry)."""
    s_maxage = _seconds(directives, "s-maxage")
    if s_maxage is not None:
        return float(s_maxage)
    max_age = _seconds(directives, "max-age")
    if max_age is not None:
        return float(max_age)
    if b"expires" in headers:
        expires = http_date(headers[b"expires"])
        return max(0.0, expires - date) if expires is not None else 0.0
    if default_ttl > 0 and (status in HEURISTIC_STATUSES or "public" in directives):
        return default_ttl
    return 0.0


# -- the cache -------------------------------------------------------------------------------


@dataclass(slots=True)
class CacheStats:
    """Counters of all of a proxy's caches, kept across config swaps (``stats()["cache"]``)."""

    hits: int = 0             # answered from a fresh entry (RFCF)
    validated: int = 0        # answered from an entry the origin confirmed with 304 (RFCF)
    misses: int = 0           # sent upstream without a usable entry
    stored: int = 0
    evictions: int = 0
    invalidated: int = 0      # entries removed by unsafe methods
    not_modified: int = 0     # client conditionals answered 304 from an entry (counted in hits too)

    def to_dict(self) -> dict[str, int]:
        return {"hits": self.hits, "validated": self.validated, "misses": self.misses, "stored": self.stored,
                "evictions": self.evictions, "invalidated": self.invalidated, "not_modified": self.not_modified}


PrimaryKey = tuple[str, str]                       # (authority, path)
VaryKey = tuple[tuple[str, "str | None"], ...]     # (Vary'd request header, its value), in Vary order
EntryKey = tuple[PrimaryKey, VaryKey]


class HttpCache:
    """The entries of one destination service, in LRU order, within ``spec.max_bytes``."""

    __slots__ = ("spec", "stats", "clock", "bytes", "_entries", "_urls")

    def __init__(self, spec: CacheSpec, stats: CacheStats, clock: Clock = time.time) -> None:
        self.spec = spec
        self.stats = stats
        self.clock = clock          # wall clock: freshness compares against Date and Expires
        self.bytes = 0
        self._entries: OrderedDict[EntryKey, Entry] = OrderedDict()
        # A URL's Vary header names and the secondary keys of its stored variants.
        self._urls: dict[PrimaryKey, tuple[tuple[str, ...], set[VaryKey]]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, key: PrimaryKey, headers: Mapping[str, str]) -> Entry | None:
        """The entry stored for ``key`` whose Vary'd request headers equal this request's."""
        url = self._urls.get(key)
        if url is None:
            return None
        entry_key = (key, _vary_values(url[0], headers))
        entry = self._entries.get(entry_key)
        if entry is not None:
            self._entries.move_to_end(entry_key)
        return entry

    def store(self, key: PrimaryKey, entry: Entry) -> None:
        names = tuple(n for n, _ in entry.vary)
        url = self._urls.get(key)
        if url is not None and url[0] != names:
            self.invalidate(key)   # the origin changed what it varies on: the old variants are unreachable
            url = None
        if url is None:
            url = self._urls[key] = (names, set())
        entry.size = len(entry.body) + sum(len(n) + len(v) for n, v in entry.headers) + _ENTRY_OVERHEAD
        old = self._entries.pop((key, entry.vary), None)
        if old is not None:
            self.bytes -= old.size
        url[1].add(entry.vary)
        self._entries[(key, entry.vary)] = entry
        self.bytes += entry.size
        self.stats.stored += 1
        while self.bytes > self.spec.max_bytes and self._entries:
            (old_key, vary), evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.size
            self.stats.evictions += 1
            variants = self._urls[old_key][1]
            variants.discard(vary)
            if not variants:
                del self._urls[old_key]

    def invalidate(self, key: PrimaryKey) -> int:
        """Drop every variant of ``key``; returns how many were dropped."""
        url = self._urls.pop(key, None)
        if url is None:
            return 0
        for vary in url[1]:
            self.bytes -= self._entries.pop((key, vary)).size
        return len(url[1])

    def refresh(self, entry: Entry, head: ResponseHead, request_time: float, now: float) -> None:
        """RFC 9111 4.3.4: a 304 updates the stored headers and restarts the entry's age."""
        updates = {n: v for n, v in head.headers if n not in _NOT_UPDATED}
        if b"date" not in updates:   # RFC 9110 6.6.1: a response without Date is dated on receipt
            updates[b"date"] = formatdate(now, usegmt=True).encode()
        if updates:
            entry.headers = [(n, v) for n, v in entry.headers if n not in updates] + list(updates.items())
        _judge(entry, head.headers, request_time, now, self.spec.default_ttl)

    def response_entry(self, head: ResponseHead, request: Mapping[str, str], request_time: float,
                       now: float) -> Entry | None:
        """An entry to fill from a response to a GET, or None when RFC 9111 3 says not to store it."""
        if head.status not in STORABLE_STATUSES:
            return None
        if head.content_length is not None and head.content_length > self.spec.max_entry_bytes:
            return None
        stored: HeaderList = []
        by_name: dict[bytes, str] = {}
        for n, v in head.headers:
            if n == b"set-cookie":
                return None    # someone's session: never shared through the cache
            if n not in _NOT_STORED:
                stored.append((n, v))
            if n not in by_name:
                by_name[n] = v.decode("latin-1")
            elif n != b"age":
                by_name[n] += "," + v.decode("latin-1")
        cc = parse_cache_control(by_name.get(b"cache-control"))
        if "no-store" in cc or "private" in cc:
            return None
        if "authorization" in request and not ("public" in cc or "s-maxage" in cc or "must-revalidate" in cc):
            return None
        vary_names = tuple(dict.fromkeys(n.strip().lower() for n in by_name.get(b"vary", "").split(",") if n.strip()))
        if "*" in vary_names:
            return None
        if b"date" not in by_name:
            stored.append((b"date", formatdate(now, usegmt=True).encode()))
        entry = Entry(head.status, head.reason, stored, b"", _vary_values(vary_names, request), request_time, now,
                      now, 0.0, 0.0, False, False, by_name.get(b"etag"), by_name.get(b"last-modified"))
        _judge(entry, head.headers, request_time, now, self.spec.default_ttl)
        if entry.lifetime <= 0 and entry.etag is None and entry.last_modified is None:
            return None    # stale at once and impossible to revalidate: useless
        return entry


def _vary_values(names: tuple[str, ...], headers: Mapping[str, str]) -> VaryKey:
    """The secondary key: each Vary'd header's value, whitespace around list items removed."""
    out = []
    for n in names:
        v = headers.get(n)
        out.append((n, ",".join(p.strip() for p in v.split(",")) if v is not None else None))
    return tuple(out)


def _judge(entry: Entry, raw: HeaderList, request_time: float, now: float, default_ttl: float) -> None:
    """Set an entry's times and freshness from its (current) headers."""
    by_name: dict[bytes, str] = {}
    for n, v in entry.headers:
        by_name.setdefault(n, v.decode("latin-1"))
    age = next((v for n, v in raw if n == b"age"), None)
    try:
        entry.age = max(0.0, float(int(age))) if age is not None else 0.0
    except ValueError:
        entry.age = 0.0
    entry.request_time = request_time
    entry.response_time = now
    date = http_date(by_name.get(b"date"))
    entry.date = date if date is not None else now
    cc = parse_cache_control(by_name.get(b"cache-control"))
    entry.lifetime = _freshness(entry.status, cc, by_name, entry.date, default_ttl)
    entry.no_cache = "no-cache" in cc
    entry.must_revalidate = "must-revalidate" in cc or "proxy-revalidate" in cc or "s-maxage" in cc
    entry.etag = by_name.get(b"etag")
    entry.last_modified = by_name.get(b"last-modified")


def build_caches(snapshot: Snapshot, previous: Mapping[str, HttpCache] | None, stats: CacheStats,
                 clock: Clock = time.time) -> dict[str, HttpCache]:
    """One cache per destination host with a policy; a host whose spec is unchanged since
    ``previous`` keeps its entries, so pushing config does not empty the caches."""
    out: dict[str, HttpCache] = {}
    for host, spec in snapshot.caches.items():
        old = previous.get(host) if previous else None
        out[host] = old if old is not None and old.spec == spec else HttpCache(spec, stats, clock)
    return out


def cache_stats(stats: CacheStats, caches: Mapping[str, HttpCache]) -> dict[str, Any]:
    return {**stats.to_dict(), "entries": sum(len(c) for c in caches.values()),
            "bytes": sum(c.bytes for c in caches.values()),
            "by_host": {h: {"entries": len(c), "bytes": c.bytes} for h, c in sorted(caches.items())}}


# -- request side: what the client allows ---------------------------------------------------


@dataclass(slots=True)
class _Request:
    method: str
    headers: Mapping[str, str]
    directives: Directives

    @classmethod
    def of(cls, method: str, headers: Mapping[str, str]) -> "_Request":
        cc = headers.get("cache-control")
        directives = parse_cache_control(cc)
        if cc is None and "no-cache" in (headers.get("pragma") or "").lower():
            directives["no-cache"] = None
        return cls(method, headers, directives)

    def usable(self, entry: Entry, now: float) -> bool:
        """Whether ``entry`` may answer this request without asking the origin (RFC 9111 4.2, 5.2.1)."""
        d = self.directives
        if entry.no_cache or "no-cache" in d:
            return False
        age = entry.current_age(now)
        max_age = _seconds(d, "max-age")
        if max_age is not None and age > max_age:
            return False
        min_fresh = _seconds(d, "min-fresh") or 0
        remaining = entry.lifetime - age - min_fresh
        if remaining > 0:
            return True
        if "max-stale" in d and not entry.must_revalidate:
            limit = _seconds(d, "max-stale")
            return limit is None or -remaining <= limit
        return False

    def conditional(self) -> bool:
        return "if-none-match" in self.headers or "if-modified-since" in self.headers

    def not_modified(self, entry: Entry) -> bool:
        """RFC 9111 4.3.2: the client's own conditions hold for the stored response."""
        inm = self.headers.get("if-none-match")
        if inm is not None:
            return entry.etag is not None and (inm.strip() == "*" or
                                               any(_weak_match(t, entry.etag) for t in _etags(inm)))
        ims = http_date(self.headers.get("if-modified-since"))
        if ims is None:
            return False
        last = http_date(entry.last_modified) if entry.last_modified else None
        return (last if last is not None else entry.date) <= ims


# -- the filter between an exchange and its upstream ------------------------------------------


class CacheFilter:
    """Envoy's cache filter for one request.  ``start`` runs before the request goes upstream;
    when the request needs the upstream, the filter becomes the sink of the upstream response
    parser for the attempt (``Exchange._send``) and forwards every part to the exchange,
    copying a storable response or turning a 304 into the stored response.
    Once it knows it has nothing to do for a response, it hands the parser back to the exchange."""

    __slots__ = ("cache", "ex", "key", "request", "entry", "request_time", "filling", "parts", "size", "serving")

    def __init__(self, cache: HttpCache, ex: Any, key: PrimaryKey, request: _Request, entry: Entry | None) -> None:
        self.cache = cache
        self.ex = ex
        self.key = key
        self.request = request
        self.entry = entry               # the entry being revalidated, if any
        self.request_time = cache.clock()
        self.filling: Entry | None = None
        self.parts: list[bytes] = []      # the body copied so far
        self.size = 0
        self.serving: Entry | None = None   # a 304 made us serve this entry

    @classmethod
    def start(cls, cache: HttpCache, ex: Any, path: str, authority: str, out: HeaderList) -> bool:
        """Look the request up; True when it was answered from the cache.

        Otherwise ``ex.cache`` is set to a filter when the response matters to the cache,
        and conditional headers for a stored entry are appended to ``out`` (the upstream
        request's headers, not yet serialised).
        """
        req = ex.req
        method = req.method
        key = (authority.lower(), path)
        if method not in SAFE_METHODS:
            ex.cache = cls(cache, ex, key, _Request.of(method, req.headers), None)
            return False
        if method not in ("GET", "HEAD") or "range" in req.headers:
            return False
        request = _Request.of(method, req.headers)
        if "no-store" in request.directives:
            return False
        now = cache.clock()
        entry = cache.lookup(key, req.headers)
        if entry is not None and request.usable(entry, now) and not _retried(ex.route, entry.status):
            cache.stats.hits += 1
            if request.conditional() and request.not_modified(entry):
                cache.stats.not_modified += 1
                _serve(ex, entry, now, not_modified=True)
            else:
                _serve(ex, entry, now)
            return True
        if "only-if-cached" in request.directives:
            ex.local_reply(504, b"", None)
            return True
        cache.stats.misses += 1
        if method == "HEAD":
            return False
        if entry is not None and not request.conditional():
            if entry.etag is not None:
                out.append((b"if-none-match", entry.etag.encode("latin-1")))
            if entry.last_modified is not None:
                out.append((b"if-modified-since", entry.last_modified.encode("latin-1")))
            if entry.etag is None and entry.last_modified is None:
                entry = None
        else:
            entry = None
        ex.cache = cls(cache, ex, key, request, entry)
        return False

    # the response parser's sink for one attempt

    def on_head(self, head: ResponseHead) -> None:
        ex = self.ex
        self.filling = None
        self.serving = None
        if head.status < 200:
            ex.on_head(head)
            return
        if self.request.method not in SAFE_METHODS:
            ex.on_head(head)
            if head.status < 400:
                self._invalidate(head)
            self._hand_back()
            return
        entry = self.entry
        now = self.cache.clock()
        if entry is not None and head.status == 304:
            self.cache.refresh(entry, head, self.request_time, now)
            self.cache.stats.validated += 1
            self.cache.stats.misses -= 1       # counted as a miss when it went upstream
            if _serve_head(ex, entry, now, head.keep_alive):
                self.serving = entry
            return
        ex.on_head(head)
        if ex.upstream is None or ex.done:
            return   # the exchange retries (or gave up): this response is dropped
        self.filling = self.cache.response_entry(head, self.request.headers, self.request_time, now)
        self.parts = []
        self.size = 0
        if self.filling is None:
            self._hand_back()

    def on_data(self, data: bytes) -> None:
        if self.serving is not None:
            return   # a 304 has no body; the stored one is sent at the end
        filling = self.filling
        if filling is not None:
            self.size += len(data)
            if self.size > self.cache.spec.max_entry_bytes:
                self.filling = None
            else:
                self.parts.append(data)
        self.ex.on_data(data)

    def on_end(self, trailers: HeaderList) -> None:
        ex = self.ex
        serving = self.serving
        if serving is not None:
            if ex.head.method != b"HEAD":
                ex.on_data(serving.body)
            ex.on_end([])
            return
        filling = self.filling
        if filling is not None and not trailers:
            filling.body = b"".join(self.parts)
            self.cache.store(self.key, filling)
        self.filling = None
        self.parts = []
        ex.on_end(trailers)

    def on_upgrade(self, rest: bytes) -> None:
        self.ex.on_upgrade(rest)

    def _hand_back(self) -> None:
        """Nothing more to do for this response: the parser talks to the exchange directly."""
        up = self.ex.upstream
        if up is not None and up.parser.sink is self:
            up.parser.sink = self.ex

    def _invalidate(self, head: ResponseHead) -> None:
        cache = self.cache
        authority = self.key[0]
        dropped = cache.invalidate(self.key)
        for n, v in head.headers:
            if n == b"location" or n == b"content-location":
                path = _same_origin_path(v.decode("latin-1"), authority)
                if path is not None:
                    dropped += cache.invalidate((authority, path))
        cache.stats.invalidated += dropped


def _retried(route: Any, status: int) -> bool:
    """A status the route's retry policy would retry is not answered from the cache."""
    retries = route.retries if route is not None else None
    return retries is not None and retry_on_status(retries, status)


def _same_origin_path(uri: str, authority: str) -> str | None:
    """The path of a Location / Content-Location on ``authority``, None for another origin."""
    if uri.startswith("/"):
        return uri
    for scheme in ("http://", "https://"):
        if uri[:len(scheme)].lower() == scheme:
            rest = uri[len(scheme):]
            host, slash, path = rest.partition("/")
            return "/" + path if host.lower() == authority else None
    return None


def _head_for(entry: Entry, now: float, keep_alive: bool, not_modified: bool) -> ResponseHead:
    age = (b"age", b"%d" % int(entry.current_age(now)))
    if not_modified:
        headers = [h for h in entry.headers if h[0] in _NOT_MODIFIED_HEADERS] + [age]
        return ResponseHead(304, b"Not Modified", "1.1", headers, keep_alive, None, False)
    headers = entry.headers + [age, (b"content-length", b"%d" % len(entry.body))]
    return ResponseHead(entry.status, entry.reason, "1.1", headers, keep_alive, len(entry.body), False)


def _serve_head(ex: Any, entry: Entry, now: float, keep_alive: bool, not_modified: bool = False) -> bool:
    """Start the exchange's response from ``entry``, as if the upstream had sent it.  False when
    the route's retry policy rejected the status and the exchange goes upstream instead."""
    from_cache_only = ex.attempt == 0
    if from_cache_only:
        ex.up_start = time.monotonic()
    ex._response_head(_head_for(entry, now, keep_alive, not_modified))
    if not ex.response_started:
        return False
    ex.flags.append(flags.RFCF)
    if from_cache_only:
        ex.up_time = None     # no upstream was asked
    return True


def _serve(ex: Any, entry: Entry, now: float, not_modified: bool = False) -> None:
    """Answer the exchange entirely from ``entry`` (or let it retry upstream, see ``_serve_head``)."""
    if not _serve_head(ex, entry, now, True, not_modified):
        return
    if ex.head.method != b"HEAD" and not not_modified:
        ex.on_data(entry.body)
    ex.on_end([])


__all__ = ["CacheFilter", "CacheStats", "Entry", "HttpCache", "build_caches", "cache_stats", "parse_cache_control",
           "http_date", "STORABLE_STATUSES"]
