"""meshctl: the mesh's command line, shaped after istioctl and kubectl.

Offline (no cluster needed)::

    meshctl validate -f FILE|DIR|-
    meshctl analyze --offline -f FILE|DIR|-

Against a running cluster (``ray.init(address="auto")``, so it also works as
``ray job submit -- meshctl apply -f x.yaml``)::

    meshctl apply -f FILE|DIR|-        meshctl delete -f FILE|DIR|-   |  meshctl delete KIND NAME [-n NS]
    meshctl get KIND [NAME] [-n NS] [-o yaml|json]      (Secrets: never their data, -o yaml/json says REDACTED)
    meshctl create secret tls NAME --cert FILE --key FILE [--ca FILE] [-n istio-system]
    meshctl proxy-status
    meshctl proxy-config listeners|routes|clusters|endpoints|all PROXY [-o table|json|yaml]
    meshctl analyze [-f FILE|DIR|-] [-n NS | -A]    (the stored configuration, plus files as if applied)
    meshctl telemetry query [--group-by COLS] [--where COL=V] [-o table|json|parquet --file F [--raw]]

Exit status: 0 on success, 1 when the mesh rejected the request (invalid configuration,
unknown kind), 2 on usage errors; ``analyze`` exits 79 (as istioctl does) when it finds
an issue at or above ``--failure-threshold``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence, TextIO

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from mesh.analyze import LEVELS, MESSAGE_TYPES, SCHEMA_VALIDATION_ERROR, Message, analyze, at_least, with_references
from mesh.compiler_gateways import GATEWAY_NAMESPACE
from mesh.compiler_services import build_service_index, resources_by_kind
from mesh.errors import MeshError
from mesh.proxy_config import HEADERS as PROXY_CONFIG_HEADERS
from mesh.proxy_config import SECTIONS
from mesh.proxy_config import rows as proxy_config_rows
from mesh.proxy_config import section as proxy_config_section
from mesh.identity import IdentityError, load_certs
from mesh.loader import Document, LoadError, load_documents
from mesh.registry import RegistryState
from mesh.resources import Resource, ResourceKey
from mesh.secrets import SECRET_KIND, secret_document
from mesh.validation import json_shaped, validate_document, validate_documents

Handler = Callable[[argparse.Namespace, TextIO], int]


def _add_files(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("-f", "--filename", action="append", required=required, default=None,
                   help="file, directory or - for stdin (repeatable)")


def build_parser(extend: Callable[[Any], None] | None = None) -> argparse.ArgumentParser:
    """The meshctl parser; ``extend(subparsers)`` lets a caller add commands (install, ...)."""
    parser = argparse.ArgumentParser(prog="meshctl", description="Operate a raymesh service mesh on Ray.")
    parser.add_argument("--address", default="auto", help="Ray cluster address (default: auto)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("validate", help="validate configuration offline")
    _add_files(p)
    p.set_defaults(handler=cmd_validate)

    p = sub.add_parser("analyze", help="find configuration that is valid but probably wrong (istioctl analyze)")
    _add_files(p, required=False)
    p.add_argument("--offline", action="store_true",
                   help="analyze only the files, without a cluster (checks needing the registry are skipped)")
    p.add_argument("-n", "--namespace", default=None, help="namespace to report on (default: default)")
    p.add_argument("-A", "--all-namespaces", action="store_true")
    p.add_argument("-o", "--output", choices=("log", "json", "yaml"), default="log")
    p.add_argument("--failure-threshold", choices=LEVELS, default="Error",
                   help="the level at which the exit status becomes 79 (default Error)")
    p.add_argument("--output-threshold", choices=LEVELS, default="Info",
                   help="the lowest level printed (default Info)")
    p.add_argument("-L", "--list-analyzers", action="store_true", help="list the messages analysis can report")
    p.set_defaults(handler=cmd_analyze)

    p = sub.add_parser("apply", help="validate and store configuration (atomically)")
    _add_files(p)
    p.set_defaults(handler=cmd_apply)

    p = sub.add_parser("delete", help="delete configuration")
    _add_files(p, required=False)
    p.add_argument("kind", nargs="?")
    p.add_argument("name", nargs="?")
    p.add_argument("-n", "--namespace", default=None)
    p.set_defaults(handler=cmd_delete)

    p = sub.add_parser("get", help="list stored configuration")
    p.add_argument("kind", help="kind or short name: virtualservice|vs, destinationrule|dr, serviceentry|se, ...")
    p.add_argument("name", nargs="?")
    p.add_argument("-n", "--namespace", default=None)
    p.add_argument("-A", "--all-namespaces", action="store_true")
    p.add_argument("-o", "--output", choices=("table", "yaml", "json"), default="table")
    p.set_defaults(handler=cmd_get)

    p = sub.add_parser("create", help="create a resource from files (kubectl create's shape)")
    create = p.add_subparsers(dest="create_command", required=True)
    c = create.add_parser("secret", help="a TLS Secret for a Gateway server's credentialName")
    secret = c.add_subparsers(dest="secret_type", required=True)
    c = secret.add_parser("tls", help="kubernetes.io/tls: tls.crt and tls.key (ca.crt with --ca)")
    c.add_argument("name")
    c.add_argument("--cert", required=True, help="PEM certificate (chain) file")
    c.add_argument("--key", required=True, help="PEM private key file")
    c.add_argument("--ca", default=None, help="PEM CA certificates for MUTUAL servers (ca.crt)")
    c.add_argument("-n", "--namespace", default=GATEWAY_NAMESPACE,
                   help=f"namespace (default {GATEWAY_NAMESPACE}, where the ingress gateway reads secrets)")
    c.set_defaults(handler=cmd_create_secret_tls)

    p = sub.add_parser("proxy-status", help="which proxies run the newest configuration")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.set_defaults(handler=cmd_proxy_status)

    p = sub.add_parser("proxy-config", help="what one proxy runs: listeners, routes, clusters, endpoints")
    p.add_argument("section", choices=(*SECTIONS, "all"), help="what to show")
    p.add_argument("proxy", help="a proxy as proxy-status names it (proxy-<node>), or the start of its node id")
    p.add_argument("-o", "--output", choices=("table", "json", "yaml"), default="table")
    p.set_defaults(handler=cmd_proxy_config)

    p = sub.add_parser("top", help="per destination service: requests/s, success rate, latency percentiles")
    p.add_argument("--since", type=float, default=60.0, help="seconds back (default 60)")
    p.add_argument("-o", "--output", choices=("table", "json"), default="table")
    p.add_argument("-w", "--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                   help="live: redraw the table every SECONDS (default 2) until interrupted, like linkerd viz top")
    p.add_argument("--count", type=int, default=None, metavar="N", help="with --watch: stop after N tables")
    p.set_defaults(handler=cmd_top)

    p = sub.add_parser("telemetry", help="query recent requests (Mixer's window)")
    tel = p.add_subparsers(dest="telemetry_command", required=True)
    q = tel.add_parser("query", help="request summaries grouped by labels")
    q.add_argument("--group-by", default="destination_service", help="comma-separated columns ('' = all requests)")
    q.add_argument("--where", action="append", default=[], metavar="COLUMN=V1[,V2]", help="filter, repeatable")
    q.add_argument("--since", type=float, default=60.0, help="seconds back (default 60)")
    q.add_argument("-o", "--output", choices=("table", "json", "parquet"), default="table",
                   help="parquet: written to --file")
    q.add_argument("--file", default=None, metavar="PATH", help="with -o parquet: the Parquet file to write")
    q.add_argument("--raw", action="store_true",
                   help="with -o parquet: the window's rows (one per request, every label) instead of "
                        "the summary; --group-by does not apply")
    q.set_defaults(handler=cmd_telemetry_query)

    p = sub.add_parser("ca", help="the mesh's root CA (Citadel)")
    ca = p.add_subparsers(dest="ca_command", required=True)
    c = ca.add_parser("info", help="trust domain, signing root and still-trusted retired roots")
    c.set_defaults(handler=cmd_ca_info)
    c = ca.add_parser("bundle", help="print the trust bundle (PEM)")
    c.set_defaults(handler=cmd_ca_bundle)
    c = ca.add_parser("import", help="sign with your own root CA from now on")
    c.add_argument("--cert", required=True, help="root CA certificate (PEM file)")
    c.add_argument("--key", required=True, help="its private key (PEM file)")
    c.set_defaults(handler=cmd_ca_import)
    c = ca.add_parser("svid", help="the workload certificates (SVIDs) the node proxies hold")
    c.add_argument("service_account", nargs="?", default=None, help="only this service account's SVIDs")
    c.add_argument("-n", "--namespace", default=None, help="only this namespace's SVIDs")
    c.add_argument("--node", default=None, help="only this node's proxy (node id or a prefix of it)")
    c.add_argument("-o", "--output", choices=("table", "pem"), default="table",
                   help="a row per SVID, or the certificate chains (PEM)")
    c.set_defaults(handler=cmd_ca_svid)
    c = ca.add_parser("rotate", help="sign with a new root; the old one stays trusted for the max SVID TTL")
    c.add_argument("--expect", default=None, help="rotate only if this fingerprint is the signing root")
    c.set_defaults(handler=cmd_ca_rotate)
    if extend is not None:
        extend(sub)
    return parser


def _load(args: argparse.Namespace, out: TextIO):
    return load_documents(args.filename, stdin=sys.stdin)


def cmd_validate(args: argparse.Namespace, out: TextIO) -> int:
    docs = _load(args, out)
    # Like istioctl validate: each document on its own (an apply also rejects duplicates).
    errors = [e for d in docs for e in validate_document(d)]
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if errors:
        print(f"{len(errors)} error(s) in {len({(e.source, e.index) for e in errors})} document(s)", file=sys.stderr)
        return 1
    for d in docs:
        meta = d.body.get("metadata") or {}
        print(f'"{d.source}" document {d.index} ({d.body.get("kind")} {meta.get("name")}) is valid', file=out)
    return 0


ANALYZE_FOUND_ISSUES = 79   # istioctl's exit status when analysis finds issues


def cmd_analyze(args: argparse.Namespace, out: TextIO) -> int:
    """``istioctl analyze``: the stored configuration with the files applied over it (or the
    files alone with ``--offline``), against the service registry."""
    if args.list_analyzers:
        _table(out, ["CODE", "LEVEL", "NAME"], [[t.code, t.level, t.name] for t in MESSAGE_TYPES])
        return 0
    if args.offline and not args.filename:
        print("meshctl analyze: --offline needs -f FILE", file=sys.stderr)
        return 2
    docs = _load(args, out) if args.filename else []
    # Each document on its own, as validate does; an invalid one is reported, not analysed.
    messages: list[Message] = []
    files: dict[ResourceKey, Resource] = {}
    references: dict[ResourceKey, str] = {}
    for d in docs:
        errors = validate_document(d)
        meta = d.body.get("metadata") if isinstance(d.body.get("metadata"), dict) else {}
        ref = f"{d.source}:{d.index}"
        if errors:
            messages += [Message(SCHEMA_VALIDATION_ERROR, str(d.body.get("kind") or ""),
                                 str(meta.get("namespace") or "default"), str(meta.get("name") or ""),
                                 (f"{e.path}: {e.reason}" if e.path else e.reason,), ref) for e in errors]
            continue
        r = Resource.from_dict(json_shaped(d.body))
        files[r.key] = r
        references[r.key] = ref
    services = workloads = None
    resources = dict(files)
    if not args.offline:
        client = _client(args)
        stored = [Resource.from_dict(i) for i in client.get()["items"]]
        resources = {**{r.key: r for r in stored}, **files}
        registry = RegistryState.from_state(client.registry())
        services = build_service_index(resources_by_kind(resources.values()), registry)
        workloads = registry.workloads
    messages += with_references(analyze(resources.values(), services, workloads), references)
    namespace = None if args.all_namespaces else (args.namespace or "default")
    shown = [m for m in messages if (namespace is None or m.namespace == namespace)
             and at_least(m.level, args.output_threshold)]
    if args.output == "log":
        for m in shown:
            print(m, file=out)
        if not shown:
            where = "all namespaces" if namespace is None else f"namespace: {namespace}"
            print(f"\u2714 No validation issues found when analyzing {where}.", file=out)
    elif args.output == "json":
        json.dump([m.to_dict() for m in shown], out, indent=2)
        out.write("\n")
    else:
        yaml.safe_dump([m.to_dict() for m in shown], out, sort_keys=False)
    failed = any(at_least(m.level, args.failure_threshold) for m in messages
                 if namespace is None or m.namespace == namespace)
    return ANALYZE_FOUND_ISSUES if failed else 0


def _client(args: argparse.Namespace):
    from mesh.client import MeshClient, connect

    connect(args.address)
    return MeshClient()


def cmd_apply(args: argparse.Namespace, out: TextIO) -> int:
    return _apply(args, _load(args, out), out)


def cmd_create_secret_tls(args: argparse.Namespace, out: TextIO) -> int:
    files = {"cert": args.cert, "key": args.key, "ca": args.ca}
    pems: dict[str, bytes | None] = {}
    for option, path in files.items():
        try:
            pems[option] = Path(path).read_bytes() if path else None
        except OSError as exc:
            print(f"error: --{option} {path}: {exc.strerror or exc}", file=sys.stderr)
            return 1
    body = secret_document(args.name, args.namespace, pems["cert"] or b"", pems["key"] or b"", pems["ca"])
    return _apply(args, [Document(f"secret tls {args.name}", 0, body)], out)


def _apply(args: argparse.Namespace, docs: list[Document], out: TextIO) -> int:
    errors = validate_documents(docs)  # fail fast, offline; Galley validates again
    if errors:
        for e in errors:
            print(f"error: {e}", file=sys.stderr)
        print("nothing was applied", file=sys.stderr)
        return 1
    reply = _client(args).apply(docs)
    for line in reply["results"]:
        print(line, file=out)
    for warning in reply.get("warnings") or ():
        print(f"Warning: {warning}", file=sys.stderr)
    return 0


def cmd_delete(args: argparse.Namespace, out: TextIO) -> int:
    if args.filename:
        targets = [{"kind": d.body.get("kind", ""), "name": (d.body.get("metadata") or {}).get("name", ""),
                    "namespace": (d.body.get("metadata") or {}).get("namespace") or args.namespace or "default"}
                   for d in _load(args, out)]
    elif args.kind and args.name:
        targets = [{"kind": args.kind, "name": args.name, "namespace": args.namespace or "default"}]
    else:
        print("meshctl delete: give -f FILE, or KIND NAME", file=sys.stderr)
        return 2
    reply = _client(args).delete(targets)
    for line in reply["results"]:
        print(line, file=out)
    return 0


def cmd_get(args: argparse.Namespace, out: TextIO) -> int:
    namespace = None if args.all_namespaces else (args.namespace or ("default" if args.name else None))
    reply = _client(args).get(args.kind, args.name, namespace)
    items: list[dict[str, Any]] = reply["items"]
    if args.name and not items:
        print(f'Error: {args.kind} "{args.name}" not found', file=sys.stderr)
        return 1
    if args.output == "json":
        body: Any = items[0] if args.name else {"apiVersion": "v1", "kind": "List", "items": items}
        json.dump(body, out, indent=2)
        out.write("\n")
    elif args.output == "yaml":
        yaml.safe_dump_all(items, out, sort_keys=False)
    elif items and all(i["kind"] == SECRET_KIND for i in items):
        _table(out, ["NAMESPACE", "NAME", "TYPE", "DATA", "SUBJECT", "EXPIRES"],
               [[i["metadata"].get("namespace", "default"), i["metadata"]["name"], i.get("type", ""),
                 ",".join((i.get("status") or {}).get("keys") or ()),
                 ((i.get("status") or {}).get("certificate") or {}).get("subject", ""),
                 ((i.get("status") or {}).get("certificate") or {}).get("notAfter", "")] for i in items])
    else:
        _table(out, ["NAMESPACE", "NAME", "KIND", "RESOURCEVERSION", "HOSTS"],
               [[i["metadata"].get("namespace", "default"), i["metadata"]["name"], i["kind"],
                 i["metadata"].get("resourceVersion", ""), ",".join(_hosts(i))] for i in items])
    return 0


def _hosts(item: dict[str, Any]) -> list[str]:
    spec = item.get("spec") or {}
    if "hosts" in spec:
        return [str(h) for h in spec["hosts"]]
    return [str(spec["host"])] if "host" in spec else []


def cmd_proxy_status(args: argparse.Namespace, out: TextIO) -> int:
    rows = _client(args).proxy_status()
    if args.output == "json":
        json.dump(rows, out, indent=2)
        out.write("\n")
    else:
        _table(out, ["PROXY", "NODE", "STATUS", "ACKED", "LATEST", "GATEWAY"],
               [[r["proxy"], r["node"][:16], r["status"], r["acked"] or "-", r["latest"] or "-",
                 _gateway_cell(r)] for r in rows])
    return 0 if all(r["status"] == "SYNCED" for r in rows) else 1


def cmd_proxy_config(args: argparse.Namespace, out: TextIO) -> int:
    """istioctl proxy-config for a raymesh proxy: the snapshot it acknowledged, as tables, or
    the snapshot's sections (-o json|yaml)."""
    try:
        config = _client(args).proxy_config(args.proxy)
    except LookupError as exc:
        raise MeshError([str(exc)]) from None
    snapshot = config.get("snapshot")
    if snapshot is None:
        raise MeshError([f"{config['proxy']} runs no configuration yet"])
    sections = SECTIONS if args.section == "all" else (args.section,)
    if args.output != "table":
        body = {"proxy": config["proxy"], "node": config["node_id"], "version": config["version"]}
        for name in sections:
            body.update(proxy_config_section(snapshot, name))
        if args.output == "json":
            json.dump(body, out, indent=2)
            out.write("\n")
        else:
            yaml.safe_dump(body, out, sort_keys=False)
        return 0
    for i, name in enumerate(sections):
        if len(sections) > 1:
            print(("\n" if i else "") + f"{name.upper()} ({config['proxy']}, version {config['version']})", file=out)
        _table(out, PROXY_CONFIG_HEADERS[name], proxy_config_rows(snapshot, name))
    return 0


