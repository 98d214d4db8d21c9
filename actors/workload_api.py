"""The SPIFFE Workload API of a node: applications fetch their X.509-SVIDs with a stock client.

A workload sets ``SPIFFE_ENDPOINT_SOCKET=unix:///tmp/raymesh/<node id prefix>/workload.sock``
and calls ``SpiffeWorkloadAPI/FetchX509SVID`` (any SPIFFE library: go-spiffe, py-spiffe,
java-spiffe); the server runs inside the node's proxy worker actor, on its event loop.

Attestation.  The Workload API has no credentials of its own: the server must learn who calls
out of band, as SPIRE's agent does from the unix socket's peer credentials.  grpcio exposes
neither a connection's file descriptor nor its peer credentials (``context.peer()`` is just
``unix:``), so the public socket is served by a small relay: it accepts each connection,
reads the caller's pid with ``SO_PEERCRED``, and relays the bytes to the gRPC server on a
private socket from a client socket bound to a fresh path, which gRPC reports as
``context.peer()``; the servicer looks the pid up by that peer.  The private socket and the
relay's client paths live in a directory only the server's user may enter, so no other user
reaches the gRPC server without passing the relay.

The pid names a Ray actor of this node when it is that actor's worker process or one of its
descendants (an actor's subprocesses share its identity, as a pod's containers share its
service account).  The actor's registrations (``mesh.workload.join``) give its identities:
one SVID per distinct (namespace, service account).  Not an actor of this node, or an actor
that registered nothing: ``PermissionDenied``.  Citadel then signs, as it does for proxies,
a CSR whose key was generated here: the key reaches the workload over the node-local socket
only.

Streams follow the spec: ``FetchX509SVID`` sends the current SVIDs, then a new message when
one is renewed (at half of its lifetime), when the trust bundle changes (a root rotation) or
when the actor's registrations change; the stream ends with ``PermissionDenied`` once the
actor holds no registration.  JWT-SVIDs are not issued (``Unimplemented``).
"""
from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import shutil
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, NoReturn

import grpc
from cryptography.hazmat.primitives import serialization
from ray.exceptions import GetTimeoutError, RayActorError
from spiffe._proto import workload_pb2, workload_pb2_grpc

from actors.registry import registry_state, registry_store
from mesh.workload import WORKLOAD_API_RUNTIME_DIR as DEFAULT_RUNTIME_DIR
from mesh.workload import workload_api_path
from mesh.client import acall_any
from mesh.identity import IdentityError, PrivateKey, key_pem, load_certs, make_csr, new_workload_key, spiffe_id
from mesh.records import Record
from proxy_core.source_identity import parent_pid

log = logging.getLogger(__name__)

SOCKET_NAME = "workload.sock"
HEADER_KEY, HEADER_VALUE = "workload.spiffe.io", "true"   # required on every call (Workload API spec)
_MAX_UNIX_PATH = 107                                      # sun_path holds 108 bytes with the NUL
_MAX_ANCESTRY = 64
# Citadel unreachable or restarting: the client should retry (the spec's Unavailable).
_CITADEL_DOWN = (RayActorError, GetTimeoutError, RuntimeError)

Clock = Callable[[], float]


@dataclass(slots=True)
class WorkloadApiOptions(Record):
    runtime_dir: str = DEFAULT_RUNTIME_DIR
    svid_ttl_seconds: float | None = None    # None: Citadel's default TTL (24 h)
    refresh_seconds: float = 30.0            # how often a stream re-reads registrations and the trust bundle



# -- the relay: peer credentials in front of gRPC --------------------------------------------

def peer_pid(sock: socket.socket) -> int:
    """The pid of the process that connected ``sock`` (a unix socket), as the kernel recorded it."""
    creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, _uid, _gid = struct.unpack("3i", creds)
    return pid


