"""Galley: validates and stores mesh configuration.

A replica is stateless apart from a cache: the truth is the ``config`` collection in the shared
store (``actors.store``).  ``apply`` validates every document, then commits all of them as one
revision or none; ``resourceVersion`` is the revision at which a resource last changed.
``get`` never answers a Secret's data (``mesh.secrets.redacted``): only the gateway nodes'
proxy workers read it, from the store.  After a
commit the replica notifies the Pilot replicas, which also poll as a safety net.
"""
from __future__ import annotations

import logging
from typing import Any

import ray

from actors.replicaset import find_replicas
from actors.store import GcsKV, RevisionedStore
from mesh.loader import Document
from mesh.resources import Resource, resolve_kind
from mesh.secrets import SECRET_KIND, redacted
from mesh.validation import document_warnings, to_resources, validate_documents

log = logging.getLogger(__name__)

CONFIG_COLLECTION = "config"


def config_store() -> RevisionedStore:
    return RevisionedStore(GcsKV(), CONFIG_COLLECTION)


def resources_of(state: dict[str, Any]) -> list[Resource]:
    return [Resource.from_dict(d) for _, d in sorted((state.get("resources") or {}).items())]


class ApplyOutcome:
    """Builds the kubectl-style lines ("virtualservice/reviews created") of one apply or delete."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def add(self, res: Resource, verb: str) -> None:
        kind = f"{res.kind.lower()}.{res.group}" if res.group else res.kind.lower()
        self.lines.append(f"{kind}/{res.name} {verb}" +
                          (f" (namespace {res.namespace})" if res.namespace != "default" else ""))


def plan_apply(state: dict[str, Any], resources: list[Resource], revision: int) -> tuple[dict[str, Any] | None, list[str]]:
    """Pure: the new state after applying ``resources`` at ``revision``, or None if nothing changes."""
    stored: dict[str, Any] = state.setdefault("resources", {})
    out = ApplyOutcome()
    changed = False
    for res in resources:
        key = str(res.key)
        old = Resource.from_dict(stored[key]) if key in stored else None
        if old is not None and old.same_content(res):
            out.add(res, "unchanged")
            continue
        res.resource_version = revision
        res.generation = old.generation + 1 if old else 1
        stored[key] = res.to_dict()
        out.add(res, "configured" if old else "created")
        changed = True
    return (state if changed else None), out.lines


def plan_delete(state: dict[str, Any], keys: list[tuple[str, str, str]]) -> tuple[dict[str, Any] | None, list[str]]:
    stored: dict[str, Any] = state.setdefault("resources", {})
    lines, changed = [], False
    for kind, namespace, name in keys:
        key = f"{kind}/{namespace}/{name}"
        if stored.pop(key, None) is None:
            lines.append(f'{kind.lower()} "{name}" not found (namespace {namespace})')
        else:
            lines.append(f"{kind.lower()}/{name} deleted")
            changed = True
    return (state if changed else None), lines


@ray.remote
class Galley:
    def __init__(self, replica: int) -> None:
        self.replica = replica
        self.store = config_store()

    def ready(self) -> int:
        return self.replica

    def apply(self, documents: list[dict[str, Any]]) -> dict[str, Any]:
        """Validate and commit ``[{"source", "index", "body", "item"}, ...]`` atomically."""
        docs = [Document(d["source"], int(d["index"]), d["body"], d.get("item")) for d in documents]
        errors = validate_documents(docs)
        if errors:
            return {"ok": False, "errors": [str(e) for e in errors]}
        resources = to_resources(docs)
        lines: list[str] = []

        def mutate(state: dict[str, Any], revision: int) -> dict[str, Any] | None:
            nonlocal lines
            new_state, lines = plan_apply(state, [Resource.from_dict(r.to_dict()) for r in resources], revision)
            return new_state

        rev, changed = self.store.commit(mutate)
        if changed:
            self._notify(rev.number)
        return {"ok": True, "revision": rev.number, "results": lines,
                "warnings": [str(w) for w in document_warnings(docs)]}

    def delete(self, targets: list[dict[str, str]]) -> dict[str, Any]:
        """Delete ``[{"kind", "namespace", "name"}]`` (kinds may be aliases such as ``vs``)."""
        keys, errors = [], []
        for t in targets:
            kind = resolve_kind(t["kind"])
            if kind is None:
                errors.append(f"unknown kind {t['kind']!r}")
            else:
                keys.append((kind, t.get("namespace") or "default", t["name"]))
        if errors:
            return {"ok": False, "errors": errors}
        lines: list[str] = []

        def mutate(state: dict[str, Any], _revision: int) -> dict[str, Any] | None:
            nonlocal lines
            new_state, lines = plan_delete(state, keys)
            return new_state

        rev, changed = self.store.commit(mutate)
        if changed:
            self._notify(rev.number)
        return {"ok": True, "revision": rev.number, "results": lines}

    def get(self, kind: str | None = None, name: str | None = None, namespace: str | None = None) -> dict[str, Any]:
        """Resources filtered by kind/name/namespace (None = all), with their resourceVersion."""
        canonical = resolve_kind(kind) if kind else None
        if kind and canonical is None:
            return {"ok": False, "errors": [f"unknown kind {kind!r}"]}
        rev = self.store.latest()
        items = [d for d in (rev.state.get("resources") or {}).values()
                 if (canonical is None or d["kind"] == canonical)
                 and (name is None or d["metadata"]["name"] == name)
                 and (namespace is None or d["metadata"].get("namespace", "default") == namespace)]
        items = [redacted(d) if d["kind"] == SECRET_KIND else d for d in items]   # key material stays stored
        items.sort(key=lambda d: (d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]))
        return {"ok": True, "revision": rev.number, "items": items}

    def revision(self) -> int:
        return self.store.latest().number

    def _notify(self, revision: int) -> None:
        for pilot in find_replicas("pilot"):
            pilot.notify.remote("config", revision)
