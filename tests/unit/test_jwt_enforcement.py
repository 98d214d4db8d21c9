"""RequestAuthentication (JWT) enforced on live traffic, alone and with AuthorizationPolicy.

Tokens are made with PyJWT from keys made with cryptography; requests go through a real
proxy to a real upstream, which shows what the workload receives.
"""
from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from proxy_core import jwt_auth
from proxy_core.server import ProxyServer
from proxy_core.snapshot import Snapshot
from tests.unit.conftest import Env, Upstream, vhost
from tests.unit.secured import URL, aget, authz, endpoint, httpbin, request_authn
from tests.unit.test_jwt_auth import JwksServer, public_jwk

pytestmark = pytest.mark.timeout(60)

ISSUER = "https://issuer.example"
SELECT = {"selector": {"matchLabels": {"app": "httpbin"}}}
RSA = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_OTHER = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC256 = ec.generate_private_key(ec.SECP256R1())
EC384 = ec.generate_private_key(ec.SECP384R1())
ED = ed25519.Ed25519PrivateKey.generate()


def token(key: Any = RSA, alg: str = "RS256", kid: str | None = "k1", **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "sub": "alice", "exp": now + 600, "iat": now, **claims}
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, key, algorithm=alg,
                      headers={"kid": kid} if kid else None)


def bearer(tok: str) -> dict[str, str]:
    return {"authorization": f"Bearer {tok}"}


def rule(*keys: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"issuer": ISSUER, "jwks": json.dumps({"keys": list(keys) or [public_jwk(RSA, "k1")]}), **extra}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def proxy(env: Env, *docs: dict[str, Any]) -> tuple[Upstream, ProxyServer]:
    up = await env.upstream(name="httpbin")
    p = await env.proxy(httpbin(endpoint(up.port), docs=list(docs)))
    return up, p


# -- a valid token -------------------------------------------------------------------------------


async def test_valid_token_is_stripped_and_its_payload_forwarded(env) -> None:
    up, p = await proxy(env, request_authn([rule(outputPayloadToHeader="x-jwt-payload",
                                                 outputClaimToHeaders=[{"header": "x-sub", "claim": "sub"}])]))
    port = p.ports["http_proxy"]
    tok = token(groups=["dev"])
    status, _, body = await aget(port, URL + "/get", headers=bearer(tok))
    assert (status, body) == (200, b"httpbin")
    seen = up.seen[-1].headers
    assert "authorization" not in seen                              # forwardOriginalToken: false
    assert seen["x-jwt-payload"] == tok.split(".")[1]               # base64url payload, as Envoy sends it
    assert json.loads(base64.urlsafe_b64decode(seen["x-jwt-payload"] + "=="))["groups"] == ["dev"]
    assert seen["x-sub"] == "alice"
    # Without a token the request passes, minus output headers the client tried to forge.
    status, _, _ = await aget(port, URL + "/get", headers={"x-jwt-payload": "forged", "x-sub": "admin"})
    assert status == 200 and "x-jwt-payload" not in up.seen[-1].headers and "x-sub" not in up.seen[-1].headers
    assert p.stats()["security"]["jwt_authn"] == {"allowed": 1, "denied": 0, "denied_by": {}}


async def test_forward_original_token(env) -> None:
    up, p = await proxy(env, request_authn([rule(forwardOriginalToken=True)]))
    tok = token()
    assert (await aget(p.ports["http_proxy"], URL + "/", headers=bearer(tok)))[0] == 200
    assert up.seen[-1].headers["authorization"] == f"Bearer {tok}"


@pytest.mark.parametrize("key,alg", [
    (RSA, "RS256"), (RSA, "RS384"), (RSA, "RS512"), (RSA, "PS256"), (RSA, "PS512"),
    (EC256, "ES256"), (EC384, "ES384"), (ED, "EdDSA"),
])
async def test_jose_algorithms(env, key: Any, alg: str) -> None:
    _, p = await proxy(env, request_authn([rule(public_jwk(key, "k1"))]),
                       authz({**SELECT, "rules": [{"from": [{"source": {"requestPrincipals": [f"{ISSUER}/alice"]}}]}]}))
    assert (await aget(p.ports["http_proxy"], URL + "/", headers=bearer(token(key, alg))))[0] == 200


