"""Validation of Istio networking, security and telemetry objects (and raymesh's
RateLimitPolicy and CachePolicy) before Galley commits them.  Kubernetes ``Secret``s (the
gateway's TLS credentials) have no spec: ``mesh.secrets`` checks them.

Three layers, in the order the Kubernetes apiserver and Istio's validating webhook apply them:

1. **Envelope**: apiVersion/kind known, metadata well formed, no unknown top-level fields.
2. **Structure**: the ``spec`` against Istio's own CRD OpenAPI v3 schema (``mesh/schemas``,
   copied from Istio's ``crd-all.gen.yaml``; raymesh's own kinds are written in the same
   form). The schemas are structural, so unknown fields are errors, as with ``kubectl
   apply`` (strict field validation). The CEL rules the CRDs carry
   (``x-kubernetes-validations``) are implemented as Python predicates keyed by the exact
   rule text: a schema update that adds a rule fails loudly instead of being ignored.
3. **Semantics**: the checks of Istio's ``pkg/config/validation`` (hosts, routes, weights,
   regexes, retries, TLS, resolution modes, JWT rules, authorization rules and attributes,
   telemetry tag overrides ...). They run only on a structurally valid spec, as the webhook only ever sees objects
   the schema accepted, so they can trust types.

Errors are :class:`FieldError` values naming the file, the document, the object and the
field path (``spec.http[0].route[1].weight``), with a short reason. Structural errors use the
apiserver's wording (``spec.x in body should match '...'``), so that messages match what
``kubectl apply`` prints for the same object.
"""
from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from dataclasses import dataclass
from fractions import Fraction
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, Iterable

from mesh.compiler_gateways import GATEWAY_NAMESPACE, unserved_servers
from mesh.durations import DurationError, parse_duration_exact
from mesh.loader import Document
from mesh.resources import API_VERSIONS, CORE_KINDS, DEFAULT_NAMESPACE, KIND_GROUPS, Resource
from mesh.secrets import SECRET_FIELDS, SECRET_KIND, secret_issues
from proxy_core.telemetry_expr import ExpressionError, parse_filter, parse_value

try:  # Python >= 3.11
    from re import _parser as _sre_parse  # type: ignore[attr-defined]
except ImportError:  # pragma: no cover - Python 3.10
    import sre_parse as _sre_parse  # type: ignore[no-redef]

SCHEMA_DIR = Path(__file__).with_name("schemas")

_Issues = list[tuple[str, str]]  # (field path, reason)


# --------------------------------------------------------------------------- public API

@dataclass(frozen=True, slots=True)
class FieldError:
    """One problem in one document. ``index`` is 0-based; ``name`` is ``namespace/name``."""

    source: str
    index: int
    kind: str
    name: str
    path: str
    reason: str

    def __str__(self) -> str:
        obj = " ".join(p for p in (self.kind, self.name) if p)
        where = f"{self.source}: document {self.index}" + (f" ({obj})" if obj else "")
        return f"{where}: {self.path}: {self.reason}" if self.path else f"{where}: {self.reason}"


class ValidationFailed(Exception):
    """Raised by :func:`to_resources` when any document is invalid."""

    def __init__(self, errors: list[FieldError]) -> None:
        super().__init__("\n".join(str(e) for e in errors))
        self.errors = errors


def validate_document(doc: Document) -> list[FieldError]:
    """Every problem found in one document (empty when it is valid)."""
    body = json_shaped(doc.body)
    kind = body.get("kind") if isinstance(body.get("kind"), str) else ""
    issues: _Issues = []
    if kind in CORE_KINDS:   # a Secret: no spec, its data checked by mesh.secrets
        _check_secret(body, issues)
    else:
        _check_envelope(body, issues)
    if not issues and kind not in CORE_KINDS:
        spec_issues: _Issues = []
        _check_schema(body["spec"], _spec_schema(kind), "spec", spec_issues)
        if not spec_issues:
            _SEMANTIC_RULES[kind](body["spec"], _namespace(body), spec_issues)
        issues.extend(spec_issues)
    prefix = "" if doc.item is None else f"items[{doc.item}]."
    return [FieldError(doc.source, doc.index, kind, _display_name(body), prefix + path, reason)
            for path, reason in issues]


def validate_documents(docs: list[Document]) -> list[FieldError]:
    """Validate each document and reject the same object defined twice in one apply."""
    errors: list[FieldError] = []
    first_seen: dict[tuple[str, str, str], Document] = {}
    for doc in docs:
        doc_errors = validate_document(doc)
        errors.extend(doc_errors)
        if doc_errors:
            continue
        key = (doc.body["kind"], _namespace(doc.body), doc.body["metadata"]["name"])
        earlier = first_seen.setdefault(key, doc)
        if earlier is not doc:
            errors.append(FieldError(
                doc.source, doc.index, key[0], _display_name(doc.body), "metadata.name",
                f"duplicate object: also defined in {earlier.source} document {earlier.index}"))
    return errors


def document_warnings(docs: list[Document]) -> list[FieldError]:
    """Valid configuration raymesh accepts but does not act on yet, each naming its field:
    Gateway servers the ingress gateway does not serve (``mesh.compiler_gateways``), and
    Secrets outside the gateway's namespace, where it never looks."""
    out = []
    for doc in docs:
        if doc.body.get("kind") == SECRET_KIND and _namespace(doc.body) != GATEWAY_NAMESPACE:
            out.append(FieldError(doc.source, doc.index, SECRET_KIND, _display_name(doc.body), "metadata.namespace",
                                  f"the ingress gateway reads credentialName secrets in {GATEWAY_NAMESPACE} only"))
        if doc.body.get("kind") == "Gateway":
            resource = Resource.from_dict(json_shaped(doc.body))
            out += [FieldError(doc.source, doc.index, "Gateway", _display_name(doc.body), path, reason)
                    for path, reason in unserved_servers(resource)]
    return out


def to_resources(docs: list[Document]) -> list[Resource]:
    """Validate ``docs`` and turn them into Resources; raise ValidationFailed if any is invalid."""
    errors = validate_documents(docs)
    if errors:
        raise ValidationFailed(errors)
    return [Resource.from_dict(json_shaped(doc.body)) for doc in docs]


def json_shaped(value: Any) -> Any:
    """``value`` with integer, float and boolean mapping keys turned into strings.

    YAML allows ``portLevelMtls: {8080: ...}``; the apiserver reads YAML by converting it to
    JSON (sigs.k8s.io/yaml), where every key is a string, so the key is ``"8080"``. Other
    keys (null, lists) have no JSON form and are left for the schema check to reject.
    """
    if isinstance(value, dict):
        return {_json_key(k): json_shaped(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_shaped(v) for v in value]
    return value


def _json_key(key: Any) -> Any:
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, int):
        return str(key)
    if isinstance(key, float):
        return repr(key)
    return key


def re2_to_python(pattern: str) -> str:
    """Translate an RE2 (Envoy) regex into Python ``re`` syntax; ValueError if not possible.

    Envoy evaluates Istio regexes with RE2, which has no lookaround, backreferences, atomic
    groups or possessive quantifiers and caps repeat counts at 1000: such a pattern would be
    rejected by Envoy, so it is rejected here even though Python could run it. RE2's ``\\z``
    (end of text) is Python's ``\\Z``. RE2 features Python lacks (``\\pL``, ``\\C``) fail to
    compile and are rejected.
    """
    translated = _translate_re2_escapes(pattern)
    try:
        tree = _sre_parse.parse(translated)
    except re.error as exc:
        raise ValueError(f"invalid regex: {exc}") from None
    unsupported = _re2_unsupported(tree)
    if unsupported:
        raise ValueError(f"invalid regex: RE2 does not support {unsupported}")
    return translated


# --------------------------------------------------------------------------- envelope

_TOP_LEVEL_FIELDS = frozenset({"apiVersion", "kind", "metadata", "spec", "status"})
# ObjectMeta fields a user may send back from ``kubectl get -o yaml``; server-set ones are ignored.
_METADATA_FIELDS = frozenset({
    "name", "namespace", "labels", "annotations", "resourceVersion", "generation", "uid",
    "creationTimestamp", "managedFields", "finalizers", "ownerReferences", "selfLink",
    "deletionTimestamp", "deletionGracePeriodSeconds",
})


def _check_envelope(body: dict[str, Any], out: _Issues) -> None:
    for key in body:
        if key not in _TOP_LEVEL_FIELDS:
            out.append((str(key), "unknown field"))
    kind = body.get("kind")
    if kind is None:
        out.append(("kind", "Required value"))
    elif not isinstance(kind, str) or kind not in KIND_GROUPS:
        out.append(("kind", f"unknown kind {json.dumps(kind)}; supported kinds: "
                           f"{', '.join(sorted([*KIND_GROUPS, *CORE_KINDS]))}"))
    else:
        _check_api_version(kind, body.get("apiVersion"), out)
    _check_metadata(body.get("metadata"), out)
    spec = body.get("spec")
    if spec is None:
        out.append(("spec", "Required value"))
    elif not isinstance(spec, dict):
        out.append(("spec", f"must be of type object, got {_type_name(spec)}"))


def _check_secret(body: dict[str, Any], out: _Issues) -> None:
    """A Kubernetes Secret: its own top-level fields, metadata as for every kind, then its data."""
    for key in body:
        if key not in SECRET_FIELDS:
            out.append((str(key), "unknown field"))
    _check_metadata(body.get("metadata"), out)
    out.extend(secret_issues(body))


def _check_api_version(kind: str, api_version: Any, out: _Issues) -> None:
    group = KIND_GROUPS[kind]
    supported = [f"{group}/{v}" for v in API_VERSIONS[group] if v in _schema_versions(kind)]
    if api_version is None:
        out.append(("apiVersion", "Required value"))
    elif api_version not in supported:
        out.append(("apiVersion", _unsupported(api_version, supported)))


def _check_metadata(meta: Any, out: _Issues) -> None:
    if meta is None:
        out.append(("metadata", "Required value"))
        return
    if not isinstance(meta, dict):
        out.append(("metadata", f"must be of type object, got {_type_name(meta)}"))
        return
    for key in meta:
        if key not in _METADATA_FIELDS:
            out.append((f"metadata.{key}", "unknown field"))
    name = meta.get("name")
    if name is None:
        out.append(("metadata.name", "Required value"))
    elif not isinstance(name, str) or not _is_dns1123_subdomain(name):
        out.append(("metadata.name", f"Invalid value: {name!r}: must be a lowercase RFC 1123 subdomain"))
    namespace = meta.get("namespace")
    if namespace is not None and (not isinstance(namespace, str) or not _is_dns1123_label(namespace)):
        out.append(("metadata.namespace", f"Invalid value: {namespace!r}: must be a lowercase RFC 1123 label"))
    for field in ("labels", "annotations"):
        value = meta.get(field)
        if value is None:
            continue
        if not isinstance(value, dict) or not all(isinstance(v, str) for v in value.values()):
            out.append((f"metadata.{field}", "must be a map of strings to strings"))
        elif field == "labels":
            _check_labels(value, f"metadata.{field}", out)
        else:
            for key in value:
                if _label_key_error(key):
                    out.append((f"metadata.annotations[{key}]", f"invalid key: {_label_key_error(key)}"))


