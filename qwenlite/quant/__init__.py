"""Quantization formats: one module per ggml type, plus the shared registry (see docs/architecture.md)."""