# -- tokens that do not verify: 401 ----------------------------------------------------------------


def _none_token() -> str:
    payload = _b64(json.dumps({"iss": ISSUER, "sub": "admin", "aud": "httpbin", "exp": int(time.time()) + 60}).encode())
    return f"{_b64(json.dumps({'alg': 'none', 'kid': 'k1'}).encode())}.{payload}."


def _hmac_with_public_key() -> str:
    """Algorithm confusion: HS256 keyed with the RSA public key (PEM) must never verify."""
    payload = _b64(json.dumps({"iss": ISSUER, "sub": "admin", "aud": "httpbin", "exp": int(time.time()) + 60}).encode())
    pem = RSA.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    head = _b64(json.dumps({"alg": "HS256", "kid": "k1"}).encode())
    return f"{head}.{payload}.{_b64(hmac.new(pem, f'{head}.{payload}'.encode(), hashlib.sha256).digest())}"


def _tampered() -> str:
    head, body, sig = token(aud="httpbin").split(".")
    claims = json.loads(base64.urlsafe_b64decode(body + "=="))
    claims["sub"] = "admin"
    return ".".join([head, _b64(json.dumps(claims).encode()), sig])


BAD_TOKENS = {      # the rule lists audiences httpbin and reviews
    "expired": (lambda: token(aud="httpbin", exp=int(time.time()) - 120), jwt_auth.ERR_EXPIRED),
    "not-yet-valid": (lambda: token(aud="httpbin", nbf=int(time.time()) + 120), jwt_auth.ERR_NOT_YET_VALID),
    "wrong-issuer": (lambda: token(aud="httpbin", iss="https://evil.example"), jwt_auth.ERR_UNKNOWN_ISSUER),
    "wrong-audience": (lambda: token(aud="someone-else"), jwt_auth.ERR_AUDIENCE),
    "no-audience": (lambda: token(), jwt_auth.ERR_AUDIENCE),
    "other-key": (lambda: token(RSA_OTHER, aud="httpbin"), jwt_auth.ERR_SIGNATURE),
    "tampered": (_tampered, jwt_auth.ERR_SIGNATURE),
    "alg-none": (_none_token, jwt_auth.ERR_BAD_ALG),
    "hs256-with-public-key": (_hmac_with_public_key, jwt_auth.ERR_NO_KEY),
    "unknown-kid": (lambda: token(aud="httpbin", kid="k9"), jwt_auth.ERR_NO_KEY),
    "malformed": (lambda: "not-a-jwt", jwt_auth.ERR_MALFORMED),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENS))
async def test_invalid_token_gets_401(env, case: str) -> None:
    make, error = BAD_TOKENS[case]
    up, p = await proxy(env, request_authn([rule(audiences=["httpbin", "reviews"])]))
    good = token(aud="httpbin")
    assert (await aget(p.ports["http_proxy"], URL + "/", headers=bearer(good)))[0] == 200
    status, headers, body = await aget(p.ports["http_proxy"], URL + "/get?x=1", headers=bearer(make()))
    assert (status, body.decode()) == (401, error)
    assert headers["www-authenticate"] == \
        'Bearer realm="http://httpbin.foo.svc.cluster.local:8000/get", error="invalid_token"'
    assert len(up.seen) == 1                                        # only the good request arrived
    assert p.stats()["security"]["jwt_authn"]["denied_by"] == {error: 1}


