"""Route selection: virtual host by authority and port, route by Istio match, cluster by weight.

Pure functions over a parsed ``Snapshot``; no I/O.  Every request passes through here, so
the work is front-loaded into ``Router.__init__`` (domain index, wildcard tables) and the
per-request path is dict lookups plus short-circuiting comparisons.  Regexes are compiled
by ``snapshot.py``; nothing here compiles or allocates per condition.

Matching follows Istio's ``HTTPMatchRequest`` as translated to Envoy: the conditions of
one match are AND-ed, a route's match list is OR-ed, and the first route that matches
wins.  ``uri`` is compared with the path without its query string.

``sourceLabels`` / ``sourceNamespace`` conditions test ``RequestInfo.source``, the workload
that opened the connection.  Finding it costs a kernel socket lookup, so the proxy fills it
in only for a virtual host that has such a condition (``VirtualHost.uses_source``); a
request left without it (None) satisfies none of them, like an unidentified client.
"""
from __future__ import annotations

import random
from dataclasses import replace
from typing import Any, Mapping
from urllib.parse import unquote

from proxy_core.snapshot import TcpRoute
from proxy_core.snapshot import Match, Route, Snapshot, StringMatch, VirtualHost, WeightedCluster

_RNG = random.Random()
_CACHE_LIMIT = 4096  # distinct (authority, port, default_host) lookups remembered per Router


def split_host_port(authority: str) -> tuple[str, int | None]:
    """Split ``host[:port]`` (``[v6]:port`` too); the port is None when absent or not numeric."""
    if authority.startswith("["):
        end = authority.find("]")
        if end > 0 and authority[end + 1:end + 2] == ":" and authority[end + 2:].isdigit():
            return authority[:end + 1], int(authority[end + 2:])
        return authority, None
    i = authority.rfind(":")
    if i >= 0 and authority.find(":") == i and authority[i + 1:].isdigit():
        return authority[:i], int(authority[i + 1:])
    return authority, None


def strip_port(authority: str) -> str:
    """The host part of an authority, port removed."""
    return split_host_port(authority)[0]


class RequestInfo:
    """What the router, balancers and policies need to know about one request.

    ``path`` is the raw request target path including the query string.  The derived
    views (``path_only``, ``query``, ``host``) are computed on first use and cached,
    because most routes never look at them.  A plain class (not a dataclass), so that
    compiled it is an extension type read at C level (``router.pxd``).

    ``generated_cookie`` is the value of a consistent-hash cookie generated for this request
    because the client sent none (see ``lb.RingHashBalancer.hash_cookie_to_set``); hashing
    uses it in place of the absent cookie so the request lands where the client will be
    pinned from now on.

    ``source`` is the ``SourceWorkload`` that opened the connection, set by the proxy before
    matching only where a route tests it (``VirtualHost.uses_source``); None otherwise.
    """

    __slots__ = ("method", "path", "authority", "headers", "scheme", "port", "source_ip", "generated_cookie",
                 "source_principal", "source", "_path_only", "_query", "_host")

    def __init__(self, method: str, path: str, authority: str, headers: Mapping[str, str], scheme: str = "http",
                 port: int = 0, source_ip: str = "", generated_cookie: str | None = None) -> None:
        self.method = method
        self.path = path
        self.authority = authority
        self.headers = headers
        self.scheme = scheme
        self.port = port
        self.source_ip = source_ip
        self.generated_cookie = generated_cookie
        # The sending workload's principal (cluster.local/ns/NS/sa/SA), set by the proxy only
        # where a rate limit descriptor counts by it; None otherwise or when unidentified.
        self.source_principal: str | None = None
        self.source: Any = None
        self._path_only: str | None = None
        self._query: dict[str, str] | None = None
        self._host: str | None = None

    def __repr__(self) -> str:
        return (f"RequestInfo(method={self.method!r}, path={self.path!r}, authority={self.authority!r}, "
                f"headers={self.headers!r}, scheme={self.scheme!r}, port={self.port!r}, "
                f"source_ip={self.source_ip!r}, generated_cookie={self.generated_cookie!r})")

    @property
    def path_only(self) -> str:
        """The path without ``?query`` (and without a ``#fragment`` a client should not send)."""
        p = self._path_only
        if p is None:
            p = self.path
            for sep in "?#":
                i = p.find(sep)
                if i >= 0:
                    p = p[:i]
            self._path_only = p
        return p

    @property
    def query(self) -> dict[str, str]:
        """Query parameters, percent-decoded; the first value wins, like Envoy's matcher."""
        q = self._query
        if q is None:
            q = {}
            i = self.path.find("?")
            if i >= 0:
                raw = self.path[i + 1:]
                j = raw.find("#")
                if j >= 0:
                    raw = raw[:j]
                for part in raw.split("&"):
                    if not part:
                        continue
                    k, _, v = part.partition("=")
                    q.setdefault(unquote(k), unquote(v))
            self._query = q
        return q

    @property
    def host(self) -> str:
        """The authority lower-cased with its port removed: what virtual host domains list."""
        h = self._host
        if h is None:
            h = self._host = strip_port(self.authority).lower()
        return h


