"""Workload identity: SPIFFE ids, the mesh's root CA, X.509-SVID issuing and verification.

Pure (no Ray): Citadel (``actors.citadel``) keeps a ``CAKeyPair`` in the shared store and
calls ``sign_csr``; proxies call ``new_workload_key`` and ``make_csr`` on their node, so a
workload's private key never leaves it, and check peers with ``TrustBundle.verify``.

Certificates follow the SPIFFE X509-SVID specification, the profile Istio issues:

* the root: self-signed, ``CA:TRUE`` (critical), key usage keyCertSign + cRLSign (critical),
  subject ``O=raymesh, CN=raymesh root CA <trust domain>``;
* a leaf (SVID): exactly one URI SAN, ``spiffe://<trust domain>/ns/<namespace>/sa/<service
  account>``, critical because the subject is empty (RFC 5280 4.2.1.6), ``CA:FALSE``, key usage
  digitalSignature (+ keyEncipherment for RSA keys), extended key usage serverAuth +
  clientAuth, valid from one minute ago (clock skew) for its TTL, never past the root.

Clocks are injected (``now=``) so tests do not sleep.  The CA private key is only ever
serialized by ``CAKeyPair.to_dict``, for the store; nothing here logs it.
"""
from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Iterable, Literal, Sequence, Union

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from proxy_core.mtls import svid_facts

DEFAULT_TRUST_DOMAIN = "cluster.local"
DEFAULT_SVID_TTL = timedelta(hours=24)          # Istio's DEFAULT_WORKLOAD_CERT_TTL
MAX_SVID_TTL = timedelta(days=90)               # Istio's MAX_WORKLOAD_CERT_TTL
DEFAULT_ROOT_VALIDITY = timedelta(days=3650)    # Istio's self-signed root: 10 years
CLOCK_SKEW = timedelta(minutes=1)

KeyType = Literal["EC", "RSA"]
PrivateKey = Union[ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey]

# SPIFFE ID spec: trust domain chars [a-z0-9.-_], path segments [A-Za-z0-9.-_].
_TRUST_DOMAIN = re.compile(r"^[a-z0-9._-]{1,255}$")
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")
_MAX_ID_LEN = 2048


class IdentityError(ValueError):
    """An identity request or certificate was refused; the message says why."""


# -- SPIFFE ids ------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class SpiffeId:
    """``spiffe://<trust_domain>/ns/<namespace>/sa/<service_account>``, Istio's identity form."""

    trust_domain: str
    namespace: str
    service_account: str

    def __post_init__(self) -> None:
        validate_trust_domain(self.trust_domain)
        for what, seg in (("namespace", self.namespace), ("service account", self.service_account)):
            if not _SEGMENT.match(seg) or seg in (".", ".."):
                raise IdentityError(f"invalid {what} {seg!r}: want letters, digits, '.', '-' or '_'")

    def __str__(self) -> str:
        return f"spiffe://{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @classmethod
    def parse(cls, uri: str) -> "SpiffeId":
        """Parse and validate; raises ``IdentityError`` for anything but the ns/sa form."""
        if len(uri) > _MAX_ID_LEN:
            raise IdentityError("SPIFFE id longer than 2048 bytes")
        if not uri.startswith("spiffe://"):
            raise IdentityError(f"not a SPIFFE id (scheme must be spiffe://): {uri!r}")
        trust_domain, _, path = uri[len("spiffe://"):].partition("/")
        parts = path.split("/")
        if len(parts) != 4 or parts[0] != "ns" or parts[2] != "sa":
            raise IdentityError(f"SPIFFE id {uri!r} is not of the form spiffe://<td>/ns/<ns>/sa/<sa>")
        return cls(trust_domain, parts[1], parts[3])


def validate_trust_domain(trust_domain: str) -> str:
    if not _TRUST_DOMAIN.match(trust_domain):
        raise IdentityError(f"invalid trust domain {trust_domain!r}: want lowercase letters, digits, '.', '-' or '_'")
    return trust_domain


def spiffe_id(namespace: str, service_account: str, trust_domain: str = DEFAULT_TRUST_DOMAIN) -> str:
    return str(SpiffeId(trust_domain, namespace, service_account))


# -- keys and PEM ----------------------------------------------------------------------------

def new_key(key_type: KeyType = "EC") -> PrivateKey:
    """EC P-256 (the default, as Istio's) or RSA 2048."""
    if key_type == "EC":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "RSA":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise IdentityError(f"unsupported key type {key_type!r}: want EC or RSA")


def new_workload_key(key_type: KeyType = "EC") -> PrivateKey:
    """A workload's key, generated on its node by the proxy; only its CSR travels."""
    return new_key(key_type)


def key_pem(key: PrivateKey) -> str:
    """Unencrypted PKCS#8 PEM, for handing a key to a TLS context on the same node."""
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption()).decode()


