"""Proxy data-plane benchmark: raymesh's proxy against nginx, on loopback, in one run.

What it measures (1 KiB responses, HTTP/1.1 keep-alive on both sides):

* ``direct``   client -> origin
* ``one_hop``  client -> raymesh VIP listener -> origin.  The snapshot is what Pilot emits
  for a VirtualService with five routes (header matches, a prefix match, a direct
  response, weighted splits, Istio's default retry policy) over LEAST_REQUEST clusters;
  the JSON access log is on, written to a file.
* ``one_hop_notel``  the same one-hop proxy started with ``--no-telemetry``: what Mixer's
  per-request rows cost is the difference (``telemetry_on_vs_off``, target >= 0.9).  Proxies
  with telemetry on are drained every second over their control socket, as the proxy
  worker drains them for Mixer, so the Arrow encoding is counted too.
* ``two_hop``  client -> raymesh A (VIP) -> tunnel (``CONNECT`` to B's inbound listener)
  -> raymesh B -> origin: the cross-node path, both proxies on the same core.
* ``two_hop_mtls``  the same with mutual TLS on the tunnel: h2load is a workload A knows by
  its pid (credentials pushed over the control channel, as the proxy worker does), so A
  presents its SVID to B, which verifies it.  Tunnels are pooled, so keep-alive traffic pays
  the handshakes once.
* ``nginx``    client -> nginx reverse proxy (same routes as maps/split_clients, upstream
  keep-alive, ``least_conn``, JSON access log on with a 64 KiB buffer) -> origin.

And new connections on the inbound listener (the cost a tunnel that cannot be reused pays):
sequential ``CONNECT`` tunnels to B, plaintext, mTLS with a full handshake, and mTLS
resuming the previous TLS session -> tunnels/s and B's CPU µs per tunnel.

For each row: (a) saturation throughput, ``h2load -t1 -c32`` for a fixed duration, and the
proxy's own CPU time from ``/proc/PID/stat`` -> CPU µs per request and req/s per proxy
core; (b) latency at a fixed 1000 req/s (10 clients x 100 req/s, evenly phased), p50/p90/p99
from h2load's per-request log.  Placement on a 2-core machine: every proxy on core 1;
client and origin share core 0 (the ``direct`` row shows that core 0 alone serves far
more than any proxy, so it is not what limits the proxied rows).  Rows alternate within
each round and the report takes medians over rounds, because a shared VM is noisy.

Proxy processes are launched as ``python -m proxy_core`` (the standalone entry point)
and stopped by their handles; nginx runs with its own config, pid and logs in a
temporary directory, ``master_process off`` so it is one process whose CPU time is
easy to read.

    .venv/bin/python benchmarks/proxy_bench.py [--rounds 3] [--profile 5]
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import importlib.metadata
import json
import math
import os
import platform
import re
import selectors
import shutil
import socket
import statistics
import subprocess
import sys
import ssl
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from mesh.identity import create_root_ca, key_pem, make_csr, new_workload_key, sign_csr, spiffe_id  # noqa: E402
from proxy_core import compiled_modules, control  # noqa: E402  (compiled_modules: recorded with the results)
from proxy_core.mtls import sni_for  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "proxy_bench.json"
BODY_SIZE = 1024
CLIENT_CORE = 0           # h2load and the origin
PROXY_CORE = 1            # every proxy under test
SERVICE = "bench.default.svc.cluster.local"
APT_PACKAGES = {"nginx": "nginx-light", "h2load": "nghttp2-client", "taskset": "util-linux"}
LATENCY_RATE = 1000       # req/s for the latency phase: 10 clients x 100 req/s
LATENCY_SKIP = 0.1        # fraction of the latency log dropped as warm-up
TUNNELS_PER_ROUND = 300   # sequential new tunnels per kind and round
CLK_TCK = os.sysconf("SC_CLK_TCK")
CLIENT_ID = spiffe_id("default", "bench-client")    # h2load, as a workload
SERVER_ID = spiffe_id("default", "bench")           # the origin's workload identity


# -- tools -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Tools:
    """External programs the benchmark drives; None where the machine lacks one."""

    nginx: str | None
    h2load: str | None
    taskset: str | None
    py_spy: str | None

    @classmethod
    def find(cls) -> "Tools":
        def which(name: str, *extra: str) -> str | None:
            found = shutil.which(name)
            if found:
                return found
            return next((p for p in extra if os.access(p, os.X_OK)), None)

        return cls(nginx=which("nginx", "/usr/sbin/nginx"), h2load=which("h2load"), taskset=which("taskset"),
                   py_spy=which("py-spy", str(Path(sys.executable).parent / "py-spy")))

    def missing(self) -> list[str]:
        return [f"{name} (apt install {pkg})" for name, pkg in APT_PACKAGES.items() if getattr(self, name) is None]

    def pin(self, argv: list[str], core: int) -> list[str]:
        """``taskset -c core argv``: taskset execs, so the pid is the program's own."""
        return [self.taskset, "-c", str(core), *argv] if self.taskset else argv


# -- child processes -------------------------------------------------------------------------


