"""The proxy worker's half of node-to-node mTLS: SVIDs for the node's workload identities.

For every distinct (namespace, service account) registered on the node, and on a gateway
node for the ingress gateway's identity (its requests' source), the worker
generates a key here, has Citadel sign its CSR (Citadel checks the registration on this
node), and renews it at half of its lifetime (``actors.workload_api.Credentials``, shared
logic with the Workload API).  It pushes the result to its proxy process with the control
channel's ``credentials`` operation, together with the trust bundle (re-read every
``refresh_seconds``, so a root rotation reaches the proxy within that time) and the pids of
the node's workload actors with their registration (service, namespace, labels), from which
the proxy tells which workload opened a connection and names it in telemetry.
The proxy itself never talks to Ray or Citadel; keys leave this node's memory for no one.

On a gateway node the worker also pushes, with the ``gateway_secrets`` operation, the TLS
Secrets its snapshot's ``credentialName`` servers name (and their ``<name>-cacert``), read
from the config store in the gateway's namespace (``gateway_secrets_message``): Pilot
compiles only the names into snapshots, so the key material reaches gateway nodes alone.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from actors.galley import config_store
from actors.registry import registry_state
from actors.workload_api import Credentials, Identity, _alive_actors, _registry
from mesh.compiler_gateways import GATEWAY_NAMESPACE, GATEWAY_SERVICE_ACCOUNT
from mesh.identity import IdentityError
from mesh.secrets import gateway_secrets

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ProxyCredentials:
    """Builds the ``credentials`` message for one node; reads are injected for tests."""

    node_id: str
    credentials: Credentials
    registry: Callable[[], dict[str, Any]] = _registry
    actors: Callable[[], dict[str, Any]] = _alive_actors

    async def message(self) -> tuple[dict[str, Any], float]:
        """The message to push and the seconds until it should be rebuilt (next renewal or refresh)."""
        registry, actors = await asyncio.gather(asyncio.to_thread(self.registry), asyncio.to_thread(self.actors))
        state = registry_state(registry)
        local = [w for w in state.workloads if w.node_id == self.node_id]
        identities = {Identity(w.namespace, w.service_account) for w in local}
        node = state.nodes.get(self.node_id)
        if node is not None and node.gateway_address:
            identities.add(Identity(GATEWAY_NAMESPACE, GATEWAY_SERVICE_ACCOUNT))
        bundle = await self.credentials.bundle()
        svids, by_identity = [], {}
        for ident in sorted(identities):
            try:
                svid = await self.credentials.svid(ident)
            except IdentityError as exc:   # deregistered between our read and Citadel's
                log.info("no SVID for %s/%s: %s", ident.namespace, ident.service_account, exc)
                continue
            svids.append(svid)
            by_identity[ident] = svid.spiffe_id
        pid_of = {a["ActorID"]: int(a["Pid"]) for a in actors.values()
                  if a.get("Pid") and (a.get("Address") or {}).get("NodeID") == self.node_id}
        # An actor that registered several identities is, as a client, its first one (the
        # Workload API's default SVID), and telemetry names it after the first registration
        # with that identity (service and labels: source_workload, source_app, ...).
        pids: dict[int, tuple[str, dict[str, Any]]] = {}
        for w in sorted(local, key=lambda w: (w.service, w.uid)):
            sid = by_identity.get(Identity(w.namespace, w.service_account))
            if w.actor_id in pid_of and sid is not None:
                pid = pid_of[w.actor_id]
                if pid not in pids or sid < pids[pid][0]:
                    pids[pid] = (sid, {"service": w.service, "namespace": w.namespace, "labels": dict(w.labels)})
        message = {"op": "credentials", "trust_domain": bundle.trust_domain, "roots": list(bundle.roots_pem),
                   "svids": [{"spiffe_id": s.spiffe_id, "cert_chain": list(s.chain_pem), "key": s.key_pem,
                              "expires": s.expires} for s in svids],
                   "workloads": [[pid, sid, reg] for pid, (sid, reg) in sorted(pids.items())]}
        now = self.credentials.clock()
        wait = min([self.credentials.refresh_seconds] + [s.renew_at - now for s in svids])
        return message, max(0.05, wait)


def new_proxy_credentials(node_id: str, ttl_seconds: float | None, refresh_seconds: float) -> ProxyCredentials:
    return ProxyCredentials(node_id, Credentials(node_id, ttl_seconds, refresh_seconds, clock=time.time))


def credential_names(snapshot: dict[str, Any] | None) -> set[str]:
    """The Secrets the gateway servers of a snapshot name (``credential_name``)."""
    listeners = ((snapshot or {}).get("gateway") or {}).get("listeners") or ()
    return {str(srv["tls"]["credential_name"]) for listener in listeners for srv in listener.get("servers") or ()
            if (srv.get("tls") or {}).get("credential_name")}


def _stored_resources() -> list[dict[str, Any]]:
    return list((config_store().latest().state.get("resources") or {}).values())


async def gateway_secrets_message(snapshot: dict[str, Any] | None,
                                  resources: Callable[[], list[dict[str, Any]]] = _stored_resources
                                  ) -> dict[str, Any]:
    """The ``gateway_secrets`` message for a snapshot: the material of the Secrets its gateway
    servers name, in the gateway's namespace (empty when it names none, which clears them)."""
    names = credential_names(snapshot)
    stored = await asyncio.to_thread(resources) if names else []
    return {"op": "gateway_secrets", "secrets": gateway_secrets(stored, GATEWAY_NAMESPACE, names)}
