"""Workload identity: SPIFFE ids, the root CA, SVIDs (checked with the openssl CLI as an
independent verifier), trust bundles across root rotation, and Citadel's store logic."""
from __future__ import annotations

import subprocess
import threading
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID

from actors.citadel import CertificateAuthority, CitadelOptions
from actors.store import MemoryKV, RevisionedStore
from mesh.identity import (DEFAULT_SVID_TTL, CAKeyPair, IdentityError, SpiffeId, TrustBundle, create_root_ca,
                           import_ca, key_pem, load_cert, make_csr, new_workload_key, rotation_due, sign_csr,
                           spiffe_id)

T0 = datetime(2030, 1, 1, 12, 0, tzinfo=timezone.utc)
ECHO = spiffe_id("default", "echo")


def openssl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=30)


def write(tmp: Path, name: str, text: str) -> str:
    path = tmp / name
    path.write_text(text)
    return str(path)


def x509_text(tmp: Path, pem: str) -> str:
    out = openssl("x509", "-noout", "-text", "-in", write(tmp, "show.pem", pem))
    assert out.returncode == 0, out.stderr
    return out.stdout


def issue(ca: CAKeyPair, ident: str = ECHO, key_type: str = "EC", **kw) -> str:
    return sign_csr(ca, make_csr(new_workload_key(key_type), ident), ident, **kw)


# -- SPIFFE ids ------------------------------------------------------------------------------

def test_spiffe_id_form_and_parse_round_trip():
    sid = spiffe_id("bookinfo", "reviews")
    assert sid == "spiffe://cluster.local/ns/bookinfo/sa/reviews"
    assert SpiffeId.parse(sid) == SpiffeId("cluster.local", "bookinfo", "reviews")
    assert spiffe_id("a", "b", "example.org") == "spiffe://example.org/ns/a/sa/b"


@pytest.mark.parametrize("bad", [
    "https://cluster.local/ns/a/sa/b",
    "spiffe://Cluster.Local/ns/a/sa/b",
    "spiffe://cluster.local/ns/a",
    "spiffe://cluster.local/ns/a/sa/b/extra",
    "spiffe://cluster.local/sa/b/ns/a",
    "spiffe://cluster.local/ns/../sa/b",
    "spiffe://cluster.local/ns/a b/sa/b",
    "spiffe:///ns/a/sa/b",
])
def test_malformed_spiffe_ids_are_refused(bad):
    with pytest.raises(IdentityError):
        SpiffeId.parse(bad)


# -- the root CA -----------------------------------------------------------------------------

@pytest.mark.parametrize("key_type,algo", [("EC", "id-ecPublicKey"), ("RSA", "rsaEncryption")])
def test_root_ca_profile(tmp_path, key_type, algo):
    ca = create_root_ca("example.org", key_type, now=T0)
    text = x509_text(tmp_path, ca.cert_pem)
    assert algo in text
    assert "Subject: O = raymesh, CN = raymesh root CA example.org" in text
    assert "X509v3 Basic Constraints: critical\n                CA:TRUE" in text
    assert "X509v3 Key Usage: critical\n                Certificate Sign, CRL Sign" in text
    ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    aki = ca.cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ski.digest
    assert ca.cert.not_valid_after_utc - ca.cert.not_valid_before_utc == timedelta(days=3650)
    # openssl accepts it as a trust anchor for itself.
    path = write(tmp_path, "root.pem", ca.cert_pem)
    assert openssl("verify", "-attime", str(int(T0.timestamp())), "-CAfile", path, path).returncode == 0


def test_ca_key_pair_serializes_for_the_store_only():
    ca = create_root_ca(now=T0)
    assert "PRIVATE KEY" not in repr(ca)
    again = CAKeyPair.from_dict(ca.to_dict())
    assert again.fingerprint == ca.fingerprint
    assert key_pem(again.key) == ca.to_dict()["key_pem"]


def test_import_ca_checks_key_and_ca_flag():
    a, b = create_root_ca(now=T0), create_root_ca(now=T0)
    assert import_ca(a.cert_pem, key_pem(a.key)).fingerprint == a.fingerprint
    with pytest.raises(IdentityError, match="does not match"):
        import_ca(a.cert_pem, key_pem(b.key))
    leaf_key = new_workload_key()
    leaf = sign_csr(a, make_csr(leaf_key, ECHO), ECHO, now=T0)
    with pytest.raises(IdentityError, match="not a CA"):
        import_ca(leaf, key_pem(leaf_key))


