"""RequestAuthentication: JWT verification in the enforcing proxy, with Istio/Envoy semantics.

A request without a token passes through unauthenticated (an AuthorizationPolicy decides
whether that is acceptable); a request with a token that does not verify is answered 401
with ``WWW-Authenticate: Bearer realm="<url>", error="invalid_token"`` and one of Envoy's
``jwt_authn`` messages as ``AuthResult.error``.  Which rule verifies a token is chosen by
the token's ``iss`` among the rules whose locations it was found in, as Envoy does; a token
from an issuer no rule names is rejected ("Jwt issuer is not configured").

Signatures are checked by PyJWT against keys from the rule's JWKS.  The algorithm must be
one PyJWT implements, not ``none``, and fit the key: RSA keys verify RS*/PS*, EC keys the
ES* of their curve, Ed25519 keys EdDSA, and only symmetric (``oct``) keys verify HS*, so a
public key can never be used as an HMAC secret.  A key that declares ``alg`` verifies only
that algorithm.  ``exp`` and ``nbf`` allow Envoy's default 60 s of clock skew; ``iat`` is
not checked (Envoy does not).

Keys from ``jwksUri`` (or, with neither ``jwks`` nor ``jwksUri``, from the issuer's OpenID
discovery document) come from a ``JwksCache``: fetched on first use, refreshed after the
TTL (20 minutes, Istio's JWKS refresh interval), kept when a refresh fails, and refetched
at most once per ``min_refetch_interval`` when a token names a ``kid`` the cached set lacks,
so signing-key rotation at the issuer needs no restart and a flood of made-up kids costs
one fetch.
"""
from __future__ import annotations

import asyncio
import json
import ssl
import time
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, Mapping, Sequence
from urllib.parse import urlsplit

import jwt

from proxy_core import http1
from proxy_core.authz import selects

__all__ = ["AuthResult", "JwtAuthenticator", "Tokens", "JwksCache", "JwksError", "KeySet", "http_get",
           "www_authenticate", "CLOCK_SKEW", "DEFAULT_JWKS_TTL"]

CLOCK_SKEW = 60.0                    # Envoy jwt_authn clock_skew_seconds default
DEFAULT_JWKS_TTL = 20 * 60.0         # Istio refreshes JWKS every 20 minutes
DEFAULT_MIN_REFETCH = 30.0           # at most one unknown-kid refetch per URI per this many seconds
MAX_JWKS_BYTES = 1 << 20

_RSA = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_HMAC = frozenset({"HS256", "HS384", "HS512"})
_EC_BY_CURVE = {"P-256": "ES256", "P-384": "ES384", "P-521": "ES512"}
SUPPORTED_ALGORITHMS = _RSA | _HMAC | frozenset(_EC_BY_CURVE.values()) | {"EdDSA"}

# Envoy jwt_authn status messages (what Envoy writes in the 401 body).
ERR_MALFORMED = "Jwt is not in the form of Header.Payload.Signature with two dots and 3 sections"
ERR_BAD_ALG = "Jwt header [alg] is not supported"
ERR_UNKNOWN_ISSUER = "Jwt issuer is not configured"
ERR_AUDIENCE = "Audiences in Jwt are not allowed"
ERR_EXPIRED = "Jwt is expired"
ERR_NOT_YET_VALID = "Jwt not yet valid"
ERR_NO_KEY = "Jwks doesn't have key to match kid or alg from Jwt"
ERR_SIGNATURE = "Jwt verification fails"
ERR_JWKS_FETCH = "Jwks remote fetch is failed"


def www_authenticate(realm: str) -> str:
    """The 401's ``WWW-Authenticate`` value; Envoy's realm is the request URL without query."""
    return f'Bearer realm="{realm}", error="invalid_token"'


class JwksError(Exception):
    """A JWKS could not be fetched or parsed."""


# -- keys ------------------------------------------------------------------------------------


def _algorithms_for(jwk: Mapping[str, Any]) -> frozenset[str]:
    """The algorithms a JWK may verify: its ``alg`` if declared, else those of its key type."""
    kty = jwk.get("kty")
    if kty == "RSA":
        family = _RSA
    elif kty == "EC":
        family = frozenset({_EC_BY_CURVE[jwk["crv"]]}) if jwk.get("crv") in _EC_BY_CURVE else frozenset()
    elif kty == "OKP":
        family = frozenset({"EdDSA"}) if jwk.get("crv") == "Ed25519" else frozenset()
    elif kty == "oct":
        family = _HMAC
    else:
        family = frozenset()
    alg = jwk.get("alg")
    return family & {alg} if alg else family


