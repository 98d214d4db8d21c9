"""VirtualService translation: Istio ``http`` rules -> the snapshot's ROUTE dicts.

Scope for node proxies (the mesh "gateway"):

* A VirtualService applies when its ``gateways`` list is empty or names ``mesh``; one bound
  only to other gateways is skipped here (``mesh.compiler_gateways`` compiles those for the
  ingress gateway's listeners), and so is a match whose own ``gateways`` list leaves
  ``mesh`` out.  Every translation takes a ``scope``: ``mesh``, or the ``namespace/name`` of
  the Gateway being compiled, which a match's ``gateways`` must then name (a short name is
  relative to the VirtualService's namespace, as in Istio).
* For each service host one VirtualService wins: exact host before wildcard, longer
  wildcard before shorter, then (namespace, name) order.  Istio merges VirtualServices
  only for gateways and lets the oldest win for sidecars; raymesh stores no creation time,
  so (namespace, name) stands in for age.
* ``sourceLabels`` / ``sourceNamespace`` become the match's ``source_labels`` /
  ``source_namespace`` on every kind of rule (http, tcp, tls).  A node proxy serves every
  client on its node, so it cannot read them off the connection as a sidecar knows its own
  pod: it asks the kernel which local workload opened the connection
  (``proxy_core.source_identity``) and tests that workload's registered labels and
  namespace, only for hosts that have such a match.  A client it cannot identify matches no
  source condition and falls through to the next rule.  At an ingress gateway listener the
  source is the gateway itself (``GATEWAY_LABELS`` in ``istio-system``), as in Istio, where
  such a match selects the gateway pods.  An empty ``sourceLabels`` map is no condition.
* A match with ``port`` applies only to that port's virtual host.
* ``corsPolicy`` becomes the route's ``cors`` on every kind of rule (Envoy's per-route CORS
  config); ``maxAge`` travels as whole seconds (validation rejects fractions, as Istio's does).
* ``mirror`` (+ ``mirrorPercentage``, legacy ``mirrorPercent``; unset means 100%) and
  ``mirrors[]`` become the route's ``mirrors``, on ``route`` rules only, as in Istio; an
  explicit 0% drops the mirror.  Mirror clusters are named like any destination's.
* ``tcp`` rules apply to ports whose protocol is TCP (``translate_tcp_routes``): a match's
  ``port`` selects the port as for http, ``destinationSubnets`` travel to the proxy (matched
  against the VIP a client dialled), and so do the source conditions.  As in Istio, a port whose rules have no catch-all gets the service's own cluster
  as a last route, so a connection matching no rule still reaches the service.
* ``fault.abort.grpcStatus`` becomes a trailers-only gRPC reply with that code (HTTP 200).
* ``tls`` rules apply to ports whose protocol is TLS or HTTPS (``translate_tls_routes``), as
  Envoy's SNI filter chains: a match's ``sniHosts`` (lower-cased; ``*.`` wildcards),
  ``destinationSubnets`` and source conditions travel to the proxy, ``port`` selects the
  port.  The service's own cluster is the last route (Istio's
  passthrough filter chain), so a name no rule claims still reaches the service.
* At an ingress gateway (``mesh.compiler_gateways``) ``translate_tcp_rules`` and
  ``translate_tls_rules`` give the same rules for a Gateway scope (a match's ``gateways``
  must name it), without the default route: a gateway has no service of its own.
* ``delegate``, ``delay.exponentialDelay`` and ``retryRemoteLocalities`` are not translated yet.
* ``redirect.derivePort``: FROM_PROTOCOL_DEFAULT with an explicit scheme becomes that
  scheme's port (80/443); otherwise the redirect keeps the request's port.
"""
from __future__ import annotations

import base64
import binascii
from typing import Any, Callable, Mapping, Sequence

from mesh.compiler_services import Service, host_covers, resolve_host, specificity
from mesh.durations import parse_duration
from mesh.resources import Resource
from proxy_core.grpc_wire import GRPC_STATUS_CODES
from proxy_core.snapshot import cluster_name

