"""AuthorizationPolicy enforced on live traffic: a real proxy, real upstreams, real clients.

Every field of ``from``/``to``/``when`` (and its ``notX`` form), Istio's precedence
(CUSTOM/DENY, then ALLOW; AUDIT only logs), scoping, per-endpoint evaluation, and TCP
connections and CONNECT tunnels closed on deny.  Request-principal fields live in
test_jwt_enforcement.py, where tokens exist.
"""
from __future__ import annotations

import asyncio
import io
import json
import logging
from typing import Any

import pytest

from mesh.compiler_security import compile_security
from mesh.resources import Resource
from proxy_core.accesslog import AccessLog
from proxy_core.snapshot import Snapshot
from tests.unit.conftest import Echo, snapshot
from tests.unit.secured import CL, HOST, URL, aget, authz, endpoint, httpbin, peer  # noqa: F401  (fixture)

pytestmark = pytest.mark.timeout(60)

BAR_SLEEP = "cluster.local/ns/bar/sa/sleep"
BAZ_SLEEP = "cluster.local/ns/baz/sa/sleep"
SELECT = {"selector": {"matchLabels": {"app": "httpbin"}}}


def allow(rule: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return authz({**SELECT, "action": "ALLOW", "rules": [rule]}, **kw)


def src(**fields: Any) -> dict[str, Any]:
    return {"from": [{"source": fields}]}


def op(**fields: Any) -> dict[str, Any]:
    return {"to": [{"operation": fields}]}


def when(key: str, values: list[str] | None = None, not_values: list[str] | None = None) -> dict[str, Any]:
    cond: dict[str, Any] = {"key": key}
    if values is not None:
        cond["values"] = values
    if not_values is not None:
        cond["notValues"] = not_values
    return {"when": [cond]}


# (request, expected status); a request is a dict of path / url / method / headers / principal.
Check = tuple[dict[str, Any], int]

FIELD_CASES: dict[str, tuple[dict[str, Any], list[Check]]] = {
    "principals": (src(principals=[BAR_SLEEP]),
                   [({"principal": BAR_SLEEP}, 200), ({"principal": BAZ_SLEEP}, 403), ({}, 403)]),
    "principals-prefix": (src(principals=["cluster.local/ns/bar/*"]),
                          [({"principal": BAR_SLEEP}, 200), ({"principal": BAZ_SLEEP}, 403)]),
    "notPrincipals": (src(notPrincipals=["cluster.local/ns/bar/*"]),
                      [({"principal": BAR_SLEEP}, 403), ({"principal": BAZ_SLEEP}, 200), ({}, 200)]),
    "namespaces": (src(namespaces=["bar"]),
                   [({"principal": BAR_SLEEP}, 200), ({"principal": BAZ_SLEEP}, 403), ({}, 403)]),
    "notNamespaces": (src(notNamespaces=["bar"]),
                      [({"principal": BAR_SLEEP}, 403), ({"principal": BAZ_SLEEP}, 200), ({}, 200)]),
    "serviceAccounts": (src(serviceAccounts=["bar/sleep"]),
                        [({"principal": BAR_SLEEP}, 200), ({"principal": BAZ_SLEEP}, 403)]),
    "ipBlocks": (src(ipBlocks=["127.0.0.0/8"]), [({}, 200)]),
    "ipBlocks-miss": (src(ipBlocks=["10.0.0.0/8", "::1"]), [({}, 403)]),
    "notIpBlocks": (src(notIpBlocks=["127.0.0.1/32"]), [({}, 403)]),
    # X-Forwarded-For is not trusted (numTrustedProxies 0): the remote address is the peer's.
    "remoteIpBlocks": (src(remoteIpBlocks=["127.0.0.1"]),
                       [({}, 200), ({"headers": {"x-forwarded-for": "10.1.2.3"}}, 200)]),
    "remoteIpBlocks-miss": (src(remoteIpBlocks=["10.0.0.0/8"]),
                            [({"headers": {"x-forwarded-for": "10.1.2.3"}}, 403)]),
    "notRemoteIpBlocks": (src(notRemoteIpBlocks=["127.0.0.0/8"]), [({}, 403)]),
    "hosts": (op(hosts=["httpbin:*"]),
              [({"url": "http://httpbin:8000/"}, 200), ({"url": "http://HTTPBIN:8000/"}, 200), ({}, 403)]),
    "hosts-suffix": (op(hosts=["*.svc.cluster.local:8000"]), [({}, 200), ({"url": "http://httpbin:8000/"}, 403)]),
    "notHosts": (op(notHosts=["httpbin:8000"]), [({"url": "http://httpbin:8000/"}, 403), ({}, 200)]),
    "ports": (op(ports=["8000"]), [({}, 200)]),
    "ports-miss": (op(ports=["9000"]), [({}, 403)]),
    "notPorts": (op(notPorts=["8000"]), [({}, 403)]),
    "methods": (op(methods=["GET", "HEAD"]), [({}, 200), ({"method": "POST"}, 403)]),
    "notMethods": (op(notMethods=["DELETE"]), [({"method": "DELETE"}, 403), ({"method": "PUT"}, 200)]),
    "paths": (op(paths=["/exact", "/api/*", "*.png", "/users/{*}/profile", "/files/{**}.txt"]),
              [({"path": "/exact"}, 200), ({"path": "/exact?q=1"}, 200), ({"path": "/exact/more"}, 403),
               ({"path": "/api/v1/x"}, 200), ({"path": "/img/a.png"}, 200), ({"path": "/users/7/profile"}, 200),
               ({"path": "/users/7/8/profile"}, 403), ({"path": "/files/a/b/c.txt"}, 200),
               ({"path": "/%61pi/x"}, 200), ({"path": "/api/../other"}, 403), ({"path": "/other"}, 403)]),
    "notPaths": (op(notPaths=["/admin*"]),
                 [({"path": "/admin/users"}, 403), ({"path": "/public/../admin"}, 403),
                  ({"path": "/public\\..\\admin"}, 403), ({"path": "/public"}, 200)]),
    "request.headers": (when("request.headers[X-User]", ["alice", "bob*"]),
                        [({"headers": {"x-user": "alice"}}, 200), ({"headers": {"x-user": "bobby"}}, 200),
                         ({"headers": {"x-user": "eve"}}, 403), ({}, 403)]),
    "request.headers-notValues": (when("request.headers[x-user]", not_values=["eve"]),
                                  [({"headers": {"x-user": "eve"}}, 403), ({"headers": {"x-user": "al"}}, 200)]),
    "source.ip": (when("source.ip", ["127.0.0.1"]), [({}, 200)]),
    "source.ip-miss": (when("source.ip", ["10.0.0.0/8"]), [({}, 403)]),
    "source.namespace": (when("source.namespace", ["bar"]),
                         [({"principal": BAR_SLEEP}, 200), ({"principal": BAZ_SLEEP}, 403)]),
    "source.principal": (when("source.principal", [BAR_SLEEP]),
                         [({"principal": BAR_SLEEP}, 200), ({"principal": BAZ_SLEEP}, 403)]),
    "destination.port": (when("destination.port", ["8000"]), [({}, 200)]),
    "destination.port-notValues": (when("destination.port", not_values=["8000"]), [({}, 403)]),
    # No TLS from the client: there is no SNI, so a value never matches and notValues always holds.
    "connection.sni": (when("connection.sni", ["*"]), [({}, 403)]),
    "connection.sni-notValues": (when("connection.sni", not_values=["httpbin"]), [({}, 200)]),
}


async def check_all(port: int, peer: dict[str, str | None], checks: list[Check]) -> None:
    for req, expected in checks:
        peer["principal"] = req.get("principal")
        url = req.get("url", URL + req.get("path", "/"))
        status, headers, body = await aget(port, url, method=req.get("method", "GET"), headers=req.get("headers"))
        assert status == expected, (req, status, body)
        if expected == 403:
            assert body == b"RBAC: access denied" and headers["content-type"] == "text/plain"


@pytest.mark.parametrize("case", sorted(FIELD_CASES))
async def test_allow_policy_field(env, peer, case: str) -> None:
    rule, checks = FIELD_CASES[case]
    up = await env.upstream(name="httpbin")
    p = await env.proxy(httpbin(endpoint(up.port), docs=[allow(rule)]))
    await check_all(p.ports["http_proxy"], peer, checks)
    allowed = sum(1 for _, s in checks if s == 200)
    assert len(up.seen) == allowed     # a denied request never reaches the workload
    sec = p.stats()["security"]["rbac"]
    assert (sec["allowed"], sec["denied"]) == (allowed, len(checks) - allowed)


@pytest.mark.parametrize("case", ["paths", "methods", "request.headers", "principals", "notIpBlocks"])
async def test_deny_policy_inverts_the_same_rule(env, peer, case: str) -> None:
    """The same rule under DENY: what ALLOW let through is denied, and the rest allowed."""
    rule, checks = FIELD_CASES[case]
    up = await env.upstream()
    p = await env.proxy(httpbin(endpoint(up.port), docs=[authz({**SELECT, "action": "DENY", "rules": [rule]})]))
    await check_all(p.ports["http_proxy"], peer, [(r, 403 if s == 200 else 200) for r, s in checks])


# -- precedence ----------------------------------------------------------------------------------


async def test_no_policy_costs_nothing_and_allows(env) -> None:
    up = await env.upstream()
    p = await env.proxy(httpbin(endpoint(up.port)))
    assert p.state.security == {}
    assert (await aget(p.ports["http_proxy"], URL + "/"))[0] == 200
    assert p.stats()["security"]["rbac"] == {"allowed": 0, "denied": 0, "audited": 0, "denied_by": {}}


async def test_deny_wins_over_allow_and_names_the_rule(env) -> None:
    sink = io.StringIO()
    up = await env.upstream()
    docs = [authz({**SELECT, "action": "ALLOW", "rules": [{}]}, name="allow-all"),
            authz({**SELECT, "action": "DENY", "rules": [op(methods=["POST"]), op(paths=["/admin*"])]},
                  name="deny-admin")]
    p = await env.proxy(httpbin(endpoint(up.port), docs=docs), AccessLog(sink))
    port = p.ports["http_proxy"]
    assert (await aget(port, URL + "/admin/x"))[0] == 403
    assert (await aget(port, URL + "/x"))[0] == 200
    assert (await aget(port, URL + "/x", method="POST", body=b"{}"))[0] == 403
    sec = p.stats()["security"]["rbac"]
    assert sec["denied_by"] == {"ns[foo]-policy[deny-admin]-rule[1]": 1, "ns[foo]-policy[deny-admin]-rule[0]": 1}
    assert p.stats()["response_flags"] == {"RBAC": 2}
    p.access_log.flush()
    lines = [json.loads(x) for x in sink.getvalue().splitlines()]
    assert [(x["path"], x["response_code"], x["response_flags"]) for x in lines] == [
        ("/admin/x", 403, "RBAC"), ("/x", 200, "-"), ("/x", 403, "RBAC")]


async def test_allow_policies_present_but_none_matching_deny(env) -> None:
    up = await env.upstream()
    docs = [allow(op(paths=["/a"]), name="a"), allow(op(paths=["/b"]), name="b")]
    p = await env.proxy(httpbin(endpoint(up.port), docs=docs))
    port = p.ports["http_proxy"]
    assert [(await aget(port, URL + path))[0] for path in ("/a", "/b", "/c")] == [200, 200, 403]
    assert p.stats()["security"]["rbac"]["denied_by"] == {"-": 1}


async def test_allow_policy_without_rules_denies_everything_and_deny_alone_allows_the_rest(env) -> None:
    up = await env.upstream()
    p = await env.proxy(httpbin(endpoint(up.port), docs=[authz({**SELECT})]))
    assert (await aget(p.ports["http_proxy"], URL + "/"))[0] == 403
    await p.swap(Snapshot.from_dict(httpbin(endpoint(up.port), docs=[
        authz({**SELECT, "action": "DENY", "rules": [op(paths=["/private"])]})])))
    assert (await aget(p.ports["http_proxy"], URL + "/public"))[0] == 200
    assert (await aget(p.ports["http_proxy"], URL + "/private"))[0] == 403


async def test_audit_only_logs(env, caplog: pytest.LogCaptureFixture) -> None:
    up = await env.upstream()
    docs = [authz({**SELECT, "action": "AUDIT", "rules": [op(paths=["/audited*"])]}, name="audit"),
            authz({**SELECT, "action": "DENY", "rules": [op(paths=["/audited/secret"])]}, name="deny")]
    p = await env.proxy(httpbin(endpoint(up.port), docs=docs))
    port = p.ports["http_proxy"]
    with caplog.at_level(logging.INFO, logger="proxy_core.security"):
        assert (await aget(port, URL + "/audited/x"))[0] == 200
        assert (await aget(port, URL + "/plain"))[0] == 200
        assert (await aget(port, URL + "/audited/secret"))[0] == 403     # AUDIT does not change a denial
    audits = [r.getMessage() for r in caplog.records if "AUDIT" in r.getMessage()]
    assert len(audits) == 2
    assert "/audited/x" in audits[0] and audits[0].endswith("allowed")
    assert "/audited/secret" in audits[1] and audits[1].endswith("denied")
    assert p.stats()["security"]["rbac"]["audited"] == 2


async def test_dry_run_policy_is_not_enforced(env) -> None:
    up = await env.upstream()
    doc = authz({**SELECT, "action": "DENY", "rules": [{}]}, annotations={"istio.io/dry-run": "true"})
    p = await env.proxy(httpbin(endpoint(up.port), docs=[doc]))
    assert (await aget(p.ports["http_proxy"], URL + "/"))[0] == 200


async def test_custom_policy_denies_without_a_provider(env) -> None:
    up = await env.upstream()
    doc = authz({**SELECT, "action": "CUSTOM", "provider": {"name": "ext-authz"}, "rules": [op(paths=["/ext*"])]})
    p = await env.proxy(httpbin(endpoint(up.port), docs=[doc]))
    port = p.ports["http_proxy"]
    assert [(await aget(port, URL + path))[0] for path in ("/ext", "/other")] == [403, 200]


# -- scope ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("spec,namespace,applies", [
    ({}, "foo", True),                                                        # the whole namespace
    ({}, "bar", False),                                                       # another namespace
    ({}, "istio-system", True),                                               # the root namespace: mesh-wide
    ({"selector": {"matchLabels": {"app": "other"}}}, "foo", False),
    ({"selector": {"matchLabels": {"app": "httpbin", "version": "v1"}}}, "foo", True),
    ({"targetRefs": [{"kind": "Service", "group": "", "name": "httpbin"}]}, "foo", True),
    ({"targetRefs": [{"kind": "Service", "group": "", "name": "reviews"}]}, "foo", False),
])
async def test_policy_scope(env, spec: dict[str, Any], namespace: str, applies: bool) -> None:
    up = await env.upstream()
    doc = authz({**spec, "action": "DENY", "rules": [{}]}, namespace=namespace)
    p = await env.proxy(httpbin(endpoint(up.port, app="httpbin", version="v1"), docs=[doc]))
    assert (await aget(p.ports["http_proxy"], URL + "/"))[0] == (403 if applies else 200)


