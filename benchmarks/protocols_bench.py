"""Protocols through one raymesh hop vs direct: HTTP/2, gRPC, WebSocket, raw TCP, idle memory.

    nice -n 10 .venv/bin/python benchmarks/protocols_bench.py [--seconds 5] [--idle 2000]

Every section is bounded (well under a minute with the defaults) and all traffic stays on
loopback.  One standalone proxy (``python -m proxy_core``, no access log, no telemetry)
serves a VIP per protocol, compiled as Pilot would (http2, grpc, http, tcp ports):

* ``h2``: ``h2load -c10 -m10`` (h2c, 10 streams per connection) for ``--seconds``, against
  nginx serving 1 KiB over h2c directly, then through the proxy (h2 in, h2 upstream);
* ``grpc``: a grpcio unary loop (``--grpc-threads`` threads on one channel, 64-byte
  messages) against ``tests/grpc_echo.py``'s server, direct and through the proxy;
* ``tcp``: one connection sends ``--tcp-mb`` MiB to a sink that counts and acknowledges:
  MB/s direct and through a tcp VIP;
* ``websocket``: ``websockets`` client and echo-less sink server, 64 KiB binary messages,
  MB/s direct and through an http VIP (Upgrade, then a spliced byte pipe);
* ``idle_memory`` (measured first, on the fresh proxy): its RSS (``/proc/PID/status``) before
  and after opening ``--idle`` idle HTTP/1.1 keep-alive connections (each having made one
  request), then as many idle TCP connections through the tcp VIP: KiB per connection.

The result goes to ``benchmarks/results/protocols.json`` (``--output``).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from proxy_bench import (ROOT, Child, Tools, _nginx_common, _nginx_http_common, free_port,  # noqa: E402
                         machine_info, start_nginx, wait_port)

VIP = "127.79.1.1"
HOST = "bench.default.svc.cluster.local"
BODY = 1024


# -- the peers -------------------------------------------------------------------------------


def nginx_conf(workdir: Path, h2_port: int, h1_port: int) -> str:
    """nginx answering 1 KiB: over h2c (prior knowledge) on ``h2_port``, HTTP/1.1 on ``h1_port``."""
    location = "    location / { default_type application/octet-stream; return 200 \"" + "x" * BODY + "\"; }\n"
    return (_nginx_common(workdir, "origin") + "http {\n" + _nginx_http_common(workdir, "origin")
            + "  access_log off; http2_max_requests 10000000;\n"
            + f"  server {{\n    listen 127.0.0.1:{h2_port} http2 reuseport backlog=1024;\n" + location + "  }\n"
            + f"  server {{\n    listen 127.0.0.1:{h1_port} reuseport backlog=4096;\n" + location + "  }\n}\n")


PEERS = r'''
import asyncio, sys, json
sys.path.insert(0, sys.argv[1])
from tests.grpc_echo import EchoServer
import websockets.asyncio.server as ws

async def sink(reader, writer):
    n = 0
    while data := await reader.read(1 << 20):
        n += len(data)
    writer.write(str(n).encode()); await writer.drain(); writer.close()

async def ws_sink(conn):
    n = 0
    async for msg in conn:
        n += len(msg)
        if msg == b"end":
            await conn.send(str(n).encode())

async def main():
    grpc_server = EchoServer().start()
    tcp = await asyncio.start_server(sink, "127.0.0.1", 0)
    wss = await ws.serve(ws_sink, "127.0.0.1", 0, max_size=None, compression=None)
    print(json.dumps({"event": "ready", "grpc": grpc_server.port, "tcp": tcp.sockets[0].getsockname()[1],
                      "ws": list(wss.sockets)[0].getsockname()[1]}), flush=True)
    await asyncio.Event().wait()

asyncio.run(main())
'''


def snapshot(ports: dict[str, int], origin_h2: int, origin_h1: int, peers: dict[str, int]) -> dict[str, Any]:
    def cl(port: int, protocol: str | None = None) -> dict[str, Any]:
        c: dict[str, Any] = {"service": HOST, "port": port, "connect_timeout": 2.0, "lb": {"policy": "ROUND_ROBIN"},
                             "endpoints": [{"address": "127.0.0.1", "port": port, "node": "n1", "via": None}]}
        if protocol:
            c["protocol"] = protocol
        return c

    targets = {"h2": (origin_h2, "http2"), "grpc": (peers["grpc"], "grpc"), "ws": (peers["ws"], "http"),
               "tcp": (peers["tcp"], "tcp"), "http": (origin_h1, "http")}
    clusters, vhosts, tcp_routes, vips = {}, [], [], []
    for name, (port, protocol) in targets.items():
        cname = f"outbound|{ports[name]}|{name}|{HOST}"
        clusters[cname] = cl(port, protocol if protocol in ("http2", "grpc") else None)
        vips.append({"address": VIP, "port": ports[name], "host": HOST, "protocol": protocol})
        route = [{"cluster": cname, "weight": 100}]
        vhosts.append({"name": f"{HOST}:{ports[name]}", "host": HOST, "port": ports[name],
                       "domains": [HOST, VIP, f"{VIP}:{ports[name]}"], "routes": [{"name": name, "route": route}]})
        if protocol == "tcp":
            tcp_routes.append({"name": f"{HOST}:{ports[name]}", "host": HOST, "port": ports[name],
                               "routes": [{"name": name, "route": route}]})
    return {"version": "bench", "node": {"id": "n1", "ip": "127.0.0.1"}, "listeners": {},
            "outbound_policy": "REGISTRY_ONLY", "vips": vips, "virtual_hosts": vhosts, "clusters": clusters,
            "tcp_routes": tcp_routes}


# -- the measurements ------------------------------------------------------------------------


def h2load(tools: Tools, url: str, seconds: float, workdir: Path) -> dict[str, Any]:
    """``h2load -c10 -m10`` for ``seconds``; percentiles from its per-request log (µs durations).

    h2load appends to an existing log file: each run starts from none, or the percentiles of
    a run would be those of every run before it too."""
    log = workdir / "h2load.log"
    log.unlink(missing_ok=True)
    out = subprocess.run([tools.h2load, "-c10", "-m10", "-t1", "-D", str(int(seconds)), f"--log-file={log}", url],
                         capture_output=True, text=True, timeout=seconds + 30).stdout
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", out)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed", out)
    durations = sorted(int(line.split()[2]) for line in log.read_text().splitlines() if line.strip())
    pct = (lambda p: round(durations[min(len(durations) - 1, int(p / 100 * len(durations)))] / 1000, 3)) \
        if durations else (lambda p: None)
    return {"req_per_s": float(rps.group(1)) if rps else None,
            "succeeded": int(done.group(2)) if done else None, "failed": int(done.group(3)) if done else None,
            "p50_ms": pct(50), "p99_ms": pct(99)}


def grpc_loop(address: str, seconds: float, threads: int) -> dict[str, Any]:
    import grpc
    from tests.grpc_echo import method
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    with grpc.insecure_channel(address) as channel:
        call = method(channel, "unary_unary", "Unary")
        call(b"warmup", timeout=10)
        deadline = time.monotonic() + seconds

        def worker() -> None:
            nonlocal errors
            mine: list[float] = []
            bad = 0
            payload = b"x" * 64
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                try:
                    call(payload, timeout=10)
                    mine.append(time.perf_counter() - t0)
                except grpc.RpcError:
                    bad += 1
            with lock:
                latencies.extend(mine)
                errors += bad

        pool = [threading.Thread(target=worker) for _ in range(threads)]
        start = time.monotonic()
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        elapsed = time.monotonic() - start
    latencies.sort()
    pct = (lambda p: round(latencies[min(len(latencies) - 1, int(p / 100 * len(latencies)))] * 1000, 3)) \
        if latencies else (lambda p: None)
    return {"calls": len(latencies), "errors": errors, "req_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": pct(50), "p99_ms": pct(99)}


def tcp_bulk(host: str, port: int, megabytes: int) -> dict[str, Any]:
    chunk = b"\x00" * (1 << 20)
    with socket.create_connection((host, port), timeout=30) as s:
        t0 = time.perf_counter()
        for _ in range(megabytes):
            s.sendall(chunk)
        s.shutdown(socket.SHUT_WR)
        received = int(s.recv(64))
        elapsed = time.perf_counter() - t0
    assert received == megabytes << 20, received
    return {"megabytes": megabytes, "seconds": round(elapsed, 3), "mb_per_s": round(megabytes / elapsed, 1)}


async def ws_bulk(uri: str, megabytes: int) -> dict[str, Any]:
    from websockets.asyncio.client import connect
    msg = b"\x00" * (64 << 10)
    async with connect(uri, max_size=None, compression=None) as conn:
        t0 = time.perf_counter()
        for _ in range(megabytes * 16):
            await conn.send(msg)
        await conn.send(b"end")
        received = int(await conn.recv())
        elapsed = time.perf_counter() - t0
    assert received == (megabytes << 20) + 3, received
    return {"megabytes": megabytes, "seconds": round(elapsed, 3), "mb_per_s": round(megabytes / elapsed, 1)}


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def idle_memory(pid: int, http_port: int, tcp_port: int, count: int) -> dict[str, Any]:
    """RSS growth for ``count`` idle keep-alive HTTP/1.1 connections, then ``count`` idle TCP ones."""
    out: dict[str, Any] = {"connections": count}
    for kind, port in (("http1_keepalive", http_port), ("tcp", tcp_port)):
        time.sleep(0.5)
        before = rss_kib(pid)
        socks = []
        try:
            for _ in range(count):
                s = socket.create_connection((VIP, port), timeout=10)
                if kind == "http1_keepalive":
                    s.sendall(b"GET / HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\n\r\n")
                    got = b""
                    while len(got) < BODY or b"\r\n\r\n" not in got:
                        got += s.recv(65536)
                socks.append(s)
            time.sleep(1.0)
            after = rss_kib(pid)
        finally:
            for s in socks:
                s.close()
        out[kind] = {"rss_before_kib": before, "rss_after_kib": after,
                     "kib_per_connection": round((after - before) / count, 2)}
    return out


# -- the run ---------------------------------------------------------------------------------


def run(args: argparse.Namespace, tools: Tools, workdir: Path) -> dict[str, Any]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 4 * args.idle + 1024)), hard))
    children: list[Child] = []
    try:
        origin_port, h1_port = free_port(), free_port()
        children.append(start_nginx(tools, workdir, "origin", nginx_conf(workdir, origin_port, h1_port), 0,
                                    origin_port))
        peers_child = Child("peers", [sys.executable, "-c", PEERS, str(ROOT)], workdir)
        children.append(peers_child)
        peers = peers_child.read_ready()
        ports = {name: free_port(VIP) for name in ("h2", "grpc", "ws", "tcp", "http")}
        snap_path = workdir / "proxy.json"
        snap_path.write_text(json.dumps(snapshot(ports, origin_port, h1_port, peers)))
        proxy = Child("proxy", [sys.executable, "-m", "proxy_core", "--snapshot", str(snap_path), "--no-access-log",
                                "--no-telemetry", "--grace", "1"], workdir)
        children.append(proxy)
        for p in ports.values():
            wait_port(VIP, p, proxy)
        # First, on the fresh proxy: memory the later traffic freed would be reused and hide the cost.
        idle = idle_memory(proxy.pid, ports["http"], ports["tcp"], args.idle)
        s = args.seconds
        result: dict[str, Any] = {
            "h2": {"direct": h2load(tools, f"http://127.0.0.1:{origin_port}/", s, workdir),
                   "one_hop": h2load(tools, f"http://{VIP}:{ports['h2']}/", s, workdir)},
            "grpc": {"direct": grpc_loop(f"127.0.0.1:{peers['grpc']}", s, args.grpc_threads),
                     "one_hop": grpc_loop(f"{VIP}:{ports['grpc']}", s, args.grpc_threads)},
            "tcp": {"direct": tcp_bulk("127.0.0.1", peers["tcp"], args.tcp_mb),
                    "one_hop": tcp_bulk(VIP, ports["tcp"], args.tcp_mb)},
            "websocket": {"direct": asyncio.run(ws_bulk(f"ws://127.0.0.1:{peers['ws']}/", args.ws_mb)),
                          "one_hop": asyncio.run(ws_bulk(f"ws://{VIP}:{ports['ws']}/", args.ws_mb))},
        }
        result["idle_memory"] = idle
        return result
    finally:
        for child in reversed(children):
            child.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each h2 / gRPC run")
    parser.add_argument("--grpc-threads", type=int, default=4)
    parser.add_argument("--tcp-mb", type=int, default=512)
    parser.add_argument("--ws-mb", type=int, default=128)
    parser.add_argument("--idle", type=int, default=2000, help="idle connections of each kind")
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "protocols.json")
    args = parser.parse_args(argv)
    tools = Tools.find()
    if tools.h2load is None or tools.nginx is None:
        print("needs h2load (nghttp2-client) and nginx", file=sys.stderr)
        return 2
    with TemporaryDirectory(prefix="raymesh-protocols-") as tmp:
        machine = machine_info(tools)
        result = run(args, tools, Path(tmp))
    machine["loadavg_end"] = __import__("os").getloadavg()[0]
    doc = {"machine": machine, "args": {k: str(v) for k, v in vars(args).items()}, "results": result}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
