"""Which nodes are the ingress gateway, where it binds, and who may hold its identity."""
from __future__ import annotations

import pytest

from actors.citadel import authorize
from actors.pilot import PilotOptions
from actors.proxy_worker import GatewayOptions
from mesh.identity import IdentityError

GATEWAY_SA = ("istio-system", "istio-ingressgateway-service-account")


@pytest.mark.parametrize("nodes,is_head,labels,selected", [
    ("head", True, {}, True), ("head", False, {}, False), ("all", False, {}, True), ("none", True, {}, False),
    ("ingress=yes", False, {"ingress": "yes"}, True), ("ingress=yes", True, {"ingress": "no"}, False),
    ("ingress=yes", True, {}, False)])
def test_nodes_select_gateway_nodes(nodes: str, is_head: bool, labels: dict[str, str], selected: bool) -> None:
    assert GatewayOptions(nodes=nodes).selects(is_head, labels) is selected


def test_defaults_are_the_head_node_on_loopback() -> None:
    assert GatewayOptions.from_dict(None) == GatewayOptions("head", "127.0.0.1")


@pytest.mark.parametrize("options,field", [({"nodes": "some"}, "gateway.nodes"), ({"nodes": "=x"}, "gateway.nodes"),
                                           ({"address": "localhost"}, "gateway.address")])
def test_bad_options_fail_the_install_naming_the_option(options: dict[str, str], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        PilotOptions.from_dict({"gateway": options})


def test_citadel_signs_the_gateway_identity_for_gateway_nodes_only() -> None:
    registry = {"nodes": {"gw": {"node_id": "gw", "ip": "127.0.0.1", "gateway_address": "127.0.0.1"},
                          "plain": {"node_id": "plain", "ip": "127.0.0.1"}}}
    authorize(registry, *GATEWAY_SA, "gw")
    with pytest.raises(IdentityError, match="istio-system/istio-ingressgateway-service-account"):
        authorize(registry, *GATEWAY_SA, "plain")
    with pytest.raises(IdentityError):   # a gateway node gets no other identity for free
        authorize(registry, "istio-system", "default", "gw")