@dataclass(slots=True)
class _Key:
    kid: str | None
    algorithms: frozenset[str]
    jwk: Mapping[str, Any]
    prepared: dict[str, jwt.PyJWK] = field(default_factory=dict)

    def for_algorithm(self, alg: str) -> jwt.PyJWK | None:
        """PyJWK binds one algorithm per key object, so build one per algorithm actually used."""
        key = self.prepared.get(alg)
        if key is None:
            try:
                key = self.prepared[alg] = jwt.PyJWK(dict(self.jwk), algorithm=alg)
            except jwt.PyJWTError:
                return None
        return key


class KeySet:
    """A parsed JWKS; keys PyJWT cannot use or that fit no supported algorithm are skipped."""

    __slots__ = ("keys", "kids")

    def __init__(self, jwks: Mapping[str, Any]) -> None:
        keys = jwks.get("keys") if isinstance(jwks, Mapping) else None
        if not isinstance(keys, list):
            raise JwksError("a JWKS is an object with a 'keys' list")
        self.keys = tuple(_Key(k.get("kid"), _algorithms_for(k), k) for k in keys
                          if isinstance(k, Mapping) and _algorithms_for(k))
        self.kids = frozenset(k.kid for k in self.keys if k.kid)

    @classmethod
    def from_json(cls, text: str | bytes) -> "KeySet":
        try:
            return cls(json.loads(text))
        except ValueError as e:
            raise JwksError(f"JWKS is not JSON: {e}") from e

    def candidates(self, kid: str | None, alg: str) -> list[jwt.PyJWK]:
        """Keys that may have signed a token with this ``kid`` and ``alg`` (jwt_verify_lib's rule:
        a key without kid fits any token, a token without kid tries every key)."""
        out = []
        for k in self.keys:
            if alg in k.algorithms and (not kid or not k.kid or k.kid == kid):
                key = k.for_algorithm(alg)
                if key is not None:
                    out.append(key)
        return out


# -- fetching --------------------------------------------------------------------------------

Fetcher = Callable[[str, float], Awaitable[bytes]]