def _namespace(body: dict[str, Any]) -> str:
    return (body.get("metadata") or {}).get("namespace") or DEFAULT_NAMESPACE


def _display_name(body: dict[str, Any]) -> str:
    meta = body.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        return ""
    namespace = meta.get("namespace")
    return f"{namespace if isinstance(namespace, str) and namespace else DEFAULT_NAMESPACE}/{meta['name']}"


# --------------------------------------------------------------------------- schemas

@lru_cache(maxsize=None)
def _schema_file(kind: str) -> dict[str, Any]:
    with open(SCHEMA_DIR / f"{kind.lower()}.json", encoding="utf-8") as f:
        return json.load(f)


@lru_cache(maxsize=None)
def _schema_versions(kind: str) -> frozenset[str]:
    return frozenset(v for entry in _schema_file(kind)["schemas"] for v in entry["versions"])


def _spec_schema(kind: str) -> dict[str, Any]:
    """The spec schema. Every served version of our kinds shares one schema, so take the first."""
    return _schema_file(kind)["schemas"][0]["openAPIV3Schema"]["properties"]["spec"]


# OpenAPI keywords this validator understands; a test checks the schemas use no others.
SUPPORTED_SCHEMA_KEYWORDS = frozenset({
    "type", "description", "properties", "additionalProperties", "items", "required", "enum",
    "minimum", "maximum", "minLength", "maxLength", "pattern", "minItems", "maxItems",
    "minProperties", "maxProperties", "nullable",
    "format", "oneOf", "anyOf", "allOf", "not", "x-kubernetes-validations",
    "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
})

_JSON_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
}


def _check_schema(value: Any, schema: dict[str, Any], path: str, out: _Issues) -> None:
    """Validate ``value`` against an OpenAPI v3 (structural) schema, appending to ``out``."""
    before = len(out)
    expected = schema.get("type")
    if value is None:
        if not schema.get("nullable"):
            out.append((path, _type_error(path, expected, "null")))
        return
    if expected is not None and not _JSON_TYPES[expected](value):
        out.append((path, _type_error(path, expected, _type_name(value))))
        return
    if isinstance(value, dict):
        _check_object(value, schema, path, out)
    elif isinstance(value, list):
        _check_array(value, schema, path, out)
    else:
        _check_scalar(value, schema, path, out)
    for member in schema.get("allOf", ()):
        _check_schema(value, member, path, out)
    _check_composition(value, schema, path, out)
    # The apiserver runs CEL rules unless a value has the wrong type (a "blocking" error).
    if not any(_is_type_error(reason) for _, reason in out[before:]):
        for rule in schema.get("x-kubernetes-validations", ()):
            reason = CEL_RULES[rule["rule"]](value, rule["message"])
            if reason:
                out.append((path, f"Invalid value: {reason}"))


def _check_object(value: dict[Any, Any], schema: dict[str, Any], path: str, out: _Issues) -> None:
    properties = schema.get("properties", {})
    additional = schema.get("additionalProperties")
    for key, item in value.items():
        if not isinstance(key, str):
            out.append((path, _type_error(f"{path} key {key!r}", "string", _type_name(key))))
        elif key in properties:
            _check_schema(item, properties[key], _join(path, key), out)
        elif isinstance(additional, dict):
            _check_schema(item, additional, f"{path}[{key}]", out)
        elif schema.get("type") == "object":  # composition members (oneOf ...) list no fields
            out.append((_join(path, key), "unknown field"))
    for key in schema.get("required", ()):
        if key not in value:
            out.append((_join(path, key), "Required value"))
    limit = schema.get("maxProperties")
    if limit is not None and len(value) > limit:
        out.append((path, f"Too many: {len(value)}: must have at most {limit} entries"))
    least = schema.get("minProperties")
    if least is not None and len(value) < least:
        out.append((path, f"Invalid value: {len(value)}: {path} in body should have at least {least} properties"))


def _check_array(value: list[Any], schema: dict[str, Any], path: str, out: _Issues) -> None:
    items = schema.get("items")
    if items is not None:
        for i, item in enumerate(value):
            _check_schema(item, items, f"{path}[{i}]", out)
    if "minItems" in schema and len(value) < schema["minItems"]:
        out.append((path, f"Invalid value: must have at least {schema['minItems']} items"))
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        out.append((path, f"Too many: {len(value)}: must have at most {schema['maxItems']} items"))
    if schema.get("x-kubernetes-list-type") == "map":
        keys = schema["x-kubernetes-list-map-keys"]
        seen: set[tuple[Any, ...]] = set()
        for i, item in enumerate(value):
            if not isinstance(item, dict):
                continue
            key = tuple(json.dumps(item.get(k), sort_keys=True) for k in keys)
            if key in seen:
                shown = ", ".join(f"{k}={item.get(k)!r}" for k in keys)
                out.append((f"{path}[{i}]", f"Duplicate value: {shown}"))
            seen.add(key)


def _check_scalar(value: Any, schema: dict[str, Any], path: str, out: _Issues) -> None:
    if "enum" in schema and value not in schema["enum"]:
        out.append((path, _unsupported(value, schema["enum"])))
        return
    if isinstance(value, str):
        if "minLength" in schema and len(value) < schema["minLength"]:
            out.append((path, f"Invalid value: {json.dumps(value)}: {path} in body should be at least "
                              f"{schema['minLength']} chars long"))
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            out.append((path, f"Too long: may not be longer than {schema['maxLength']}"))
        if "pattern" in schema and not _schema_pattern(schema["pattern"]).search(value):
            out.append((path, f"Invalid value: {json.dumps(value)}: {path} in body should match "
                              f"'{schema['pattern']}'"))
        if schema.get("format") == "byte" and not _is_base64(value):
            out.append((path, "Invalid value: must be base64-encoded bytes"))
        return
    if not isinstance(value, bool):
        low, high = schema.get("minimum"), schema.get("maximum")
        if low is not None and value < low:
            out.append((path, f"Invalid value: {value}: must be greater than or equal to {low}"))
        if high is not None and value > high:
            out.append((path, f"Invalid value: {value}: must be less than or equal to {high}"))


def _check_composition(value: Any, schema: dict[str, Any], path: str, out: _Issues) -> None:
    """oneOf/anyOf/not. Istio's CRDs use them on objects only, to say "at most one of" fields."""
    if "oneOf" in schema and sum(_satisfies(value, s) for s in schema["oneOf"]) != 1:
        fields = [f for s in schema["oneOf"] for f in s.get("required", ())]
        present = [f for f in fields if isinstance(value, dict) and f in value]
        out.append((path, f"Invalid value: only one of {', '.join(fields)} may be set"
                          f" (got {', '.join(present)})"))
    if "anyOf" in schema and not any(_satisfies(value, s) for s in schema["anyOf"]):
        fields = [f for s in schema["anyOf"] for f in s.get("required", ())]
        out.append((path, f"Invalid value: one of {', '.join(fields)} must be set"))
    if "not" in schema and _satisfies(value, schema["not"]):
        out.append((path, "Invalid value: must not match the excluded shape"))


def _satisfies(value: Any, schema: dict[str, Any]) -> bool:
    scratch: _Issues = []
    _check_schema(value, schema, "", scratch)
    return not scratch


_TYPE_ERROR = " in body must be of type "


def _type_error(path: str, expected: str | None, got: str) -> str:
    """The apiserver's wording, which Istio's CRD fixtures quote."""
    return f'Invalid value: "{got}": {path}{_TYPE_ERROR}{expected}: "{got}"'


def _is_type_error(reason: str) -> bool:
    return _TYPE_ERROR in reason


@lru_cache(maxsize=None)
def _schema_pattern(pattern: str) -> re.Pattern[str]:
    """OpenAPI ``pattern``: an unanchored RE2 search, as the apiserver runs it."""
    return re.compile(re2_to_python(pattern))


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    for name in ("boolean", "integer", "number", "string", "array", "object"):
        if _JSON_TYPES[name](value):
            return name
    return type(value).__name__


def _unsupported(value: Any, supported: Iterable[Any]) -> str:
    return f"Unsupported value: {json.dumps(value)}: supported values: " + ", ".join(
        json.dumps(v) for v in supported)


def _is_base64(text: str) -> bool:
    try:
        base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        return False
    return True


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


# --------------------------------------------------------------------------- CEL rules

def _predicate(test: Callable[[Any], bool]) -> Callable[[Any, str], str | None]:
    return lambda value, message: None if test(value) else message


def _has(obj: dict[str, Any], field: str) -> bool:
    return obj.get(field) is not None


def _at_most_one(*fields: str) -> Callable[[Any, str], str | None]:
    return _predicate(lambda obj: sum(_has(obj, f) for f in fields) <= 1)


def _duration_rule(value: str, message: str) -> str | None:
    """``duration(self) >= duration('1ms')``, plus the webhook's millisecond precision rule."""
    try:
        seconds = parse_duration_exact(value)
    except DurationError:
        return message
    if seconds < Fraction(1, 1000):
        return message
    if (seconds * 1000).denominator != 1:
        return "only durations to ms precision are supported"
    return None


def _uds_absolute(address: str) -> bool:
    return not address.startswith("unix://") or address[7:8] in ("/", "@")


def _ports_unique(ports: list[dict[str, Any]]) -> bool:
    numbers = [p.get("number") for p in ports]
    return all(numbers.count(n) == 1 for n in numbers)


def _cidr_resolution(spec: dict[str, Any]) -> bool:
    has_cidr = any("/" in a for a in spec.get("addresses") or [])
    return not has_cidr or (spec.get("resolution") or "NONE") in ("STATIC", "NONE")


_CEL_PORT_NAME = re.compile(r"[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?")
_CEL_INT = re.compile(r"[+-]?[0-9]+")
_INT64_MAX = 2**63 - 1


def _port_keys_rule(ports: dict[str, Any], message: str) -> str | None:
    """``self.all(key, 0 < int(key) && int(key) <= 65535)``.

    CEL's ``int()`` on a string that is not a base-10 int64 is an evaluation error, which the
    apiserver reports instead of the rule's message.
    """
    for key in ports:
        if not _CEL_INT.fullmatch(key) or abs(int(key)) > _INT64_MAX:
            return "type conversion error from 'string' to 'int'"
        if not 0 < int(key) <= 65535:
            return message
    return None


