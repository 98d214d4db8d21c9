"""Citadel: the mesh's certificate authority, a replica set over one root kept in the shared store.

The truth is the ``ca`` collection (``actors.store``)::

    {"trust_domain": "cluster.local",
     "root": {"cert_pem": ..., "key_pem": ...},              # the signing root
     "retired": [{"cert_pem": ..., "trusted_until": ts}]}    # earlier roots, still trusted

The first replica to start creates the root; since a commit is a create-if-absent of the
next revision, replicas racing on an empty store end with one root (the losers re-read it
and change nothing).  Replicas hold no state of their own, so any of them signs, and one
restarted loads the same root.

A rotation (``rotate_root``, or ``import_ca`` of an operator's root) keeps the previous root
in the trust bundle until every certificate it can have signed has expired (now + the
maximum SVID TTL), so peers holding an older SVID keep verifying during the overlap.

Signing is authorized by the registry: a node's proxy gets an SVID for ``ns/sa`` only when a
workload with that namespace and service account is registered on that node, as Istio's CA
only signs for the identity a workload's credential proves.  A gateway node (one the registry
lists with a gateway address) also gets the ingress gateway's own identity
(``istio-system/istio-ingressgateway-service-account``), as Istio's gateway pod has it.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any, Callable

import ray

from actors.registry import registry_state, registry_store
from actors.replicaset import deploy_replicas
from actors.store import GcsKV, RevisionedStore
from mesh.identity import (DEFAULT_ROOT_VALIDITY, DEFAULT_SVID_TTL, DEFAULT_TRUST_DOMAIN, MAX_SVID_TTL, CAKeyPair,
                           IdentityError, KeyType, create_root_ca, fingerprint, import_ca, load_cert, sign_csr,
                           spiffe_id, validate_trust_domain)
from mesh.compiler_gateways import GATEWAY_NAMESPACE, GATEWAY_SERVICE_ACCOUNT
from mesh.records import Record

GATEWAY_IDENTITY = (GATEWAY_NAMESPACE, GATEWAY_SERVICE_ACCOUNT)

log = logging.getLogger(__name__)

CA_COLLECTION = "ca"

Clock = Callable[[], datetime]


def _utcnow() -> datetime:
    return datetime.now(timezone.utc)


@dataclass(slots=True)
class CitadelOptions(Record):
    trust_domain: str = DEFAULT_TRUST_DOMAIN          # used when the root is created; the stored one wins after
    key_type: KeyType = "EC"                          # of a created root
    root_validity_seconds: float = DEFAULT_ROOT_VALIDITY.total_seconds()
    default_ttl_seconds: float = DEFAULT_SVID_TTL.total_seconds()
    max_ttl_seconds: float = MAX_SVID_TTL.total_seconds()
    collection: str = CA_COLLECTION                   # one per trust domain, should a cluster ever run two



@dataclass(frozen=True, slots=True)
class CAState:
    """A parsed revision of the ``ca`` collection."""

    trust_domain: str
    root: CAKeyPair
    retired: tuple[tuple[str, float], ...]    # (cert PEM, trusted until, epoch seconds)

    def bundle(self, now: datetime) -> list[str]:
        """Trusted roots, the signing one first."""
        return [self.root.cert_pem] + [pem for pem, until in self.retired if until > now.timestamp()]


def plan_first_root(state: dict[str, Any], trust_domain: str, root: dict[str, str]) -> dict[str, Any] | None:
    """Pure: install ``root`` unless a root exists (then None: the racing replica that won keeps its root)."""
    if state.get("root"):
        return None
    return {"trust_domain": trust_domain, "root": root, "retired": []}


def plan_new_root(state: dict[str, Any], root: dict[str, str], now: datetime, overlap: timedelta,
                  expected: str | None = None) -> dict[str, Any] | None:
    """Pure: make ``root`` the signing root and keep the current one trusted for ``overlap``.

    None (nothing to write) when ``root`` already signs (a retried import), or when
    ``expected`` names a root that no longer signs (a retried rotation that already happened).
    Retired roots whose overlap has passed are dropped.
    """
    current = state.get("root")
    if not current:
        raise IdentityError("no root CA yet: a Citadel replica creates it on start")
    current_fp = fingerprint(load_cert(current["cert_pem"]))
    if current["cert_pem"] == root["cert_pem"] or (expected is not None and expected != current_fp):
        return None
    kept = [r for r in state.get("retired") or []
            if r["trusted_until"] > now.timestamp() and r["cert_pem"] != root["cert_pem"]]
    kept.append({"cert_pem": current["cert_pem"], "trusted_until": (now + overlap).timestamp()})
    return {**state, "root": root, "retired": kept}


def authorize(registry: dict[str, Any], namespace: str, service_account: str, node_id: str) -> None:
    """Raise unless a workload running as ``namespace/service_account`` is registered on ``node_id``,
    or it is the ingress gateway's identity and ``node_id`` a gateway node."""
    state = registry_state(registry)
    node = state.nodes.get(node_id)
    if (namespace, service_account) == GATEWAY_IDENTITY and node is not None and node.gateway_address:
        return
    for wl in state.workloads:
        if (wl.namespace, wl.service_account, wl.node_id) == (namespace, service_account, node_id):
            return
    raise IdentityError(f"refusing to sign for {namespace}/{service_account}: no workload with that namespace and "
                        f"service account is registered on node {node_id}")


