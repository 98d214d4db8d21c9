"""Shared, revisioned state in Ray's GCS key-value store.

Every control-plane replica reads and writes the same collections here, so any replica can
serve any call and a restarted one catches up by reading.  A collection is a sequence of
whole-state revisions::

    <collection>/rev/000000000042  -> msgpack(state after revision 42)
    <collection>/head              -> "42"   (a hint, overwritten; readers probe past it)

A writer commits by *creating* the next revision key with ``overwrite=False``, which the GCS
does atomically (create-if-absent): of two writers racing for revision 43 exactly one wins,
the other re-reads revision 43 and retries its change on top of it.  No locks, no home-made
consensus, and a multi-document apply is one revision: all of it or nothing.

With GCS fault tolerance (external Redis, or the embedded RocksDB store) the revisions
survive a head restart.  Old revisions are pruned, keeping ``keep`` behind the head.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable, Protocol

import msgpack

from mesh.client import NAMESPACE


class KV(Protocol):
    """The four operations the store needs; ``create`` returns True when it inserted."""

    def get(self, key: str) -> bytes | None: ...
    def put(self, key: str, value: bytes) -> None: ...
    def create(self, key: str, value: bytes) -> bool: ...
    def delete(self, key: str) -> None: ...


class GcsKV:
    """Ray's internal KV (the store Ray Serve checkpoints into), in raymesh's namespace."""

    def __init__(self, namespace: str = NAMESPACE) -> None:
        from ray.experimental import internal_kv

        self._kv = internal_kv
        self._ns = namespace

    def get(self, key: str) -> bytes | None:
        return self._kv._internal_kv_get(key, namespace=self._ns)

    def put(self, key: str, value: bytes) -> None:
        self._kv._internal_kv_put(key, value, overwrite=True, namespace=self._ns)

    def create(self, key: str, value: bytes) -> bool:
        # _internal_kv_put returns True when the key already existed (and left it untouched).
        return not self._kv._internal_kv_put(key, value, overwrite=False, namespace=self._ns)

    def delete(self, key: str) -> None:
        self._kv._internal_kv_del(key, namespace=self._ns)


class MemoryKV:
    """The same semantics in process memory, for unit tests and offline tools."""

    def __init__(self) -> None:
        self._data: dict[str, bytes] = {}
        self._lock = threading.Lock()

    def get(self, key: str) -> bytes | None:
        return self._data.get(key)

    def put(self, key: str, value: bytes) -> None:
        self._data[key] = value

    def create(self, key: str, value: bytes) -> bool:
        with self._lock:
            if key in self._data:
                return False
            self._data[key] = value
            return True

    def delete(self, key: str) -> None:
        self._data.pop(key, None)


class ConflictError(RuntimeError):
    """Raised when a commit kept losing races for longer than its attempt budget."""


@dataclass(frozen=True, slots=True)
class Revision:
    number: int
    state: dict[str, Any]


Mutation = Callable[[dict[str, Any], int], "dict[str, Any] | None"]


class RevisionedStore:
    """One collection of whole-state revisions (see the module docstring)."""

    def __init__(self, kv: KV, collection: str, keep: int = 50) -> None:
        self._kv = kv
        self._collection = collection
        self._keep = keep

    def _rev_key(self, n: int) -> str:
        return f"{self._collection}/rev/{n:012d}"

    @property
    def _head_key(self) -> str:
        return f"{self._collection}/head"

    def latest(self) -> Revision:
        """The newest committed revision (number 0 and an empty state before the first commit)."""
        hint = self._kv.get(self._head_key)
        n = int(hint) if hint else 0
        blob = self._kv.get(self._rev_key(n)) if n else None
        # The hint may lag behind (a writer may have died between commit and hint update): probe forward.
        while True:
            nxt = self._kv.get(self._rev_key(n + 1))
            if nxt is None:
                break
            n, blob = n + 1, nxt
        if n == 0 or blob is None:
            return Revision(0, {})
        return Revision(n, msgpack.unpackb(blob, raw=False, strict_map_key=False))

    def commit(self, mutate: Mutation, attempts: int = 64) -> tuple[Revision, bool]:
        """Apply ``mutate`` to a copy of the latest state and commit it as the next revision.

        ``mutate`` receives a deep copy and the number the new revision will have, and returns the new state, or None when there is nothing
        to change (then no revision is written).  It may raise to abort.  On a lost race it is
        called again with the newer state, so it must be a pure function of its input.
        Returns (revision, changed).
        """
        for _ in range(attempts):
            base = self.latest()
            number = base.number + 1
            new_state = mutate(_deep_copy(base.state), number)
            if new_state is None:
                return base, False
            if self._kv.create(self._rev_key(number), msgpack.packb(new_state, use_bin_type=True)):
                self._kv.put(self._head_key, str(number).encode())
                if number > self._keep:
                    self._kv.delete(self._rev_key(number - self._keep))
                return Revision(number, new_state), True
        raise ConflictError(f"{self._collection}: gave up after {attempts} conflicting commits")


def _deep_copy(state: dict[str, Any]) -> dict[str, Any]:
    # msgpack round trip: fast, and exactly what would be stored.
    return msgpack.unpackb(msgpack.packb(state, use_bin_type=True), raw=False, strict_map_key=False)
