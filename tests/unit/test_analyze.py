"""Configuration analysis (``mesh.analyze`` and ``meshctl analyze``): each finding Istio's
analyzers would report, found in real configuration and a real service index."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from mesh.analyze import Message, analyze
from mesh.compiler_services import build_service_index, resources_by_kind
from mesh.registry import RegistryState, WorkloadInstance
from mesh.resources import Resource

ROOT = Path(__file__).resolve().parents[2]
BOOKINFO = ROOT / "samples" / "bookinfo" / "networking"
MESHCTL = str(Path(sys.executable).parent / "meshctl")


def resources(text: str) -> list[Resource]:
    return [Resource.from_dict(d) for d in yaml.safe_load_all(text) if d]


# Every version destination-rule-all.yaml names a subset for.
BOOKINFO_VERSIONS = [("productpage", "v1"), ("details", "v1"), ("details", "v2"), ("ratings", "v1"),
                     ("ratings", "v2"), ("ratings", "v2-mysql"), ("ratings", "v2-mysql-vm"),
                     ("reviews", "v1"), ("reviews", "v2"), ("reviews", "v3")]


def bookinfo_registry(versions: list[tuple[str, str]] = BOOKINFO_VERSIONS) -> RegistryState:
    workloads = [WorkloadInstance(service=s, namespace="default", address="127.0.0.1", port=9000 + i,
                                  service_port=9080, node_id="n1", labels={"app": s, "version": v}, uid=f"{s}-{v}")
                 for i, (s, v) in enumerate(versions)]
    return RegistryState(workloads=workloads)


def run(found: list[Resource], registry: RegistryState | None = None) -> list[Message]:
    if registry is None:
        return analyze(found)
    return analyze(found, build_service_index(resources_by_kind(found), registry), registry.workloads)


def codes(messages: list[Message]) -> list[tuple[str, str, str]]:
    return [(m.type.code, m.kind, m.name) for m in messages]


def test_istio_bookinfo_configuration_has_no_findings():
    found = resources((BOOKINFO / "destination-rule-all.yaml").read_text()
                      + "\n---\n" + (BOOKINFO / "virtual-service-reviews-test-v2.yaml").read_text())
    assert run(found, bookinfo_registry()) == []
    # Istio's bookinfo deploys details and ratings v1 only: the other subsets select nothing.
    messages = run(found, bookinfo_registry([v for v in BOOKINFO_VERSIONS if v[0] not in ("details", "ratings")
                                             or v[1] == "v1"]))
    assert [(m.type.code, m.name, m.args) for m in messages] == [
        ("IST0173", "details", ("v2",)), ("IST0173", "ratings", ("v2",)), ("IST0173", "ratings", ("v2-mysql",)),
        ("IST0173", "ratings", ("v2-mysql-vm",))]


def test_unknown_host_and_subset_are_referenced_resources_not_found():
    found = resources((BOOKINFO / "destination-rule-all.yaml").read_text() + """
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route:
    - {destination: {host: reviews, subset: v4}, weight: 50}
    - {destination: {host: reviewz, subset: v1}, weight: 50}
    mirror: {host: ratings, subset: v9}
""")
    messages = run(found, bookinfo_registry())
    assert [str(m) for m in messages] == [
        'Error [IST0101] (VirtualService default/reviews) Referenced host+subset in destinationrule not found: '
        '"reviews+v4"',
        'Error [IST0101] (VirtualService default/reviews) Referenced host not found: "reviewz"',
        'Error [IST0101] (VirtualService default/reviews) Referenced host+subset in destinationrule not found: '
        '"ratings+v9"']
    # Offline nothing says which hosts exist; subsets are still checked against the rules.
    assert [m.args[1] for m in run(found)] == ["reviews+v4", "reviewz+v1", "ratings+v9"]


def test_service_entry_hosts_including_wildcards_are_known():
    found = resources("""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: ext}
spec: {hosts: ["*.example.com"], ports: [{number: 443, name: tls, protocol: TLS}], resolution: NONE}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: ext}
spec:
  hosts: [api.example.com]
  tls: [{match: [{sniHosts: [api.example.com]}], route: [{destination: {host: api.example.com}}]}]
""")
    assert run(found, RegistryState()) == []


def test_gateway_references_and_hosts_it_does_not_serve():
    found = resources((BOOKINFO / "bookinfo-gateway.yaml").read_text() + """
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: narrow, namespace: edge}
spec:
  selector: {istio: ingressgateway}
  servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["default/shop.example.com"]}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: shop}
spec:
  hosts: [shop.example.com, admin.example.com]
  gateways: [edge/narrow, missing-gateway]
  http: [{route: [{destination: {host: productpage}}]}]
