"""Envoy response flags: the short codes that explain why a request ended as it did.

They appear in access logs (``%RESPONSE_FLAGS%``) and as the ``response_flags`` label of
the Istio-standard metrics, so the spelling must match Envoy's exactly.  A request may
carry several (``UT,URX``); ``join`` renders them the way Envoy does, ``-`` for none.
"""
from __future__ import annotations

from typing import Final, Iterable

NR: Final = "NR"    # no route configuration for the request
UH: Final = "UH"    # no healthy upstream host in the cluster
UF: Final = "UF"    # upstream connection failure
UO: Final = "UO"    # upstream overflow (circuit breaking)
UT: Final = "UT"    # upstream request timeout
URX: Final = "URX"  # retry limit (or per-try budget) exceeded
UC: Final = "UC"    # upstream connection termination
UR: Final = "UR"    # upstream remote reset
DC: Final = "DC"    # downstream connection termination
FI: Final = "FI"    # request aborted by fault injection
DI: Final = "DI"    # request delayed by fault injection
RL: Final = "RL"    # rate limited (local or global)
RLSE: Final = "RLSE"  # no global rate limit answer could be had (Mixer unreachable), failure mode deny
LR: Final = "LR"    # connection local reset
DPE: Final = "DPE"  # downstream protocol error
UPE: Final = "UPE"  # upstream protocol error
NC: Final = "NC"    # no cluster found for the route's destination
RBAC: Final = "RBAC"  # denied by AuthorizationPolicy (Envoy's rbac filter)
RFCF: Final = "RFCF"  # response served from the cache filter (proxy_core.cache)

NONE: Final = "-"


def join(flags: Iterable[str]) -> str:
    """Render flags as Envoy's access log does: comma separated, ``-`` when there are none."""
    return ",".join(flags) or NONE
