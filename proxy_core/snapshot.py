"""The proxy snapshot: the one contract between the control plane and the data plane.

Pilot compiles Istio configuration plus the service registry into one immutable
snapshot per node (see ``mesh.compiler``); a proxy swaps it in atomically.  On the
wire (object store, control socket, ``--snapshot file.json``) it is a plain JSON-able
dict; ``Snapshot.from_dict`` turns it into the frozen, slotted objects below, with
regexes compiled once, so the request path never parses configuration.

Shape of the dict (every key optional unless marked *required*)::

    {
      "version": "c12.r7.3f9a1c2e",                    # required, opaque, compared for equality
      "node": {"id": "<ray node id>", "ip": "127.0.0.1"},
      "listeners": {
        "http_proxy": {"host": "127.0.0.1", "port": 15001},   # HTTP_PROXY target (absolute-form)
        "inbound":    {"host": "127.0.0.1", "port": 15006},   # node-to-node tunnel entry
      },
      "outbound_policy": "ALLOW_ANY" | "REGISTRY_ONLY",        # unknown authority: pass through or 502
      "vips": [{"address": "127.10.0.3", "port": 9080,
                "host": "reviews.default.svc.cluster.local", "protocol": "http"}],
                  # protocol: http (HTTP/1.1), http2 / grpc (HTTP/2, HTTP/1.1 accepted too),
                  # auto (sniffed: HTTP/1.1, HTTP/2 or else TCP), tcp (spliced)
      "virtual_hosts": [{
          "name": "reviews.default.svc.cluster.local:9080",
          "host": "reviews.default.svc.cluster.local",
          "port": 9080,
          "domains": ["reviews", "reviews.default", "reviews.default.svc.cluster.local", "127.10.0.3"],
          "routes": [ROUTE, ...]}],
      "clusters": {"outbound|9080|v1|reviews.default.svc.cluster.local": CLUSTER, ...},
      "security": {"authz": [POLICY, ...], "jwt": [RULESET, ...]},  # see mesh/compiler_security.py
      "rate_limits": {"reviews.default.svc.cluster.local": RATE_LIMIT, ...},  # by service host
      "tcp_routes": [TCP_HOST, ...],     # service ports whose protocol is tcp (VIP listeners splice bytes)
      "tracing": {"sampling": 1.0},      # optional: mesh-wide percent of requests that start a trace
      "telemetry": {...},                # optional: Istio's Telemetry API per destination workload
                                         # (see proxy_core/telemetry_policy.py)
      "tls_routes": [TLS_HOST, ...],     # service ports whose protocol is tls/https: SNI routing, no decryption
      "caches": {"reviews.default.svc.cluster.local": CACHE, ...},  # by destination service host
      "gateway": GATEWAY                 # gateway nodes only: the ingress gateway (mesh/compiler_gateways.py)
    }

GATEWAY (Istio's ingress gateway, as the proxy of a gateway node serves it)::

    {"namespace": "istio-system", "service_account": "istio-ingressgateway-service-account",
     "workload": "istio-ingressgateway",                       # the source workload of its requests
     "labels": {"istio": "ingressgateway", "app": "istio-ingressgateway"},
     "listeners": [{"name": "istio-ingressgateway:8080",       # access logs' listener name
                    "address": "127.0.0.1", "port": 8080,      # bound as given (0 = any free port)
                    "protocol": "http" | "http2" | "grpc" | "grpc-web",   # HTTP/1.1 and h2c accepted on each
                                # | "https" | "tls" (TLS filter chains: ``servers``) | "tcp" (``tcp_routes``)
                    "gateways": ["default/bookinfo-gateway"],  # the Gateways with servers on this port
                    "virtual_hosts": [VHOST, ...]},            # as ``virtual_hosts``, for this port only
                   {"name": "istio-ingressgateway:8443", "address": "127.0.0.1", "port": 8443,
                    "protocol": "https", "gateways": [...], "virtual_hosts": [],
                    "servers": [GATEWAY_TLS_SERVER, ...]},     # one filter chain each, chosen by SNI
                   {"name": "istio-ingressgateway:9000", "address": "127.0.0.1", "port": 9000,
                    "protocol": "tcp", "gateways": [...], "virtual_hosts": [],
                    "tcp_routes": [TCP_ROUTE, ...]}]}          # as a TCP_HOST's routes; none: closed (NR)

GATEWAY_TLS_SERVER (one HTTPS server of a Gateway: chosen by SNI, see proxy_core/gateway_tls.py)::

    {"name": "https.8443.https.bookinfo-gateway.default",    # Istio's route configuration name
     "server_names": ["bookinfo.example.com", "*.example.org"],   # SNI names; [] = any name
     "tls": {"mode": "SIMPLE" | "MUTUAL" | "OPTIONAL_MUTUAL",
             "server_certificate": "/etc/certs/cert.pem", "private_key": "/etc/certs/key.pem",
             "ca_certificates": "/etc/certs/ca.pem",                # MUTUAL / OPTIONAL_MUTUAL
             "min_protocol_version": "TLSV1_2", "max_protocol_version": "TLSV1_3",   # optional
             "cipher_suites": ["ECDHE-RSA-AES256-GCM-SHA384"],      # optional, TLS 1.2 and below
             "subject_alt_names": ["spiffe://client.example"]},     # optional: accepted client SANs
     "virtual_hosts": [VHOST, ...]}                         # this server's routes only

  or, passthrough (the TLS bytes are spliced untouched, see proxy_core/gateway_l4.py)::

    {"name": "tls.9443.tls.bookinfo-gateway.default",
     "server_names": ["a.example.com"],                      # the routes' SNI names
     "tls": {"mode": "PASSTHROUGH"},
     "tls_routes": [TLS_ROUTE, ...]}                        # as a TLS_HOST's routes; none matching: closed

A gateway listener routes only by its own virtual hosts (``domains`` may be ``*``,
``*.suffix``), an HTTPS one by those of the server its connection's SNI chose; a Host none
of them names gets 404 with flag NR, never the outbound policy.

CACHE (a CachePolicy, see mesh/compiler_cache.py and proxy_core/cache.py)::

    {"policy": "default/reviews-cache",
     "max_bytes": 67108864,         # the whole cache of this host, LRU-evicted beyond it
     "max_entry_bytes": 1048576,    # larger bodies are not stored
     "default_ttl": 0.0}            # heuristic freshness (seconds) for responses without an
                                    # explicit lifetime; 0 = none (they are stored only to be revalidated)

TLS_HOST (Istio VirtualService ``tls`` rules for one (host, port): routed by the ClientHello's SNI)::

    {"name": "web.default.svc.cluster.local:443",
     "host": "web.default.svc.cluster.local", "port": 443,
     "routes": [{"name": "default/web/0",
                 "match": [{"sni_hosts": ["a.example.com", "*.example.org"],
                            "destination_subnets": ["127.10.0.0/16"],     # OR of matches; AND inside
                            "source_labels": {"app": "batch"}, "source_namespace": "jobs"}],
                 "route": [{"cluster": "outbound|443|v1|web...", "weight": 100}],
                 "idle_timeout": 3600.0}]}

TCP_HOST (Istio VirtualService ``tcp`` rules for one (host, port), as Envoy tcp_proxy filter chains)::

    {"name": "db.default.svc.cluster.local:5432",
     "host": "db.default.svc.cluster.local", "port": 5432,
     "routes": [{"name": "default/db/0",
                 "match": [{"destination_subnets": ["127.10.0.0/16", "127.10.0.9"],   # OR; empty = any
                            "source_labels": {"app": "batch"}, "source_namespace": "jobs"}],
                 "route": [{"cluster": "outbound|5432|v1|db...", "weight": 80}, ...],
                 "idle_timeout": 3600.0}]}    # seconds without bytes either way; 0 = none;
                                              # absent = 3600 (Envoy tcp_proxy's default in Istio)

A connection to ``VIP:port`` takes the first route one of whose matches holds (a
``destination_subnets`` entry contains the VIP address, the client workload carries every
``source_labels`` pair and lives in ``source_namespace``; a match without a condition holds
always), then a destination by weight.  Port matches are resolved by the compiler (a route
appears only under the port it matches).  The client workload is looked up (``/proc``, see
``proxy_core.source_identity``) only for a host one of whose matches has a source condition.

ROUTE::

    {"name": "reviews-v2-for-jason",
     "match": [MATCH, ...],            # OR of the list; empty or missing = match everything
     # exactly one of route / redirect / direct_response:
     "route": [{"cluster": "outbound|9080|v2|reviews...", "weight": 100,
                "headers": HEADER_OPS}],
     "redirect": {"uri": "/x", "authority": "h", "port": 8080, "scheme": "https",
                  "redirect_code": 301},        # port absent: keep the request's port
     "direct_response": {"status": 503, "body": "text"},    # or "body_base64" for binary bodies
     "rewrite": {"uri": "/v1/", "authority": "h",
                 "uri_regex": {"match": "^/a/(.*)", "rewrite": "/b/\\1"}},
     "timeout": 2.5,                   # seconds; null/absent = no route timeout
     "retries": {"attempts": 2, "per_try_timeout": 0.5,
                 "retry_on": ["5xx", "gateway-error", "connect-failure", "reset",
                              "retriable-4xx", "retriable-status-codes", "refused-stream"],
                 "retriable_status_codes": [503]},          # null = no retries
     "fault": {"delay": {"fixed_delay": 5.0, "percentage": 100.0},
               "abort": {"http_status": 500, "percentage": 50.0}},   # or {"grpc_status": 14, ...}
     "headers": HEADER_OPS,
     "cors": CORS,                     # absent = no CORS processing on this route
     "mirrors": [{"cluster": "outbound|9080|v3|reviews...", "percentage": 100.0}]}   # only with "route"

CORS (Istio CorsPolicy as Envoy's CORS filter reads it)::

    {"allow_origins": [STRING_MATCH, ...],   # an entry matching "*" (exact "*") allows every origin
     "allow_methods": ["GET", "POST"],       # joined with "," into access-control-allow-methods
     "allow_headers": ["x-user"],            # -> access-control-allow-headers
     "expose_headers": ["x-trace"],          # -> access-control-expose-headers
     "max_age": 86400,                       # whole seconds -> access-control-max-age; absent = not sent
     "allow_credentials": true,              # -> access-control-allow-credentials: true
     "unmatched_preflights": "FORWARD" | "IGNORE"}   # preflight from an origin not allowed:
                                                     # forward it upstream, or answer 200 without CORS headers

MIRROR entries are Istio's ``mirror`` + ``mirrorPercentage`` (one entry) or ``mirrors[]``
(Envoy ``request_mirror_policies``): each sampled request is copied, fire and forget, to
``cluster``; ``percentage`` (0-100, fractional) is the share of requests copied.

MATCH (Istio HTTPMatchRequest, snake_cased; STRING_MATCH is {"exact"|"prefix"|"regex": str})::

    {"uri": STRING_MATCH, "scheme": STRING_MATCH, "method": STRING_MATCH,
     "authority": STRING_MATCH, "headers": {"end-user": STRING_MATCH},
     "without_headers": {"x-debug": STRING_MATCH}, "query_params": {"u": STRING_MATCH},
     "port": 9080, "ignore_uri_case": false,
     "source_labels": {"app": "reviews", "version": "v2"},   # Istio sourceLabels: all must be present
     "source_namespace": "default"}                          # Istio sourceNamespace

Header names are lower case.  An empty STRING_MATCH ``{}`` in ``headers`` means "present";
in ``without_headers`` it means "absent".  Regexes are RE2 syntax, full matches, as Envoy reads
them (so the same snapshot can be served over xDS); ``re2_to_python`` adapts them once here.
``source_labels`` / ``source_namespace`` (on MATCH, TCP and TLS matches alike) hold for the
workload that opened the downstream connection, as the node proxy identifies it (a local
client's registration; at an ingress gateway listener the gateway itself, whose labels and
namespace GATEWAY names).  A client the proxy cannot identify has no labels and no known
namespace, so it satisfies no source condition and falls through to the next route.

HEADER_OPS::

    {"request":  {"set": {"k": "v"}, "add": {"k": "v"}, "remove": ["k"]},
     "response": {"set": {...}, "add": {...}, "remove": [...]}}

CLUSTER::

    {"service": "reviews.default.svc.cluster.local", "port": 9080, "subset": "v1",
     "connect_timeout": 10.0,
     "passthrough": false,       # true (ServiceEntry resolution NONE): no endpoints, forward to the
                                 # address the client asked for
     "lb": {"policy": "ROUND_ROBIN" | "LEAST_REQUEST" | "RANDOM" | "RING_HASH",
            "hash": {"header": "x-user"} | {"cookie": {"name": "u", "ttl": 0, "path": "/"}}
                    | {"source_ip": true} | {"query_param": "user"},   # only for RING_HASH
            "ring_size": 1024},
     "endpoints": [{"address": "127.0.0.1", "port": 40123, "node": "<node id>",
                    "labels": {"version": "v1"},
                    "namespace": "default", "service_account": "bookinfo-reviews",   # Ray workloads
                    "mtls_mode": "STRICT" | "PERMISSIVE" | "DISABLE",   # Ray workloads: PeerAuthentication
                    "via": {"address": "127.0.0.1", "port": 15006} | null}],
     "tls": CLUSTER_TLS,         # absent: auto mTLS (by each endpoint's mtls_mode)
     # Each absent = off (see proxy_core/resilience.py, outlier.py, locality.py); endpoints may
     # carry "locality": "region/zone/subzone", and "node" the proxy's "locality" and "labels".
     "connection_pool": {"max_connections": 100, "max_pending_requests": 10, "max_requests": 100,
                         "max_requests_per_connection": 0, "max_retries": 3, "max_concurrent_streams": 0,
                         "idle_timeout": 3600.0, "max_connection_duration": null,
                         "tcp_keepalive": {"time": 7200.0, "interval": 75.0, "probes": 9}},   # limits absent = 2**32-1
     "outlier_detection": {"consecutive_5xx": 5, "consecutive_gateway_errors": 0,
                           "consecutive_local_origin_failures": 5, "split_external_local_origin_errors": false,
                           "interval": 10.0, "base_ejection_time": 30.0, "max_ejection_time": 300.0,
                           "max_ejection_percent": 10.0, "min_health_percent": 0.0},
     "retry_budget": {"percent": 20.0, "min_retry_concurrency": 3},
     "locality_lb": {"distribute": [{"from": "us-east/*", "to": {"us-east/z1/*": 80, "us-west/*": 20}}],
                     "failover": [{"from": "us-east", "to": "us-west"}],
                     "failover_priority": ["topology.kubernetes.io/region"]},
     "protocol": "http2" | "grpc" | "auto"}   # the port's protocol: http2 / grpc go upstream over HTTP/2;
                                              # auto (a sniffed port) in the client's protocol; absent: HTTP/1.1

CLUSTER_TLS (a DestinationRule's trafficPolicy.tls, see proxy_core/mtls_client.py)::

    {"mode": "ISTIO_MUTUAL" | "DISABLE" | "SIMPLE" | "MUTUAL",
     "sni": "api.example.com", "subject_alt_names": ["api.example.com"],
     "ca_certificates": "/path/ca.pem", "client_certificate": "/path/c.pem", "private_key": "/path/k.pem",
     "insecure_skip_verify": false}

RATE_LIMIT (a RateLimitPolicy's ``local`` part, see mesh/compiler_ratelimit.py)::

    {"policy": "default/reviews-ratelimit",
     "token_bucket": BUCKET | null,     # the service's bucket; null = only the routes are limited
     "routes": [{"name": "reviews-v2", "token_bucket": BUCKET},      # by route name, or
                {"match": MATCH, "token_bucket": BUCKET}],           # by request match
     "response_headers": false,         # x-ratelimit-limit / -remaining / -reset
     "deny_status": 429,
     "global": GLOBAL}                  # absent = no global limit (see proxy_core/quota.py)

BUCKET: ``{"max_tokens": 100, "tokens_per_fill": 100, "fill_interval": 1.0}`` (seconds).

GLOBAL (a RateLimitPolicy's ``global`` part: mesh-wide counters kept by Mixer, spent from leases)::

    {"domain": "default/productpage-ratelimit",     # counters are per domain, not per host
     "failure_mode": "FAIL_OPEN" | "FAIL_CLOSED",    # no lease to be had: allow, or answer 500 (RLSE)
     "descriptors": [                                # the first whose entries all apply counts the request
       {"entries": [{"source": "path", "match": STRING_MATCH},          # path without the query
                    {"source": "header", "header": "x-user", "match": {}},
                    {"source": "remote_address", "match": {}},        # the downstream peer's IP
                    {"source": "source_principal", "match": {}},      # cluster.local/ns/NS/sa/SA
                    {"source": "destination", "match": {}}],          # the service host
        "requests_per_unit": 100, "unit": 60.0}]}    # a fixed window of ``unit`` seconds

An entry whose ``match`` is empty takes the request's value as part of the counter's key (one
counter per distinct value, as an Envoy rate limit service descriptor without ``value``); a
non-empty match must hold, and all requests it admits share one counter.

``via`` is set when the endpoint lives on another node: the client-side proxy opens a
tunnel to that node's inbound listener (``CONNECT address:port``) instead of dialling the
endpoint directly.  Cluster names follow Envoy/Istio: ``outbound|PORT|SUBSET|HOST``.
"""
from __future__ import annotations

