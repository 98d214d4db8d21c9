"""AuthorizationPolicy and RequestAuthentication applied through Galley, enforced on traffic
that crosses from one node's proxy to a workload on the other node."""
from __future__ import annotations

import base64
import json
import time

import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

ISSUER = "https://issuer.raymesh.test"


def _token(key: rsa.RSAPrivateKey, **claims: object) -> str:
    now = int(time.time())
    return jwt.encode({"iss": ISSUER, "sub": "alice", "exp": now + 600, "iat": now, **claims}, key,
                      algorithm="RS256", headers={"kid": "k1"})


def _policy(kind: str, name: str, spec: dict) -> dict:
    return {"apiVersion": "security.istio.io/v1", "kind": kind, "metadata": {"name": name, "namespace": "default"},
            "spec": {"selector": {"matchLabels": {"app": "echo"}}, **spec}}


def test_policies_applied_through_galley_give_403_401_200_across_nodes(mesh):
    mesh.deploy("echo", "v1", node_index=1)
    mesh.wait_endpoints("echo", 1)
    assert mesh.get("http://echo:8000/open")[0] == 200

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    jwk = {**jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": "k1", "alg": "RS256"}
    mesh.apply(
        _policy("RequestAuthentication", "echo-jwt", {"jwtRules": [{
            "issuer": ISSUER, "jwks": json.dumps({"keys": [jwk]}), "outputPayloadToHeader": "x-jwt-payload"}]}),
        _policy("AuthorizationPolicy", "echo-deny-admin", {"action": "DENY",
                                                          "rules": [{"to": [{"operation": {"paths": ["/admin*"]}}]}]}),
        _policy("AuthorizationPolicy", "echo-require-jwt", {"action": "ALLOW", "rules": [
            {"from": [{"source": {"requestPrincipals": [f"{ISSUER}/*"]}}]}]}),
    )
    good = {"authorization": f"Bearer {_token(key, groups=['dev'])}"}

    status, headers, body = mesh.get("http://echo:8000/hello")                   # no token
    assert (status, body) == (403, b"RBAC: access denied")

    status, headers, body = mesh.get("http://echo:8000/hello", headers={"authorization": "Bearer x.y.z"})
    assert status == 401 and headers["www-authenticate"].startswith('Bearer realm="http://echo:8000/hello"')

    expired = {"authorization": f"Bearer {_token(key, exp=int(time.time()) - 300)}"}
    status, _, body = mesh.get("http://echo:8000/hello", headers=expired)
    assert (status, body) == (401, b"Jwt is expired")

    status, answer = mesh.get_json("http://echo:8000/hello", headers=good)
    assert status == 200 and answer["node"] == mesh.nodes[1]                     # crossed to the other node
    seen = {k.lower(): v for k, v in answer["headers"].items()}
    assert "authorization" not in seen
    assert json.loads(base64.urlsafe_b64decode(seen["x-jwt-payload"] + "=="))["groups"] == ["dev"]

    status, _, body = mesh.get("http://echo:8000/admin/users", headers=good)
    assert (status, body) == (403, b"RBAC: access denied")
    # The workload's own node proxy enforces the same policies.
    assert mesh.get("http://echo:8000/hello", node_index=1, headers=good)[0] == 200
    assert mesh.get("http://echo:8000/hello", node_index=1)[0] == 403