async def test_each_endpoint_is_checked_against_its_own_workload_policies(env) -> None:
    """Policies select workloads, not services: v1 denies, v2 does not; the balancer alternates."""
    v1, v2 = await env.upstream(name="v1"), await env.upstream(name="v2")
    doc = authz({"selector": {"matchLabels": {"version": "v1"}}, "action": "DENY", "rules": [{}]})
    p = await env.proxy(httpbin(endpoint(v1.port, app="httpbin", version="v1"),
                                endpoint(v2.port, app="httpbin", version="v2"), docs=[doc]))
    results = [await aget(p.ports["http_proxy"], URL + "/") for _ in range(6)]
    assert sorted(s for s, _, _ in results) == [200] * 3 + [403] * 3
    assert {b for s, _, b in results if s == 200} == {b"v2"}
    assert v1.seen == [] and len(v2.seen) == 3


async def test_policy_sees_the_request_as_the_workload_gets_it(env) -> None:
    """A VirtualService rewrite and header operation happen before the workload's policy."""
    up = await env.upstream()
    routes = [{"name": "r", "route": [{"cluster": CL}], "rewrite": {"uri": "/internal/"},
               "match": [{"uri": {"prefix": "/public/"}}], "headers": {"request": {"set": {"x-via": "gateway"}}}}]
    docs = [allow({**op(paths=["/internal/*"]), **when("request.headers[x-via]", ["gateway"])})]
    p = await env.proxy(httpbin(endpoint(up.port), docs=docs, routes=routes))
    assert (await aget(p.ports["http_proxy"], URL + "/public/x"))[0] == 200
    assert up.seen[0].target == "/internal/x"