import base64
import ipaddress
import json
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from proxy_core.source_identity import UNKNOWN, SourceWorkload
from proxy_core.telemetry_policy import TelemetrySettings

# -- RE2 (Envoy) syntax to Python -------------------------------------------------------------


def re2_to_python(pattern: str) -> str:
    """RE2's ``\\z`` (end of text) is Python's ``\\Z``; everything else Galley accepts is shared."""
    return _translate_escapes(pattern, {"z": "\\Z"})


def re2_replacement_to_python(template: str) -> str:
    """Envoy's regex_rewrite substitution: ``\\0`` is the whole match (Python's ``\\g<0>``)."""
    return _translate_escapes(template, {"0": "\\g<0>"})


def _translate_escapes(text: str, table: Mapping[str, str]) -> str:
    if "\\" not in text:
        return text
    out, i = [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            out.append(table.get(nxt, ch + nxt))
            i += 2
        else:
            out.append(ch)
            i += 1
    return "".join(out)


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile(re2_to_python(pattern))


# -- small value objects ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class StringMatch:
    """Istio StringMatch: exactly one of exact / prefix / regex; all None means 'any value'."""

    exact: str | None = None
    prefix: str | None = None
    regex: re.Pattern[str] | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "StringMatch":
        d = d or {}
        rx = d.get("regex")
        return cls(exact=d.get("exact"), prefix=d.get("prefix"), regex=_compile(rx) if rx is not None else None)

    def matches(self, value: str | None, ignore_case: bool = False) -> bool:
        if value is None:
            return False
        if self.exact is not None:
            return value.lower() == self.exact.lower() if ignore_case else value == self.exact
        if self.prefix is not None:
            return value.lower().startswith(self.prefix.lower()) if ignore_case else value.startswith(self.prefix)
        if self.regex is not None:
            return self.regex.fullmatch(value) is not None
        return True


@dataclass(frozen=True, slots=True)
class HeaderOps:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "HeaderOps":
        d = d or {}
        return cls(
            set=tuple((k.lower(), str(v)) for k, v in (d.get("set") or {}).items()),
            add=tuple((k.lower(), str(v)) for k, v in (d.get("add") or {}).items()),
            remove=tuple(k.lower() for k in (d.get("remove") or ())),
        )

    def __bool__(self) -> bool:
        return bool(self.set or self.add or self.remove)


@dataclass(frozen=True, slots=True)
class Headers:
    request: HeaderOps = HeaderOps()
    response: HeaderOps = HeaderOps()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "Headers":
        d = d or {}
        return cls(HeaderOps.from_dict(d.get("request")), HeaderOps.from_dict(d.get("response")))


@dataclass(frozen=True, slots=True)
class SourceMatch:
    """Istio ``sourceLabels`` / ``sourceNamespace``: conditions on the client workload.

    ``source`` is the ``SourceWorkload`` that opened the connection, or None when nobody
    looked it up.  A namespace the proxy does not know (``unknown``) matches no condition.
    """

    labels: tuple[tuple[str, str], ...] = ()
    namespace: str | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SourceMatch | None":
        """The source conditions of a match dict, or None when it has none."""
        labels = d.get("source_labels") or {}
        namespace = d.get("source_namespace")
        if not isinstance(labels, Mapping):
            raise ValueError(f"source_labels must be a map of label to value, not {labels!r}")
        if not labels and not namespace:
            return None
        return cls(tuple(sorted((str(k), str(v)) for k, v in labels.items())),
                   str(namespace) if namespace else None)

    def matches(self, source: SourceWorkload | None) -> bool:
        if source is None:
            return False
        namespace = self.namespace
        if namespace is not None and (source.namespace != namespace or namespace == UNKNOWN):
            return False
        have = source.labels
        return all(pair in have for pair in self.labels)


def _uses_source(matches: Any) -> bool:
    return any(m.source is not None for m in matches)


@dataclass(frozen=True, slots=True)
class Match:
    uri: StringMatch | None = None
    scheme: StringMatch | None = None
    method: StringMatch | None = None
    authority: StringMatch | None = None
    headers: tuple[tuple[str, StringMatch], ...] = ()
    without_headers: tuple[tuple[str, StringMatch], ...] = ()
    query_params: tuple[tuple[str, StringMatch], ...] = ()
    port: int | None = None
    ignore_uri_case: bool = False
    source: SourceMatch | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Match":
        def sm(key: str) -> StringMatch | None:
            return StringMatch.from_dict(d[key]) if d.get(key) is not None else None

        def smap(key: str) -> tuple[tuple[str, StringMatch], ...]:
            return tuple((k.lower() if key != "query_params" else k, StringMatch.from_dict(v))
                         for k, v in (d.get(key) or {}).items())

        return cls(uri=sm("uri"), scheme=sm("scheme"), method=sm("method"), authority=sm("authority"),
                   headers=smap("headers"), without_headers=smap("without_headers"),
                   query_params=smap("query_params"), port=d.get("port"),
                   ignore_uri_case=bool(d.get("ignore_uri_case", False)), source=SourceMatch.from_dict(d))


@dataclass(frozen=True, slots=True)
class WeightedCluster:
    cluster: str
    weight: int = 100
    headers: Headers = Headers()


@dataclass(frozen=True, slots=True)
class Redirect:
    uri: str | None = None
    authority: str | None = None
    port: int | None = None
    scheme: str | None = None
    redirect_code: int = 301


@dataclass(frozen=True, slots=True)
class DirectResponse:
    status: int
    body: bytes = b""


@dataclass(frozen=True, slots=True)
class Rewrite:
    uri: str | None = None
    authority: str | None = None
    uri_regex: tuple[re.Pattern[str], str] | None = None


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Envoy's retry policy of a route.  ``statuses`` are the response statuses it retries,
    worked out once here from ``retry_on`` (a response is checked against them every time):

    ============================  =========================================================
    ``retry_on`` entry            statuses retried
    ============================  =========================================================
    ``5xx``                       500 and above
    ``gateway-error``             502, 503, 504
    ``retriable-4xx``             409
    ``retriable-status-codes``    ``retriable_status_codes`` (Envoy needs this entry for
                                  the list to count)
    ``"503"`` (a number)          that status (Istio accepts ``retryOn: "503,5xx"``)
    ============================  =========================================================
    """

    attempts: int = 0
    per_try_timeout: float | None = None
    retry_on: frozenset[str] = frozenset()
    retriable_status_codes: frozenset[int] = frozenset()
    statuses: frozenset[int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        on = self.retry_on
        codes = {int(x) for x in on if x.isdigit()}
        if "5xx" in on:
            codes.update(range(500, 1000))
        elif "gateway-error" in on:
            codes.update((502, 503, 504))
        if "retriable-4xx" in on:
            codes.add(409)
        if "retriable-status-codes" in on:
            codes.update(self.retriable_status_codes)
        object.__setattr__(self, "statuses", frozenset(codes))


@dataclass(frozen=True, slots=True)
class Fault:
    delay: float | None = None              # seconds
    delay_percentage: float = 100.0
    abort_status: int | None = None
    abort_percentage: float = 100.0
    abort_grpc_status: int | None = None    # gRPC code of a trailers-only abort (Istio ``grpcStatus``)


@dataclass(frozen=True, slots=True)
class CorsPolicy:
    """Envoy's CORS filter configuration for one route; header values are pre-joined once here."""

    allow_origins: tuple[StringMatch, ...] = ()
    allow_methods: str = ""
    allow_headers: str = ""
    expose_headers: str = ""
    max_age: str = ""                       # seconds as the header carries them; "" = not sent
    allow_credentials: bool = False
    forward_unmatched_preflights: bool = True   # Istio unmatchedPreflights FORWARD (the default)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CorsPolicy":
        max_age = d.get("max_age")
        return cls(allow_origins=tuple(StringMatch.from_dict(m) for m in d.get("allow_origins") or ()),
                   allow_methods=",".join(d.get("allow_methods") or ()),
                   allow_headers=",".join(d.get("allow_headers") or ()),
                   expose_headers=",".join(d.get("expose_headers") or ()),
                   max_age=str(int(max_age)) if max_age is not None else "",
                   allow_credentials=bool(d.get("allow_credentials")),
                   forward_unmatched_preflights=d.get("unmatched_preflights", "FORWARD") != "IGNORE")


@dataclass(frozen=True, slots=True)
class MirrorPolicy:
    """One request mirror: a sampled, fire-and-forget copy of the request to ``cluster``."""

    cluster: str
    percentage: float = 100.0


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    matches: tuple[Match, ...] = ()
    clusters: tuple[WeightedCluster, ...] = ()
    redirect: Redirect | None = None
    direct_response: DirectResponse | None = None
    rewrite: Rewrite | None = None
    timeout: float | None = None
    retries: RetryPolicy | None = None
    fault: Fault | None = None
    headers: Headers = Headers()
    total_weight: int = 0
    cors: CorsPolicy | None = None
    mirrors: tuple[MirrorPolicy, ...] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Route":
        clusters = tuple(WeightedCluster(c["cluster"], int(c.get("weight", 100)), Headers.from_dict(c.get("headers")))
                         for c in d.get("route") or ())
        rd = d.get("redirect")
        dr = d.get("direct_response")
        rw = d.get("rewrite")
        rt = d.get("retries")
        ft = d.get("fault")
        rewrite = None
        if rw:
            rx = rw.get("uri_regex")
            rewrite = Rewrite(uri=rw.get("uri"), authority=rw.get("authority"),
                              uri_regex=(_compile(rx["match"]), re2_replacement_to_python(rx["rewrite"]))
                              if rx else None)
        fault = None
        if ft:
            dl, ab = ft.get("delay") or {}, ft.get("abort") or {}
            fault = Fault(delay=dl.get("fixed_delay"), delay_percentage=float(dl.get("percentage", 100.0)),
                          abort_status=ab.get("http_status"), abort_percentage=float(ab.get("percentage", 100.0)),
                          abort_grpc_status=ab.get("grpc_status"))
        body: str | bytes = (dr or {}).get("body", "")
        if dr and "body_base64" in dr:
            body = base64.b64decode(dr["body_base64"])
        return cls(
            name=d.get("name", ""),
            matches=tuple(Match.from_dict(m) for m in d.get("match") or ()),
            clusters=clusters,
            redirect=Redirect(uri=rd.get("uri"), authority=rd.get("authority"), port=rd.get("port"),
                              scheme=rd.get("scheme"), redirect_code=int(rd.get("redirect_code", 301))) if rd else None,
            direct_response=DirectResponse(int(dr["status"]), body.encode() if isinstance(body, str) else body)
            if dr else None,
            rewrite=rewrite,
            timeout=d.get("timeout"),
            retries=RetryPolicy(int(rt.get("attempts", 0)), rt.get("per_try_timeout"),
                                frozenset(rt.get("retry_on") or ()),
                                frozenset(int(c) for c in rt.get("retriable_status_codes") or ()))
            if rt else None,
            fault=fault,
            headers=Headers.from_dict(d.get("headers")),
            total_weight=sum(c.weight for c in clusters),
            cors=CorsPolicy.from_dict(d["cors"]) if d.get("cors") is not None else None,
            mirrors=tuple(MirrorPolicy(m["cluster"], float(m.get("percentage", 100.0)))
                          for m in d.get("mirrors") or ()),
        )


@dataclass(frozen=True, slots=True)
class VirtualHost:
    name: str
    host: str
    port: int | None
    domains: frozenset[str]
    routes: tuple[Route, ...]
    uses_source: bool = False   # a match tests the client workload: the proxy must look it up first

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "VirtualHost":
        routes = tuple(Route.from_dict(r) for r in d.get("routes") or ())
        return cls(name=d.get("name", d.get("host", "")), host=d.get("host", ""), port=d.get("port"),
                   domains=frozenset(x.lower() for x in d.get("domains") or ()), routes=routes,
                   uses_source=any(_uses_source(r.matches) for r in routes))


@dataclass(frozen=True, slots=True)
class Address:
    address: str
    port: int


@dataclass(frozen=True, slots=True)
class Endpoint:
    address: str
    port: int
    node: str = ""
    labels: tuple[tuple[str, str], ...] = ()
    via: Address | None = None
    namespace: str = ""
    service_account: str = ""
    mtls_mode: str = ""          # the destination's PeerAuthentication mode; "" = no proxy in front of it
    locality: str = ""           # "region/zone/subzone" (locality-aware load balancing); "" = unknown
    # Derived once: the request path uses them for every request (LB bookkeeping, pooling).
    key: str = field(init=False, compare=False, repr=False)                  # "address:port"
    pool_key: tuple[str, Address | None] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        key = f"{self.address}:{self.port}"
        object.__setattr__(self, "key", key)
        object.__setattr__(self, "pool_key", (key, self.via))


@dataclass(frozen=True, slots=True)
class LbPolicy:
    policy: str = "LEAST_REQUEST"
    hash_header: str | None = None
    hash_cookie: str | None = None
    hash_cookie_ttl: float = 0.0
    hash_cookie_path: str | None = None
    hash_source_ip: bool = False
    hash_query_param: str | None = None
    ring_size: int = 1024

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "LbPolicy":
        d = d or {}
        h = d.get("hash") or {}
        cookie = h.get("cookie") or {}
        return cls(policy=d.get("policy", "LEAST_REQUEST"), hash_header=(h.get("header") or "").lower() or None,
                   hash_cookie=cookie.get("name"), hash_cookie_ttl=float(cookie.get("ttl") or 0.0),
                   hash_cookie_path=cookie.get("path"), hash_source_ip=bool(h.get("source_ip")),
                   hash_query_param=h.get("query_param"), ring_size=int(d.get("ring_size", 1024)))


@dataclass(frozen=True, slots=True)
class ClusterTls:
    """Istio ClientTLSSettings for one cluster (DestinationRule ``trafficPolicy.tls``)."""

    mode: str                                  # ISTIO_MUTUAL | DISABLE | SIMPLE | MUTUAL
    sni: str | None = None
    subject_alt_names: tuple[str, ...] = ()
    ca_certificates: str | None = None
    client_certificate: str | None = None
    private_key: str | None = None
    insecure_skip_verify: bool = False

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "ClusterTls | None":
        if not d:
            return None
        mode = str(d["mode"]).upper()
        if mode not in ("ISTIO_MUTUAL", "DISABLE", "SIMPLE", "MUTUAL"):
            raise ValueError(f"cluster tls mode {mode!r}: want ISTIO_MUTUAL, DISABLE, SIMPLE or MUTUAL")
        return cls(mode, d.get("sni"), tuple(d.get("subject_alt_names") or ()), d.get("ca_certificates"),
                   d.get("client_certificate"), d.get("private_key"), bool(d.get("insecure_skip_verify")))


@dataclass(frozen=True, slots=True)
class TcpKeepalive:
    """Istio ``connectionPool.tcp.tcpKeepalive``: SO_KEEPALIVE plus the kernel's probe timing
    (None leaves the system default, as Envoy does)."""

    time: float | None = None          # TCP_KEEPIDLE, seconds idle before the first probe
    interval: float | None = None      # TCP_KEEPINTVL, seconds between probes
    probes: int | None = None          # TCP_KEEPCNT, unanswered probes before the connection is dropped


UNLIMITED = 2 ** 32 - 1   # Istio's default for every connectionPool limit (Envoy's threshold max)


@dataclass(frozen=True, slots=True)
class ConnectionPool:
    """Envoy circuit breaker thresholds and upstream connection options of one cluster
    (Istio ``connectionPool``); enforced by ``proxy_core.circuit``."""

    max_connections: int = UNLIMITED           # tcp.maxConnections (cluster wide)
    max_pending_requests: int = UNLIMITED      # http.http1MaxPendingRequests (waiting for a connection)
    max_requests: int = UNLIMITED              # http.http2MaxRequests (active requests)
    max_requests_per_connection: int = 0       # http.maxRequestsPerConnection; 0 = unlimited
    max_retries: int = UNLIMITED               # http.maxRetries (retries outstanding at once)
    max_concurrent_streams: int = 0            # http.maxConcurrentStreams (HTTP/2 upstreams); 0 = default
    idle_timeout: float | None = None          # http.idleTimeout: an idle upstream connection is closed
    max_connection_duration: float | None = None   # tcp.maxConnectionDuration: a connection's lifetime
    tcp_keepalive: TcpKeepalive | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "ConnectionPool | None":
        if not d:
            return None
        ka = d.get("tcp_keepalive")
        idle = d.get("idle_timeout")
        duration = d.get("max_connection_duration")
        return cls(
            max_connections=_limit(d, "max_connections"), max_pending_requests=_limit(d, "max_pending_requests"),
            max_requests=_limit(d, "max_requests"),
            max_requests_per_connection=int(d.get("max_requests_per_connection") or 0),
            max_retries=_limit(d, "max_retries"), max_concurrent_streams=int(d.get("max_concurrent_streams") or 0),
            idle_timeout=float(idle) if idle else None,
            max_connection_duration=float(duration) if duration else None,
            tcp_keepalive=TcpKeepalive(_opt_float(ka.get("time")), _opt_float(ka.get("interval")),
                                       int(ka["probes"]) if ka.get("probes") else None) if ka is not None else None)


def _limit(d: Mapping[str, Any], key: str) -> int:
    value = d.get(key)
    if value is None:
        return UNLIMITED
    if int(value) < 0:
        raise ValueError(f"connection_pool.{key} cannot be negative, got {value}")
    return int(value)


def _opt_float(value: Any) -> float | None:
    return float(value) if value else None


@dataclass(frozen=True, slots=True)
class OutlierDetection:
    """Envoy outlier detection as Istio configures it (``outlierDetection``); defaults are Istio's.

    A threshold of 0 turns that detector off.  With ``split_external_local_origin_errors``
    (Istio sets it when ``consecutiveLocalOriginFailures`` is given) connect failures, resets
    and timeouts count only as local-origin failures; otherwise they count as 503s.
    """

    consecutive_5xx: int = 5
    consecutive_gateway_errors: int = 0
    consecutive_local_origin_failures: int = 5
    split_external_local_origin_errors: bool = False
    interval: float = 10.0
    base_ejection_time: float = 30.0
    max_ejection_time: float = 300.0
    max_ejection_percent: float = 10.0
    min_health_percent: float = 0.0

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "OutlierDetection | None":
        if d is None:
            return None
        out = cls(**{k: type(getattr(cls(), k))(v) for k, v in d.items() if k in _OUTLIER_FIELDS})
        if out.interval <= 0 or out.base_ejection_time <= 0:
            raise ValueError("outlier_detection interval and base_ejection_time must be positive")
        return out


_OUTLIER_FIELDS = frozenset(OutlierDetection.__dataclass_fields__)


@dataclass(frozen=True, slots=True)
class RetryBudget:
    """Envoy's retry budget: retries outstanding at once may not exceed ``percent`` of the
    cluster's active plus pending requests, nor fall below ``min_retry_concurrency``."""

    percent: float = 20.0
    min_retry_concurrency: int = 3

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "RetryBudget | None":
        if d is None:
            return None
        return cls(float(d.get("percent", 20.0)), int(d.get("min_retry_concurrency", 3)))


@dataclass(frozen=True, slots=True)
class LocalityLb:
    """Istio ``localityLbSetting`` (on only when outlier detection is set, as in Istio).

    ``distribute``: (from, ((to, weight), ...)) entries; ``failover``: (from region, to region);
    ``failover_priority``: label names, most significant first.  All empty: Istio's default
    failover (same subzone, zone, region, then the rest).
    """

    distribute: tuple[tuple[str, tuple[tuple[str, int], ...]], ...] = ()
    failover: tuple[tuple[str, str], ...] = ()
    failover_priority: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "LocalityLb | None":
        if d is None:
            return None
        return cls(
            distribute=tuple((str(e["from"]), tuple((str(k), int(v)) for k, v in (e.get("to") or {}).items()))
                             for e in d.get("distribute") or ()),
            failover=tuple((str(e["from"]), str(e["to"])) for e in d.get("failover") or ()),
            failover_priority=tuple(str(x) for x in d.get("failover_priority") or ()))


@dataclass(frozen=True, slots=True)
class Cluster:
    name: str
    service: str
    port: int
    subset: str
    lb: LbPolicy
    endpoints: tuple[Endpoint, ...]
    connect_timeout: float = 10.0
    passthrough: bool = False
    tls: ClusterTls | None = None
    connection_pool: ConnectionPool | None = None
    outlier_detection: OutlierDetection | None = None
    retry_budget: RetryBudget | None = None
    locality_lb: LocalityLb | None = None
    http2: bool = False     # requests go upstream over HTTP/2 (port protocol http2 or grpc)
    # A sniffed (auto) port: HTTP/2 requests go upstream over HTTP/2, HTTP/1.1 ones over HTTP/1.1
    # (Envoy's use_downstream_protocol_config).
    use_downstream_protocol: bool = False

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any]) -> "Cluster":
        eps = []
        for e in d.get("endpoints") or ():
            via = e.get("via")
            eps.append(Endpoint(address=e["address"], port=int(e["port"]), node=e.get("node", ""),
                                labels=tuple(sorted((e.get("labels") or {}).items())),
                                via=Address(via["address"], int(via["port"])) if via else None,
                                namespace=e.get("namespace", ""), service_account=e.get("service_account", ""),
                                mtls_mode=e.get("mtls_mode", ""), locality=e.get("locality") or ""))
        return cls(name=name, service=d.get("service", ""), port=int(d.get("port", 0)), subset=d.get("subset", ""),
                   lb=LbPolicy.from_dict(d.get("lb")), endpoints=tuple(eps),
                   connect_timeout=float(d.get("connect_timeout", 10.0)), passthrough=bool(d.get("passthrough")),
                   tls=ClusterTls.from_dict(d.get("tls")),
                   connection_pool=ConnectionPool.from_dict(d.get("connection_pool")),
                   outlier_detection=OutlierDetection.from_dict(d.get("outlier_detection")),
                   retry_budget=RetryBudget.from_dict(d.get("retry_budget")),
                   locality_lb=LocalityLb.from_dict(d.get("locality_lb")),
                   http2=d.get("protocol") in HTTP2_PROTOCOLS,
                   use_downstream_protocol=d.get("protocol") == "auto")


