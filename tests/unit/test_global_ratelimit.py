"""Global rate limits without Ray: Mixer's lease arithmetic (mesh.quota), the proxy's lease-spending
buckets (proxy_core.quota), two proxies sharing one counter, and a real proxy answering 429 / 500
while a stand-in supervisor fetches its leases over the real control channel."""
from __future__ import annotations

import asyncio
import http.client
import time
from pathlib import Path
from typing import Any

import pytest

from mesh.compiler_ratelimit import compile_rate_limits
from mesh.loader import load_documents
from mesh.quota import QuotaLedger, owner_index
from mesh.validation import to_resources
from proxy_core.control import ControlServer, acall
from proxy_core.quota import QuotaBook, credit_limit
from proxy_core.router import RequestInfo
from proxy_core.server import ProxyServer
from proxy_core.snapshot import GlobalRateLimit, Snapshot
from tests.unit.conftest import Upstream
from tests.unit.test_ratelimit import FakeClock, rate_limited_snapshot

SAMPLE = Path(__file__).resolve().parents[2] / "samples" / "ratelimit" / "productpage-global-ratelimit.yaml"

pytestmark = pytest.mark.timeout(60)


class DictStore:
    """The shared store's get/put/delete, in memory."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}

    def get(self, key: str) -> bytes | None:
        return self.data.get(key)

    def put(self, key: str, value: bytes) -> None:
        self.data[key] = value

    def delete(self, key: str) -> None:
        self.data.pop(key, None)


def ask(key: str = "d/k/", limit: int = 10, unit: float = 60.0, want: int = 4, debt: int = 0,
        next_window: bool = False) -> dict[str, Any]:
    return {"key": key, "limit": limit, "unit": unit, "want": want, "debt": debt, "next": next_window}


# -- Mixer's ledger ------------------------------------------------------------------------------


def test_leases_never_exceed_the_limit_and_say_when_the_window_is_spent() -> None:
    wall = FakeClock(6000.0)                       # window 100 of a 60 s unit, its start
    ledger = QuotaLedger(clock=wall)
    (a,) = ledger.lease("p1", [ask(want=4)])
    assert (a["tokens"], a["remaining"], a["window"], a["starts_in"], a["expires_in"]) == (4, 6, 100, 0.0, 60.0)
    # A second proxy: the remaining 6 are shared between the two that asked.
    (b,) = ledger.lease("p2", [ask(want=100)])
    assert (b["tokens"], b["remaining"]) == (3, 3)
    (c,) = ledger.lease("p1", [ask(want=100)])
    (d,) = ledger.lease("p2", [ask(want=100)])
    assert c["tokens"] + d["tokens"] == 3 and d["remaining"] == 0
    (e,) = ledger.lease("p1", [ask(want=5)])
    assert (e["tokens"], e["remaining"]) == (0, 0)
    assert ledger.granted("d/k/", 60.0) == 10
    wall.advance(59.5)
    (f,) = ledger.lease("p1", [ask(want=5)])
    assert f["tokens"] == 0 and f["expires_in"] == pytest.approx(0.5)
    wall.advance(0.5)                              # a new window: a full limit again
    (g,) = ledger.lease("p1", [ask(want=5)])
    assert (g["tokens"], g["window"], g["remaining"]) == (5, 101, 5)


def test_first_asker_of_a_window_leaves_room_for_last_windows_other_proxies() -> None:
    wall = FakeClock(6000.0)
    ledger = QuotaLedger(clock=wall)
    assert ledger.lease("p1", [ask(want=100)])[0]["tokens"] == 10     # alone so far: all it wants
    ledger.lease("p2", [ask(want=100)])
    (nxt,) = ledger.lease("p1", [ask(want=100, next_window=True)])   # two proxies asked in window 100
    assert (nxt["window"], nxt["tokens"]) == (101, 5)


def test_debt_is_charged_and_next_window_leases_start_later() -> None:
    wall = FakeClock(6030.0)
    ledger = QuotaLedger(clock=wall)
    (a,) = ledger.lease("p1", [ask(limit=3, want=1, debt=2)])   # two requests were let through on credit
    assert (a["tokens"], a["remaining"]) == (1, 0)
    (b,) = ledger.lease("p1", [ask(limit=3, want=2, next_window=True)])
    assert (b["window"], b["tokens"], b["remaining"]) == (101, 2, 1)
    assert b["starts_in"] == pytest.approx(30.0) and b["expires_in"] == pytest.approx(90.0)
    (c,) = ledger.lease("p1", [ask(limit=3, want=9, debt=7)])   # debt beyond the limit still counts
    assert (c["tokens"], c["remaining"]) == (0, -7)


def test_a_new_owner_continues_the_window_from_the_shared_store() -> None:
    wall, store = FakeClock(6000.0), DictStore()
    first = QuotaLedger(store, clock=wall)
    assert first.lease("p1", [ask(want=7)])[0]["tokens"] == 7
    restarted = QuotaLedger(store, clock=wall)     # a restarted replica, or the next one on failover
    assert restarted.lease("p2", [ask(want=7)])[0]["tokens"] == 3
    # Back on the first owner, whose own count is stale: the store's larger count wins.
    assert first.lease("p1", [ask(want=7)])[0]["tokens"] == 0
    wall.advance(120.0)                            # two windows on: the old window's key is removed
    first.lease("p1", [ask(want=1)])
    assert sorted(int(k.rsplit("/", 1)[1]) for k in store.data) == [102]


def test_owner_index_is_stable_and_in_range() -> None:
    keys = [f"default/p/abc/{i}" for i in range(200)]
    assert all(0 <= owner_index(k, 3) < 3 for k in keys)
    assert [owner_index(k, 3) for k in keys] == [owner_index(k, 3) for k in keys]
    assert len({owner_index(k, 3) for k in keys}) == 3


# -- the proxy's buckets -------------------------------------------------------------------------


def grant(book: QuotaBook, ledger: QuotaLedger, client: str, asks: list[dict[str, Any]]) -> None:
    book.apply(ledger.lease(client, asks), [])


async def test_bucket_spends_its_lease_asks_when_low_and_takes_credit_while_waiting() -> None:
    clock, wall = FakeClock(), FakeClock(6000.0)
    book, ledger = QuotaBook(clock), QuotaLedger(clock=wall)
    b = book.bucket("d/x/", 5, 60.0, fail_open=True)
    assert (credit_limit(5), credit_limit(100), credit_limit(1000)) == (1, 5, 50)
    assert b.try_consume()                          # no lease yet: on credit ...
    assert not b.try_consume() and b.denial == "over_limit"   # ... at most credit_limit(5) of them
    asks = await book.needs(0)
    assert [(a["key"], a["debt"], a["next"]) for a in asks] == [("d/x/", credit_limit(5), False)]
    assert await book.needs(0) == []                # pending: nothing asked twice
    grant(book, ledger, "p1", asks)
    assert ledger.granted("d/x/", 60.0) == credit_limit(5) + b.current.tokens   # the credit was charged
    spent = 0
    while b.try_consume():
        spent += 1
    assert credit_limit(5) + spent <= 5
    while True:                                     # keep asking until the owner says the window is spent
        asks = await book.needs(0)
        if not asks:
            break
        grant(book, ledger, "p1", asks)
        while b.try_consume():
            spent += 1
    assert credit_limit(5) + spent == 5 and b.current is not None and b.current.exhausted
    assert not b.try_consume() and b.denial == "over_limit"


async def test_credit_beyond_the_limit_ends_credit_for_the_window() -> None:
    """Two proxies each let a first request through on credit against a limit of 1: the second
    debt overdraws the window, and neither proxy gets credit again in it."""
    clock, wall = FakeClock(), FakeClock(6000.0)
    ledger = QuotaLedger(clock=wall)
    books = [QuotaBook(clock), QuotaBook(clock)]
    buckets = [book.bucket("d/page/", 1, 60.0, fail_open=False) for book in books]
    assert all(b.try_consume() for b in buckets)
    for i, book in enumerate(books):
        grant(book, ledger, f"p{i}", await book.needs(0))
    assert ledger.granted("d/page/", 60.0) == 2
    for _ in range(3):
        assert not any(b.try_consume() for b in buckets)
        assert [await book.needs(0) for book in books] == [[], []]


async def test_next_window_lease_is_fetched_ahead_and_taken_over_at_the_boundary() -> None:
    clock, wall = FakeClock(), FakeClock(6000.0)
    book, ledger = QuotaBook(clock), QuotaLedger(clock=wall)
    b = book.bucket("d/y/", 2, 1.0, fail_open=False)
    b.try_consume()
    grant(book, ledger, "p1", await book.needs(0))
    clock.advance(0.9)
    wall.advance(0.9)
    b.try_consume()
    asks = await book.needs(0)
    assert any(a["next"] for a in asks)
    grant(book, ledger, "p1", asks)
    assert b.queued is not None and b.queued.window == 6001
    clock.advance(0.15)                             # the window ended; the queued lease is in force at once
    assert b.try_consume() and b.current.window == 6001


async def test_failure_modes_apply_only_without_a_lease() -> None:
    clock, wall = FakeClock(), FakeClock(6000.0)
    book, ledger = QuotaBook(clock), QuotaLedger(clock=wall)
    closed = book.bucket("d/closed/", 100, 60.0, fail_open=False)
    opened = book.bucket("d/open/", 100, 60.0, fail_open=True)
    closed.try_consume()
    opened.try_consume()
    grant(book, ledger, "p1", await book.needs(0))
    book.apply([], [closed.key])                    # an ask failed while a lease is in hand ...
    assert closed.current.tokens > 0 and closed.try_consume()   # ... whose tokens are still spent
    for b in (closed, opened):
        while b.current.tokens:
            assert b.try_consume()
    asks = await book.needs(0)
    assert {a["key"] for a in asks} == {closed.key, opened.key}
    book.apply([], [a["key"] for a in asks])        # no Mixer replica answered
    assert all(opened.try_consume() for _ in range(5))          # FAIL_OPEN: let through
    assert not closed.try_consume() and closed.denial == "unavailable"   # FAIL_CLOSED: refused
    grant(book, ledger, "p1", await book.needs(0))  # Mixer is back
    assert closed.try_consume() and not closed.unreachable


async def test_a_proxy_nobody_supervises_applies_the_failure_mode() -> None:
    clock = FakeClock()
    book = QuotaBook(clock)
    b = book.bucket("d/z/", 100, 60.0, fail_open=False)
    clock.advance(10.0)                             # no quota_needs poll for 10 s
    assert not b.try_consume() and b.denial == "unavailable"


async def test_two_proxies_together_stay_within_limit_plus_credit() -> None:
    """Two books against one ledger, each offered 3x the limit per window in steps of 10 ms,
    fetching leases every step as a supervisor would: per window, allowed <= limit + 2 x credit."""
    clock, wall = FakeClock(), FakeClock(6000.0)
    ledger = QuotaLedger(clock=wall)
    books = [QuotaBook(clock), QuotaBook(clock)]
    limit, unit = 50, 1.0
    allowed: dict[int, int] = {}
    for step in range(500):                         # 5 windows
        window = int(wall.now // unit)
        for i, book in enumerate(books):
            b = book.bucket("d/path/", limit, unit, fail_open=True)
            for _ in range(3 if (step + i) % 2 else 4):
                if b.try_consume():
                    allowed[window] = allowed.get(window, 0) + 1
            asks = await book.needs(0)
            if asks:
                grant(book, ledger, f"p{i}", asks)
        clock.advance(0.01)
        wall.advance(0.01)
    assert len(allowed) == 5
    assert all(n <= limit + 2 * credit_limit(limit) for n in allowed.values()), allowed
    # Leases for the next window are fetched ahead, so steady load takes no credit: exactly the limit.
    assert all(n == limit for w, n in allowed.items() if w > min(allowed)), allowed


# -- descriptors ---------------------------------------------------------------------------------


def descriptors(*entries: list[dict[str, Any]]) -> GlobalRateLimit:
    return GlobalRateLimit.from_dict({"domain": "default/rl", "failure_mode": "FAIL_OPEN", "descriptors": [
        {"entries": e, "requests_per_unit": 10, "unit": 60.0} for e in entries]})


def test_descriptor_keys_per_value_and_shared() -> None:
    from proxy_core.quota import GlobalRateLimiter

    book = QuotaBook(FakeClock())
    limiter = GlobalRateLimiter("reviews.default.svc.cluster.local", descriptors(
        [{"source": "path", "match": {"exact": "/productpage"}}],
        [{"source": "header", "header": "x-user", "match": {}}, {"source": "destination", "match": {}}],
        [{"source": "path", "match": {"prefix": "/api"}}]), book)

    def key(path: str, headers: dict[str, str] | None = None) -> str | None:
        b = limiter.bucket_for(RequestInfo("GET", path, "reviews", headers or {}))
        return b.key if b is not None else None

    assert key("/productpage?u=1") == key("/productpage")               # the path without its query
    assert key("/a", {"x-user": "jason"}) != key("/a", {"x-user": "kim"})   # one counter per value
    assert key("/a", {"x-user": "jason"}).endswith("jason\x1freviews.default.svc.cluster.local")
    assert key("/api/1") == key("/api/2") and key("/api/1") != key("/productpage")   # a prefix shares one
    assert key("/other") is None                                        # no descriptor applies


def test_source_principal_entries_count_each_workload_apart() -> None:
    from proxy_core.quota import GlobalRateLimiter, HostRateLimiter

    limiter = GlobalRateLimiter("reviews.default.svc.cluster.local", descriptors(
        [{"source": "source_principal", "match": {"prefix": "cluster.local/ns/shop/"}}],
        [{"source": "source_principal", "match": {}}]), QuotaBook(FakeClock()))

    def key(principal: str | None) -> str | None:
        req = RequestInfo("GET", "/", "reviews", {})
        req.source_principal = principal
        b = limiter.bucket_for(req)
        return b.key if b is not None else None

    shop_a, shop_b = "cluster.local/ns/shop/sa/a", "cluster.local/ns/shop/sa/b"
    assert key(shop_a) == key(shop_b)                      # a prefix: the namespace shares one counter
    assert key("cluster.local/ns/web/sa/x") != key("cluster.local/ns/web/sa/y")   # one counter per workload
    assert key("cluster.local/ns/web/sa/x").endswith("cluster.local/ns/web/sa/x")
    assert key(None) is None                                # an unidentified client matches no entry
    assert HostRateLimiter(None, None, limiter).uses_principal  # type: ignore[arg-type]
    assert not HostRateLimiter(None, None, GlobalRateLimiter("r", descriptors(  # type: ignore[arg-type]
        [{"source": "path", "match": {}}]), QuotaBook(FakeClock()))).uses_principal


def test_sample_compiles_to_the_snapshot_form() -> None:
    rl = compile_rate_limits(to_resources(load_documents([str(SAMPLE)])))
    entry = rl["productpage.default.svc.cluster.local"]
    assert entry["token_bucket"] is None and entry["routes"] == []
    assert entry["global"] == {"domain": "default/productpage-global-ratelimit", "failure_mode": "FAIL_CLOSED",
                               "descriptors": [
                                   {"entries": [{"source": "path", "match": {"exact": "/productpage"}}],
                                    "requests_per_unit": 1, "unit": 60.0},
                                   {"entries": [{"source": "path", "match": {}}],
                                    "requests_per_unit": 100, "unit": 60.0}]}


# -- a real proxy and its control channel --------------------------------------------------------


def global_snapshot(port: int, failure_mode: str, limit: int, version: str = "v1") -> dict[str, Any]:
    return rate_limited_snapshot(port, {"policy": "default/rl", "token_bucket": None, "routes": [], "global": {
        "domain": "default/rl", "failure_mode": failure_mode,
        "descriptors": [{"entries": [{"source": "path", "match": {}}], "requests_per_unit": limit, "unit": 60.0}]}},
        version)


def fetch(port: int, path: str) -> tuple[int, dict[str, str], bytes]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", path, headers={"Host": "reviews:9080"})
        r = c.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        c.close()


async def supervise(sock: str, ledger: QuotaLedger | None, stop: asyncio.Event) -> None:
    """What the proxy worker does, with a ledger in place of Mixer (None: Mixer unreachable)."""
    while not stop.is_set():
        asks = (await acall(sock, {"op": "quota_needs", "wait": 0.02}))["asks"]
        if asks:
            leases = ledger.lease("p1", asks) if ledger is not None else []
            failed = [] if ledger is not None else [a["key"] for a in asks]
            await acall(sock, {"op": "quota_leases", "leases": leases, "failed": failed})


@pytest.mark.parametrize("mixer_up, failure_mode, expected", [
    (True, "FAIL_CLOSED", (200, 200, 200, 429)),
    (False, "FAIL_OPEN", (200, 200, 200, 200)),
    (False, "FAIL_CLOSED", (200, 500, 500, 500)),     # the first on credit, before the ask failed
])
async def test_proxy_limits_through_leases(tmp_path: Path, mixer_up: bool, failure_mode: str,
                                           expected: tuple[int, ...]) -> None:
    # The counter's windows are minutes of wall-clock time: a test that crossed into the next
    # minute would rightly get a fresh allowance, so it starts clear of the boundary.
    to_boundary = 60.0 - time.time() % 60.0
    if to_boundary < 3.0:
        await asyncio.sleep(to_boundary + 0.05)
    up = await Upstream(name="reviews").start()
    proxy = ProxyServer(Snapshot.from_dict(global_snapshot(up.port, failure_mode, limit=3)))
    await proxy.start()
    sock = str(tmp_path / "control.sock")
    control = ControlServer(proxy, sock, lambda: None)
    await control.start()
    stop = asyncio.Event()
    task = asyncio.create_task(supervise(sock, QuotaLedger() if mixer_up else None, stop))
    try:
        results = []
        for _ in expected:
            results.append(await asyncio.to_thread(fetch, proxy.ports["http_proxy"], "/r"))
            await asyncio.sleep(0.1)                # room for the lease round trip
        assert tuple(s for s, _, _ in results) == expected
        for status, headers, body in results:
            if status == 429:
                assert headers["x-envoy-ratelimited"] == "true" and body == b""
            if status == 500:
                assert "x-envoy-ratelimited" not in headers
        flags = proxy.stats()["response_flags"]
        assert flags.get("RL", 0) == expected.count(429) and flags.get("RLSE", 0) == expected.count(500)
        assert len(up.seen) == expected.count(200)
    finally:
        stop.set()
        await task
        await control.close()
        await proxy.close()
        await up.close()
