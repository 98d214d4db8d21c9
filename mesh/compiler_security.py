"""Istio security policies -> the snapshot's ``security`` section.

``compile_security`` turns ``AuthorizationPolicy`` and ``RequestAuthentication`` resources
into plain JSON-able dicts that ``proxy_core.authz`` and ``proxy_core.jwt_auth`` evaluate.
Policies are *not* expanded per workload: each entry keeps its scope (namespace, selector,
target services) and the enforcing proxy picks the entries that select the destination
workload when it builds its ``Authorizer`` / ``JwtAuthenticator``.  That keeps the snapshot
the size of the configuration, not configuration x workloads, and lets a workload that
registers later be covered without a recompile of the policies.

Shape (lists sorted by namespace, then name, so output is deterministic)::

    "security": {
      "authz": [POLICY, ...],
      "jwt":   [RULESET, ...]
    }

SCOPE (shared by POLICY and RULESET)::

    "name": "deny-get", "namespace": "foo",
    "mesh_wide": false,            # true: the policy lives in the root namespace and
                                   # applies to workloads of every namespace
    "selector": {"app": "httpbin"} | null,     # matchLabels; null = every workload in scope
    "target_services": ["httpbin"] | null      # targetRef(s) of kind Service (same namespace)

POLICY (AuthorizationPolicy)::

    SCOPE +
    "action": "ALLOW" | "DENY" | "AUDIT" | "CUSTOM",
    "provider": "my-ext-authz" | null,         # CUSTOM only
    "dry_run": false,                          # annotation istio.io/dry-run: never enforced
    "rules": [RULE, ...]                       # [] (or no rules field) matches nothing

RULE (every key optional; an absent key does not constrain; ``{}`` matches everything)::

    {"from": [SOURCE, ...],        # OR of sources
     "to":   [OPERATION, ...],     # OR of operations
     "when": [CONDITION, ...]}     # AND of conditions; from, to and when are AND-ed

SOURCE (fields AND-ed, values of one field OR-ed; ``not_x`` = none of the values)::

    {"principals", "not_principals", "request_principals", "not_request_principals",
     "namespaces", "not_namespaces", "ip_blocks", "not_ip_blocks",
     "remote_ip_blocks", "not_remote_ip_blocks",
     "service_accounts", "not_service_accounts",      # "ns/sa"; a bare "sa" is resolved
                                                      # to the policy's namespace here
     "unsupported"}                                   # names of fields raymesh cannot
                                                      # evaluate (e.g. trustDomains)

Each field maps to a list of strings, e.g. ``{"namespaces": ["test"], "ip_blocks": ["10.0.0.0/8"]}``.

OPERATION::

    {"hosts", "not_hosts", "ports", "not_ports", "methods", "not_methods",
     "paths", "not_paths", "unsupported"}

CONDITION (``key`` is Istio's attribute with its bracketed arguments split off)::

    {"key": "request.auth.claims", "args": ["groups"], "values": [...], "not_values": [...]}
    {"key": "request.headers", "args": ["x-token"], ...}         # header names lower-cased
    {"key": "source.ip", "args": [], ...}

String values keep Istio's forms: exact ``abc``, prefix ``abc*``, suffix ``*abc`` and
presence ``*``; paths may also hold the ``{*}`` / ``{**}`` template operators; ports are
strings.  Matching semantics live in ``proxy_core.authz``.

RULESET (RequestAuthentication)::

    SCOPE + "rules": [JWT_RULE, ...]

JWT_RULE (defaults made explicit, so the proxy applies no Istio default of its own)::

    {"issuer": "https://accounts.example.com",
     "audiences": ["bookinfo"],                   # [] = the audience is not checked
     "jwks": "{\\"keys\\": [...]}" | null,         # inline JWKS, the JSON text as written
     "jwks_uri": "https://.../jwks.json" | null,
     "timeout": 5.0,                              # seconds for a jwksUri fetch
     "from_headers": [{"name": "authorization", "prefix": "Bearer "}],
     "from_params": ["access_token"],
     "from_cookies": [],
     "output_payload_to_header": "x-jwt-payload" | null,
     "output_claim_to_headers": [{"header": "x-user", "claim": "sub"}],
     "forward_original_token": false,
     "space_delimited_claims": ["scope", "permission"]}

When a rule names no location at all, Istio reads ``Authorization: Bearer <token>`` and the
``access_token`` query parameter; the compiler writes those two out.

Choices where raymesh differs from a Kubernetes Istio, and why:

* ``CUSTOM`` delegates to an external authorizer that raymesh does not host.  The policy is
  kept (with its provider) and a request it matches is denied, which is what Envoy's
  ext_authz filter does when the provider cannot be reached (``failure_mode_allow: false``).
* ``targetRef``/``targetRefs`` of kind ``Service`` attach the policy to that service's
  workloads (the enforcing proxy plays the waypoint); other kinds (Gateway, GatewayClass,
  ServiceEntry) attach to components raymesh does not have, so those policies are left out.
"""
from __future__ import annotations