@dataclass(frozen=True, slots=True)
class Vip:
    address: str
    port: int
    host: str
    protocol: str = "http"


# Cluster protocols that Envoy reaches over HTTP/2 (Istio port protocols HTTP2 and GRPC).
HTTP2_PROTOCOLS = frozenset(("http2", "grpc"))

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
DEFAULT_TCP_IDLE_TIMEOUT = 3600.0   # Envoy tcp_proxy's idle timeout as Istio sets it (1 hour)


def _in_subnets(address: str, subnets: tuple[IpNetwork, ...]) -> bool:
    """True when ``subnets`` is empty or one of them contains ``address``."""
    if not subnets:
        return True
    ip = ipaddress.ip_address(address)
    return any(ip in net for net in subnets)


def _subnets(d: Mapping[str, Any]) -> tuple[IpNetwork, ...]:
    return tuple(ipaddress.ip_network(n, strict=False) for n in d.get("destination_subnets") or ())


@dataclass(frozen=True, slots=True)
class TcpMatch:
    """Istio L4MatchAttributes left for the proxy: the destination (VIP) address's subnets and
    the client workload's labels and namespace."""

    destination_subnets: tuple[IpNetwork, ...] = ()
    source: SourceMatch | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TcpMatch":
        return cls(_subnets(d), SourceMatch.from_dict(d))

    def matches(self, address: str, source: SourceWorkload | None = None) -> bool:
        if self.source is not None and not self.source.matches(source):
            return False
        return _in_subnets(address, self.destination_subnets)


