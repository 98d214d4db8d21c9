"""The per-node proxy worker: a Ray actor that supervises one data-plane process.

The hot path stays free of Ray: the actor starts ``python -m proxy_core`` as a child process
(its own interpreter, its own GIL, uvloop) and is only its supervisor and config channel:

* it long-polls Pilot (any replica, failing over) for the node's snapshot and hands each new
  one to the child over a unix control socket; the child swaps it in atomically and the actor
  records the version as acked (``meshctl proxy-status``);
* it reports the node's listener ports to Pilot so other nodes can tunnel to this one, and
  whether the node is an ingress gateway node (``GatewayOptions``) with its gateway address;
* it keeps the child's mTLS credentials current (``actors.proxy_credentials``): SVIDs of the
  node's workload identities, renewed at half-life, the trust bundle and the workload pids;
  and on a gateway node the TLS Secrets its Gateway servers name (``credentialName``), read
  from the store and pushed before each snapshot that needs them;
* it restarts the child with the last snapshot if it dies, and the child dies with the actor
  (PR_SET_PDEATHSIG), so a restarted actor never finds stale listeners in its way;
* it fetches the global rate limit leases the child asks for from the Mixer replica that owns
  each counter (``_quota_loop``), so the child's hot path never waits on Mixer.

With every Pilot replica down the child keeps serving its last snapshot.
"""
from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ipaddress
import json
import logging
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import RayActorError

from actors.proxy_credentials import gateway_secrets_message, new_proxy_credentials
from actors.replicaset import find_replicas
from actors.workload_api import WorkloadApiOptions, WorkloadApiServer
from mesh.quota import owner_index
from mesh.records import Record
from mesh.registry import TOPOLOGY_LABELS, node_locality
from proxy_core.accesslog import DEFAULT_ROTATE_ROWS, DEFAULT_ROTATE_SECONDS
from proxy_core.control import acall

log = logging.getLogger(__name__)

# The proxy process is gone or restarting when its control socket fails like this.
CONTROL_ERRORS = (OSError, asyncio.IncompleteReadError)


def proxy_actor_name(node_id: str) -> str:
    return f"proxy-{node_id[:16]}"


@dataclass(slots=True)
class AccessLogOptions(Record):
    """``options["access_log"]``: the proxy's Parquet access-log sink (``proxy_core.accesslog``),
    off while ``parquet_dir`` is empty; the JSON lines go to the worker's stdout either way.

    Checked when built (``install`` builds it before deploying anything), so a bad value is an
    error naming the option, not a proxy process that exits during start."""

    parquet_dir: str = ""                           # created if missing, on each node
    rotate_rows: int = DEFAULT_ROTATE_ROWS          # a new file after this many rows
    rotate_seconds: float = DEFAULT_ROTATE_SECONDS  # ... or once its oldest row is this old

    def __post_init__(self) -> None:
        if not isinstance(self.parquet_dir, str):
            raise ValueError(f"access_log.parquet_dir must be a directory path, got {self.parquet_dir!r}")
        if isinstance(self.rotate_rows, bool) or not isinstance(self.rotate_rows, int) or self.rotate_rows < 1:
            raise ValueError(f"access_log.rotate_rows must be a positive integer, got {self.rotate_rows!r}")
        if isinstance(self.rotate_seconds, bool) or not isinstance(self.rotate_seconds, (int, float)) \
                or not self.rotate_seconds > 0:
            raise ValueError(f"access_log.rotate_seconds must be a positive number, got {self.rotate_seconds!r}")

    def args(self) -> list[str]:
        """The ``python -m proxy_core`` flags for these options."""
        if not self.parquet_dir:
            return []
        return ["--access-log-parquet", self.parquet_dir, "--access-log-rotate-rows", str(self.rotate_rows),
                "--access-log-rotate-seconds", repr(float(self.rotate_seconds))]


HEAD_RESOURCE = "node:__internal_head__"   # the resource Ray gives the head node alone


