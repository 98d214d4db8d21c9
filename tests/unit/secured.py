"""Helpers for policy tests through a real proxy: a service ``httpbin.foo`` whose workloads
carry labels, Istio security documents compiled by the real compiler, and a client."""
from __future__ import annotations

import asyncio
import http.client
from typing import Any

import pytest

from mesh.compiler_security import compile_security
from mesh.resources import Resource
from proxy_core.server import ProxyServer
from tests.unit.conftest import snapshot, vhost

HOST = "httpbin.foo.svc.cluster.local"
PORT = 8000
CL = f"outbound|{PORT}||{HOST}"
URL = f"http://{HOST}:{PORT}"


def endpoint(port: int, namespace: str = "foo", **labels: str) -> dict[str, Any]:
    return {"address": "127.0.0.1", "port": port, "node": "n1", "via": None, "namespace": namespace,
            "service_account": "httpbin", "labels": labels or {"app": "httpbin"}}


def policy(kind: str, spec: dict[str, Any], name: str = "p", namespace: str = "foo",
           annotations: dict[str, str] | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace}
    if annotations:
        meta["annotations"] = annotations
    return {"apiVersion": "security.istio.io/v1", "kind": kind, "metadata": meta, "spec": spec}


def authz(spec: dict[str, Any], **kw: Any) -> dict[str, Any]:
    return policy("AuthorizationPolicy", spec, **kw)


def request_authn(rules: list[dict[str, Any]], **kw: Any) -> dict[str, Any]:
    return policy("RequestAuthentication", {"selector": {"matchLabels": {"app": "httpbin"}}, "jwtRules": rules}, **kw)


def httpbin(*endpoints: dict[str, Any], docs: tuple[dict[str, Any], ...] | list[dict[str, Any]] = (),
            routes: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """A snapshot with ``httpbin.foo:8000`` (also reachable as ``httpbin:8000``) and ``docs`` compiled."""
    routes = routes if routes is not None else [{"name": "default", "route": [{"cluster": CL}]}]
    snap = snapshot(vhosts=[vhost(HOST, PORT, routes, ("httpbin", f"httpbin:{PORT}"))],
                    clusters={CL: {"service": HOST, "port": PORT, "connect_timeout": 1.0,
                                   "lb": {"policy": "ROUND_ROBIN"}, "endpoints": list(endpoints)}})
    snap["security"] = compile_security([Resource.from_dict(d) for d in docs])
    return snap


def fetch(port: int, url: str, method: str = "GET", headers: dict[str, str] | None = None,
          body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request through the proxy's HTTP_PROXY listener (absolute-form URL)."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request(method, url, body=body, headers=headers or {})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


async def aget(port: int, url: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
    return await asyncio.to_thread(fetch, port, url, **kw)


@pytest.fixture
def peer(monkeypatch: pytest.MonkeyPatch) -> dict[str, str | None]:
    """Stands in for the mTLS layer: sets the identity it would give each accepted connection
    (``peer["principal"]``); None, the default, is a plaintext peer."""
    ident: dict[str, str | None] = {"principal": None}
    monkeypatch.setattr(ProxyServer, "peer_identity", staticmethod(lambda transport: ident["principal"]))
    return ident