# -- SVIDs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("key_type", ["EC", "RSA"])
def test_svid_profile_verified_by_openssl(tmp_path, key_type):
    ca = create_root_ca(key_type=key_type)
    leaf = issue(ca, key_type=key_type)
    bundle = write(tmp_path, "bundle.pem", TrustBundle((ca.cert,)).pem())
    leaf_path = write(tmp_path, "leaf.pem", leaf)
    for purpose in ("sslclient", "sslserver"):
        out = openssl("verify", "-purpose", purpose, "-CAfile", bundle, leaf_path)
        assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout + out.stderr
    text = x509_text(tmp_path, leaf)
    assert f"X509v3 Subject Alternative Name: critical\n                URI:{ECHO}\n" in text
    assert "X509v3 Basic Constraints: critical\n                CA:FALSE" in text
    usage = "Digital Signature, Key Encipherment" if key_type == "RSA" else "Digital Signature\n"
    assert f"X509v3 Key Usage: critical\n                {usage}" in text
    assert "TLS Web Server Authentication, TLS Web Client Authentication" in text
    cert = load_cert(leaf)
    assert cert.not_valid_after_utc - cert.not_valid_before_utc == DEFAULT_SVID_TTL + timedelta(minutes=1)
    aki = cert.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier == ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    assert 0 < cert.serial_number < 2**128
    assert TrustBundle((ca.cert,)).verify([leaf]) == ECHO


def test_svid_ttl_and_clock_skew():
    ca = create_root_ca(now=T0)
    cert = load_cert(issue(ca, ttl=timedelta(hours=1), now=T0))
    assert cert.not_valid_before_utc == T0 - timedelta(minutes=1)
    assert cert.not_valid_after_utc == T0 + timedelta(hours=1)


def test_svid_never_outlives_its_root():
    ca = create_root_ca(validity=timedelta(hours=2), now=T0)
    cert = load_cert(issue(ca, ttl=timedelta(hours=24), now=T0))
    assert cert.not_valid_after_utc == ca.cert.not_valid_after_utc


def test_csr_subject_and_other_sans_are_ignored():
    key = new_workload_key()
    csr = (x509.CertificateSigningRequestBuilder()
           .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "admin")]))
           .add_extension(x509.SubjectAlternativeName([x509.DNSName("evil.example"), x509.UniformResourceIdentifier(ECHO)]),
                          critical=False)
           .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
    cert = load_cert(sign_csr(create_root_ca(), csr, ECHO))
    assert cert.subject == x509.Name([])
    assert cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value == \
        x509.SubjectAlternativeName([x509.UniformResourceIdentifier(ECHO)])


def test_csr_asking_for_another_identity_is_refused():
    key = new_workload_key()
    with pytest.raises(IdentityError, match="CSR asks for"):
        sign_csr(create_root_ca(), make_csr(key, spiffe_id("default", "admin")), ECHO)