def match_request(m: Match, req: RequestInfo) -> bool:
    """True when ``req`` satisfies every condition of the Istio match ``m``.

    Cheapest and most selective checks first.  Header semantics: an all-None StringMatch
    under ``headers`` means "present"; under ``without_headers`` a request matches only
    when the header does *not* match, so an all-None entry there means "absent".
    ``authority`` is tried on the value as sent and, when that carries a port, on the
    host alone, so both ``reviews`` and ``reviews:9080`` style configs work.
    """
    if m.port is not None and m.port != req.port:
        return False
    sm = m.uri
    if sm is not None:
        # The common uri forms are inlined: this runs once per route per request.
        path = req._path_only
        if path is None:
            path = req.path_only
        if m.ignore_uri_case:
            if not sm.matches(path, True):
                return False
        elif sm.prefix is not None:
            if not path.startswith(sm.prefix):
                return False
        elif sm.exact is not None:
            if path != sm.exact:
                return False
        elif not sm.matches(path):
            return False
    sm = m.method
    if sm is not None and not sm.matches(req.method):
        return False
    sm = m.scheme
    if sm is not None and not sm.matches(req.scheme):
        return False
    sm = m.authority
    if sm is not None and not sm.matches(req.authority):
        host = strip_port(req.authority)
        if host == req.authority or not sm.matches(host):
            return False
    if m.headers:
        headers = req.headers
        for name, sm in m.headers:
            if not sm.matches(headers.get(name)):
                return False
    if m.without_headers:
        headers = req.headers
        for name, sm in m.without_headers:
            if sm.matches(headers.get(name)):
                return False
    if m.query_params:
        query = req.query
        for name, sm in m.query_params:
            if not sm.matches(query.get(name)):
                return False
    source = m.source
    return source is None or source.matches(req.source)


def _domain_key(domain: str, port: int | None) -> tuple[str, int | None]:
    """Index key of a configured domain; ``host:port`` domains pin the port themselves."""
    host, dport = split_host_port(domain)
    return host, (dport if dport is not None else port)


def _flatten(vhost: VirtualHost) -> tuple[tuple[Route, Match | None], ...]:
    """``(route, match)`` for every match of every route, in order; ``None`` = catch-all."""
    return tuple((route, m) for route in vhost.routes for m in (route.matches or (None,)))


# How ``Router.match_with`` evaluates one match.  Most VirtualService matches are a single
# uri prefix or a single exact header; those are checked inline in the loop, which saves a
# call of ``match_request`` per route per request.
_ANY, _PREFIX, _HEADER_EXACT, _GENERAL = 0, 1, 2, 3
_ONLY_URI = Match(uri=StringMatch())
_ONLY_HEADERS = Match()

Plan = tuple[tuple[Route, Match | None, int, Any], ...]


def _plan(pairs: tuple[tuple[Route, Match | None], ...]) -> Plan:
    """Each ``(route, match)`` with its evaluation kind and argument (see ``_ANY`` ...)."""
    out: list[tuple[Route, Match | None, int, Any]] = []
    for route, m in pairs:
        if m is None:
            out.append((route, m, _ANY, None))
        elif (m.uri is not None and m.uri.prefix is not None and m.uri.exact is None and m.uri.regex is None
              and replace(m, uri=_ONLY_URI.uri) == _ONLY_URI):
            out.append((route, m, _PREFIX, m.uri.prefix))
        elif (len(m.headers) == 1 and m.headers[0][1].exact is not None and m.headers[0][1].regex is None
              and replace(m, headers=()) == _ONLY_HEADERS):
            name, sm = m.headers[0]
            out.append((route, m, _HEADER_EXACT, (name, sm.exact)))
        else:
            out.append((route, m, _GENERAL, None))
    return tuple(out)


