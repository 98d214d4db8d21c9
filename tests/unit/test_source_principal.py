"""AuthorizationPolicy source rules see the workload that sent the traffic, and the destination
node's inbound listener refuses tunnels from peers its policies deny.

Each client is a real process: the proxy tells them apart the way it does in production, by
the pid owning the connection's socket (``/proc``), among the pids of a credentials push.
The test process itself is in no push: its requests are those of an unidentified client.
"""
from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import sys
from typing import Any

import pytest

from mesh.identity import CAKeyPair, create_root_ca, spiffe_id
from mesh.resources import Resource
from proxy_core.accesslog import AccessLog
from proxy_core.server import ProxyServer
from proxy_core.source_identity import _diag_inode, _table_inode, socket_inode
from tests.unit.secured import HOST, PORT, URL, authz, endpoint, httpbin
from tests.unit.test_mtls import client_context, issue, push, tls_connect

pytestmark = pytest.mark.timeout(60)

X = spiffe_id("bar", "sleep")             # spiffe://cluster.local/ns/bar/sa/sleep
Y = spiffe_id("baz", "sleep")
HTTPBIN = spiffe_id("foo", "httpbin")
SELECT = {"selector": {"matchLabels": {"app": "httpbin"}}}

# A client process: waits for "go", then sends each argv item through the proxy on its own
# connection ("GET <url>" absolute-form, or "CONNECT <host:port>") and prints each status.
_CLIENT = r"""
import socket, sys
port = int(sys.argv[1])
sys.stdin.readline()
for item in sys.argv[2:]:
    method, target = item.split(" ", 1)
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    host = target.split("/")[2] if method == "GET" else target
    s.sendall(f"{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n".encode())
    head = b""
    while b"\r\n" not in head:
        chunk = s.recv(4096)
        if not chunk:
            break
        head += chunk
    print(head.split(b" ")[1].decode() if head else "closed", flush=True)
    s.close()
"""


class Client:
    """A client process (the workload), started before the credentials push names its pid."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, proxy_port: int, *requests: str) -> "Client":
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CLIENT, str(proxy_port), *requests,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
        return cls(proc)

    @property
    def pid(self) -> int:
        return self.proc.pid

    async def run(self) -> list[str]:
        out, _ = await asyncio.wait_for(self.proc.communicate(b"go\n"), 20)
        return out.decode().split()


async def from_each(proxy: ProxyServer, ca: CAKeyPair, port: int, requests: list[str],
                    svids: bool = False) -> dict[str, list[str]]:
    """``requests`` sent by workload X, by workload Y, and by an unidentified client."""
    x, y = await Client.start(port, *requests), await Client.start(port, *requests)
    push(proxy, [ca], [issue(ca, X), issue(ca, Y)] if svids else [], {x.pid: X, y.pid: Y})
    out = {"X": await x.run(), "Y": await y.run()}
    anonymous = await Client.start(port, *requests)     # a child of this process, which no push names
    out["anonymous"] = await anonymous.run()
    return out


@pytest.fixture(scope="module")
def ca() -> CAKeyPair:
    return create_root_ca()


def allow(rule: dict[str, Any], action: str = "ALLOW") -> dict[str, Any]:
    return authz({**SELECT, "action": action, "rules": [rule]})


def src(**fields: Any) -> dict[str, Any]:
    return {"from": [{"source": fields}]}


def when(key: str, values: list[str]) -> dict[str, Any]:
    return {"when": [{"key": key, "values": values}]}


X_P, Y_P = X.removeprefix("spiffe://"), Y.removeprefix("spiffe://")

# rule -> (status for X, for Y, for an unidentified client)
CASES: dict[str, tuple[dict[str, Any], tuple[str, str, str]]] = {
    "principals": (src(principals=[X_P]), ("200", "403", "403")),
    "principals-any": (src(principals=["*"]), ("200", "200", "403")),
    "notPrincipals-any": (src(notPrincipals=["*"]), ("403", "403", "200")),
    "namespaces": (src(namespaces=["bar"]), ("200", "403", "403")),
    "notNamespaces": (src(notNamespaces=["baz"]), ("200", "403", "200")),
    "serviceAccounts": (src(serviceAccounts=["bar/sleep"]), ("200", "403", "403")),
    "source.principal": (when("source.principal", [X_P]), ("200", "403", "403")),
    "source.namespace": (when("source.namespace", ["bar"]), ("200", "403", "403")),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_source_rules_see_the_local_workload_that_sent_the_request(env, ca, case: str) -> None:
    rule, (x, y, anonymous) = CASES[case]
    up = await env.upstream(name="httpbin")
    p = await env.proxy(httpbin(endpoint(up.port), docs=[allow(rule)]))
    got = await from_each(p, ca, p.ports["http_proxy"], [f"GET {URL}/a", f"GET {URL}/b"])
    assert got == {"X": [x, x], "Y": [y, y], "anonymous": [anonymous, anonymous]}
    assert len(up.seen) == 2 * [x, y, anonymous].count("200")
    assert p.stats()["mtls"]["source_lookups"] == 6       # once per connection


async def test_deny_on_a_principal_and_the_access_log_names_the_rule(env, ca) -> None:
    sink = io.StringIO()
    up = await env.upstream()
    p = await env.proxy(httpbin(endpoint(up.port), docs=[allow(src(principals=[Y_P]), action="DENY")]),
                        AccessLog(sink))
    got = await from_each(p, ca, p.ports["http_proxy"], [f"GET {URL}/"])
    assert got == {"X": ["200"], "Y": ["403"], "anonymous": ["200"]}
    assert p.stats()["security"]["rbac"]["denied_by"] == {"ns[foo]-policy[p]-rule[0]": 1}
    p.access_log.flush()
    flags = [json.loads(line)["response_flags"] for line in sink.getvalue().splitlines()]
    assert sorted(flags) == ["-", "-", "RBAC"]


async def test_connect_tunnel_and_tcp_rules_use_the_source_workload(env, ca) -> None:
    up = await env.upstream()
    p = await env.proxy(httpbin(endpoint(up.port), docs=[allow(src(namespaces=["bar"]))]))
    got = await from_each(p, ca, p.ports["http_proxy"], [f"CONNECT {HOST}:{PORT}"])
    assert got == {"X": ["200"], "Y": ["403"], "anonymous": ["403"]}
    assert up.connections == 1


# -- two nodes: the client's proxy and the destination's inbound listener ------------------------


def node_snapshots(up_port: int, inbound: int, docs: list[dict[str, Any]], mode: str = "PERMISSIVE",
                   ) -> tuple[dict[str, Any], dict[str, Any]]:
    """(node A's snapshot, node B's): httpbin.foo runs on B; both carry the same policies."""
    ep = dict(endpoint(up_port), node="nB", mtls_mode=mode)
    b = httpbin(ep, docs=docs)
    b["node"]["id"] = "nB"
    a = httpbin(dict(ep, via={"address": "127.0.0.1", "port": inbound}), docs=docs)
    a["node"]["id"] = "nA"
    return a, b


async def two_nodes(env, ca: CAKeyPair, docs: list[dict[str, Any]], mode: str = "PERMISSIVE",
                    ) -> tuple[Any, ProxyServer, ProxyServer]:
    up = await env.upstream(name="httpbin")
    _, snap_b = node_snapshots(up.port, 0, docs, mode)
    b = await env.proxy(snap_b)
    push(b, [ca], [issue(ca, HTTPBIN)])
    snap_a, _ = node_snapshots(up.port, b.ports["inbound"], docs, mode)
    a = await env.proxy(snap_a)
    return up, a, b


async def connect_inbound(b: ProxyServer, up_port: int, ca: CAKeyPair, identity: str | None) -> bytes:
    """A process dialling B's inbound listener itself, with an SVID of ``identity`` (None: plaintext)."""
    inbound = b.ports["inbound"]
    if identity is not None:
        return await tls_connect(inbound, up_port, client_context(ca.cert_pem, issue(ca, identity)))
    reader, writer = await asyncio.open_connection("127.0.0.1", inbound)
    writer.write(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % up_port)
    out = await asyncio.wait_for(reader.read(1024), 10)
    writer.close()
    return out


