"""The proxy worker's credentials push, with Citadel's logic in-process (no Ray): one SVID per
identity registered on the node, renewal at half-life, pids of the node's workload actors."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone
from typing import Any

from actors.proxy_credentials import ProxyCredentials
from actors.workload_api import Credentials
from mesh.identity import create_root_ca, load_cert, sign_csr
from proxy_core.mtls import Credentials as ProxyMaterial
from proxy_core.server import ProxyServer
from proxy_core.snapshot import Snapshot


class FakeCitadel:
    def __init__(self) -> None:
        self.ca = create_root_ca()
        self.signed: list[str] = []
        self.now = 1_000_000.0

    async def __call__(self, method: str, *args: Any) -> Any:
        if method == "info":
            return {"trust_domain": "cluster.local"}
        if method == "trust_bundle":
            return [self.ca.cert_pem]
        csr, ns, sa, _node, _ttl = args
        sid = f"spiffe://cluster.local/ns/{ns}/sa/{sa}"
        self.signed.append(sid)
        leaf = sign_csr(self.ca, csr, sid, timedelta(hours=1), datetime.fromtimestamp(self.now, timezone.utc))
        return {"cert_chain": [leaf, self.ca.cert_pem], "spiffe_id": sid,
                "expires": load_cert(leaf).not_valid_after_utc.timestamp()}


def wl(uid: str, ns: str, sa: str, node: str, actor: str, service: str = "s") -> dict[str, Any]:
    return {"service": service, "namespace": ns, "address": "127.0.0.1", "port": 1, "service_port": 80,
            "node_id": node, "service_account": sa, "actor_id": actor, "uid": uid,
            "labels": {"app": service, "version": "v1"}}


async def test_message_has_one_svid_per_local_identity_and_renews_at_half_life() -> None:
    citadel = FakeCitadel()
    registry = {"workloads": {"a": wl("a", "default", "sleep", "n1", "A1", "sleep"),
                              "b": wl("b", "foo", "httpbin", "n1", "A2", "httpbin"),
                              "c": wl("c", "default", "sleep", "n1", "A3"), "d": wl("d", "bar", "x", "n2", "A4")}}
    actors = {"A1": {"ActorID": "A1", "Pid": 101, "Address": {"NodeID": "n1"}},
              "A2": {"ActorID": "A2", "Pid": 102, "Address": {"NodeID": "n1"}},
              "A4": {"ActorID": "A4", "Pid": 104, "Address": {"NodeID": "n2"}}}
    creds = ProxyCredentials("n1", Credentials("n1", None, 30.0, call=citadel, clock=lambda: citadel.now),
                             registry=lambda: registry, actors=lambda: actors)
    message, wait = await creds.message()
    ids = [s["spiffe_id"] for s in message["svids"]]
    assert ids == ["spiffe://cluster.local/ns/default/sa/sleep", "spiffe://cluster.local/ns/foo/sa/httpbin"]
    assert message["workloads"] == [                                  # A3 has no live actor, A4 another node
        [101, ids[0], {"service": "sleep", "namespace": "default", "labels": {"app": "sleep", "version": "v1"}}],
        [102, ids[1], {"service": "httpbin", "namespace": "foo", "labels": {"app": "httpbin", "version": "v1"}}]]
    assert message["roots"] == [citadel.ca.cert_pem] and wait == 30.0
    again, _ = await creds.message()
    assert again == message and len(citadel.signed) == 2              # nothing due: no new signing
    citadel.now += 31 * 60                                            # past half of the hour
    renewed, _ = await creds.message()
    assert len(citadel.signed) == 4 and renewed["svids"] != message["svids"]
    proxy = ProxyServer(Snapshot.from_dict({"version": "v"}))
    proxy.mtls.update(ProxyMaterial.from_dict(renewed))                # the proxy accepts it as pushed
    sleep = proxy.mtls.sources.pids[101]
    assert (sleep.spiffe_id, sleep.principal, sleep.workload, sleep.namespace, sleep.app, sleep.version) == (
        ids[0], "cluster.local/ns/default/sa/sleep", "sleep-v1", "default", "sleep", "v1")
    assert proxy.mtls.stats()["identities"] == ids


async def test_gateway_node_also_gets_the_ingress_gateway_identity() -> None:
    citadel = FakeCitadel()
    registry = {"workloads": {"a": wl("a", "default", "sleep", "n1", "A1")},
                "nodes": {"n1": {"node_id": "n1", "ip": "127.0.0.1", "gateway_address": "127.0.0.1"},
                          "n2": {"node_id": "n2", "ip": "127.0.0.1"}}}
    gateway_id = "spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"
    for node, expected in (("n1", ["spiffe://cluster.local/ns/default/sa/sleep", gateway_id]), ("n2", [])):
        creds = ProxyCredentials(node, Credentials(node, None, 30.0, call=citadel, clock=lambda: citadel.now),
                                 registry=lambda: registry, actors=lambda: {})
        message, _ = await creds.message()
        assert [s["spiffe_id"] for s in message["svids"]] == expected
        assert message["workloads"] == []       # the gateway is no process: its listeners name it