@dataclass(frozen=True, slots=True)
class TcpRoute:
    """One VirtualService ``tcp`` rule: matches (OR-ed, empty = any) and weighted clusters."""

    name: str
    matches: tuple[TcpMatch, ...]
    clusters: tuple[WeightedCluster, ...]
    total_weight: int
    idle_timeout: float | None = DEFAULT_TCP_IDLE_TIMEOUT   # None: never closed for idleness

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TcpRoute":
        clusters = tuple(WeightedCluster(c["cluster"], int(c.get("weight", 100))) for c in d.get("route") or ())
        idle = float(d.get("idle_timeout", DEFAULT_TCP_IDLE_TIMEOUT))
        return cls(name=d.get("name", ""),
                   matches=tuple(TcpMatch.from_dict(m) for m in d.get("match") or ()),
                   clusters=clusters, total_weight=sum(c.weight for c in clusters),
                   idle_timeout=idle if idle > 0 else None)

    def matches_address(self, address: str, source: SourceWorkload | None = None) -> bool:
        return not self.matches or any(m.matches(address, source) for m in self.matches)


@dataclass(frozen=True, slots=True)
class TcpHost:
    """The tcp routes of one service port, in rule order."""

    name: str
    host: str
    port: int
    routes: tuple[TcpRoute, ...]
    uses_source: bool = False   # a match tests the client workload: the proxy must look it up first

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TcpHost":
        routes = tuple(TcpRoute.from_dict(r) for r in d.get("routes") or ())
        return cls(name=d.get("name", f"{d['host']}:{d['port']}"), host=d["host"], port=int(d["port"]),
                   routes=routes, uses_source=any(_uses_source(r.matches) for r in routes))

    def route_for(self, address: str, source: SourceWorkload | None = None) -> TcpRoute | None:
        """The first route matching a connection to ``address`` from ``source`` (the client
        workload, None when not looked up) (Envoy: filter chain match)."""
        return next((r for r in self.routes if r.matches_address(address, source)), None)


