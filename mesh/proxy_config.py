"""What one node's proxy runs, as ``istioctl proxy-config`` shows an Envoy: its listeners,
routes, clusters and endpoints, read from the snapshot the proxy acknowledged.

Each function turns a snapshot (the dict Pilot compiles, ``mesh.compiler``) into table rows;
``meshctl proxy-config`` prints them, or the snapshot's sections as JSON / YAML.
"""
from __future__ import annotations

from typing import Any

SECTIONS = ("listeners", "routes", "clusters", "endpoints")

# The snapshot keys behind each section, for ``-o json|yaml``.
SECTION_KEYS: dict[str, tuple[str, ...]] = {
    "listeners": ("listeners", "vips", "gateway"),
    "routes": ("virtual_hosts", "tcp_routes", "tls_routes"),
    "clusters": ("clusters",),
    "endpoints": ("clusters",),
}

HEADERS: dict[str, list[str]] = {
    "listeners": ["ADDRESS", "PORT", "TYPE", "DESTINATION"],
    "routes": ["NAME", "DOMAINS", "MATCH", "ROUTE", "DESTINATION"],
    "clusters": ["SERVICE FQDN", "PORT", "SUBSET", "DIRECTION", "LB", "ENDPOINTS"],
    "endpoints": ["ENDPOINT", "NODE", "LABELS", "CLUSTER"],
}


def section(snapshot: dict[str, Any], name: str) -> dict[str, Any]:
    """The snapshot keys behind section ``name`` (those present)."""
    return {k: snapshot[k] for k in SECTION_KEYS[name] if k in snapshot}


def rows(snapshot: dict[str, Any], name: str) -> list[list[str]]:
    return _ROWS[name](snapshot)


def listener_rows(snapshot: dict[str, Any]) -> list[list[str]]:
    out = []
    listeners = snapshot.get("listeners") or {}
    if "http_proxy" in listeners:
        spec = listeners["http_proxy"]
        out.append([spec["host"], str(spec["port"]), "HTTP_PROXY", "every service (absolute-form requests)"])
    if "inbound" in listeners:
        spec = listeners["inbound"]
        out.append([spec["host"], str(spec["port"]), "INBOUND", "this node's endpoints (CONNECT tunnels)"])
    for vip in snapshot.get("vips") or ():
        out.append([vip["address"], str(vip["port"]), f"VIP {vip.get('protocol', 'http').upper()}", vip["host"]])
    for gl in (snapshot.get("gateway") or {}).get("listeners") or ():
        protocols = sorted({str(s.get("protocol", "")).upper() for s in gl.get("servers") or ()} - {""})
        out.append([gl.get("address", ""), str(gl.get("port", "")), "GATEWAY " + "/".join(protocols),
                    gl.get("name", "")])
    return out


def route_rows(snapshot: dict[str, Any]) -> list[list[str]]:
    out = []
    for vh in snapshot.get("virtual_hosts") or ():
        domains = _domains(vh.get("domains") or ())
        for route in vh.get("routes") or ():
            out.append([vh.get("name", ""), domains, _match(route.get("match") or ()), route.get("name") or "-",
                        _destination(route)])
    for kind, key in (("TCP", "tcp_routes"), ("TLS", "tls_routes")):
        for host in snapshot.get(key) or ():
            for route in host.get("routes") or ():
                dest = ", ".join(_weighted(d) for d in route.get("route") or ()) or "-"
                name = host.get("name") or f"{host.get('host')}:{host.get('port')}"
                out.append([name, kind, "*", route.get("name") or "-", dest])
    return out


def cluster_rows(snapshot: dict[str, Any]) -> list[list[str]]:
    out = []
    clusters = (snapshot.get("clusters") or {}).items()
    for name, c in sorted(clusters, key=lambda kv: (kv[1].get("service") or kv[0], kv[1].get("port") or 0,
                                                    kv[1].get("subset") or "")):
        direction = name.split("|", 1)[0] if "|" in name else "outbound"
        out.append([c.get("service") or name, str(c.get("port", "")), c.get("subset") or "-", direction,
                    (c.get("lb") or {}).get("policy", "-"), str(len(c.get("endpoints") or ()))])
    return out


def endpoint_rows(snapshot: dict[str, Any]) -> list[list[str]]:
    out = []
    here = (snapshot.get("node") or {}).get("id")
    for name, c in sorted((snapshot.get("clusters") or {}).items()):
        for ep in c.get("endpoints") or ():
            node, via = ep.get("node"), ep.get("via")
            if node is None or node == here:
                where = "local"
            else:
                where = str(node)[:16] + (f" via {via['address']}:{via['port']}" if via else "")
            labels = ",".join(f"{k}={v}" for k, v in sorted((ep.get("labels") or {}).items())) or "-"
            out.append([f"{ep['address']}:{ep['port']}", where, labels, name])
    return out


_ROWS = {"listeners": listener_rows, "routes": route_rows, "clusters": cluster_rows, "endpoints": endpoint_rows}


def _domains(domains: Any, shown: int = 3) -> str:
    domains = list(domains)
    text = ", ".join(domains[:shown])
    return text + f" + {len(domains) - shown} more" if len(domains) > shown else text or "-"


_CONDITIONS = (("headers", "header"), ("query_params", "query param"), ("without_headers", "without header"))


def _match(matches: Any) -> str:
    """One line for a route's match conditions (any of them, each all of its parts), as Envoy's
    route dump summarises them: uri first, then the other conditions by name."""
    if not matches:
        return "/*"
    parts = []
    for m in matches:
        bits = []
        for kind, value in (m.get("uri") or {}).items():
            bits.append(f"{value}*" if kind == "prefix" else f"~{value}" if kind == "regex" else str(value))
        for key, label in _CONDITIONS:
            for name, cond in (m.get(key) or {}).items():
                text = ",".join(f"{k}={v}" for k, v in (cond or {}).items()) if isinstance(cond, dict) else str(cond)
                bits.append(f"{label} {name}" + (f" {text}" if text else ""))
        for key in ("method", "authority", "port", "source_labels", "source_namespace"):
            if m.get(key):
                bits.append(f"{key.replace('_', ' ')} {m[key]}")
        parts.append(" ".join(bits) or "/*")
    return " | ".join(parts)


def _destination(route: dict[str, Any]) -> str:
    if route.get("direct_response"):
        return f"direct response {route['direct_response'].get('status')}"
    if route.get("redirect"):
        return f"redirect {route['redirect'].get('redirect_code', 301)}"
    return ", ".join(_weighted(d) for d in route.get("route") or ()) or "-"


def _weighted(dest: dict[str, Any]) -> str:
    weight = dest.get("weight")
    return f"{dest.get('cluster')} ({weight}%)" if weight not in (None, 100) else str(dest.get("cluster"))
