"""The ViT-MLP-LLM model (Figure 2): InternViT, pixel shuffle, the MLP projector, the Qwen3 decoders."""
