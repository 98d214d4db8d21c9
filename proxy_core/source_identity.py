"""Which local workload opened a downstream connection: socket -> inode -> pid -> SPIFFE id.

The node proxy is shared by every workload of its node and clients reach it over loopback,
so the source identity cannot come from the connection itself.  As Istio ambient's ztunnel
asks the kernel which pod a connection came from, the proxy asks ``/proc``:

1. the kernel's socket table (one ``sock_diag`` netlink lookup, ``/proc/net/tcp`` as the
   fallback) holds the client's socket (local = the connection's peer address, remote = the
   listener address it reached) and its inode;
2. the process holding ``socket:[inode]`` among its file descriptors is the client;
3. that pid, or its nearest ancestor, is a workload process the proxy worker named in its
   credentials push (pid -> SPIFFE id of the identity the actor registered).

Only the known pids are searched first; a client started by a workload (a subprocess)
is found by a scan of ``/proc`` and its ancestry.  The proxy runs as the same user as the
Ray workers, so their descriptors are readable; others' are not, and stay unknown.
The answer is cached per connection by the caller; the lookup costs well under a millisecond
for a few dozen processes and happens once per downstream connection that needs it (a tunnel
to another node, a destination with AuthorizationPolicies, telemetry, a VirtualService
match on ``sourceLabels`` / ``sourceNamespace``).

The answer is a ``SourceWorkload``: the SPIFFE id (mTLS, AuthorizationPolicy's source
principal), the Istio attributes telemetry reports for the caller (``source_workload``,
``source_app``, ...) and the labels and namespace routes match on, derived from the
registration the supervisor pushed with the pid.
"""
from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

_MAX_ANCESTRY = 64
UNKNOWN = "unknown"
_CANONICAL_NAME = "service.istio.io/canonical-name"
_CANONICAL_REVISION = "service.istio.io/canonical-revision"


@dataclass(frozen=True, slots=True, eq=False)
class SourceWorkload:
    """A local workload process as a client: who it is, as policies and telemetry name it.

    ``spiffe_id`` is "" for a client the proxy cannot identify (``UNIDENTIFIED``); the other
    fields then keep Istio's values for an unknown peer.  ``labels`` are the registration's
    labels as sorted (key, value) pairs and ``namespace`` its namespace: what VirtualService
    ``sourceLabels`` / ``sourceNamespace`` matches test (``proxy_core.snapshot.SourceMatch``).
    Compared and hashed by identity: one object per pushed pid, and telemetry keys its rows
    by it on every request.
    """

    spiffe_id: str
    workload: str = UNKNOWN
    namespace: str = UNKNOWN
    app: str = UNKNOWN
    version: str = UNKNOWN
    canonical_service: str = UNKNOWN
    canonical_revision: str = "latest"
    labels: tuple[tuple[str, str], ...] = ()

    @property
    def principal(self) -> str:
        """The AuthorizationPolicy form of the identity: the SPIFFE id without ``spiffe://``."""
        return self.spiffe_id.removeprefix("spiffe://")

    @classmethod
    def registered(cls, spiffe_id: str, service: str, namespace: str, labels: Mapping[str, str]) -> "SourceWorkload":
        """Istio's workload attributes from a registration, as for destinations: the workload
        is ``<app>-<version>`` (``app`` defaulting to the service name), the canonical service
        and revision come from their ``service.istio.io`` labels, else ``app`` and ``version``."""
        app, version = labels.get("app", ""), labels.get("version", "")
        base = app or service
        return cls(spiffe_id, workload=(f"{base}-{version}" if version else base) or UNKNOWN,
                   namespace=namespace or UNKNOWN, app=app or UNKNOWN, version=version or UNKNOWN,
                   canonical_service=labels.get(_CANONICAL_NAME) or base or UNKNOWN,
                   canonical_revision=labels.get(_CANONICAL_REVISION) or version or "latest",
                   labels=tuple(sorted((str(k), str(v)) for k, v in labels.items())))

    @classmethod
    def from_push(cls, item: Any) -> tuple[int, "SourceWorkload"]:
        """One ``workloads`` entry of a credentials push: ``[pid, spiffe_id]`` or
        ``[pid, spiffe_id, {"service": ..., "namespace": ..., "labels": {...}}]``."""
        if not isinstance(item, (list, tuple)) or len(item) not in (2, 3):
            raise ValueError(f"bad workloads entry {item!r}: want [pid, spiffe_id(, registration)]")
        pid, sid = int(item[0]), str(item[1])
        reg: Mapping[str, Any] = item[2] if len(item) == 3 and item[2] else {}
        parts = sid.split("/")
        namespace = str(reg.get("namespace") or (parts[4] if len(parts) > 4 and parts[3] == "ns" else ""))
        labels = {str(k): str(v) for k, v in (reg.get("labels") or {}).items()}
        return pid, cls.registered(sid, str(reg.get("service") or ""), namespace, labels)


UNIDENTIFIED = SourceWorkload("")


def _hex_addr(address: str, port: int) -> str:
    """``/proc/net/tcp``'s form of an IPv4 endpoint: little-endian hex address, hex port."""
    packed = socket.inet_aton(address)
    return f"{struct.unpack('<I', packed)[0]:08X}:{port:04X}"


def _hex_addr_v4_mapped(address: str, port: int) -> str:
    """``/proc/net/tcp6``'s form of ``::ffff:<address>``: clients such as grpcio open
    dual-stack IPv6 sockets even for IPv4 destinations, and those are listed there."""
    return "0000000000000000FFFF0000" + _hex_addr(address, port)