def _port_level_mtls_has_selector(spec: dict[str, Any]) -> bool:
    return not _has(spec, "portLevelMtls") or bool((spec.get("selector") or {}).get("matchLabels"))


_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*):")


def _url_scheme(text: str) -> str | None:
    """The scheme Go's ``url.Parse`` (behind CEL's ``url()``) finds, lower-cased; None if it fails."""
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        return None  # "invalid control character in URL"
    match = _URL_SCHEME.match(text)
    return match.group(1).lower() if match else ""


def _service_accounts_alone(source: dict[str, Any]) -> bool:
    if not (_has(source, "serviceAccounts") or _has(source, "notServiceAccounts")):
        return True
    return not any(_has(source, f) for f in ("principals", "notPrincipals", "namespaces", "notNamespaces"))

def _upsert_has_value(override: dict[str, Any], message: str) -> str | None:
    """``(operation == "UPSERT") ? (self.value != "") : true``.

    Reading an absent ``self.value`` is a CEL evaluation error ("no such key"), which the
    apiserver reports with the rule's message appended.
    """
    if override.get("operation") != "UPSERT":
        return None
    if "value" not in override:
        return f"no such key: value evaluating rule: {message}"
    return message if override["value"] == "" else None


# Every x-kubernetes-validations rule in mesh/schemas, by exact text -> check(value, message).
CEL_RULES: dict[str, Callable[[Any, str], str | None]] = {
    "duration(self) >= duration('1ms')": _duration_rule,
    '!self.contains("*")': _predicate(lambda s: "*" not in s),
    'self.all(key, !key.contains("*"))': _predicate(lambda m: all("*" not in k for k in m)),
    "self.all(key, key.size() != 0)": _predicate(lambda m: all(k != "" for k in m)),
    'self != "*"': _predicate(lambda s: s != "*"),
    "0 < self && self <= 65535": _predicate(lambda n: 0 < n <= 65535),
    'self.all(key, size(key) < 63 && key.matches("^[a-zA-Z0-9](?:[-a-zA-Z0-9]*[a-zA-Z0-9])?$"))':
        _predicate(lambda m: all(len(k) < 63 and _CEL_PORT_NAME.fullmatch(k) for k in m)),
    'self.startsWith("unix://") ? (self.substring(7, 8) == "/" || self.substring(7, 8) == "@") : true':
        _predicate(_uds_absolute),
    'self.startsWith("unix://") ? !self.endsWith("/") : true':
        _predicate(lambda s: not (s.startswith("unix://") and s.endswith("/"))),
    "has(self.address) || has(self.network)":
        _predicate(lambda o: _has(o, "address") or _has(o, "network")),
    '(has(self.address) ? self.address : "").startsWith("unix://") ? !has(self.ports) : true':
        _predicate(lambda o: not ((o.get("address") or "").startswith("unix://") and _has(o, "ports"))),
    "self.all(l1, self.exists_one(l2, l1.number == l2.number))": _predicate(_ports_unique),
    "(has(self.workloadSelector) ? 1 : 0) + (has(self.endpoints) ? 1 : 0) <= 1":
        _at_most_one("workloadSelector", "endpoints"),
    '!((has(self.addresses) ? self.addresses : []).exists(k, k.contains("/")) && '
    '!((has(self.resolution) ? self.resolution : "NONE") in ["STATIC", "NONE"]))':
        _predicate(_cidr_resolution),
    '((has(self.resolution) ? self.resolution : "NONE") == "NONE") ? !has(self.endpoints) : true':
        _predicate(lambda o: (o.get("resolution") or "NONE") != "NONE" or not _has(o, "endpoints")),
    '((has(self.resolution) ? self.resolution : "") == "DNS_ROUND_ROBIN") ? '
    '((has(self.endpoints) ? self.endpoints : []).size() <= 1) : true':
        _predicate(lambda o: o.get("resolution") != "DNS_ROUND_ROBIN" or len(o.get("endpoints") or []) <= 1),
    "(has(self.tlsCertificates) ? 1 : 0) + (has(self.credentialNames) ? 1 : 0) <= 1":
        _at_most_one("tlsCertificates", "credentialNames"),
    "(has(self.credentialName) ? 1 : 0) + (has(self.credentialNames) ? 1 : 0) <= 1":
        _at_most_one("credentialName", "credentialNames"),
    "(has(self.credentialNames) ? 1 : 0) + (has(self.tlsCertificates) ? 1 : 0) <= 1":
        _at_most_one("credentialNames", "tlsCertificates"),
    "self.all(key, 0 < int(key) && int(key) <= 65535)": _port_keys_rule,
    "has(self.portLevelMtls) ? (((has(self.selector) && has(self.selector.matchLabels)) ? "
    "self.selector.matchLabels : {}).size() > 0) : true": _predicate(_port_level_mtls_has_selector),
    'url(self).getScheme() in ["http", "https"]': _predicate(lambda s: _url_scheme(s) in ("http", "https")),
    "(has(self.jwksUri) ? 1 : 0) + (has(self.jwks_uri) ? 1 : 0) + (has(self.jwks) ? 1 : 0) <= 1":
        _at_most_one("jwksUri", "jwks_uri", "jwks"),
    "self.size() == 0": _predicate(lambda s: len(s) == 0),
    "(has(self.selector) ? 1 : 0) + (has(self.targetRef) ? 1 : 0) + (has(self.targetRefs) ? 1 : 0) <= 1":
        _at_most_one("selector", "targetRef", "targetRefs"),
    "(has(self.serviceAccounts) || has(self.notServiceAccounts)) ? (!has(self.principals) &&\n"
    "!has(self.notPrincipals) && !has(self.namespaces) && !has(self.notNamespaces)) : true":
        _predicate(_service_accounts_alone),
    '((has(self.operation) ? self.operation : "") == "UPSERT") ? (self.value != "") : true': _upsert_has_value,
    '((has(self.operation) ? self.operation : "") == "REMOVE") ? !has(self.value) : true':
        _predicate(lambda o: o.get("operation") != "REMOVE" or "value" not in o),
}


# --------------------------------------------------------------------------- value helpers