async def http_get(url: str, timeout: float, max_bytes: int = MAX_JWKS_BYTES) -> bytes:
    """GET ``url`` (http or https) and return the body of a 200 answer; raises JwksError otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise JwksError(f"unsupported JWKS URL {url!r}")
    tls = ssl.create_default_context() if parts.scheme == "https" else None
    port = parts.port or (443 if tls else 80)
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    try:
        return await asyncio.wait_for(_get(parts.hostname, port, tls, host, target, max_bytes), timeout)
    except (OSError, asyncio.TimeoutError, http1.ProtocolError) as e:
        raise JwksError(f"fetching {url}: {e!r}") from e


async def _get(hostname: str, port: int, tls: ssl.SSLContext | None, host: str, target: str, max_bytes: int) -> bytes:
    reader, writer = await asyncio.open_connection(hostname, port, ssl=tls)
    try:
        writer.write(f"GET {target} HTTP/1.1\r\nHost: {host}\r\nAccept: application/json\r\n"
                     f"Connection: close\r\n\r\n".encode())
        parser = http1.ResponseParser()
        status, body, size = 0, [], 0
        while True:
            data = await reader.read(65536)
            events = parser.feed(data) if data else parser.feed_eof()
            for ev in events:
                if isinstance(ev, http1.ResponseHead) and not ev.informational:
                    status = ev.status
                elif isinstance(ev, http1.Data):
                    size += len(ev.data)
                    if size > max_bytes:
                        raise JwksError(f"JWKS larger than {max_bytes} bytes")
                    body.append(ev.data)
                elif isinstance(ev, http1.EndOfMessage) and status:
                    if status != 200:
                        raise JwksError(f"JWKS answer {status}")
                    return b"".join(body)
            if not data:
                raise JwksError("connection closed before a complete answer")
    finally:
        writer.close()


@dataclass(slots=True)
class _Entry:
    keys: KeySet
    fetched_at: float
    retry_at: float = 0.0          # after a failed refresh: when to try again
    refetched_at: float = float("-inf")


class JwksCache:
    """Remote JWKS by URI: TTL, stale-on-error, rate-limited refetch on unknown kid.

    Concurrent lookups of one URI share a single fetch.  ``fetch`` and ``clock`` are
    injectable so tests control the network and time.
    """

    def __init__(self, *, ttl: float = DEFAULT_JWKS_TTL, min_refetch_interval: float = DEFAULT_MIN_REFETCH,
                 fetch: Fetcher = http_get, clock: Callable[[], float] = time.monotonic) -> None:
        self.ttl = ttl
        self.min_refetch_interval = min_refetch_interval
        self._fetch_bytes = fetch
        self._clock = clock
        self._entries: dict[str, _Entry] = {}
        self._discovered: dict[str, str] = {}
        self._inflight: dict[str, asyncio.Task[KeySet]] = {}

    async def get(self, uri: str, timeout: float) -> KeySet:
        """Cached keys, fetched when absent or older than the TTL; stale keys when a refresh fails."""
        entry = self._entries.get(uri)
        now = self._clock()
        if entry is not None and (now - entry.fetched_at < self.ttl or now < entry.retry_at):
            return entry.keys
        try:
            return await self._fetch(uri, timeout)
        except JwksError:
            if entry is None:
                raise
            entry.retry_at = now + self.min_refetch_interval
            return entry.keys

    async def refetch(self, uri: str, timeout: float) -> KeySet | None:
        """Fetch again because a token named an unknown kid; None when rate-limited or failed."""
        entry = self._entries.get(uri)
        now = self._clock()
        if entry is not None:
            if now - entry.refetched_at < self.min_refetch_interval:
                return None
            entry.refetched_at = now
        try:
            keys = await self._fetch(uri, timeout)
        except JwksError:
            return None
        self._entries[uri].refetched_at = now
        return keys

    async def discover(self, issuer: str, timeout: float) -> str:
        """The ``jwks_uri`` of the issuer's OpenID configuration (what istiod does without jwksUri)."""
        uri = self._discovered.get(issuer)
        if uri is None:
            body = await self._fetch_bytes(issuer.rstrip("/") + "/.well-known/openid-configuration", timeout)
            try:
                uri = json.loads(body)["jwks_uri"]
            except (ValueError, KeyError, TypeError) as e:
                raise JwksError(f"no jwks_uri in the OpenID configuration of {issuer}") from e
            self._discovered[issuer] = uri
        return uri

    async def _fetch(self, uri: str, timeout: float) -> KeySet:
        task = self._inflight.get(uri)
        if task is None:
            task = asyncio.ensure_future(self._load(uri, timeout))
            self._inflight[uri] = task
            task.add_done_callback(lambda _: self._inflight.pop(uri, None))
        return await asyncio.shield(task)

    async def _load(self, uri: str, timeout: float) -> KeySet:
        keys = KeySet.from_json(await self._fetch_bytes(uri, timeout))
        old = self._entries.get(uri)
        self._entries[uri] = _Entry(keys, self._clock(),
                                    refetched_at=old.refetched_at if old else float("-inf"))
        return keys


# -- authentication --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AuthResult:
    """The outcome for one request.

    ``error`` set: answer 401 (see ``www_authenticate``).  Otherwise ``principal`` is
    ``iss/sub`` of the verified token ("" when the request carried none) and the header
    operations are to be applied before forwarding: first ``remove_headers`` (the token
    unless ``forwardOriginalToken``, and every output header, so a client cannot forge
    them), then ``set_headers`` (``outputPayloadToHeader``, ``outputClaimToHeaders``).
    ``claims`` are the payload with space-delimited claims (``scope``, ``permission``, ...)
    split into lists, as AuthorizationPolicy ``request.auth.claims`` matches them.
    """

    principal: str = ""
    claims: Mapping[str, Any] = field(default_factory=dict)
    audiences: tuple[str, ...] = ()
    presenter: str = ""
    error: str | None = None
    set_headers: tuple[tuple[str, str], ...] = ()
    remove_headers: tuple[str, ...] = ()

    @property
    def authenticated(self) -> bool:
        return bool(self.principal) and self.error is None


