"""`meshctl validate` works offline, as a separate process, like `istioctl validate`."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MESHCTL = str(Path(sys.executable).parent / "meshctl")


def meshctl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([MESHCTL, *args], input=stdin, capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin", "RAY_ADDRESS": "127.0.0.1:1"})  # no cluster reachable


def test_istio_bookinfo_samples_are_valid():
    r = meshctl("validate", "-f", str(ROOT / "samples" / "bookinfo" / "networking"))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("is valid") >= 21


def test_invalid_document_names_file_document_and_field(tmp_path):
    f = tmp_path / "vs.yaml"
    f.write_text("apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: ok}\n"
                 "spec: {hosts: [ok], http: [{route: [{destination: {host: ok}}]}]}\n---\n"
                 "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: r}\n"
                 "spec: {hosts: [r], http: [{timeout: soon, route: [{destination: {host: r}}]}]}\n")
    r = meshctl("validate", "-f", str(f))
    assert r.returncode == 1
    assert f"{f}: document 1 (VirtualService default/r): spec.http[0].timeout" in r.stderr


def test_stdin_unknown_field_and_unknown_kind():
    r = meshctl("validate", "-f", "-", stdin="apiVersion: networking.istio.io/v1\nkind: DestinationRule\n"
                                              "metadata: {name: d}\nspec: {host: d, subsetz: []}\n")
    assert r.returncode == 1 and "subsetz" in r.stderr and "<stdin>" in r.stderr
    r = meshctl("validate", "-f", "-", stdin="apiVersion: networking.istio.io/v1\nkind: Sidecarz\nmetadata: {name: x}\n")
    assert r.returncode == 1 and "Sidecarz" in r.stderr


def test_broken_yaml_and_missing_file(tmp_path):
    bad = tmp_path / "broken.yaml"
    bad.write_text("kind: VirtualService\nmetadata: {name: x\n")
    r = meshctl("validate", "-f", str(bad))
    assert r.returncode == 1 and "broken.yaml" in r.stderr and "line" in r.stderr
    r = meshctl("validate", "-f", str(tmp_path / "absent.yaml"))
    assert r.returncode == 1 and "absent.yaml" in r.stderr


def test_telemetry_query_parquet_flags_are_checked_before_any_cluster_call(tmp_path):
    out = tmp_path / "q.parquet"
    cases = [(("-o", "parquet"), "give --file PATH"), (("--file", str(out)), "--file is for -o parquet"),
             (("--raw", "-o", "json"), "--raw is for -o parquet")]
    for args, message in cases:
        r = meshctl("telemetry", "query", *args)
        assert (r.returncode, message in r.stderr) == (2, True), (args, r.stderr)
    assert not out.exists()