_DNS1123_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_WILDCARD_LABEL = re.compile(r"\*|(\*|\*-)?[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_QUALIFIED_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_HTTP_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _is_dns1123_label(text: str) -> bool:
    return len(text) <= 63 and _DNS1123_LABEL.fullmatch(text) is not None


def _is_dns1123_subdomain(text: str) -> bool:
    return 0 < len(text) <= 253 and all(_is_dns1123_label(p) for p in text.split("."))


def _dns1123_labels_error(host: str, domain: str) -> str | None:
    parts = domain.split(".")
    if parts[-1].isdigit():
        return f"domain name {host!r} invalid (top level domain {parts[-1]!r} cannot be all-numeric)"
    for i, label in enumerate(parts):
        if i == len(parts) - 1 and label == "":
            return None  # a trailing dot, as in "istio.io."
        if not _is_dns1123_label(label):
            return f"domain name {host!r} invalid (label {label!r} invalid)"
    return None


def _domain_preconditions(host: str) -> str | None:
    if not host:
        return "empty domain name not allowed"
    if len(host) > 255:
        return f"domain name {host[:32]!r}... too long (max 255)"
    return None


def _wildcard_domain_error(host: str) -> str | None:
    """Istio's ValidateWildcardDomain: a wildcard may only lead the first label."""
    error = _domain_preconditions(host)
    if error:
        return error
    first, dot, rest = host.partition(".")
    if len(first) > 63 or not _WILDCARD_LABEL.fullmatch(first):
        return f"domain name {host!r} invalid (label {first!r} invalid)"
    return _dns1123_labels_error(host, rest) if dot else None


def _fqdn_error(host: str) -> str | None:
    return _domain_preconditions(host) or _dns1123_labels_error(host, host)


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _is_ip_or_cidr(text: str) -> bool:
    try:
        ipaddress.ip_network(text, strict=False) if "/" in text else ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _label_key_error(key: str) -> str | None:
    prefix, slash, name = key.rpartition("/")
    if slash and not _is_dns1123_subdomain(prefix):
        return f"prefix {prefix!r} must be a lowercase RFC 1123 subdomain"
    if not 0 < len(name) <= 63 or not _QUALIFIED_NAME.fullmatch(name):
        return f"name {name!r} must be 1-63 alphanumeric characters, '-', '_' or '.'"
    return None


def _check_labels(labels: dict[str, str], path: str, out: _Issues) -> None:
    for key, value in labels.items():
        key_error = _label_key_error(key)
        if key_error:
            out.append((f"{path}[{key}]", f"invalid label key: {key_error}"))
        if len(value) > 63 or (value and not _QUALIFIED_NAME.fullmatch(value)):
            out.append((f"{path}[{key}]", f"invalid label value {value!r}: must be at most 63 "
                                          "alphanumeric characters, '-', '_' or '.'"))


def _check_port(number: int, path: str, out: _Issues) -> None:
    if not 1 <= number <= 65535:
        out.append((path, f"Invalid value: {number}: port must be between 1-65535"))


def _check_percent(value: float, path: str, out: _Issues) -> None:
    if not 0 <= value <= 100:
        out.append((path, f"Invalid value: {value}: must be between 0 and 100"))


def _check_regex(pattern: str, path: str, out: _Issues) -> None:
    if pattern == "":
        out.append((path, "regex string match should not be empty"))
        return
    try:
        re2_to_python(pattern)
    except ValueError as exc:
        out.append((path, str(exc)))


def _translate_re2_escapes(pattern: str) -> str:
    result: list[str] = []
    i = 0
    while i < len(pattern):
        if pattern[i] == "\\" and i + 1 < len(pattern):
            pair = pattern[i:i + 2]
            result.append("\\Z" if pair == "\\z" else pair)
            i += 2
        else:
            result.append(pattern[i])
            i += 1
    return "".join(result)


_RE2_UNSUPPORTED_OPS = {
    "ASSERT": "lookaround assertions", "ASSERT_NOT": "lookaround assertions",
    "GROUPREF": "backreferences", "GROUPREF_EXISTS": "conditional backreferences",
    "ATOMIC_GROUP": "atomic groups", "POSSESSIVE_REPEAT": "possessive quantifiers",
}
_RE2_MAX_REPEAT = 1000


def _re2_unsupported(tree: Any) -> str | None:
    for op, arg in tree:
        name = str(op)
        if name in _RE2_UNSUPPORTED_OPS:
            return _RE2_UNSUPPORTED_OPS[name]
        if name in ("MAX_REPEAT", "MIN_REPEAT"):
            low, high = arg[0], arg[1]
            if max(low, 0 if high == _sre_parse.MAXREPEAT else high) > _RE2_MAX_REPEAT:
                return f"repeat counts above {_RE2_MAX_REPEAT}"
        for child in _sub_patterns(arg):
            found = _re2_unsupported(child)
            if found:
                return found
    return None


def _sub_patterns(arg: Any) -> Iterable[Any]:
    if isinstance(arg, _sre_parse.SubPattern):
        yield arg
    elif isinstance(arg, (tuple, list)):
        for part in arg:
            yield from _sub_patterns(part)


def _check_header_name(name: str, path: str, out: _Issues) -> None:
    if not _HTTP_TOKEN.fullmatch(name.removeprefix(":")):
        out.append((path, f"invalid header name {name!r}"))


def _check_export_to(values: list[str], namespace: str, allow_none: bool, path: str,
                     out: _Issues) -> None:
    """Istio's validateExportTo: ".", "*", "~" (ServiceEntry only) or namespaces, no mixing."""
    seen: set[str] = set()
    for i, value in enumerate(values):
        resolved = namespace if value == "." else value
        if value == "~" and not allow_none:
            out.append((f"{path}[{i}]", 'exportTo "~" (none) is only allowed for ServiceEntry'))
        elif value not in (".", "*", "~") and not _is_dns1123_label(value):
            out.append((f"{path}[{i}]", f"invalid namespace {value!r}"))
        if resolved in seen:
            out.append((f"{path}[{i}]", f"duplicate entry {value!r}"))
        seen.add(resolved)
    if "*" in seen and len(seen) > 1:
        out.append((path, "cannot mix public (*) and other exportTo values"))
    if "~" in seen and len(seen) > 1:
        out.append((path, "cannot export to none (~) alongside other namespaces"))


def _host_matches(a: str, b: str) -> bool:
    """Whether two host patterns can name the same host (wildcards on either side)."""
    if a == b or a == "*" or b == "*":
        return True
    if a.startswith("*"):
        return b.endswith(a[1:]) or (b.startswith("*") and a.endswith(b[1:]))
    return b.startswith("*") and a.endswith(b[1:])


# --------------------------------------------------------------------------- VirtualService

_RETRY_ON = frozenset({
    "5xx", "gateway-error", "reset", "reset-before-request", "connect-failure",
    "envoy-ratelimited", "retriable-4xx", "refused-stream", "retriable-status-codes",
    "retriable-headers", "http3-post-connect-failure", "cancelled", "deadline-exceeded",
    "internal", "resource-exhausted", "unavailable",
})
_GRPC_STATUS = frozenset({
    "OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
    "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
    "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
    "UNAUTHENTICATED",
})
_HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"})
_MESH_GATEWAY = "mesh"


def _validate_virtual_service(spec: dict[str, Any], namespace: str, out: _Issues) -> None:
    hosts: list[str] = spec.get("hosts") or []
    gateways: list[str] = spec.get("gateways") or []
    applies_to_mesh = not gateways or _MESH_GATEWAY in gateways
    if not hosts:
        out.append(("spec.hosts", "Required value: virtual service must have at least one host"))
    for i, host in enumerate(hosts):
        path = f"spec.hosts[{i}]"
        if host == "*" and applies_to_mesh:
            out.append((path, "wildcard host * is not allowed for virtual services bound to the mesh gateway"))
        elif _wildcard_domain_error(host) and not _is_ip(host):
            out.append((path, _wildcard_domain_error(host) or ""))
        if host in hosts[:i]:
            out.append((path, f"Duplicate value: {host!r}"))
    for i, gateway in enumerate(gateways):
        _check_gateway_name(gateway, f"spec.gateways[{i}]", out)
    _check_export_to(spec.get("exportTo") or [], namespace, False, "spec.exportTo", out)
    if not (spec.get("http") or spec.get("tcp") or spec.get("tls")):
        out.append(("spec", "http, tcp or tls must be provided in virtual service"))
    for i, route in enumerate(spec.get("http") or []):
        _validate_http_route(route, f"spec.http[{i}]", out)
    for i, route in enumerate(spec.get("tcp") or []):
        path = f"spec.tcp[{i}]"
        for j, match in enumerate(route.get("match") or []):
            _validate_l4_match(match, f"{path}.match[{j}]", out)
        _validate_route_destinations(route.get("route") or [], f"{path}.route", out)
    for i, route in enumerate(spec.get("tls") or []):
        path = f"spec.tls[{i}]"
        for j, match in enumerate(route["match"]):
            _validate_tls_match(match, hosts, f"{path}.match[{j}]", out)
        _validate_route_destinations(route.get("route") or [], f"{path}.route", out)


def _check_gateway_name(name: str, path: str, out: _Issues) -> None:
    namespace, slash, gateway = name.rpartition("/")
    if name == _MESH_GATEWAY:
        return
    if (slash and not _is_dns1123_label(namespace)) or not _is_dns1123_subdomain(gateway):
        out.append((path, f"invalid gateway name {name!r}: must be [namespace/]name or \"mesh\""))


def _validate_http_route(route: dict[str, Any], path: str, out: _Issues) -> None:
    actions = [a for a in ("route", "redirect", "directResponse", "delegate") if route.get(a)]
    if not actions:
        out.append((path, "HTTP route, redirect, directResponse or delegate is required"))
    elif len(actions) > 1:
        out.append((path, f"only one of route, redirect, directResponse or delegate may be set"
                          f" (got {', '.join(actions)})"))
    terminal = next((a for a in ("redirect", "directResponse") if route.get(a)), None)
    if terminal:  # the proxy answers itself: nothing is rewritten or faulted
        for other in ("rewrite", "fault"):
            if route.get(other) is not None:
                out.append((f"{path}.{other}", f"cannot be combined with {terminal}"))
    for i, match in enumerate(route.get("match") or []):
        _validate_http_match(match, f"{path}.match[{i}]", out)
    _validate_route_destinations(route.get("route") or [], f"{path}.route", out, required=False)
    if "redirect" in route:
        _validate_redirect(route["redirect"], f"{path}.redirect", out)
    if "directResponse" in route:
        status = route["directResponse"]["status"]
        if not 200 <= status <= 599:
            out.append((f"{path}.directResponse.status", f"Invalid value: {status}: must be between 200 and 599"))
    if "rewrite" in route:
        _validate_rewrite(route["rewrite"], f"{path}.rewrite", out)
    if "fault" in route:
        _validate_fault(route["fault"], f"{path}.fault", out)
    if "retries" in route:
        _validate_retries(route["retries"], f"{path}.retries", out)
    if "corsPolicy" in route:
        _validate_cors(route["corsPolicy"], f"{path}.corsPolicy", out)
    if "headers" in route:
        _validate_header_ops(route["headers"], f"{path}.headers", out)
    _validate_mirrors(route, path, out)


def _validate_http_match(match: dict[str, Any], path: str, out: _Issues) -> None:
    for field in ("uri", "scheme", "method", "authority"):
        if field in match:
            _validate_string_match(match[field], f"{path}.{field}", out)
    for field in ("headers", "withoutHeaders", "queryParams"):
        for name, string_match in (match.get(field) or {}).items():
            if field != "queryParams":
                _check_header_name(name, f"{path}.{field}[{name}]", out)
            if string_match and "regex" in string_match:
                _check_regex(string_match["regex"], f"{path}.{field}[{name}].regex", out)
    if match.get("port"):
        _check_port(match["port"], f"{path}.port", out)
    _check_labels(match.get("sourceLabels") or {}, f"{path}.sourceLabels", out)
    for i, gateway in enumerate(match.get("gateways") or []):
        _check_gateway_name(gateway, f"{path}.gateways[{i}]", out)


def _validate_string_match(match: dict[str, Any], path: str, out: _Issues) -> None:
    if match.get("prefix") == "":
        out.append((f"{path}.prefix", "prefix string match should not be empty"))
    if "regex" in match:
        _check_regex(match["regex"], f"{path}.regex", out)


def _validate_l4_match(match: dict[str, Any], path: str, out: _Issues) -> None:
    if match.get("port"):
        _check_port(match["port"], f"{path}.port", out)
    for i, subnet in enumerate(match.get("destinationSubnets") or []):
        if not _is_ip_or_cidr(subnet):
            out.append((f"{path}.destinationSubnets[{i}]", f"Invalid value: {subnet!r}: not an IP address or CIDR"))
    _check_labels(match.get("sourceLabels") or {}, f"{path}.sourceLabels", out)
    for i, gateway in enumerate(match.get("gateways") or []):
        _check_gateway_name(gateway, f"{path}.gateways[{i}]", out)


def _validate_tls_match(match: dict[str, Any], hosts: list[str], path: str, out: _Issues) -> None:
    sni_hosts: list[str] = match["sniHosts"]
    if not sni_hosts:
        out.append((f"{path}.sniHosts", "Required value: TLS match must have at least one SNI host"))
    for i, sni in enumerate(sni_hosts):
        error = _wildcard_domain_error(sni)
        if error:
            out.append((f"{path}.sniHosts[{i}]", error))
        elif not any(_host_matches(sni, host) for host in hosts):
            out.append((f"{path}.sniHosts[{i}]", f"SNI host {sni!r} matches none of the virtual service hosts"))
    _validate_l4_match(match, path, out)


def _validate_route_destinations(routes: list[dict[str, Any]], path: str, out: _Issues,
                                 required: bool = True) -> None:
    if required and not routes:
        out.append((path, "Required value: at least one route destination"))
    for i, route in enumerate(routes):
        _validate_destination(route["destination"], f"{path}[{i}].destination", out)
        weight = route.get("weight", 0)
        if not 0 <= weight <= 100:
            out.append((f"{path}[{i}].weight", f"Invalid value: {weight}: must be between 0 and 100"))
        if "headers" in route:
            _validate_header_ops(route["headers"], f"{path}[{i}].headers", out)
    if len(routes) > 1 and sum(r.get("weight", 0) for r in routes) == 0:
        out.append((path, "total destination weight is 0: set a weight on the destinations"))


def _validate_destination(destination: dict[str, Any], path: str, out: _Issues) -> None:
    host = destination["host"]
    error = "invalid destination host *" if host == "*" else _wildcard_domain_error(host)
    if error:
        out.append((f"{path}.host", error))
    subset = destination.get("subset")
    if subset is not None and not _is_dns1123_label(subset):
        out.append((f"{path}.subset", f"Invalid value: {subset!r}: subset name must be an RFC 1123 label"))
    number = (destination.get("port") or {}).get("number")
    if number:
        _check_port(number, f"{path}.port.number", out)


def _validate_redirect(redirect: dict[str, Any], path: str, out: _Issues) -> None:
    if not any(redirect.get(f) for f in ("uri", "authority", "scheme", "port", "derivePort")):
        out.append((path, "redirect must specify uri, authority, scheme or port"))
    if redirect.get("port"):
        _check_port(redirect["port"], f"{path}.port", out)
    code = redirect.get("redirectCode")
    if code and not 300 <= code <= 399:
        out.append((f"{path}.redirectCode", f"Invalid value: {code}: must be a 3xx redirect code"))


def _validate_rewrite(rewrite: dict[str, Any], path: str, out: _Issues) -> None:
    if rewrite.get("uri") and rewrite.get("uriRegexRewrite"):
        out.append((path, "only one of uri or uriRegexRewrite may be set"))
    if not any(rewrite.get(f) for f in ("uri", "authority", "uriRegexRewrite")):
        out.append((path, "rewrite must specify uri, authority or uriRegexRewrite"))
    regex_rewrite = rewrite.get("uriRegexRewrite")
    if regex_rewrite:
        _check_regex(regex_rewrite.get("match", ""), f"{path}.uriRegexRewrite.match", out)


def _validate_fault(fault: dict[str, Any], path: str, out: _Issues) -> None:
    abort, delay = fault.get("abort"), fault.get("delay")
    if abort is None and delay is None:
        out.append((path, "fault must have an abort or a delay"))
    if abort is not None:
        if "httpStatus" in abort and not 200 <= abort["httpStatus"] <= 599:
            out.append((f"{path}.abort.httpStatus",
                        f"Invalid value: {abort['httpStatus']}: must be between 200 and 599"))
        if "grpcStatus" in abort and abort["grpcStatus"] not in _GRPC_STATUS:
            out.append((f"{path}.abort.grpcStatus", _unsupported(abort["grpcStatus"], sorted(_GRPC_STATUS))))
        if "http2Error" in abort:
            out.append((f"{path}.abort.http2Error", "HTTP/2 abort fault injection is not supported"))
        if not any(f in abort for f in ("httpStatus", "grpcStatus", "http2Error")):
            out.append((f"{path}.abort", "Required value: httpStatus or grpcStatus"))
        _check_fraction(abort, f"{path}.abort", out)
    if delay is not None:
        if "exponentialDelay" in delay:
            out.append((f"{path}.delay.exponentialDelay", "exponentialDelay is not supported"))
        elif "fixedDelay" not in delay:
            out.append((f"{path}.delay.fixedDelay", "Required value"))
        _check_fraction(delay, f"{path}.delay", out)


def _check_fraction(holder: dict[str, Any], path: str, out: _Issues) -> None:
    if "percentage" in holder:
        _check_percent(holder["percentage"].get("value", 0), f"{path}.percentage.value", out)
    if "percent" in holder:
        _check_percent(holder["percent"], f"{path}.percent", out)


def _validate_retries(retries: dict[str, Any], path: str, out: _Issues) -> None:
    if retries.get("attempts", 0) < 0:
        out.append((f"{path}.attempts", f"Invalid value: {retries['attempts']}: cannot be negative"))
    for policy in (retries.get("retryOn") or "").split(","):
        policy = policy.strip()
        if not policy or policy in _RETRY_ON:
            continue
        if not policy.isdigit():
            out.append((f"{path}.retryOn", f"{policy!r} is not a valid retryOn policy"))
        elif not 100 <= int(policy) <= 599:
            out.append((f"{path}.retryOn", f"{policy!r} is not a valid HTTP status code"))


def _validate_cors(cors: dict[str, Any], path: str, out: _Issues) -> None:
    for i, origin in enumerate(cors.get("allowOrigins") or []):
        if "regex" in origin:
            _check_regex(origin["regex"], f"{path}.allowOrigins[{i}].regex", out)
    for i, method in enumerate(cors.get("allowMethods") or []):
        if method not in _HTTP_METHODS:
            out.append((f"{path}.allowMethods[{i}]", _unsupported(method, sorted(_HTTP_METHODS))))
    for field in ("allowHeaders", "exposeHeaders"):
        for i, name in enumerate(cors.get(field) or []):
            _check_header_name(name, f"{path}.{field}[{i}]", out)
    max_age = cors.get("maxAge")
    if max_age and parse_duration_exact(max_age).denominator != 1:
        out.append((f"{path}.maxAge", "max_age is accurate only to seconds precision"))


def _validate_header_ops(headers: dict[str, Any], path: str, out: _Issues) -> None:
    for side in ("request", "response"):
        ops = headers.get(side) or {}
        for op in ("set", "add"):
            for name in ops.get(op) or {}:
                _check_header_name(name, f"{path}.{side}.{op}[{name}]", out)
        for i, name in enumerate(ops.get("remove") or []):
            _check_header_name(name, f"{path}.{side}.remove[{i}]", out)


def _validate_mirrors(route: dict[str, Any], path: str, out: _Issues) -> None:
    if route.get("mirror") and route.get("mirrors"):
        out.append((path, "only one of mirror or mirrors may be set"))
    if route.get("mirror"):
        _validate_destination(route["mirror"], f"{path}.mirror", out)
    if "mirrorPercentage" in route:
        _check_percent(route["mirrorPercentage"].get("value", 0), f"{path}.mirrorPercentage.value", out)
    for key in ("mirrorPercent", "mirror_percent"):
        if route.get(key) is not None:
            _check_percent(route[key], f"{path}.{key}", out)
    for i, mirror in enumerate(route.get("mirrors") or []):
        _validate_destination(mirror["destination"], f"{path}.mirrors[{i}].destination", out)
        if "percentage" in mirror:
            _check_percent(mirror["percentage"].get("value", 0), f"{path}.mirrors[{i}].percentage.value", out)


# --------------------------------------------------------------------------- DestinationRule

_HASH_KEYS = ("httpHeaderName", "httpCookie", "useSourceIp", "httpQueryParameterName")
_POLICY_FIELDS = ("loadBalancer", "connectionPool", "outlierDetection", "tls", "portLevelSettings",
                  "tunnel", "proxyProtocol", "retryBudget")
_NON_NEGATIVE_POOL_FIELDS = {
    "http": ("http1MaxPendingRequests", "http2MaxRequests", "maxRequestsPerConnection",
             "maxRetries", "maxConcurrentStreams"),
    "tcp": ("maxConnections",),
}


def _validate_destination_rule(spec: dict[str, Any], namespace: str, out: _Issues) -> None:
    host = spec["host"]
    error = _wildcard_domain_error(host)
    if error:
        out.append(("spec.host", error))
    if "trafficPolicy" in spec:
        _validate_traffic_policy(spec["trafficPolicy"], "spec.trafficPolicy", out)
    names: set[str] = set()
    for i, subset in enumerate(spec.get("subsets") or []):
        path = f"spec.subsets[{i}]"
        name = subset["name"]
        if not _is_dns1123_label(name):
            out.append((f"{path}.name", f"Invalid value: {name!r}: subset name must be an RFC 1123 label"))
        if name in names:
            out.append((f"{path}.name", f"Duplicate value: subset {name!r}"))
        names.add(name)
        _check_labels(subset.get("labels") or {}, f"{path}.labels", out)
        if "trafficPolicy" in subset:
            _validate_traffic_policy(subset["trafficPolicy"], f"{path}.trafficPolicy", out)
    _check_export_to(spec.get("exportTo") or [], namespace, False, "spec.exportTo", out)


def _validate_traffic_policy(policy: dict[str, Any], path: str, out: _Issues) -> None:
    if not any(policy.get(f) is not None for f in _POLICY_FIELDS):
        out.append((path, "traffic policy must have at least one field"))
    if "loadBalancer" in policy:
        _validate_load_balancer(policy["loadBalancer"], f"{path}.loadBalancer", out)
    if "connectionPool" in policy:
        _validate_connection_pool(policy["connectionPool"], f"{path}.connectionPool", out)
    if "outlierDetection" in policy:
        outlier = policy["outlierDetection"]
        for field in ("maxEjectionPercent", "minHealthPercent"):
            if field in outlier:
                _check_percent(outlier[field], f"{path}.outlierDetection.{field}", out)
        if outlier.get("consecutiveErrors", 0) < 0:
            out.append((f"{path}.outlierDetection.consecutiveErrors", "cannot be negative"))
    if "tls" in policy:
        tls = policy["tls"]
        if tls.get("mode") == "MUTUAL" and not tls.get("credentialName"):
            for field in ("clientCertificate", "privateKey"):
                if not tls.get(field):
                    out.append((f"{path}.tls.{field}", "Required value: needed for MUTUAL tls without credentialName"))
        if tls.get("credentialName"):
            out.append((f"{path}.tls.credentialName", "Unsupported value: credentialName names a Kubernetes Secret, "
                                                      "which raymesh does not have: give caCertificates, "
                                                      "clientCertificate and privateKey as files"))
    if "tunnel" in policy:
        _check_port(policy["tunnel"]["targetPort"], f"{path}.tunnel.targetPort", out)
    ports: set[int] = set()
    for i, setting in enumerate(policy.get("portLevelSettings") or []):
        setting_path = f"{path}.portLevelSettings[{i}]"
        number = (setting.get("port") or {}).get("number")
        if not number:
            out.append((f"{setting_path}.port.number", "Required value"))
        else:
            _check_port(number, f"{setting_path}.port.number", out)
            if number in ports:
                out.append((f"{setting_path}.port.number", f"Duplicate value: {number}"))
            ports.add(number)
        rest = {k: v for k, v in setting.items() if k != "port"}
        _validate_traffic_policy(rest, setting_path, out)


def _validate_load_balancer(lb: dict[str, Any], path: str, out: _Issues) -> None:
    consistent = lb.get("consistentHash")
    if consistent is not None:
        keys = [k for k in _HASH_KEYS if consistent.get(k) is not None]
        if len(keys) != 1:
            out.append((f"{path}.consistentHash",
                        f"exactly one of {', '.join(_HASH_KEYS)} must be set (got {len(keys)})"))
    locality = lb.get("localityLbSetting")
    if locality:
        _validate_locality_lb(locality, f"{path}.localityLbSetting", out)


def _validate_locality_lb(locality: dict[str, Any], path: str, out: _Issues) -> None:
    if locality.get("distribute") and locality.get("failover"):
        out.append((path, "only one of distribute or failover may be set"))
    for i, rule in enumerate(locality.get("distribute") or []):
        total = sum((rule.get("to") or {}).values())
        if total != 100:
            out.append((f"{path}.distribute[{i}].to", f"Invalid value: total weight {total}: must be 100"))
    for i, rule in enumerate(locality.get("failover") or []):
        source, target = rule.get("from", ""), rule.get("to", "")
        if source == target:
            out.append((f"{path}.failover[{i}]", "from and to must be different regions"))
        if "/" in source or "/" in target:
            out.append((f"{path}.failover[{i}]", "failover may only name regions"))


def _validate_connection_pool(pool: dict[str, Any], path: str, out: _Issues) -> None:
    if pool.get("http") is None and pool.get("tcp") is None:
        out.append((path, "connection pool must set http or tcp"))
    for side, fields in _NON_NEGATIVE_POOL_FIELDS.items():
        settings = pool.get(side) or {}
        for field in fields:
            if settings.get(field, 0) < 0:
                out.append((f"{path}.{side}.{field}", f"Invalid value: {settings[field]}: cannot be negative"))
    http = pool.get("http") or {}
    if http.get("h2UpgradePolicy") == "UPGRADE" and http.get("useClientProtocol"):
        out.append((f"{path}.http.useClientProtocol", "must not be true when h2UpgradePolicy is UPGRADE"))


# --------------------------------------------------------------------------- Gateway

_PROTOCOLS = ("HTTP", "HTTPS", "HTTP2", "GRPC", "GRPC-WEB", "HTTP_PROXY", "TCP", "TLS", "UDP",
              "MONGO", "REDIS", "MYSQL")
_TLS_PROTOCOLS = ("HTTPS", "TLS")
_HTTP_PROTOCOLS = ("HTTP", "HTTP2", "GRPC", "GRPC-WEB", "HTTP_PROXY")


def _validate_gateway(spec: dict[str, Any], namespace: str, out: _Issues) -> None:
    servers = spec.get("servers") or []
    if not servers:
        out.append(("spec.servers", "Required value: gateway must have at least one server"))
    _check_labels(spec.get("selector") or {}, "spec.selector", out)
    port_names: set[str] = set()
    for i, server in enumerate(servers):
        path = f"spec.servers[{i}]"
        port = server["port"]
        protocol = port["protocol"].upper()
        if protocol not in _PROTOCOLS:
            out.append((f"{path}.port.protocol", _unsupported(port["protocol"], _PROTOCOLS)))
        if not server.get("bind", "").startswith("unix://"):
            _check_port(port["number"], f"{path}.port.number", out)
        if port.get("targetPort"):
            _check_port(port["targetPort"], f"{path}.port.targetPort", out)
        if port["name"] in port_names:
            out.append((f"{path}.port.name", f"Duplicate value: port names in servers must be unique ({port['name']!r})"))
        port_names.add(port["name"])
        if not server["hosts"]:
            out.append((f"{path}.hosts", "Required value: server must have at least one host"))
        for j, host in enumerate(server["hosts"]):
            error = _gateway_host_error(host)
            if error:
                out.append((f"{path}.hosts[{j}]", error))
        bind = server.get("bind")
        if bind and not bind.startswith("unix://") and not _is_ip(bind):
            out.append((f"{path}.bind", f"Invalid value: {bind!r}: must be an IP address or unix:// path"))
        tls = server.get("tls")
        if protocol in _TLS_PROTOCOLS and tls is None:
            out.append((f"{path}.tls", f"Required value: {protocol} servers need TLS settings"))
        elif tls is not None and protocol not in _TLS_PROTOCOLS and not tls.get("httpsRedirect"):
            kind = "plain text HTTP" if protocol in _HTTP_PROTOCOLS else "non HTTPS/TLS"
            out.append((f"{path}.tls", f"server cannot have TLS settings for {kind} ports"))
        if tls is not None:
            _validate_server_tls(tls, f"{path}.tls", out)


def _gateway_host_error(host: str) -> str | None:
    """``[namespace/]dnsName``; the namespace may be ``*`` or ``.``."""
    namespace, slash, name = host.partition("/")
    if not slash:
        return _wildcard_domain_error(host)
    if not namespace or not name:
        return "namespace and dnsName in host entry cannot be empty"
    if namespace not in ("*", ".") and not _is_dns1123_label(namespace):
        return f"invalid namespace {namespace!r} in host"
    return _wildcard_domain_error(name)


def _validate_server_tls(tls: dict[str, Any], path: str, out: _Issues) -> None:
    mode = tls.get("mode", "PASSTHROUGH")
    cert_fields = ("serverCertificate", "privateKey", "caCertificates", "credentialName")
    if mode == "ISTIO_MUTUAL":
        for field in cert_fields:
            if tls.get(field):
                out.append((f"{path}.{field}", "cannot be set with ISTIO_MUTUAL tls"))
        return
    if mode not in ("SIMPLE", "MUTUAL", "OPTIONAL_MUTUAL"):
        return
    if tls.get("credentialName") or tls.get("credentialNames") or tls.get("tlsCertificates"):
        return  # certificates come from a secret
    required = ["serverCertificate", "privateKey"]
    if mode != "SIMPLE":
        required.append("caCertificates")
    for field in required:
        if not tls.get(field):
            out.append((f"{path}.{field}", f"Required value: needed for {mode} tls without credentialName"))


# --------------------------------------------------------------------------- ServiceEntry

def _validate_service_entry(spec: dict[str, Any], namespace: str, out: _Issues) -> None:
    for i, host in enumerate(spec["hosts"]):
        error = _wildcard_domain_error(host)
        if error:
            out.append((f"spec.hosts[{i}]", error))
    for i, address in enumerate(spec.get("addresses") or []):
        if not _is_ip_or_cidr(address):
            out.append((f"spec.addresses[{i}]", f"Invalid value: {address!r}: not an IP address or CIDR"))
    port_names: set[str] = set()
    for i, port in enumerate(spec.get("ports") or []):
        path = f"spec.ports[{i}]"
        port_names.add(port["name"])
        if not _is_dns1123_label(port["name"]):
            out.append((f"{path}.name", f"Invalid value: {port['name']!r}: port name must be an RFC 1123 label"))
        protocol = port.get("protocol")
        if protocol and protocol.upper() not in _PROTOCOLS:
            out.append((f"{path}.protocol", _unsupported(protocol, _PROTOCOLS)))
    resolution = spec.get("resolution") or "NONE"
    endpoints = spec.get("endpoints") or []
    if resolution == "STATIC" and not endpoints and spec.get("workloadSelector") is None:
        out.append(("spec.endpoints", "Required value: STATIC resolution needs endpoints or a workloadSelector"))
    if resolution in ("DNS", "DNS_ROUND_ROBIN") and not endpoints:
        for i, host in enumerate(spec["hosts"]):
            if _fqdn_error(host):
                out.append((f"spec.hosts[{i}]", f"hosts must be FQDNs when {resolution} resolution has no endpoints"))
    for i, endpoint in enumerate(endpoints):
        _validate_endpoint(endpoint, resolution, port_names, f"spec.endpoints[{i}]", out)
    _check_export_to(spec.get("exportTo") or [], namespace, True, "spec.exportTo", out)
    for i, san in enumerate(spec.get("subjectAltNames") or []):
        if not san:
            out.append((f"spec.subjectAltNames[{i}]", "must not be empty"))


def _validate_endpoint(endpoint: dict[str, Any], resolution: str, port_names: set[str],
                       path: str, out: _Issues) -> None:
    address = endpoint.get("address")
    if address and not address.startswith("unix://") and not _is_ip(address):
        if resolution == "STATIC":
            out.append((f"{path}.address", f"Invalid value: {address!r}: STATIC resolution needs an IP address"))
        elif _fqdn_error(address):
            out.append((f"{path}.address", f"Invalid value: {address!r}: not an IP address or FQDN"))
    for name in endpoint.get("ports") or {}:
        if name not in port_names:
            out.append((f"{path}.ports[{name}]", "endpoint port is not defined by the service entry"))
    _check_labels(endpoint.get("labels") or {}, f"{path}.labels", out)


# --------------------------------------------------------------------------- WorkloadEntry

def _validate_workload_entry(spec: dict[str, Any], namespace: str, out: _Issues) -> None:
    address = spec.get("address")
    if address and not address.startswith("unix://") and not _is_ip(address) and _fqdn_error(address):
        out.append(("spec.address", f"Invalid value: {address!r}: not an IP address, FQDN or unix:// path"))
    for name in spec.get("ports") or {}:
        if not _is_dns1123_label(name):
            out.append((f"spec.ports[{name}]", "port name must be an RFC 1123 label"))
    _check_labels(spec.get("labels") or {}, "spec.labels", out)




# --------------------------------------------------------------------------- PeerAuthentication

def _validate_peer_authentication(spec: dict[str, Any], namespace: str, out: _Issues) -> None:
    """Nothing beyond the CRD: Istio's ValidatePeerAuthentication checks port-level mTLS keys
    (1-65535), that it is not empty and that it comes with a selector, and that selector labels
    hold no wildcard; the CRD's ``minProperties`` and CEL rules enforce all of it first."""


# --------------------------------------------------------------------------- policy targets

# PolicyTargetReference may name these (group, kind); "" and "core" are the core group.
_POLICY_TARGETS = (("core", "Service"), ("networking.istio.io", "ServiceEntry"),
                   ("gateway.networking.k8s.io", "Gateway"), ("gateway.networking.k8s.io", "GatewayClass"))


def _validate_policy_targets(spec: dict[str, Any], out: _Issues) -> None:
    refs = [("spec.targetRef", spec["targetRef"])] if spec.get("targetRef") else []
    refs += [(f"spec.targetRefs[{i}]", ref) for i, ref in enumerate(spec.get("targetRefs") or [])]
    for path, ref in refs:
        group = ref.get("group") or "core"
        if (group, ref["kind"]) not in _POLICY_TARGETS:
            allowed = ", ".join(f"{g}/{k}" for g, k in _POLICY_TARGETS)
            out.append((f"{path}.kind", f"Unsupported value: {ref.get('group', '')}/{ref['kind']}: "
                                        f"targetRef must be to one of {allowed}"))


# --------------------------------------------------------------------------- RequestAuthentication

def _validate_request_authentication(spec: dict[str, Any], namespace: str, out: _Issues) -> None:
    _validate_policy_targets(spec, out)
    for i, rule in enumerate(spec.get("jwtRules") or []):
        _validate_jwt_rule(rule, f"spec.jwtRules[{i}]", out)


def _validate_jwt_rule(rule: dict[str, Any], path: str, out: _Issues) -> None:
    uri_field = "jwksUri" if rule.get("jwksUri") else "jwks_uri"
    uri = rule.get(uri_field) or ""
    if not rule.get("issuer") and not uri:
        out.append((f"{path}.issuer", "Required value: issuer or jwksUri must be non-empty string"))
    if uri:
        error = _jwks_uri_port_error(uri)
        if error:
            out.append((f"{path}.{uri_field}", f"Invalid value: {uri!r}: {error}"))
    if rule.get("jwks"):
        error = _jwks_error(rule["jwks"])
        if error:
            out.append((f"{path}.jwks", f"jwks parse error: {error}"))
    for i, header in enumerate(rule.get("fromHeaders") or []):
        _check_envoy_header_name(header["name"], f"{path}.fromHeaders[{i}].name", out)
    if rule.get("outputPayloadToHeader"):
        _check_envoy_header_name(rule["outputPayloadToHeader"], f"{path}.outputPayloadToHeader", out)


def _jwks_uri_port_error(uri: str) -> str | None:
    """Istio's ParseJwksURI: a port after the host must be a number (the CRD checks the scheme)."""
    authority = uri.split("://", 1)[-1].split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]
    host = authority.rpartition("@")[2]
    port = host.rpartition("]")[2] if host.startswith("[") else host
    _, colon, number = port.rpartition(":")
    if colon and number and not (number.isascii() and number.isdigit()):
        return f"invalid port {':' + number!r} after host"
    return None