@dataclass(frozen=True, slots=True)
class TlsMatch:
    """Istio TLSMatchAttributes left for the proxy: SNI names (``*.`` wildcards) and VIP subnets."""

    sni_hosts: tuple[str, ...] = ()
    destination_subnets: tuple[IpNetwork, ...] = ()
    source: SourceMatch | None = None

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TlsMatch":
        return cls(tuple(str(h).lower() for h in d.get("sni_hosts") or ()), _subnets(d), SourceMatch.from_dict(d))

    def matches(self, sni: str | None, address: str, source: SourceWorkload | None = None) -> bool:
        if self.sni_hosts and (sni is None or not any(_sni_matches(h, sni) for h in self.sni_hosts)):
            return False
        if self.source is not None and not self.source.matches(source):
            return False
        return _in_subnets(address, self.destination_subnets)


def _sni_matches(pattern: str, sni: str) -> bool:
    """Envoy's server_names: exact (case-insensitive), or ``*.suffix`` for names under the suffix."""
    if pattern == "*":
        return True
    if pattern.startswith("*."):
        return sni.endswith(pattern[1:]) and len(sni) > len(pattern) - 1
    return sni == pattern


@dataclass(frozen=True, slots=True)
class TlsRoute:
    """One VirtualService ``tls`` rule: SNI matches (OR-ed, empty = any) and weighted clusters."""

    name: str
    matches: tuple[TlsMatch, ...]
    clusters: tuple[WeightedCluster, ...]
    total_weight: int
    idle_timeout: float | None = DEFAULT_TCP_IDLE_TIMEOUT

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TlsRoute":
        base = TcpRoute.from_dict(d)
        matches = tuple(TlsMatch.from_dict(m) for m in d.get("match") or ())
        return cls(base.name, matches, base.clusters, base.total_weight, base.idle_timeout)