class Child:
    """A process this benchmark started: CPU accounting and a stop by its own handle."""

    def __init__(self, name: str, argv: list[str], workdir: Path) -> None:
        self.name = name
        self.stderr_path = workdir / f"{name}.stderr"
        self._stderr = open(self.stderr_path, "wb")
        try:
            self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=self._stderr, cwd=ROOT,
                                         stdin=subprocess.DEVNULL)
        except BaseException:
            self._stderr.close()
            raise

    @property
    def pid(self) -> int:
        return self.proc.pid

    def cpu_seconds(self) -> tuple[float, float]:
        """(user, system) CPU time so far: fields 14 and 15 of /proc/PID/stat.

        Kept apart because system time is mostly the loopback TCP stack, the same for
        every proxy, while user time is what the proxy's own code costs.
        """
        with open(f"/proc/{self.pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[11]) / CLK_TCK, int(fields[12]) / CLK_TCK

    def read_ready(self, timeout: float = 15.0) -> dict[str, Any]:
        """Wait for the ``{"event": "ready", ...}`` line the program prints once bound."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        buf = b""
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            while b"\n" not in buf:
                left = deadline - time.monotonic()
                if left <= 0 or self.proc.poll() is not None or not sel.select(left):
                    raise RuntimeError(f"{self.name} did not become ready: {self.stderr_tail()}")
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    raise RuntimeError(f"{self.name} exited: {self.stderr_tail()}")
                buf += chunk
        return json.loads(buf.split(b"\n", 1)[0])

    def stderr_tail(self) -> str:
        self._stderr.flush()
        return self.stderr_path.read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr.close()


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def wait_port(host: str, port: int, child: Child, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.proc.poll() is not None:
            break
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
            return
        time.sleep(0.05)
    raise RuntimeError(f"{child.name} is not listening on {host}:{port}: {child.stderr_tail()}")


# -- origin and nginx configuration ----------------------------------------------------------


def _nginx_common(workdir: Path, name: str) -> str:
    (workdir / f"{name}-tmp").mkdir(exist_ok=True)
    return (f"daemon off;\nmaster_process off;\nworker_processes 1;\npid {workdir / name}.pid;\n"
            f"error_log {workdir / name}-error.log warn;\n"
            "events { worker_connections 4096; }\n")


def _nginx_http_common(workdir: Path, name: str) -> str:
    temp = workdir / f"{name}-tmp"
    return (f"client_body_temp_path {temp}/body; proxy_temp_path {temp}/proxy; fastcgi_temp_path {temp}/fcgi;\n"
            f"uwsgi_temp_path {temp}/uwsgi; scgi_temp_path {temp}/scgi;\n"
            "keepalive_requests 10000000; keepalive_timeout 300s;\n")


def origin_nginx_conf(workdir: Path, ports: list[int]) -> str:
    listens = "".join(f"    listen 127.0.0.1:{p} reuseport backlog=1024;\n" for p in ports)
    return (_nginx_common(workdir, "origin")
            + "http {\n" + _nginx_http_common(workdir, "origin") + "  access_log off;\n"
            + "  server {\n" + listens
            + "    location / { default_type application/octet-stream; return 200 \"" + "x" * BODY_SIZE + "\"; }\n"
            + "  }\n}\n")


def proxy_nginx_conf(workdir: Path, port: int, v1: list[int], v2: list[int], access_log: Path) -> str:
    """nginx doing the work the raymesh snapshot asks for: the same five routes and splits."""
    v1_servers = "".join(f"    server 127.0.0.1:{p};\n" for p in v1)
    v2_servers = "".join(f"    server 127.0.0.1:{p};\n" for p in v2)
    return (_nginx_common(workdir, "nginx-proxy") + "http {\n" + _nginx_http_common(workdir, "nginx-proxy") + f"""
  log_format mesh escape=json '{{"start_time":"$time_iso8601","method":"$request_method","path":"$request_uri",'
      '"protocol":"$server_protocol","response_code":$status,"bytes_received":$request_length,'
      '"bytes_sent":$bytes_sent,"duration":$request_time,"upstream_service_time":"$upstream_response_time",'
      '"x_forwarded_for":"$http_x_forwarded_for","user_agent":"$http_user_agent","request_id":"$request_id",'
      '"authority":"$host","upstream_host":"$upstream_addr","route_name":"$route_name",'
      '"downstream_remote_address":"$remote_addr:$remote_port"}}';
  access_log {access_log} mesh buffer=64k flush=1s;
  upstream v1 {{
    least_conn;
{v1_servers}    keepalive 64;
  }}
  upstream v2 {{
    least_conn;
{v2_servers}    keepalive 64;
  }}
  # Routes in VirtualService order: x-canary header, /admin, end-user header, /api/ split, default split.
  split_clients "${{request_id}}" $default_pool {{ 90% v1; * v2; }}
  split_clients "${{request_id}}api" $api_pool_split {{ 75% v1; * v2; }}
  map $http_x_canary $canary_pool {{ always v2; default ""; }}
  map $http_end_user $user_pool {{ jason v2; default $canary_pool; }}
  map $user_pool $pool {{ "" $default_pool; default $user_pool; }}
  map $user_pool $api_pool {{ "" $api_pool_split; default $user_pool; }}
  map $user_pool $route_name {{ "" default; default header; }}
  server {{
    listen 127.0.0.1:{port} reuseport backlog=1024;
    proxy_http_version 1.1;
    proxy_set_header Connection "";
    proxy_set_header Host {SERVICE};
    proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
    proxy_set_header X-Forwarded-Proto $scheme;
    proxy_set_header X-Request-Id $request_id;
    proxy_next_upstream error timeout http_503;
    proxy_next_upstream_tries 3;
    location /admin {{ return 403; }}
    location /api/ {{ proxy_pass http://$api_pool; }}
    location / {{ proxy_pass http://$pool; }}
  }}
}}
""")


def start_nginx(tools: Tools, workdir: Path, name: str, conf: str, core: int, port: int) -> Child:
    assert tools.nginx is not None
    path = workdir / f"{name}.conf"
    path.write_text(conf)
    child = Child(name, tools.pin([tools.nginx, "-e", str(workdir / f"{name}-error.log"), "-p", str(workdir),
                                   "-c", str(path)], core), workdir)
    try:
        wait_port("127.0.0.1", port, child)
    except BaseException:
        child.stop()
        raise
    return child


# -- raymesh snapshots -----------------------------------------------------------------------


def _cluster(port: int, subset: str, endpoints: list[dict[str, Any]]) -> dict[str, Any]:
    return {"service": SERVICE, "port": port, "subset": subset, "connect_timeout": 10.0,
            "lb": {"policy": "LEAST_REQUEST"}, "endpoints": endpoints}


def _endpoints(ports: list[int], version: str, node: str, via: int | None) -> list[dict[str, Any]]:
    return [{"address": "127.0.0.1", "port": p, "node": node, "labels": {"app": "bench", "version": version},
             "namespace": "default", "service_account": "bench", "mtls_mode": "PERMISSIVE",
             "via": {"address": "127.0.0.1", "port": via} if via is not None else None} for p in ports]


def outbound_snapshot(vip: str, vip_port: int, v1: list[int], v2: list[int], via: int | None) -> dict[str, Any]:
    """Node "a": one VIP, five routes (what Pilot compiles from a VirtualService), two subsets.

    ``via`` is node "b"'s inbound port: set, every endpoint lives on node b and is
    reached through its tunnel; None, the endpoints are dialled directly.
    """
    c_v1 = f"outbound|{vip_port}|v1|{SERVICE}"
    c_v2 = f"outbound|{vip_port}|v2|{SERVICE}"
    # Istio's default retry policy, which Pilot puts on every route without one.
    retries = {"attempts": 2, "retry_on": ["connect-failure", "refused-stream", "unavailable", "cancelled",
                                          "retriable-status-codes"], "retriable_status_codes": [503]}
    routes = [
        {"name": "canary-header", "match": [{"headers": {"x-canary": {"exact": "always"}}}],
         "route": [{"cluster": c_v2, "weight": 100}], "retries": retries},
        {"name": "admin-blocked", "match": [{"uri": {"prefix": "/admin"}}],
         "direct_response": {"status": 403, "body": "forbidden"}},
        {"name": "jason", "match": [{"headers": {"end-user": {"exact": "jason"}}}],
         "route": [{"cluster": c_v2, "weight": 100}], "retries": retries},
        {"name": "api-split", "match": [{"uri": {"prefix": "/api/"}}],
         "route": [{"cluster": c_v1, "weight": 75}, {"cluster": c_v2, "weight": 25}], "timeout": 5.0,
         "retries": retries},
        {"name": "default", "match": [{"uri": {"prefix": "/"}}],
         "route": [{"cluster": c_v1, "weight": 90}, {"cluster": c_v2, "weight": 10}], "retries": retries},
    ]
    node = "b" if via is not None else "a"
    return {
        "version": "bench.1", "node": {"id": "a", "ip": "127.0.0.1"}, "outbound_policy": "REGISTRY_ONLY",
        "vips": [{"address": vip, "port": vip_port, "host": SERVICE, "protocol": "http"}],
        "virtual_hosts": [{"name": f"{SERVICE}:{vip_port}", "host": SERVICE, "port": vip_port,
                           "domains": ["bench", "bench.default", SERVICE, vip], "routes": routes}],
        "clusters": {c_v1: _cluster(vip_port, "v1", _endpoints(v1, "v1", node, via)),
                     c_v2: _cluster(vip_port, "v2", _endpoints(v2, "v2", node, via))},
    }


def inbound_snapshot(vip_port: int, v1: list[int], v2: list[int]) -> dict[str, Any]:
    """Node "b": the inbound listener, and the same clusters with its endpoints local."""
    return {
        "version": "bench.1", "node": {"id": "b", "ip": "127.0.0.1"},
        "listeners": {"inbound": {"host": "127.0.0.1", "port": 0}},
        "clusters": {f"outbound|{vip_port}|v1|{SERVICE}": _cluster(vip_port, "v1", _endpoints(v1, "v1", "b", None)),
                     f"outbound|{vip_port}|v2|{SERVICE}": _cluster(vip_port, "v2", _endpoints(v2, "v2", "b", None))},
    }


TELEMETRY_INTERVAL = 1.0  # seconds, the proxy worker's flush interval


class TelemetryDrain:
    """Takes a proxy's telemetry batch every second over its control socket, as the proxy
    worker does for Mixer: without it the recorder fills up and then only counts drops,
    which would make telemetry look free."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = 0
        self.batches = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"drain-{path.name}", daemon=True)

    def start(self) -> "TelemetryDrain":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        try:
            while not self._stop.wait(TELEMETRY_INTERVAL):
                reply = control.call(str(self.path), {"op": "telemetry"})
                self.rows += int(reply.get("rows", 0))
                self.batches += 1
        except OSError as exc:  # the proxy went away: its row reports the failure
            self.error = str(exc)


def start_raymesh(tools: Tools, workdir: Path, name: str, snapshot: dict[str, Any],
                  telemetry: bool = True) -> tuple[Child, dict[str, Any], TelemetryDrain | None]:
    """A standalone proxy; with ``telemetry`` its rows are drained every second, else it
    runs with ``--no-telemetry``."""
    snap_path = workdir / f"{name}.json"
    snap_path.write_text(json.dumps(snapshot, indent=1))
    control = workdir / f"{name}.sock"
    extra = ["--control", str(control)] if telemetry else ["--no-telemetry"]
    argv = tools.pin([sys.executable, "-m", "proxy_core", "--snapshot", str(snap_path),
                      "--access-log", str(workdir / f"{name}-access.log"), "--grace", "1", *extra], PROXY_CORE)
    child = Child(name, argv, workdir)
    try:
        ready = child.read_ready()
        return child, ready, TelemetryDrain(control).start() if telemetry else None
    except BaseException:
        child.stop()
        raise


# -- mTLS material ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MeshCredentials:
    """A root CA and the SVIDs of the mTLS rows, pushed as the proxy worker pushes them."""

    root_pem: str
    client: dict[str, Any]      # h2load's SVID, presented by A
    server: dict[str, Any]      # the origin workload's SVID, presented by B

    @classmethod
    def issue(cls) -> "MeshCredentials":
        ca = create_root_ca()

        def svid(sid: str) -> dict[str, Any]:
            key = new_workload_key()
            return {"spiffe_id": sid, "cert_chain": [sign_csr(ca, make_csr(key, sid), sid)], "key": key_pem(key),
                    "expires": 0}

        return cls(ca.cert_pem, svid(CLIENT_ID), svid(SERVER_ID))

    def push(self, control_path: Path, svid: dict[str, Any], pids: dict[int, str]) -> None:
        reply = control.call(str(control_path), {
            "op": "credentials", "trust_domain": "cluster.local", "roots": [self.root_pem], "svids": [svid],
            "workloads": [[pid, sid, {"service": "bench-client", "namespace": "default", "labels": {}}]
                          for pid, sid in pids.items()]})
        if not reply.get("ok"):
            raise RuntimeError(f"credentials refused: {reply}")

    def client_context(self, workdir: Path) -> ssl.SSLContext:
        """What a workload holding the client SVID would dial B's inbound listener with."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.load_verify_locations(cadata=self.root_pem)
        cert, key = workdir / "client-svid.pem", workdir / "client-key.pem"
        cert.write_text("".join(self.client["cert_chain"]))
        key.write_text(self.client["key"])
        ctx.load_cert_chain(cert, key)
        return ctx


# -- load generation -------------------------------------------------------------------------


@dataclass(slots=True)
class Throughput:
    rps: float
    requests: int
    failed: int
    proxy_cpu_s: float
    wall_s: float
    cpu_us_per_req: float | None
    user_us_per_req: float | None
    sys_us_per_req: float | None
    rps_per_proxy_core: float | None
    proxy_cpu_util: float | None


@dataclass(slots=True)
class Latency:
    p50_us: float
    p90_us: float
    p99_us: float
    samples: int
    failed: int
    achieved_rps: float
    cpu_us_per_req: float | None


_FINISHED = re.compile(r"finished in [\d.]+m?s, ([\d.]+) req/s")
_REQUESTS = re.compile(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded")
_STATUS_2XX = re.compile(r"status codes: (\d+) 2xx")


Identify = Callable[[int], None]     # names h2load's pid to the proxy before it sends anything


def _h2load(tools: Tools, args: list[str], timeout: float, identify: Identify | None = None) -> str:
    assert tools.h2load is not None
    argv = [tools.h2load, "--h1", "-t1", *args]
    if identify is None:
        out = subprocess.run(tools.pin(argv, CLIENT_CORE), capture_output=True, text=True, timeout=timeout,
                             check=False)
        code, stdout, stderr = out.returncode, out.stdout, out.stderr
    else:
        # The proxy knows a workload by the pid owning the connection: start a shell that waits,
        # name its pid, then let it exec h2load (exec keeps the pid).
        proc = subprocess.Popen(tools.pin(["sh", "-c", 'read _ && exec "$@"', "sh", *argv], CLIENT_CORE),
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            identify(proc.pid)
            stdout, stderr = proc.communicate("go\n", timeout=timeout)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        code = proc.returncode
    if code != 0 or not _FINISHED.search(stdout):
        raise RuntimeError(f"h2load failed ({code}): {stdout[-800:]} {stderr[-800:]}")
    return stdout


def _cpu(children: tuple[Child, ...]) -> tuple[float, float]:
    times = [c.cpu_seconds() for c in children]
    return sum(t[0] for t in times), sum(t[1] for t in times)


def measure_throughput(tools: Tools, url: str, proxies: tuple[Child, ...], duration: float,
                       connections: int, identify: Identify | None = None) -> Throughput:
    (user0, sys0), t0 = _cpu(proxies), time.monotonic()
    text = _h2load(tools, [f"-c{connections}", f"-D{duration:g}", url], timeout=duration + 30, identify=identify)
    (user1, sys1), wall = _cpu(proxies), time.monotonic() - t0
    user, system = user1 - user0, sys1 - sys0
    cpu = user + system
    finished = _FINISHED.search(text)
    reqs = _REQUESTS.search(text)
    ok = _STATUS_2XX.search(text)
    assert finished and reqs and ok
    done, good = int(reqs.group(3)), int(ok.group(1))
    per_req = cpu / done * 1e6 if proxies and done else None
    return Throughput(rps=float(finished.group(1)), requests=done, failed=done - good, proxy_cpu_s=round(cpu, 3),
                      wall_s=round(wall, 3), cpu_us_per_req=round(per_req, 2) if per_req else None,
                      user_us_per_req=round(user / done * 1e6, 2) if proxies and done else None,
                      sys_us_per_req=round(system / done * 1e6, 2) if proxies and done else None,
                      rps_per_proxy_core=round(1e6 / per_req) if per_req else None,
                      proxy_cpu_util=round(cpu / wall, 3) if proxies else None)


def percentile(sorted_values: list[int], p: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return float(sorted_values[max(0, math.ceil(p / 100 * len(sorted_values)) - 1)])


def measure_latency(tools: Tools, url: str, proxies: tuple[Child, ...], requests: int, workdir: Path,
                    identify: Identify | None = None) -> Latency:
    log_path = workdir / "latency.log"
    log_path.unlink(missing_ok=True)  # h2load appends to an existing log file
    clients = 10
    cpu0 = sum(_cpu(proxies))
    text = _h2load(tools, [f"-c{clients}", f"--rps={LATENCY_RATE // clients}", "-r", "1", "--rate-period=1ms",
                           f"-n{requests}", f"--log-file={log_path}", url], timeout=requests / LATENCY_RATE + 30,
                   identify=identify)
    cpu = sum(_cpu(proxies)) - cpu0
    finished = _FINISHED.search(text)
    assert finished
    rows = [line.split("\t") for line in log_path.read_text().splitlines() if line]
    rows.sort(key=lambda r: int(r[0]))
    rows = rows[int(len(rows) * LATENCY_SKIP):]
    ok = sorted(int(r[2]) for r in rows if r[1].startswith("2"))
    if not ok:
        raise RuntimeError(f"no successful requests at fixed rate: {text[-800:]}")
    return Latency(p50_us=percentile(ok, 50), p90_us=percentile(ok, 90), p99_us=percentile(ok, 99), samples=len(ok),
                   failed=len(rows) - len(ok), achieved_rps=float(finished.group(1)),
                   cpu_us_per_req=round(cpu / len(rows) * 1e6, 1) if proxies else None)


# -- scenarios -------------------------------------------------------------------------------


@dataclass(slots=True)
class Scenario:
    name: str
    description: str
    url: str
    proxies: tuple[Child, ...]
    access_logs: tuple[Path, ...] = ()
    identify: Identify | None = None       # set when the client must be a known workload (mTLS)
    throughput: list[Throughput] = field(default_factory=list)
    latency: list[Latency] = field(default_factory=list)


@dataclass(slots=True)
class Tunnels:
    """One round of sequential new tunnels to the inbound listener."""

    tunnels_per_s: float
    inbound_cpu_us_per_tunnel: float
    resumed: int
    count: int


def open_tunnels(inbound: int, target: int, proxy: Child, count: int, ctx: ssl.SSLContext | None,
                 resume: bool = False) -> Tunnels:
    """``count`` tunnels one after another: connect, (TLS handshake,) ``CONNECT``, read the 200,
    close.  With ``resume`` each TLS connection offers the previous one's session."""
    request = b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % (target, target)
    session: ssl.SSLSession | None = None
    resumed = 0
    cpu0, t0 = sum(proxy.cpu_seconds()), time.monotonic()
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", inbound), timeout=10)
        try:
            if ctx is not None:
                sock = ctx.wrap_socket(sock, server_hostname=sni_for(SERVER_ID), session=session)
            sock.sendall(request)
            head = sock.recv(4096)
            if not head.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(f"tunnel refused: {head[:200]!r}")
            if isinstance(sock, ssl.SSLSocket):
                resumed += sock.session_reused
                if resume:
                    session = sock.session
        finally:
            sock.close()
    wall, cpu = time.monotonic() - t0, sum(proxy.cpu_seconds()) - cpu0
    return Tunnels(round(count / wall, 1), round(cpu / count * 1e6, 1), resumed, count)


@dataclass(slots=True)
class Bench:
    """Starts the origin and every proxy, keeps them running across rounds, stops them all."""

    tools: Tools
    workdir: Path
    children: list[Child] = field(default_factory=list)
    scenarios: list[Scenario] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    origin_kind: str = ""
    tunnel_kinds: dict[str, Callable[[], Tunnels]] = field(default_factory=dict)
    tunnels: dict[str, list[Tunnels]] = field(default_factory=dict)
    drains: dict[str, TelemetryDrain] = field(default_factory=dict)

    def _keep(self, child: Child) -> Child:
        self.children.append(child)
        return child

    def _raymesh(self, name: str, snapshot: dict[str, Any], telemetry: bool = True) -> tuple[Child, dict[str, Any]]:
        child, ready, drain = start_raymesh(self.tools, self.workdir, name, snapshot, telemetry)
        self._keep(child)
        if drain is not None:
            self.drains[name] = drain
        return child, ready

    def start(self) -> None:
        tools, wd = self.tools, self.workdir
        # Three origin ports on one origin process: subset v1 has two endpoints, v2 one.
        if tools.nginx is not None:
            ports = [free_port() for _ in range(3)]
            self._keep(start_nginx(tools, wd, "origin", origin_nginx_conf(wd, ports), CLIENT_CORE, ports[-1]))
            self.origin_kind = "nginx (1 process, return 200 with a 1 KiB body)"
        else:
            origin = self._keep(Child("origin", tools.pin([sys.executable, str(ROOT / "benchmarks" / "upstream.py"),
                                                           "--port", "0", "--port", "0", "--port", "0"],
                                                          CLIENT_CORE), wd))
            ports = origin.read_ready()["ports"]
            self.origin_kind = "benchmarks/upstream.py (uvloop + httptools; nginx missing)"
        v1, v2 = ports[:2], ports[2:]
        self.scenarios.append(Scenario("direct", "client -> origin", f"http://127.0.0.1:{v1[0]}/", ()))

        vip1 = "127.77.250.1"
        vip_port = free_port(vip1)
        one = self._raymesh("raymesh-one-hop", outbound_snapshot(vip1, vip_port, v1, v2, None))[0]
        self.scenarios.append(Scenario("one_hop", "client -> raymesh VIP -> origin",
                                       f"http://{vip1}:{vip_port}/", (one,),
                                       (wd / "raymesh-one-hop-access.log",)))
        vip3 = "127.77.250.3"
        vip3_port = free_port(vip3)
        notel = self._raymesh("raymesh-one-hop-notel", outbound_snapshot(vip3, vip3_port, v1, v2, None),
                              telemetry=False)[0]
        self.scenarios.append(Scenario("one_hop_notel", "client -> raymesh VIP (--no-telemetry) -> origin",
                                       f"http://{vip3}:{vip3_port}/", (notel,),
                                       (wd / "raymesh-one-hop-notel-access.log",)))

        b, ready_b = self._raymesh("raymesh-b", inbound_snapshot(vip_port, v1, v2))
        vip2 = "127.77.250.2"
        vip2_port = free_port(vip2)
        a = self._raymesh("raymesh-a", outbound_snapshot(vip2, vip2_port, v1, v2,
                                                         int(ready_b["ports"]["inbound"])))[0]
        self.scenarios.append(Scenario("two_hop", "client -> raymesh A (VIP) -> tunnel -> raymesh B -> origin",
                                       f"http://{vip2}:{vip2_port}/", (a, b),
                                       (wd / "raymesh-a-access.log", wd / "raymesh-b-access.log")))
        self._start_mtls(vip_port, v1, v2)

        if tools.nginx is None:
            self.skipped["nginx"] = f"nginx not installed (apt install {APT_PACKAGES['nginx']})"
        else:
            port = free_port()
            log = wd / "nginx-access.log"
            ngx = self._keep(start_nginx(tools, wd, "nginx-proxy", proxy_nginx_conf(wd, port, v1, v2, log),
                                         PROXY_CORE, port))
            self.scenarios.append(Scenario("nginx", "client -> nginx reverse proxy -> origin",
                                           f"http://127.0.0.1:{port}/", (ngx,), (log,)))

    def _start_mtls(self, vip_port: int, v1: list[int], v2: list[int]) -> None:
        """The two-hop pair again, with SVIDs: A presents h2load's (it knows h2load's pid), B the
        origin's; and the new-tunnel measurements on this B's inbound listener."""
        wd = self.workdir
        creds = MeshCredentials.issue()
        # Each proxy's control socket (start_raymesh) also takes the credentials pushes.
        ctl_a, ctl_b = wd / "raymesh-mtls-a.sock", wd / "raymesh-mtls-b.sock"
        b, ready_b = self._raymesh("raymesh-mtls-b", inbound_snapshot(vip_port, v1, v2))
        creds.push(ctl_b, creds.server, {})
        inbound = int(ready_b["ports"]["inbound"])
        vip = "127.77.250.4"
        port = free_port(vip)
        a = self._raymesh("raymesh-mtls-a", outbound_snapshot(vip, port, v1, v2, inbound))[0]
        self.scenarios.append(Scenario(
            "two_hop_mtls", "client (a workload) -> raymesh A (VIP) -> mTLS tunnel -> raymesh B -> origin",
            f"http://{vip}:{port}/", (a, b), (wd / "raymesh-mtls-a-access.log", wd / "raymesh-mtls-b-access.log"),
            identify=lambda pid: creds.push(ctl_a, creds.client, {pid: CLIENT_ID})))
        ctx = creds.client_context(wd)
        self.tunnel_kinds = {
            "plaintext": lambda: open_tunnels(inbound, v1[0], b, TUNNELS_PER_ROUND, None),
            "mtls_full_handshake": lambda: open_tunnels(inbound, v1[0], b, TUNNELS_PER_ROUND, ctx),
            "mtls_resumed": lambda: open_tunnels(inbound, v1[0], b, TUNNELS_PER_ROUND, ctx, resume=True),
        }

    def stop(self) -> None:
        for drain in self.drains.values():
            drain.stop()
        for child in reversed(self.children):
            child.stop()

    def scenario(self, name: str) -> Scenario | None:
        return next((s for s in self.scenarios if s.name == name), None)


# -- reporting -------------------------------------------------------------------------------


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return round(statistics.median(present), 2) if present else None


def _spread(values: list[float | None]) -> list[float] | None:
    present = [v for v in values if v is not None]
    return [min(present), max(present)] if present else None


def summarize(bench: Bench) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for s in bench.scenarios:
        rows[s.name] = {
            "description": s.description,
            "rps": _median([t.rps for t in s.throughput]),
            "rps_range": _spread([t.rps for t in s.throughput]),
            "cpu_us_per_req": _median([t.cpu_us_per_req for t in s.throughput]),
            "user_us_per_req": _median([t.user_us_per_req for t in s.throughput]),
            "sys_us_per_req": _median([t.sys_us_per_req for t in s.throughput]),
            "rps_per_proxy_core": _median([t.rps_per_proxy_core for t in s.throughput]),
            "rps_per_proxy_core_range": _spread([t.rps_per_proxy_core for t in s.throughput]),
            "proxy_cpu_util": _median([t.proxy_cpu_util for t in s.throughput]),
            "failed": sum(t.failed for t in s.throughput) + sum(lat.failed for lat in s.latency),
            "p50_us": _median([lat.p50_us for lat in s.latency]),
            "p90_us": _median([lat.p90_us for lat in s.latency]),
            "p99_us": _median([lat.p99_us for lat in s.latency]),
            "p50_range": _spread([lat.p50_us for lat in s.latency]),
            "p99_range": _spread([lat.p99_us for lat in s.latency]),
            "cpu_us_per_req_at_1000rps": _median([lat.cpu_us_per_req for lat in s.latency]),
            "rounds": {"throughput": [asdict(t) for t in s.throughput], "latency": [asdict(lat) for lat in s.latency]},
        }
    direct = rows.get("direct")
    for name, row in rows.items():
        if name != "direct" and direct and row["p50_us"] is not None and direct["p50_us"] is not None:
            row["added_p50_us"] = round(row["p50_us"] - direct["p50_us"], 1)
            row["added_p90_us"] = round(row["p90_us"] - direct["p90_us"], 1)
    return rows


def ratios(rows: dict[str, Any]) -> dict[str, Any]:
    """raymesh one-hop against nginx, and with telemetry on against off, from the medians of the same run."""
    one, ngx, notel = rows.get("one_hop"), rows.get("nginx"), rows.get("one_hop_notel")
    out: dict[str, Any] = {}
    if one and notel and one["rps_per_proxy_core"] and notel["rps_per_proxy_core"]:
        out["telemetry_on_vs_off"] = round(one["rps_per_proxy_core"] / notel["rps_per_proxy_core"], 3)
        out["telemetry_on_vs_off_target"] = ">= 0.9"
    if not one or not ngx:
        return out
    if one["rps_per_proxy_core"] and ngx["rps_per_proxy_core"]:
        out["rps_per_core_vs_nginx"] = round(one["rps_per_proxy_core"] / ngx["rps_per_proxy_core"], 3)
        out["rps_per_core_target"] = ">= 0.5"
    if one["rps"] and ngx["rps"]:
        out["raw_rps_vs_nginx"] = round(one["rps"] / ngx["rps"], 3)
    if one.get("added_p50_us") is not None and ngx.get("added_p50_us"):
        out["added_p50_vs_nginx"] = round(one["added_p50_us"] / ngx["added_p50_us"], 3)
        out["added_p50_target"] = "<= 1.5"
    return out


def _fmt(v: float | None, digits: int = 0) -> str:
    return "-" if v is None else f"{v:,.{digits}f}"


def print_table(rows: dict[str, Any], skipped: dict[str, str], rt: dict[str, Any]) -> None:
    head = (f"{'row':<14}{'req/s':>10}{'range':>17}{'proxy CPU':>10}{'µs/req':>8}{'usr+sys':>12}{'req/s/core':>11}"
            f"{'p50 µs':>8}{'p90 µs':>8}{'p99 µs':>8}{'+p50 µs':>9}{'fail':>6}")
    print(head)
    print("-" * len(head))
    for name, r in rows.items():
        rng = f"{r['rps_range'][0]:,.0f}-{r['rps_range'][1]:,.0f}" if r["rps_range"] else "-"
        util = f"{r['proxy_cpu_util'] * 100:.0f}%" if r["proxy_cpu_util"] is not None else "-"
        split = f"{r['user_us_per_req']:.0f}+{r['sys_us_per_req']:.0f}" if r["user_us_per_req"] is not None else "-"
        print(f"{name:<14}{_fmt(r['rps']):>10}{rng:>17}{util:>10}{_fmt(r['cpu_us_per_req'], 1):>8}{split:>12}"
              f"{_fmt(r['rps_per_proxy_core']):>11}{_fmt(r['p50_us']):>8}{_fmt(r['p90_us']):>8}"
              f"{_fmt(r['p99_us']):>8}{_fmt(r.get('added_p50_us')):>9}{r['failed']:>6}")
    for name, why in skipped.items():
        print(f"{name:<14}skipped: {why}")
    if "telemetry_on_vs_off" in rt:
        print(f"\nraymesh one-hop, telemetry on / off: req/s per proxy core {rt['telemetry_on_vs_off']} (target >= 0.9)")
    if "rps_per_core_vs_nginx" in rt:
        print(f"\nraymesh one-hop / nginx: req/s per proxy core {rt.get('rps_per_core_vs_nginx')} (target >= 0.5), "
              f"raw req/s {rt.get('raw_rps_vs_nginx')}, added p50 {rt.get('added_p50_vs_nginx')} (target <= 1.5)")


def machine_info(tools: Tools) -> dict[str, Any]:
    def version(argv: list[str]) -> str | None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
            return (out.stdout + out.stderr).strip().splitlines()[0]
        return None

    def pkg(name: str) -> str | None:
        with contextlib.suppress(importlib.metadata.PackageNotFoundError):
            return importlib.metadata.version(name)
        return None

    cpu_model = ""
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu_model = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), "")
    commit = version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "cpu_model": cpu_model, "nproc": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "uvloop": pkg("uvloop"), "httptools": pkg("httptools"),
            "nginx": version([tools.nginx, "-v"]) if tools.nginx else None,
            "h2load": version([tools.h2load, "--version"]) if tools.h2load else None,
            "git_commit": commit, "proxy_core_compiled": compiled_modules(),
            "loadavg_start": os.getloadavg()[0]}