# -- TCP ------------------------------------------------------------------------------------------

DB = "db.foo.svc.cluster.local"
DB_CL = f"outbound|5432||{DB}"


def db(echo_port: int, docs: list[dict[str, Any]], vip: str) -> dict[str, Any]:
    snap = snapshot(vips=[{"address": vip, "port": 0, "host": DB, "protocol": "tcp"}],
                    clusters={DB_CL: {"service": DB, "port": 5432, "connect_timeout": 1.0,
                                      "endpoints": [endpoint(echo_port, app="db")]}})
    snap["tcp_routes"] = [{"name": f"{DB}:0", "host": DB, "port": 0,
                           "routes": [{"name": "r", "route": [{"cluster": DB_CL, "weight": 100}]}]}]
    snap["security"] = compile_security([Resource.from_dict(d) for d in docs])
    return snap


async def tcp_roundtrip(vip: str, port: int) -> bytes:
    reader, writer = await asyncio.open_connection(vip, port)
    try:
        writer.write(b"ping")
        writer.write_eof()
        return await asyncio.wait_for(reader.read(), 10)
    except OSError:           # the proxy closed it first (reset, or shut before our EOF)
        return b""
    finally:
        writer.close()


DB_SELECT = {"selector": {"matchLabels": {"app": "db"}}}