@dataclass(frozen=True, slots=True)
class TlsHost:
    """The tls routes of one service port, in rule order."""

    name: str
    host: str
    port: int
    routes: tuple[TlsRoute, ...]
    uses_source: bool = False   # a match tests the client workload: the proxy must look it up first

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TlsHost":
        routes = tuple(TlsRoute.from_dict(r) for r in d.get("routes") or ())
        return cls(name=d.get("name", f"{d['host']}:{d['port']}"), host=d["host"], port=int(d["port"]),
                   routes=routes, uses_source=any(_uses_source(r.matches) for r in routes))

    def route_for(self, sni: str | None, address: str, source: SourceWorkload | None = None) -> TlsRoute | None:
        """The first route one of whose matches holds for ``sni`` on a connection to ``address``
        from ``source`` (the client workload, None when not looked up)."""
        name = sni.lower() if sni is not None else None
        return next((r for r in self.routes
                     if not r.matches or any(m.matches(name, address, source) for m in r.matches)), None)


@dataclass(frozen=True, slots=True)
class CacheSpec:
    """A destination service's HTTP cache (a CachePolicy); equality decides whether a config push
    keeps the cache's entries."""

    policy: str
    max_bytes: int
    max_entry_bytes: int
    default_ttl: float = 0.0      # seconds of heuristic freshness; 0: no heuristic

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "CacheSpec":
        spec = cls(str(d.get("policy", "")), int(d["max_bytes"]), int(d["max_entry_bytes"]),
                   float(d.get("default_ttl", 0.0)))
        if spec.max_bytes <= 0 or not 0 < spec.max_entry_bytes <= spec.max_bytes or spec.default_ttl < 0:
            raise ValueError(f"cache {spec.policy!r}: want 0 < max_entry_bytes <= max_bytes and default_ttl >= 0")
        return spec