def _jwks_error(text: str) -> str | None:
    """A JSON Web Key or key set (RFC 7517): JSON, an object, every key naming its ``kty``."""
    try:
        document = json.loads(text)
    except ValueError as exc:
        return f"invalid JSON: {exc}"
    if not isinstance(document, dict):
        return "a JWK or JWK set must be a JSON object"
    keys = document["keys"] if "keys" in document else [document]
    if not isinstance(keys, list):
        return '"keys" must be an array'
    for i, key in enumerate(keys):
        if not isinstance(key, dict) or not isinstance(key.get("kty"), str) or not key["kty"]:
            return f"key {i} has no \"kty\""
    return None


def _check_envoy_header_name(name: str, path: str, out: _Issues) -> None:
    """Envoy rejects (NACKs) header names holding NUL, CR or LF (HTTP_HEADER_NAME, strict=false)."""
    if any(c in name for c in "\0\r\n"):
        out.append((path, f"invalid header name {name!r}: must not contain NUL, CR or LF"))


# --------------------------------------------------------------------------- AuthorizationPolicy

_SOURCE_FIELDS = ("principals", "requestPrincipals", "namespaces", "serviceAccounts", "ipBlocks",
                  "remoteIpBlocks", "trustDomains", "notPrincipals", "notRequestPrincipals",
                  "notNamespaces", "notServiceAccounts", "notIpBlocks", "notRemoteIpBlocks",
                  "notTrustDomains")
