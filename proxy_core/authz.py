"""AuthorizationPolicy enforcement for one destination workload, with Istio's semantics.

The enforcing proxy (``proxy_core.security_filter``) builds one ``Authorizer`` per
destination workload from the snapshot's ``security.authz`` list (format:
``mesh.compiler_security``) and calls ``check`` once per request.  Everything that can be decided ahead of time is: which policies select the
workload, every value list turned into sets / prefix tuples / compiled templates, and a
closure per rule for HTTP and another for TCP traffic.  ``check`` then only reads request
attributes, so a typical policy costs a few microseconds.

Evaluation order (Istio): CUSTOM, then DENY (any match denies), then ALLOW: when at least
one ALLOW policy selects the workload, some ALLOW rule must match, else the request is
denied; with no ALLOW policy the request is allowed.  AUDIT policies only set
``Decision.audit``.  A policy without rules matches nothing (an ALLOW policy without rules
therefore denies everything); a rule ``{}`` matches everything.  Policies annotated
``istio.io/dry-run`` are never enforced.

CUSTOM delegates to an external authorizer raymesh does not host; a request it matches is
denied, as Envoy's ext_authz does when its provider is unreachable.

Fields a rule cannot evaluate fail closed, as Istio does for TCP traffic: HTTP-only fields
(request principals, hosts, methods, paths, request headers, ``request.auth.*``) on a TCP
connection, and fields or condition keys raymesh does not support (``trustDomains``,
``experimental.envoy.filters.*``).  In an ALLOW or AUDIT policy such a rule is dropped
(it matches nothing); in a DENY or CUSTOM policy the field is ignored, so the rule matches
more requests, never fewer.

``check_peer`` answers for an opaque tunnel at the destination node's inbound listener,
which knows only the peer's identity and the destination address: it denies only what
``check`` would deny for every request the tunnel could carry (``_compile_peer_rule``).

String values follow Istio: exact ``abc``, prefix ``abc*``, suffix ``*abc``, presence
``*`` (any non-empty value); ``paths`` also accept Envoy URI templates (``{*}`` one path
segment, ``{**}`` any number of segments).  Hosts compare case-insensitively against the
authority as the client sent it (so ``example.com`` does not match ``example.com:8080``;
list ``example.com:*`` as Istio recommends).  Paths are compared after ``normalize_path``.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, Mapping, Sequence

__all__ = ["RequestAttributes", "Decision", "Authorizer", "normalize_path", "original_client_ip",
           "principal_namespace", "selects"]

ALLOW, DENY, AUDIT, CUSTOM = "ALLOW", "DENY", "AUDIT", "CUSTOM"
_BROADEN = (CUSTOM, DENY)      # actions whose unusable fields are ignored rather than drop the rule

Ip = ipaddress.IPv4Address | ipaddress.IPv6Address
Net = ipaddress.IPv4Network | ipaddress.IPv6Network


# -- request attributes ----------------------------------------------------------------------


@dataclass(slots=True)
class RequestAttributes:
    """What Istio's RBAC filter knows about a request (or a TCP connection when ``http`` is False).

    ``source_principal`` is the sending workload's SPIFFE id without ``spiffe://`` ("" for
    an unidentified client, see ``proxy_core.security_filter.source_principal``);
    ``remote_ip`` is the original client (``original_client_ip``), "" meaning ``source_ip``;
    ``headers`` have lower-case names; ``path`` is the request target as received (query
    allowed); ``request_principal``/``audiences``/``presenter``/``claims`` come from a
    verified JWT (``proxy_core.jwt_auth``).  ``source_namespace`` None means "read it from
    the principal", which is where Istio takes it from.
    """

    source_principal: str = ""
    source_ip: str = ""
    remote_ip: str = ""
    destination_ip: str = ""
    destination_port: int = 0
    host: str = ""
    method: str = ""
    path: str = ""
    headers: Mapping[str, str] = field(default_factory=dict)
    request_principal: str = ""
    audiences: tuple[str, ...] = ()
    presenter: str = ""
    claims: Mapping[str, Any] = field(default_factory=dict)
    sni: str = ""
    source_namespace: str | None = None
    http: bool = True
    _norm_path: str | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def namespace(self) -> str:
        ns = self.source_namespace
        return principal_namespace(self.source_principal) if ns is None else ns

    @property
    def service_account(self) -> str:
        """``ns/sa`` from a ``<trust domain>/ns/<ns>/sa/<sa>`` principal, "" otherwise."""
        parts = self.source_principal.split("/")
        if len(parts) == 5 and parts[1] == "ns" and parts[3] == "sa":
            return f"{parts[2]}/{parts[4]}"
        return ""

    @property
    def normalized_path(self) -> str:
        p = self._norm_path
        if p is None:
            p = self._norm_path = normalize_path(self.path)
        return p

    @property
    def client_ip(self) -> str:
        return self.remote_ip or self.source_ip


def principal_namespace(principal: str) -> str:
    """The namespace in ``cluster.local/ns/<ns>/sa/<sa>``; "" when the principal has none."""
    i = principal.find("/ns/")
    if i < 0:
        return ""
    rest = principal[i + 4:]
    j = rest.find("/")
    return rest if j < 0 else rest[:j]


def original_client_ip(peer_ip: str, xff: str | None, num_trusted_proxies: int = 0) -> str:
    """The address ``remoteIpBlocks`` / ``remote.ip`` compare, per Istio's ``numTrustedProxies``.

    With N trusted proxies in front of the mesh, the client is the Nth address from the
    right of ``X-Forwarded-For``; with none (the default) or a shorter header it is the
    peer of the connection, so a client cannot choose its address by sending the header.
    """
    if num_trusted_proxies <= 0 or not xff:
        return peer_ip
    hops = [h.strip() for h in xff.split(",") if h.strip()]
    return hops[-num_trusted_proxies] if len(hops) >= num_trusted_proxies else peer_ip


# -- path normalization ----------------------------------------------------------------------

_PCT = re.compile(r"%([0-9A-Fa-f]{2})")
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")


def _pct(m: re.Match[str]) -> str:
    ch = chr(int(m.group(1), 16))
    return ch if ch in _UNRESERVED else "%" + m.group(1).upper()


def normalize_path(path: str) -> str:
    """The path policies see: Istio's default (BASE) normalization, query and fragment removed.

    As Envoy's ``normalize_path``: backslashes become slashes, percent-encoded unreserved
    characters are decoded (so ``/%61dmin`` is ``/admin``) and other escapes upper-cased,
    and ``.``/``..`` segments are resolved (RFC 3986 5.2.4).  Without this, ``/public/../admin``
    would slip past a DENY on ``/admin*``.
    """
    for sep in "?#":
        i = path.find(sep)
        if i >= 0:
            path = path[:i]
    if "\\" in path:
        path = path.replace("\\", "/")
    if "%" in path:
        path = _PCT.sub(_pct, path)
    if "." in path:
        path = _remove_dot_segments(path)
    return path


def _remove_dot_segments(path: str) -> str:
    absolute = path.startswith("/")
    segs = path.split("/")[1:] if absolute else path.split("/")
    out: list[str] = []
    for s in segs:
        if s == "..":
            if out:
                out.pop()
        elif s != ".":
            out.append(s)
    if segs and segs[-1] in (".", ".."):
        out.append("")
    return ("/" if absolute else "") + "/".join(out)


# -- value matchers --------------------------------------------------------------------------

# Envoy's URI template: {*} is one non-empty segment, {**} any run of characters including "/".
_PCHARS = r"a-zA-Z0-9\-._~%!$&'()+,;:@="
_TEMPLATE_OPS = {"{*}": f"[{_PCHARS}]+", "{**}": f"[{_PCHARS}/]*"}
_TEMPLATE_SPLIT = re.compile(r"(\{\*\*\}|\{\*\})")


def _template(value: str) -> re.Pattern[str]:
    return re.compile("".join(_TEMPLATE_OPS.get(part, re.escape(part)) for part in _TEMPLATE_SPLIT.split(value)))


@dataclass(frozen=True, slots=True)
class _Values:
    """One Istio value list: exact / ``prefix*`` / ``*suffix`` / ``*`` (/ path templates)."""

    exact: frozenset[str]
    prefixes: tuple[str, ...]
    suffixes: tuple[str, ...]
    presence: bool
    templates: tuple[re.Pattern[str], ...]
    fold: bool

    @classmethod
    def of(cls, values: Sequence[str], *, fold: bool = False, templates: bool = False) -> "_Values":
        exact, prefixes, suffixes, tpl, presence = set(), [], [], [], False
        for v in values:
            v = v.lower() if fold else v
            if v == "*":
                presence = True
            elif templates and ("{*}" in v or "{**}" in v):
                tpl.append(_template(v))
            elif v.endswith("*"):
                prefixes.append(v[:-1])
            elif v.startswith("*"):
                suffixes.append(v[1:])
            else:
                exact.add(v)
        return cls(frozenset(exact), tuple(prefixes), tuple(suffixes), presence, tuple(tpl), fold)

    def match(self, value: str | None) -> bool:
        if not value:
            return False
        if self.fold:
            value = value.lower()
        if self.presence or value in self.exact:
            return True
        if self.prefixes and value.startswith(self.prefixes):
            return True
        if self.suffixes and value.endswith(self.suffixes):
            return True
        for t in self.templates:
            if t.fullmatch(value):
                return True
        return False

    def match_any(self, values: Sequence[Any]) -> bool:
        return any(isinstance(v, str) and self.match(v) for v in values)


@lru_cache(maxsize=4096)
def _ip(text: str) -> Ip | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


@dataclass(frozen=True, slots=True)
class _Nets:
    nets: tuple[Net, ...]

    @classmethod
    def of(cls, values: Sequence[str]) -> "_Nets":
        return cls(tuple(ipaddress.ip_network(v, strict=False) for v in values))

    def match(self, value: str) -> bool:
        ip = _ip(value) if value else None
        if ip is None:
            return False
        for n in self.nets:
            if ip.version == n.version and ip in n:
                return True
        return False


def _ports(values: Sequence[str]) -> frozenset[int]:
    return frozenset(int(v) for v in values)


# -- predicates ------------------------------------------------------------------------------

Pred = Callable[[RequestAttributes], bool]
# Where a predicate can be evaluated.  PEER fields (the source identity, the destination
# address) are known even on an opaque tunnel at the destination node's inbound listener;
# ANY fields on every connection the client-side proxy sees; HTTP_ONLY ones on requests.
ANY, HTTP_ONLY, UNSUPPORTED, PEER = 0, 1, 2, 3


def _negate(p: Pred) -> Pred:
    return lambda a: not p(a)


def _source_pred(name: str, values: Sequence[str]) -> tuple[Pred, int]:
    positive = name.removeprefix("not_")
    pred: Pred
    if positive == "principals":
        v = _Values.of(values)
        pred, kind = (lambda a: v.match(a.source_principal)), PEER
    elif positive == "request_principals":
        v = _Values.of(values)
        pred, kind = (lambda a: v.match(a.request_principal)), HTTP_ONLY
    elif positive == "namespaces":
        v = _Values.of(values)
        pred, kind = (lambda a: v.match(a.namespace)), PEER
    elif positive == "ip_blocks":
        n = _Nets.of(values)
        pred, kind = (lambda a: n.match(a.source_ip)), ANY
    elif positive == "remote_ip_blocks":
        n = _Nets.of(values)
        pred, kind = (lambda a: n.match(a.client_ip)), ANY
    elif positive == "service_accounts":
        accounts = frozenset(values)
        pred, kind = (lambda a: a.service_account in accounts), PEER
    else:
        raise ValueError(f"unknown source field {name!r}")
    return (_negate(pred) if name.startswith("not_") else pred), kind


def _operation_pred(name: str, values: Sequence[str]) -> tuple[Pred, int]:
    positive = name.removeprefix("not_")
    pred: Pred
    if positive == "hosts":
        v = _Values.of(values, fold=True)
        pred, kind = (lambda a: v.match(a.host)), HTTP_ONLY
    elif positive == "ports":
        ports = _ports(values)
        pred, kind = (lambda a: a.destination_port in ports), ANY
    elif positive == "methods":
        v = _Values.of(values)
        pred, kind = (lambda a: v.match(a.method)), HTTP_ONLY
    elif positive == "paths":
        v = _Values.of(values, templates=True)
        pred, kind = (lambda a: v.match(a.normalized_path)), HTTP_ONLY
    else:
        raise ValueError(f"unknown operation field {name!r}")
    return (_negate(pred) if name.startswith("not_") else pred), kind


def _claim(claims: Mapping[str, Any], path: Sequence[str]) -> Any:
    cur: Any = claims
    for key in path:
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(key)
    return cur


def _condition_getter(key: str, args: Sequence[str]) -> tuple[Callable[[RequestAttributes], Any], int, bool]:
    """(attribute getter, where it can be evaluated, whether values are IP blocks)."""
    if key == "request.headers" and len(args) == 1:
        name = args[0]
        return (lambda a: a.headers.get(name)), HTTP_ONLY, False
    if key == "request.auth.claims" and args:
        path = tuple(args)
        return (lambda a: _claim(a.claims, path)), HTTP_ONLY, False
    simple: dict[str, tuple[Callable[[RequestAttributes], Any], int, bool]] = {
        "source.ip": (lambda a: a.source_ip, ANY, True),
        "remote.ip": (lambda a: a.client_ip, ANY, True),
        "destination.ip": (lambda a: a.destination_ip, PEER, True),
        "source.namespace": (lambda a: a.namespace, PEER, False),
        "source.principal": (lambda a: a.source_principal, PEER, False),
        "request.auth.principal": (lambda a: a.request_principal, HTTP_ONLY, False),
        "request.auth.audiences": (lambda a: a.audiences, HTTP_ONLY, False),
        "request.auth.presenter": (lambda a: a.presenter, HTTP_ONLY, False),
        "destination.port": (lambda a: a.destination_port, ANY, False),
        "connection.sni": (lambda a: a.sni, ANY, False),
    }
    if key in simple and not args:
        return simple[key]
    return (lambda a: None), UNSUPPORTED, False


def _condition_pred(cond: Mapping[str, Any]) -> tuple[Pred, int]:
    key = cond.get("key", "")
    getter, kind, is_ip = _condition_getter(key, cond.get("args") or ())
    if kind == UNSUPPORTED:
        return (lambda a: False), UNSUPPORTED

    def matcher(values: Sequence[str]) -> Callable[[Any], bool] | None:
        if not values:
            return None
        if is_ip:
            nets = _Nets.of(values)
            return lambda x: nets.match(x)
        if key == "destination.port":
            ports = _ports(values)
            return lambda x: x in ports
        v = _Values.of(values)
        return lambda x: v.match_any(x) if isinstance(x, (list, tuple)) else isinstance(x, str) and v.match(x)

    yes, no = matcher(cond.get("values") or ()), matcher(cond.get("not_values") or ())

    def pred(a: RequestAttributes) -> bool:
        x = getter(a)
        if yes is not None and not yes(x):
            return False
        return no is None or not no(x)

    return pred, kind


# -- rules and policies ----------------------------------------------------------------------


def _usable(preds: Sequence[tuple[Pred, int]], http: bool, broaden: bool) -> list[Pred] | None:
    """The predicates evaluable on this traffic; None when the whole rule must be dropped."""
    out = []
    for pred, kind in preds:
        if kind == ANY or kind == PEER or (kind == HTTP_ONLY and http):
            out.append(pred)
        elif not broaden:
            return None
    return out


def _group(d: Mapping[str, Sequence[str]], build: Callable[[str, Sequence[str]], tuple[Pred, int]]
           ) -> list[tuple[Pred, int]]:
    preds = [build(k, v) for k, v in d.items() if k != "unsupported" and v]
    preds += [((lambda a: False), UNSUPPORTED) for _ in d.get("unsupported") or ()]
    return preds


def _all(preds: Sequence[Pred]) -> Pred:
    ps = tuple(preds)

    def match(a: RequestAttributes) -> bool:
        for p in ps:
            if not p(a):
                return False
        return True

    return match


def _any(preds: Sequence[Pred]) -> Pred:
    ps = tuple(preds)

    def match(a: RequestAttributes) -> bool:
        for p in ps:
            if p(a):
                return True
        return False

    return match


def _compile_rule(rule: Mapping[str, Any], http: bool, broaden: bool) -> Pred | None:
    parts: list[Pred] = []
    conds = _usable([_condition_pred(c) for c in rule.get("when") or ()], http, broaden)
    if conds is None:
        return None
    parts += conds
    for key, build in (("from", _source_pred), ("to", _operation_pred)):
        alternatives = []
        for item in rule.get(key) or ():
            preds = _usable(_group(item, build), http, broaden)
            if preds is None:
                return None
            alternatives.append(_all(preds))
        if alternatives:
            parts.append(_any(alternatives))
    return _all(parts)


def _peer_usable(preds: Sequence[tuple[Pred, int]], allow: bool) -> list[Pred] | None:
    """``_usable`` for a tunnel at the destination's inbound listener, where only PEER fields
    are known.  ALLOW: other fields are assumed to hold (the rule matches more); DENY: a
    part using one is uncertain (None).  UNSUPPORTED fields act as at the client's proxy:
    they drop an ALLOW rule and are ignored in a DENY rule."""
    out = []
    for pred, kind in preds:
        if kind == PEER:
            out.append(pred)
        elif kind == UNSUPPORTED:
            if allow:
                return None
        elif not allow:
            return None
    return out


def _compile_peer_rule(rule: Mapping[str, Any], allow: bool) -> Pred | None:
    """A rule as the inbound listener can decide it, from the peer's identity alone.

    The tunnel's bytes are not parsed there, so the check must never refuse a tunnel that
    carries something the client's proxy would allow: ALLOW rules are widened to what they
    might match (an over-approximation), DENY rules narrowed to what they surely match (an
    under-approximation: a ``from`` alternative that needs an unknown field is left out,
    and a rule left with none, or with an unknown ``when`` condition, is dropped).
    """
    parts: list[Pred] = []
    conds = _peer_usable([_condition_pred(c) for c in rule.get("when") or ()], allow)
    if conds is None:
        return None
    parts += conds
    for key, build in (("from", _source_pred), ("to", _operation_pred)):
        items = rule.get(key) or ()
        alternatives = []
        for item in items:
            preds = _peer_usable(_group(item, build), allow)
            if preds is None:
                if allow:
                    return None      # an UNSUPPORTED field: the client's proxy drops this rule too
                continue
            alternatives.append(_all(preds))
        if items and not alternatives:
            return None
        if alternatives:
            parts.append(_any(alternatives))
    return _all(parts)


def selects(entry: Mapping[str, Any], namespace: str, labels: Mapping[str, str], service: str | None = None) -> bool:
    """Whether a compiled policy (its SCOPE keys) applies to the workload.

    Root-namespace policies apply in every namespace, others in their own; ``targetRefs``
    name services of the policy's namespace; ``selector`` labels must all be present.
    """
    if entry.get("target_services") is not None:
        return entry.get("namespace") == namespace and service in entry["target_services"]
    if not entry.get("mesh_wide") and entry.get("namespace") != namespace:
        return False
    selector = entry.get("selector") or {}
    return all(labels.get(k) == v for k, v in selector.items())


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of ``Authorizer.check``.

    ``policy`` is Istio's effective policy id (``ns[foo]-policy[bar]-rule[0]``) of the rule
    that decided, None when no rule did (allowed because no ALLOW policy applies, or denied
    because none of them matched); ``action`` is that policy's action.  ``audit`` is True
    when an AUDIT policy matched.
    """

    allowed: bool
    policy: str | None = None
    action: str | None = None
    audit: bool = False