@pytest.mark.parametrize("rules,action,passes", [
    ([op(ports=["5432"])], "ALLOW", True),
    ([{**src(ipBlocks=["127.0.0.0/8"]), **when("destination.port", ["5432"])}], "ALLOW", True),
    ([op(ports=["6379"])], "ALLOW", False),
    ([src(principals=["*"])], "ALLOW", False),                  # no mTLS peer identity
    ([op(methods=["GET"])], "ALLOW", False),                    # HTTP-only field: the ALLOW rule is dropped
    ([op(methods=["GET"])], "DENY", False),                     # ...and a DENY rule ignores it: denies all
    ([src(notIpBlocks=["127.0.0.0/8"])], "DENY", True),
])
async def test_tcp_connection_closed_on_deny(env, rules: list[dict[str, Any]], action: str, passes: bool) -> None:
    echo = env.track(await Echo("db").start())
    vip = "127.79.0.1"
    p = await env.proxy(db(echo.port, [authz({**DB_SELECT, "action": action, "rules": rules})], vip))
    out = await tcp_roundtrip(vip, p.vip_ports()[f"{vip}:0"])
    if passes:
        assert out == b"ping|db"
    else:
        assert out == b"" and echo.connections == 0
        assert p.stats()["tcp"]["response_flags"] == {"RBAC": 1}


async def test_connect_tunnel_to_a_service_applies_tcp_rules(env) -> None:
    """CONNECT through the HTTP proxy carries opaque bytes: an HTTP-only ALLOW cannot admit it."""
    up = await env.upstream()
    p = await env.proxy(httpbin(endpoint(up.port), docs=[allow(op(paths=["/*"]))]))
    reader, writer = await asyncio.open_connection("127.0.0.1", p.ports["http_proxy"])
    writer.write(f"CONNECT {HOST}:8000 HTTP/1.1\r\nHost: {HOST}:8000\r\n\r\n".encode())
    out = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert out.startswith(b"HTTP/1.1 403") and out.endswith(b"RBAC: access denied") and up.connections == 0
    # while the same policy admits plain HTTP requests
    assert (await aget(p.ports["http_proxy"], URL + "/x"))[0] == 200
