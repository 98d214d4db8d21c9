"""TLS Secrets for the ingress gateway's ``credentialName`` servers.

The Secret's model (``mesh.secrets``: validation, storage shape, redaction), the supervisor's
half (which Secrets a snapshot needs, read from stored documents), and the proxy's half: the
material pushed over the real control socket (``gateway_secrets``), a real HTTPS gateway port
reached with curl (``--cacert --resolve``, HTTP/1.1 and h2), rotation, a missing Secret, and
MUTUAL with the CA in the Secret or in Istio's ``<name>-cacert`` Secret."""
from __future__ import annotations

import asyncio
import base64
import tempfile
from pathlib import Path
from typing import Any

import pytest

from actors.galley import plan_apply
from actors.proxy_credentials import credential_names, gateway_secrets_message
from mesh.cli import run
from mesh.loader import Document
from mesh.resources import Resource
from mesh.secrets import REDACTED, describe, redacted, secret_document
from mesh.validation import document_warnings, validate_document, validate_documents
from proxy_core.control import ControlServer, acall
from tests.unit.conftest import closed_port
from tests.unit.test_gateway_tls import PRODUCTPAGE, dns_names, gateway_snapshot, handshake, resolve, to
from tests.unit.test_proxy_server import curl
from tests.unit.test_tls_origination import Pki

pytestmark = pytest.mark.timeout(60)

NS = "istio-system"


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def pem(path: str) -> bytes:
    return Path(path).read_bytes()


def secret(pki: Pki, name: str = "shop-credential", host: str = "shop.example.com", ca: bool = False,
           namespace: str = NS) -> dict[str, Any]:
    cert = pki.issue(name, host, [host])
    return secret_document(name, namespace, pem(cert[0]), pem(cert[1]), pem(pki.ca) if ca else None)


def check(body: dict[str, Any]) -> list[tuple[str, str]]:
    return [(e.path, e.reason) for e in validate_document(Document("s.yaml", 1, body))]


# -- the Secret kind --------------------------------------------------------------------------

def test_kubectl_tls_and_opaque_secrets_validate_and_store_as_the_apiserver_does(pki) -> None:
    body = secret(pki, ca=True)
    assert check(body) == [] and document_warnings([Document("s.yaml", 0, body)]) == []
    # Opaque with stringData (plain PEM), as `kubectl create secret generic --from-file` users write it.
    plain = {k: base64.b64decode(v).decode() for k, v in body["data"].items()}
    opaque = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "x", "namespace": NS},
              "type": "Opaque", "stringData": plain}
    assert check(opaque) == []
    stored = Resource.from_dict(opaque).to_dict()
    assert (stored["type"], stored["data"]) == ("Opaque", body["data"]) and "stringData" not in stored
    assert Resource.from_dict(stored).to_dict() == stored
    # The apply line is kubectl's: the core group has no suffix.
    state, lines = plan_apply({}, [Resource.from_dict(body)], 3)
    assert lines == ["secret/shop-credential created (namespace istio-system)"] and state is not None
    # A CA alone is a valid Secret (Istio's <name>-cacert).
    ca_only = secret_document("shop-credential-cacert", NS, b"", b"", pem(pki.ca))
    ca_only["data"] = {"ca.crt": ca_only["data"]["ca.crt"]}
    assert check({**ca_only, "type": "Opaque"}) == []
    assert check(ca_only)[0][0] == "data[tls.crt]"    # kubernetes.io/tls needs both, as the apiserver says


def test_bad_secrets_name_the_field(pki) -> None:
    good = secret(pki)
    other_key = pem(pki.issue("other", "other", [])[1])
    mismatched = {**good, "data": {**good["data"], "tls.key": base64.b64encode(other_key).decode()}}
    assert check(mismatched) == [("data[tls.key]", "the private key does not match the certificate in data[tls.crt]")]
    assert check({**good, "data": {"tls.crt": "%%%", "tls.key": good["data"]["tls.key"]}}) == [
        ("data[tls.crt]", "illegal base64 data")]
    [(path, reason)] = check({**good, "data": {**good["data"], "tls.crt": base64.b64encode(b"nope").decode()}})
    assert path == "data[tls.crt]" and reason.startswith("not PEM certificates")
    assert check({**good, "data": {"tls.crt": good["data"]["tls.crt"]}}) == [
        ("data[tls.key]", "Required value: a kubernetes.io/tls secret with a certificate needs tls.crt and tls.key")]
    assert check({**good, "type": "kubernetes.io/dockerconfigjson"})[0][0] == "type"
    assert check({**good, "data": {**good["data"], "password": "eA=="}}) == [
        ("data[password]", "unknown key: a mesh Secret holds tls.crt, tls.key, ca.crt")]
    assert check({**good, "spec": {}}) == [("spec", "unknown field")]
    assert check({**good, "apiVersion": "v2"})[0][0] == "apiVersion"
    [error] = validate_documents([Document("certs.yaml", 2, mismatched)])
    assert str(error).startswith("certs.yaml: document 2 (Secret istio-system/shop-credential): data[tls.key]: ")
    # Valid, but where the gateway never looks: a warning naming the field.
    [warning] = document_warnings([Document("s.yaml", 0, secret(pki, namespace="default"))])
    assert warning.path == "metadata.namespace" and "istio-system" in warning.reason


