"""Hugging Face checkpoint -> GGUF conversion and GGUF re-quantization."""
