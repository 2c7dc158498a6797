"""k2mini: shrink Kimi-K2 / DeepSeek-V3 MoE checkpoints, one tensor at a time."""

__version__ = "0.1.0"