_IP_FIELDS = ("ipBlocks", "notIpBlocks", "remoteIpBlocks", "notRemoteIpBlocks")
_OPERATION_FIELDS = ("hosts", "ports", "methods", "paths", "notHosts", "notPorts", "notMethods", "notPaths")
# Source fields and condition keys an ext_authz (CUSTOM) provider cannot be given.
_CUSTOM_UNSUPPORTED_SOURCES = ("namespaces", "notNamespaces", "serviceAccounts", "notServiceAccounts",
                               "principals", "notPrincipals", "requestPrincipals", "notRequestPrincipals")
_CUSTOM_UNSUPPORTED_KEYS = ("source.namespace", "source.serviceAccount", "source.principal")
_PATH_LITERAL = re.compile(r"[a-zA-Z0-9\-._~%!$&'()+,;:@=]+")  # RFC 3986 pchar, less "*"


def _validate_authorization_policy(spec: dict[str, Any], namespace: str, out: _Issues) -> None:
    _validate_policy_targets(spec, out)
    action = spec.get("action") or "ALLOW"
    rules: list[dict[str, Any]] = spec.get("rules") or []
    if action in ("CUSTOM", "DENY") and not rules:
        out.append(("spec.rules", f"Required value: {action} action without `rules` is meaningless as it will "
                                  "never be triggered, add an empty rule `{}` if you want it be triggered "
                                  "for every request"))
    if action == "CUSTOM" and rules and not (spec.get("provider") or {}).get("name"):
        out.append(("spec.provider.name", "Required value: `provider.name` must not be empty"))
    if spec.get("provider") is not None and action != "CUSTOM":
        out.append(("spec.provider", f"`provider` must not be with non CUSTOM action, found {action}"))
    for i, rule in enumerate(rules):
        path = f"spec.rules[{i}]"
        for j, source in enumerate(rule.get("from") or []):
            _validate_source(source.get("source"), action, f"{path}.from[{j}].source", out)
        for j, operation in enumerate(rule.get("to") or []):
            _validate_operation(operation.get("operation"), f"{path}.to[{j}].operation", out)
        for j, condition in enumerate(rule.get("when") or []):
            _validate_condition(condition, action, f"{path}.when[{j}]", out)