def _gateway_cell(row: dict[str, Any]) -> str:
    """The ingress gateway's bound addresses, then any port it could not bind (``UNBOUND address``)."""
    bound = sorted((row.get("gateways") or {}).values())
    unbound = [f"UNBOUND {e.split(': ', 1)[0]}" for e in sorted((row.get("gateway_errors") or {}).values())]
    return ",".join(bound + unbound) or "-"


_SUMMARY = ["REQUESTS", "RPS", "SUCCESS", "P50", "P90", "P99"]


def _emit(args: argparse.Namespace, out: TextIO, keys: Sequence[str], rows: list[dict[str, Any]]) -> int:
    if args.output == "json":
        json.dump(rows, out, indent=2)
        out.write("\n")
    else:
        _table(out, [k.upper() for k in keys] + _SUMMARY,
               [[*(r[k] for k in keys), r["requests"], f"{r['rps']:.1f}", f"{r['success_rate']:.1f}%",
                 *(f"{r[c]:.2f}ms" for c in ("p50_ms", "p90_ms", "p99_ms"))] for r in rows])
    return 0


def _parse_where(items: Sequence[str]) -> dict[str, list[Any]]:
    filters: dict[str, list[Any]] = {}
    for item in items:
        column, sep, values = item.partition("=")
        if not sep or not column or not values:
            raise MeshError([f"--where {item!r}: expected COLUMN=VALUE[,VALUE...]"])
        try:
            filters[column] = [int(v) if column == "response_code" else v for v in values.split(",")]
        except ValueError:
            raise MeshError([f"--where {item!r}: response_code takes numbers"]) from None
    return filters