@dataclass(slots=True)
class GatewayOptions(Record):
    """``options["gateway"]``: which nodes' proxies are the ingress gateway, and where its
    listeners bind (mesh/compiler_gateways.py).

    ``nodes`` is ``head`` (the default), ``all``, ``none`` or ``KEY=VALUE``: the nodes with
    that Ray node label (``ray start --labels``).  ``address`` defaults to loopback, which keeps
    a fresh install closed to the network; ``0.0.0.0`` (or one interface's address) is the
    explicit choice that exposes Gateway ports to other machines."""

    nodes: str = "head"
    address: str = "127.0.0.1"

    def __post_init__(self) -> None:
        key, eq, value = str(self.nodes).partition("=")
        if self.nodes not in ("head", "all", "none") and not (eq and key and value):
            raise ValueError(f"gateway.nodes must be head, all, none or KEY=VALUE (a node label), got {self.nodes!r}")
        try:
            ipaddress.ip_address(self.address)
        except ValueError:
            raise ValueError(f"gateway.address must be an IP address, got {self.address!r}") from None

    def selects(self, is_head: bool, labels: dict[str, str]) -> bool:
        """Whether a node (the head or not, with these Ray labels) runs the ingress gateway."""
        if self.nodes in ("head", "all", "none"):
            return self.nodes == "all" or (self.nodes == "head" and is_head)
        key, _, value = self.nodes.partition("=")
        return labels.get(key) == value


def _die_with_parent() -> None:  # runs in the child between fork and exec
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


