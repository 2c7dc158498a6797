"""k2mini validate: static checks, memory plan, run checks and comparison with the source."""

# Here rather than in engines.py, so `k2mini validate --help` can show them without importing torch.
ENGINES = ("vllm",)
# Mean |log p_engine - log p_transformers| over prompt tokens, nats. vLLM computes in BF16
# and transformers here in float32. On the K2-head fixture (mla-grouped, 3 layers x 8
# experts) vLLM's CPU build is 0.0021 apart, as close as transformers' own BF16 forward
# (0.0019), while real config mistakes move transformers itself by 0.020 (routing groups
# flattened), 0.037 (routed_scaling_factor 1) and 0.057 (top-1 instead of top-2).
ENGINE_TOLERANCE = 0.01
