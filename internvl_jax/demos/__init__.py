"""Runnable demos: the digits task (data, tokenizer, configs) and a random-model checkpoint round trip."""
