"""Per-route request policies as pure decisions: retry, backoff, fault, header ops, rewrite,
CORS and request mirroring.

The server asks these functions *what* to do; it does the waiting and the I/O itself.
Semantics follow Envoy, which is what Istio's VirtualService compiles to.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Mapping

from proxy_core.router import RequestInfo, split_host_port
from proxy_core.snapshot import CorsPolicy, Fault, HeaderOps, Match, Redirect, RetryPolicy, Route

_RNG = random.Random()

# RFC 7230 6.1 connection-specific headers plus the legacy ones proxies must not forward.
HOP_BY_HOP: frozenset[str] = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade",
})
HOP_BY_HOP_BYTES: frozenset[bytes] = frozenset(h.encode() for h in HOP_BY_HOP)

# -- retries ---------------------------------------------------------------------------------

def retry_on_status(policy: RetryPolicy, status: int) -> bool:
    """Whether a response with ``status`` should be retried under ``policy``: one of the
    statuses its ``retry_on`` entries name, worked out when the policy is built
    (``RetryPolicy.statuses``, where the table of entries is)."""
    return status in policy.statuses


# gRPC status code -> the retry_on entry that retries it (Envoy's x-envoy-retry-grpc-on).
_GRPC_RETRY_ON: dict[int, str] = {
    1: "cancelled", 4: "deadline-exceeded", 8: "resource-exhausted", 13: "internal", 14: "unavailable",
}


def retry_on_grpc_status(policy: RetryPolicy, grpc_status: int) -> bool:
    """Whether a gRPC response (``grpc-status`` header or trailer) should be retried.

    Istio's default retry policy relies on this: ``retryOn`` includes ``unavailable`` and
    ``cancelled``.  Entries: cancelled (1), deadline-exceeded (4), resource-exhausted (8),
    internal (13), unavailable (14).
    """
    entry = _GRPC_RETRY_ON.get(grpc_status)
    return entry is not None and entry in policy.retry_on


# Failure kind -> retry_on entries that retry it.  Envoy counts any upstream reset (a
# connection that fails, is reset, refuses the stream or exceeds the per-try timeout) as a
# 5xx, so ``5xx`` and ``gateway-error`` retry all of them, and ``reset`` covers every
# "did not respond at all" case; ``connect-failure`` and ``refused-stream`` are narrow.
_FAILURE_RETRY_ON: dict[str, frozenset[str]] = {
    "connect-failure": frozenset({"connect-failure", "reset", "5xx", "gateway-error"}),
    "reset": frozenset({"reset", "5xx", "gateway-error"}),
    "refused-stream": frozenset({"refused-stream", "reset", "5xx", "gateway-error"}),
    "timeout": frozenset({"reset", "5xx", "gateway-error"}),
}
FAILURE_KINDS: frozenset[str] = frozenset(_FAILURE_RETRY_ON)


def retry_on_failure(policy: RetryPolicy, kind: str) -> bool:
    """Whether an attempt that failed without a response should be retried.

    ``kind`` is one of ``FAILURE_KINDS``; ``timeout`` means the *per-try* timeout (the
    route timeout ends the request, never retried).  Table:

    =====================  ================================================
    kind                   retried when ``retry_on`` has any of
    =====================  ================================================
    ``connect-failure``    connect-failure, reset, 5xx, gateway-error
    ``reset``              reset, 5xx, gateway-error
    ``refused-stream``     refused-stream, reset, 5xx, gateway-error
    ``timeout``            reset, 5xx, gateway-error
    =====================  ================================================
    """
    return not _FAILURE_RETRY_ON[kind].isdisjoint(policy.retry_on)


def backoff_delay(attempt: int, base: float = 0.025, cap: float = 0.25,
                  rng: random.Random | None = None) -> float:
    """Seconds to wait before retry number ``attempt`` (1 = first retry).

    Envoy's fully jittered exponential backoff: uniform in ``[0, (2**attempt - 1) * base)``
    bounded by ``cap`` (Envoy's default cap is 10x the 25 ms base).  Attempt 0 is the
    original request: no wait.
    """
    if attempt <= 0:
        return 0.0
    bound = min((2 ** min(attempt, 62) - 1) * base, cap)
    return (rng or _RNG).random() * bound


# -- faults ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FaultDecision:
    """What fault injection does to one request: wait ``delay`` seconds, then (or instead)
    answer ``abort_status`` without calling the upstream.  Flags: DI for delay, FI for abort.
    A gRPC abort (``abort_grpc_status``) is a trailers-only reply, HTTP status 200."""

    delay: float | None = None
    abort_status: int | None = None
    abort_grpc_status: int | None = None

    def __bool__(self) -> bool:
        return self.delay is not None or self.abort_status is not None


NO_FAULT = FaultDecision()


def decide_fault(fault: Fault | None, rng: random.Random) -> FaultDecision:
    """Independent draws for delay and abort, each with its percentage (0-100, fractional)."""
    if fault is None:
        return NO_FAULT
    delay = None
    if fault.delay is not None and rng.random() * 100.0 < fault.delay_percentage:
        delay = fault.delay
    abort = grpc = None
    if fault.abort_grpc_status is not None and rng.random() * 100.0 < fault.abort_percentage:
        abort, grpc = 200, fault.abort_grpc_status
    elif fault.abort_status is not None and rng.random() * 100.0 < fault.abort_percentage:
        abort = fault.abort_status
    if delay is None and abort is None:
        return NO_FAULT
    return FaultDecision(delay, abort, grpc)


# -- headers ---------------------------------------------------------------------------------


def apply_header_ops(headers: list[tuple[str, str]], ops: HeaderOps) -> list[tuple[str, str]]:
    """Apply Istio header operations in Envoy's order: remove, then set, then add.

    ``set`` replaces the first header of that name in place and drops the others (append
    when absent); ``add`` appends.  Names compare case-insensitively; ``ops`` names are
    already lower case.  Returns a new list, or ``headers`` itself when ``ops`` is empty.
    """
    if not ops:
        return headers
    drop = ops.remove
    out = [h for h in headers if h[0].lower() not in drop] if drop else list(headers)
    for name, value in ops.set:
        found = [i for i, h in enumerate(out) if h[0].lower() == name]
        if found:
            out[found[0]] = (name, value)
            for i in reversed(found[1:]):
                del out[i]
        else:
            out.append((name, value))
    out.extend(ops.add)
    return out


# -- rewrite and redirect --------------------------------------------------------------------


def _split_query(path: str) -> tuple[str, str]:
    """``/a/b?x=1`` -> (``/a/b``, ``?x=1``)."""
    i = path.find("?")
    return (path, "") if i < 0 else (path[:i], path[i:])


def _replace_matched(path_only: str, new: str, match: Match | None) -> str:
    """Envoy ``prefix_rewrite``: replace what the route matched.  A prefix match matched
    its prefix; exact and regex matches matched the whole path; a route without a uri
    condition is Envoy's ``prefix: /``, so the leading ``/`` is what gets replaced."""
    sm = match.uri if match is not None else None
    if sm is None:
        return new + path_only[1:] if path_only.startswith("/") else new + path_only
    if sm.prefix is not None:
        return new + path_only[len(sm.prefix):]
    return new


def rewrite_target(route: Route, path: str, authority: str, match: Match | None) -> tuple[str, str]:
    """The (path, authority) to send upstream after Istio's ``rewrite``; query string kept.

    ``rewrite.uri`` replaces the matched prefix (see ``_replace_matched``); ``uri_regex``
    substitutes every match in the path (Envoy ``regex_rewrite``, ``\\1`` groups);
    ``rewrite.authority`` replaces the Host.
    """
    rw = route.rewrite
    if rw is None:
        return path, authority
    regex = rw.uri_regex
    if rw.uri is not None or regex is not None:
        path_only, query = _split_query(path)
        if rw.uri is not None:
            path_only = _replace_matched(path_only, rw.uri, match)
        elif regex is not None:
            path_only = regex[0].sub(regex[1], path_only)
        path = (path_only or "/") + query    # an empty request target is not valid HTTP
    if rw.authority is not None:
        authority = rw.authority
    return path, authority


_DEFAULT_PORTS = {"http": 80, "https": 443}


def redirect_location(redirect: Redirect, req: RequestInfo, matched: Match | None = None) -> str:
    """The absolute ``Location`` URL for an Istio ``HTTPRedirect``.

    Istio: ``uri`` replaces the *entire* path whatever kind of match selected the route
    (Envoy ``path_redirect``), so ``matched`` does not change the result; it is accepted
    so callers treat redirect and rewrite alike.  The query string is kept unless
    ``uri`` carries its own.  Scheme and port come from the redirect when set, else from
    the request; ``authority`` replaces the whole request authority, port included (Envoy
    ``host_redirect``).  When the scheme changes, a request port that was the old
    scheme's default is dropped (Envoy).
    """
    scheme = redirect.scheme or req.scheme
    if redirect.authority is not None:
        host, port = split_host_port(redirect.authority)
    else:
        host, port = split_host_port(req.authority)
        if port is not None and scheme != req.scheme and port == _DEFAULT_PORTS.get(req.scheme):
            port = None
    if redirect.port is not None:
        port = redirect.port
    if redirect.uri is not None:
        query = _split_query(req.path)[1]
        path = redirect.uri if "?" in redirect.uri else redirect.uri + query
    else:
        path = req.path
    netloc = host if port is None else f"{host}:{port}"
    return f"{scheme}://{netloc}{path}"


# -- CORS ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class CorsDecision:
    """What Envoy's CORS filter does with one request.

    ``preflight`` set: answer 200 at once with exactly these headers, never calling the
    upstream (an empty tuple is the IGNORE answer to a preflight from an origin not allowed).
    ``response`` set: headers to set on whatever response the request gets, upstream or local.
    """

    preflight: tuple[tuple[bytes, bytes], ...] | None = None
    response: HeaderOps | None = None


NO_CORS = CorsDecision()


def origin_allowed(cors: CorsPolicy, origin: str) -> bool:
    """Envoy ``isOriginAllowed``: a matcher that matches ``*`` (``exact: "*"``) allows any origin."""
    return any(m.matches("*") or m.matches(origin) for m in cors.allow_origins)


def decide_cors(cors: CorsPolicy, method: str, headers: Mapping[str, str]) -> CorsDecision:
    """Envoy's CORS filter for a route with a ``corsPolicy``.

    ==================================================  =========================================
    request                                             result
    ==================================================  =========================================
    no ``Origin``                                       nothing (not a CORS request)
    preflight (OPTIONS + Origin + Access-Control-       200 with allow-origin (the origin),
    Request-Method), origin allowed                     -allow-credentials, -allow-methods,
                                                        -allow-headers, -max-age as configured
    preflight, origin not allowed                       FORWARD: nothing; IGNORE: 200, no CORS headers
    any other request, origin allowed                   response gets allow-origin,
                                                        -allow-credentials, -expose-headers
    any other request, origin not allowed               nothing
    ==================================================  =========================================
    """
    origin = headers.get("origin")
    if not origin:
        return NO_CORS
    preflight = method == "OPTIONS" and bool(headers.get("access-control-request-method"))
    if not origin_allowed(cors, origin):
        if preflight and not cors.forward_unmatched_preflights:
            return CorsDecision(preflight=())
        return NO_CORS
    if preflight:
        reply = [(b"access-control-allow-origin", origin.encode("latin-1"))]
        if cors.allow_credentials:
            reply.append((b"access-control-allow-credentials", b"true"))
        for name, value in ((b"access-control-allow-methods", cors.allow_methods),
                            (b"access-control-allow-headers", cors.allow_headers),
                            (b"access-control-max-age", cors.max_age)):
            if value:
                reply.append((name, value.encode("latin-1")))
        return CorsDecision(preflight=tuple(reply))
    ops = [("access-control-allow-origin", origin)]
    if cors.allow_credentials:
        ops.append(("access-control-allow-credentials", "true"))
    if cors.expose_headers:
        ops.append(("access-control-expose-headers", cors.expose_headers))
    return CorsDecision(response=HeaderOps(set=tuple(ops)))


# -- request mirroring -----------------------------------------------------------------------


def mirror_sampled(percentage: float, rng: random.Random) -> bool:
    """Whether one request is copied to a mirror taking ``percentage`` (0-100) of the traffic."""
    return percentage >= 100.0 or (percentage > 0.0 and rng.random() * 100.0 < percentage)


def shadow_authority(authority: str) -> str:
    """Envoy's shadow Host: ``-shadow`` appended to the host name, before any port
    (``reviews:9080`` -> ``reviews-shadow:9080``), so the mirror's logs tell copies apart."""
    host, port = split_host_port(authority)
    return f"{host}-shadow" if port is None else f"{host}-shadow:{port}"