async def test_cross_node_principal_policy_at_both_ends(env, ca) -> None:
    up, a, b = await two_nodes(env, ca, [allow(src(principals=[X_P]))])
    got = await from_each(a, ca, a.ports["http_proxy"], [f"GET {URL}/"], svids=True)
    assert got == {"X": ["200"], "Y": ["403"], "anonymous": ["403"]}
    assert b.stats()["mtls"]["peers"] == {X: 1}      # Y and the unidentified client never left node A
    assert b.stats()["security"]["rbac"]["denied"] == 0

    # A process dialling B's inbound listener itself meets the destination's policies there.
    assert (await connect_inbound(b, up.port, ca, X)).startswith(b"HTTP/1.1 200 ")
    denied = await connect_inbound(b, up.port, ca, Y)
    assert denied.startswith(b"HTTP/1.1 403 ") and denied.endswith(b"RBAC: access denied"), denied
    plaintext = await connect_inbound(b, up.port, ca, None)          # PERMISSIVE, but anonymous
    assert plaintext.startswith(b"HTTP/1.1 403 ") and plaintext.endswith(b"RBAC: access denied")
    rbac = b.stats()["security"]["rbac"]
    assert rbac["denied"] == 2 and rbac["denied_by"] == {"-": 2}
    assert up.connections == 2                         # X's tunnel via A, and X's own dial


