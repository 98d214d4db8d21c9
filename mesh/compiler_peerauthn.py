"""PeerAuthentication -> the mutual TLS mode of each workload port, resolved as Istio does.

Istio's precedence (pilot ``ComposePeerAuthentication``), for a workload in namespace ``ns``
with labels ``L`` listening on port ``p``:

1. the mesh-wide policy: in the root namespace, without a selector;
2. the namespace-wide policy: in ``ns``, without a selector;
3. the workload policy: in ``ns``, whose ``selector.matchLabels`` all hold on ``L``
   (a policy with a selector in the root namespace is ignored, as in Istio);
4. that workload policy's ``portLevelMtls[p]``.

Each later level replaces the earlier one unless its mode is ``UNSET`` (or absent), which
inherits; a port-level ``UNSET`` inherits the workload's result.  Where several policies
compete for one level the first in (namespace, name) order wins (Istio takes the oldest;
raymesh keeps no creation time).  With nothing set the mode is ``PERMISSIVE``.

Pilot writes the result onto every endpoint of a Ray workload (``"mtls_mode"``): the
destination's inbound proxy enforces it, and a client's proxy uses mTLS towards the
endpoint unless it is ``DISABLE`` (Istio's auto mTLS).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Mapping

from mesh.compiler_services import labels_match
from mesh.resources import Resource

__all__ = ["MTLS_MODES", "DEFAULT_MTLS_MODE", "PeerAuthnPolicy", "compile_peer_authentications", "mtls_mode"]

MTLS_MODES = ("UNSET", "DISABLE", "PERMISSIVE", "STRICT")
DEFAULT_MTLS_MODE = "PERMISSIVE"


@dataclass(frozen=True, slots=True)
class PeerAuthnPolicy:
    """One PeerAuthentication, reduced to what the precedence needs."""

    name: str
    namespace: str
    selector: tuple[tuple[str, str], ...]      # empty: namespace-wide (or mesh-wide in the root namespace)
    mode: str                                  # one of MTLS_MODES
    port_modes: tuple[tuple[int, str], ...]    # portLevelMtls, by workload (target) port

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "namespace": self.namespace, "selector": dict(self.selector) or None,
                "mode": self.mode, "port_level": {str(p): m for p, m in self.port_modes}}


def _mode(mtls: Mapping[str, Any] | None) -> str:
    mode = str((mtls or {}).get("mode") or "UNSET").upper()
    if mode not in MTLS_MODES:
        raise ValueError(f"PeerAuthentication mtls.mode {mode!r}: want one of {', '.join(MTLS_MODES)}")
    return mode


def compile_peer_authentications(resources: Iterable[Resource]) -> list[PeerAuthnPolicy]:
    """Every PeerAuthentication, in (namespace, name) order: the tie-break of each level."""
    out = []
    for res in sorted((r for r in resources if r.kind == "PeerAuthentication"), key=lambda r: (r.namespace, r.name)):
        spec = res.spec
        labels = (spec.get("selector") or {}).get("matchLabels") or {}
        ports = tuple(sorted((int(p), _mode(m)) for p, m in (spec.get("portLevelMtls") or {}).items()))
        out.append(PeerAuthnPolicy(res.name, res.namespace, tuple(sorted((str(k), str(v)) for k, v in labels.items())),
                                   _mode(spec.get("mtls")), ports))
    return out


def mtls_mode(policies: Iterable[PeerAuthnPolicy], namespace: str, labels: Mapping[str, str], port: int,
              root_namespace: str) -> str:
    """The effective mode (DISABLE, PERMISSIVE or STRICT) for one workload port."""
    mesh = ns_wide = workload = None
    for p in policies:
        if not p.selector:
            if p.namespace == root_namespace:
                mesh = mesh or p
            elif p.namespace == namespace:
                ns_wide = ns_wide or p
        elif p.namespace == namespace and p.namespace != root_namespace and labels_match(dict(p.selector), labels):
            workload = workload or p
    mode = "UNSET"
    for level in (mesh, ns_wide, workload):
        if level is not None and level.mode != "UNSET":
            mode = level.mode
    if workload is not None:
        port_mode = dict(workload.port_modes).get(port, "UNSET")
        if port_mode != "UNSET":
            mode = port_mode
    return DEFAULT_MTLS_MODE if mode == "UNSET" else mode
