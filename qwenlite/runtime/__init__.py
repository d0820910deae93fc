"""The runtime: loader, KV cache of many sequences, and the engine that runs batches over them."""
