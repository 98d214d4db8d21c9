"""RequestAuthentication and AuthorizationPolicy on live traffic: the proxy's authn/authz filters.

``proxy_core.jwt_auth`` and ``proxy_core.authz`` decide; this module applies their answers
to requests and connections, and is all the request path knows of them.

Where policies are enforced.  In Istio the destination workload's sidecar enforces them.
raymesh has one proxy per node and node-to-node traffic crosses the destination node's
``inbound`` listener as a spliced CONNECT tunnel, whose bytes are not parsed there.  So the
proxy that parses the request -- the node proxy the client reached -- enforces the
destination workload's policies on its behalf, once the destination is known:

* HTTP (``Exchange``): RequestAuthentication right before the request is sent upstream
  (after routing, rewrites, header operations, faults and direct responses, as the
  destination's sidecar would see it), then AuthorizationPolicy for the endpoint each
  attempt picks (a retry to another endpoint is checked again: its workload may carry
  other policies);
* TCP service ports (``TcpSession``) and ``CONNECT`` tunnels to a service: the
  AuthorizationPolicy rules that apply to TCP traffic (HTTP-only fields fail closed, see
  ``proxy_core.authz``), for the endpoint picked, before the dial.

Policies select workloads by the endpoint's namespace and labels and by its service (for
``targetRefs``).  The destination port policies compare (``ports``, ``destination.port``) is
the service port: workloads bind ports the mesh chooses, so the service port is the one a
policy can name (as with Istio's ambient waypoints).  The source principal
(``source_principal``) is the local workload that opened the client's connection, as the
proxy found it through ``/proc`` (``Mtls.workload_of``, the identity it presents on mTLS
tunnels), or the verified peer identity of a connection that arrived over mTLS.  A client
the proxy cannot identify is anonymous: ``principals``, ``namespaces`` and
``serviceAccounts`` rules match nothing for it and their ``notX`` forms match everything.

At the destination node the ``inbound`` listener checks every tunnel before splicing it
(``SecurityRuntime.permits_inbound``), with the peer's verified SPIFFE id (anonymous for a
plaintext tunnel): it refuses a tunnel only when the destination's policies deny every
request the peer could send through it (``Authorizer.check_peer``), so a process that
dials the inbound listener itself meets the same principal rules as one going through its
node's proxy.

RequestAuthentication is merged per destination cluster: the rules of every workload behind
it apply to the request before an endpoint is picked (the token headers are rewritten once
per request).  Workloads of one service normally share their RequestAuthentication; when
they do not, a token is checked against the union, which is stricter, never looser.

Answers, as Envoy gives them: a denied request gets ``403 RBAC: access denied`` with
response flag ``RBAC``; a denied TCP connection (or CONNECT tunnel) is closed (answered 403
first for CONNECT); a token that does not verify gets ``401`` with Envoy's jwt_authn message
and ``WWW-Authenticate``.  AUDIT policies only log (logger ``proxy_core.security``) and count.

Cost: a destination no policy selects costs one dict lookup per request (the snapshot's
clusters without policies are absent from the table ``build_security`` returns).  A token
is verified in a task, since a ``jwksUri`` may have to be fetched; the event loop never
waits on that fetch (``JwksCache``: shared fetch, timeout, cache, refresh).
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Mapping, Protocol, Sequence
from urllib.parse import parse_qsl

from proxy_core import flags
from proxy_core.authz import Authorizer, Decision, RequestAttributes, selects
from proxy_core.jwt_auth import AuthResult, JwksCache, JwtAuthenticator, Tokens, www_authenticate
from proxy_core.mtls import Mtls
from proxy_core.policy import apply_header_ops
from proxy_core.snapshot import Endpoint, HeaderOps, Snapshot

__all__ = ["DENIED_BODY", "ClusterSecurity", "RequestAuthorization", "SecurityRuntime", "SecurityStats",
           "build_security", "source_principal"]

log = logging.getLogger("proxy_core.security")

DENIED_BODY = b"RBAC: access denied"       # Envoy's rbac filter local reply


# -- what outlives a snapshot ------------------------------------------------------------------


@dataclass(slots=True)
class SecurityStats:
    """Envoy's ``rbac`` and ``jwt_authn`` filter counters for one proxy.

    ``denied_by`` counts denials by the deciding rule's Istio id
    (``ns[foo]-policy[deny-admin]-rule[0]``), ``-`` when ALLOW policies applied and none
    matched; ``jwt_denied_by`` counts 401s by Envoy's message.
    """

    rbac_allowed: int = 0
    rbac_denied: int = 0
    rbac_audited: int = 0
    denied_by: dict[str, int] = field(default_factory=dict)
    jwt_allowed: int = 0
    jwt_denied: int = 0
    jwt_denied_by: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"rbac": {"allowed": self.rbac_allowed, "denied": self.rbac_denied, "audited": self.rbac_audited,
                         "denied_by": dict(self.denied_by)},
                "jwt_authn": {"allowed": self.jwt_allowed, "denied": self.jwt_denied,
                              "denied_by": dict(self.jwt_denied_by)}}


InboundTable = Mapping[tuple[str, int], tuple[Authorizer, ...]]


@dataclass(slots=True)
class SecurityRuntime:
    """The proxy's security state that a config swap keeps: fetched JWKS and the counters."""

    jwks: JwksCache = field(default_factory=JwksCache)
    stats: SecurityStats = field(default_factory=SecurityStats)
    # The inbound listener's table, for the security table (one per snapshot) it was built from.
    _inbound: tuple[Mapping[str, "ClusterSecurity"] | None, InboundTable] = (None, {})

    def permits_inbound(self, snapshot: Snapshot, security: Mapping[str, "ClusterSecurity"],
                        principal: str | None, host: str, port: int) -> bool:
        """A tunnel to the local endpoint ``host:port`` from a peer whose verified SPIFFE id
        is ``principal`` (None: plaintext, anonymous).  False (counted) when the endpoint's
        policies deny whatever the tunnel could carry; the caller answers 403."""
        if not security:
            return True
        built_for, table = self._inbound
        if built_for is not security:
            table = inbound_authorizers(snapshot, security)
            self._inbound = (security, table)
        authorizers = table.get((host, port))
        if authorizers is None:
            return True
        attrs = RequestAttributes(source_principal=(principal or "").removeprefix("spiffe://"),
                                  destination_ip=host, http=False)
        decisions = [az.check_peer(attrs) for az in authorizers]
        decision = next((d for d in decisions if d.allowed), decisions[0])
        return self.judged(decision, lambda: f"inbound tunnel from {principal or 'a plaintext peer'} -> {host}:{port}")

    def judged(self, decision: Decision, what: Callable[[], str]) -> bool:
        """Count (and for AUDIT, log) one decision; ``what`` describes the traffic, lazily."""
        s = self.stats
        if decision.audit:
            s.rbac_audited += 1
            log.info("AuthorizationPolicy AUDIT: %s: %s", what(), "allowed" if decision.allowed else "denied")
        if decision.allowed:
            s.rbac_allowed += 1
            return True
        s.rbac_denied += 1
        key = decision.policy or "-"
        s.denied_by[key] = s.denied_by.get(key, 0) + 1
        return False

    def jwt_failed(self, error: str) -> None:
        s = self.stats
        s.jwt_denied += 1
        s.jwt_denied_by[error] = s.jwt_denied_by.get(error, 0) + 1


