"""GGUF container format: constants, a validating memory-mapped reader and a streaming writer."""
