"""Reading and writing K2-format checkpoints: names, safetensors framing, FP8 blocks."""