@dataclass(frozen=True, slots=True)
class TokenBucketSpec:
    """Envoy's ``type.v3.TokenBucket``; equality decides whether a config push keeps a bucket."""

    max_tokens: int
    tokens_per_fill: int
    fill_interval: float          # seconds

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TokenBucketSpec":
        return cls(int(d["max_tokens"]), int(d.get("tokens_per_fill", 1)), float(d["fill_interval"]))


@dataclass(frozen=True, slots=True)
class RouteRateLimit:
    """A route's own bucket, selected by the matched route's name or by a request match."""

    bucket: TokenBucketSpec
    route_name: str | None = None
    match: Match | None = None


@dataclass(frozen=True, slots=True)
class LocalRateLimit:
    """One service's local rate limit; a route entry that applies replaces ``bucket``."""

    policy: str
    bucket: TokenBucketSpec | None
    routes: tuple[RouteRateLimit, ...] = ()
    response_headers: bool = False
    deny_status: int = 429

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "LocalRateLimit":
        tb = d.get("token_bucket")
        routes = tuple(RouteRateLimit(TokenBucketSpec.from_dict(r["token_bucket"]), r.get("name"),
                                      Match.from_dict(r["match"]) if r.get("match") is not None else None)
                       for r in d.get("routes") or ())
        status = int(d.get("deny_status", 429))
        return cls(policy=d.get("policy", ""), bucket=TokenBucketSpec.from_dict(tb) if tb else None,
                   routes=routes, response_headers=bool(d.get("response_headers")),
                   deny_status=status if status >= 400 else 429)   # Envoy: a status below 400 means 429


@dataclass(frozen=True, slots=True)
class DescriptorEntry:
    """One part of a global rate limit descriptor: where its value comes from and what it must match."""

    source: str                   # "path" | "header" | "remote_address" | "source_principal" | "destination"
    match: StringMatch
    header: str = ""              # the header's name (lower case) when source is "header"

    @property
    def per_value(self) -> bool:
        """True when every distinct value gets a counter of its own (an empty match)."""
        m = self.match
        return m.exact is None and m.prefix is None and m.regex is None


@dataclass(frozen=True, slots=True)
class GlobalDescriptor:
    entries: tuple[DescriptorEntry, ...]
    requests_per_unit: int
    unit: float                   # seconds: 1, 60, 3600 or 86400


GLOBAL_SOURCES = frozenset({"path", "header", "remote_address", "source_principal", "destination"})
FAILURE_MODES = frozenset({"FAIL_OPEN", "FAIL_CLOSED"})


@dataclass(frozen=True, slots=True)
class GlobalRateLimit:
    """One policy's global limits for a service host; counters are shared by ``domain``."""

    domain: str
    failure_mode: str
    descriptors: tuple[GlobalDescriptor, ...]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GlobalRateLimit":
        mode = str(d.get("failure_mode", "FAIL_OPEN"))
        if mode not in FAILURE_MODES:
            raise ValueError(f"global rate limit failure_mode {mode!r} is not one of {sorted(FAILURE_MODES)}")
        descriptors = []
        for desc in d.get("descriptors") or ():
            entries = []
            for e in desc.get("entries") or ():
                if e["source"] not in GLOBAL_SOURCES:
                    raise ValueError(f"global rate limit entry source {e['source']!r} is not one of "
                                     f"{sorted(GLOBAL_SOURCES)}")
                entries.append(DescriptorEntry(e["source"], StringMatch.from_dict(e.get("match")),
                                               str(e.get("header", "")).lower()))
            descriptors.append(GlobalDescriptor(tuple(entries), int(desc["requests_per_unit"]), float(desc["unit"])))
        return cls(str(d["domain"]), mode, tuple(descriptors))


GATEWAY_TLS_MODES = ("SIMPLE", "MUTUAL", "OPTIONAL_MUTUAL")
SECRET_CERT, SECRET_KEY, SECRET_CA = "tls.crt", "tls.key", "ca.crt"   # a Kubernetes TLS Secret's keys
CACERT_SUFFIX = "-cacert"        # Istio: MUTUAL's client CA may be a Secret of its own, ``<name>-cacert``
TLS_VERSIONS = ("TLSV1_0", "TLSV1_1", "TLSV1_2", "TLSV1_3")


@dataclass(frozen=True, slots=True)
class GatewayTls:
    """How one HTTPS server of the gateway terminates TLS (Istio ServerTLSSettings): with files
    on the node, or with ``credential_name``, a Secret whose material the supervisor pushes to
    this proxy alone (``proxy_core.gateway_tls.GatewaySecrets``); the snapshot holds its name only."""

    mode: str
    server_certificate: str = ""
    private_key: str = ""
    ca_certificates: str = ""
    credential_name: str = ""
    min_protocol_version: str = ""
    max_protocol_version: str = ""
    cipher_suites: tuple[str, ...] = ()
    subject_alt_names: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GatewayTls":
        mode = str(d.get("mode", ""))
        if mode not in GATEWAY_TLS_MODES:
            raise ValueError(f"gateway tls mode {mode!r} is not one of {list(GATEWAY_TLS_MODES)}")
        credential = str(d.get("credential_name") or "")
        if not credential and not (d.get("server_certificate") and d.get("private_key")):
            raise ValueError("gateway tls needs credential_name, or server_certificate and private_key")
        if mode != "SIMPLE" and not credential and not d.get("ca_certificates"):
            raise ValueError(f"gateway tls mode {mode} needs ca_certificates")
        for key in ("min_protocol_version", "max_protocol_version"):
            if d.get(key) and d[key] not in TLS_VERSIONS:
                raise ValueError(f"gateway tls {key} {d[key]!r} is not one of {list(TLS_VERSIONS)}")
        return cls(mode=mode, server_certificate=str(d.get("server_certificate") or ""),
                   private_key=str(d.get("private_key") or ""), ca_certificates=str(d.get("ca_certificates") or ""),
                   credential_name=credential,
                   min_protocol_version=str(d.get("min_protocol_version") or ""),
                   max_protocol_version=str(d.get("max_protocol_version") or ""),
                   cipher_suites=tuple(str(x) for x in d.get("cipher_suites") or ()),
                   subject_alt_names=tuple(str(x) for x in d.get("subject_alt_names") or ()))


PASSTHROUGH = "PASSTHROUGH"


@dataclass(frozen=True, slots=True)
class GatewayTlsServer:
    """One TLS server on a gateway port (a filter chain): the SNI names that choose it, and
    either its TLS and routes (terminated HTTPS) or, passthrough, the tls routes its
    connections are spliced by (``tls`` None)."""

    name: str
    server_names: tuple[str, ...]     # empty: any name (a server with host ``*``)
    tls: GatewayTls | None            # None: PASSTHROUGH
    virtual_hosts: tuple[VirtualHost, ...]
    passthrough: TlsHost | None = None   # PASSTHROUGH: the tls routes, in rule order

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GatewayTlsServer":
        name = str(d["name"])
        names = tuple(str(x).lower() for x in d.get("server_names") or ())
        if str((d.get("tls") or {}).get("mode")) == PASSTHROUGH:
            routes = TlsHost.from_dict({"name": name, "host": name, "port": 0, "routes": d.get("tls_routes") or ()})
            return cls(name=name, server_names=names, tls=None, virtual_hosts=(), passthrough=routes)
        return cls(name=name, server_names=names, tls=GatewayTls.from_dict(d["tls"]),
                   virtual_hosts=tuple(VirtualHost.from_dict(v) for v in d.get("virtual_hosts") or ()))