async def test_missing_token_passes_authn_but_a_policy_can_require_one(env) -> None:
    """Istio: RequestAuthentication alone accepts requests without a token; an ALLOW on
    ``requestPrincipals: ["*"]`` turns them into 403 (not 401)."""
    _, p = await proxy(env, request_authn([rule()]))
    assert (await aget(p.ports["http_proxy"], URL + "/"))[0] == 200
    _, p = await proxy(env, request_authn([rule()]),
                       authz({**SELECT, "rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]}))
    port = p.ports["http_proxy"]
    status, _, body = await aget(port, URL + "/")
    assert (status, body) == (403, b"RBAC: access denied")
    assert (await aget(port, URL + "/", headers=bearer(token())))[0] == 200


# -- request.auth.* in AuthorizationPolicy ------------------------------------------------------------

PRINCIPAL = f"{ISSUER}/alice"

AUTH_FIELD_CASES: dict[str, tuple[dict[str, Any], list[tuple[dict[str, Any] | None, int]]]] = {
    "requestPrincipals": ({"from": [{"source": {"requestPrincipals": [PRINCIPAL]}}]},
                          [({}, 200), ({"sub": "bob"}, 403), (None, 403)]),
    "requestPrincipals-prefix": ({"from": [{"source": {"requestPrincipals": [f"{ISSUER}/*"]}}]},
                                 [({"sub": "bob"}, 200), (None, 403)]),
    "notRequestPrincipals": ({"from": [{"source": {"notRequestPrincipals": [f"{ISSUER}/bob"]}}]},
                             [({"sub": "bob"}, 403), ({}, 200), (None, 200)]),
    "request.auth.principal": ({"when": [{"key": "request.auth.principal", "values": [PRINCIPAL]}]},
                               [({}, 200), ({"sub": "bob"}, 403), (None, 403)]),
    "request.auth.audiences": ({"when": [{"key": "request.auth.audiences", "values": ["httpbin"]}]},
                               [({"aud": ["other", "httpbin"]}, 200), ({"aud": "other"}, 403), (None, 403)]),
    "request.auth.presenter": ({"when": [{"key": "request.auth.presenter", "values": ["frontend"]}]},
                               [({"azp": "frontend"}, 200), ({"azp": "cli"}, 403)]),
    "request.auth.claims": ({"when": [{"key": "request.auth.claims[groups]", "values": ["admins"]}]},
                            [({"groups": ["dev", "admins"]}, 200), ({"groups": ["dev"]}, 403), (None, 403)]),
    "request.auth.claims-nested": ({"when": [{"key": "request.auth.claims[realm][role]", "values": ["ops"]}]},
                                   [({"realm": {"role": "ops"}}, 200), ({"realm": {"role": "dev"}}, 403)]),
    "request.auth.claims-scope": ({"when": [{"key": "request.auth.claims[scope]", "values": ["write"]}]},
                                  [({"scope": "read write"}, 200), ({"scope": "read"}, 403)]),
    "request.auth.claims-notValues": ({"when": [{"key": "request.auth.claims[groups]", "notValues": ["banned"]}]},
                                      [({"groups": ["dev"]}, 200), ({"groups": ["dev", "banned"]}, 403)]),
}


@pytest.mark.parametrize("case", sorted(AUTH_FIELD_CASES))
async def test_request_auth_fields(env, case: str) -> None:
    rule_, checks = AUTH_FIELD_CASES[case]
    _, p = await proxy(env, request_authn([rule()]), authz({**SELECT, "rules": [rule_]}))
    for claims, expected in checks:
        headers = bearer(token(**claims)) if claims is not None else {}
        status, _, body = await aget(p.ports["http_proxy"], URL + "/", headers=headers)
        assert status == expected, (claims, status, body)


# -- where tokens are read -------------------------------------------------------------------------


async def test_from_headers_and_from_params(env) -> None:
    up, p = await proxy(env, request_authn([rule(fromHeaders=[{"name": "X-Jwt-Assertion", "prefix": "Token "}],
                                                 fromParams=["token"])]),
                        authz({**SELECT, "rules": [{"from": [{"source": {"requestPrincipals": ["*"]}}]}]}))
    port = p.ports["http_proxy"]
    tok = token()
    assert (await aget(port, URL + "/", headers={"x-jwt-assertion": f"Token {tok}"}))[0] == 200
    assert "x-jwt-assertion" not in up.seen[-1].headers
    assert (await aget(port, URL + f"/q?token={tok}"))[0] == 200
    assert up.seen[-1].target == f"/q?token={tok}"                    # a query token stays, as with Envoy
    # The default location is not read once fromHeaders is set: no token there, so 403 (not 401).
    assert (await aget(port, URL + "/", headers=bearer("garbage")))[0] == 403
    assert (await aget(port, URL + "/", headers={"x-jwt-assertion": "Token garbage"}))[0] == 401


# -- remote JWKS ---------------------------------------------------------------------------------------


async def test_jwks_uri_key_rotation(env) -> None:
    server = await JwksServer().start()
    env.made.append(type("Stop", (), {"close": server.stop})())
    server.jwks = {"keys": [public_jwk(RSA, "k1")]}
    _, p = await proxy(env, request_authn([{"issuer": ISSUER, "jwksUri": f"{server.url}/keys"}]))
    port = p.ports["http_proxy"]
    results = await asyncio.gather(*(aget(port, URL + "/", headers=bearer(token())) for _ in range(4)))
    assert [s for s, _, _ in results] == [200] * 4 and server.hits == 1     # fetched once, then cached
    server.jwks = {"keys": [public_jwk(RSA_OTHER, "k2")]}                     # the issuer rotates its key
    assert (await aget(port, URL + "/", headers=bearer(token(RSA_OTHER, kid="k2"))))[0] == 200
    assert server.hits == 2                                                  # the unknown kid refetched once
    status, _, body = await aget(port, URL + "/", headers=bearer(token(RSA, kid="k1")))
    assert (status, body.decode()) == (401, jwt_auth.ERR_NO_KEY)             # the retired key no longer verifies
    assert server.hits == 2


async def test_jwks_fetch_never_blocks_other_traffic(env) -> None:
    """A JWKS endpoint that never answers: the token's request waits for the rule's timeout
    and gets 401, while requests to other services flow meanwhile."""
    hung: list[asyncio.StreamWriter] = []

    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hung.append(writer)

    jwks = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    env.made.append(type("Stop", (), {"close": staticmethod(lambda: _close(jwks, hung))})())
    other = await env.upstream(name="other")
    up = await env.upstream(name="httpbin")
    snap = httpbin(endpoint(up.port), docs=[request_authn([{
        "issuer": ISSUER, "jwksUri": f"http://127.0.0.1:{jwks.sockets[0].getsockname()[1]}/keys", "timeout": "1s"}])])
    other_cl = "outbound|80||other.bar.svc.cluster.local"
    snap["virtual_hosts"].append(vhost("other.bar.svc.cluster.local", 80,
                                       [{"name": "o", "route": [{"cluster": other_cl}]}]))
    snap["clusters"][other_cl] = {"service": "other.bar.svc.cluster.local", "port": 80,
                                  "endpoints": [endpoint(other.port, namespace="bar", app="other")]}
    p = await env.proxy(snap)
    assert set(p.state.security) == {next(iter(Snapshot.from_dict(httpbin()).clusters))}
    port = p.ports["http_proxy"]
    t0 = time.monotonic()
    pending = asyncio.ensure_future(aget(port, URL + "/", headers=bearer(token())))
    await asyncio.sleep(0.1)
    for _ in range(5):
        assert (await aget(port, "http://other.bar.svc.cluster.local/"))[0] == 200
    assert time.monotonic() - t0 < 0.9 and not pending.done()
    status, _, body = await pending
    assert (status, body.decode()) == (401, jwt_auth.ERR_JWKS_FETCH)
    assert 0.9 < time.monotonic() - t0 < 5
    assert up.seen == []


async def _close(server: asyncio.AbstractServer, writers: list[asyncio.StreamWriter]) -> None:
    for w in writers:
        w.close()
    server.close()