# Istio's default HTTP retry policy (pilot/pkg/networking/core/route/retry/retry.go).
DEFAULT_RETRY_ON = ("connect-failure", "refused-stream", "unavailable", "cancelled", "retriable-status-codes")
DEFAULT_RETRIABLE_STATUS_CODES = (503,)
DEFAULT_RETRY_ATTEMPTS = 2

ServiceLookup = Callable[[str], "Service | None"]


def default_retries() -> dict[str, Any]:
    return {"attempts": DEFAULT_RETRY_ATTEMPTS, "retry_on": list(DEFAULT_RETRY_ON),
            "retriable_status_codes": list(DEFAULT_RETRIABLE_STATUS_CODES)}


def default_route(host: str, port: int) -> dict[str, Any]:
    """The route Istio gives a service port no VirtualService claims: everything to its cluster."""
    return {"name": "default", "match": [], "route": [{"cluster": cluster_name(host, port), "weight": 100}],
            "retries": default_retries()}


def default_tcp_route(host: str, port: int) -> dict[str, Any]:
    """The tcp route of a TCP service port no VirtualService rule claims: its own cluster."""
    return {"name": "default", "match": [], "route": [{"cluster": cluster_name(host, port), "weight": 100}]}


MESH = "mesh"   # the scope of the node proxies (Istio's reserved gateway name for sidecars)


def gateway_ref(ref: str, namespace: str) -> str:
    """A gateway reference of a VirtualService in ``namespace`` as ``ns/name``; ``mesh`` stays."""
    return ref if ref == MESH or "/" in ref else f"{namespace}/{ref}"


def bound_gateways(vs: Resource) -> frozenset[str]:
    """The scopes ``vs`` applies to: ``mesh`` and/or gateways as ``ns/name`` (none listed: ``mesh``)."""
    return frozenset(gateway_ref(str(g), vs.namespace) for g in vs.spec.get("gateways") or (MESH,))


def binds_mesh(vs: Resource) -> bool:
    return MESH in bound_gateways(vs)


def select_virtual_service(host: str, virtual_services: Sequence[Resource]) -> Resource | None:
    """The mesh VirtualService for ``host`` (input in (namespace, name) order, mesh-bound only)."""
    best: tuple[tuple[int, int], int] | None = None
    chosen = None
    for order, vs in enumerate(virtual_services):
        for raw in vs.spec.get("hosts") or ():
            pattern = resolve_host(str(raw), vs.namespace)
            if host_covers(pattern, host):
                key = (specificity(pattern, host), order)
                if best is None or key < best:
                    best, chosen = key, vs
    return chosen


def translate_http_routes(vs: Resource, port: int, lookup: ServiceLookup, scope: str = MESH) -> list[dict[str, Any]]:
    """The routes of ``vs`` for the virtual host on ``port`` of ``scope``, in rule order."""
    out = []
    for index, rule in enumerate(vs.spec.get("http") or ()):
        route = _translate_rule(vs, index, rule, port, lookup, scope)
        if route is not None:
            out.append(route)
    return out


def translate_tcp_routes(vs: Resource | None, host: str, port: int, lookup: ServiceLookup) -> list[dict[str, Any]]:
    """The tcp routes of the TCP port ``host:port``: the rules of ``vs`` that apply, in order,
    then the default route unless one of them already matches every connection."""
    out = translate_tcp_rules(vs, port, lookup) if vs is not None else []
    if not any(not r["match"] or any(not m for m in r["match"]) for r in out):
        out.append(default_tcp_route(host, port))
    return out