def load_key(pem: str) -> PrivateKey:
    key = serialization.load_pem_private_key(pem.encode(), password=None)
    if not isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)):
        raise IdentityError("unsupported private key type: want EC or RSA")
    return key


def cert_pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def load_cert(pem: str) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(pem.encode())
    except ValueError as exc:
        raise IdentityError(f"not a PEM certificate: {exc}") from exc


def load_certs(pem: str) -> list[x509.Certificate]:
    """Every certificate of a concatenated PEM bundle, in order."""
    try:
        return x509.load_pem_x509_certificates(pem.encode())
    except ValueError as exc:
        raise IdentityError(f"not a PEM certificate bundle: {exc}") from exc


def fingerprint(cert: x509.Certificate) -> str:
    """SHA-256 of the DER encoding, hex: how roots are named in the store and in logs."""
    return cert.fingerprint(hashes.SHA256()).hex()


def _now(now: datetime | None) -> datetime:
    return now if now is not None else datetime.now(timezone.utc)


def _public_bytes(key: PrivateKey | ec.EllipticCurvePublicKey | rsa.RSAPublicKey) -> bytes:
    public = key.public_key() if isinstance(key, (ec.EllipticCurvePrivateKey, rsa.RSAPrivateKey)) else key
    return public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


# -- the root CA -----------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class CAKeyPair:
    """The signing root: its certificate and private key (kept out of ``repr``)."""

    cert: x509.Certificate
    key: PrivateKey = field(repr=False)

    @property
    def cert_pem(self) -> str:
        return cert_pem(self.cert)

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.cert)

    def to_dict(self) -> dict[str, str]:
        """The store's form; the only place the CA key is serialized."""
        return {"cert_pem": self.cert_pem, "key_pem": key_pem(self.key)}

    @classmethod
    def from_dict(cls, d: dict[str, str]) -> "CAKeyPair":
        return import_ca(d["cert_pem"], d["key_pem"])


def create_root_ca(trust_domain: str = DEFAULT_TRUST_DOMAIN, key_type: KeyType = "EC",
                   validity: timedelta = DEFAULT_ROOT_VALIDITY, now: datetime | None = None) -> CAKeyPair:
    """A new self-signed root for ``trust_domain``."""
    validate_trust_domain(trust_domain)
    key = new_key(key_type)
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "raymesh"),
                      x509.NameAttribute(NameOID.COMMON_NAME, f"raymesh root CA {trust_domain}")])
    start = _now(now) - CLOCK_SKEW
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name)
        .public_key(key.public_key())
        .serial_number(_serial())
        .not_valid_before(start).not_valid_after(start + validity)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(_key_usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(ski, critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CAKeyPair(cert, key)


def import_ca(cert_pem_text: str, key_pem_text: str) -> CAKeyPair:
    """An operator's own root (Istio's "plug in certificates"), checked before it is used.

    The certificate must be a self-signed CA allowed to sign certificates, and the key must be
    its key.  Intermediate CAs are not accepted: the trust bundle holds roots only.
    """
    cert = load_cert(cert_pem_text)
    try:
        key = load_key(key_pem_text)
    except (ValueError, TypeError) as exc:
        raise IdentityError(f"CA key: {exc}") from exc
    if _public_bytes(key) != _public_bytes(cert.public_key()):  # type: ignore[arg-type]
        raise IdentityError("CA key does not match the CA certificate")
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise IdentityError("certificate is not a CA (basicConstraints CA:TRUE missing)")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.key_cert_sign:
            raise IdentityError("CA certificate's key usage lacks keyCertSign")
    except x509.ExtensionNotFound:
        pass
    if cert.issuer != cert.subject:
        raise IdentityError("CA certificate is not self-signed (intermediate CAs are not supported)")
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise IdentityError(f"CA certificate's self-signature does not verify: {exc}") from exc
    return CAKeyPair(cert, key)


# -- issuing SVIDs ---------------------------------------------------------------------------

def make_csr(key: PrivateKey, spiffe: str) -> str:
    """A PEM CSR carrying ``spiffe`` as its only URI SAN (what the proxy sends Citadel)."""
    SpiffeId.parse(spiffe)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe)]), critical=True)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def sign_csr(ca: CAKeyPair, csr_pem: str, spiffe: str, ttl: timedelta = DEFAULT_SVID_TTL,
             now: datetime | None = None) -> str:
    """Issue an X.509-SVID for ``spiffe`` over the CSR's public key.

    The identity is the caller's decision (Citadel checks the registry), not the CSR's: its
    subject and SANs are ignored, except that a URI SAN naming another identity is refused,
    since such a CSR was made for something else.
    """
    SpiffeId.parse(spiffe)
    if ttl <= timedelta(0):
        raise IdentityError(f"certificate TTL must be positive, got {ttl}")
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError as exc:
        raise IdentityError(f"not a PEM certificate signing request: {exc}") from exc
    if not csr.is_signature_valid:
        raise IdentityError("CSR signature does not verify")
    public = csr.public_key()
    if not isinstance(public, (ec.EllipticCurvePublicKey, rsa.RSAPublicKey)):
        raise IdentityError("CSR key must be EC or RSA")
    if isinstance(public, rsa.RSAPublicKey) and public.key_size < 2048:
        raise IdentityError(f"CSR RSA key too small ({public.key_size} bits, want >= 2048)")
    try:
        requested = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = requested.get_values_for_type(x509.UniformResourceIdentifier)
    except x509.ExtensionNotFound:
        uris = []
    if any(u != spiffe for u in uris):
        raise IdentityError(f"CSR asks for {uris}, but the identity to issue is {spiffe}")
    start = _now(now) - CLOCK_SKEW
    end = min(_now(now) + ttl, ca.cert.not_valid_after_utc)
    ca_ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([])).issuer_name(ca.cert.subject)
        .public_key(public)
        .serial_number(_serial())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe)]), critical=True)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(digital_signature=True,
                                  key_encipherment=isinstance(public, rsa.RSAPublicKey)), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .sign(ca.key, hashes.SHA256())
    )
    return cert_pem(cert)