def cmd_top(args: argparse.Namespace, out: TextIO) -> int:
    if args.watch is None:
        return _emit(args, out, ["destination_service"], _client(args).top(args.since))
    if args.watch <= 0 or (args.count is not None and args.count < 1):
        print("meshctl top: --watch takes a positive interval and --count a positive number", file=sys.stderr)
        return 2
    client = _client(args)
    shown = 0
    try:
        while args.count is None or shown < args.count:
            rows = client.top(args.since)
            if out.isatty():
                out.write("\x1b[H\x1b[2J")   # redraw in place on a terminal; a pipe gets one table after another
            out.write(f"{time.strftime('%H:%M:%S')}  last {args.since:g} s, every {args.watch:g} s\n")
            _emit(args, out, ["destination_service"], rows)
            out.flush()
            shown += 1
            if args.count is None or shown < args.count:
                time.sleep(args.watch)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_telemetry_query(args: argparse.Namespace, out: TextIO) -> int:
    keys = [k for k in args.group_by.split(",") if k]
    parquet = args.output == "parquet"
    usage = ("-o parquet writes a file: give --file PATH" if parquet and not args.file
             else "--file is for -o parquet" if args.file and not parquet
             else "--raw is for -o parquet" if args.raw and not parquet else None)
    if usage is not None:
        print(f"meshctl telemetry query: {usage}", file=sys.stderr)
        return 2
    filters = _parse_where(args.where)
    client = _client(args)
    try:
        table = (client.telemetry_rows(filters, args.since) if args.raw
                 else client.telemetry_summary(filters, keys, args.since))
    except ValueError as exc:  # an unknown column, named by mesh.metrics
        raise MeshError([str(exc)]) from None
    if parquet:
        _write_parquet(table, args.file)
        print(f"wrote {table.num_rows} rows to {args.file}", file=out)
        return 0
    return _emit(args, out, keys, table.to_pylist())