def translate_tcp_rules(vs: Resource, port: int, lookup: ServiceLookup, scope: str = MESH) -> list[dict[str, Any]]:
    """The ``tcp`` rules of ``vs`` that apply to ``port`` of ``scope``, in order (no default)."""
    out = []
    for index, rule in enumerate(vs.spec.get("tcp") or ()):
        raw_matches = rule.get("match") or []
        matches = [m for m in (_translate_l4_match(r, port, scope, vs.namespace) for r in raw_matches)
                   if m is not None]
        if (raw_matches and not matches) or not rule.get("route"):
            continue
        destinations = _translate_destinations(vs, rule["route"], port, lookup)
        if destinations:
            out.append({"name": f"{vs.namespace}/{vs.name}/{index}", "match": matches, "route": destinations})
    return out


def translate_tls_routes(vs: Resource | None, host: str, port: int, lookup: ServiceLookup) -> list[dict[str, Any]]:
    """The tls routes of the TLS port ``host:port``: the rules of ``vs`` that apply, in order,
    then the default route (the service's own cluster for any SNI)."""
    out = translate_tls_rules(vs, port, lookup) if vs is not None else []
    out.append(default_tcp_route(host, port))
    return out


def translate_tls_rules(vs: Resource, port: int, lookup: ServiceLookup, scope: str = MESH) -> list[dict[str, Any]]:
    """The ``tls`` rules of ``vs`` that apply to ``port`` of ``scope``, in order (no default)."""
    out = []
    for index, rule in enumerate(vs.spec.get("tls") or ()):
        matches = [m for m in (_translate_tls_match(r, port, scope, vs.namespace) for r in rule.get("match") or ())
                   if m is not None]
        if not matches or not rule.get("route"):
            continue
        destinations = _translate_destinations(vs, rule["route"], port, lookup)
        if destinations:
            out.append({"name": f"{vs.namespace}/{vs.name}/{index}", "match": matches, "route": destinations})
    return out


def _translate_tls_match(m: Mapping[str, Any], port: int, scope: str, namespace: str) -> dict[str, Any] | None:
    """One TLSMatchAttributes, or None when it cannot apply to the listener on ``port`` of ``scope``."""
    l4 = _translate_l4_match(m, port, scope, namespace)
    if l4 is None:
        return None
    return {"sni_hosts": [str(h).lower() for h in m.get("sniHosts") or ()], **l4}


def _applies_to_port(m: Mapping[str, Any], port: int, scope: str = MESH, namespace: str = "") -> bool:
    """Whether a match (HTTP or L4) of a VirtualService in ``namespace`` can select traffic of
    ``scope`` on ``port``: matches for other gateways or for another port cannot."""
    gateways = m.get("gateways")
    if gateways and scope not in {gateway_ref(str(g), namespace) for g in gateways}:
        return False
    return m.get("port") is None or int(m["port"]) == port


def _source_conditions(m: Mapping[str, Any]) -> dict[str, Any]:
    """``sourceLabels`` / ``sourceNamespace`` of any match kind, as the proxy tests them."""
    out: dict[str, Any] = {}
    if m.get("sourceLabels"):
        out["source_labels"] = {str(k): str(v) for k, v in m["sourceLabels"].items()}
    if m.get("sourceNamespace"):
        out["source_namespace"] = str(m["sourceNamespace"])
    return out


def _translate_l4_match(m: Mapping[str, Any], port: int, scope: str, namespace: str) -> dict[str, Any] | None:
    """One L4MatchAttributes, or None when it cannot apply to the listener on ``port`` of ``scope``."""
    if not _applies_to_port(m, port, scope, namespace):
        return None
    subnets = [str(n) for n in m.get("destinationSubnets") or ()]
    return {**({"destination_subnets": subnets} if subnets else {}), **_source_conditions(m)}