def hot_spots(profile_path: Path, top: int = 20) -> dict[str, Any]:
    """Self and inclusive sample shares per function from py-spy's collapsed stacks."""
    self_count: dict[str, int] = {}
    incl_count: dict[str, int] = {}
    total = 0
    for line in profile_path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = [re.sub(r" \(/.*/(site-packages|lib/python3\.\d+|work/main)/", " (", f) for f in stack.split(";")]
        total += count
        self_count[frames[-1]] = self_count.get(frames[-1], 0) + count
        for f in set(frames):
            incl_count[f] = incl_count.get(f, 0) + count

    def ranked(counts: dict[str, int]) -> list[list[Any]]:
        return [[f, round(c / total * 100, 1)] for f, c in sorted(counts.items(), key=lambda x: -x[1])[:top]]

    return {"samples": total, "self_percent": ranked(self_count), "inclusive_percent": ranked(incl_count)}


def profile_proxy(tools: Tools, scenario: Scenario, seconds: float, connections: int,
                  workdir: Path) -> dict[str, Any]:
    """Sample the proxy with py-spy (attached by pid, after the measured rounds) under saturation load."""
    if tools.py_spy is None:
        return {"skipped": "py-spy not installed (pip install py-spy)"}
    out = workdir / "profile.txt"
    spy = subprocess.Popen([tools.py_spy, "record", "--pid", str(scenario.proxies[0].pid), "--nonblocking",
                            "--function", "--rate", "250", "--format", "raw", "--duration", f"{math.ceil(seconds)}",
                            "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(0.5)  # let py-spy attach before the load starts
        measure_throughput(tools, scenario.url, scenario.proxies, seconds, connections)
        _, err = spy.communicate(timeout=seconds + 30)
    finally:
        if spy.poll() is None:
            spy.kill()
            spy.wait()
    if not out.exists():
        return {"skipped": f"py-spy failed: {err.decode(errors='replace')[-500:]}"}
    return hot_spots(out)


# -- main ------------------------------------------------------------------------------------


def run(args: argparse.Namespace, tools: Tools, workdir: Path) -> dict[str, Any]:
    bench = Bench(tools, workdir)
    info = machine_info(tools)
    try:
        bench.start()
        print(f"origin: {bench.origin_kind}; pinning: {'taskset' if tools.taskset else 'none (taskset missing)'}",
              flush=True)
        for s in bench.scenarios:  # warm-up: upstream pools, caches, page faults
            measure_throughput(tools, s.url, s.proxies, 1.0, args.connections, s.identify)
        for rnd in range(args.rounds):
            # Rotate the order each round so no row always runs first or last.
            order = bench.scenarios[rnd % len(bench.scenarios):] + bench.scenarios[:rnd % len(bench.scenarios)]
            for s in order:
                s.throughput.append(measure_throughput(tools, s.url, s.proxies, args.duration, args.connections,
                                                       s.identify))
                s.latency.append(measure_latency(tools, s.url, s.proxies, args.latency_requests, workdir,
                                                 s.identify))
            for kind, measure in bench.tunnel_kinds.items():
                bench.tunnels.setdefault(kind, []).append(measure())
            print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(
                f"{s.name} {s.throughput[-1].rps:,.0f} req/s p50 {s.latency[-1].p50_us:.0f} µs"
                for s in bench.scenarios), flush=True)
        profile: dict[str, Any] | None = None
        one = bench.scenario("one_hop")
        if args.profile > 0 and one is not None:
            profile = profile_proxy(tools, one, args.profile, args.connections, workdir)
    finally:
        bench.stop()
    rows = summarize(bench)
    access_lines = {s.name: [sum(1 for _ in open(p, "rb")) if p.exists() else 0 for p in s.access_logs]
                    for s in bench.scenarios if s.access_logs}
    info["loadavg_end"] = os.getloadavg()[0]
    rt = ratios(rows)
    tunnels = {kind: {"tunnels_per_s": _median([t.tunnels_per_s for t in ts]),
                      "tunnels_per_s_range": _spread([t.tunnels_per_s for t in ts]),
                      "inbound_cpu_us_per_tunnel": _median([t.inbound_cpu_us_per_tunnel for t in ts]),
                      "resumed": sum(t.resumed for t in ts), "count": sum(t.count for t in ts)}
               for kind, ts in bench.tunnels.items()}
    drained = {name: {"rows": d.rows, "batches": d.batches, "error": d.error} for name, d in bench.drains.items()}
    return {"machine": info, "origin": bench.origin_kind, "new_tunnels": tunnels,
            "setup": {"response_bytes": BODY_SIZE, "client_core": CLIENT_CORE, "origin_core": CLIENT_CORE,
                      "proxy_core": PROXY_CORE, "pinned": tools.taskset is not None, "rounds": args.rounds,
                      "throughput": f"h2load --h1 -t1 -c{args.connections} -D{args.duration:g}",
                      "latency": f"h2load --h1 -t1 -c10 --rps=100 -r 1 --rate-period=1ms -n{args.latency_requests}"
                                 f" (first {LATENCY_SKIP:.0%} dropped)",
                      "access_log": "on for every proxy (raymesh: JSON lines, batched; nginx: JSON, buffer=64k)",
                      "access_log_lines": access_lines,
                      "telemetry": f"drained every {TELEMETRY_INTERVAL:g} s over the control socket "
                                   "(one_hop_notel: --no-telemetry)",
                      "telemetry_drained": drained},
            "rows": rows, "ratios": rt, "skipped": bench.skipped, "profile": profile}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3, help="alternating rounds; medians are reported")
    p.add_argument("--duration", type=float, default=3.0, help="seconds per saturation run")
    p.add_argument("--connections", type=int, default=32, help="client connections for saturation runs")
    p.add_argument("--latency-requests", type=int, default=3000, help="requests per fixed-rate run (1000 req/s)")
    p.add_argument("--profile", type=float, default=0.0,
                   help="also sample the one-hop proxy with py-spy for this many seconds of saturation load")
    p.add_argument("--output", type=Path, default=RESULTS, help="where the JSON result goes")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    tools = Tools.find()
    for missing in tools.missing():
        print(f"missing: {missing}", file=sys.stderr)
    if tools.h2load is None:
        print("h2load is the load generator for every row: nothing measured", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="raymesh-bench-") as tmp:
        result = run(args, tools, Path(tmp))
    print()
    print_table(result["rows"], result["skipped"], result["ratios"])
    if result["new_tunnels"]:
        print(f"\nnew tunnels on the inbound listener (sequential, {TUNNELS_PER_ROUND} per round):")
        for kind, t in result["new_tunnels"].items():
            print(f"  {kind:<20}{_fmt(t['tunnels_per_s']):>8} tunnels/s  {_fmt(t['inbound_cpu_us_per_tunnel']):>6} "
                  f"µs inbound CPU per tunnel  ({t['resumed']}/{t['count']} sessions resumed)")
    if result["profile"] and "skipped" in result["profile"]:
        print(f"\nprofile skipped: {result['profile']['skipped']}")
    elif result["profile"]:
        print(f"\none-hop profile ({result['profile']['samples']} samples), self time:")
        for frame, pct in result["profile"]["self_percent"][:12]:
            print(f"  {pct:5.1f}%  {frame}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwritten: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