# -- what the filters need from the request engine ---------------------------------------------


class _Request(Protocol):
    method: str
    headers: Mapping[str, str]


class _Connection(Protocol):
    peer_ip: str
    peer_principal: str | None     # mTLS peer SPIFFE id; None without mTLS
    source: Any                    # the local client, cached by ``Mtls.workload_of``
    transport: Any


class _Server(Protocol):
    mtls: Mtls


def source_principal(mtls: Mtls, conn: _Connection) -> str:
    """The AuthorizationPolicy source principal of a downstream connection (no ``spiffe://``).

    The verified peer identity when the connection arrived over mTLS; otherwise the local
    workload that opened it, as ``/proc`` tells (the identity the proxy presents for it on
    mTLS tunnels); "" (anonymous) for a client the proxy cannot identify.
    """
    peer = conn.peer_principal
    if peer:
        return peer.removeprefix("spiffe://")
    return mtls.workload_of(conn).principal


class GuardedExchange(Protocol):
    """The parts of ``proxy_core.server.Exchange`` the filters use."""

    loop: asyncio.AbstractEventLoop
    server: _Server
    connecting: asyncio.Task[Any] | None      # cancelled when the exchange ends early
    authz: "RequestAuthorization | None"
    request_id: str | None

    @property
    def req(self) -> _Request | None: ...

    @property
    def conn(self) -> _Connection: ...

    def guard(self, fn: Any, *args: Any) -> None: ...

    def local_reply(self, status: int, body: bytes, flag: str | None, *, close: bool = False,
                    extra: list[tuple[bytes, bytes]] | None = None) -> None: ...


Proceed = Callable[[str, str, tuple[HeaderOps, ...]], None]    # (path, authority, request header ops)


