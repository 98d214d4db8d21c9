"""Citadel on a real cluster: replicas share one root through the GCS, sign only for
registered identities, and keep signing and keep their root when replicas die.

The tests run their own replica set under its own names and store collection, so they
neither see nor disturb a Citadel the mesh itself may run."""
from __future__ import annotations

import time
from typing import Any, Iterator

import pytest
import ray

from actors.citadel import deploy_citadel
from actors.store import GcsKV
from mesh.client import NAMESPACE, call_any, find_replicas
from mesh.identity import IdentityError, TrustBundle, make_csr, new_workload_key, spiffe_id

pytestmark = pytest.mark.ray

COMPONENT = "citadel-it"
OPTIONS = {"collection": "ca-it"}


def purge() -> None:
    GcsKV()._kv._internal_kv_del(f"{OPTIONS['collection']}/", del_by_prefix=True, namespace=NAMESPACE)


def kill_all() -> None:
    for handle in find_replicas(COMPONENT):
        ray.kill(handle, no_restart=True)
    deadline = time.monotonic() + 10
    while find_replicas(COMPONENT) and time.monotonic() < deadline:  # names are freed asynchronously
        time.sleep(0.05)


@pytest.fixture
def citadel(mesh_cluster) -> Iterator[list[Any]]:
    purge()
    handles = deploy_citadel(2, OPTIONS, component=COMPONENT)
    try:
        yield handles
    finally:
        kill_all()
        purge()


def roots(handles: list[Any]) -> list[str]:
    return [info["root"] for info in ray.get([h.info.remote() for h in handles], timeout=30)]


def sign(namespace: str, service_account: str, node_id: str) -> dict[str, Any]:
    csr = make_csr(new_workload_key(), spiffe_id(namespace, service_account))
    return call_any(COMPONENT, "sign", csr, namespace, service_account, node_id, timeout=30)


def test_replicas_started_together_agree_on_one_root(citadel):
    assert len(set(roots(citadel))) == 1
    bundles = ray.get([h.trust_bundle.remote() for h in citadel], timeout=30)
    assert bundles[0] == bundles[1] and len(bundles[0]) == 1


def test_signs_for_a_registered_workload_only(citadel, mesh):
    mesh.deploy("echo", "v1", node_index=1)   # registers default/default on node 1
    node = mesh.nodes[1]
    reply = sign("default", "default", node)
    bundle = TrustBundle.from_pems(call_any(COMPONENT, "trust_bundle"))
    assert bundle.verify(reply["cert_chain"]) == "spiffe://cluster.local/ns/default/sa/default"
    assert reply["expires"] > time.time() + 23 * 3600
    for ns, sa, where in [("default", "nobody", node), ("other", "default", node),
                          ("default", "default", "0" * 56)]:
        with pytest.raises(IdentityError, match="no workload with that namespace and service account"):
            sign(ns, sa, where)


def test_signing_survives_a_lost_replica_and_the_root_survives_restarts(citadel, mesh):
    mesh.deploy("echo", "v1", node_index=0)
    node = mesh.nodes[0]
    root = roots(citadel)[0]
    ray.kill(citadel[1], no_restart=True)
    for _ in range(3):
        assert sign("default", "default", node)["cert_chain"][1]
    # Ray restarts a replica killed with restarts allowed; it loads the same root.
    ray.kill(citadel[0], no_restart=False)
    assert roots([citadel[0]]) == [root]
    # Even with every replica gone, the root lives in the GCS and a new replica set finds it.
    kill_all()
    assert roots(deploy_citadel(2, OPTIONS, component=COMPONENT)) == [root, root]


def test_rotation_keeps_the_old_root_trusted_on_every_replica(citadel, mesh):
    mesh.deploy("echo", "v1", node_index=1)
    old_chain = sign("default", "default", mesh.nodes[1])["cert_chain"]
    first = roots(citadel)[0]
    new = ray.get(citadel[0].rotate_root.remote(first), timeout=30)["root"]
    assert ray.get(citadel[1].rotate_root.remote(first), timeout=30)["root"] == new   # a retry rotates nothing
    assert roots(citadel) == [new, new]
    bundle = TrustBundle.from_pems(ray.get(citadel[1].trust_bundle.remote(), timeout=30))
    assert len(bundle.roots) == 2
    assert bundle.verify(old_chain) == bundle.verify(sign("default", "default", mesh.nodes[1])["cert_chain"])
