"""The revisioned store: atomic commits, conflict retry, lagging hints, pruning."""
from __future__ import annotations

import threading

import pytest

from actors.store import ConflictError, MemoryKV, RevisionedStore


def add(key: str, value: int):
    def mutate(state, _rev):
        if state.get(key) == value:
            return None
        state[key] = value
        return state
    return mutate


def test_empty_store_is_revision_zero():
    rev = RevisionedStore(MemoryKV(), "c").latest()
    assert (rev.number, rev.state) == (0, {})


def test_commit_creates_next_revision_and_noop_writes_nothing():
    store = RevisionedStore(MemoryKV(), "c")
    rev, changed = store.commit(add("a", 1))
    assert (rev.number, changed, rev.state) == (1, True, {"a": 1})
    rev, changed = store.commit(add("a", 1))
    assert (rev.number, changed) == (1, False)
    assert store.latest().number == 1


def test_mutate_sees_the_revision_number_it_will_commit():
    store = RevisionedStore(MemoryKV(), "c")
    store.commit(add("a", 1))
    seen = []

    def mutate(state, number):
        seen.append(number)
        state["rv"] = number
        return state

    rev, _ = store.commit(mutate)
    assert seen == [2] and rev.state["rv"] == 2


def test_concurrent_writers_never_lose_an_update():
    kv = MemoryKV()
    writers, per_writer = 8, 25

    def work(w: int) -> None:
        store = RevisionedStore(kv, "c")
        for i in range(per_writer):
            store.commit(add(f"w{w}-{i}", i))

    threads = [threading.Thread(target=work, args=(w,)) for w in range(writers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    final = RevisionedStore(kv, "c").latest()
    assert len(final.state) == writers * per_writer
    assert final.number == writers * per_writer


def test_lost_race_is_retried_on_the_newer_state():
    kv = MemoryKV()
    store = RevisionedStore(kv, "c")
    other = RevisionedStore(kv, "c")
    calls = []

    def mutate(state, number):
        calls.append(dict(state))
        if len(calls) == 1:  # someone else commits revision 1 while we compute
            other.commit(add("theirs", 1))
        state["mine"] = 1
        return state

    rev, _ = store.commit(mutate)
    assert rev.number == 2 and rev.state == {"theirs": 1, "mine": 1}
    assert calls == [{}, {"theirs": 1}]


def test_latest_probes_past_a_stale_head_hint():
    kv = MemoryKV()
    store = RevisionedStore(kv, "c")
    store.commit(add("a", 1))
    store.commit(add("b", 2))
    kv.put("c/head", b"1")  # a writer died between its commit and the hint update
    assert store.latest().number == 2


def test_old_revisions_are_pruned():
    kv = MemoryKV()
    store = RevisionedStore(kv, "c", keep=3)
    for i in range(10):
        store.commit(add("n", i))
    assert kv.get("c/rev/000000000001") is None
    assert kv.get("c/rev/000000000010") is not None
    assert store.latest().state == {"n": 9}


def test_conflict_error_after_attempt_budget():
    kv = MemoryKV()
    store = RevisionedStore(kv, "c")
    other = RevisionedStore(kv, "c")

    def always_loses(state, number):
        other.commit(add(f"x{number}", number))
        state["mine"] = 1
        return state

    with pytest.raises(ConflictError):
        store.commit(always_loses, attempts=3)