# -- per destination -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ClusterSecurity:
    """The policies of the workloads behind one destination cluster."""

    runtime: SecurityRuntime
    port: int                                  # the service port (``ports``, ``destination.port``)
    authenticator: JwtAuthenticator | None     # merged RequestAuthentication; None: none applies
    authorizers: Mapping[str, Authorizer]      # by endpoint key; endpoints no policy selects are absent

    # HTTP

    def admit(self, ex: GuardedExchange, path: str, authority: str, ops: tuple[HeaderOps, ...],
              proceed: Proceed) -> None:
        """Authenticate the request, arm per-endpoint authorization, then ``proceed``; or answer 401."""
        req = ex.req
        assert req is not None
        headers = _with_ops(req.headers, ops) if ops else req.headers
        authn = self.authenticator
        if authn is None:
            self._authenticated(ex, None, path, authority, ops, headers, proceed)
            return
        found = authn.locate(headers, _query(path))
        if not found:
            self._authenticated(ex, authn.unauthenticated, path, authority, ops, headers, proceed)
            return
        self._verify(ex, authn, found, partial(self._authenticated, ex, path=path, authority=authority, ops=ops,
                                               headers=headers, proceed=proceed))

    @staticmethod
    def _verify(ex: GuardedExchange, authn: JwtAuthenticator, found: Tokens,
                then: Callable[[AuthResult], None]) -> None:
        task = ex.loop.create_task(authn.verify(found))
        ex.connecting = task        # so a client leaving or the route timeout cancels it

        def done(t: asyncio.Task[AuthResult]) -> None:
            if t is not ex.connecting or t.cancelled():
                return
            ex.connecting = None
            ex.guard(lambda: then(t.result()))

        task.add_done_callback(done)

    def _authenticated(self, ex: GuardedExchange, result: AuthResult | None, path: str, authority: str,
                       ops: tuple[HeaderOps, ...], headers: Mapping[str, str], proceed: Proceed) -> None:
        req = ex.req
        assert req is not None
        if result is not None:
            if result.error is not None:
                self.runtime.jwt_failed(result.error)
                realm = "http://" + authority + path.partition("?")[0]
                ex.local_reply(401, result.error.encode(), None,
                               extra=[(b"www-authenticate", www_authenticate(realm).encode("latin-1"))])
                return
            if result.principal:
                self.runtime.stats.jwt_allowed += 1
            jwt_ops = HeaderOps(set=result.set_headers, remove=result.remove_headers)
            if jwt_ops:
                ops = (*ops, jwt_ops)
                headers = _with_ops(headers, (jwt_ops,))
        if self.authorizers:
            ex.authz = RequestAuthorization(self, RequestAttributes(
                source_principal=source_principal(ex.server.mtls, ex.conn), source_ip=ex.conn.peer_ip,
                destination_port=self.port, host=authority, method=req.method, path=path, headers=headers,
                request_principal=result.principal if result is not None else "",
                audiences=result.audiences if result is not None else (),
                presenter=result.presenter if result is not None else "",
                claims=result.claims if result is not None else {}))
        proceed(path, authority, ops)

    # TCP

    def permits_tunnel(self, ex: GuardedExchange, ep: Endpoint) -> bool:
        """A CONNECT tunnel to ``ep``: TCP rules; a denial is answered 403 and the connection closed."""
        conn = ex.conn
        if self.permits_connection(conn.peer_ip, source_principal(ex.server.mtls, conn), ep):
            return True
        ex.local_reply(403, DENIED_BODY, flags.RBAC, close=True)
        return False

    def permits_connection(self, source_ip: str, principal: str, ep: Endpoint) -> bool:
        """A TCP connection to ``ep`` from ``principal`` (``source_principal``); the caller
        closes it when this is False."""
        az = self.authorizers.get(ep.key)
        if az is None:
            return True
        attrs = RequestAttributes(source_principal=principal, source_ip=source_ip, destination_ip=ep.address,
                                  destination_port=self.port, http=False)
        return self.runtime.judged(az.check(attrs), lambda: f"tcp {source_ip} -> {ep.key} (port {self.port})")


@dataclass(slots=True)
class RequestAuthorization:
    """One request's authorization: its attributes, checked against each endpoint it is sent to."""

    security: ClusterSecurity
    attrs: RequestAttributes

    def permits(self, ex: GuardedExchange, ep: Endpoint) -> bool:
        """Whether the request may go to ``ep``; a denial is answered ``403 RBAC: access denied``."""
        az = self.security.authorizers.get(ep.key)
        if az is None:
            return True
        attrs = self.attrs
        attrs.destination_ip = ep.address
        if self.security.runtime.judged(az.check(attrs), lambda: _describe(ex, attrs, ep)):
            return True
        ex.local_reply(403, DENIED_BODY, flags.RBAC)
        return False


