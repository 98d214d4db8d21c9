"""Istio's own Grafana dashboards, and raymesh's, evaluated by a real Prometheus over real traffic.

A Prometheus server (Debian's ``prometheus``) scrapes the running mesh's Mixer replicas through
the file SD files they write, and Ray's node metrics endpoints. Traffic goes through the mesh to
a fresh service on the other node, from the driver (a client the proxy cannot identify: plaintext,
source ``unknown``) and from a workload (``sleep-v1``: mTLS, source named); then every panel query of Istio's service, workload and mesh dashboards that
reads only the HTTP metrics Mixer exports is evaluated the way Grafana does: template variables
resolved from their own queries (``query_result``, ``label_values``), ``$__rate_interval``
replaced, and the expression run as a range query over the traffic's time span. The service
also has a raw TCP port, and TCP traffic flows at the same time, so the TCP panels
(``istio_tcp_*``) are evaluated too: from the driver (a long-lived connection and short ones,
plaintext, source ``unknown``) and from the client workload (a short connection a round; those
the node 0 proxy takes cross to the echo's node over mTLS, source named).

A defined core set of panels must show the traffic with the right labels and plausible values;
every other evaluated panel must show data too, unless a known, stated reason says why not
(the mTLS half as the client reports it, a workload that sends nothing). A panel that is empty
for any other reason fails the test. A negative control shows the substitution matters.
"""
from __future__ import annotations

import json
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import socket

import pytest
import ray

from actors.proxy_worker import proxy_actor_name
from mesh import workload
from mesh.client import NAMESPACE as RAY_NAMESPACE
from mesh.client import find_replicas
from tests.integration.prometheus import MIXER_JOB, PrometheusServer, scrape_config

pytestmark = pytest.mark.ray

ROOT = Path(__file__).resolve().parents[2]
CORPUS = Path(os.environ.get("RAYMESH_CONFORMANCE_DIR") or ROOT.parent / "shared" / "conformance" / "istio")
ISTIO_DASHBOARDS = CORPUS / "dashboards"
OUR_DASHBOARDS = ROOT / "dashboards"
SERVICE_DASHBOARD = "istio-service-dashboard.json"
WORKLOAD_DASHBOARD = "istio-workload-dashboard.json"
MESH_DASHBOARD = "istio-mesh-dashboard.gen.json"
OURS = ("raymesh-mesh.json", "raymesh-service.json", "raymesh-workload.json", "raymesh-control-plane.json")

SERVICE = "dash"
NAMESPACE = "default"
FQDN = f"{SERVICE}.{NAMESPACE}.svc.cluster.local"
WORKLOAD = f"{SERVICE}-v1"
CLIENT = "sleep"
CLIENT_WORKLOAD = f"{CLIENT}-v1"
CLIENT_ID = f"spiffe://cluster.local/ns/{NAMESPACE}/sa/default"
# Mixer exports these; the duration panels also OR in Istio's legacy seconds histogram, which
# is allowed to be absent.
EXPORTED = frozenset({"istio_requests_total", "istio_request_duration_milliseconds_bucket",
                      "istio_request_bytes_bucket", "istio_response_bytes_bucket",
                      "istio_tcp_sent_bytes_total", "istio_tcp_received_bytes_total",
                      "istio_tcp_connections_opened_total", "istio_tcp_connections_closed_total"})
LEGACY = frozenset({"istio_request_duration_seconds_bucket"})
# Grafana's interval macros, at the resolution this test scrapes with.
MACROS = {"__rate_interval": "1m", "__interval": "1s", "__range": "5m"}
TRAFFIC_S = 6.0
TRAFFIC_MAX_ROUNDS = 400
PATHS = ("/ok", "/ok", "/ok", "/status/503", "/status/404")
TCP_PORT = 9100
TCP_CHUNK = b"t" * 64          # sent, and echoed, on the long-lived connection every round
SHORT_TCP_EVERY = 10           # rounds between short TCP connections