class PeerCredentialRelay:
    """Accepts on the public socket and relays each connection to the gRPC server, remembering
    the caller's pid under the peer name gRPC will report for the relayed connection."""

    def __init__(self, public_path: str, upstream_path: str, private_dir: str) -> None:
        self._public_path = public_path
        self._upstream_path = upstream_path
        self._private_dir = private_dir
        self._pids: dict[str, int] = {}
        self._ids = itertools.count(1)
        self._server: asyncio.AbstractServer | None = None
        self._connections: dict[asyncio.Task[None], asyncio.StreamWriter] = {}

    def pid_of(self, peer: str) -> int | None:
        return self._pids.get(peer)

    async def start(self) -> None:
        self._server = await asyncio.start_unix_server(self._on_connection, path=self._public_path)

    async def close(self) -> None:
        """Stop accepting and end every relayed connection: closing the caller's side ends the relay."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for writer in self._connections.values():
            writer.close()
        await asyncio.gather(*self._connections, return_exceptions=True)

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections[task] = writer
        try:
            await self._relay(reader, writer)
        finally:
            del self._connections[task]
            writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pid = peer_pid(writer.get_extra_info("socket"))
        # A fresh name per connection, kept bound (and on disk) while the connection lives, so
        # no other socket can present it to the gRPC server meanwhile.
        local = os.path.join(self._private_dir, f"c{next(self._ids)}")
        peer = f"unix:{local}"
        upstream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        upstream.setblocking(False)
        try:
            upstream.bind(local)
            await asyncio.get_running_loop().sock_connect(upstream, self._upstream_path)
            self._pids[peer] = pid   # before any byte flows, so the first RPC finds it
            up_reader, up_writer = await asyncio.open_unix_connection(sock=upstream)
            await _splice(reader, writer, up_reader, up_writer)
        except OSError as exc:
            log.warning("workload API relay: connection from pid %s failed: %s", pid, exc)
        finally:
            self._pids.pop(peer, None)
            upstream.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(local)


async def _splice(a_reader: asyncio.StreamReader, a_writer: asyncio.StreamWriter,
                  b_reader: asyncio.StreamReader, b_writer: asyncio.StreamWriter) -> None:
    """Copy both ways until either side closes (HTTP/2 does not half-close), then close both."""
    pumps = [asyncio.create_task(_pump(a_reader, b_writer)), asyncio.create_task(_pump(b_reader, a_writer))]
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for p in pumps:
            p.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        a_writer.close()
        b_writer.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()


# -- attestation: pid -> actor -> registered identities --------------------------------------

@dataclass(frozen=True, slots=True, order=True)
class Identity:
    namespace: str
    service_account: str


def _alive_actors() -> dict[str, Any]:
    from ray._private import state as ray_state

    return ray_state.actors(actor_state_name="ALIVE")


def _registry() -> dict[str, Any]:
    return registry_store().latest().state


@dataclass(slots=True)
class Attestor:
    """Who a caller is: the Ray actor of this node running it, and what that actor registered.

    The reads (Ray's actor table, the registry collection) are injected so that the logic is
    testable without a cluster; both are blocking GCS reads, run off the event loop.
    """

    node_id: str
    actors: Callable[[], dict[str, Any]] = _alive_actors
    registry: Callable[[], dict[str, Any]] = _registry
    parent: Callable[[int], int | None] = parent_pid

    def actor_of(self, pid: int) -> str | None:
        """The id of the actor whose worker is ``pid`` or an ancestor of it, on this node."""
        by_pid = {int(a["Pid"]): a["ActorID"] for a in self.actors().values()
                  if a.get("Pid") and (a.get("Address") or {}).get("NodeID") == self.node_id}
        current: int | None = pid
        for _ in range(_MAX_ANCESTRY):
            if current is None or current <= 1:
                return None
            if current in by_pid:
                return by_pid[current]
            current = self.parent(current)
        return None

    def identities(self, actor_id: str) -> list[Identity]:
        """The distinct (namespace, service account) pairs ``actor_id`` registered on this node."""
        return sorted({Identity(w.namespace, w.service_account)
                       for w in registry_state(self.registry()).workloads
                       if w.actor_id == actor_id and w.node_id == self.node_id})


# -- credentials: SVIDs signed by Citadel, and the trust bundle ------------------------------

@dataclass(frozen=True, slots=True)
class Svid:
    spiffe_id: str
    chain_der: bytes     # leaf first, then any intermediates; roots travel in the bundle
    key_der: bytes       # PKCS#8
    renew_at: float      # epoch seconds
    chain_pem: tuple[str, ...] = ()   # the same chain and key as PEM, for the node proxy's TLS contexts
    key_pem: str = field(default="", repr=False)
    expires: float = 0.0


@dataclass(frozen=True, slots=True)
class Bundle:
    trust_domain: str
    roots_der: bytes     # the trusted roots' DER, concatenated, as the spec's ``bundle`` field
    roots_pem: tuple[str, ...] = ()


def _der(pem: str) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.DER) for c in load_certs(pem))


def _key_der(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


async def _citadel(method: str, *args: Any) -> Any:
    return await acall_any("citadel", method, *args)


@dataclass(slots=True)
class Credentials:
    """This node's SVIDs per identity, renewed at half-life, and the trust bundle, re-read
    every ``refresh_seconds``.  Shared by all streams, so a renewal signs once per identity."""

    node_id: str
    ttl_seconds: float | None = None
    refresh_seconds: float = 30.0
    call: Callable[..., Awaitable[Any]] = _citadel
    clock: Clock = time.time
    _svids: dict[Identity, Svid] = field(default_factory=dict, init=False)
    _bundle: tuple[float, Bundle] | None = field(default=None, init=False)     # (re-read after, bundle)
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock, init=False)

    async def bundle(self) -> Bundle:
        if self._bundle is None or self.clock() >= self._bundle[0]:
            trust_domain = self._bundle[1].trust_domain if self._bundle else (await self.call("info"))["trust_domain"]
            roots = await self.call("trust_bundle")
            self._bundle = (self.clock() + self.refresh_seconds,
                            Bundle(trust_domain, b"".join(map(_der, roots)), tuple(roots)))
        return self._bundle[1]

    async def svid(self, ident: Identity) -> Svid:
        """The current SVID for ``ident``, signing a new key's CSR when there is none or it is due.

        Renewal is due half-way between when it was asked for and its expiry, measured here
        rather than from ``notBefore``, which Citadel backdates for clock skew.
        """
        async with self._lock:
            current = self._svids.get(ident)
            if current is not None and self.clock() < current.renew_at:
                return current
            bundle = await self.bundle()
            sid = spiffe_id(ident.namespace, ident.service_account, bundle.trust_domain)
            key = new_workload_key()
            asked = self.clock()
            reply = await self.call("sign", make_csr(key, sid), ident.namespace, ident.service_account,
                                    self.node_id, self.ttl_seconds)
            # Citadel's chain ends with its self-signed root, which the bundle carries instead.
            chain = [c for pem in reply["cert_chain"] for c in load_certs(pem) if c.issuer != c.subject]
            expires = float(reply["expires"])
            svid = Svid(reply["spiffe_id"], b"".join(c.public_bytes(serialization.Encoding.DER) for c in chain),
                        _key_der(key), asked + (expires - asked) / 2,
                        tuple(c.public_bytes(serialization.Encoding.PEM).decode() for c in chain), key_pem(key), expires)
            self._svids[ident] = svid
            return svid


# -- the gRPC service ------------------------------------------------------------------------

PidLookup = Callable[[str], "int | None"]


class WorkloadApiServicer(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    """``SpiffeWorkloadAPI`` over the relay's pids, the attestor and the node's credentials."""

    def __init__(self, pid_of: PidLookup, attestor: Attestor, credentials: Credentials,
                 refresh_seconds: float) -> None:
        self._pid_of = pid_of
        self._attestor = attestor
        self._credentials = credentials
        self._refresh = refresh_seconds

    async def FetchX509SVID(self, request: workload_pb2.X509SVIDRequest,  # noqa: N802 (gRPC's name)
                            context: grpc.aio.ServicerContext) -> AsyncIterator[workload_pb2.X509SVIDResponse]:
        actor_id = await self._attest(context)
        last: tuple[Any, ...] | None = None
        while True:
            identities = await self._entitled(actor_id, context)
            try:
                bundle = await self._credentials.bundle()
                svids = [await self._credentials.svid(i) for i in identities]
            except IdentityError as exc:   # deregistered between our read and Citadel's
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
            except _CITADEL_DOWN as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"certificate authority unavailable: {exc}")
            seen = (tuple(s.chain_der for s in svids), bundle.roots_der)
            if seen != last:
                yield workload_pb2.X509SVIDResponse(svids=[
                    workload_pb2.X509SVID(spiffe_id=s.spiffe_id, x509_svid=s.chain_der, x509_svid_key=s.key_der,
                                          bundle=bundle.roots_der) for s in svids])
                last = seen
            next_renewal = min(s.renew_at for s in svids) - self._credentials.clock()
            await asyncio.sleep(max(0.01, min(self._refresh, next_renewal)))

    async def FetchX509Bundles(self, request: workload_pb2.X509BundlesRequest,  # noqa: N802
                               context: grpc.aio.ServicerContext) -> AsyncIterator[workload_pb2.X509BundlesResponse]:
        actor_id = await self._attest(context)
        last: bytes | None = None
        while True:
            await self._entitled(actor_id, context)
            try:
                bundle = await self._credentials.bundle()
            except _CITADEL_DOWN as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"certificate authority unavailable: {exc}")
            if bundle.roots_der != last:
                yield workload_pb2.X509BundlesResponse(bundles={bundle.trust_domain: bundle.roots_der})
                last = bundle.roots_der
            await asyncio.sleep(self._refresh)

    async def FetchJWTSVID(self, request: workload_pb2.JWTSVIDRequest,  # noqa: N802
                           context: grpc.aio.ServicerContext) -> workload_pb2.JWTSVIDResponse:
        await self._unimplemented(context)

    async def FetchJWTBundles(self, request: workload_pb2.JWTBundlesRequest,  # noqa: N802
                              context: grpc.aio.ServicerContext) -> None:
        await self._unimplemented(context)

    async def ValidateJWTSVID(self, request: workload_pb2.ValidateJWTSVIDRequest,  # noqa: N802
                              context: grpc.aio.ServicerContext) -> workload_pb2.ValidateJWTSVIDResponse:
        await self._unimplemented(context)

    async def _require_header(self, context: grpc.aio.ServicerContext) -> None:
        if not any(m.key == HEADER_KEY and m.value == HEADER_VALUE for m in context.invocation_metadata() or ()):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")

    async def _unimplemented(self, context: grpc.aio.ServicerContext) -> NoReturn:
        await self._require_header(context)
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "JWT-SVIDs are not issued by this mesh")

    async def _attest(self, context: grpc.aio.ServicerContext) -> str:
        """The calling actor's id, or abort: header missing (InvalidArgument), caller unknown (PermissionDenied)."""
        await self._require_header(context)
        pid = self._pid_of(context.peer())
        if pid is None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, "caller not attested: connect through the "
                                "node's workload socket")
        actor_id = await asyncio.to_thread(self._attestor.actor_of, pid)
        if actor_id is None:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"no identity issued: pid {pid} is not a Ray "
                                f"actor of node {self._attestor.node_id} (nor one's subprocess)")
        return actor_id

    async def _entitled(self, actor_id: str, context: grpc.aio.ServicerContext) -> list[Identity]:
        identities = await asyncio.to_thread(self._attestor.identities, actor_id)
        if not identities:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"no identity issued: actor {actor_id} has no "
                                "workload registered (mesh.workload.join)")
        return identities