def _describe(ex: GuardedExchange, attrs: RequestAttributes, ep: Endpoint) -> str:
    return (f"{attrs.method} {attrs.host}{attrs.path} from {attrs.source_principal or attrs.source_ip} "
            f"principal={attrs.request_principal or '-'} -> {ep.key} request_id={ex.request_id}")


# -- building the table --------------------------------------------------------------------------


def build_security(snapshot: Snapshot, runtime: SecurityRuntime) -> dict[str, ClusterSecurity]:
    """The clusters whose workloads some policy selects, by cluster name; empty without policies.

    Endpoints selected by the same policies share one ``Authorizer`` (compiled once), and
    clusters with the same RequestAuthentication rules one ``JwtAuthenticator``.
    """
    authz: Sequence[Mapping[str, Any]] = snapshot.security.get("authz") or ()
    jwt: Sequence[Mapping[str, Any]] = snapshot.security.get("jwt") or ()
    if not authz and not jwt:
        return {}
    authorizers: dict[tuple[int, ...], Authorizer] = {}
    authenticators: dict[tuple[int, ...], JwtAuthenticator] = {}
    out: dict[str, ClusterSecurity] = {}
    for name, cluster in snapshot.clusters.items():
        service, service_ns = _service_of(cluster.service)
        by_endpoint: dict[str, Authorizer] = {}
        jwt_selected: set[int] = set()
        for ep in cluster.endpoints:
            ns = ep.namespace or service_ns
            if not ns:
                continue        # not a mesh workload (an external ServiceEntry address): nothing enforces
            labels = dict(ep.labels)
            key = tuple(i for i, p in enumerate(authz) if not p.get("dry_run") and selects(p, ns, labels, service))
            if key:
                az = authorizers.get(key)
                if az is None:
                    az = authorizers[key] = Authorizer([authz[i] for i in key], ns, labels, service)
                by_endpoint[ep.key] = az
            jwt_selected.update(i for i, rs in enumerate(jwt) if rs.get("rules") and selects(rs, ns, labels, service))
        authn = None
        if jwt_selected:
            jkey = tuple(sorted(jwt_selected))
            authn = authenticators.get(jkey)
            if authn is None:
                authn = authenticators[jkey] = JwtAuthenticator([jwt[i] for i in jkey], None, {},
                                                                jwks_cache=runtime.jwks)
        if by_endpoint or authn is not None:
            out[name] = ClusterSecurity(runtime, cluster.port, authn, by_endpoint)
    return out


def inbound_authorizers(snapshot: Snapshot, security: Mapping[str, ClusterSecurity]) -> InboundTable:
    """For each endpoint on this node, the ``Authorizer`` of every service it serves.

    A tunnel names only the endpoint, not the service it was opened for, and an endpoint
    behind several services may carry different policies in each (``targetRefs``): the
    tunnel is refused only when all of them deny.  An endpoint that some service without
    policies reaches is left out (always admitted), as are endpoints no policy selects.
    """
    found: dict[tuple[str, int], list[Authorizer | None]] = {}
    for name, cluster in snapshot.clusters.items():
        cs = security.get(name)
        for ep in cluster.endpoints:
            if ep.via is None and ep.node == snapshot.node_id:
                found.setdefault((ep.address, ep.port), []).append(
                    cs.authorizers.get(ep.key) if cs is not None else None)
    table: dict[tuple[str, int], tuple[Authorizer, ...]] = {}
    for key, azs in found.items():
        if None not in azs:
            table[key] = tuple(dict.fromkeys(azs))     # type: ignore[arg-type]
    return table


def _service_of(host: str) -> tuple[str | None, str]:
    """(service name, namespace) of ``name.namespace.svc.<domain>``; (None, "") for other hosts."""
    parts = host.split(".")
    if len(parts) >= 4 and parts[2] == "svc":
        return parts[0], parts[1]
    return None, ""


def _with_ops(headers: Mapping[str, str], ops: Sequence[HeaderOps]) -> dict[str, str]:
    """The request headers as the destination receives them (route and JWT header operations)."""
    items = list(headers.items())
    for o in ops:
        items = apply_header_ops(items, o)
    out: dict[str, str] = {}
    for n, v in items:
        out[n] = out[n] + "," + v if n in out else v
    return out


def _query(path: str) -> dict[str, str]:
    """Decoded query parameters of a request target (the first value of each name)."""
    _, sep, query = path.partition("?")
    if not sep:
        return {}
    out: dict[str, str] = {}
    for k, v in parse_qsl(query.partition("#")[0]):
        out.setdefault(k, v)
    return out
