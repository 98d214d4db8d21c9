"""Control channel between the proxy process and its supervisor.

The supervisor (a Ray actor in another process) pushes snapshots and reads status over a
unix socket.  Frames are a 4-byte big-endian length followed by one msgpack map; each
request gets exactly one reply.  Operations:

* ``{"op": "snapshot", "snapshot": {...}}`` -> ``{"ok": true, "version": v, "ports": {...}}``;
  an invalid snapshot answers ``{"ok": false, "error": "..."}`` and the old one stays.
* ``{"op": "status"}`` -> ``{"ok": true, "version": v, "stats": {...}, "ports": {...}}``
  (both replies also carry ``vips``: VIP -> bound port, and ``gateways``: gateway listener -> ``address:port``)
* ``{"op": "telemetry"}`` -> ``{"ok": true, "batch": <Arrow IPC stream bytes, or b"">, "rows": n,
  "dropped": n, "tcp_batch": <bytes, or b"">, "tcp_rows": n}``: the request rows buffered since the
  last call (schema in ``proxy_core.telemetry``) and how many were dropped because the buffer was
  full, and the TCP connection deltas since the last call (``proxy_core.tcp_telemetry``: open
  connections report their bytes so far); ``{"ok": false, ...}`` when the proxy runs with
  telemetry off.
* ``{"op": "credentials", "trust_domain": ..., "roots": [...], "svids": [...], "workloads": [...]}``
  -> ``{"ok": true, "identities": [...]}``: the node's SVIDs, trust bundle and workload pids
  (``proxy_core.mtls.Credentials``); new handshakes use them, open connections keep theirs.
* ``{"op": "gateway_secrets", "secrets": {name: {"tls.crt": PEM, "tls.key": PEM, "ca.crt": PEM}}}``
  -> ``{"ok": true, "gateways": {...}}``: the TLS Secrets of the gateway's ``credentialName``
  servers (all of them: the set replaces the last one); the gateway's TLS contexts are rebuilt
  at once (``proxy_core.gateway_tls.GatewaySecrets``).
* ``{"op": "quota_needs", "wait": 0.1}`` -> ``{"ok": true, "asks": [ASK, ...]}``: a long poll for the
  global rate limit leases the proxy wants (``proxy_core.quota``), answered as soon as a bucket runs
  low or after ``wait`` seconds; the supervisor gets them from Mixer and answers with
* ``{"op": "quota_leases", "leases": [LEASE, ...], "failed": [key, ...]}`` -> ``{"ok": true}``:
  the leases granted, and the keys no Mixer replica answered for (their failure mode applies).
* ``{"op": "shutdown"}`` -> ``{"ok": true}``, then the proxy drains and exits.

The channel is off the request path, so it uses asyncio streams for clarity.
"""
from __future__ import annotations

import asyncio
import os
import socket
import struct
from typing import Any, Callable

import msgpack

from proxy_core.gateway_tls import GatewaySecrets
from proxy_core.mtls import Credentials
from proxy_core.server import ProxyServer
from proxy_core.snapshot import Snapshot

MAX_FRAME = 64 * 1024 * 1024
_LEN = struct.Struct(">I")


def encode(message: dict[str, Any]) -> bytes:
    payload = msgpack.packb(message, use_bin_type=True)
    return _LEN.pack(len(payload)) + payload