def test_csr_with_a_broken_signature_is_refused():
    der = bytearray(x509.load_pem_x509_csr(make_csr(new_workload_key(), ECHO).encode())
                    .public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01  # the last byte of the ECDSA signature's s: still well-formed DER
    forged = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()
    with pytest.raises(IdentityError, match="signature does not verify"):
        sign_csr(create_root_ca(), forged, ECHO)


def test_nonpositive_ttl_is_refused():
    with pytest.raises(IdentityError, match="positive"):
        issue(create_root_ca(), ttl=timedelta(0))


# -- verification and trust bundles ----------------------------------------------------------

def test_verify_refuses_expired_and_not_yet_valid_certificates():
    ca = create_root_ca(now=T0)
    leaf = issue(ca, ttl=timedelta(hours=1), now=T0)
    bundle = TrustBundle((ca.cert,))
    assert bundle.verify([leaf], now=T0 + timedelta(minutes=59)) == ECHO
    with pytest.raises(IdentityError, match="does not verify"):
        bundle.verify([leaf], now=T0 + timedelta(hours=1, seconds=1))
    with pytest.raises(IdentityError, match="does not verify"):
        bundle.verify([leaf], now=T0 - timedelta(minutes=2))


def test_verify_refuses_other_roots_and_trust_domains():
    ours, theirs = create_root_ca(now=T0), create_root_ca(now=T0)
    with pytest.raises(IdentityError, match="does not verify"):
        TrustBundle((ours.cert,)).verify([issue(theirs, now=T0)], now=T0)
    foreign = spiffe_id("default", "echo", "example.org")
    with pytest.raises(IdentityError, match="trust domain"):
        TrustBundle((ours.cert,)).verify([issue(ours, foreign, now=T0)], now=T0)


def test_verify_refuses_a_ca_certificate_as_svid():
    root = create_root_ca(now=T0)
    with pytest.raises(IdentityError):
        TrustBundle((root.cert,)).verify([root.cert_pem], now=T0)


def test_root_rotation_keeps_old_certificates_valid(tmp_path):
    old, new = create_root_ca(now=T0), create_root_ca(now=T0)
    old_leaf, new_leaf = issue(old, now=T0), issue(new, now=T0)
    overlap = TrustBundle.from_pems([new.cert_pem, old.cert_pem])
    assert overlap.verify([old_leaf], now=T0) == ECHO
    assert overlap.verify([new_leaf], now=T0) == ECHO
    # The concatenated PEM is what openssl and TLS contexts read.
    assert len(TrustBundle.from_pems([overlap.pem()]).roots) == 2
    bundle = write(tmp_path, "bundle.pem", overlap.pem())
    for leaf in (old_leaf, new_leaf):
        out = openssl("verify", "-attime", str(int(T0.timestamp())), "-CAfile", bundle, write(tmp_path, "l.pem", leaf))
        assert out.returncode == 0, out.stdout + out.stderr
    with pytest.raises(IdentityError):
        TrustBundle((new.cert,)).verify([old_leaf], now=T0)


def test_rotation_due_at_half_life():
    leaf = issue(create_root_ca(now=T0), ttl=timedelta(hours=24) - timedelta(minutes=1), now=T0 + timedelta(minutes=1))
    # Valid from T0 for 24h: half-life at T0 + 12h.
    assert not rotation_due(leaf, T0 + timedelta(hours=11, minutes=59))
    assert rotation_due(leaf, T0 + timedelta(hours=12))


# -- Citadel's logic over an in-memory store --------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def registry_with(*workloads: tuple[str, str, str]) -> RevisionedStore:
    store = RevisionedStore(MemoryKV(), "registry")
    store.commit(lambda s, _n: {"workloads": {f"w{i}": {
        "service": "echo", "namespace": ns, "address": "127.0.0.1", "port": 1, "service_port": 1,
        "node_id": node, "service_account": sa} for i, (ns, sa, node) in enumerate(workloads)}})
    return store


def authority(kv: MemoryKV, registry: RevisionedStore | None = None, clock: Clock | None = None,
              **options) -> CertificateAuthority:
    ca = CertificateAuthority(RevisionedStore(kv, "ca"), registry or registry_with(),
                              CitadelOptions.from_dict(options), clock or Clock())
    ca.ensure_root()
    return ca


def test_replicas_racing_on_first_start_end_with_one_root():
    kv = MemoryKV()
    roots: list[str] = []
    barrier = threading.Barrier(6)

    def start() -> None:
        barrier.wait()
        roots.append(authority(kv).info()["root"])

    threads = [threading.Thread(target=start) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert len(roots) == 6 and len(set(roots)) == 1
    assert RevisionedStore(kv, "ca").latest().number == 1


def test_sign_is_authorized_by_the_registry():
    clock = Clock()
    ca = authority(MemoryKV(), registry_with(("default", "echo", "node-a")), clock)
    key = new_workload_key()
    reply = ca.sign(make_csr(key, ECHO), "default", "echo", "node-a")
    leaf, root = reply["cert_chain"]
    assert reply["spiffe_id"] == ECHO and root == ca.trust_bundle()[0]
    assert reply["expires"] == (T0 + DEFAULT_SVID_TTL).timestamp()
    assert TrustBundle.from_pems(ca.trust_bundle()).verify([leaf], now=T0) == ECHO
    for ns, sa, node in [("default", "echo", "node-b"), ("default", "admin", "node-a"), ("other", "echo", "node-a")]:
        with pytest.raises(IdentityError, match="no workload with that namespace and service account"):
            ca.sign(make_csr(key, spiffe_id(ns, sa)), ns, sa, node)
    with pytest.raises(IdentityError, match="max allowed TTL"):
        ca.sign(make_csr(key, ECHO), "default", "echo", "node-a", ttl_seconds=91 * 86400)


def test_import_is_idempotent_and_keeps_the_previous_root_trusted_for_the_max_ttl():
    clock = Clock()
    kv = MemoryKV()
    ca = authority(kv, registry_with(("default", "echo", "n")), clock, max_ttl_seconds=3600)
    first = ca.info()["root"]
    old_leaf = ca.sign(make_csr(new_workload_key(), ECHO), "default", "echo", "n", ttl_seconds=3600)["cert_chain"][0]
    mine = create_root_ca(now=T0)
    assert ca.import_ca(mine.cert_pem, key_pem(mine.key))["root"] == mine.fingerprint
    revision = RevisionedStore(kv, "ca").latest().number
    ca.import_ca(mine.cert_pem, key_pem(mine.key))
    assert RevisionedStore(kv, "ca").latest().number == revision  # nothing written the second time
    # Another replica sees the same bundle: the new root first, the old one still trusted.
    other = authority(kv, clock=clock, max_ttl_seconds=3600)
    bundle = other.trust_bundle()
    assert [load_cert(p) for p in bundle] == [mine.cert, load_cert(ca.trust_bundle()[1])]
    assert TrustBundle.from_pems(bundle).verify([old_leaf], now=T0) == ECHO
    clock.now = T0 + timedelta(hours=1, seconds=1)
    assert other.trust_bundle() == [mine.cert_pem]
    assert first not in [r["root"] for r in other.info()["retired"]]


def test_rotate_root_with_expected_fingerprint_rotates_once():
    ca = authority(MemoryKV())
    first = ca.info()["root"]
    second = ca.rotate_root(expected=first)["root"]
    assert second != first
    assert ca.rotate_root(expected=first)["root"] == second   # a retried call changes nothing
    assert [r["root"] for r in ca.info()["retired"]] == [first]
    third = ca.rotate_root()["root"]
    assert [r["root"] for r in ca.info()["retired"]] == [first, second] and third not in (first, second)