def test_redaction_keeps_key_material_out_and_describes_the_certificate(pki) -> None:
    stored = Resource.from_dict(secret(pki, ca=True)).to_dict()
    shown = redacted(stored)
    assert shown["data"] == {"ca.crt": REDACTED, "tls.crt": REDACTED, "tls.key": REDACTED}
    text = repr(shown)
    assert all(value not in text for value in stored["data"].values()) and "PRIVATE KEY" not in text
    assert shown["status"]["keys"] == ["ca.crt", "tls.crt", "tls.key"]
    assert shown["status"]["certificate"]["subject"] == "CN=shop.example.com"
    assert shown["status"]["certificate"]["notAfter"].endswith("Z")
    assert describe(Resource.from_dict(stored).spec)["type"] == "kubernetes.io/tls"


def test_meshctl_create_secret_tls_validates_files_offline(pki, capsys) -> None:
    cert = pki.issue("shop", "shop.example.com", ["shop.example.com"])
    wrong = pki.issue("wrong", "wrong", [])[1]
    # A key that does not match fails before any cluster is contacted (exit 1, the field named).
    assert run(["create", "secret", "tls", "shop", "--cert", cert[0], "--key", wrong]) == 1
    err = capsys.readouterr().err
    assert "secret tls shop: document 0 (Secret istio-system/shop): data[tls.key]: the private key does not" in err
    assert run(["create", "secret", "tls", "shop", "--cert", cert[0] + ".missing", "--key", cert[1]]) == 1
    assert "--cert" in capsys.readouterr().err


# -- the supervisor's half --------------------------------------------------------------------

def test_the_supervisor_reads_only_the_named_secrets_of_the_gateway_namespace(pki) -> None:
    snap = gateway_snapshot([credential_server(8443, "shop-credential", mode="MUTUAL")], {})
    assert credential_names(snap) == {"shop-credential"}
    docs = [Resource.from_dict(secret(pki)).to_dict(),
            Resource.from_dict(secret(pki, name="shop-credential-cacert")).to_dict(),
            Resource.from_dict(secret(pki, name="unrelated")).to_dict(),
            Resource.from_dict(secret(pki, namespace="default")).to_dict()]
    message = asyncio.run(gateway_secrets_message(snap, lambda: docs))
    assert message["op"] == "gateway_secrets"
    assert sorted(message["secrets"]) == ["shop-credential", "shop-credential-cacert"]
    assert message["secrets"]["shop-credential"]["tls.key"].startswith("-----BEGIN PRIVATE KEY-----")
    # A snapshot naming no Secret (any node that is not a gateway) reads nothing and clears them.
    assert asyncio.run(gateway_secrets_message({"version": "x"}, lambda: 1 / 0)) == {
        "op": "gateway_secrets", "secrets": {}}


# -- the proxy's half, through the control socket ----------------------------------------------

def credential_server(port: int, name: str, mode: str = "SIMPLE", hosts: tuple[str, ...] = ("shop.example.com",)
                      ) -> dict[str, Any]:
    return {"port": {"number": port, "name": "https", "protocol": "HTTPS"}, "hosts": list(hosts),
            "tls": {"mode": mode, "credentialName": name}}


def material(pki: Pki, cn: str, host: str = "shop.example.com", ca: bool = False) -> dict[str, str]:
    cert = pki.issue(cn, cn, [host])
    out = {"tls.crt": Path(cert[0]).read_text(), "tls.key": Path(cert[1]).read_text()}
    return out | ({"ca.crt": Path(pki.ca).read_text()} if ca else {})


async def push(control: str, secrets: dict[str, dict[str, str]]) -> dict[str, Any]:
    reply = await acall(control, {"op": "gateway_secrets", "secrets": secrets})
    assert reply["ok"], reply
    return reply


async def control_for(p: Any, tmp_path: Path) -> tuple[ControlServer, str]:
    path = str(tmp_path / "control.sock")
    server = ControlServer(p, path, on_shutdown=lambda: None)
    await server.start()
    return server, path


