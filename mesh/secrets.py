"""TLS secrets the mesh stores for the ingress gateway (Kubernetes ``v1`` ``Secret`` documents).

Istio's gateways take their certificates from a Kubernetes Secret named by a server's
``tls.credentialName``, looked up in the gateway workload's namespace (``istio-system``), and
users create it with ``kubectl create secret tls NAME --cert --key``.  raymesh has no
apiserver, so Galley stores the same documents with the rest of the configuration, in Ray's
GCS key-value store (where Citadel keeps the CA key: the same trust level).  This module is
the Secret's whole model, with no Ray inside:

* **Shape**: ``type: kubernetes.io/tls`` (``tls.crt`` and ``tls.key`` required) or ``Opaque``,
  holding only the keys the gateway reads: ``tls.crt``, ``tls.key``, ``ca.crt`` (MUTUAL's
  client CA; Istio also reads ``ca.crt`` from a separate ``<name>-cacert`` Secret).  ``data``
  values are base64, ``stringData`` values plain text merged over them, as the apiserver does.
* **Checks** beyond the apiserver's (so a bad certificate fails at ``meshctl apply``, not as an
  unbound port later): the PEM parses, and the key matches the certificate's public key.
* **Redaction**: what Galley's ``get`` answers carries no key material (``redacted``), only a
  summary of the certificate (``describe``): ``meshctl get secret -o yaml`` prints ``REDACTED``
  values where kubectl would print them.

Pilot compiles only a Secret's name into snapshots; the gateway node's supervisor reads the
material (``gateway_secrets``) and pushes it to its proxy alone.
"""
from __future__ import annotations

import base64
import binascii
from typing import Any, Mapping

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from proxy_core.snapshot import CACERT_SUFFIX
from proxy_core.snapshot import SECRET_CA as CA
from proxy_core.snapshot import SECRET_CERT as CERT
from proxy_core.snapshot import SECRET_KEY as KEY

SECRET_KIND = "Secret"
SECRET_API_VERSION = "v1"
TLS_TYPE = "kubernetes.io/tls"
OPAQUE_TYPE = "Opaque"
SECRET_TYPES = (TLS_TYPE, OPAQUE_TYPE)
SECRET_KEYS = (CERT, KEY, CA)
REDACTED = "REDACTED"
SECRET_FIELDS = frozenset({"apiVersion", "kind", "metadata", "type", "data", "stringData", "immutable"})

_Issues = list[tuple[str, str]]  # (field path, reason)

__all__ = ["secret_issues", "secret_spec", "secret_document", "decoded", "describe", "redacted", "gateway_secrets",
           "SECRET_KIND", "SECRET_API_VERSION", "TLS_TYPE", "OPAQUE_TYPE", "CERT", "KEY", "CA", "CACERT_SUFFIX",
           "REDACTED", "SECRET_FIELDS"]


def secret_issues(body: Mapping[str, Any]) -> _Issues:
    """Every problem of a Secret document's type and data (its envelope and metadata are the
    caller's); each names the field: ``data[tls.crt]``, ``stringData[tls.key]``."""
    out: _Issues = []
    if body.get("apiVersion") != SECRET_API_VERSION:
        out.append(("apiVersion", f"Unsupported value: {body.get('apiVersion')!r}: supported values: \"v1\""))
    kind = body.get("type", OPAQUE_TYPE)
    if kind not in SECRET_TYPES:
        out.append(("type", f"Unsupported value: {kind!r}: the mesh stores the gateway's TLS secrets only: "
                            f"{', '.join(SECRET_TYPES)}"))
    pems: dict[str, tuple[str, bytes]] = {}   # key -> (field path it came from, decoded bytes)
    for field in ("data", "stringData"):
        values = body.get(field)
        if values is None:
            continue
        if not isinstance(values, dict):
            out.append((field, f"must be a map of strings to strings, got {type(values).__name__}"))
            continue
        for key, value in values.items():
            path = f"{field}[{key}]"
            if key not in SECRET_KEYS:
                out.append((path, f"unknown key: a mesh Secret holds {', '.join(SECRET_KEYS)}"))
            elif not isinstance(value, str):
                out.append((path, f"must be a string, got {type(value).__name__}"))
            elif field == "stringData":
                pems[key] = (path, value.encode())
            else:
                try:
                    pems[key] = (path, base64.b64decode(value, validate=True))
                except (binascii.Error, ValueError):
                    out.append((path, "illegal base64 data"))
    if not out:
        _check_material(kind, pems, out)
    return out


