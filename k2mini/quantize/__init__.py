"""Integer weight quantization (``k2mini quantize``, ``convert --dtype int4|int8``)."""

# Here rather than in formats.py, so `k2mini quantize --help` can list them without
# importing torch and compressed-tensors.
FORMATS = ("compressed-tensors", "bnb", "quanto")
GROUP_SIZES = (32, 64, 128)


def auto_group_size(shape: tuple[int, ...], routed_expert: bool) -> int | None:
    """INT4's default group for a 2-D weight: the largest of 128, 64, 32 that divides its
    input dimension, or None (one scale per output channel) when none does.

    vLLM runs a layer's routed experts as one fused MoE kernel with one scheme for gate/up
    (input: hidden_size) and down (input: moe_intermediate_size), and refuses experts whose
    projections differ ("All MoE projections need to have same quantization scheme"), so a
    routed expert's group must divide both of its dimensions."""
    dims = tuple(shape) if routed_expert else tuple(shape[1:])
    return next((g for g in sorted(GROUP_SIZES, reverse=True) if all(d % g == 0 for d in dims)), None)
