"""qwenlite: run Qwen2 / Qwen2-MoE GGUF models on a laptop CPU."""

from qwenlite.errors import GGUFError, QwenliteError

__version__ = "0.1.0"

__all__ = ["GGUFError", "QwenliteError", "__version__"]