def _check_material(kind: str, pems: Mapping[str, tuple[str, bytes]], out: _Issues) -> None:
    data_path = "stringData" if all(p.startswith("stringData") for p, _ in pems.values()) and pems else "data"
    if kind == TLS_TYPE or CERT in pems or KEY in pems:
        for key in (CERT, KEY):
            if key not in pems:
                out.append((f"{data_path}[{key}]", f"Required value: a {kind} secret with a certificate needs "
                                                   f"{CERT} and {KEY}"))
    if not pems:
        out.append(("data", f"Required value: {CERT} and {KEY} (and/or {CA})"))
    certificate = None
    if CERT in pems:
        path, raw = pems[CERT]
        certificate = _certificates(raw, path, out)
    if CA in pems:
        _certificates(pems[CA][1], pems[CA][0], out)
    if KEY in pems:
        path, raw = pems[KEY]
        try:
            key = serialization.load_pem_private_key(raw, password=None)
        except (ValueError, TypeError) as exc:
            out.append((path, f"not a PEM private key without a passphrase ({exc})"))
            return
        if certificate and _spki(certificate[0].public_key()) != _spki(key.public_key()):
            out.append((path, f"the private key does not match the certificate in {pems[CERT][0]}"))


def _spki(public_key: Any) -> bytes:
    return public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _certificates(raw: bytes, path: str, out: _Issues) -> list[x509.Certificate] | None:
    try:
        return x509.load_pem_x509_certificates(raw)
    except ValueError as exc:
        out.append((path, f"not PEM certificates ({exc})"))
        return None


def secret_spec(body: Mapping[str, Any]) -> dict[str, Any]:
    """What is stored of a valid Secret document: its type and base64 ``data``, ``stringData``
    merged over it (encoded), as the apiserver stores it."""
    data = {str(k): str(v) for k, v in (body.get("data") or {}).items()}
    for key, value in (body.get("stringData") or {}).items():
        data[str(key)] = base64.b64encode(str(value).encode()).decode()
    return {"type": str(body.get("type") or OPAQUE_TYPE), "data": dict(sorted(data.items()))}


def secret_document(name: str, namespace: str, cert_pem: bytes, key_pem: bytes,
                    ca_pem: bytes | None = None) -> dict[str, Any]:
    """The document ``kubectl create secret tls NAME --cert --key`` makes (``ca.crt`` added when given)."""
    data = {CERT: cert_pem, KEY: key_pem} | ({CA: ca_pem} if ca_pem else {})
    return {"apiVersion": SECRET_API_VERSION, "kind": SECRET_KIND, "metadata": {"name": name, "namespace": namespace},
            "type": TLS_TYPE, "data": {k: base64.b64encode(v).decode() for k, v in data.items()}}


def decoded(spec: Mapping[str, Any]) -> dict[str, str]:
    """A stored Secret's data as PEM text, by key."""
    return {key: base64.b64decode(value).decode("utf-8", "replace") for key, value in (spec.get("data") or {}).items()}


def describe(spec: Mapping[str, Any]) -> dict[str, Any]:
    """What may be shown of a stored Secret: its type, keys, and its certificate's subject,
    issuer and expiry (from ``tls.crt``, else ``ca.crt``); never a value."""
    out: dict[str, Any] = {"type": spec.get("type", OPAQUE_TYPE), "keys": sorted(spec.get("data") or {})}
    pems = decoded(spec)
    for key in (CERT, CA):
        if key in pems:
            try:
                cert = x509.load_pem_x509_certificates(pems[key].encode())[0]
            except ValueError:
                continue
            out["certificate"] = {"from": key, "subject": cert.subject.rfc4514_string(),
                                  "issuer": cert.issuer.rfc4514_string(),
                                  "notAfter": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")}
            break
    return out


def redacted(item: Mapping[str, Any]) -> dict[str, Any]:
    """A stored Secret document as ``get`` shows it: every data value replaced by ``REDACTED``,
    and a ``status`` with ``describe``'s summary."""
    data = item.get("data") or {}
    summary = describe({"type": item.get("type"), "data": data})
    return {**{k: v for k, v in item.items() if k != "data"}, "data": {k: REDACTED for k in data},
            "status": {k: v for k, v in summary.items() if k != "type"}}


def gateway_secrets(resources: Any, namespace: str, names: set[str]) -> dict[str, dict[str, str]]:
    """name -> PEM text by key, for the Secrets of ``namespace`` that ``names`` (credentialNames)
    reach: each name and its ``<name>-cacert``.  ``resources`` are stored documents."""
    wanted = names | {n + CACERT_SUFFIX for n in names}
    out: dict[str, dict[str, str]] = {}
    for doc in resources:
        meta = doc.get("metadata") or {}
        if doc.get("kind") == SECRET_KIND and meta.get("namespace") == namespace and meta.get("name") in wanted:
            out[str(meta["name"])] = decoded(doc)
    return out