_SOCK_DIAG_BY_FAMILY = 20          # netlink message type of an inet_diag request
_NLM_F_REQUEST = 1                 # without NLM_F_DUMP: one socket, looked up by its 4-tuple
_NLMSG_ERROR = 2
_NETLINK_SOCK_DIAG = 4
_INODE_AT = 16 + 68                # nlmsghdr, then inet_diag_msg's idiag_inode
_TABLES = (("/proc/net/tcp", _hex_addr), ("/proc/net/tcp6", _hex_addr_v4_mapped))


def socket_inode(local: tuple[str, int], remote: tuple[str, int]) -> int | None:
    """The inode of the TCP socket bound to ``local`` and connected to ``remote``, if any: an
    IPv4 socket, else a dual-stack IPv6 one with those (v4-mapped) addresses.

    Asks the kernel for that one socket (``sock_diag`` netlink, an exact hash lookup);
    reading ``/proc/net/tcp`` instead walks every socket of the host, TIME_WAIT ones
    included, which costs milliseconds on a busy node.  The tables are the fallback where
    netlink is unavailable."""
    try:
        return _diag_inode(local, remote) or _diag_inode(local, remote, socket.AF_INET6)
    except OSError:
        return next((inode for table, _ in _TABLES if (inode := _table_inode(local, remote, table))), None)


def _diag_inode(local: tuple[str, int], remote: tuple[str, int], family: int = socket.AF_INET) -> int | None:
    if family == socket.AF_INET:
        src, dst = socket.inet_aton(local[0]), socket.inet_aton(remote[0])
    else:
        src, dst = (socket.inet_pton(socket.AF_INET6, "::ffff:" + a[0]) for a in (local, remote))
    sockid = struct.pack("!HH16s16s", local[1], remote[1], src, dst) + struct.pack("=III", 0, 0xFFFFFFFF, 0xFFFFFFFF)
    body = struct.pack("=BBBxI", family, socket.IPPROTO_TCP, 0, 0xFFFFFFFF) + sockid
    request = struct.pack("=IHHII", 16 + len(body), _SOCK_DIAG_BY_FAMILY, _NLM_F_REQUEST, 1, 0) + body
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.sendto(request, (0, 0))
        reply = nl.recv(8192)
    if len(reply) < _INODE_AT + 4 or struct.unpack_from("=H", reply, 4)[0] == _NLMSG_ERROR:
        return None        # no such socket (the client is gone), or not a socket this host holds
    return struct.unpack_from("=I", reply, _INODE_AT)[0] or None


def _table_inode(local: tuple[str, int], remote: tuple[str, int], table: str) -> int | None:
    hex_addr = dict(_TABLES)[table]
    needle = f": {hex_addr(*local)} {hex_addr(*remote)} "
    try:
        with open(table) as f:
            text = f.read()
    except OSError:
        return None
    at = text.find(needle)
    if at < 0:
        return None
    end = text.find("\n", at)
    fields = text[at + 2:end if end >= 0 else len(text)].split()
    if len(fields) < 9:
        return None
    return int(fields[8]) or None


def holds_socket(pid: int, inode: int) -> bool:
    """True when one of ``pid``'s file descriptors is ``socket:[inode]``."""
    target = f"socket:[{inode}]"
    fd_dir = f"/proc/{pid}/fd"
    try:
        names = os.listdir(fd_dir)
    except OSError:
        return False
    for name in names:
        try:
            if os.readlink(f"{fd_dir}/{name}") == target:
                return True
        except OSError:
            continue
    return False


def parent_pid(pid: int) -> int | None:
    """The parent of ``pid`` from /proc, or None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    # "pid (comm) state ppid ...": comm may hold spaces and parentheses, so split after the last ')'.
    return int(stat[stat.rindex(b")") + 2:].split()[1])


def _all_pids() -> Iterable[int]:
    try:
        return [int(n) for n in os.listdir("/proc") if n.isdigit()]
    except OSError:
        return []


class SourceResolver:
    """Maps a downstream connection to the workload process that opened it."""

    def __init__(self, pids: Mapping[int, SourceWorkload] | None = None, *,
                 inode_of: Callable[[tuple[str, int], tuple[str, int]], int | None] = socket_inode) -> None:
        self.pids: Mapping[int, SourceWorkload] = dict(pids or {})
        self._inode_of = inode_of
        self.lookups = 0
        self.unknown = 0

    def resolve(self, peer: tuple[str, int] | None, local: tuple[str, int] | None) -> SourceWorkload | None:
        """``peer``/``local`` are the downstream socket's peername and sockname (IPv4)."""
        self.lookups += 1
        found = self._resolve(peer, local) if self.pids and peer and local else None
        if found is None:
            self.unknown += 1
        return found

    def _resolve(self, peer: tuple[str, int], local: tuple[str, int]) -> SourceWorkload | None:
        try:
            inode = self._inode_of((peer[0], peer[1]), (local[0], local[1]))
        except OSError:
            return None
        if inode is None:
            return None
        for pid, identity in self.pids.items():
            if holds_socket(pid, inode):
                return identity
        for pid in _all_pids():
            if pid not in self.pids and holds_socket(pid, inode):
                return self._ancestor_identity(pid)
        return None

    def _ancestor_identity(self, pid: int) -> SourceWorkload | None:
        current: int | None = pid
        for _ in range(_MAX_ANCESTRY):
            if current is None or current <= 1:
                return None
            if current in self.pids:
                return self.pids[current]
            current = parent_pid(current)
        return None