# -- dashboards as Grafana reads them -------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class PanelQuery:
    dashboard: str
    panel_id: int
    title: str
    ref: str
    expr: str

    @property
    def key(self) -> str:
        return f"{self.dashboard}#{self.panel_id}{self.ref} {self.title!r}"


def load_dashboard(path: Path) -> dict[str, Any]:
    if not path.is_file():
        pytest.fail(f"dashboard not found: {path} (Istio corpus: set RAYMESH_CONFORMANCE_DIR)", pytrace=False)
    return json.loads(path.read_text())


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for p in panels:
        yield p
        yield from _panels(p.get("panels") or [])  # panels nested in collapsed rows


def panel_queries(name: str, dashboard: dict[str, Any]) -> list[PanelQuery]:
    return [PanelQuery(name, p["id"], p.get("title", ""), t.get("refId") or "", t["expr"])
            for p in _panels(dashboard.get("panels") or []) for t in p.get("targets") or [] if t.get("expr")]


_STRING = re.compile(r'"(?:[^"\\]|\\.)*"')
_METRIC = re.compile(r"\b(?:istio|envoy|pilot|galley|sidecar|container|go|process|workload_manager|ray)_\w+")


def metric_names(expr: str) -> set[str]:
    """The metric names in ``expr`` (label values are stripped first: they may look like names)."""
    return set(_METRIC.findall(_STRING.sub('""', expr)))


_VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)\}|\[\[(\w+)\]\]")


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """Grafana's interpolation of ``$name``, ``${name}`` and ``[[name]]``; an unknown name is an error."""
    def one(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name in MACROS:
            return MACROS[name]
        if name not in values:
            raise KeyError(f"template variable ${name} has no value in {expr!r}")
        return values[name]
    return _VARIABLE.sub(one, expr)


def _regex_escape(value: str) -> str:
    """A value inside a PromQL ``=~"..."`` string, as Grafana escapes multi-value selections."""
    return re.sub(r"([\\^$.|?*+()\[\]{}])", r"\\\\\1", value)


def _series_text(sample: dict[str, Any]) -> str:
    """How Grafana's ``query_result()`` prints a series for the variable's regex to pick from."""
    labels = dict(sample["metric"])
    name = labels.pop("__name__", "")
    return name + "{" + ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "} " + " ".join(
        str(x) for x in reversed(sample["value"]))


def variable_options(prom: PrometheusServer, var: dict[str, Any], values: Mapping[str, str]) -> list[str]:
    if var["type"] == "custom":
        return [o.strip() for o in str(var["query"]).split(",")]
    query = var.get("query")
    query = substitute(query["query"] if isinstance(query, dict) else query, values)
    if m := re.fullmatch(r"\s*query_result\((.*)\)\s*", query, re.S):
        found = [_series_text(s) for s in prom.query(m.group(1))]
    elif m := re.fullmatch(r"\s*label_values\((.*),\s*(\w+)\s*\)\s*", query, re.S):
        found = prom.label_values(m.group(2), m.group(1))
    else:
        raise AssertionError(f"variable ${var['name']}: query form not handled: {query!r}")
    pattern = (var.get("regex") or "").strip("/")
    if pattern:
        found = [m.group(1) for s in found if (m := re.fullmatch(pattern, s, re.S))]
    return sorted(set(found))


def resolve_variables(prom: PrometheusServer, dashboard: dict[str, Any], chosen: Mapping[str, str]) -> dict[str, str]:
    """Each template variable's value, in dashboard order: a chosen value must be one its query
    offers; any other is "All", which Grafana sends as every option, ``(a|b)``."""
    values: dict[str, str] = {}
    for var in dashboard.get("templating", {}).get("list", []):
        name = var["name"]
        if var["type"] == "datasource":
            values[name] = "prometheus"
            continue
        options = variable_options(prom, var, values)
        if name in chosen:
            assert chosen[name] in options, f"variable ${name}: {chosen[name]!r} not among its options {options}"
            values[name] = chosen[name]
        elif len(options) == 1:
            values[name] = _regex_escape(options[0])
        else:
            values[name] = "(" + "|".join(_regex_escape(o) for o in options) + ")"
    return values


# -- evaluating ----------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Outcome:
    query: PanelQuery
    view: str
    series: list[dict[str, Any]]   # [{"metric": labels, "values": [finite floats]}], only those with some

    @property
    def has_data(self) -> bool:
        return bool(self.series)

    def values(self) -> list[float]:
        return [v for s in self.series for v in s["values"]]

    def labels(self, name: str) -> set[str]:
        return {s["metric"].get(name, "") for s in self.series}


def evaluate(prom: PrometheusServer, query: PanelQuery, view: str, values: Mapping[str, str],
             start: float, end: float) -> Outcome:
    result = prom.query_range(substitute(query.expr, values), start, end)
    series = []
    for s in result:
        finite = [float(v) for _, v in s["values"] if math.isfinite(float(v))]
        if finite:
            series.append({"metric": s["metric"], "values": finite})
    return Outcome(query, view, series)


def why_empty(expr: str, values: Mapping[str, str]) -> str | None:
    """The known reason a panel query shows no data for this traffic, or None."""
    flat = expr.replace(" ", "")
    if re.search(r'source_workload=~?"\$workload"', flat) and values.get("workload", WORKLOAD) == WORKLOAD:
        return f"outbound: {WORKLOAD} sends no requests"
    as_client = 'reporter="source"' in flat or ('reporter=~"$qrep"' in flat and values.get("qrep") == "source")
    if 'connection_security_policy="mutual_tls"' in flat and as_client:
        return "mTLS half as the client reports it: Istio's source reporter says connection_security_policy unknown"
    return None


# -- the core set: what the dashboards must show for the traffic sent ---------------------------

Check = Callable[[Outcome], None]


def positive(o: Outcome) -> None:
    assert max(o.values()) > 0, o.series


def ratio_below_one(o: Outcome) -> None:
    vals = o.values()
    assert all(0 <= v <= 1 for v in vals) and any(0 < v < 1 for v in vals), vals


def seconds(o: Outcome) -> None:
    assert all(0 < v < 30 for v in o.values()), o.values()


def byte_size(o: Outcome) -> None:
    assert all(0 < v <= 5000 for v in o.values()), o.values()


def labelled(check: Check, **expected: str | set[str]) -> Check:
    def run(o: Outcome) -> None:
        check(o)
        for name, want in expected.items():
            got = o.labels(name)
            assert (want <= got if isinstance(want, set) else got == {want}), f"{name}: {got} (want {want})"
    return run


# The non-mTLS half (refs B, E-H) holds the driver's requests, and for reporter="source" (which
# reports connection_security_policy unknown) the client workload's too; the mTLS half (refs
# A-D) only the client workload's, as the destination reports them.
BY_DRIVER = {"source_workload": {"unknown"}, "source_workload_namespace": {"unknown"}}
BY_CLIENT = {"source_workload": CLIENT_WORKLOAD, "source_workload_namespace": NAMESPACE}
BY_DEST_WL = {"destination_workload": WORKLOAD, "destination_workload_namespace": NAMESPACE}
CODES = {"200", "404", "503"}


def by_source(view: str) -> list[tuple[int, str, Check]]:
    """The by-source panels of the service and workload dashboards (same ids in both)."""
    out: list[tuple[int, str, Check]] = [
        (25, "B", labelled(positive, response_code=CODES, **BY_DRIVER)),  # Incoming Requests By Source And Code
        (26, "B", labelled(ratio_below_one, **BY_DRIVER)),                # Incoming Success Rate By Source
        (27, "EFGH", labelled(seconds, **BY_DRIVER)),                     # Incoming Request Duration By Source
        (28, "EFGH", labelled(byte_size, **BY_DRIVER)),                   # Incoming Request Size By Source
        (68, "EFGH", labelled(byte_size, **BY_DRIVER)),                   # Response Size By Source
    ]
    if view == "destination":
        out += [(25, "A", labelled(positive, response_code=CODES, **BY_CLIENT)),
                (26, "A", labelled(ratio_below_one, **BY_CLIENT)),
                (27, "ABCD", labelled(seconds, **BY_CLIENT)),
                (28, "ABCD", labelled(byte_size, **BY_CLIENT)),
                (68, "ABCD", labelled(byte_size, **BY_CLIENT))]
    else:
        out += [(25, "B", labelled(positive, source_workload={CLIENT_WORKLOAD, "unknown"}))]
    return out


# (dashboard, view, panel id, refIds, check)
CORE: list[tuple[str, str, int, str, Check]] = [
    *[(SERVICE_DASHBOARD, rep, pid, refs, check) for rep in ("destination", "source") for pid, refs, check in [
        (12, "A", positive),                                              # Client Request Volume
        (14, "A", ratio_below_one),                                       # Client Success Rate
        (87, "ABC", seconds),                                             # Client Request Duration p50/p90/p99
        *by_source(rep),
    ]],
    (SERVICE_DASHBOARD, "destination", 97, "A", positive),                # Server Request Volume
    (SERVICE_DASHBOARD, "destination", 98, "A", ratio_below_one),         # Server Success Rate
    (SERVICE_DASHBOARD, "destination", 99, "ABC", seconds),               # Server Request Duration
    *[(SERVICE_DASHBOARD, "destination", pid, refs, check) for half in ("A", "B") for pid, refs, check in [
        (90, half, labelled(positive, response_code=CODES, **BY_DEST_WL)),  # Incoming Requests By Workload
        (91, half, labelled(ratio_below_one, **BY_DEST_WL)),
        (94, "ABCD" if half == "A" else "EFGH", labelled(seconds, **BY_DEST_WL)),
        (95, "ABCD" if half == "A" else "EFGH", labelled(byte_size, **BY_DEST_WL)),
        (96, "ABCD" if half == "A" else "EFGH", labelled(byte_size, **BY_DEST_WL)),
    ]],
    *[(WORKLOAD_DASHBOARD, rep, pid, refs, check) for rep in ("destination", "source") for pid, refs, check in [
        (12, "A", positive),                                              # Incoming Request Volume
        (14, "A", ratio_below_one),                                       # Incoming Success Rate
        (87, "ABC", seconds),                                             # Request Duration
        *by_source(rep),
    ]],
    *[(SERVICE_DASHBOARD, rep, pid, "A", positive) for rep in ("destination", "source")
      for pid in (84, 100)],                                              # TCP Received / Sent Bytes
    # TCP by source and mTLS (refs A: mutual_tls, B: not), as the destination reports them: the
    # client workload's connections that crossed nodes over mTLS; the driver's in plaintext
    # (and the client workload's that the echo node's proxy took, which cannot name their
    # source: an unknown peer to that node).
    *[(dash, "destination", pid, "A", labelled(positive, **BY_CLIENT))
      for dash in (SERVICE_DASHBOARD, WORKLOAD_DASHBOARD) for pid in (80, 82)],  # Bytes from / to incoming TCP
    *[(dash, "destination", pid, "B", labelled(positive, **BY_DRIVER))
      for dash in (SERVICE_DASHBOARD, WORKLOAD_DASHBOARD) for pid in (80, 82)],
    (SERVICE_DASHBOARD, "destination", 92, "AB", labelled(positive, **BY_DEST_WL)),   # by destination workload
    (SERVICE_DASHBOARD, "destination", 93, "AB", labelled(positive, **BY_DEST_WL)),
    (WORKLOAD_DASHBOARD, "destination", 84, "A", positive),              # TCP Server Traffic
    (MESH_DASHBOARD, "mesh", 2, "", positive),                            # Traffic Volume
    (MESH_DASHBOARD, "mesh", 3, "", lambda o: None),                      # Success Rate (whole mesh: any value)
    (MESH_DASHBOARD, "mesh", 4, "", positive),                            # 4xxs
    (MESH_DASHBOARD, "mesh", 5, "", positive),                            # 5xxs
]
# The mesh dashboard's workload table: one row per destination; ours must be in it.
MESH_TABLE_REFS = {"requests": positive, "p50": positive, "p90": positive, "p99": positive, "success": ratio_below_one}


def views(prom: PrometheusServer) -> dict[tuple[str, str], dict[str, str]]:
    svc, wl = (load_dashboard(ISTIO_DASHBOARDS / n) for n in (SERVICE_DASHBOARD, WORKLOAD_DASHBOARD))
    out = {(MESH_DASHBOARD, "mesh"): {}}
    for rep in ("destination", "source"):
        out[(SERVICE_DASHBOARD, rep)] = resolve_variables(prom, svc, {"service": FQDN, "qrep": rep})
        out[(WORKLOAD_DASHBOARD, rep)] = resolve_variables(
            prom, wl, {"namespace": NAMESPACE, "workload": WORKLOAD, "qrep": rep})
    return out


# -- the run -------------------------------------------------------------------------------------

@pytest.fixture
def prometheus(mesh_cluster, tmp_path: Path) -> Iterator[PrometheusServer]:
    mixers = find_replicas("mixer")
    assert mixers, "no Mixer replicas running"
    stats = ray.get([m.stats.remote() for m in mixers], timeout=30)
    sd_files = [s["file_sd"] for s in stats]
    assert all(sd_files), f"a Mixer replica writes no file SD: {stats}"
    ray_targets = [f"{n['NodeManagerAddress']}:{n['MetricsExportPort']}" for n in ray.nodes() if n.get("Alive")]
    server = PrometheusServer(tmp_path, scrape_config(sd_files, ray_targets))
    server.start()
    try:
        want = {s["endpoint"] for s in stats}
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            up = {t["labels"]["instance"] for t in server.active_targets()
                  if t["labels"]["job"] == MIXER_JOB and t["health"] == "up"}
            if up == want:
                break
            time.sleep(0.2)
        assert up == want, f"Mixer targets up {up}, expected {want}: {server.active_targets()}"
        yield server
    finally:
        server.stop()


def _echo(conn: socket.socket, data: bytes) -> None:
    conn.sendall(data)
    got = b""
    while len(got) < len(data):
        chunk = conn.recv(65536)
        assert chunk, "TCP echo closed early"
        got += chunk
    assert got == data


def send_traffic(mesh, client: Any, vip: str) -> tuple[int, int]:
    """A bounded mix of 200, 503 and 404 answers, spread over a few scrape intervals, from the
    driver and from the client workload, both on node 0; with TCP bytes through the service's
    tcp port alongside: from the driver a connection open the whole time (its bytes are
    reported while it is open) and a short connection every few rounds, from the client
    workload a short connection every round.

    Returns (requests, TCP bytes each way)."""
    sent, tcp_bytes, deadline = 0, 0, time.monotonic() + TRAFFIC_S
    expected = [int(p.rsplit("/", 1)[1]) if p.startswith("/status") else 200 for p in PATHS]
    urls = [f"http://{SERVICE}:8000{path}" for path in PATHS]
    with socket.create_connection((vip, TCP_PORT), timeout=10) as long_lived:
        for rnd in range(TRAFFIC_MAX_ROUNDS):
            if time.monotonic() > deadline:
                break
            assert [mesh.get(url)[0] for url in urls] == expected
            assert ray.get(client.fetch_all.remote(mesh.proxy_port(0), urls), timeout=30) == expected
            sent += 2 * len(urls)
            _echo(long_lived, TCP_CHUNK)
            assert ray.get(client.tcp_echo.remote(vip, TCP_PORT, TCP_CHUNK), timeout=30) == TCP_CHUNK
            tcp_bytes += 2 * len(TCP_CHUNK)
            if rnd % SHORT_TCP_EVERY == 0:
                with socket.create_connection((vip, TCP_PORT), timeout=10) as short:
                    _echo(short, TCP_CHUNK)
                tcp_bytes += len(TCP_CHUNK)
            time.sleep(0.01)
    return sent, tcp_bytes


def wait_for_client_identity(mesh, timeout: float = 30.0) -> None:
    """Node 0's proxy holds the client workload's SVID (pushed within the worker's refresh)."""
    proxy = ray.get_actor(proxy_actor_name(mesh.nodes[0]), namespace=RAY_NAMESPACE)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if CLIENT_ID in ray.get(proxy.status.remote(), timeout=10)["stats"]["mtls"]["identities"]:
            return
        time.sleep(0.2)
    raise TimeoutError(f"node 0's proxy never got an SVID for {CLIENT_ID}")


def wait_for(prom: PrometheusServer, expr: str, done: Callable[[float], bool], timeout: float) -> float:
    value, deadline = float("nan"), time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = prom.query(expr)
        value = float(result[0]["value"][1]) if result else float("nan")
        if done(value):
            return value
        time.sleep(0.5)
    raise AssertionError(f"{expr} = {value} after {timeout}s")


def test_istio_dashboards_show_mesh_traffic(mesh, prometheus: PrometheusServer) -> None:
    queries = {name: panel_queries(name, load_dashboard(ISTIO_DASHBOARDS / name))
               for name in (SERVICE_DASHBOARD, WORKLOAD_DASHBOARD, MESH_DASHBOARD)}
    ours = {name: load_dashboard(OUR_DASHBOARDS / name) for name in OURS}

    mesh.deploy(SERVICE, "v1", node_index=1)
    mesh.deploy_tcp(SERVICE, "v1", node_index=1, service_port=TCP_PORT)
    client = mesh.deploy(CLIENT, "v1", node_index=0)
    mesh.wait_endpoints(SERVICE, 2)
    wait_for_client_identity(mesh)
    vip = workload.service_vip(SERVICE)
    assert vip, f"{SERVICE} has no VIP"
    start = time.time() - 2
    sent, tcp_bytes = send_traffic(mesh, client, vip)
    wait_for(prometheus, f'sum(istio_requests_total{{reporter="destination",destination_service="{FQDN}"}})',
             lambda v: v == sent, timeout=15)
    for metric in ("istio_tcp_received_bytes_total", "istio_tcp_sent_bytes_total"):
        wait_for(prometheus, f'sum({metric}{{reporter="destination",destination_service="{FQDN}"}})',
                 lambda v: v == tcp_bytes, timeout=15)
    # Ray exports application metrics every few seconds: the mirror is the last to arrive.
    wait_for(prometheus, f'sum(ray_istio_requests_total{{reporter="destination",destination_service="{FQDN}"}})',
             lambda v: v == sent, timeout=20)
    wait_for(prometheus, f'sum(ray_istio_tcp_received_bytes_total{{reporter="destination",destination_service="{FQDN}"}})',
             lambda v: v == tcp_bytes, timeout=20)
    # A series Prometheus first saw at the last scrape has one sample, which rate() cannot use:
    # wait until every mirrored series has three (Ray exports on its own period, which may
    # fall after the traffic).
    for metric in ("ray_istio_requests_total", "ray_istio_tcp_received_bytes_total"):
        wait_for(prometheus, f'min(count_over_time({metric}{{destination_service="{FQDN}"}}[1m]))',
                 lambda v: v >= 3, timeout=15)
    end = time.time()

    resolved = views(prometheus)
    outcomes: dict[tuple[str, str, int, str], Outcome] = {}
    report: list[str] = []
    unexplained: list[str] = []
    for (name, view), values in resolved.items():
        for q in queries[name]:
            names = metric_names(q.expr)
            if not names <= EXPORTED | LEGACY or not names & EXPORTED:
                report.append(f"[{view}] {q.key}: not evaluated, uses {sorted(names - EXPORTED - LEGACY)}")
                continue
            o = evaluate(prometheus, q, view, values, start, end)
            outcomes[(name, view, q.panel_id, q.ref)] = o
            reason = None if o.has_data else why_empty(q.expr, values)
            report.append(f"[{view}] {q.key}: " + ("data" if o.has_data else f"no data: {reason}"))
            if not o.has_data and reason is None:
                unexplained.append(f"[{view}] {q.key}: {substitute(q.expr, values)}")
    print("\n".join(report))
    assert not unexplained, "panels with no data and no known reason:\n" + "\n".join(unexplained)

    for name, view, pid, refs, check in CORE:
        for ref in refs:
            o = outcomes.get((name, view, pid, ref))
            assert o is not None, f"core panel {name}#{pid}{ref} missing from the dashboard or not evaluated"
            assert o.has_data, f"core panel [{view}] {o.query.key}: no data"
            try:
                check(o)
            except AssertionError as exc:
                raise AssertionError(f"core panel [{view}] {o.query.key}: {exc}") from exc
    for ref, check in MESH_TABLE_REFS.items():
        o = outcomes[(MESH_DASHBOARD, "mesh", 6, ref)]
        ours_row = [s for s in o.series if s["metric"].get("destination_workload_var") == f"{WORKLOAD}.{NAMESPACE}"]
        assert ours_row, f"mesh table {ref}: no row for {WORKLOAD}.{NAMESPACE}: {o.series}"
        check(Outcome(o.query, o.view, ours_row))
    requests_row = [s for s in outcomes[(MESH_DASHBOARD, "mesh", 6, "requests")].series
                    if s["metric"].get("destination_workload") == WORKLOAD]
    assert {s["metric"]["destination_service"] for s in requests_row} == {FQDN}

    # Negative control: the same core panels for a service that got no traffic show nothing.
    absent = dict(resolved[(SERVICE_DASHBOARD, "destination")], service="absent.default.svc.cluster.local")
    for name, view, pid, refs, _ in CORE:
        if name == SERVICE_DASHBOARD and view == "destination":
            for ref in refs:
                q = outcomes[(name, view, pid, ref)].query
                assert not evaluate(prometheus, q, "absent", absent, start, end).has_data, q.key

    check_our_dashboards(prometheus, ours, start, end)


# -- raymesh's own dashboards --------------------------------------------------------------------

OUR_CHOICES = {"service": FQDN, "namespace": NAMESPACE, "workload": WORKLOAD, "qrep": "destination",
               "reporter": "destination"}


def check_our_dashboards(prom: PrometheusServer, ours: Mapping[str, dict[str, Any]], start: float,
                         end: float) -> None:
    """Every query of every raymesh dashboard returns data for this run's traffic (outbound panels of a
    workload that calls nothing excepted), with this run's service among the services it lists."""
    empty: list[str] = []
    for name, dashboard in ours.items():
        assert dashboard.get("uid") and dashboard.get("title"), f"{name}: needs a uid and a title"
        chosen = {k: v for k, v in OUR_CHOICES.items()
                  if any(var["name"] == k for var in dashboard.get("templating", {}).get("list", []))}
        values = resolve_variables(prom, dashboard, chosen)
        queries = panel_queries(name, dashboard)
        assert queries, f"{name}: no panel queries"
        for q in queries:
            o = evaluate(prom, q, "raymesh", values, start, end)
            if not o.has_data:
                if why_empty(q.expr, values) is None:
                    empty.append(f"{q.key}: {substitute(q.expr, values)}")
            elif (services := o.labels("destination_service") - {""}):
                assert FQDN in services, f"{q.key}: this run's service missing from {services}"
    assert not empty, "raymesh dashboard queries with no data:\n" + "\n".join(empty)