def _write_parquet(table: pa.Table, path: str) -> None:
    """Write ``table`` next to ``path`` and rename it into place, so a reader never sees half a file."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp")
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, target)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        raise MeshError([f"cannot write {path}: {exc.strerror or exc}"]) from None


def cmd_ca_info(args: argparse.Namespace, out: TextIO) -> int:
    info = _client(args).ca_info()
    _table(out, ["TRUST DOMAIN", "ROOT", "STATE"],
           [[info["trust_domain"], info["root"], "signing"]]
           + [[info["trust_domain"], r["root"], "trusted (retired)"] for r in info["retired"]])
    return 0


def cmd_ca_bundle(args: argparse.Namespace, out: TextIO) -> int:
    out.write("".join(_client(args).trust_bundle()))
    return 0


def cmd_ca_svid(args: argparse.Namespace, out: TextIO) -> int:
    """Like ``istioctl proxy-config secret``: which SVIDs each proxy presents, and their chains."""
    svids = [s for s in _client(args).svids()
             if (args.node is None or s["node_id"].startswith(args.node))
             and (args.namespace is None or f"/ns/{args.namespace}/" in s["spiffe_id"])
             and (args.service_account is None or s["spiffe_id"].endswith(f"/sa/{args.service_account}"))]
    if not svids:
        raise MeshError(["no proxy holds a matching SVID (is a workload with that identity registered?)"])
    if args.output == "pem":
        for s in svids:
            out.write("".join(s["cert_chain"]))
        return 0
    rows = []
    for s in svids:
        leaf = load_certs("".join(s["cert_chain"]))[0]
        rows.append([s["node_id"][:16], s["spiffe_id"], format(leaf.serial_number, "x"),
                     leaf.not_valid_before_utc.strftime("%Y-%m-%dT%H:%M:%SZ"),
                     leaf.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")])
    _table(out, ["NODE", "SPIFFE ID", "SERIAL", "NOT BEFORE", "NOT AFTER"], rows)
    return 0


def cmd_ca_import(args: argparse.Namespace, out: TextIO) -> int:
    with open(args.cert, encoding="utf-8") as c, open(args.key, encoding="utf-8") as k:
        info = _client(args).ca_import(c.read(), k.read())
    print(f"root CA {info['root']} is now signing", file=out)
    return 0


def cmd_ca_rotate(args: argparse.Namespace, out: TextIO) -> int:
    info = _client(args).ca_rotate(args.expect)
    print(f"root CA {info['root']} is now signing", file=out)
    return 0


def _table(out: TextIO, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    cells = [list(map(str, header))] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    for r in cells:
        print("   ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip(), file=out)


def run(argv: Sequence[str] | None = None, parser: argparse.ArgumentParser | None = None,
        out: TextIO | None = None) -> int:
    parser = parser or build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args, out or sys.stdout)
    except LoadError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except MeshError as exc:
        for e in exc.errors:
            print(f"error: {e}", file=sys.stderr)
        return 1
    except IdentityError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def main(argv: Sequence[str] | None = None) -> None:
    sys.exit(run(argv))


if __name__ == "__main__":
    main()