import json
import re
from typing import Any, Iterable, Mapping, Sequence

from mesh.durations import parse_duration
from mesh.resources import Resource

__all__ = ["compile_security", "ROOT_NAMESPACE", "DEFAULT_JWKS_TIMEOUT"]

ROOT_NAMESPACE = "istio-system"
DEFAULT_JWKS_TIMEOUT = 5.0          # Istio's JWTRule.timeout default
DRY_RUN_ANNOTATION = "istio.io/dry-run"
DEFAULT_SPACE_DELIMITED = ("scope", "permission")

_SOURCE_FIELDS = {
    "principals": "principals", "notPrincipals": "not_principals",
    "requestPrincipals": "request_principals", "notRequestPrincipals": "not_request_principals",
    "namespaces": "namespaces", "notNamespaces": "not_namespaces",
    "ipBlocks": "ip_blocks", "notIpBlocks": "not_ip_blocks",
    "remoteIpBlocks": "remote_ip_blocks", "notRemoteIpBlocks": "not_remote_ip_blocks",
    "serviceAccounts": "service_accounts", "notServiceAccounts": "not_service_accounts",
}
_OPERATION_FIELDS = {
    "hosts": "hosts", "notHosts": "not_hosts", "ports": "ports", "notPorts": "not_ports",
    "methods": "methods", "notMethods": "not_methods", "paths": "paths", "notPaths": "not_paths",
}
_KEY_RE = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")


def compile_security(resources: Iterable[Resource], *, root_namespace: str = ROOT_NAMESPACE) -> dict[str, Any]:
    """The ``security`` section for every proxy: ``{"authz": [...], "jwt": [...]}``."""
    authz, jwt = [], []
    for res in sorted(resources, key=lambda r: (r.namespace, r.name, r.kind)):
        if res.kind == "AuthorizationPolicy":
            policy = _authorization_policy(res, root_namespace)
            if policy is not None:
                authz.append(policy)
        elif res.kind == "RequestAuthentication":
            ruleset = _request_authentication(res, root_namespace)
            if ruleset is not None:
                jwt.append(ruleset)
    return {"authz": authz, "jwt": jwt}


# -- scope -----------------------------------------------------------------------------------


def _scope(res: Resource, root_namespace: str) -> dict[str, Any] | None:
    """Name, namespace and selection; None when the policy targets something raymesh lacks."""
    spec = res.spec
    refs = list(spec.get("targetRefs") or ())
    if spec.get("targetRef"):
        refs.append(spec["targetRef"])
    services: list[str] | None = None
    if refs:
        if any(r.get("kind") != "Service" or r.get("group") not in (None, "", "core") for r in refs):
            return None
        services = sorted({r["name"] for r in refs})
    labels = (spec.get("selector") or {}).get("matchLabels") or {}
    return {"name": res.name, "namespace": res.namespace, "mesh_wide": res.namespace == root_namespace,
            "selector": {str(k): str(v) for k, v in sorted(labels.items())} or None,
            "target_services": services}


# -- AuthorizationPolicy ---------------------------------------------------------------------


def _authorization_policy(res: Resource, root_namespace: str) -> dict[str, Any] | None:
    scope = _scope(res, root_namespace)
    if scope is None:
        return None
    spec = res.spec
    action = str(spec.get("action") or "ALLOW").upper()
    return {**scope, "action": action,
            "provider": (spec.get("provider") or {}).get("name") if action == "CUSTOM" else None,
            "dry_run": str(res.annotations.get(DRY_RUN_ANNOTATION, "")).lower() == "true",
            "rules": [_rule(r or {}, res.namespace) for r in spec.get("rules") or ()]}


