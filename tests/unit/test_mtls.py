"""mTLS between two real proxies on loopback (node A's client side, node B's inbound), with
certificates from a real CA (``mesh.identity``) pushed as the supervisor pushes them."""
from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import ssl
import sys
import tempfile
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from mesh.identity import CAKeyPair, create_root_ca, key_pem, make_csr, new_workload_key, sign_csr, spiffe_id
from proxy_core import control
from proxy_core.accesslog import AccessLog
from proxy_core.mtls import Credentials, sni_for
from proxy_core.server import ProxyServer
from tests.unit.conftest import cluster, snapshot, vhost

CL = "outbound|8000||httpbin"
SLEEP = spiffe_id("default", "sleep")
OTHER = spiffe_id("default", "other")
HTTPBIN = spiffe_id("foo", "httpbin")


def issue(ca: CAKeyPair, sid: str, ttl: timedelta = timedelta(hours=1), now: datetime | None = None,
          ) -> dict[str, Any]:
    key = new_workload_key()
    leaf = sign_csr(ca, make_csr(key, sid), sid, ttl, now)
    return {"spiffe_id": sid, "cert_chain": [leaf], "key": key_pem(key), "expires": 0}


def push(proxy: ProxyServer, roots: list[CAKeyPair], svids: list[dict[str, Any]],
         pids: dict[int, str] | None = None) -> None:
    proxy.mtls.update(Credentials.from_dict({"trust_domain": "cluster.local", "roots": [r.cert_pem for r in roots],
                                             "svids": svids, "workloads": list((pids or {}).items())}))


@pytest.fixture(scope="module")
def ca() -> CAKeyPair:
    return create_root_ca()


def node_b_snapshot(port: int, mode: str) -> dict[str, Any]:
    c = cluster(port, node="nB")
    c["endpoints"][0].update(namespace="foo", service_account="httpbin", mtls_mode=mode)
    return snapshot(node="nB", clusters={CL: c})


def node_a_snapshot(port: int, inbound: int, mode: str, tls: dict[str, Any] | None = None) -> dict[str, Any]:
    c = cluster(port, node="nB", via={"address": "127.0.0.1", "port": inbound})
    c["endpoints"][0].update(namespace="foo", service_account="httpbin", mtls_mode=mode)
    if tls is not None:
        c["tls"] = tls
    return snapshot(node="nA", vhosts=[vhost("httpbin", 8000, [{"name": "d", "route": [{"cluster": CL}]}])],
                    clusters={CL: c})


def one_request_per_connection(snap: dict[str, Any]) -> dict[str, Any]:
    """Istio's ``maxRequestsPerConnection: 1``: every request opens a new tunnel."""
    for c in snap["clusters"].values():
        c["connection_pool"] = {"max_requests_per_connection": 1}
    return snap


