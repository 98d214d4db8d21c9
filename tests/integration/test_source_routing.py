"""VirtualService ``sourceLabels`` end to end: two caller workloads on one Ray node, told apart by
the node proxy through the kernel (the socket's owning process) and the registry's labels the
proxy worker pushes, reach different versions of a service on the other node.

The callers send through their node's HTTP proxy port rather than the service VIP: both test
nodes share this machine's loopback, so a VIP connection may be accepted by the other node's
proxy, which (as on a real second host) knows none of node 0's workloads."""
from __future__ import annotations

import json
import time
from collections import Counter

import pytest
import ray

from tests.integration.test_traffic import dest, dr_subsets, vs

pytestmark = pytest.mark.ray


def versions_seen(caller, proxy_port: int, n: int) -> Counter:
    """The echo versions answering ``n`` requests that ``caller`` sends through its node's proxy."""
    seen: Counter = Counter()
    for i in range(n):
        status, body = ray.get(caller.fetch.remote(proxy_port, f"http://echo:8000/src/{i}"), timeout=30)
        seen[json.loads(body)["version"] if status == 200 else status] += 1
    return seen


def test_source_labels_route_each_caller_to_its_version(mesh):
    mesh.deploy("echo", "v1", node_index=1)
    mesh.deploy("echo", "v2", node_index=1)
    caller_v1 = mesh.deploy("sleep", "v1", node_index=0)   # labels app=sleep, version=v1
    caller_v2 = mesh.deploy("sleep", "v2", node_index=0)
    mesh.wait_endpoints("echo", 2)
    mesh.wait_endpoints("sleep", 2)
    mesh.apply(dr_subsets(), vs([
        {"match": [{"sourceLabels": {"app": "sleep", "version": "v2"}}], "route": [dest("v2")]},
        {"match": [{"sourceNamespace": "elsewhere"}], "route": [dest("v2")]},
        {"route": [dest("v1")]}]))
    port = mesh.proxy_port(0)
    # The proxy worker pushes the callers' pids with their labels after they register: until
    # then caller v2 is an unidentified client and falls through to v1.
    deadline = time.monotonic() + 30
    while versions_seen(caller_v2, port, 1) != Counter({"v2": 1}):
        assert time.monotonic() < deadline, "caller v2 never routed by its labels"
        time.sleep(0.2)
    assert versions_seen(caller_v2, port, 10) == Counter({"v2": 10})
    assert versions_seen(caller_v1, port, 10) == Counter({"v1": 10})   # version=v1, namespace default
    driver: Counter = Counter()
    for _ in range(5):                                                 # the driver is no workload
        status, _, body = mesh.get("http://echo:8000/driver", node_index=0)
        driver[json.loads(body)["version"] if status == 200 else status] += 1
    assert driver == Counter({"v1": 5})