""")
    messages = run(found, bookinfo_registry())
    assert [str(m) for m in messages] == [
        "Warning [IST0132] (VirtualService default/shop) one or more host ['admin.example.com'] defined in "
        "VirtualService default/shop not found in Gateway edge/narrow.",
        'Error [IST0101] (VirtualService default/shop) Referenced gateway not found: "missing-gateway"']


def test_gateway_credential_names_without_their_secret():
    found = resources("""
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: secure, namespace: edge}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: ["*/shop.example.com"]
    tls: {mode: SIMPLE, credentialName: shop-cert}
  - port: {number: 8443, name: https-admin, protocol: HTTPS}
    hosts: ["*/admin.example.com"]
    tls: {mode: MUTUAL, credentialName: admin-cert}
  - port: {number: 9443, name: https-api, protocol: HTTPS}
    hosts: ["*/api.example.com"]
    tls: {mode: SIMPLE, credentialName: shop-cert}
---
apiVersion: v1
kind: Secret
metadata: {name: shop-cert, namespace: istio-system}
type: kubernetes.io/tls
stringData: {tls.crt: x, tls.key: y}
---
apiVersion: v1
kind: Secret
metadata: {name: admin-cert, namespace: edge}
type: kubernetes.io/tls
stringData: {tls.crt: x, tls.key: y}
""")
    # admin-cert exists, but not where the ingress gateway reads Secrets (istio-system).
    assert [str(m) for m in run(found)] == [
        'Error [IST0101] (Gateway edge/secure) Referenced credentialName not found: "admin-cert"']


def test_two_mesh_virtual_services_for_one_host_conflict():
    found = resources("""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: a}
spec: {hosts: [ratings], http: [{route: [{destination: {host: ratings}}]}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: b}
spec: {hosts: [ratings.default.svc.cluster.local], http: [{route: [{destination: {host: ratings}}]}]}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: edge}
spec: {hosts: [ratings], gateways: [gw], http: [{route: [{destination: {host: ratings}}]}]}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: gw}
spec: {selector: {istio: ingressgateway}, servers: [{port: {number: 80, name: http, protocol: HTTP}, hosts: ["*"]}]}
""")
    messages = run(found, bookinfo_registry())
    assert codes(messages) == [("IST0109", "VirtualService", "a"), ("IST0109", "VirtualService", "b")]
    assert messages[0].args == ("default/a,default/b", "ratings.default.svc.cluster.local")


def test_unreachable_rules_and_ineffective_matches():
    found = resources("""
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - match: [{headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews}}]
  - match: [{headers: {end-user: {exact: jason}}, name: again}]
    route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /api}}, {headers: {end-user: {exact: jason}}}]
    route: [{destination: {host: reviews}}]
  - route: [{destination: {host: reviews}}]
  - match: [{uri: {prefix: /late}}]
    route: [{destination: {host: reviews}}]
""")
    messages = run(found, bookinfo_registry())
    assert [(m.type.code, m.text) for m in messages] == [
        ("IST0130", "VirtualService rule http[1] not used (duplicate/overlapping match in rule http[0])."),
        ("IST0131", "VirtualService rule http[2] match #1 is not used (duplicate/overlapping match in rule http[0])."),
        ("IST0130", "VirtualService rule http[4] not used (only the last rule can have no matches).")]


def test_destination_rule_findings():
    found = resources("""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews}
spec:
  host: reviews
  subsets:
  - {name: v1, labels: {version: v1}}
  - {name: v7, labels: {version: v7}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: reviews-again}