async def get(port: int, path: str = "/", host: str = "httpbin:8000", n: int = 1) -> list[tuple[int, bytes]]:
    """``n`` keep-alive requests on one connection to a proxy; (status, body) each."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = []
    try:
        for _ in range(n):
            writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            length = int(next(line.split(b":")[1] for line in head.split(b"\r\n")
                              if line.lower().startswith(b"content-length")))
            out.append((int(head.split()[1]), await reader.readexactly(length)))
    finally:
        writer.close()
    return out


async def two_nodes(env, ca: CAKeyPair, mode: str, *, client_creds: bool = True, log: AccessLog | None = None,
                    tls: dict[str, Any] | None = None, tunnel_per_request: bool = False,
                    ) -> tuple[Any, ProxyServer, ProxyServer]:
    up = await env.upstream(name="httpbin")
    b = await env.proxy(node_b_snapshot(up.port, mode), log)
    push(b, [ca], [issue(ca, HTTPBIN)])
    snap_a = node_a_snapshot(up.port, b.ports["inbound"], mode, tls)
    a = await env.proxy(one_request_per_connection(snap_a) if tunnel_per_request else snap_a)
    if client_creds:
        push(a, [ca], [issue(ca, SLEEP)], {os.getpid(): SLEEP})
    return up, a, b


async def tls_connect(port: int, target: int, ctx: ssl.SSLContext, sni: str | None = None) -> bytes:
    """A raw client of the inbound listener: TLS, then ``CONNECT``; the answer or b"" if cut."""
    try:
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=sni or sni_for(HTTPBIN)), 10)
        writer.write(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % target)
        out = await asyncio.wait_for(reader.read(1024), 10)
        writer.close()
        return out
    except (ssl.SSLError, ConnectionError, asyncio.IncompleteReadError):
        return b""


def client_context(ca_pem: str, svid: dict[str, Any] | None) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.load_verify_locations(cadata=ca_pem)
    if svid is not None:
        load_svid(ctx, svid)
    return ctx


def load_svid(ctx: ssl.SSLContext, svid: dict[str, Any]) -> None:
    """Present ``svid`` (an issued chain and key) from ``ctx``."""
    with tempfile.TemporaryDirectory() as d:
        cert, key = os.path.join(d, "c.pem"), os.path.join(d, "k.pem")
        with open(cert, "w") as f:
            f.write("".join(svid["cert_chain"]))
        with open(key, "w") as f:
            f.write(svid["key"])
        ctx.load_cert_chain(cert, key)


# -- node to node ---------------------------------------------------------------------------------


async def test_cross_node_traffic_is_mutual_tls_and_the_server_learns_the_source(env, ca) -> None:
    sink = io.StringIO()
    log = AccessLog(sink)
    up, a, b = await two_nodes(env, ca, "STRICT", log=log)
    assert await get(a.ports["http_proxy"], n=3) == [(200, b"httpbin")] * 3
    mb = b.stats()["mtls"]
    assert mb["peers"] == {SLEEP: 1} and mb["handshakes"] == 1 and mb["refused_total"] == 0
    assert up.connections == 1 and a.stats()["upstream_connects"] == 1   # one pooled mTLS tunnel
    a.pool.close()                 # the tunnel's line is written when the tunnel closes
    for _ in range(100):
        if b.stats()["active_requests"] == 0:
            break
        await asyncio.sleep(0.02)
    log.flush()
    [line] = [json.loads(x) for x in sink.getvalue().splitlines()]
    assert line["downstream_peer_uri_san"] == SLEEP and line["listener"] == "inbound"


async def test_strict_refuses_a_plaintext_tunnel_and_counts_it(env, ca) -> None:
    up, a, b = await two_nodes(env, ca, "STRICT", client_creds=False)
    [(status, _)] = await get(a.ports["http_proxy"])
    assert status == 503
    reader, writer = await asyncio.open_connection("127.0.0.1", b.ports["inbound"])
    writer.write(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % up.port)
    out = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    assert out.startswith(b"HTTP/1.1 403 ") and out.endswith(b"mTLS required: PeerAuthentication STRICT")
    assert b.stats()["mtls"]["refused"] == {"plaintext": 2} and up.connections == 0


async def test_permissive_accepts_plaintext_and_mtls_on_the_same_port(env, ca) -> None:
    up, a, b = await two_nodes(env, ca, "PERMISSIVE")
    assert await get(a.ports["http_proxy"]) == [(200, b"httpbin")]
    reader, writer = await asyncio.open_connection("127.0.0.1", b.ports["inbound"])
    writer.write(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % up.port)
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 200 ")
    writer.close()
    mb = b.stats()["mtls"]
    assert mb["peers"] == {SLEEP: 1} and mb["refused_total"] == 0 and b.stats()["tunnels_total"] == 2


async def test_disable_makes_the_client_speak_plaintext(env, ca) -> None:
    up, a, b = await two_nodes(env, ca, "DISABLE")
    assert await get(a.ports["http_proxy"]) == [(200, b"httpbin")]
    assert b.stats()["mtls"]["handshakes"] == 0 and b.stats()["tunnels_total"] == 1


@pytest.mark.parametrize("mode,handshakes", [("ISTIO_MUTUAL", 1), ("DISABLE", 0)])
async def test_destination_rule_tls_overrides_auto_mtls(env, ca, mode, handshakes) -> None:
    endpoint_mode = "DISABLE" if mode == "ISTIO_MUTUAL" else "PERMISSIVE"
    up, a, b = await two_nodes(env, ca, endpoint_mode, tls={"mode": mode})
    assert await get(a.ports["http_proxy"]) == [(200, b"httpbin")]
    assert b.stats()["mtls"]["handshakes"] == handshakes


async def test_strict_refuses_bad_client_certificates_and_counts_each(env, ca) -> None:
    up, a, b = await two_nodes(env, ca, "STRICT")
    inbound = b.ports["inbound"]
    good = client_context(ca.cert_pem, issue(ca, SLEEP))
    assert (await tls_connect(inbound, up.port, good)).startswith(b"HTTP/1.1 200 ")
    other_ca = create_root_ca()
    past = datetime.now(timezone.utc) - timedelta(days=2)
    cases = {
        "no_client_certificate": client_context(ca.cert_pem, None),
        "untrusted_certificate": client_context(ca.cert_pem, issue(other_ca, SLEEP)),
        "expired_certificate": client_context(ca.cert_pem, issue(ca, SLEEP, timedelta(hours=1), past)),
        "bad_identity": client_context(ca.cert_pem, issue(ca, "spiffe://evil.example/ns/default/sa/sleep")),
    }
    for reason, ctx in cases.items():
        assert await tls_connect(inbound, up.port, ctx) == b"", reason
    await asyncio.sleep(0.1)
    mb = b.stats()["mtls"]
    assert mb["refused"] == {reason: 1 for reason in cases}, mb
    assert mb["peers"] == {SLEEP: 1} and up.connections == 1


async def test_openssl_s_client_with_an_svid_gets_through(env, ca, tmp_path) -> None:
    up, a, b = await two_nodes(env, ca, "STRICT")
    svid = issue(ca, SLEEP)
    (tmp_path / "c.pem").write_text("".join(svid["cert_chain"]))
    (tmp_path / "k.pem").write_text(svid["key"])
    (tmp_path / "ca.pem").write_text(ca.cert_pem)
    proc = await asyncio.create_subprocess_exec(
        "openssl", "s_client", "-quiet", "-connect", f"127.0.0.1:{b.ports['inbound']}",
        "-servername", sni_for(HTTPBIN), "-cert", str(tmp_path / "c.pem"), "-key", str(tmp_path / "k.pem"),
        "-CAfile", str(tmp_path / "ca.pem"), "-verify_return_error",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    request = (b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % up.port
               + b"GET /x HTTP/1.1\r\nHost: httpbin\r\nConnection: close\r\n\r\n")
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(request)
    out = b""
    try:
        while not out.endswith(b"httpbin"):
            chunk = await asyncio.wait_for(proc.stdout.read(4096), 20)
            if not chunk:
                break
            out += chunk
    finally:
        proc.kill()
        await proc.wait()
    assert out.startswith(b"HTTP/1.1 200 Connection established") and out.endswith(b"httpbin"), out
    assert b.stats()["mtls"]["peers"] == {SLEEP: 1}


async def test_the_client_checks_the_server_identity(env, ca) -> None:
    up, a, b = await two_nodes(env, ca, "STRICT")
    push(b, [ca], [issue(ca, spiffe_id("foo", "impostor"))])    # B answers with another workload's SVID
    [(status, _)] = await get(a.ports["http_proxy"])
    assert status == 503 and a.stats()["mtls"]["client_refused"] == {"server_identity_mismatch": 1}


# -- identities and rotation ----------------------------------------------------------------------


async def test_rotation_keeps_open_tunnels_and_new_handshakes_use_the_new_certificate(env, ca) -> None:
    up, a, b = await two_nodes(env, ca, "STRICT")
    port = a.ports["http_proxy"]
    assert await get(port) == [(200, b"httpbin")]
    renewed = issue(ca, HTTPBIN)
    push(b, [ca], [renewed])
    push(a, [ca], [issue(ca, SLEEP)], {os.getpid(): SLEEP})
    assert await get(port) == [(200, b"httpbin")]                 # the pooled tunnel survived the swap
    assert b.stats()["mtls"]["handshakes"] == 1 and up.connections == 1
    reader, writer = await asyncio.open_connection("127.0.0.1", b.ports["inbound"], ssl=client_context(
        ca.cert_pem, issue(ca, SLEEP)), server_hostname=sni_for(HTTPBIN))
    presented = writer.get_extra_info("ssl_object").getpeercert(True)
    writer.close()
    assert presented == ssl.PEM_cert_to_DER_cert(renewed["cert_chain"][0])


async def test_root_rotation_trusts_old_and_new_roots_during_the_overlap(env, ca) -> None:
    new_root = create_root_ca()
    up, a, b = await two_nodes(env, ca, "STRICT")
    push(b, [new_root, ca], [issue(new_root, HTTPBIN)])
    push(a, [new_root, ca], [issue(ca, SLEEP)], {os.getpid(): SLEEP})
    assert await get(a.ports["http_proxy"]) == [(200, b"httpbin")]   # A holds an old-root SVID
    inbound = b.ports["inbound"]
    new_client = client_context(new_root.cert_pem, issue(new_root, SLEEP))
    assert (await tls_connect(inbound, up.port, new_client)).startswith(b"HTTP/1.1 200 ")
    push(b, [new_root], [issue(new_root, HTTPBIN)])                  # overlap over: the old root goes
    old_client = client_context(new_root.cert_pem, issue(ca, SLEEP))
    assert await tls_connect(inbound, up.port, old_client) == b""
    await asyncio.sleep(0.1)
    assert b.stats()["mtls"]["refused"] == {"untrusted_certificate": 1}


async def test_tunnels_are_pooled_per_source_identity(env, ca) -> None:
    """A second workload (another process) must get its own tunnel, presenting its own SVID."""
    up, a, b = await two_nodes(env, ca, "STRICT")
    port = a.ports["http_proxy"]
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c",
        "import socket,sys; sys.stdin.readline(); s=socket.create_connection(('127.0.0.1', int(sys.argv[1])));"
        "s.sendall(b'GET / HTTP/1.1\\r\\nHost: httpbin:8000\\r\\nConnection: close\\r\\n\\r\\n');"
        "print(b''.join(iter(lambda: s.recv(65536), b'')).decode())", str(port),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    push(a, [ca], [issue(ca, SLEEP), issue(ca, OTHER)], {os.getpid(): SLEEP, child.pid: OTHER})
    assert await get(port) == [(200, b"httpbin")]
    out, _ = await asyncio.wait_for(child.communicate(b"go\n"), 20)
    assert out.startswith(b"HTTP/1.1 200 ")
    assert b.stats()["mtls"]["peers"] == {SLEEP: 1, OTHER: 1} and a.stats()["upstream_connects"] == 2


async def test_credentials_over_the_control_channel(env, ca, tmp_path) -> None:
    up, a, b = await two_nodes(env, ca, "STRICT", client_creds=False)
    server = control.ControlServer(a, str(tmp_path / "c.sock"), lambda: None)
    await server.start()
    try:
        msg = {"op": "credentials", "trust_domain": "cluster.local", "roots": [ca.cert_pem],
               "svids": [issue(ca, SLEEP)], "workloads": [[os.getpid(), SLEEP]]}
        assert await control.acall(server.path, msg) == {"ok": True, "identities": [SLEEP]}
        bad = await control.acall(server.path, {"op": "credentials", "trust_domain": "cluster.local", "roots": []})
        assert bad["ok"] is False and "trust root" in bad["error"]
    finally:
        await server.close()
    assert await get(a.ports["http_proxy"]) == [(200, b"httpbin")]
    assert b.stats()["mtls"]["peers"] == {SLEEP: 1}


# -- session resumption ---------------------------------------------------------------------------


async def test_new_tunnels_resume_the_previous_tls_session(env, ca) -> None:
    """One request per tunnel (maxRequestsPerConnection: 1): the first tunnel makes a full
    handshake, the next ones offer its session and B resumes them, still learning the peer."""
    up, a, b = await two_nodes(env, ca, "STRICT", tunnel_per_request=True)
    for _ in range(3):
        assert await get(a.ports["http_proxy"]) == [(200, b"httpbin")]
    mb, ma = b.stats()["mtls"], a.stats()["mtls"]
    assert mb["handshakes"] == 3 and mb["resumed"] == 2 and mb["peers"] == {SLEEP: 3}
    assert ma["client_sessions"] == {"sessions": 1, "offered": 2, "resumed": 2}
    assert a.stats()["upstream_connects"] == 3


async def test_new_certificates_end_resumption(env, ca) -> None:
    """A push with a renewed SVID replaces the contexts: the next tunnel makes a full
    handshake and presents the new certificate; a push of workload pids alone keeps them."""
    up, a, b = await two_nodes(env, ca, "STRICT", tunnel_per_request=True)
    client_svid = issue(ca, SLEEP)
    push(a, [ca], [client_svid], {os.getpid(): SLEEP})
    assert await get(a.ports["http_proxy"]) == [(200, b"httpbin")]
    push(a, [ca], [client_svid], {os.getpid(): SLEEP, 1: OTHER})      # pids only: contexts kept
    assert await get(a.ports["http_proxy"]) == [(200, b"httpbin")]
    assert b.stats()["mtls"]["resumed"] == 1
    push(b, [ca], [issue(ca, HTTPBIN)])                                 # B renews: its ticket key goes
    assert await get(a.ports["http_proxy"]) == [(200, b"httpbin")]
    push(a, [ca], [issue(ca, SLEEP)], {os.getpid(): SLEEP})             # A renews: its sessions go
    assert await get(a.ports["http_proxy"]) == [(200, b"httpbin")]
    mb = b.stats()["mtls"]
    assert mb["handshakes"] == 4 and mb["resumed"] == 1


async def test_a_resumed_session_with_an_expired_peer_certificate_is_refused(env, ca) -> None:
    """Resumption skips certificate verification, so the proxy checks the cached expiry."""
    up, a, b = await two_nodes(env, ca, "STRICT")
    now = datetime.now(timezone.utc)
    short = issue(ca, SLEEP, timedelta(seconds=2), now - timedelta(seconds=1))   # 1 s of life left
    ctx = client_context(ca.cert_pem, short)
    reader, writer = await asyncio.open_connection("127.0.0.1", b.ports["inbound"], ssl=ctx,
                                                   server_hostname=sni_for(HTTPBIN))
    writer.write(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % up.port)
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)).startswith(b"HTTP/1.1 200 ")
    session = writer.get_extra_info("ssl_object").session
    writer.close()
    assert session is not None and session.has_ticket
    await asyncio.sleep(1.2)

    def resume() -> tuple[bool, bytes]:
        """Resume the session with a blocking socket, as any TLS client can."""
        with socket.create_connection(("127.0.0.1", b.ports["inbound"]), timeout=10) as raw, \
                ctx.wrap_socket(raw, server_hostname=sni_for(HTTPBIN), session=session) as tls:
            tls.sendall(b"CONNECT 127.0.0.1:%d HTTP/1.1\r\nHost: x\r\n\r\n" % up.port)
            try:
                answer = tls.recv(1024)
            except (ssl.SSLError, ConnectionError):
                answer = b""
            return tls.session_reused, answer

    assert await asyncio.to_thread(resume) == (True, b"")
    await asyncio.sleep(0.05)
    assert b.stats()["mtls"]["refused"].get("expired_certificate", 0) >= 1
