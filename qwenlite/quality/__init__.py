"""Quality measurement: perplexity and KL divergence (llama-perplexity's definitions)."""