spec: {host: reviews.default.svc.cluster.local, trafficPolicy: {loadBalancer: {simple: RANDOM}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: external}
spec:
  host: api.example.com
  trafficPolicy:
    tls: {mode: SIMPLE}
    portLevelSettings: [{port: {number: 8443}, tls: {mode: MUTUAL, clientCertificate: /c.pem, privateKey: /k.pem}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: verified}
spec: {host: api2.example.com, trafficPolicy: {tls: {mode: SIMPLE, caCertificates: /ca.pem}}}
""")
    messages = run(found, bookinfo_registry())
    assert [str(m) for m in messages] == [
        "Warning [IST0128] (DestinationRule default/external) DestinationRule external in namespace default has "
        "TLS mode set to SIMPLE but no caCertificates are set to validate server identity for host: api.example.com",
        "Warning [IST0129] (DestinationRule default/external) DestinationRule external in namespace default has "
        "TLS mode set to MUTUAL but no caCertificates are set to validate server identity for host: "
        "api.example.com at port 8443",
        "Warning [IST0173] (DestinationRule default/reviews) The Subset v7 defined in the DestinationRule does not "
        "select any workloads, which may lead to 503 UH (NoHealthyUpstream).",
        "Warning [RM0001] (DestinationRule default/reviews-again) This DestinationRule is not applied to host "
        "reviews.default.svc.cluster.local: default/reviews applies there instead (raymesh applies one "
        "DestinationRule per host, the first in namespace/name order, where Istio would merge them). Merge the "
        "two into one resource."]


def test_selectors_matching_no_workload():
    found = resources("""
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: typo}
spec: {selector: {matchLabels: {app: reveiws}}, action: ALLOW}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: fine}
spec: {selector: {matchLabels: {app: reviews, version: v2}}, action: ALLOW}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: mesh-wide-selector, namespace: istio-system}
spec: {selector: {matchLabels: {app: ratings}}, mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: other-namespace, namespace: prod}
spec: {selector: {matchLabels: {app: ratings}}, mtls: {mode: STRICT}}
""")
    messages = run(found, bookinfo_registry())
    assert [(m.type.code, m.namespace, m.name, m.text) for m in messages] == [
        ("IST0127", "default", "typo", "No matching workloads for this resource with the following labels: app=reveiws"),
        ("IST0127", "prod", "other-namespace",
         "No matching workloads for this resource with the following labels: app=ratings")]
    assert run(found) == []   # offline: no registry to match against


def test_namespace_wide_duplicates():
    found = resources("""
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: a}
spec: {accessLogging: [{disabled: true}]}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: b}
spec: {tracing: [{randomSamplingPercentage: 10}]}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: strict}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: permissive}
spec: {mtls: {mode: PERMISSIVE}}
""")
    assert [str(m) for m in run(found)] == [
        "Warning [RM0002] (PeerAuthentication default/permissive) The PeerAuthentications ['permissive', 'strict'] "
        'in namespace "default" have no workload selector; only permissive is applied.',
        "Warning [RM0002] (PeerAuthentication default/strict) The PeerAuthentications ['permissive', 'strict'] "
        'in namespace "default" have no workload selector; only permissive is applied.',
        "Error [IST0160] (Telemetry default/a) The Telemetries ['a', 'b'] in namespace \"default\" have no workload "
        "selector, which can lead to undefined behavior.",
        "Error [IST0160] (Telemetry default/b) The Telemetries ['a', 'b'] in namespace \"default\" have no workload "
        "selector, which can lead to undefined behavior."]


# -- meshctl analyze --offline: a separate process, no cluster ------------------------------------


def meshctl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([MESHCTL, *args], input=stdin, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "RAY_ADDRESS": "127.0.0.1:1"})  # no cluster reachable


BROKEN_ROUTE = """apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews}
spec:
  hosts: [reviews]
  http:
  - route: [{destination: {host: reviews, subset: v4}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: bad}
spec: {hosts: [bad], http: [{timeout: soon, route: [{destination: {host: bad}}]}]}
"""


def test_cli_offline_reports_with_file_references_and_exit_79(tmp_path: Path):
    f = tmp_path / "routes.yaml"
    f.write_text(BROKEN_ROUTE)
    r = meshctl("analyze", "--offline", "-f", str(f), "-f", str(BOOKINFO / "destination-rule-all.yaml"))
    assert r.returncode == 79, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].startswith(f"Error [IST0106] (VirtualService default/bad {f}:1) Schema validation error: "
                               "spec.http[0].timeout: ")
    assert lines[1] == (f"Error [IST0101] (VirtualService default/reviews {f}:0) Referenced host+subset in "
                        'destinationrule not found: "reviews+v4"')
    assert len(lines) == 2


def test_cli_json_output_thresholds_and_clean_run(tmp_path: Path):
    f = tmp_path / "dr.yaml"
    f.write_text("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: ext}\n"
                 "spec: {host: api.example.com, trafficPolicy: {tls: {mode: SIMPLE}}}\n")
    r = meshctl("analyze", "--offline", "-f", str(f), "-o", "json")
    assert r.returncode == 0, r.stderr            # a warning is below the default failure threshold
    body: list[dict[str, Any]] = json.loads(r.stdout)
    assert [(m["code"], m["level"], m["origin"], m["reference"]) for m in body] == [
        ("IST0128", "Warning", "DestinationRule default/ext", f"{f}:0")]
    assert meshctl("analyze", "--offline", "-f", str(f), "--failure-threshold", "Warning").returncode == 79
    r = meshctl("analyze", "--offline", "-f", str(f), "--output-threshold", "Error")
    assert r.returncode == 0 and r.stdout == "\u2714 No validation issues found when analyzing namespace: default.\n"
    r = meshctl("analyze", "--offline", "-f", str(f), "-n", "prod")
    assert r.stdout == "\u2714 No validation issues found when analyzing namespace: prod.\n"
    r = meshctl("analyze", "--offline", "-f", str(BOOKINFO / "destination-rule-all.yaml"),
                "-f", str(BOOKINFO / "virtual-service-all-v1.yaml"), "-A")
    assert r.returncode == 0 and r.stdout == "\u2714 No validation issues found when analyzing all namespaces.\n"


def test_cli_usage_errors_and_analyzer_list():
    assert meshctl("analyze", "--offline").returncode == 2
    r = meshctl("analyze", "-L")
    assert r.returncode == 0 and r.stdout.split("\n")[0].split() == ["CODE", "LEVEL", "NAME"]
    assert "IST0101   Error     ReferencedResourceNotFound" in r.stdout
