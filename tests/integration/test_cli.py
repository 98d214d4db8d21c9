"""meshctl against a running cluster, as a user runs it: a separate process, and as a Ray job."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = ROOT / "samples" / "bookinfo" / "networking"
MESHCTL = str(Path(sys.executable).parent / "meshctl")


def meshctl(mesh, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, RAY_ADDRESS=mesh.cluster.address)
    return subprocess.run([MESHCTL, *args], input=stdin, capture_output=True, text=True, env=env, timeout=120)


def test_apply_get_delete_round_trip(mesh, tmp_path):
    r = meshctl(mesh, "apply", "-f", str(SAMPLES / "destination-rule-all.yaml"),
                "-f", str(SAMPLES / "virtual-service-all-v1.yaml"))
    assert r.returncode == 0, r.stderr
    assert "virtualservice.networking.istio.io/reviews created" in r.stdout
    assert "destinationrule.networking.istio.io/ratings created" in r.stdout

    again = meshctl(mesh, "apply", "-f", str(SAMPLES / "virtual-service-all-v1.yaml"))
    assert "virtualservice.networking.istio.io/reviews unchanged" in again.stdout

    r = meshctl(mesh, "get", "vs", "-o", "yaml")
    docs = list(yaml.safe_load_all(r.stdout))
    assert {d["metadata"]["name"] for d in docs} == {"productpage", "reviews", "ratings", "details"}
    assert all(int(d["metadata"]["resourceVersion"]) > 0 for d in docs)

    r = meshctl(mesh, "get", "destinationrule", "reviews", "-o", "json")
    body = json.loads(r.stdout)
    assert [s["name"] for s in body["spec"]["subsets"]] == ["v1", "v2", "v3"]

    table = meshctl(mesh, "get", "dr").stdout.splitlines()
    assert table[0].split() == ["NAMESPACE", "NAME", "KIND", "RESOURCEVERSION", "HOSTS"] and len(table) == 5

    r = meshctl(mesh, "delete", "-f", str(SAMPLES / "virtual-service-all-v1.yaml"))
    assert r.returncode == 0 and "virtualservice/reviews deleted" in r.stdout
    assert meshctl(mesh, "get", "vs").stdout.strip().count("\n") == 0


def test_invalid_apply_is_atomic_and_names_the_field(mesh, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: good}\n"
        "spec: {hosts: [good], http: [{route: [{destination: {host: good}}]}]}\n"
        "---\n"
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: bad}\n"
        "spec: {hosts: [bad], http: [{route: [{destination: {host: bad}, weight: 250}]}]}\n")
    r = meshctl(mesh, "apply", "-f", str(bad))
    assert r.returncode == 1
    assert "bad.yaml" in r.stderr and "document 1" in r.stderr and "weight" in r.stderr
    assert "good" not in meshctl(mesh, "get", "vs").stdout


def test_apply_from_stdin_and_unknown_kind(mesh):
    doc = ("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: piped}\n"
           "spec: {hosts: [piped], http: [{route: [{destination: {host: piped}}]}]}\n")
    r = meshctl(mesh, "apply", "-f", "-", stdin=doc)
    assert r.returncode == 0 and "piped created" in r.stdout
    r = meshctl(mesh, "apply", "-f", "-", stdin="apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n")
    assert r.returncode == 1 and "Pod" in r.stderr


def test_proxy_status_reports_every_node_synced(mesh):
    r = meshctl(mesh, "proxy-status", "-o", "json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert {row["node"] for row in rows} >= set(mesh.nodes)
    assert all(row["status"] == "SYNCED" for row in rows)


def test_apply_as_a_ray_job(mesh):
    env = dict(os.environ, RAY_ADDRESS=mesh.cluster.dashboard_url)
    r = subprocess.run(["ray", "job", "submit", "--", MESHCTL, "apply", "-f", str(SAMPLES / "virtual-service-reviews-v3.yaml")],
                       capture_output=True, text=True, env=dict(env, PATH=f"{Path(sys.executable).parent}:{env['PATH']}"),
                       timeout=180)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "virtualservice.networking.istio.io/reviews created" in r.stdout
    items = mesh.client.get("vs", "reviews", "default")["items"]
    assert items and items[0]["spec"]["http"][0]["route"][0]["destination"]["subset"] == "v3"


def test_ca_import_bundle_and_info(mesh, tmp_path):
    from mesh.identity import cert_pem, create_root_ca, fingerprint, key_pem

    before = meshctl(mesh, "ca", "info")
    assert before.returncode == 0, before.stderr
    old_root = before.stdout.splitlines()[1].split()[1]
    mine = create_root_ca("cluster.local")
    (tmp_path / "ca.pem").write_text(mine.cert_pem)
    (tmp_path / "ca-key.pem").write_text(key_pem(mine.key))
    r = meshctl(mesh, "ca", "import", "--cert", str(tmp_path / "ca.pem"), "--key", str(tmp_path / "ca-key.pem"))
    assert r.returncode == 0, r.stderr
    assert fingerprint(mine.cert) in r.stdout
    info = meshctl(mesh, "ca", "info").stdout
    assert fingerprint(mine.cert) in info and old_root in info and "trusted (retired)" in info
    bundle = meshctl(mesh, "ca", "bundle").stdout
    assert cert_pem(mine.cert) in bundle and bundle.count("BEGIN CERTIFICATE") == 2
    (tmp_path / "bad.pem").write_text("not a certificate")
    r = meshctl(mesh, "ca", "import", "--cert", str(tmp_path / "bad.pem"), "--key", str(tmp_path / "ca-key.pem"))
    assert r.returncode == 1 and "error" in r.stderr


def test_analyze_live_configuration_with_files_applied_over_it(mesh, tmp_path):
    mesh.deploy("inventory", "v1", 0)
    mesh.wait_endpoints("inventory", 1)
    stored_rule = {"apiVersion": "networking.istio.io/v1", "kind": "DestinationRule",
                   "metadata": {"name": "inventory"},
                   "spec": {"host": "inventory", "subsets": [{"name": "v1", "labels": {"version": "v1"}},
                                                            {"name": "v2", "labels": {"version": "v2"}}]}}
    mesh.apply(stored_rule)
    # The registry knows inventory and its v1 workload only: v2 selects nothing.
    r = meshctl(mesh, "analyze", "-o", "json")
    assert r.returncode == 0, r.stderr   # warnings only
    assert [(m["code"], m["origin"]) for m in json.loads(r.stdout)] == [
        ("IST0173", "DestinationRule default/inventory")]

    # Files are analysed as if applied over the stored configuration; nothing is applied.
    extra = tmp_path / "routes.yaml"
    extra.write_text(yaml.safe_dump_all([
        {"apiVersion": "networking.istio.io/v1", "kind": "VirtualService", "metadata": {"name": "inventory"},
         "spec": {"hosts": ["inventory"], "http": [{"route": [
             {"destination": {"host": "inventory", "subset": "v1"}, "weight": 90},
             {"destination": {"host": "invetnory"}, "weight": 10}]}]}},
        {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": {"name": "inv"},
         "spec": {"selector": {"matchLabels": {"app": "inventory", "version": "v3"}}, "action": "ALLOW"}},
        {**stored_rule, "spec": {"host": "inventory", "subsets": [{"name": "v1", "labels": {"version": "v1"}}]}},
    ]))
    r = meshctl(mesh, "analyze", "-f", str(extra))
    assert r.returncode == 79, r.stderr
    assert r.stdout.splitlines() == [
        f"Warning [IST0127] (AuthorizationPolicy default/inv {extra}:1) No matching workloads for this resource "
        "with the following labels: app=inventory,version=v3",
        f'Error [IST0101] (VirtualService default/inventory {extra}:0) Referenced host not found: "invetnory"']
    assert meshctl(mesh, "get", "vs").stdout.strip().count("\n") == 0   # still nothing stored


def test_proxy_config_shows_what_each_proxy_runs(mesh):
    from mesh.loader import load_documents

    mesh.deploy("reviews", "v1", node_index=1)
    mesh.deploy("reviews", "v2", node_index=1)
    mesh.wait_endpoints("reviews", 2)
    mesh.apply(*[d.body for d in load_documents([str(SAMPLES / "destination-rule-all.yaml"),
                                                 str(SAMPLES / "virtual-service-reviews-test-v2.yaml")])])
    here, there = mesh.nodes[0], mesh.nodes[1]
    proxy = f"proxy-{here[:16]}"
    v2 = "|v2|reviews.default.svc.cluster.local"

    r = meshctl(mesh, "proxy-config", "routes", proxy)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines[0].split() == ["NAME", "DOMAINS", "MATCH", "ROUTE", "DESTINATION"]
    jason = [ln for ln in lines if "end-user exact=jason" in ln]
    assert len(jason) == 1 and v2 in jason[0] and "default/reviews/0" in jason[0], r.stdout

    # By node id prefix, as JSON: the acknowledged snapshot's clusters, endpoints on the other node via its tunnel.
    r = meshctl(mesh, "proxy-config", "endpoints", here[:12], "-o", "json")
    assert r.returncode == 0, r.stderr
    body = json.loads(r.stdout)
    assert body["proxy"] == proxy and body["node"] == here and body["version"]
    [cluster] = [c for name, c in body["clusters"].items() if name.endswith(v2)]
    [ep] = cluster["endpoints"]
    assert ep["node"] == there and ep["via"]["port"] > 0 and ep["labels"]["version"] == "v2"

    r = meshctl(mesh, "proxy-config", "all", proxy, "-o", "yaml")
    doc = yaml.safe_load(r.stdout)
    assert {"listeners", "vips", "virtual_hosts", "clusters"} <= set(doc) and doc["node"] == here

    table = meshctl(mesh, "proxy-config", "all", proxy).stdout
    assert "LISTENERS (" in table and "HTTP_PROXY" in table and "INBOUND" in table and "ENDPOINTS (" in table

    r = meshctl(mesh, "proxy-config", "clusters", "proxy-nope")
    assert r.returncode == 1 and "no proxy matches 'proxy-nope'" in r.stderr and proxy in r.stderr
