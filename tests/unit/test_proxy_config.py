"""meshctl proxy-config's tables (mesh.proxy_config), from snapshots the compiler makes of
Istio's bookinfo samples on a two-node registry."""
from __future__ import annotations

from typing import Any

from mesh import proxy_config as pc
from tests.unit.test_compiler import (DESTINATION_RULE_ALL, FQDN, NODE_B, REVIEWS_50_V3, REVIEWS_TEST_V2,
                                     compile_checked, load)


def by(rows: list[list[str]], column: int, value: str) -> list[list[str]]:
    return [r for r in rows if r[column] == value]


def test_listeners_routes_clusters_and_endpoints_of_a_node() -> None:
    snap = compile_checked(load(DESTINATION_RULE_ALL, REVIEWS_TEST_V2))
    listeners = pc.rows(snap, "listeners")
    assert [r[2] for r in listeners[:2]] == ["HTTP_PROXY", "INBOUND"]
    assert ["127.10.0.3", "9080", "VIP HTTP", FQDN("reviews")] in listeners

    reviews = by(pc.rows(snap, "routes"), 0, f"{FQDN('reviews')}:9080")
    assert [r[2:] for r in reviews] == [
        ["header end-user exact=jason", "default/reviews/0", f"outbound|9080|v2|{FQDN('reviews')}"],
        ["/*", "default/reviews/1", f"outbound|9080|v1|{FQDN('reviews')}"]]
    assert reviews[0][1].startswith(FQDN("reviews")) and reviews[0][1].endswith("more")

    clusters = by(pc.rows(snap, "clusters"), 0, FQDN("reviews"))
    assert [(r[2], r[5]) for r in clusters] == [("-", "3"), ("v1", "1"), ("v2", "1"), ("v3", "1")]
    assert {r[3] for r in clusters} == {"outbound"} and {r[4] for r in clusters} == {"LEAST_REQUEST"}

    v2 = by(pc.rows(snap, "endpoints"), 3, f"outbound|9080|v2|{FQDN('reviews')}")
    assert v2 == [["127.0.0.1:42001", f"{NODE_B} via 127.0.0.2:15106", "app=reviews,version=v2",
                   f"outbound|9080|v2|{FQDN('reviews')}"]]
    v1 = by(pc.rows(snap, "endpoints"), 3, f"outbound|9080|v1|{FQDN('reviews')}")
    assert [r[1] for r in v1] == ["local"]      # on this node: dialled directly
    assert set(pc.section(snap, "clusters")) == {"clusters"}
    assert set(pc.section(snap, "listeners")) == {"listeners", "vips"}


def test_weights_direct_responses_and_match_conditions() -> None:
    snap = compile_checked(load(DESTINATION_RULE_ALL, REVIEWS_50_V3))
    [split] = by(pc.rows(snap, "routes"), 0, f"{FQDN('reviews')}:9080")
    assert split[4] == f"outbound|9080|v1|{FQDN('reviews')} (50%), outbound|9080|v3|{FQDN('reviews')} (50%)"
    hand: dict[str, Any] = {"virtual_hosts": [{"name": "web:80", "domains": ["web"], "routes": [
        {"name": "teapot", "match": [{"uri": {"prefix": "/tea"}, "method": "POST"}, {"uri": {"regex": "^/c.*"}}],
         "direct_response": {"status": 418, "body": "no"}},
        {"name": "moved", "match": [{"uri": {"exact": "/old"}}], "redirect": {"uri": "/new", "redirect_code": 301}}]}]}
    assert [r[2:] for r in pc.rows(hand, "routes")] == [
        ["/tea* method POST | ~^/c.*", "teapot", "direct response 418"], ["/old", "moved", "redirect 301"]]
    assert pc.rows({}, "listeners") == [] and pc.rows({}, "endpoints") == []