class Router:
    """Virtual host, route and weighted-cluster selection over one snapshot.

    A Router is built once per snapshot and shared by every request that starts on it;
    it is immutable apart from a bounded lookup cache.  It routes by the snapshot's
    ``virtual_hosts`` unless given others (an ingress gateway listener's).
    """

    __slots__ = ("snapshot", "_exact", "_suffix", "_prefix", "_star", "_by_host", "_cache", "_flat", "_plans")

    def __init__(self, snapshot: Snapshot, virtual_hosts: tuple[VirtualHost, ...] | None = None) -> None:
        self.snapshot = snapshot
        vhosts = snapshot.virtual_hosts if virtual_hosts is None else virtual_hosts
        # (host, port) -> vhost; port None = the vhost accepts any port.  First vhost wins,
        # like Envoy's domain uniqueness rule resolved in configuration order.
        self._exact: dict[tuple[str, int | None], VirtualHost] = {}
        suffix: list[tuple[str, int | None, VirtualHost]] = []
        prefix: list[tuple[str, int | None, VirtualHost]] = []
        self._star: list[tuple[int | None, VirtualHost]] = []
        self._by_host: dict[tuple[str, int | None], VirtualHost] = {}
        for vh in vhosts:
            self._by_host.setdefault((vh.host.lower(), vh.port), vh)
            for domain in sorted(vh.domains):
                if domain == "*":
                    self._star.append((vh.port, vh))
                elif domain.startswith("*"):
                    suffix.append((domain[1:], vh.port, vh))
                elif domain.endswith("*"):
                    prefix.append((domain[:-1], vh.port, vh))
                else:
                    self._exact.setdefault(_domain_key(domain, vh.port), vh)
        # Envoy: longest wildcard wins; exact beats suffix beats prefix beats "*".
        suffix.sort(key=lambda t: -len(t[0]))
        prefix.sort(key=lambda t: -len(t[0]))
        self._suffix = tuple(suffix)
        self._prefix = tuple(prefix)
        self._cache: dict[tuple[str, int, str | None], VirtualHost | None] = {}
        # Routes flattened to (route, match) pairs in order, one loop per request instead of
        # two.  Keyed by id(): the vhosts are owned by ``snapshot``, which this Router keeps
        # alive; the stored vhost guards against a foreign one that reuses an id.
        self._flat: dict[int, tuple[VirtualHost, tuple[tuple[Route, Match | None], ...]]] = {
            id(vh): (vh, _flatten(vh)) for vh in vhosts}
        self._plans: dict[int, tuple[VirtualHost, Plan]] = {
            id(vh): (vh, _plan(pairs)) for vh, pairs in self._flat.values()}

    def virtual_host(self, authority: str, port: int, default_host: str | None = None) -> VirtualHost | None:
        """The virtual host serving ``authority`` on ``port``, or None (Envoy: NR).

        ``default_host`` is the service a VIP listener stands for: when the Host header
        names nothing known (e.g. a raw IP or a client-chosen alias), the request still
        belongs to that service's virtual host on that port.
        """
        key = (authority, port, default_host)
        cache = self._cache
        try:
            return cache[key]
        except KeyError:
            pass
        vh = self._lookup(strip_port(authority).lower(), port)
        if vh is None and default_host is not None:
            host = default_host.lower()
            vh = self._by_host.get((host, port)) or self._by_host.get((host, None))
        if len(cache) >= _CACHE_LIMIT:
            cache.clear()
        cache[key] = vh
        return vh

    def _lookup(self, host: str, port: int) -> VirtualHost | None:
        exact = self._exact
        vh = exact.get((host, port)) or exact.get((host, None))
        if vh is not None:
            return vh
        for sfx, vport, vh in self._suffix:
            if (vport is None or vport == port) and host.endswith(sfx) and len(host) > len(sfx):
                return vh
        for pfx, vport, vh in self._prefix:
            if (vport is None or vport == port) and host.startswith(pfx) and len(host) > len(pfx):
                return vh
        for vport, vh in self._star:
            if vport is None or vport == port:
                return vh
        return None

    def _pairs(self, vhost: VirtualHost) -> tuple[tuple[Route, Match | None], ...]:
        """The flattened routes of ``vhost``; computed on the spot for a foreign vhost."""
        pairs = self._flat.get(id(vhost))
        if pairs is None or pairs[0] is not vhost:
            pairs = (vhost, _flatten(vhost))
        return pairs[1]

    def match_with(self, vhost: VirtualHost, req: RequestInfo) -> tuple[Route, Match | None] | None:
        """The first matching route and the match that selected it (None for a catch-all).

        The match is needed by ``policy.rewrite_target``: a prefix match decides which part
        of the path a ``rewrite.uri`` replaces.
        """
        plan = self._plans.get(id(vhost))
        if plan is None or plan[0] is not vhost:
            plan = (vhost, _plan(_flatten(vhost)))
        path = None
        for route, m, kind, arg in plan[1]:
            if kind == _PREFIX:
                if path is None:
                    path = req._path_only
                    if path is None:
                        path = req.path_only
                if path.startswith(arg):
                    return route, m
            elif kind == _HEADER_EXACT:
                if req.headers.get(arg[0]) == arg[1]:
                    return route, m
            elif kind == _ANY or match_request(m, req):  # type: ignore[arg-type]
                return route, m
        return None

    def match(self, vhost: VirtualHost, req: RequestInfo) -> Route | None:
        """The first route of ``vhost`` that ``req`` matches, or None (Envoy: NR)."""
        for route, m in self._pairs(vhost):
            if m is None or match_request(m, req):
                return route
        return None

    @staticmethod
    def pick(route: Route | TcpRoute, rng: random.Random | None = None) -> WeightedCluster:
        """Weighted random choice among the route's destinations (HTTP or TCP route).

        A single destination takes all traffic whatever its weight (Istio).  Zero-weight
        destinations are never chosen.  A route with no destination, or several all of
        weight zero, is invalid configuration (Envoy NACKs it): ValueError.
        """
        clusters = route.clusters
        if len(clusters) == 1:
            return clusters[0]
        total = route.total_weight
        if total <= 0:
            raise ValueError(f"route {route.name!r} has no destination with a positive weight")
        r = (rng or _RNG).random() * total
        for wc in clusters:
            r -= wc.weight
            if r < 0:
                return wc
        # Float rounding can leave r == 0 after the last positive weight.
        return next(wc for wc in reversed(clusters) if wc.weight > 0)
