"""Galley's pure apply/delete planning: created / configured / unchanged, resourceVersion."""
from __future__ import annotations

from actors.galley import plan_apply, plan_delete
from mesh.resources import Resource


def vs(name: str, host: str, ns: str = "default") -> Resource:
    return Resource.from_dict({"apiVersion": "networking.istio.io/v1", "kind": "VirtualService",
                               "metadata": {"name": name, "namespace": ns},
                               "spec": {"hosts": [host], "http": [{"route": [{"destination": {"host": host}}]}]}})


def test_apply_creates_then_is_unchanged_then_configures():
    state: dict = {}
    new, lines = plan_apply(state, [vs("reviews", "reviews")], revision=1)
    assert new is not None and lines == ["virtualservice.networking.istio.io/reviews created"]
    stored = new["resources"]["VirtualService/default/reviews"]
    assert stored["metadata"]["resourceVersion"] == "1" and stored["metadata"]["generation"] == 1

    again, lines = plan_apply(new, [vs("reviews", "reviews")], revision=2)
    assert again is None and lines == ["virtualservice.networking.istio.io/reviews unchanged"]

    changed, lines = plan_apply(new, [vs("reviews", "ratings")], revision=3)
    assert lines == ["virtualservice.networking.istio.io/reviews configured"]
    stored = changed["resources"]["VirtualService/default/reviews"]
    assert stored["metadata"]["resourceVersion"] == "3" and stored["metadata"]["generation"] == 2


def test_namespaces_are_separate_resources():
    new, lines = plan_apply({}, [vs("r", "reviews"), vs("r", "reviews", ns="prod")], revision=1)
    assert set(new["resources"]) == {"VirtualService/default/r", "VirtualService/prod/r"}
    assert lines[1].endswith("created (namespace prod)")


def test_delete_reports_missing_and_changes_nothing_when_absent():
    state, _ = plan_apply({}, [vs("reviews", "reviews")], revision=1)
    new, lines = plan_delete(state, [("VirtualService", "default", "reviews")])
    assert new is not None and new["resources"] == {} and lines == ["virtualservice/reviews deleted"]
    none, lines = plan_delete({"resources": {}}, [("VirtualService", "default", "reviews")])
    assert none is None and "not found" in lines[0]