def _translate_rule(vs: Resource, index: int, rule: Mapping[str, Any], port: int,
                    lookup: ServiceLookup, scope: str) -> dict[str, Any] | None:
    raw_matches = rule.get("match") or []
    matches = [m for m in (_translate_match(r, port, scope, vs.namespace) for r in raw_matches) if m is not None]
    if raw_matches and not matches:
        return None
    out: dict[str, Any] = {"name": rule.get("name") or f"{vs.namespace}/{vs.name}/{index}", "match": matches}
    if rule.get("redirect"):
        out["redirect"] = _translate_redirect(rule["redirect"])
    elif rule.get("directResponse"):
        out["direct_response"] = _translate_direct_response(rule["directResponse"])
    elif rule.get("route"):
        out["route"] = _translate_destinations(vs, rule["route"], port, lookup)
        if rule.get("rewrite"):
            out["rewrite"] = _translate_rewrite(rule["rewrite"])
        timeout = parse_duration(rule["timeout"]) if rule.get("timeout") else 0.0
        if timeout > 0:  # Istio: 0s (or unset) disables the route timeout
            out["timeout"] = timeout
        out["retries"] = translate_retries(rule.get("retries"))
        mirrors = _translate_mirrors(vs, rule, port, lookup)
        if mirrors:
            out["mirrors"] = mirrors
    else:
        return None  # delegate-only rule
    if rule.get("corsPolicy") is not None:
        out["cors"] = translate_cors(rule["corsPolicy"])
    if rule.get("fault"):
        fault = translate_fault(rule["fault"])
        if fault:
            out["fault"] = fault
    if rule.get("headers"):
        out["headers"] = translate_headers(rule["headers"])
    return out


def _string_match(sm: Mapping[str, Any] | None) -> dict[str, str]:
    """Istio StringMatch; ``{}`` stays empty (header present / absent)."""
    return {k: str(sm[k]) for k in ("exact", "prefix", "regex") if sm and sm.get(k) is not None}


def _translate_match(m: Mapping[str, Any], port: int, scope: str, namespace: str) -> dict[str, Any] | None:
    """One HTTPMatchRequest, or None when it cannot apply to the virtual host on ``port`` of ``scope``."""
    if not _applies_to_port(m, port, scope, namespace):
        return None
    out: dict[str, Any] = {}
    for key in ("uri", "scheme", "method", "authority"):
        if m.get(key) is not None:
            out[key] = _string_match(m[key])
    if m.get("headers"):
        out["headers"] = {str(k).lower(): _string_match(v) for k, v in m["headers"].items()}
    if m.get("withoutHeaders"):
        out["without_headers"] = {str(k).lower(): _string_match(v) for k, v in m["withoutHeaders"].items()}
    if m.get("queryParams"):
        out["query_params"] = {str(k): _string_match(v) for k, v in m["queryParams"].items()}
    if m.get("port") is not None:
        out["port"] = int(m["port"])
    if m.get("ignoreUriCase"):
        out["ignore_uri_case"] = True
    out.update(_source_conditions(m))
    return out


def _destination_port(dest: Mapping[str, Any], service: Service | None, vhost_port: int) -> int:
    """Istio GetDestinationCluster: explicit port, else the service's only port, else the listener's."""
    explicit = (dest.get("port") or {}).get("number")
    if explicit is not None:
        return int(explicit)
    if service is not None and len(service.ports) == 1:
        return service.ports[0].number
    return vhost_port


def _weights(routes: Sequence[Mapping[str, Any]]) -> list[int]:
    """Istio: a single destination takes 100; several use their weights.

    Several destinations without any weight are rejected by validation; should such a rule
    reach the compiler anyway it splits evenly rather than sending nothing.
    """
    if len(routes) == 1:
        return [100]
    weights = [int(r.get("weight") or 0) for r in routes]
    if sum(weights) > 0:
        return weights
    share, extra = divmod(100, len(routes))
    return [share + (1 if i < extra else 0) for i in range(len(routes))]


def _destination_cluster(vs: Resource, dest: Mapping[str, Any], port: int, lookup: ServiceLookup) -> str:
    """Istio Destination -> ``outbound|PORT|SUBSET|HOST``."""
    host = resolve_host(str(dest["host"]), vs.namespace)
    return cluster_name(host, _destination_port(dest, lookup(host), port), str(dest.get("subset") or ""))


