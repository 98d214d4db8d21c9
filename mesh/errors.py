"""Errors the mesh reports to its users (kept free of Ray so offline tools stay light)."""
from __future__ import annotations

from typing import Sequence


class MeshError(RuntimeError):
    """The mesh answered, and said no (validation errors, unknown kinds...)."""

    def __init__(self, errors: Sequence[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = list(errors)