# -- the server ------------------------------------------------------------------------------

class WorkloadApiServer:
    """The node's Workload API: the relay on the public socket, gRPC behind it on a private one.

    Runs on the caller's event loop (the proxy worker actor's).  ``start`` refuses to replace
    a socket another server still answers on, and clears one left by a dead server.
    """

    def __init__(self, node_id: str, options: WorkloadApiOptions | None = None, clock: Clock = time.time) -> None:
        self.node_id = node_id
        self.options = options or WorkloadApiOptions()
        self.path = workload_api_path(node_id, self.options.runtime_dir)
        self._private_dir = os.path.join(os.path.dirname(self.path), "private")
        self._clock = clock
        self._grpc: grpc.aio.Server | None = None
        self._relay: PeerCredentialRelay | None = None

    async def start(self) -> str:
        """Listen; returns the socket path (``SPIFFE_ENDPOINT_SOCKET`` is ``unix://`` + it)."""
        upstream = os.path.join(self._private_dir, "grpc.sock")
        # The relay's client sockets are named <private dir>/c<n>; leave room for the counter.
        if len(upstream) + 8 > _MAX_UNIX_PATH:
            raise ValueError(f"runtime dir {self.options.runtime_dir!r} is too long for unix socket paths")
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        await _clear_stale(self.path)
        shutil.rmtree(self._private_dir, ignore_errors=True)
        os.mkdir(self._private_dir, 0o700)
        credentials = Credentials(self.node_id, self.options.svid_ttl_seconds, self.options.refresh_seconds,
                                  clock=self._clock)
        self._relay = PeerCredentialRelay(self.path, upstream, self._private_dir)
        servicer = WorkloadApiServicer(self._relay.pid_of, Attestor(self.node_id), credentials,
                                       self.options.refresh_seconds)
        self._grpc = grpc.aio.server()
        workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(servicer, self._grpc)
        self._grpc.add_insecure_port(f"unix:{upstream}")
        await self._grpc.start()
        await self._relay.start()
        log.info("SPIFFE Workload API of node %s on unix://%s", self.node_id, self.path)
        return self.path

    async def stop(self) -> None:
        if self._relay is not None:
            await self._relay.close()
            self._relay = None
        if self._grpc is not None:
            await self._grpc.stop(grace=1.0)
            self._grpc = None
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        shutil.rmtree(self._private_dir, ignore_errors=True)


async def _clear_stale(path: str) -> None:
    """Remove a socket file nobody answers on; raise if a live server holds it."""
    if not os.path.exists(path):
        return
    try:
        _, writer = await asyncio.open_unix_connection(path)
    except OSError:
        os.unlink(path)
        return
    writer.close()
    raise RuntimeError(f"a Workload API server already listens on {path}")
