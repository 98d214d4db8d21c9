"""Dataclasses that cross process boundaries (Ray calls, the shared store) as plain dicts."""
from __future__ import annotations

from dataclasses import asdict, fields
from typing import Any, Mapping, TypeVar

R = TypeVar("R", bound="Record")


class Record:
    """Mixin for dataclasses: ``from_dict`` ignores unknown keys (a newer writer may add
    fields) and leaves missing ones at their defaults; ``to_dict`` is ``dataclasses.asdict``."""

    __slots__ = ()

    @classmethod
    def from_dict(cls: type[R], d: Mapping[str, Any] | None) -> R:
        d = d or {}
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})  # type: ignore[arg-type]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]