def _validate_source(source: dict[str, Any] | None, action: str, path: str, out: _Issues) -> None:
    if source is None:
        out.append((path, "Required value: `from.source` must not be nil"))
        return
    if not any(source.get(f) for f in _SOURCE_FIELDS):
        out.append((path, "`from.source` must not be empty"))
    for field in _SOURCE_FIELDS:
        _check_no_empty_values(source.get(field) or [], f"{path}.{field}", out)
    for fields, check in ((_IP_FIELDS, _ip_or_cidr_error),
                          (("serviceAccounts", "notServiceAccounts"), _service_account_error)):
        for field in fields:
            for k, value in enumerate(source.get(field) or []):
                if value and (error := check(value)):
                    out.append((f"{path}.{field}[{k}]", error))
    if action == "CUSTOM":
        for field in _CUSTOM_UNSUPPORTED_SOURCES:
            if source.get(field):
                out.append((f"{path}.{field}", "is currently not supported with CUSTOM action"))


def _validate_operation(operation: dict[str, Any] | None, path: str, out: _Issues) -> None:
    if operation is None:
        out.append((path, "Required value: `to.operation` must not be nil"))
        return
    if not any(operation.get(f) for f in _OPERATION_FIELDS):
        out.append((path, "`to.operation` must not be empty"))
    for field in _OPERATION_FIELDS:
        _check_no_empty_values(operation.get(field) or [], f"{path}.{field}", out)
    for field in ("ports", "notPorts"):
        for k, port in enumerate(operation.get(field) or []):
            if port and (error := _port_string_error(port)):
                out.append((f"{path}.{field}[{k}]", error))
    for field in ("paths", "notPaths"):
        for k, value in enumerate(operation.get(field) or []):
            error = _path_template_error(value)
            if error:
                out.append((f"{path}.{field}[{k}]", error))


def _validate_condition(condition: dict[str, Any], action: str, path: str, out: _Issues) -> None:
    key: str = condition["key"]
    if not key:
        out.append((f"{path}.key", "Required value: `key` must not be empty"))
        return
    if action == "CUSTOM" and (key in _CUSTOM_UNSUPPORTED_KEYS or key.startswith("request.auth.")):
        out.append((f"{path}.key", f"{key} is currently not supported with CUSTOM action"))
    if not condition.get("values") and not condition.get("notValues"):
        out.append((path, f"at least one of `values` or `notValues` must be set for key {key}"))
        return
    key_error = _attribute_key_error(key)
    if key_error:
        out.append((f"{path}.key", key_error))
        return
    for field in ("values", "notValues"):
        for i, value in enumerate(condition.get(field) or []):
            error = _attribute_value_error(key, value)
            if error:
                out.append((f"{path}.{field}[{i}]", error))


def _check_no_empty_values(values: list[str], path: str, out: _Issues) -> None:
    for i, value in enumerate(values):
        if value == "":
            out.append((f"{path}[{i}]", "empty value not allowed"))


def _ip_or_cidr_error(text: str) -> str | None:
    """Go's netip.ParseAddr / ParsePrefix, which Istio's ValidateIPs uses."""
    if "/" in text:
        address, _, bits = text.partition("/")
        if "%" in address or not _is_ip(address):
            return f"bad CIDR range ({text}): bad address"
        if not (bits.isascii() and bits.isdigit()) or (len(bits) > 1 and bits[0] == "0"):
            return f"bad CIDR range ({text}): bad bits after slash"
        if int(bits) > ipaddress.ip_address(address).max_prefixlen:
            return f"bad CIDR range ({text}): prefix length out of range"
        return None
    return None if _is_ip(text) else f"bad IP address ({text})"


def _port_string_error(text: str) -> str | None:
    """Istio's ValidatePorts: a decimal number 0-65535."""
    if not text.isascii() or not text.isdigit() or int(text) > 65535:
        return f"bad port ({text}): must be a number between 0 and 65535"
    return None


def _service_account_error(value: str) -> str | None:
    """Istio's CheckServiceAccount: ``serviceAccount`` or ``namespace/serviceAccount``, no wildcard."""
    if "*" in value:
        return "wildcard not allowed"
    namespace, slash, account = value.rpartition("/")
    if value.count("/") > 1 or (slash and not namespace) or not account:
        return f"expected format 'serviceAccount' or 'namespace/serviceAccount', found {value!r}"
    return None


def _path_template_error(path: str) -> str | None:
    """Istio's CheckValidPathTemplate: ``{*}`` and a final ``{**}`` segment, literals elsewhere."""
    templated = "{*}" in path or "{**}" in path
    seen_any = False
    for segment in path.strip("/").split("/"):
        if segment in ("{*}", "{**}"):
            if seen_any:
                return f"invalid or unsupported path {path}: {{**}} is not the last operator"
            seen_any = seen_any or segment == "{**}"
            continue
        if "{" in segment or "}" in segment:
            return f"invalid or unsupported path {path}: contains '{{' or '}}' beyond a supported path template"
        if templated and not _PATH_LITERAL.fullmatch(segment):
            return f"invalid or unsupported path {path}: segment {segment!r} is not a valid literal"
    return None


def _any_value(value: str) -> None:
    """Keys whose values are matched as strings (exact, prefix or suffix) take any value."""


# Condition keys (Istio's security.ValidateAttribute), by the check their values get.
_MAP_KEY_PREFIXES = ("request.headers", "request.experimental.inline.headers", "request.auth.claims",
                     "experimental.envoy.filters.")
_VALUE_CHECKS: dict[str, Callable[[str], str | None]] = {
    "source.ip": _ip_or_cidr_error,
    "remote.ip": _ip_or_cidr_error,
    "destination.ip": _ip_or_cidr_error,
    "destination.port": _port_string_error,
    "source.serviceAccount": _service_account_error,
    **dict.fromkeys(("source.namespace", "source.principal", "source.trustDomain", "request.auth.principal",
                     "request.auth.audiences", "request.auth.presenter", "connection.sni"), _any_value),
}
_RETIRED_KEYS = {
    "destination.namespace": "attribute destination.namespace is replaced by the metadata.namespace",
    "destination.name": "deprecated attribute destination.name: only supported in v1alpha1",
    "destination.user": "deprecated attribute destination.user: only supported in v1alpha1",
}


