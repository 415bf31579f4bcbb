"""Model preparation for DSSD: fetch the default model and derive draft precisions.

The device drafts with a quantized GGUF in llama.cpp and the edge verifies with the
target in transformers; this package produces those GGUF files (``python -m quantize``).
"""