class CertificateAuthority:
    """Citadel's logic over the stores, with the clock injected (the actor is a thin shell)."""

    def __init__(self, ca_store: RevisionedStore, registry: RevisionedStore, options: CitadelOptions,
                 clock: Clock = _utcnow) -> None:
        validate_trust_domain(options.trust_domain)
        self.options = options
        self._store = ca_store
        self._registry = registry
        self._clock = clock
        self._cached: tuple[int, CAState] | None = None

    @property
    def _max_ttl(self) -> timedelta:
        """Also how long a replaced root stays trusted: no SVID it signed can outlive that."""
        return timedelta(seconds=self.options.max_ttl_seconds)

    def ensure_root(self) -> CAState:
        """Load the root, creating it on the first start of the first replica."""
        if not self._store.latest().state.get("root"):
            candidate = create_root_ca(self.options.trust_domain, self.options.key_type,
                                       timedelta(seconds=self.options.root_validity_seconds), self._clock())
            _, created = self._store.commit(
                lambda s, _n: plan_first_root(s, self.options.trust_domain, candidate.to_dict()))
            if created:
                log.info("created root CA %s for trust domain %s", candidate.fingerprint, self.options.trust_domain)
        return self.state()

    def state(self) -> CAState:
        rev = self._store.latest()
        if self._cached is not None and self._cached[0] == rev.number:
            return self._cached[1]
        if not rev.state.get("root"):
            raise IdentityError("no root CA yet: a Citadel replica creates it on start")
        parsed = CAState(trust_domain=rev.state["trust_domain"], root=CAKeyPair.from_dict(rev.state["root"]),
                         retired=tuple((r["cert_pem"], float(r["trusted_until"])) for r in rev.state.get("retired") or []))
        self._cached = (rev.number, parsed)
        return parsed

    def trust_bundle(self) -> list[str]:
        return self.state().bundle(self._clock())

    def info(self) -> dict[str, Any]:
        """Fingerprints and dates, never keys: what ``meshctl`` shows."""
        st = self.state()
        return {"trust_domain": st.trust_domain, "root": st.root.fingerprint,
                "root_not_after": st.root.cert.not_valid_after_utc.timestamp(),
                "retired": [{"root": fingerprint(load_cert(pem)), "trusted_until": until}
                            for pem, until in st.retired if until > self._clock().timestamp()]}

    def sign(self, csr_pem: str, namespace: str, service_account: str, node_id: str,
             ttl_seconds: float | None = None) -> dict[str, Any]:
        ttl = timedelta(seconds=self.options.default_ttl_seconds if ttl_seconds is None else ttl_seconds)
        if ttl > self._max_ttl:
            raise IdentityError(f"requested TTL {ttl} is greater than the max allowed TTL {self._max_ttl}")
        authorize(self._registry.latest().state, namespace, service_account, node_id)
        st = self.state()
        ident = spiffe_id(namespace, service_account, st.trust_domain)
        leaf = sign_csr(st.root, csr_pem, ident, ttl, self._clock())
        return {"cert_chain": [leaf, st.root.cert_pem], "spiffe_id": ident,
                "expires": load_cert(leaf).not_valid_after_utc.timestamp()}

    def import_ca(self, cert_pem: str, key_pem: str) -> dict[str, Any]:
        """Make an operator's root the signing root (idempotent); the previous one stays trusted."""
        root = import_ca(cert_pem, key_pem)
        self._install(root, expected=None)
        return self.info()

    def rotate_root(self, expected: str | None = None) -> dict[str, Any]:
        """Sign with a new root from now on; ``expected`` (the current root's fingerprint) makes a
        retried call a no-op instead of a second rotation."""
        st = self.state()
        root = create_root_ca(st.trust_domain, self.options.key_type,
                              timedelta(seconds=self.options.root_validity_seconds), self._clock())
        self._install(root, expected)
        return self.info()

    def _install(self, root: CAKeyPair, expected: str | None) -> None:
        _, changed = self._store.commit(
            lambda s, _n: plan_new_root(s, root.to_dict(), self._clock(), self._max_ttl, expected))
        if changed:
            log.info("root CA is now %s; the previous root stays trusted for %s", root.fingerprint, self._max_ttl)


def citadel_store(collection: str = CA_COLLECTION) -> RevisionedStore:
    return RevisionedStore(GcsKV(), collection)


@ray.remote
class Citadel:
    def __init__(self, replica: int, options: dict[str, Any] | None = None) -> None:
        self.replica = replica
        opts = CitadelOptions.from_dict(options)
        self.ca = CertificateAuthority(citadel_store(opts.collection), registry_store(), opts)
        self.ca.ensure_root()

    def ready(self) -> int:
        self.ca.state()
        return self.replica

    def trust_bundle(self) -> list[str]:
        return self.ca.trust_bundle()

    def info(self) -> dict[str, Any]:
        return self.ca.info()

    def sign(self, csr_pem: str, namespace: str, service_account: str, node_id: str,
             ttl_seconds: float | None = None) -> dict[str, Any]:
        """``{"cert_chain": [leaf, root], "spiffe_id", "expires"}``; raises ``IdentityError`` when refused."""
        return self.ca.sign(csr_pem, namespace, service_account, node_id, ttl_seconds)

    def import_ca(self, cert_pem: str, key_pem: str) -> dict[str, Any]:
        return self.ca.import_ca(cert_pem, key_pem)

    def rotate_root(self, expected: str | None = None) -> dict[str, Any]:
        return self.ca.rotate_root(expected)


def deploy_citadel(replicas: int = 2, options: dict[str, Any] | None = None, component: str = "citadel",
                   timeout: float = 60.0) -> list[Any]:
    """Start (or find) the Citadel replicas and wait until each has loaded the root."""
    handles = deploy_replicas(Citadel, component, replicas, CitadelOptions.from_dict(options).to_dict())
    ray.get([h.ready.remote() for h in handles], timeout=timeout)
    return handles