GATEWAY_PROTOCOLS = ("http", "http2", "grpc", "grpc-web", "https", "tls", "tcp")
TLS_GATEWAY_PROTOCOLS = ("https", "tls")   # ports whose connections start with a ClientHello


@dataclass(frozen=True, slots=True)
class GatewayListener:
    """One port of the ingress gateway: where it binds and the virtual hosts it routes by
    (``servers``, on ``https`` / ``tls`` ports, are its TLS filter chains, each routed by its
    own; ``tcp`` ports splice by ``tcp``)."""

    name: str
    address: str
    port: int
    protocol: str
    virtual_hosts: tuple[VirtualHost, ...]
    servers: tuple[GatewayTlsServer, ...] = ()
    tcp: TcpHost | None = None        # ``tcp`` ports: the tcp routes, in rule order

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "GatewayListener":
        port = int(d["port"])
        if not 0 <= port <= 65535:
            raise ValueError(f"gateway listener port {port} is out of range")
        protocol = str(d.get("protocol", "http"))
        if protocol not in GATEWAY_PROTOCOLS:
            raise ValueError(f"gateway listener protocol {protocol!r} is not one of {list(GATEWAY_PROTOCOLS)}")
        name = str(d.get("name") or f"gateway:{port}")
        tcp = (TcpHost.from_dict({"name": name, "host": name, "port": port, "routes": d.get("tcp_routes") or ()})
               if protocol == "tcp" else None)
        return cls(name=name, address=str(d.get("address") or "127.0.0.1"), port=port, protocol=protocol,
                   virtual_hosts=tuple(VirtualHost.from_dict(v) for v in d.get("virtual_hosts") or ()),
                   servers=tuple(GatewayTlsServer.from_dict(x) for x in d.get("servers") or ()), tcp=tcp)

    @property
    def tls(self) -> bool:
        """Connections start with a TLS ClientHello that picks one of ``servers``."""
        return self.protocol in TLS_GATEWAY_PROTOCOLS


@dataclass(frozen=True, slots=True)
class Gateway:
    """The ingress gateway a gateway node's proxy stands for: its identity and listeners."""

    namespace: str
    service_account: str
    workload: str
    labels: Mapping[str, str]
    listeners: tuple[GatewayListener, ...]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> "Gateway | None":
        if not d:
            return None
        return cls(namespace=str(d.get("namespace", "istio-system")),
                   service_account=str(d.get("service_account", "istio-ingressgateway-service-account")),
                   workload=str(d.get("workload", "istio-ingressgateway")),
                   labels={str(k): str(v) for k, v in (d.get("labels") or {}).items()},
                   listeners=tuple(GatewayListener.from_dict(x) for x in d.get("listeners") or ()))


@dataclass(frozen=True, slots=True)
class Snapshot:
    """An immutable, pre-parsed proxy configuration.  ``raw`` keeps the dict it came from."""

    version: str
    node_id: str
    http_proxy: Address | None
    inbound: Address | None
    outbound_policy: str
    vips: tuple[Vip, ...]
    virtual_hosts: tuple[VirtualHost, ...]
    clusters: Mapping[str, Cluster]
    # AuthorizationPolicy / RequestAuthentication, scoped per policy (see mesh/compiler_security.py);
    # proxy_core.authz and proxy_core.jwt_auth build per-workload checkers from them.
    security: Mapping[str, Any] = field(default_factory=dict)
    rate_limits: Mapping[str, LocalRateLimit] = field(default_factory=dict)   # by service host
    global_rate_limits: Mapping[str, GlobalRateLimit] = field(default_factory=dict)   # by service host
    tcp_routes: Mapping[tuple[str, int], TcpHost] = field(default_factory=dict)  # by (host, port)
    tls_routes: Mapping[tuple[str, int], TlsHost] = field(default_factory=dict)  # by (host, port)
    caches: Mapping[str, CacheSpec] = field(default_factory=dict)                # by destination service host
    # Percent of requests without a caller's decision that start a trace (proxy_core.tracing);
    # None: the proxy's own default (--trace-sampling).
    tracing_sampling: float | None = None
    # This proxy's node: its locality ("region/zone/subzone") and labels, which locality-aware
    # load balancing compares endpoints against.
    node_locality: str = ""
    node_labels: Mapping[str, str] = field(default_factory=dict)
    # Istio's Telemetry API resolved per destination workload (proxy_core.telemetry_policy).
    telemetry: TelemetrySettings = field(default_factory=TelemetrySettings)
    gateway: Gateway | None = None     # gateway nodes only: the ingress gateway's listeners
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "Snapshot":
        listeners = d.get("listeners") or {}

        def addr(key: str) -> Address | None:
            a = listeners.get(key)
            return Address(a.get("host", "127.0.0.1"), int(a.get("port", 0))) if a else None

        return cls(
            version=str(d["version"]),
            node_id=(d.get("node") or {}).get("id", ""),
            http_proxy=addr("http_proxy"),
            inbound=addr("inbound"),
            outbound_policy=d.get("outbound_policy", "ALLOW_ANY"),
            vips=tuple(Vip(v["address"], int(v["port"]), v["host"], v.get("protocol", "http"))
                       for v in d.get("vips") or ()),
            virtual_hosts=tuple(VirtualHost.from_dict(v) for v in d.get("virtual_hosts") or ()),
            clusters={name: Cluster.from_dict(name, c) for name, c in (d.get("clusters") or {}).items()},
            security={k: list((d.get("security") or {}).get(k) or ()) for k in ("authz", "jwt")},
            rate_limits={host: LocalRateLimit.from_dict(rl) for host, rl in (d.get("rate_limits") or {}).items()},
            global_rate_limits={host: GlobalRateLimit.from_dict(rl["global"])
                                for host, rl in (d.get("rate_limits") or {}).items() if rl.get("global")},
            tcp_routes={(t.host, t.port): t for t in (TcpHost.from_dict(x) for x in d.get("tcp_routes") or ())},
            tls_routes={(t.host, t.port): t for t in (TlsHost.from_dict(x) for x in d.get("tls_routes") or ())},
            caches={host: CacheSpec.from_dict(c) for host, c in (d.get("caches") or {}).items()},
            tracing_sampling=_sampling((d.get("tracing") or {}).get("sampling")),
            node_locality=(d.get("node") or {}).get("locality") or "",
            node_labels={str(k): str(v) for k, v in ((d.get("node") or {}).get("labels") or {}).items()},
            telemetry=TelemetrySettings.from_dict(d.get("telemetry")),
            gateway=Gateway.from_dict(d.get("gateway")),
            raw=d,
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> "Snapshot":
        return cls.from_dict(json.loads(text))


def _sampling(value: Any) -> float | None:
    """``tracing.sampling``: a percentage in [0, 100], or absent."""
    if value is None:
        return None
    rate = float(value)
    if not 0.0 <= rate <= 100.0:
        raise ValueError(f"tracing.sampling must be a percentage in [0, 100], got {value}")
    return rate


def cluster_name(host: str, port: int, subset: str = "") -> str:
    """Envoy/Istio outbound cluster name: ``outbound|9080|v1|reviews.default.svc.cluster.local``."""
    return f"outbound|{port}|{subset}|{host}"
