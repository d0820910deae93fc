"""qwenlite: run Qwen2 / Qwen2-MoE GGUF models on a laptop CPU.

    import qwenlite
    m = qwenlite.load("model.gguf")
    print(m.chat([{"role": "user", "content": "Hello!"}]))
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

# Prefer the OpenMP threading layer: the calling thread works too, so a parallel kernel does not stall
# waiting for descheduled workers on a busy machine (workqueue stalls measured at ~12 ms a call), and it
# is safe when several Python threads call kernels. Falls back to workqueue where OpenMP is missing.
os.environ.setdefault("NUMBA_THREADING_LAYER_PRIORITY", "omp tbb workqueue")

from qwenlite.errors import GGUFError, QwenliteError, QwenliteWarning  # noqa: E402

if TYPE_CHECKING:
    from qwenlite.api import Model, load

__version__ = "0.1.0"

__all__ = ["GGUFError", "Model", "QwenliteError", "QwenliteWarning", "__version__", "load", "serve"]


def __getattr__(name: str) -> Any:
    # The model stack imports numba; keep `import qwenlite` (and the CLI's --help) light.
    if name in ("load", "Model"):
        from qwenlite import api

        return getattr(api, name)
    if name == "serve":
        from qwenlite.server import serve

        return serve
    raise AttributeError(f"module 'qwenlite' has no attribute {name!r}")