@dataclass(frozen=True, slots=True)
class _Rule:
    issuer: str
    audiences: frozenset[str]
    keys: KeySet | None          # inline JWKS, parsed once
    jwks_uri: str | None
    timeout: float
    from_headers: tuple[tuple[str, str], ...]
    from_params: tuple[str, ...]
    from_cookies: tuple[str, ...]
    payload_header: str | None
    claim_headers: tuple[tuple[str, str], ...]
    forward: bool
    space_delimited: frozenset[str]

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "_Rule":
        keys = None
        if d.get("jwks") is not None:
            try:
                keys = KeySet.from_json(d["jwks"])
            except JwksError:
                keys = KeySet({"keys": []})        # every token of this issuer fails, as in Istio
        return cls(issuer=d.get("issuer", ""), audiences=frozenset(d.get("audiences") or ()), keys=keys,
                   jwks_uri=d.get("jwks_uri"), timeout=float(d.get("timeout", 5.0)),
                   from_headers=tuple((h["name"].lower(), h.get("prefix", "")) for h in d.get("from_headers") or ()),
                   from_params=tuple(d.get("from_params") or ()), from_cookies=tuple(d.get("from_cookies") or ()),
                   payload_header=d.get("output_payload_to_header"),
                   claim_headers=tuple((o["header"].lower(), o["claim"])
                                       for o in d.get("output_claim_to_headers") or ()),
                   forward=bool(d.get("forward_original_token")),
                   space_delimited=frozenset(d.get("space_delimited_claims") or ("scope", "permission")))

    def tokens(self, headers: Mapping[str, str], query: Mapping[str, str],
               cookies: Mapping[str, str]) -> list[tuple[str, str | None]]:
        """(token, header it came from or None) for each configured location holding one."""
        out: list[tuple[str, str | None]] = []
        for name, prefix in self.from_headers:
            value = headers.get(name)
            if value and value[:len(prefix)].lower() == prefix.lower():
                token = value[len(prefix):].strip()
                if token:
                    out.append((token, name))
        out += [(query[p], None) for p in self.from_params if query.get(p)]
        out += [(cookies[c], None) for c in self.from_cookies if cookies.get(c)]
        return out


def _cookies(header: str | None) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in (header or "").split(";"):
        name, eq, value = part.strip().partition("=")
        if eq and name:
            out.setdefault(name, value.strip().strip('"'))
    return out


