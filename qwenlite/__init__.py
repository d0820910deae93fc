"""qwenlite: run Qwen2 / Qwen2-MoE GGUF models on a laptop CPU.

    import qwenlite
    m = qwenlite.load("model.gguf")
    print(m.chat([{"role": "user", "content": "Hello!"}]))
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qwenlite.errors import GGUFError, QwenliteError

if TYPE_CHECKING:
    from qwenlite.api import Model, load

__version__ = "0.1.0"

__all__ = ["GGUFError", "Model", "QwenliteError", "__version__", "load"]


def __getattr__(name: str) -> Any:
    # The model stack imports numba; keep `import qwenlite` (and the CLI's --help) light.
    if name in ("load", "Model"):
        from qwenlite import api

        return getattr(api, name)
    raise AttributeError(f"module 'qwenlite' has no attribute {name!r}")
