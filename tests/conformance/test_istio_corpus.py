"""Istio's own configuration corpus: what Istio accepts we accept, what it rejects we reject.

The corpus (``conformance/istio`` in the shared folder next to the repository, or
``$RAYMESH_CONFORMANCE_DIR``) holds verbatim files from istio/istio:

* ``samples/bookinfo/networking/*.yaml``: the Bookinfo sample; every file must apply cleanly.
* ``validation/pkg/test/datasets/validation/dataset/{networking,security,telemetry}-*-<Kind>.yaml``: one
  valid object per served version of each kind.
* ``validation/pkg/config/validation/testdata/crds/<kind>-{valid,invalid}.yaml``: documents
  Istio's CRD must accept, and documents it must reject; each rejected one carries ``_err``,
  a substring of the apiserver's message (``spec.hosts: Required value``), which our error
  must contain too. ``_err`` is dropped before validating, as Istio's own tests do.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from mesh.loader import Document, load_documents
from mesh.validation import to_resources, validate_document, validate_documents

CORPUS = Path(os.environ.get("RAYMESH_CONFORMANCE_DIR")
              or Path(__file__).resolve().parents[2].parent / "shared" / "conformance" / "istio")
if not CORPUS.is_dir():
    pytest.fail(f"Istio conformance corpus not found at {CORPUS}; "
                "set RAYMESH_CONFORMANCE_DIR to its location", pytrace=False)

KINDS = ("VirtualService", "DestinationRule", "Gateway", "ServiceEntry", "WorkloadEntry",
         "PeerAuthentication", "RequestAuthentication", "AuthorizationPolicy", "Telemetry")
BOOKINFO = sorted((CORPUS / "samples" / "bookinfo" / "networking").glob("*.yaml"))
DATASET_GROUPS = ("networking", "security", "telemetry")
DATASET = sorted(p for p in (CORPUS / "validation/pkg/test/datasets/validation/dataset").glob("*.yaml")
                 if p.stem.split("-", 1)[0] in DATASET_GROUPS and p.stem.rsplit("-", 1)[1] in KINDS)
CRD_FIXTURES = CORPUS / "validation/pkg/config/validation/testdata/crds"
FIXTURE_KINDS = ("destinationrule", "serviceentry", "workloadentry", "peerauth", "reqauth", "authz",
                 "telemetry")


def fixture_documents(outcome: str) -> list[Document]:
    return [doc for kind in FIXTURE_KINDS for doc in load_documents([str(CRD_FIXTURES / f"{kind}-{outcome}.yaml")])]


VALID = fixture_documents("valid")
INVALID = fixture_documents("invalid")


def doc_id(doc: Document) -> str:
    return f"{Path(doc.source).name}#{doc.index}-{doc.body.get('metadata', {}).get('name')}"


def test_corpus_is_complete() -> None:
    """Guards the globs: an empty or moved corpus must not pass as zero test cases."""
    assert len(BOOKINFO) == 21
    assert len(DATASET) == 23
    assert len(VALID) == 22
    assert len(INVALID) == 54


@pytest.mark.parametrize("path", BOOKINFO, ids=lambda p: p.name)
def test_bookinfo_sample_applies(path: Path) -> None:
    docs = load_documents([str(path)])
    assert docs, "sample holds no objects"
    assert [str(e) for e in validate_documents(docs)] == []
    assert {r.kind for r in to_resources(docs)} <= set(KINDS)


@pytest.mark.parametrize("path", DATASET, ids=lambda p: p.name)
def test_dataset_object_is_accepted(path: Path) -> None:
    (doc,) = load_documents([str(path)])
    assert [str(e) for e in validate_document(doc)] == []


@pytest.mark.parametrize("doc", VALID, ids=doc_id)
def test_valid_fixture_is_accepted(doc: Document) -> None:
    assert "_err" not in doc.body
    assert [str(e) for e in validate_document(doc)] == []


@pytest.mark.parametrize("doc", INVALID, ids=doc_id)
def test_invalid_fixture_is_rejected(doc: Document) -> None:
    body = dict(doc.body)
    expected = body.pop("_err")
    errors = validate_document(Document(doc.source, doc.index, body))
    assert errors, f"accepted, but Istio rejects it with {expected!r}"
    assert all(e.path.split(".")[0].split("[")[0] in ("spec", "metadata") for e in errors)
    assert any(expected in str(e) for e in errors), [str(e) for e in errors]