@pytest.mark.parametrize("rules,action,y_admitted", [
    ([src(namespaces=["bar"])], "ALLOW", False),
    ([src(notNamespaces=["baz"])], "ALLOW", False),
    ([src(principals=[Y_P])], "DENY", False),
    ([{**src(principals=[Y_P]), "to": [{"operation": {"methods": ["POST"]}}]}], "DENY", True),
    ([{**src(principals=[X_P]), "to": [{"operation": {"methods": ["GET"]}}]}], "ALLOW", False),
    ([{"to": [{"operation": {"methods": ["GET"]}}]}], "ALLOW", True),
    ([{"from": [{"source": {"principals": [X_P]}}, {"source": {"ipBlocks": ["10.0.0.0/8"]}}]}], "ALLOW", True),
    ([{"from": [{"source": {"principals": [Y_P]}}, {"source": {"ipBlocks": ["10.0.0.0/8"]}}]}], "DENY", False),
    ([when("request.headers[x-user]", ["eve"]) | src(principals=[Y_P])], "DENY", True),
])
async def test_inbound_refuses_only_what_every_request_would_be_refused(
        env, ca, rules: list[dict[str, Any]], action: str, y_admitted: bool) -> None:
    """The inbound listener does not parse the tunnel: a rule that depends on the requests
    (methods, headers, the client's address) cannot refuse it there; the client's proxy
    applies that rule to each request.  X (ns bar) is always admitted by these policies."""
    up, _, b = await two_nodes(env, ca, [allow(r, action=action) for r in rules])
    assert (await connect_inbound(b, up.port, ca, X)).startswith(b"HTTP/1.1 200 ")
    out = await connect_inbound(b, up.port, ca, Y)
    assert out.startswith(b"HTTP/1.1 200 " if y_admitted else b"HTTP/1.1 403 "), out
    assert b.stats()["security"]["rbac"]["denied"] == (0 if y_admitted else 1)


async def test_inbound_refusal_is_logged_with_the_rbac_flag(env, ca) -> None:
    sink = io.StringIO()
    up = await env.upstream()
    _, snap_b = node_snapshots(up.port, 0, [allow(src(principals=[Y_P]), action="DENY")], "STRICT")
    b = await env.proxy(snap_b, AccessLog(sink))
    push(b, [ca], [issue(ca, HTTPBIN)])
    assert (await connect_inbound(b, up.port, ca, Y)).startswith(b"HTTP/1.1 403 ")
    b.access_log.flush()
    [line] = [json.loads(x) for x in sink.getvalue().splitlines()]
    assert line["response_flags"] == "RBAC" and line["downstream_peer_uri_san"] == Y
    assert line["listener"] == "inbound" and up.connections == 0
    assert b.stats()["security"]["rbac"]["denied_by"] == {"ns[foo]-policy[p]-rule[0]": 1}


def test_socket_inode_finds_dual_stack_ipv6_clients() -> None:
    """grpcio (and other dual-stack clients) connect to IPv4 addresses from IPv6 sockets: the
    client socket is listed in /proc/net/tcp6 under v4-mapped addresses."""
    import os
    import socket as socketlib

    from proxy_core.source_identity import socket_inode
    server = socketlib.socket(socketlib.AF_INET)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socketlib.socket(socketlib.AF_INET6)
    client.setsockopt(socketlib.IPPROTO_IPV6, socketlib.IPV6_V6ONLY, 0)
    try:
        client.connect(("::ffff:127.0.0.1", server.getsockname()[1]))
        accepted, peer = server.accept()
        with accepted:
            # What the proxy sees on its side: an IPv4 peer; the socket found is the client's.
            assert socket_inode((peer[0], peer[1]), accepted.getsockname()) == os.fstat(client.fileno()).st_ino
    finally:
        client.close()
        server.close()


def test_socket_inode_finds_the_client_socket_by_netlink_and_by_the_table() -> None:
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        with socket.create_connection(listener.getsockname()) as client:
            server, _ = listener.accept()
            with server:
                want = os.fstat(client.fileno()).st_ino
                local, remote = client.getsockname(), client.getpeername()
                assert socket_inode(local, remote) == _diag_inode(local, remote) == want
                assert _table_inode(local, remote, "/proc/net/tcp") == want
                assert socket_inode(("127.0.0.1", 1), remote) is None


async def test_global_rate_limit_descriptor_counts_by_the_sending_workload(env, ca) -> None:
    """A ``sourcePrincipal`` descriptor sees the local workload that sent the request: no Mixer
    grants this standalone proxy a lease, so X's requests (the descriptor applies) get the one
    request of credit a proxy has before its first lease, then 429; Y's and an unidentified
    client's (it does not apply) all pass."""
    from mesh.compiler_ratelimit import compile_rate_limits

    up = await env.upstream()
    snap = httpbin(endpoint(up.port))
    policy = {"apiVersion": "policy.raymesh.io/v1alpha1", "kind": "RateLimitPolicy",
              "metadata": {"name": "per-workload", "namespace": "foo"},
              "spec": {"hosts": ["httpbin"], "global": {"failureMode": "FAIL_CLOSED", "descriptors": [
                  {"entries": [{"sourcePrincipal": {"exact": X_P}}],
                   "limit": {"requestsPerUnit": 1, "unit": "minute"}}]}}}
    snap["rate_limits"] = compile_rate_limits([Resource.from_dict(policy)])
    p = await env.proxy(snap)
    got = await from_each(p, ca, p.ports["http_proxy"], [f"GET {URL}/a", f"GET {URL}/b", f"GET {URL}/c"])
    assert got == {"X": ["200", "429", "429"], "Y": ["200"] * 3, "anonymous": ["200"] * 3}
    assert len(up.seen) == 7