def rotation_due(cert: str, now: datetime | None = None) -> bool:
    """True from half of the certificate's lifetime on: when a proxy asks for a new one."""
    c = load_cert(cert)
    start, end = c.not_valid_before_utc, c.not_valid_after_utc
    return _now(now) >= start + (end - start) / 2


def _serial() -> int:
    # A random positive 128-bit serial, as Istio draws it (RFC 5280 allows up to 20 octets).
    return 1 + secrets.randbelow(2**128 - 1)


def _key_usage(*, digital_signature: bool = False, key_encipherment: bool = False, key_cert_sign: bool = False,
               crl_sign: bool = False) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=False,
                         key_encipherment=key_encipherment, data_encipherment=False, key_agreement=False,
                         key_cert_sign=key_cert_sign, crl_sign=crl_sign, encipher_only=False, decipher_only=False)


# -- trust bundles ---------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class TrustBundle:
    """The roots a trust domain's peers accept.

    During a root rotation it holds the old and the new root, so certificates issued by
    either verify until the old ones have expired.
    """

    roots: tuple[x509.Certificate, ...]
    trust_domain: str = DEFAULT_TRUST_DOMAIN

    def __post_init__(self) -> None:
        if not self.roots:
            raise IdentityError("a trust bundle needs at least one root")
        validate_trust_domain(self.trust_domain)

    @classmethod
    def from_pems(cls, pems: Iterable[str], trust_domain: str = DEFAULT_TRUST_DOMAIN) -> "TrustBundle":
        """From PEM texts, each holding one or more certificates."""
        return cls(tuple(c for p in pems for c in load_certs(p)), trust_domain)

    def pems(self) -> list[str]:
        return [cert_pem(c) for c in self.roots]

    def pem(self) -> str:
        """The concatenated bundle, as ``openssl verify -CAfile`` and TLS contexts read it."""
        return "".join(self.pems())

    def verify(self, chain: Sequence[str], now: datetime | None = None) -> str:
        """Check an SVID chain (leaf first, PEM) against the roots; return its SPIFFE id.

        Path building, signatures, validity windows, CA constraints and key usages are
        checked by cryptography's RFC 5280 verifier; on top, the leaf must carry exactly one
        URI SAN, a SPIFFE id of this trust domain, and must not be a CA.
        """
        if not chain:
            raise IdentityError("empty certificate chain")
        certs = [c for p in chain for c in load_certs(p)]
        leaf, intermediates = certs[0], [c for c in certs[1:] if c not in self.roots]
        verifier = (
            verification.PolicyBuilder()
            .store(verification.Store(list(self.roots)))
            .time(_now(now))
            .build_client_verifier()
        )
        try:
            verifier.verify(leaf, intermediates)
        except verification.VerificationError as exc:
            raise IdentityError(f"certificate does not verify against the trust bundle: {exc}") from exc
        return _leaf_spiffe_id(leaf, self.trust_domain)


def _leaf_spiffe_id(leaf: x509.Certificate, trust_domain: str) -> str:
    is_ca, uris = svid_facts(leaf)
    if is_ca:
        raise IdentityError("an SVID must not be a CA certificate")
    if len(uris) != 1:
        raise IdentityError(f"an SVID carries exactly one URI SAN, this one has {len(uris)}")
    sid = SpiffeId.parse(uris[0])
    if sid.trust_domain != trust_domain:
        raise IdentityError(f"SVID of trust domain {sid.trust_domain!r}, expected {trust_domain!r}")
    return uris[0]
