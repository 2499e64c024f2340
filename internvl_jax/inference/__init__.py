"""Serving: the jitted prefill/decode Engine with its KV cache, sampling, chat, the OpenAI-compatible server."""
