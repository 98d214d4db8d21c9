"""What mutual TLS costs on the node-to-node hop, against plaintext, in one run (< 1 minute).

Four two-hop rows (client -> raymesh A (VIP) -> tunnel -> raymesh B -> origin, both proxies
pinned to one core, as in ``proxy_bench.py``):

* ``keepalive_plain`` / ``keepalive_mtls``: A pools its tunnels, so a request pays only the
  record layer (encrypt + decrypt on each proxy, both ways);
* ``newconn_plain`` / ``newconn_mtls``: the clusters carry ``maxRequestsPerConnection: 1``,
  so A opens a new tunnel for every request: TCP connect, TLS handshake (resumed when A
  holds a session ticket from B), ``CONNECT``, the request, close.

Per row: saturation req/s and the proxies' CPU µs per request (A + B, from /proc), and
p50/p99 at a fixed rate.  Then the handshake rate of B's inbound listener: sequential
tunnels opened by this process (plaintext, full mTLS handshake, resumed mTLS) -> tunnels/s
and B's CPU µs per tunnel.  Ratios mTLS / plaintext are from the same run; rows alternate
within a round and the medians over rounds are reported.  ``--profile N`` samples A and B
of one row (``--profile-row``, default the keep-alive mTLS one) with py-spy (``--native``) for N seconds afterwards.

    .venv/bin/python benchmarks/mtls_bench.py [--rounds 2] [--profile 3]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from proxy_bench import (CLIENT_CORE, CLIENT_ID, ROOT, SERVER_ID, Bench, MeshCredentials, Scenario,  # noqa: E402
                         Tools, _median, _spread, free_port, hot_spots, inbound_snapshot, machine_info,
                         measure_latency, measure_throughput, open_tunnels, origin_nginx_conf, outbound_snapshot,
                         start_nginx)

RESULTS = ROOT / "benchmarks" / "results" / "mtls_bench.json"
TUNNELS = 200                # sequential new tunnels per kind and round


def _one_request_per_tunnel(snapshot: dict[str, Any]) -> dict[str, Any]:
    """Every cluster of A retires a connection after one request (Istio's maxRequestsPerConnection: 1)."""
    for cluster in snapshot["clusters"].values():
        cluster["connection_pool"] = {"max_requests_per_connection": 1}
    return snapshot


class MtlsBench(Bench):
    """Two plaintext and two mTLS two-hop pairs on one origin; the handshake-rate kinds on one B."""

    def start(self) -> None:  # type: ignore[override]
        tools, wd = self.tools, self.workdir
        if tools.nginx is None:
            raise SystemExit("nginx is the origin of this benchmark (apt install nginx-light)")
        ports = [free_port() for _ in range(3)]
        self._keep(start_nginx(tools, wd, "origin", origin_nginx_conf(wd, ports), CLIENT_CORE, ports[-1]))
        self.origin_kind = "nginx (1 process, return 200 with a 1 KiB body)"
        v1, v2 = ports[:2], ports[2:]
        vip_port = free_port("127.77.251.1")
        creds = MeshCredentials.issue()
        for i, (name, mtls, newconn) in enumerate([("keepalive_plain", False, False), ("keepalive_mtls", True, False),
                                                   ("newconn_plain", False, True), ("newconn_mtls", True, True)]):
            b, ready_b = self._raymesh(f"{name}-b", inbound_snapshot(vip_port, v1, v2))
            inbound = int(ready_b["ports"]["inbound"])
            vip = f"127.77.251.{i + 1}"
            snap = outbound_snapshot(vip, vip_port, v1, v2, inbound)
            if newconn:
                snap = _one_request_per_tunnel(snap)
            a = self._raymesh(f"{name}-a", snap)[0]
            identify = None
            if mtls:
                creds.push(wd / f"{name}-b.sock", creds.server, {})
                ctl_a = wd / f"{name}-a.sock"
                identify = (lambda ctl: lambda pid: creds.push(ctl, creds.client, {pid: CLIENT_ID}))(ctl_a)
                if not newconn:
                    ctx = creds.client_context(wd)
                    self.tunnel_kinds = {
                        "plaintext": lambda: open_tunnels(inbound, v1[0], b, TUNNELS, None),
                        "mtls_full_handshake": lambda: open_tunnels(inbound, v1[0], b, TUNNELS, ctx),
                        "mtls_resumed": lambda: open_tunnels(inbound, v1[0], b, TUNNELS, ctx, resume=True),
                    }
            self.scenarios.append(Scenario(name, f"two hop, {'mTLS' if mtls else 'plaintext'} tunnel, "
                                                 f"{'one request per tunnel' if newconn else 'pooled tunnels'}",
                                           f"http://{vip}:{vip_port}/", (a, b), identify=identify))


def _row(s: Scenario) -> dict[str, Any]:
    return {"description": s.description,
            "rps": _median([t.rps for t in s.throughput]), "rps_range": _spread([t.rps for t in s.throughput]),
            "cpu_us_per_req": _median([t.cpu_us_per_req for t in s.throughput]),
            "cpu_us_per_req_range": _spread([t.cpu_us_per_req for t in s.throughput]),
            "user_us_per_req": _median([t.user_us_per_req for t in s.throughput]),
            "sys_us_per_req": _median([t.sys_us_per_req for t in s.throughput]),
            "p50_us": _median([lat.p50_us for lat in s.latency]), "p99_us": _median([lat.p99_us for lat in s.latency]),
            "failed": sum(t.failed for t in s.throughput) + sum(lat.failed for lat in s.latency),
            "rounds": {"throughput": [asdict(t) for t in s.throughput], "latency": [asdict(lat) for lat in s.latency]}}


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def ratios(rows: dict[str, Any], tunnels: dict[str, Any]) -> dict[str, Any]:
    """mTLS over plaintext, per case, from the same run's medians."""
    out: dict[str, Any] = {}
    for case in ("keepalive", "newconn"):
        plain, mtls = rows.get(f"{case}_plain"), rows.get(f"{case}_mtls")
        if plain and mtls:
            out[case] = {"cpu_per_req": _ratio(mtls["cpu_us_per_req"], plain["cpu_us_per_req"]),
                         "rps": _ratio(mtls["rps"], plain["rps"]), "p50": _ratio(mtls["p50_us"], plain["p50_us"]),
                         "p99": _ratio(mtls["p99_us"], plain["p99_us"])}
    plain_t = tunnels.get("plaintext", {}).get("inbound_cpu_us_per_tunnel")
    for kind in ("mtls_full_handshake", "mtls_resumed"):
        if kind in tunnels:
            out[f"{kind}_cpu_vs_plaintext_tunnel"] = _ratio(tunnels[kind]["inbound_cpu_us_per_tunnel"], plain_t)
    return out


def profile(tools: Tools, s: Scenario, seconds: float, connections: int, workdir: Path) -> dict[str, Any]:
    """py-spy ``--native`` on both proxies of ``s`` while it runs at saturation."""
    if tools.py_spy is None:
        return {"skipped": "py-spy not installed"}
    outs = [workdir / f"profile-{p.name}.txt" for p in s.proxies]
    spies = [subprocess.Popen([tools.py_spy, "record", "--pid", str(p.pid), "--native",
                               "--rate", "200", "--format", "raw", "--duration", str(int(seconds)),
                               "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
             for p, out in zip(s.proxies, outs)]
    try:
        time.sleep(0.5)
        measure_throughput(tools, s.url, s.proxies, seconds, connections, s.identify)
        for spy in spies:
            spy.communicate(timeout=seconds + 30)
    finally:
        for spy in spies:
            if spy.poll() is None:
                spy.kill()
                spy.wait()
    return {p.name: hot_spots(out) if out.exists() else {"skipped": "py-spy failed"}
            for p, out in zip(s.proxies, outs)}


def run(args: argparse.Namespace, tools: Tools, workdir: Path) -> dict[str, Any]:
    bench = MtlsBench(tools, workdir)
    info = machine_info(tools)
    prof: dict[str, Any] | None = None
    try:
        bench.start()
        for s in bench.scenarios:
            measure_throughput(tools, s.url, s.proxies, 1, args.connections, s.identify)
        for rnd in range(args.rounds):
            order = bench.scenarios[rnd % 4:] + bench.scenarios[:rnd % 4]
            for s in order:
                s.throughput.append(measure_throughput(tools, s.url, s.proxies, args.duration, args.connections,
                                                       s.identify))
                s.latency.append(measure_latency(tools, s.url, s.proxies, args.latency_requests, workdir,
                                                 s.identify))
            for kind, measure in bench.tunnel_kinds.items():
                bench.tunnels.setdefault(kind, []).append(measure())
        if args.profile > 0:
            prof = profile(tools, next(s for s in bench.scenarios if s.name == args.profile_row), args.profile,
                           args.connections, workdir)
    finally:
        bench.stop()
    info["loadavg_end"] = __import__("os").getloadavg()[0]
    rows = {s.name: _row(s) for s in bench.scenarios}
    tunnels = {kind: {"tunnels_per_s": _median([t.tunnels_per_s for t in ts]),
                      "inbound_cpu_us_per_tunnel": _median([t.inbound_cpu_us_per_tunnel for t in ts]),
                      "inbound_cpu_range": _spread([t.inbound_cpu_us_per_tunnel for t in ts]),
                      "resumed": sum(t.resumed for t in ts), "count": sum(t.count for t in ts)}
               for kind, ts in bench.tunnels.items()}
    return {"machine": info, "origin": bench.origin_kind,
            "setup": {"rounds": args.rounds, "throughput": f"h2load --h1 -t1 -c{args.connections} -D{args.duration:g}",
                      "latency": f"h2load --h1 -c10 at 1000 req/s, -n{args.latency_requests}",
                      "tunnels_per_kind_and_round": TUNNELS, "client_svid": CLIENT_ID, "server_svid": SERVER_ID},
            "rows": rows, "new_tunnels": tunnels, "ratios": ratios(rows, tunnels), "profile": prof}


def print_report(result: dict[str, Any]) -> None:
    head = f"{'row':<17}{'req/s':>9}{'CPU µs/req A+B':>16}{'usr+sys':>10}{'p50 µs':>8}{'p99 µs':>8}{'fail':>6}"
    print(head)
    print("-" * len(head))
    for name, r in result["rows"].items():
        split = f"{r['user_us_per_req']:.0f}+{r['sys_us_per_req']:.0f}" if r["user_us_per_req"] is not None else "-"
        print(f"{name:<17}{r['rps']:>9,.0f}{r['cpu_us_per_req']:>16.1f}{split:>10}{r['p50_us']:>8.0f}"
              f"{r['p99_us']:>8.0f}{r['failed']:>6}")
    print("\nnew tunnels on B's inbound listener (sequential):")
    for kind, t in result["new_tunnels"].items():
        print(f"  {kind:<20}{t['tunnels_per_s']:>8,.0f} tunnels/s {t['inbound_cpu_us_per_tunnel']:>8.0f} µs B CPU"
              f"  ({t['resumed']}/{t['count']} resumed)")
    print("\nmTLS / plaintext (same run):", json.dumps(result["ratios"]))
    for proxy, spots in (result["profile"] or {}).items():
        print(f"\n{proxy} ({spots.get('samples')} samples), self time:")
        for frame, pct in spots.get("self_percent", [])[:15]:
            print(f"  {pct:5.1f}%  {frame}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--duration", type=float, default=2.0, help="seconds per saturation run")
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--latency-requests", type=int, default=1500, help="requests per fixed-rate run (1000 req/s)")
    p.add_argument("--profile", type=float, default=0.0, help="py-spy --native A and B of one row for N s")
    p.add_argument("--profile-row", default="keepalive_mtls", help="the row --profile samples")
    p.add_argument("--output", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    tools = Tools.find()
    if tools.h2load is None:
        print("h2load is the load generator (apt install nghttp2-client)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="raymesh-mtls-bench-") as tmp:
        result = run(args, tools, Path(tmp))
    print_report(result)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwritten: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
