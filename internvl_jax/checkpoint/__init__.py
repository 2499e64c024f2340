"""Checkpoints: safetensors files, the key maps of the two released layouts, from_pretrained/save_pretrained."""