async def test_credential_name_is_served_rotated_and_closed_when_the_secret_goes(env, pki, tmp_path,
                                                                                 monkeypatch) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    up = await env.upstream(name="productpage")
    port = closed_port()
    p = await env.proxy(gateway_snapshot([credential_server(port, "shop-credential")], {PRODUCTPAGE: up.port},
                                         to("productpage", "shop.example.com")))
    control, path = await control_for(p, tmp_path)
    try:
        # No Secret yet: that port stays closed with the reason; the proxy runs on.
        [error] = p.stats()["gateway_errors"].values()
        assert "credentialName shop-credential: no Secret shop-credential in the gateway's namespace" in error
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        # The Secret arrives (no new snapshot): the port binds and serves HTTP/1.1 and h2.
        reply = await push(path, {"shop-credential": material(pki, "first")})
        assert reply["gateways"] == {f"istio-ingressgateway:{port}": f"127.0.0.1:{port}"}
        assert p.stats()["gateway_errors"] == {} and p.stats()["gateway_secrets"] == ["shop-credential"]
        url = f"https://shop.example.com:{port}/productpage"
        for flag in ("--http1.1", "--http2"):
            status, _, body, err = await curl("--cacert", pki.ca, *resolve("shop.example.com", port), flag, url)
            assert (status, body) == (200, b"productpage"), err
        cert, _ = await asyncio.to_thread(handshake, port, "shop.example.com", pki.ca)
        assert dict(x[0] for x in cert["subject"])["commonName"] == "first"
        # The key material was written to a private directory only while loading.
        assert list((tmp_path / "tmp").iterdir()) == []
        # Rotation: new handshakes get the new certificate on the same socket.
        await push(path, {"shop-credential": material(pki, "second")})
        cert, _ = await asyncio.to_thread(handshake, port, "shop.example.com", pki.ca)
        assert dict(x[0] for x in cert["subject"])["commonName"] == "second"
        assert dns_names(cert) == ["shop.example.com"]
        status, _, _, err = await curl("--cacert", pki.ca, *resolve("shop.example.com", port), url)
        assert status == 200, err
        # A Secret that does not fit, then none at all: closed again, with the reason.
        bad = material(pki, "third") | {"tls.key": material(pki, "fourth")["tls.key"]}
        await push(path, {"shop-credential": bad})
        [error] = p.stats()["gateway_errors"].values()
        assert "credentialName shop-credential: tls.crt / tls.key: not a certificate and its matching key" in error
        await push(path, {})
        assert "no Secret shop-credential" in next(iter(p.stats()["gateway_errors"].values()))
        with pytest.raises(OSError):
            await asyncio.open_connection("127.0.0.1", port)
        assert len(up.seen) == 3
        # A malformed push is refused without touching the proxy.
        assert (await acall(path, {"op": "gateway_secrets", "secrets": {"x": 1}}))["ok"] is False
    finally:
        await control.close()


@pytest.mark.parametrize("ca_in", ["secret", "cacert-secret"])
async def test_mutual_with_the_ca_from_the_secret_or_its_cacert_secret(env, pki, tmp_path, ca_in) -> None:
    up = await env.upstream(name="productpage")
    port = closed_port()
    p = await env.proxy(gateway_snapshot([credential_server(port, "shop-credential", mode="MUTUAL")],
                                         {PRODUCTPAGE: up.port}, to("productpage", "shop.example.com")))
    control, path = await control_for(p, tmp_path)
    try:
        # MUTUAL without any CA: refused with the two places it may come from.
        await push(path, {"shop-credential": material(pki, "server")})
        [error] = p.stats()["gateway_errors"].values()
        assert "MUTUAL needs the client CA: ca.crt in Secret shop-credential or in Secret shop-credential-cacert" \
            in error
        if ca_in == "secret":
            secrets = {"shop-credential": material(pki, "server", ca=True)}
        else:
            secrets = {"shop-credential": material(pki, "server"),
                       "shop-credential-cacert": {"ca.crt": Path(pki.ca).read_text()}}
        await push(path, secrets)
        assert p.stats()["gateway_errors"] == {}
        client = pki.issue("client", "shopper", [], uris=("spiffe://client.example/ns/outside/sa/shopper",))
        url = f"https://shop.example.com:{port}/productpage"
        args = ("--cacert", pki.ca, *resolve("shop.example.com", port))
        status, _, body, err = await curl(*args, "--cert", client[0], "--key", client[1], url)
        assert (status, body) == (200, b"productpage"), err
        status, _, _, err = await curl(*args, url)   # no client certificate: the handshake is refused
        assert status == 0 and err, err
        assert len(up.seen) == 1
    finally:
        await control.close()
