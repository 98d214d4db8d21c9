"""RequestAuthentication: JWT verification, token locations, output headers, remote JWKS."""
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
import yaml
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from mesh.compiler_security import compile_security
from mesh.resources import Resource
from proxy_core import jwt_auth
from proxy_core.authz import Authorizer, RequestAttributes
from proxy_core.jwt_auth import AuthResult, JwksCache, JwtAuthenticator, www_authenticate

ISSUER = "https://issuer.example"
LABELS = {"app": "httpbin"}


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def rsa_key2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def public_jwk(private_key: Any, kid: str, alg: str | None = None) -> dict[str, Any]:
    pub = private_key.public_key()
    if isinstance(pub, rsa.RSAPublicKey):
        d = jwt.algorithms.RSAAlgorithm.to_jwk(pub, as_dict=True)
    elif isinstance(pub, ec.EllipticCurvePublicKey):
        d = jwt.algorithms.ECAlgorithm.to_jwk(pub, as_dict=True)
    else:
        d = jwt.algorithms.OKPAlgorithm.to_jwk(pub, as_dict=True)
    d["kid"] = kid
    if alg:
        d["alg"] = alg
    return d


def token(key: Any, alg: str = "RS256", kid: str | None = "k1", **claims: Any) -> str:
    now = int(time.time())
    payload = {"iss": ISSUER, "sub": "alice", "exp": now + 600, "iat": now, **claims}
    payload = {k: v for k, v in payload.items() if v is not None}
    return jwt.encode(payload, key, algorithm=alg, headers={"kid": kid} if kid else None)


def request_authentication(rules: list[dict[str, Any]], namespace: str = "default") -> list[dict[str, Any]]:
    doc = {"apiVersion": "security.istio.io/v1", "kind": "RequestAuthentication",
           "metadata": {"name": "jwt", "namespace": namespace},
           "spec": {"selector": {"matchLabels": LABELS}, "jwtRules": rules}}
    return compile_security([Resource.from_dict(doc)])["jwt"]


def authenticator(rules: list[dict[str, Any]], cache: JwksCache | None = None) -> JwtAuthenticator:
    return JwtAuthenticator(request_authentication(rules), "default", LABELS, jwks_cache=cache)


def inline(*jwks: dict[str, Any], **extra: Any) -> list[dict[str, Any]]:
    return [{"issuer": ISSUER, "jwks": json.dumps({"keys": list(jwks)}), **extra}]


def bearer(tok: str) -> dict[str, str]:
    return {"authorization": f"Bearer {tok}"}


# -- compilation -----------------------------------------------------------------------------


def test_compile_request_authentication_from_yaml() -> None:
    text = """
apiVersion: security.istio.io/v1
kind: RequestAuthentication
metadata:
  name: full
  namespace: foo
spec:
  selector:
    matchLabels:
      app: httpbin
  jwtRules:
  - issuer: "example.com"
    jwksUri: https://example.com/.well-known/jwks.json
    forwardOriginalToken: true
    fromCookies: [foo]
    fromHeaders:
      - name: X-Foo
        prefix: baz
    outputClaimToHeaders:
    - claim: abc
      header: def
    timeout: 2s
    outputPayloadToHeader: header
    spaceDelimitedClaims: ["custom_scope"]
  - issuer: other.com
    audiences: [a, b]
    jwks: '{"keys": []}'
"""
    full, defaults = compile_security([Resource.from_dict(yaml.safe_load(text))])["jwt"][0]["rules"]
    assert full == {"issuer": "example.com", "audiences": [], "jwks": None,
                    "jwks_uri": "https://example.com/.well-known/jwks.json", "timeout": 2.0,
                    "from_headers": [{"name": "x-foo", "prefix": "baz"}], "from_params": [], "from_cookies": ["foo"],
                    "output_payload_to_header": "header",
                    "output_claim_to_headers": [{"header": "def", "claim": "abc"}],
                    "forward_original_token": True, "space_delimited_claims": ["scope", "permission", "custom_scope"]}
    assert defaults["from_headers"] == [{"name": "authorization", "prefix": "Bearer "}]
    assert defaults["from_params"] == ["access_token"]
    assert defaults["audiences"] == ["a", "b"] and defaults["jwks"] == '{"keys": []}' and defaults["timeout"] == 5.0