_ALLOWED = Decision(True)
_ALLOWED_AUDIT = Decision(True, audit=True)
_NO_ALLOW_MATCH = Decision(False)
_NO_ALLOW_MATCH_AUDIT = Decision(False, audit=True)

_RuleTable = tuple[tuple[str, Pred], ...]


@dataclass(frozen=True, slots=True)
class _Tables:
    """Compiled rules by action for one kind of traffic (HTTP or TCP)."""

    custom: _RuleTable
    deny: _RuleTable
    allow: _RuleTable
    audit: _RuleTable


class Authorizer:
    """Istio AuthorizationPolicy for one destination workload (namespace, labels, service)."""

    __slots__ = ("_http", "_tcp", "_peer", "_has_allow", "policies")

    def __init__(self, policies: Sequence[Mapping[str, Any]], namespace: str, labels: Mapping[str, str],
                 service: str | None = None) -> None:
        selected = [p for p in policies if not p.get("dry_run") and selects(p, namespace, labels, service)]
        self.policies: tuple[str, ...] = tuple(f"{p['namespace']}/{p['name']}" for p in selected)
        self._has_allow = any(p.get("action", ALLOW) == ALLOW for p in selected)
        self._http = self._tables(selected, http=True)
        self._tcp = self._tables(selected, http=False)
        self._peer = self._tables(selected, http=False, peer=True)

    @property
    def enabled(self) -> bool:
        """False when no enforced policy selects the workload: ``check`` would allow everything."""
        return bool(self.policies)

    @staticmethod
    def _tables(policies: Sequence[Mapping[str, Any]], http: bool, peer: bool = False) -> _Tables:
        by_action: dict[str, list[tuple[str, Pred]]] = {CUSTOM: [], DENY: [], ALLOW: [], AUDIT: []}
        for p in policies:
            action = p.get("action", ALLOW)
            if peer and action == AUDIT:
                continue        # audited where the traffic is parsed, once
            for i, rule in enumerate(p.get("rules") or ()):
                pred = (_compile_peer_rule(rule, allow=action not in _BROADEN) if peer
                        else _compile_rule(rule, http, broaden=action in _BROADEN))
                if pred is not None:
                    by_action[action].append((f"ns[{p['namespace']}]-policy[{p['name']}]-rule[{i}]", pred))
        return _Tables(*(tuple(by_action[a]) for a in (CUSTOM, DENY, ALLOW, AUDIT)))

    def check(self, attrs: RequestAttributes) -> Decision:
        return self._decide(self._http if attrs.http else self._tcp, attrs)

    def check_peer(self, attrs: RequestAttributes) -> Decision:
        """Whether a tunnel from ``attrs.source_principal`` to ``attrs.destination_ip`` may
        carry anything at all, decided at the destination node's inbound listener, which
        does not parse it: denied only when every request or connection it could carry is
        denied by ``check`` at the client's proxy (see ``_compile_peer_rule``)."""
        return self._decide(self._peer, attrs)

    def _decide(self, t: _Tables, attrs: RequestAttributes) -> Decision:
        audit = False
        for _, pred in t.audit:
            if pred(attrs):
                audit = True
                break
        for action, table in ((CUSTOM, t.custom), (DENY, t.deny)):
            for rule_id, pred in table:
                if pred(attrs):
                    return Decision(False, rule_id, action, audit)
        if not self._has_allow:
            return _ALLOWED_AUDIT if audit else _ALLOWED
        for rule_id, pred in t.allow:
            if pred(attrs):
                return Decision(True, rule_id, ALLOW, audit)
        return _NO_ALLOW_MATCH_AUDIT if audit else _NO_ALLOW_MATCH
