"""Inference: the latent KV cache, sampling, generation and MTP speculative decoding."""