class ControlServer:
    """Serves the control protocol for one ``ProxyServer``; swaps are applied one at a time."""

    def __init__(self, proxy: ProxyServer, path: str, on_shutdown: Callable[[], None],
                 after_swap: Callable[[], None] | None = None) -> None:
        self.proxy = proxy
        self.path = path
        self.on_shutdown = on_shutdown
        self.after_swap = after_swap
        self._server: asyncio.AbstractServer | None = None
        self._swap_lock = asyncio.Lock()

    async def start(self) -> None:
        if os.path.exists(self.path):
            os.unlink(self.path)  # a stale socket from a previous run of this proxy
        self._server = await asyncio.start_unix_server(self._serve, path=self.path)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None
        if os.path.exists(self.path):
            os.unlink(self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                try:
                    (size,) = _LEN.unpack(await reader.readexactly(4))
                except asyncio.IncompleteReadError:
                    return
                if size > MAX_FRAME:
                    writer.write(encode({"ok": False, "error": f"frame of {size} bytes exceeds {MAX_FRAME}"}))
                    return
                try:
                    message = msgpack.unpackb(await reader.readexactly(size), raw=False)
                except asyncio.IncompleteReadError:
                    return
                except Exception as exc:  # undecodable frame: answer and keep serving
                    writer.write(encode({"ok": False, "error": f"bad frame: {exc}"}))
                    continue
                reply = await self.handle(message)
                writer.write(encode(reply))
                await writer.drain()
                if message.get("op") == "shutdown":
                    self.on_shutdown()
                    return
        finally:
            writer.close()

    async def handle(self, message: Any) -> dict[str, Any]:
        if not isinstance(message, dict):
            return {"ok": False, "error": "message must be a map"}
        op = message.get("op")
        proxy = self.proxy
        if op == "snapshot":
            async with self._swap_lock:
                try:
                    snapshot = Snapshot.from_dict(message["snapshot"])
                    await proxy.swap(snapshot)
                except Exception as exc:
                    return {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                            "version": proxy.snapshot.version}
                if self.after_swap is not None:
                    self.after_swap()
            return {"ok": True, "version": snapshot.version, "ports": proxy.ports, "vips": proxy.vip_ports(),
                    "gateways": proxy.gateway_ports()}
        if op == "gateway_secrets":
            try:
                secrets = GatewaySecrets({str(name): {str(k): str(v) for k, v in keys.items()}
                                          for name, keys in (message.get("secrets") or {}).items()})
            except (AttributeError, TypeError) as exc:
                return {"ok": False, "error": f"bad gateway_secrets message: {exc}"}
            async with self._swap_lock:
                await proxy.set_gateway_secrets(secrets)
            return {"ok": True, "gateways": proxy.gateway_ports()}
        if op == "credentials":
            try:
                creds = Credentials.from_dict(message)
                proxy.mtls.update(creds)
            except Exception as exc:   # a bad push keeps the current credentials
                return {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
            return {"ok": True, "identities": sorted(s.spiffe_id for s in creds.svids)}
        if op == "status":
            return {"ok": True, "version": proxy.snapshot.version, "stats": proxy.stats(), "ports": proxy.ports,
                    "vips": proxy.vip_ports(), "gateways": proxy.gateway_ports()}
        if op == "telemetry":
            if proxy.telemetry is None:
                return {"ok": False, "error": "telemetry is disabled"}
            batch, rows, dropped = proxy.telemetry.drain()
            tcp_batch, tcp_rows = proxy.tcp_telemetry.drain() if proxy.tcp_telemetry is not None else (b"", 0)
            return {"ok": True, "batch": batch, "rows": rows, "dropped": dropped, "tcp_batch": tcp_batch,
                    "tcp_rows": tcp_rows}
        if op == "quota_needs":
            return {"ok": True, "asks": await proxy.quota.needs(float(message.get("wait", 0.1)))}
        if op == "quota_leases":
            proxy.quota.apply(list(message.get("leases") or ()), list(message.get("failed") or ()))
            return {"ok": True}
        if op == "shutdown":
            return {"ok": True}
        return {"ok": False, "error": f"unknown op {op!r}"}


def call(path: str, message: dict[str, Any], timeout: float = 10.0) -> dict[str, Any]:
    """Blocking client: send one request and return the reply (what the supervisor uses)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(path)
        sock.sendall(encode(message))
        (size,) = _LEN.unpack(_recv_exactly(sock, 4))
        return msgpack.unpackb(_recv_exactly(sock, size), raw=False)


async def acall(path: str, message: dict[str, Any]) -> dict[str, Any]:
    """Asyncio client for the same protocol."""
    reader, writer = await asyncio.open_unix_connection(path)
    try:
        writer.write(encode(message))
        await writer.drain()
        (size,) = _LEN.unpack(await reader.readexactly(4))
        return msgpack.unpackb(await reader.readexactly(size), raw=False)
    finally:
        writer.close()


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        part = sock.recv(n - len(buf))
        if not part:
            raise ConnectionError("control channel closed")
        buf += part
    return bytes(buf)
