"""Compute backends: where the model's kernels run. ``get_backend(name)`` gives one; "cpu" is the only one
built in (Numba on the host), and the model graph reaches kernels only through the ``Backend`` interface."""

from __future__ import annotations

from qwenlite.backends.base import Backend
from qwenlite.errors import QwenliteError


def get_backend(name: str = "cpu") -> Backend:
    """The backend called ``name``."""
    if name == "cpu":
        from qwenlite.backends.cpu import CPUBackend

        return CPUBackend()
    raise QwenliteError(f"unknown backend {name!r}: qwenlite has 'cpu'")


__all__ = ["Backend", "get_backend"]