def _rule(rule: Mapping[str, Any], namespace: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if rule.get("from"):
        out["from"] = [_source((f or {}).get("source") or {}, namespace) for f in rule["from"]]
    if rule.get("to"):
        out["to"] = [_fields((t or {}).get("operation") or {}, _OPERATION_FIELDS) for t in rule["to"]]
    if rule.get("when"):
        out["when"] = [_condition(c) for c in rule["when"]]
    return out


def _fields(d: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, list[str]]:
    """Copy the listed fields, snake_cased; an explicitly empty list still constrains nothing.

    Fields raymesh does not know are listed under ``unsupported`` rather than dropped, so the
    proxy can fail closed on them (see ``proxy_core.authz``).
    """
    out = {names[k]: [str(v) for v in vals] for k, vals in d.items() if k in names and vals}
    unknown = sorted(k for k, vals in d.items() if k not in names and vals)
    if unknown:
        out["unsupported"] = unknown
    return out


def _source(src: Mapping[str, Any], namespace: str) -> dict[str, list[str]]:
    out = _fields(src, _SOURCE_FIELDS)
    for key in ("service_accounts", "not_service_accounts"):
        if key in out:
            out[key] = [sa if "/" in sa else f"{namespace}/{sa}" for sa in out[key]]
    return out


def _condition(cond: Mapping[str, Any]) -> dict[str, Any]:
    """``request.auth.claims[a][b]`` -> key ``request.auth.claims``, args ``["a", "b"]``."""
    raw = str(cond.get("key", ""))
    m = _KEY_RE.match(raw)
    key, args = (m.group(1), re.findall(r"\[([^\[\]]*)\]", m.group(2))) if m else (raw, [])
    if key == "request.headers":
        args = [a.lower() for a in args]
    return {"key": key, "args": args, "values": [str(v) for v in cond.get("values") or ()],
            "not_values": [str(v) for v in cond.get("notValues") or ()]}


# -- RequestAuthentication -------------------------------------------------------------------


def _request_authentication(res: Resource, root_namespace: str) -> dict[str, Any] | None:
    scope = _scope(res, root_namespace)
    if scope is None:
        return None
    return {**scope, "rules": [_jwt_rule(r) for r in res.spec.get("jwtRules") or ()]}


def _jwt_rule(rule: Mapping[str, Any]) -> dict[str, Any]:
    headers = [{"name": str(h["name"]).lower(), "prefix": str(h.get("prefix", ""))}
               for h in rule.get("fromHeaders") or ()]
    params = [str(p) for p in rule.get("fromParams") or ()]
    cookies = [str(c) for c in rule.get("fromCookies") or ()]
    if not (headers or params or cookies):
        headers, params = [{"name": "authorization", "prefix": "Bearer "}], ["access_token"]
    jwks = rule.get("jwks")
    if jwks is not None and not isinstance(jwks, str):
        jwks = json.dumps(jwks, sort_keys=True)
    timeout = rule.get("timeout")
    extra_claims: Sequence[str] = rule.get("spaceDelimitedClaims") or ()
    return {
        "issuer": str(rule.get("issuer", "")),
        "audiences": [str(a) for a in rule.get("audiences") or ()],
        "jwks": jwks,
        "jwks_uri": rule.get("jwksUri") or None,
        "timeout": parse_duration(timeout) if timeout else DEFAULT_JWKS_TIMEOUT,
        "from_headers": headers,
        "from_params": params,
        "from_cookies": cookies,
        "output_payload_to_header": (str(rule["outputPayloadToHeader"]).lower()
                                     if rule.get("outputPayloadToHeader") else None),
        "output_claim_to_headers": [{"header": str(o["header"]).lower(), "claim": str(o["claim"])}
                                    for o in rule.get("outputClaimToHeaders") or ()],
        "forward_original_token": bool(rule.get("forwardOriginalToken", False)),
        "space_delimited_claims": list(dict.fromkeys([*DEFAULT_SPACE_DELIMITED, *map(str, extra_claims)])),
    }