# -- verification ----------------------------------------------------------------------------


async def test_no_token_passes_unauthenticated(rsa_key: rsa.RSAPrivateKey) -> None:
    result = await authenticator(inline(public_jwk(rsa_key, "k1"))).authenticate({}, {})
    assert result.error is None and not result.authenticated and result.principal == ""


async def test_valid_rs256(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = authenticator(inline(public_jwk(rsa_key, "k1")))
    tok = token(rsa_key, aud=["bookinfo", "other"], azp="frontend", groups=["dev"])
    result = await auth.authenticate(bearer(tok), {})
    assert result.error is None and result.authenticated
    assert result.principal == f"{ISSUER}/alice"
    assert result.audiences == ("bookinfo", "other") and result.presenter == "frontend"
    assert result.claims["groups"] == ["dev"]
    assert result.remove_headers == ("authorization",)                    # forwardOriginalToken defaults to false


async def test_valid_es256_and_rsa_variants(rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> None:
    auth = authenticator(inline(public_jwk(ec_key, "e1"), public_jwk(rsa_key, "k1")))
    assert (await auth.authenticate(bearer(token(ec_key, "ES256", kid="e1")), {})).authenticated
    # An RSA JWK without "alg" verifies every RSA algorithm.
    for alg in ("RS384", "PS256", "PS512"):
        assert (await auth.authenticate(bearer(token(rsa_key, alg)), {})).authenticated, alg


async def test_eddsa() -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    auth = authenticator(inline(public_jwk(key, "ed")))
    assert (await auth.authenticate(bearer(token(key, "EdDSA", kid="ed")), {})).authenticated


async def test_declared_alg_restricts_the_key(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = authenticator(inline(public_jwk(rsa_key, "k1", alg="RS256")))
    assert (await auth.authenticate(bearer(token(rsa_key, "RS256")), {})).authenticated
    assert (await auth.authenticate(bearer(token(rsa_key, "PS256")), {})).error == jwt_auth.ERR_NO_KEY


# Times are offsets from when the test runs (parameters are built at collection time).
@pytest.mark.parametrize(("claims", "error"), [
    ({"exp": -120}, jwt_auth.ERR_EXPIRED),
    ({"nbf": 120}, jwt_auth.ERR_NOT_YET_VALID),
    ({"iss": "https://evil.example"}, jwt_auth.ERR_UNKNOWN_ISSUER),
    ({"aud": "someone-else"}, jwt_auth.ERR_AUDIENCE),
    ({"aud": None}, jwt_auth.ERR_AUDIENCE),
])
async def test_rejected_claims(rsa_key: rsa.RSAPrivateKey, claims: dict[str, Any], error: str) -> None:
    now = int(time.time())
    claims = {k: now + v if k in ("exp", "nbf") else v for k, v in claims.items()}
    auth = authenticator(inline(public_jwk(rsa_key, "k1"), audiences=["bookinfo", "reviews"]))
    assert (await auth.authenticate(bearer(token(rsa_key, **{"aud": "reviews", **claims})), {})).error == error


async def test_clock_skew_leeway(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = authenticator(inline(public_jwk(rsa_key, "k1")))
    now = int(time.time())
    assert (await auth.authenticate(bearer(token(rsa_key, exp=now - 30)), {})).authenticated
    assert (await auth.authenticate(bearer(token(rsa_key, nbf=now + 30)), {})).authenticated


async def test_bad_signature(rsa_key: rsa.RSAPrivateKey, rsa_key2: rsa.RSAPrivateKey) -> None:
    auth = authenticator(inline(public_jwk(rsa_key, "k1")))
    assert (await auth.authenticate(bearer(token(rsa_key2)), {})).error == jwt_auth.ERR_SIGNATURE
    head, body, sig = token(rsa_key).split(".")
    tampered = json.loads(base64.urlsafe_b64decode(body + "=="))
    tampered["sub"] = "admin"
    forged = ".".join([head, base64.urlsafe_b64encode(json.dumps(tampered).encode()).rstrip(b"=").decode(), sig])
    assert (await auth.authenticate(bearer(forged), {})).error == jwt_auth.ERR_SIGNATURE


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


async def test_alg_none_and_hmac_with_public_key(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = authenticator(inline(public_jwk(rsa_key, "k1")))
    payload = _b64(json.dumps({"iss": ISSUER, "sub": "admin", "exp": int(time.time()) + 60}).encode())
    none_token = f"{_b64(json.dumps({'alg': 'none', 'kid': 'k1'}).encode())}.{payload}."
    assert (await auth.authenticate(bearer(none_token), {})).error == jwt_auth.ERR_BAD_ALG
    # Algorithm confusion: HS256 keyed with the RSA public key must not verify.
    pem = rsa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    head = _b64(json.dumps({"alg": "HS256", "kid": "k1"}).encode())
    sig = _b64(hmac.new(pem, f"{head}.{payload}".encode(), hashlib.sha256).digest())
    assert (await auth.authenticate(bearer(f"{head}.{payload}.{sig}"), {})).error == jwt_auth.ERR_NO_KEY


async def test_unknown_kid_and_malformed(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = authenticator(inline(public_jwk(rsa_key, "k1")))
    assert (await auth.authenticate(bearer(token(rsa_key, kid="k9")), {})).error == jwt_auth.ERR_NO_KEY
    assert (await auth.authenticate(bearer("not-a-jwt"), {})).error == jwt_auth.ERR_MALFORMED
    assert (await auth.authenticate(bearer("a.b.c"), {})).error == jwt_auth.ERR_MALFORMED
    # A token without kid is tried against every key.
    assert (await auth.authenticate(bearer(token(rsa_key, kid=None)), {})).authenticated


def test_www_authenticate() -> None:
    assert www_authenticate("http://httpbin/get") == 'Bearer realm="http://httpbin/get", error="invalid_token"'


# -- token locations and output --------------------------------------------------------------


async def test_from_headers_with_prefix(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = authenticator(inline(public_jwk(rsa_key, "k1"), fromHeaders=[{"name": "X-Jwt", "prefix": "Token "}]))
    tok = token(rsa_key)
    result = await auth.authenticate({"x-jwt": f"Token {tok}"}, {})
    assert result.authenticated and result.remove_headers == ("x-jwt",)
    # Only the configured location counts: the default Authorization header is not read.
    assert not (await auth.authenticate(bearer(tok), {})).authenticated
    assert not (await auth.authenticate({"x-jwt": f"Other {tok}"}, {})).authenticated


async def test_from_params_and_default_access_token(rsa_key: rsa.RSAPrivateKey) -> None:
    tok = token(rsa_key)
    auth = authenticator(inline(public_jwk(rsa_key, "k1"), fromParams=["jwt"]))
    assert (await auth.authenticate({}, {"jwt": tok})).authenticated
    assert not (await auth.authenticate({}, {"access_token": tok})).authenticated
    default = authenticator(inline(public_jwk(rsa_key, "k1")))
    assert (await default.authenticate({}, {"access_token": tok})).authenticated
    assert (await default.authenticate({}, {"access_token": "garbage"})).error == jwt_auth.ERR_MALFORMED


async def test_from_cookies(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = authenticator(inline(public_jwk(rsa_key, "k1"), fromCookies=["session"]))
    assert (await auth.authenticate({"cookie": f"a=1; session={token(rsa_key)}"}, {})).authenticated


async def test_output_payload_and_claims_to_headers(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = authenticator(inline(public_jwk(rsa_key, "k1"), outputPayloadToHeader="X-Jwt-Payload",
                                forwardOriginalToken=True,
                                outputClaimToHeaders=[{"header": "x-sub", "claim": "sub"},
                                                      {"header": "x-admin", "claim": "admin"},
                                                      {"header": "x-org", "claim": "org.id"}]))
    tok = token(rsa_key, admin=True, org={"id": 7})
    result = await auth.authenticate(bearer(tok), {})
    sets = dict(result.set_headers)
    payload = json.loads(base64.urlsafe_b64decode(sets["x-jwt-payload"] + "=" * (-len(sets["x-jwt-payload"]) % 4)))
    assert payload["sub"] == "alice" and payload["iss"] == ISSUER
    assert sets["x-sub"] == "alice" and sets["x-admin"] == "true" and sets["x-org"] == "7"
    assert "authorization" not in result.remove_headers                  # forwardOriginalToken: true
    # Output headers are always sanitized, so a client without a token cannot forge them.
    unauth = await auth.authenticate({"x-sub": "admin"}, {})
    assert set(unauth.remove_headers) == {"x-jwt-payload", "x-sub", "x-admin", "x-org"}


async def test_space_delimited_scope(rsa_key: rsa.RSAPrivateKey) -> None:
    auth = authenticator(inline(public_jwk(rsa_key, "k1")))
    result = await auth.authenticate(bearer(token(rsa_key, scope="read write")), {})
    assert result.claims["scope"] == ["read", "write"]


async def test_rules_only_for_selected_workloads(rsa_key: rsa.RSAPrivateKey) -> None:
    rulesets = request_authentication(inline(public_jwk(rsa_key, "k1")))
    other = JwtAuthenticator(rulesets, "default", {"app": "reviews"})
    assert not other.enabled
    result = await other.authenticate(bearer("garbage"), {})
    assert result.error is None and not result.authenticated


async def test_claims_drive_authorization_policy(rsa_key: rsa.RSAPrivateKey) -> None:
    """RequestAuthentication + AuthorizationPolicy on request.auth.claims[groups], end to end."""
    auth = authenticator(inline(public_jwk(rsa_key, "k1")))
    policy = {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
              "metadata": {"name": "admins", "namespace": "default"},
              "spec": {"selector": {"matchLabels": LABELS},
                       "rules": [{"from": [{"source": {"requestPrincipals": [f"{ISSUER}/*"]}}],
                                  "when": [{"key": "request.auth.claims[groups]", "values": ["admins"]}]}]}}
    az = Authorizer(compile_security([Resource.from_dict(policy)])["authz"], "default", LABELS)

    async def decide(headers: dict[str, str]) -> bool:
        r: AuthResult = await auth.authenticate(headers, {})
        assert r.error is None
        attrs = RequestAttributes(method="GET", path="/", host="httpbin", headers=headers,
                                  request_principal=r.principal, audiences=r.audiences, presenter=r.presenter,
                                  claims=r.claims)
        return az.check(attrs).allowed

    assert await decide(bearer(token(rsa_key, groups=["dev", "admins"])))
    assert not await decide(bearer(token(rsa_key, groups=["dev"])))
    assert not await decide({})


# -- remote JWKS -----------------------------------------------------------------------------


class JwksServer:
    """A JWKS endpoint on 127.0.0.1 whose key set the test can rotate; counts fetches."""

    def __init__(self) -> None:
        self.jwks: dict[str, Any] = {"keys": []}
        self.hits = 0
        self.status = 200
        self._runner: web.AppRunner | None = None
        self.url = ""

    async def _handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        if request.path == "/.well-known/openid-configuration":
            return web.json_response({"issuer": self.url, "jwks_uri": f"{self.url}/keys"})
        return web.json_response(self.jwks, status=self.status)

    async def start(self) -> "JwksServer":
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


@pytest.fixture
async def jwks_server() -> Any:
    server = await JwksServer().start()
    yield server
    await server.stop()


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_jwks_uri_fetch_cache_and_rotation(jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey,
                                                 rsa_key2: rsa.RSAPrivateKey) -> None:
    jwks_server.jwks = {"keys": [public_jwk(rsa_key, "k1")]}
    clock = Clock()
    cache = JwksCache(clock=clock, ttl=1200, min_refetch_interval=30)
    auth = authenticator([{"issuer": ISSUER, "jwksUri": f"{jwks_server.url}/keys"}], cache)

    results = await asyncio.gather(*(auth.authenticate(bearer(token(rsa_key)), {}) for _ in range(5)))
    assert all(r.authenticated for r in results)
    assert jwks_server.hits == 1                                      # one fetch, shared and cached

    # The issuer rotates to a new key: a token with the new kid triggers one refetch.
    jwks_server.jwks = {"keys": [public_jwk(rsa_key, "k1"), public_jwk(rsa_key2, "k2")]}
    assert (await auth.authenticate(bearer(token(rsa_key2, kid="k2")), {})).authenticated
    assert jwks_server.hits == 2
    # Made-up kids do not hammer the issuer: within the interval no further fetch.
    assert (await auth.authenticate(bearer(token(rsa_key2, kid="k3")), {})).error == jwt_auth.ERR_NO_KEY
    assert jwks_server.hits == 2
    clock.now += 31
    assert (await auth.authenticate(bearer(token(rsa_key2, kid="k3")), {})).error == jwt_auth.ERR_NO_KEY
    assert jwks_server.hits == 3


async def test_jwks_ttl_and_stale_on_error(jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey,
                                           rsa_key2: rsa.RSAPrivateKey) -> None:
    jwks_server.jwks = {"keys": [public_jwk(rsa_key, "k1")]}
    clock = Clock()
    cache = JwksCache(clock=clock, ttl=60, min_refetch_interval=30)
    auth = authenticator([{"issuer": ISSUER, "jwksUri": f"{jwks_server.url}/keys"}], cache)
    assert (await auth.authenticate(bearer(token(rsa_key)), {})).authenticated
    clock.now += 61                                                    # expired: refreshed on next use
    jwks_server.jwks = {"keys": [public_jwk(rsa_key2, "k1")]}
    assert (await auth.authenticate(bearer(token(rsa_key2)), {})).authenticated
    assert jwks_server.hits == 2
    clock.now += 61
    jwks_server.status = 500                                           # refresh fails: stale keys kept
    assert (await auth.authenticate(bearer(token(rsa_key2)), {})).authenticated
    assert jwks_server.hits == 3
    assert (await auth.authenticate(bearer(token(rsa_key2)), {})).authenticated
    assert jwks_server.hits == 3                                       # and not retried at once


async def test_jwks_fetch_failure_without_cache(rsa_key: rsa.RSAPrivateKey) -> None:
    server = await JwksServer().start()
    url = f"{server.url}/keys"
    await server.stop()                                                # nothing listens there now
    auth = authenticator([{"issuer": ISSUER, "jwksUri": url, "timeout": "1s"}], JwksCache())
    assert (await auth.authenticate(bearer(token(rsa_key)), {})).error == jwt_auth.ERR_JWKS_FETCH
    assert (await auth.authenticate({}, {})).error is None             # no token still passes


async def test_openid_discovery_without_jwks_uri(jwks_server: JwksServer, rsa_key: rsa.RSAPrivateKey) -> None:
    jwks_server.jwks = {"keys": [public_jwk(rsa_key, "k1")]}
    issuer = jwks_server.url
    auth = authenticator([{"issuer": issuer}], JwksCache())
    tok = jwt.encode({"iss": issuer, "sub": "bob", "exp": int(time.time()) + 60}, rsa_key, algorithm="RS256",
                     headers={"kid": "k1"})
    result = await auth.authenticate(bearer(tok), {})
    assert result.principal == f"{issuer}/bob"