def _attribute_key_error(key: str) -> str | None:
    if key.startswith(_MAP_KEY_PREFIXES):
        open_at = key.find("[")
        ok = key.endswith("]") and 0 < open_at < len(key) - 2
        return None if ok else f"bad key ({key}): should have format a[b]"
    if key in _VALUE_CHECKS:
        return None
    if key in _RETIRED_KEYS:
        return _RETIRED_KEYS[key]
    if key.startswith("destination.labels"):
        return f"attribute {key} is replaced by the workload selector"
    return f"unknown attribute: {key}"


def _attribute_value_error(key: str, value: str) -> str | None:
    if not value:
        return "empty value not allowed"
    check = _VALUE_CHECKS.get(key)
    return check(value) if check else None


# --------------------------------------------------------------------------- RateLimitPolicy

# What a RateLimitPolicy or CachePolicy may target: services, registry or ServiceEntry ones.
_RATE_LIMIT_TARGETS = (("core", "Service"), ("networking.istio.io", "ServiceEntry"))


def _validate_service_targets(spec: dict[str, Any], out: _Issues) -> None:
    """raymesh's policies name services one way: ``targetRefs`` to Services or ServiceEntries,
    or ``hosts`` that are service names (no wildcards, no IPs, no duplicates)."""
    refs: list[dict[str, Any]] = spec.get("targetRefs") or []
    hosts: list[str] = spec.get("hosts") or []
    if bool(refs) == bool(hosts):
        out.append(("spec", "exactly one of targetRefs or hosts must be set"))
    for i, ref in enumerate(refs):
        group = ref.get("group") or "core"
        if (group, ref["kind"]) not in _RATE_LIMIT_TARGETS:
            allowed = ", ".join(f"{g}/{k}" for g, k in _RATE_LIMIT_TARGETS)
            out.append((f"spec.targetRefs[{i}].kind", f"Unsupported value: {ref.get('group', '')}/{ref['kind']}: "
                                                      f"targetRef must be to one of {allowed}"))
    for i, host in enumerate(hosts):
        path = f"spec.hosts[{i}]"
        if "*" in host:
            out.append((path, f"Invalid value: {host!r}: wildcard hosts are not supported; name services"))
        elif _is_ip(host):
            out.append((path, f"Invalid value: {host!r}: an IP address is not a service host"))
        elif error := _fqdn_error(host):
            out.append((path, f"Invalid value: {host!r}: {error}"))
        if host in hosts[:i]:
            out.append((path, f"Duplicate value: {host!r}"))


def _validate_rate_limit_policy(spec: dict[str, Any], namespace: str, out: _Issues) -> None:
    """raymesh's RateLimitPolicy: the schema checks types, ranges and durations (>= 1ms);
    this checks what a schema cannot say: one way to name the services, hosts that are
    service names, a bucket somewhere, route selectors that can match."""
    _validate_service_targets(spec, out)
    if "local" not in spec and "global" not in spec:
        out.append(("spec", "Required value: at least one of local or global must be set"))
    if "global" in spec:
        _validate_global_rate_limit(spec["global"], out)
    if "local" in spec:
        _validate_local_rate_limit(spec["local"], out)


def _validate_local_rate_limit(local: dict[str, Any], out: _Issues) -> None:
    routes: list[dict[str, Any]] = local.get("routes") or []
    if "tokenBucket" not in local and not routes:
        out.append(("spec.local", "Required value: at least one of tokenBucket or routes must be set"))
    names: list[str] = []
    for i, route in enumerate(routes):
        path = f"spec.local.routes[{i}]"
        if ("name" in route) == ("match" in route):
            out.append((path, "exactly one of name or match must be set"))
        if "name" in route:
            if route["name"] in names:
                out.append((f"{path}.name", f"Duplicate value: {route['name']!r}"))
            names.append(route["name"])
        if "match" in route:
            _validate_rate_limit_match(route["match"], f"{path}.match", out)


# A global descriptor entry's sources (Envoy rate limit actions); exactly one per entry.
_DESCRIPTOR_SOURCES = ("path", "header", "remoteAddress", "sourcePrincipal", "destination")


def _validate_global_rate_limit(glob: dict[str, Any], out: _Issues) -> None:
    """What the schema cannot say about ``global``: one source per entry, string matches that
    can match, IP addresses where an address is matched, and no descriptor that an earlier one
    with the same entries makes unreachable."""
    seen: list[list[dict[str, Any]]] = []
    for i, descriptor in enumerate(glob["descriptors"]):
        path = f"spec.global.descriptors[{i}]"
        entries: list[dict[str, Any]] = descriptor["entries"]
        for j, entry in enumerate(entries):
            epath = f"{path}.entries[{j}]"
            sources = [k for k in _DESCRIPTOR_SOURCES if k in entry]
            if len(sources) != 1:
                out.append((epath, "exactly one of " + ", ".join(_DESCRIPTOR_SOURCES) + " must be set"
                            + (f"; found {', '.join(sources)}" if sources else "")))
                continue
            source = sources[0]
            match: dict[str, Any] = entry[source]
            _validate_string_match(match, f"{epath}.{source}", out)
            if source == "header":
                _check_header_name(match["name"], f"{epath}.header.name", out)
            if source == "remoteAddress" and "exact" in match and not _is_ip(match["exact"]):
                out.append((f"{epath}.remoteAddress.exact", f"Invalid value: {match['exact']!r}: not an IP address"))
        if entries in seen:
            out.append((f"{path}.entries", f"Duplicate value: descriptors[{seen.index(entries)}] has the same "
                                           "entries, so this one never applies"))
        seen.append(entries)


def _validate_rate_limit_match(match: dict[str, Any], path: str, out: _Issues) -> None:
    for field in ("uri", "method"):
        if field in match:
            _validate_string_match(match[field], f"{path}.{field}", out)
    for field in ("headers", "queryParams"):
        for name, string_match in (match.get(field) or {}).items():
            if field == "headers":
                _check_header_name(name, f"{path}.{field}[{name}]", out)
            if string_match and "regex" in string_match:
                _check_regex(string_match["regex"], f"{path}.{field}[{name}].regex", out)


# --------------------------------------------------------------------------- CachePolicy

DEFAULT_CACHE_MAX_BYTES = 64 * 1024 * 1024
DEFAULT_CACHE_MAX_ENTRY_BYTES = 1024 * 1024


def _validate_cache_policy(spec: dict[str, Any], namespace: str, out: _Issues) -> None:
    """raymesh's CachePolicy: the schema checks types and ranges; this checks the services it
    names, that one entry fits the whole cache (defaults included), and ``defaultTtl``."""
    _validate_service_targets(spec, out)
    max_bytes = spec.get("maxBytes", DEFAULT_CACHE_MAX_BYTES)
    max_entry = spec.get("maxEntryBytes", DEFAULT_CACHE_MAX_ENTRY_BYTES)
    if max_entry > max_bytes:
        out.append(("spec.maxEntryBytes", f"Invalid value: {max_entry}: must not exceed maxBytes ({max_bytes})"))
    if "defaultTtl" in spec:
        ttl = spec["defaultTtl"]
        try:
            seconds = parse_duration_exact(ttl)
        except DurationError:
            out.append(("spec.defaultTtl", f"Invalid value: {ttl!r}: not a duration (e.g. 30s, 5m)"))
            return
        if seconds < 0:
            out.append(("spec.defaultTtl", f"Invalid value: {ttl!r}: must not be negative"))
        elif (seconds * 1000).denominator != 1:
            out.append(("spec.defaultTtl", f"Invalid value: {ttl!r}: only durations to ms precision are supported"))


# --------------------------------------------------------------------------- Telemetry


def _validate_telemetry(spec: dict[str, Any], namespace: str, out: _Issues) -> None:
    """Istio's ValidateTelemetry, less what the CRD already enforces (selector vs targetRefs,
    provider names, metric enum, non-empty customMetric, sampling 0-100, tag override
    operation vs value when the operation is written out)."""
    _validate_policy_targets(spec, out)
    for i, metrics in enumerate(spec.get("metrics") or []):
        for j, override in enumerate(metrics.get("overrides") or []):
            path = f"spec.metrics[{i}].overrides[{j}].tagOverrides"
            for tag, change in (override.get("tagOverrides") or {}).items():
                _validate_tag_override(tag, change, f"{path}[{tag}]", out)
    for i, logging in enumerate(spec.get("accessLogging") or []):
        expression = (logging.get("filter") or {}).get("expression")
        if logging.get("filter") is not None and not expression:
            out.append((f"spec.accessLogging[{i}].filter.expression",
                        "Required value: filter expression must not be empty"))
        elif expression:
            try:
                parse_filter(str(expression))
            except ExpressionError as exc:
                out.append((f"spec.accessLogging[{i}].filter.expression", f"unsupported by raymesh: {exc}"))
    for i, tracing in enumerate(spec.get("tracing") or []):
        for tag in tracing.get("customTags") or {}:
            if not tag:
                out.append((f"spec.tracing[{i}].customTags", "tag name may not be empty"))


def _validate_tag_override(tag: str, change: dict[str, Any], path: str, out: _Issues) -> None:
    # Tag names are not checked further: Istio accepts any (it only warns on an empty one).
    # An unset operation is UPSERT (the proto's zero value), which the CEL rule does not see.
    if "operation" not in change and not change.get("value"):
        out.append((f"{path}.value", "Required value: value must be set when operation is UPSERT"))
    elif change.get("operation", "UPSERT") == "UPSERT" and change.get("value"):
        try:
            parse_value(str(change["value"]))
        except ExpressionError as exc:
            out.append((f"{path}.value", f"unsupported by raymesh: {exc}"))


_SEMANTIC_RULES: dict[str, Callable[[dict[str, Any], str, _Issues], None]] = {
    "VirtualService": _validate_virtual_service,
    "DestinationRule": _validate_destination_rule,
    "Gateway": _validate_gateway,
    "ServiceEntry": _validate_service_entry,
    "WorkloadEntry": _validate_workload_entry,
    "PeerAuthentication": _validate_peer_authentication,
    "RequestAuthentication": _validate_request_authentication,
    "AuthorizationPolicy": _validate_authorization_policy,
    "Telemetry": _validate_telemetry,
    "RateLimitPolicy": _validate_rate_limit_policy,
    "CachePolicy": _validate_cache_policy,
}
