"""Which projections of an FP8 checkpoint stay FP8, and which an FP8 output must store BF16.

The rule, in one place (used by convert --dtype fp8, the config it writes, the spec that
validate / inspect / the memory plan check against):

1. A projection whose shape is not a multiple of the 128x128 block is stored BF16.
   transformers 5 cannot load it as FP8: on a machine without FP8 compute it dequantizes
   at load in ``Fp8Dequantize._dequantize_one`` (transformers/integrations/finegrained_fp8.py),
   which infers the block as ``shape // scale grid``. A [576, 7168] weight with its [5, 56]
   grid raises "Weight shape (576, 7168) not divisible by scale grid (5, 56)"; a [96, 192]
   weight with its [1, 2] grid divides, and is silently scaled with 96x96 blocks instead of
   the 128x128 ones it was quantized with. Kimi-K2 has one such projection,
   ``self_attn.kv_a_proj_with_mqa`` [576, 7168]; every other K2 projection fills its blocks.
2. Its fused partner goes with it. vLLM's DeepseekV2/V3 model loads ``q_a_proj`` and
   ``kv_a_proj_with_mqa`` as one GEMM (``fused_qkv_a_proj`` in its packed_modules_mapping),
   and its ``is_layer_skipped`` raises "Detected some but not all shards of ... are
   quantized" when only one of them is listed. (Read from vLLM's source, not run here.)
3. The BF16 modules are listed in ``quantization_config.modules_to_not_convert`` as
   transformers module paths (``model.layers.3.self_attn.kv_a_proj_with_mqa``; routed
   experts as the fused ``model.layers.3.mlp.experts``, since transformers 5 holds one
   module for all experts of a layer). transformers matches the list in
   ``replace_with_fp8_linear`` through ``should_convert_module``; ``is_skipped`` below is
   the same test. ``lm_head`` (BF16 in every K2 export) is listed too: transformers only
   skips it by default when no list is given.

Dequantizing such a weight is exact with respect to what transformers would compute: the
BF16 value is ``bf16(fp8 * scale_inv)``, the DeepSeek block formula, which is also what
transformers produces for an aligned FP8 weight when it dequantizes at load.
"""

from __future__ import annotations

import re
from dataclasses import replace
from functools import lru_cache
from typing import TYPE_CHECKING

from k2mini.checkpoint.fp8_grid import BLOCK

if TYPE_CHECKING:
    from k2mini.model.spec import ModelSpec

# Projections vLLM fuses into one GEMM (and so one precision), by the name transformers uses.
_FUSED_WITH = {"q_a_proj": "kv_a_proj_with_mqa", "kv_a_proj_with_mqa": "q_a_proj"}
_EXPERT = re.compile(r"^(.*\.mlp\.experts)\.\d+\.[a-z_]+\.weight$")


def fills_blocks(shape: tuple[int, ...], block: int = BLOCK) -> bool:
    """True when every 128x128 block of a 2-D weight is complete."""
    return len(shape) == 2 and shape[0] % block == 0 and shape[1] % block == 0


def hf_module(weight_name: str) -> str:
    """The transformers module that holds a K2-named weight (routed experts are one fused module)."""
    m = _EXPERT.match(weight_name)
    if m:
        return m.group(1)
    return weight_name.removesuffix(".weight")


@lru_cache(maxsize=16)
def _matcher(patterns: tuple[str, ...]) -> re.Pattern[str]:
    # One alternation instead of one re.match per pattern: a K2 spec tests 139k names.
    return re.compile("(?:" + "|".join(f"(?:{p})" for p in patterns) + r")(?:(?<=\.)|(?=\.|$))")


def is_skipped(module: str, patterns: tuple[str, ...]) -> bool:
    """transformers' ``should_convert_module`` negated (quantizers/quantizers_utils.py, 5.x):
    a pattern matches as a regex from the start up to a module boundary, or as a suffix."""
    return bool(patterns) and (module.endswith(patterns) or _matcher(patterns).match(module) is not None)


@lru_cache(maxsize=8)
def modules_to_not_convert(spec: ModelSpec) -> tuple[str, ...]:
    """The transformers modules an FP8 checkpoint of ``spec`` must store BF16, in tensor order."""
    shapes = {t.name: t.shape for t in replace(spec, fp8=True, fp8_skip=()).tensors() if t.dtype == "F8_E4M3"}
    out: dict[str, None] = {}
    for name, shape in shapes.items():
        prefix, proj, _ = name.rsplit(".", 2)
        partner = shapes.get(f"{prefix}.{_FUSED_WITH[proj]}.weight") if proj in _FUSED_WITH else None
        if not fills_blocks(shape) or (partner is not None and not fills_blocks(partner)):
            out[hf_module(name)] = None
    # transformers skips lm_head by default only when no list is given (HfQuantizer.get_modules_to_not_convert:
    # get_keys_to_not_convert runs when skip_modules is None); with a list, it would make lm_head an FP8Linear.
    return (*out, "lm_head") if out else ()