@ray.remote
class ProxyWorker:
    def __init__(self, node_id: str, node_ip: str, options: dict[str, Any] | None = None) -> None:
        self.node_id = node_id
        self.node_ip = node_ip
        self.options = options or {}
        self.name = proxy_actor_name(node_id)
        self._dir = tempfile.mkdtemp(prefix=f"raymesh-{self.name}-")
        self._control_path = os.path.join(self._dir, "control.sock")
        self._proc: subprocess.Popen | None = None
        self._snapshot: dict[str, Any] | None = None
        self._running: dict[str, Any] | None = None   # the snapshot the proxy process acknowledged
        self._version: str | None = None
        self._ports: dict[str, int] = {}
        self._gateways: dict[str, str] = {}       # ingress gateway listener -> bound address:port
        self._tasks: list[asyncio.Task] = []
        self._starting: asyncio.Lock | None = None
        self._restarts = 0
        self._synced_at: float | None = None
        self._telemetry_seq = 0
        self._workload_api: WorkloadApiServer | None = None
        self._telemetry_dropped = 0
        # Set when a new snapshot is in force: the node's workloads may have changed, and a new
        # workload's pid must reach the proxy before its first mTLS request, not a refresh later.
        self._credentials_due = asyncio.Event()
        # The certificate chains of the SVIDs last handed to the proxy (no keys): meshctl ca svid.
        self._svids: list[dict[str, Any]] = []
        self._secrets_pushed: tuple[int | None, dict[str, Any]] | None = None   # (proxy pid, gateway_secrets)

    # -- supervision ---------------------------------------------------------------------------

    async def ensure_started(self) -> dict[str, int]:
        """Start the proxy process and the config watch once; cheap and idempotent after that."""
        if self._starting is None:
            self._starting = asyncio.Lock()
        async with self._starting:
            if self._proc is None or self._proc.poll() is not None:
                await self._start_process()
                await self._report_node()
            if not self._tasks:
                loop = asyncio.get_running_loop()
                self._tasks = [loop.create_task(self._watch_loop()), loop.create_task(self._monitor()),
                               loop.create_task(self._telemetry_loop()), loop.create_task(self._credentials_loop()),
                               loop.create_task(self._quota_loop())]
            if self._workload_api is None:
                server = WorkloadApiServer(self.node_id, WorkloadApiOptions.from_dict(self.options.get("workload_api")))
                try:
                    await server.start()
                    self._workload_api = server
                except (OSError, RuntimeError):  # e.g. a previous process still holds the socket
                    log.exception("SPIFFE Workload API did not start; retrying on the next ensure_started")
        return dict(self._ports)

    def _bootstrap(self) -> dict[str, Any]:
        if self._snapshot is not None:
            return self._snapshot
        return {"version": "bootstrap", "node": {"id": self.node_id, "ip": self.node_ip},
                "listeners": {"http_proxy": {"host": "127.0.0.1", "port": int(self.options.get("http_proxy_port", 0))},
                              "inbound": {"host": self.node_ip, "port": int(self.options.get("inbound_port", 0))}}}

    async def _start_process(self) -> None:
        path = os.path.join(self._dir, "snapshot.json")
        snapshot = self._bootstrap()
        with open(path, "w") as f:
            json.dump(snapshot, f)
        if os.path.exists(self._control_path):
            os.unlink(self._control_path)
        env = dict(os.environ, **(self.options.get("proxy_env") or {}))
        # stdout is inherited: access-log lines go straight to this worker's log file.
        self._proc = subprocess.Popen([sys.executable, "-m", "proxy_core", "--snapshot", path,
                                       "--control", self._control_path, *self._tracing_args(),
                                       *AccessLogOptions.from_dict(self.options.get("access_log")).args()],
                                      env=env, preexec_fn=_die_with_parent)
        deadline = time.monotonic() + 30
        while True:
            if self._proc.poll() is not None:
                raise RuntimeError(f"proxy process exited with {self._proc.returncode} during start")
            try:
                status = await acall(self._control_path, {"op": "status"})
                break
            except CONTROL_ERRORS:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        self._ports = dict(status.get("ports") or {})
        self._gateways = dict(status.get("gateways") or {})
        self._version = status.get("version")
        self._running = snapshot if snapshot.get("version") == self._version else None
        await self._push_gateway_secrets(self._snapshot)   # a restarted proxy has none

    def _tracing_args(self) -> list[str]:
        """``options["tracing"]``: ``{"file": spans JSON lines path, "zipkin": collector URL,
        "sampling": percent}``; a ``{node}`` in the path becomes this node's id (its first 16
        characters), so that nodes sharing a file system write files of their own."""
        tracing = self.options.get("tracing") or {}
        path = str(tracing.get("file") or "").replace("{node}", self.node_id[:16])
        args = ["--trace-file", path] if path else []
        if tracing.get("zipkin"):
            args += ["--trace-zipkin", str(tracing["zipkin"])]
        if tracing.get("sampling") is not None:
            args += ["--trace-sampling", str(float(tracing["sampling"]))]
        return args

    async def _monitor(self) -> None:
        while True:
            await asyncio.sleep(0.5)
            if self._proc is not None and self._proc.poll() is not None:
                log.warning("proxy process exited with %s; restarting", self._proc.returncode)
                self._restarts += 1
                try:
                    await self._start_process()
                    await self._report_node()
                except Exception:
                    log.exception("proxy restart failed")

    async def _report_node(self) -> None:
        labels = _topology_labels()
        gateway = GatewayOptions.from_dict(self.options.get("gateway"))
        is_gateway = gateway.selects(_is_head_node(self.node_id), _node_labels())
        node = {"node_id": self.node_id, "ip": self.node_ip, "inbound_port": int(self._ports.get("inbound", 0)),
                "http_proxy_port": int(self._ports.get("http_proxy", 0)), "alive": True,
                "locality": node_locality(labels), "labels": labels,
                "gateway_address": gateway.address if is_gateway else ""}
        await self._call_pilot("report_node", node)

    async def _call_pilot(self, method: str, *args: Any, **kwargs: Any) -> Any:
        delay = 0.1
        while True:
            pilots = _pilots()
            random.shuffle(pilots)
            for pilot in pilots:
                try:
                    return await getattr(pilot, method).remote(*args, **kwargs)
                except RayActorError:
                    continue
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)

    async def _watch_loop(self) -> None:
        """xDS-style: ask for anything newer than what we have; apply; ack by asking again."""
        delay = 0.1
        index = random.randrange(16)
        while True:
            pilots = _pilots()
            if not pilots:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            pilot = pilots[index % len(pilots)]
            try:
                update = await pilot.watch.remote(self.node_id, self._version, self.name, self._version)
                delay = 0.1
            except RayActorError:
                # That replica is down or restarting: keep serving the last snapshot, try another.
                index += 1
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
                continue
            if update is None:
                continue
            try:
                snapshot = await update["snapshot"][0]
            except Exception:
                log.exception("could not fetch snapshot %s", update.get("version"))
                index += 1
                continue
            await self._apply(snapshot)

    async def _push_gateway_secrets(self, snapshot: dict[str, Any] | None) -> None:
        """Give the proxy the Secrets ``snapshot``'s gateway servers name, before the snapshot
        itself, so its HTTPS ports bind with them at once.  Every config change is a new snapshot
        version, so a rotated Secret arrives here too.  The store unreachable: the proxy keeps
        what it has."""
        try:
            message = await gateway_secrets_message(snapshot)
        except Exception:
            log.exception("could not read the gateway's TLS secrets; the proxy keeps its current ones")
            return
        pid = self._proc.pid if self._proc is not None else None
        if self._secrets_pushed == (pid, message):
            return
        try:
            reply = await acall(self._control_path, message)
        except CONTROL_ERRORS:
            return   # restarting: _start_process pushes them again
        if reply.get("ok"):
            self._secrets_pushed = (pid, message)
            self._gateways = dict(reply.get("gateways") or {})
        else:
            log.error("proxy refused gateway secrets: %s", reply.get("error"))

    async def _apply(self, snapshot: dict[str, Any]) -> None:
        await self._push_gateway_secrets(snapshot)
        try:
            reply = await acall(self._control_path, {"op": "snapshot", "snapshot": snapshot})
        except CONTROL_ERRORS:
            log.warning("proxy process unreachable; the monitor restarts it with the newest snapshot")
            self._snapshot = snapshot
            return
        if reply.get("ok"):
            self._snapshot = self._running = snapshot
            self._version = snapshot["version"]
            self._synced_at = time.time()
            self._credentials_due.set()
            self._gateways = dict(reply.get("gateways") or {})
            ports = dict(reply.get("ports") or {})
            if ports and ports != self._ports:
                self._ports = ports
                await self._report_node()
        else:
            log.error("proxy rejected snapshot %s: %s", snapshot.get("version"), reply.get("error"))

    async def _telemetry_loop(self) -> None:
        """Every flush interval: take the proxy's Arrow batch, put it in the object store once and
        hand the reference to this node's Mixer replica (failing over). Mixer is never on the
        request path: when no replica takes a batch it is dropped and counted."""
        interval = float(self.options.get("telemetry_interval", 1.0))
        while True:
            await asyncio.sleep(interval)
            if self._proc is None or self._proc.poll() is not None:
                continue
            try:
                reply = await acall(self._control_path, {"op": "telemetry"})
            except CONTROL_ERRORS:
                continue
            # HTTP request rows and TCP connection deltas: two self-describing Arrow streams.
            batches = [reply[key] for key, rows in (("batch", "rows"), ("tcp_batch", "tcp_rows")) if reply.get(rows)]
            if not batches:
                continue
            self._telemetry_seq += 1
            refs = [ray.put(b) for b in batches]
            mixers = find_replicas("mixer")
            if not mixers:
                self._telemetry_dropped += int(reply.get("rows") or 0)
                continue
            start = zlib.crc32(self.node_id.encode()) % len(mixers)  # stable shard per node
            for mixer in mixers[start:] + mixers[:start]:
                try:
                    await mixer.ingest.remote(self.node_id, self._telemetry_seq, refs)
                    break
                except RayActorError:
                    continue
            else:
                self._telemetry_dropped += int(reply.get("rows") or 0)

    async def _credentials_loop(self) -> None:
        """Push the node's SVIDs, bundle and workload pids whenever they change, and again to a
        restarted proxy process.  Citadel being down only delays renewal: the proxy keeps its
        current certificates (valid for half their lifetime still)."""
        opts = self.options.get("mtls") or {}
        creds = new_proxy_credentials(self.node_id, opts.get("svid_ttl_seconds"),
                                      float(opts.get("refresh_seconds", 5.0)))
        pushed: tuple[int | None, dict[str, Any]] | None = None
        while True:
            wait = 1.0
            try:
                message, wait = await creds.message()
                pid = self._proc.pid if self._proc is not None else None
                if pushed != (pid, message):
                    reply = await acall(self._control_path, message)
                    if reply.get("ok"):
                        pushed = (pid, message)
                        self._svids = [{"spiffe_id": s["spiffe_id"], "cert_chain": list(s["cert_chain"]),
                                        "expires": s["expires"]} for s in message["svids"]]
                    else:
                        log.error("proxy refused credentials: %s", reply.get("error"))
            except CONTROL_ERRORS:
                pass   # the proxy is restarting; the monitor brings it back
            except Exception:
                log.exception("could not refresh mTLS credentials; retrying")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._credentials_due.wait(), wait)
            self._credentials_due.clear()
    async def _quota_loop(self) -> None:
        """Long-poll the proxy for the leases it wants, get each from the counter's owner (failing
        over to the next replica), hand them back.  A key no replica answered for is reported
        failed, and the proxy applies the policy's failure mode until a lease arrives."""
        wait = float(self.options.get("quota_poll", 0.1))
        timeout = float(self.options.get("quota_timeout", 0.5))
        mixers: list[Any] = []
        found_at = 0.0
        while True:
            try:
                reply = await acall(self._control_path, {"op": "quota_needs", "wait": wait})
            except CONTROL_ERRORS:
                await asyncio.sleep(0.2)
                continue
            asks = reply.get("asks") or []
            if not asks:
                continue
            if not mixers or time.monotonic() - found_at > 5.0:
                mixers, found_at = find_replicas("mixer"), time.monotonic()
            leases, failed = await self._leases(mixers, asks, timeout)
            if failed:
                mixers = []   # look the replicas up again next time
            try:
                await acall(self._control_path, {"op": "quota_leases", "leases": leases, "failed": failed})
            except CONTROL_ERRORS:
                continue

    async def _leases(self, mixers: list[Any], asks: list[dict[str, Any]],
                      timeout: float) -> tuple[list[dict[str, Any]], list[str]]:
        """One ``lease`` call per owner replica, concurrently; (leases granted, keys that failed)."""
        if not mixers:
            return [], [a["key"] for a in asks]
        by_owner: dict[int, list[dict[str, Any]]] = {}
        for ask in asks:
            by_owner.setdefault(owner_index(ask["key"], len(mixers)), []).append(ask)

        async def ask_owner(start: int, batch: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
            for i in range(len(mixers)):
                mixer = mixers[(start + i) % len(mixers)]
                try:
                    return await asyncio.wait_for(mixer.lease.remote(self.name, batch), timeout)
                except (RayActorError, asyncio.TimeoutError):
                    continue
            return None

        results = await asyncio.gather(*(ask_owner(i, b) for i, b in by_owner.items()))
        leases: list[dict[str, Any]] = []
        failed: list[str] = []
        for batch, result in zip(by_owner.values(), results):
            if result is None:
                failed.extend(a["key"] for a in batch)
            else:
                leases.extend(result)
        return leases, failed

    # -- queries -------------------------------------------------------------------------------

    async def status(self) -> dict[str, Any]:
        stats: dict[str, Any] = {}
        if self._proc is not None and self._proc.poll() is None:
            try:
                stats = (await acall(self._control_path, {"op": "status"})).get("stats") or {}
            except CONTROL_ERRORS:
                pass
        return {"name": self.name, "node_id": self.node_id, "version": self._version, "ports": dict(self._ports),
                "gateways": dict(self._gateways),
                "pid": self._proc.pid if self._proc else None, "restarts": self._restarts,
                "synced_at": self._synced_at, "telemetry_dropped": self._telemetry_dropped, "stats": stats}

    async def config(self) -> dict[str, Any]:
        """The snapshot this node's proxy runs (the last one it acknowledged), for
        ``meshctl proxy-config``; it holds no key material (SVIDs and secrets travel apart)."""
        return {"proxy": self.name, "node_id": self.node_id, "version": self._version, "snapshot": self._running}

    async def svids(self) -> list[dict[str, Any]]:
        """The SVIDs this node's proxy holds: SPIFFE id and certificate chain (PEM), never a key."""
        return [dict(s, node_id=self.node_id) for s in self._svids]

    async def http_proxy_url(self) -> str:
        ports = await self.ensure_started()
        return f"http://127.0.0.1:{ports['http_proxy']}"

    async def stop(self) -> None:
        if self._workload_api is not None:
            await self._workload_api.stop()
            self._workload_api = None
        for t in self._tasks:
            t.cancel()
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                await asyncio.wait_for(asyncio.to_thread(self._proc.wait), timeout=5)
            except asyncio.TimeoutError:
                self._proc.kill()


def _pilots() -> list[Any]:
    return find_replicas("pilot")


def _node_labels() -> dict[str, str]:
    """This node's Ray labels (Ray reports a label's value as a string or a one-element list)."""
    out = {}
    for key, value in (ray.get_runtime_context().get_node_labels() or {}).items():
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if value:
            out[str(key)] = str(value)
    return out


def _topology_labels() -> dict[str, str]:
    """This node's locality labels."""
    return {k: v for k, v in _node_labels().items() if k in TOPOLOGY_LABELS}


def _is_head_node(node_id: str) -> bool:
    return any(n.get("NodeID") == node_id and HEAD_RESOURCE in (n.get("Resources") or {}) for n in ray.nodes())