def _claim_header_value(value: Any) -> str | None:
    """Envoy's claim_to_headers: strings, numbers and booleans; string lists joined by commas."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (str, int, float)):
        return str(value)
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        return ",".join(value)
    return None


def _nested(claims: Mapping[str, Any], dotted: str) -> Any:
    cur: Any = claims
    for part in dotted.split("."):
        if not isinstance(cur, Mapping):
            return None
        cur = cur.get(part)
    return cur


Tokens = dict[str, list[tuple[_Rule, str | None]]]   # token -> (rule, header it came from) per location


class JwtAuthenticator:
    """Every RequestAuthentication rule that selects one workload (Istio merges them all).

    ``namespace`` None takes every ruleset given, already selected by the caller (the proxy
    merges the rulesets of all the workloads behind one destination).  ``locate`` is
    synchronous so a request without a token costs no coroutine; ``verify`` may wait for a
    JWKS fetch.
    """

    __slots__ = ("_rules", "_cache", "_leeway", "_sanitize", "unauthenticated")

    def __init__(self, rulesets: Sequence[Mapping[str, Any]], namespace: str | None, labels: Mapping[str, str],
                 service: str | None = None, *, jwks_cache: JwksCache | None = None,
                 leeway: float = CLOCK_SKEW) -> None:
        self._rules = tuple(_Rule.from_dict(r) for rs in rulesets
                            if namespace is None or selects(rs, namespace, labels, service)
                            for r in rs.get("rules") or ())
        self._cache = jwks_cache if jwks_cache is not None else JwksCache()
        self._leeway = leeway
        outputs = [h for r in self._rules for h in (r.payload_header, *(c[0] for c in r.claim_headers)) if h]
        self._sanitize = tuple(dict.fromkeys(outputs))
        # A request without a token: passes, minus any output header a client tried to forge.
        self.unauthenticated = AuthResult(remove_headers=self._sanitize)

    @property
    def enabled(self) -> bool:
        return bool(self._rules)

    async def authenticate(self, headers: Mapping[str, str], query: Mapping[str, str]) -> AuthResult:
        """Verify the request's token(s); ``headers`` with lower-case names, ``query`` decoded."""
        found = self.locate(headers, query)
        return await self.verify(found) if found else self.unauthenticated

    def locate(self, headers: Mapping[str, str], query: Mapping[str, str]) -> Tokens:
        """The tokens the request carries in the rules' locations (empty: unauthenticated)."""
        cookies = _cookies(headers.get("cookie")) if any(r.from_cookies for r in self._rules) else {}
        found: Tokens = {}
        for rule in self._rules:
            for token, header in rule.tokens(headers, query, cookies):
                found.setdefault(token, []).append((rule, header))
        return found

    async def verify(self, found: Tokens) -> AuthResult:
        """The first token that verifies wins; else the first token's error (Envoy's order)."""
        first_error = None
        for token, sites in found.items():
            result = await self._verify_token(token, sites)
            if result.error is None:
                return result
            first_error = first_error or result.error
        return AuthResult(error=first_error)

    async def _verify_token(self, token: str, sites: Sequence[tuple[_Rule, str | None]]) -> AuthResult:
        if token.count(".") != 2:
            return AuthResult(error=ERR_MALFORMED)
        try:
            header = jwt.get_unverified_header(token)
            payload = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            return AuthResult(error=ERR_MALFORMED)
        issuer = payload.get("iss")
        matching = [(r, h) for r, h in sites if r.issuer == issuer]
        if not matching:
            return AuthResult(error=ERR_UNKNOWN_ISSUER)
        rule = matching[0][0]
        error = await self._verify(rule, token, header, payload)
        if error is not None:
            return AuthResult(error=error)
        return self._success(rule, token, payload, [h for _, h in matching if h])

    async def _verify(self, rule: _Rule, token: str, header: Mapping[str, Any],
                      payload: Mapping[str, Any]) -> str | None:
        """None when the token verifies under ``rule``, else Envoy's message for the failure."""
        alg = header.get("alg")
        if alg not in SUPPORTED_ALGORITHMS:
            return ERR_BAD_ALG
        if rule.audiences:
            aud = payload.get("aud")
            auds = [aud] if isinstance(aud, str) else aud if isinstance(aud, list) else []
            if not rule.audiences.intersection(a for a in auds if isinstance(a, str)):
                return ERR_AUDIENCE
        kid = header.get("kid")
        uri = rule.jwks_uri
        try:
            if rule.keys is not None:
                keys = rule.keys
            else:
                uri = uri or await self._cache.discover(rule.issuer, rule.timeout)
                keys = await self._cache.get(uri, rule.timeout)
        except JwksError:
            return ERR_JWKS_FETCH
        candidates = keys.candidates(kid, alg)
        if not candidates and rule.keys is None and uri and kid and kid not in keys.kids:
            fresh = await self._cache.refetch(uri, rule.timeout)
            candidates = fresh.candidates(kid, alg) if fresh is not None else []
        if not candidates:
            return ERR_NO_KEY
        options: Any = {"verify_aud": False, "verify_iss": False, "verify_iat": False, "verify_sub": False,
                        "verify_jti": False, "require": []}
        for key in candidates:
            try:
                jwt.decode(token, key, algorithms=[alg], leeway=self._leeway, options=options)
                return None
            except jwt.ExpiredSignatureError:
                return ERR_EXPIRED
            except jwt.ImmatureSignatureError:
                return ERR_NOT_YET_VALID
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError:
                return ERR_SIGNATURE
        return ERR_SIGNATURE

    def _success(self, rule: _Rule, token: str, payload: Mapping[str, Any], token_headers: Sequence[str]) -> AuthResult:
        claims = dict(payload)
        for name in rule.space_delimited:
            if isinstance(claims.get(name), str):
                claims[name] = claims[name].split()
        aud = payload.get("aud")
        audiences = (aud,) if isinstance(aud, str) else tuple(a for a in aud if isinstance(a, str)) \
            if isinstance(aud, list) else ()
        sets: list[tuple[str, str]] = []
        if rule.payload_header:
            sets.append((rule.payload_header, token.split(".")[1]))
        for header_name, claim in rule.claim_headers:
            value = _claim_header_value(_nested(payload, claim))
            if value is not None:
                sets.append((header_name, value))
        remove = list(self._sanitize)
        if not rule.forward:
            remove += [h for h in token_headers if h not in remove]
        presenter = payload.get("azp")
        return AuthResult(principal=f"{payload.get('iss', '')}/{payload.get('sub', '')}", claims=claims,
                          audiences=audiences, presenter=presenter if isinstance(presenter, str) else "",
                          set_headers=tuple(sets), remove_headers=tuple(remove))