def _translate_destinations(vs: Resource, routes: Sequence[Mapping[str, Any]], port: int,
                            lookup: ServiceLookup) -> list[dict[str, Any]]:
    out = []
    for r, weight in zip(routes, _weights(routes)):
        if weight <= 0:
            continue  # never selected; Envoy drops zero-weight clusters too
        entry: dict[str, Any] = {"cluster": _destination_cluster(vs, r["destination"], port, lookup),
                                 "weight": weight}
        if r.get("headers"):
            entry["headers"] = translate_headers(r["headers"])
        out.append(entry)
    return out


def translate_headers(headers: Mapping[str, Any]) -> dict[str, Any]:
    """Istio Headers (request/response set/add/remove) with lower-case names."""
    out: dict[str, Any] = {}
    for side in ("request", "response"):
        ops = headers.get(side) or {}
        side_out: dict[str, Any] = {}
        for op in ("set", "add"):
            if ops.get(op):
                side_out[op] = {str(k).lower(): str(v) for k, v in ops[op].items()}
        if ops.get("remove"):
            side_out["remove"] = [str(k).lower() for k in ops["remove"]]
        if side_out:
            out[side] = side_out
    return out


def translate_retries(retries: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """Istio ConvertPolicy: absent -> default policy; attempts 0 -> no retries.

    Numeric ``retryOn`` entries are HTTP status codes: they become ``retriable_status_codes``
    and imply ``retriable-status-codes``.  A ``retryOn`` given replaces the default list and
    the default status codes.
    """
    if retries is None:
        return default_retries()
    attempts = int(retries.get("attempts") or 0)
    if attempts <= 0:
        return None
    out = default_retries()
    out["attempts"] = attempts
    if retries.get("retryOn"):
        conditions: list[str] = []
        codes: list[int] = []
        for token in str(retries["retryOn"]).split(","):
            token = token.strip()
            if token.isdigit():
                if int(token) not in codes:
                    codes.append(int(token))
            elif token and token not in conditions:
                conditions.append(token)
        if codes and "retriable-status-codes" not in conditions:
            conditions.append("retriable-status-codes")
        out["retry_on"] = conditions
        out["retriable_status_codes"] = codes
    if retries.get("perTryTimeout"):
        out["per_try_timeout"] = parse_duration(retries["perTryTimeout"])
    return out


def _percentage(spec: Mapping[str, Any]) -> float:
    """``percentage.value``, else the legacy integer ``percent``; Istio: unset means 0%."""
    if spec.get("percentage") is not None:
        return float(spec["percentage"].get("value") or 0.0)
    return float(spec.get("percent") or 0)


def _mirror_percentage(rule: Mapping[str, Any]) -> float:
    """Istio mirrorPercent(): ``mirrorPercentage.value``, else legacy ``mirrorPercent``, else 100."""
    if rule.get("mirrorPercentage") is not None:
        return float(rule["mirrorPercentage"].get("value") or 0.0)
    for key in ("mirrorPercent", "mirror_percent"):
        if rule.get(key) is not None:
            return float(rule[key])
    return 100.0


def _translate_mirrors(vs: Resource, rule: Mapping[str, Any], port: int,
                       lookup: ServiceLookup) -> list[dict[str, Any]]:
    """``mirror`` and ``mirrors[]`` as Envoy request mirror policies; 0% entries are dropped."""
    out = []
    if rule.get("mirror"):
        percentage = _mirror_percentage(rule)
        if percentage > 0:
            out.append({"cluster": _destination_cluster(vs, rule["mirror"], port, lookup),
                        "percentage": percentage})
    for mirror in rule.get("mirrors") or ():
        if not mirror.get("destination"):
            continue
        percentage = 100.0 if mirror.get("percentage") is None else float(mirror["percentage"].get("value") or 0.0)
        if percentage > 0:
            out.append({"cluster": _destination_cluster(vs, mirror["destination"], port, lookup),
                        "percentage": percentage})
    return out


def translate_cors(cors: Mapping[str, Any]) -> dict[str, Any]:
    """Istio CorsPolicy -> the snapshot's CORS dict (Istio TranslateCORSPolicy).

    ``allowOrigins`` StringMatches keep their kind; the deprecated ``allowOrigin`` strings
    are exact matches.  Unset ``allowCredentials`` means false, unset ``maxAge`` sends no
    ``access-control-max-age``.
    """
    if cors.get("allowOrigins") is not None:
        origins = [m for m in (_string_match(o) for o in cors["allowOrigins"]) if m]
    else:
        origins = [{"exact": str(o)} for o in cors.get("allowOrigin") or ()]
    out: dict[str, Any] = {"allow_origins": origins}
    for key, field in (("allow_methods", "allowMethods"), ("allow_headers", "allowHeaders"),
                       ("expose_headers", "exposeHeaders")):
        if cors.get(field):
            out[key] = [str(v) for v in cors[field]]
    if cors.get("maxAge") is not None:
        out["max_age"] = int(parse_duration(cors["maxAge"]))
    if cors.get("allowCredentials"):
        out["allow_credentials"] = True
    out["unmatched_preflights"] = "IGNORE" if cors.get("unmatchedPreflights") == "IGNORE" else "FORWARD"
    return out


def translate_fault(fault: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    delay = fault.get("delay") or {}
    if delay.get("fixedDelay"):
        out["delay"] = {"fixed_delay": parse_duration(delay["fixedDelay"]), "percentage": _percentage(delay)}
    abort = fault.get("abort") or {}
    if abort.get("httpStatus") is not None:
        out["abort"] = {"http_status": int(abort["httpStatus"]), "percentage": _percentage(abort)}
    elif abort.get("grpcStatus") is not None:
        out["abort"] = {"grpc_status": GRPC_STATUS_CODES[str(abort["grpcStatus"])], "percentage": _percentage(abort)}
    return out


def _translate_redirect(rd: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {"redirect_code": int(rd.get("redirectCode") or 301)}
    for key in ("uri", "authority", "scheme"):
        if rd.get(key):
            out[key] = str(rd[key])
    if rd.get("port"):
        out["port"] = int(rd["port"])
    elif rd.get("derivePort") == "FROM_PROTOCOL_DEFAULT" and out.get("scheme"):
        out["port"] = 443 if out["scheme"].lower() == "https" else 80
    return out


def _translate_direct_response(dr: Mapping[str, Any]) -> dict[str, Any]:
    """Istio HTTPDirectResponse; ``body.bytes`` is base64.

    The snapshot carries text bodies; bytes that are not UTF-8 travel as ``body_base64``.
    """
    out: dict[str, Any] = {"status": int(dr["status"])}
    body = dr.get("body") or {}
    if body.get("string") is not None:
        out["body"] = str(body["string"])
    elif body.get("bytes") is not None:
        try:
            raw = base64.b64decode(str(body["bytes"]), validate=True)
            out["body"] = raw.decode("utf-8")
        except UnicodeDecodeError:
            out["body_base64"] = str(body["bytes"])
        except binascii.Error as exc:
            raise ValueError(f"directResponse.body.bytes is not base64: {exc}") from exc
    return out


def _translate_rewrite(rw: Mapping[str, Any]) -> dict[str, Any]:
    """Istio HTTPRewrite; RE2's ``\\1`` references work unchanged in Python's ``re.sub``."""
    out: dict[str, Any] = {}
    if rw.get("uri") is not None:
        out["uri"] = str(rw["uri"])
    if rw.get("authority"):
        out["authority"] = str(rw["authority"])
    rx = rw.get("uriRegexRewrite")
    if rx:
        out["uri_regex"] = {"match": str(rx["match"]), "rewrite": str(rx.get("rewrite") or "")}
    return out
