"""Bridges to transformers' DeepseekV3: config without remote code, K2 names to its fused
expert parameters, and a whole-model loader for checkpoints small enough to hold."""

from __future__ import annotations

import copy
import re
import reprlib
from collections.abc import Iterable
from typing import Any

import torch

_EXPERT = re.compile(r"^(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
# Fields of a K2 config that are remote-code or quantization plumbing, not architecture.
_NON_ARCH = ("auto_map", "quantization_config", "model_type", "architectures", "k2mini")


def hf_config(cfg: dict[str, Any]):
    """transformers' DeepseekV3Config for a K2 or DeepSeek-V3 config dict (no remote code).

    config.json comes from the checkpoint, so values transformers would reject, or crash on
    later (an unknown activation), end in one CheckpointError naming config.json.
    """
    from huggingface_hub.errors import StrictDataclassError
    from transformers import DeepseekV3Config
    from transformers.activations import ACT2FN

    from k2mini.errors import CheckpointError
    from k2mini.model.spec import ModelSpec

    ModelSpec.from_config(cfg)  # range checks on every field that sizes a tensor
    act = cfg.get("hidden_act", "silu")
    if not isinstance(act, str) or act not in ACT2FN:
        raise CheckpointError(f"config.json: hidden_act={reprlib.repr(act)} is not an activation transformers knows")
    fields = {k: copy.deepcopy(v) for k, v in cfg.items() if k not in _NON_ARCH}
    try:
        return DeepseekV3Config(**fields)
    except (StrictDataclassError, TypeError, ValueError) as exc:
        detail = " ".join(str(exc).split())[:300]
        raise CheckpointError(f"config.json: transformers' DeepseekV3Config rejects it: {detail}") from None


def fuse_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """K2 per-expert weights -> transformers' fused ``experts.gate_up_proj`` / ``down_proj``.

    transformers 5 stores each MoE layer's experts as [E, 2I, H] (gate rows then up rows)
    and [E, H, I]. Experts must be numbered 0..E-1 with none missing.
    """
    out: dict[str, torch.Tensor] = {}
    groups: dict[str, dict[int, dict[str, torch.Tensor]]] = {}
    for name, t in tensors.items():
        m = _EXPERT.match(name)
        if m:
            groups.setdefault(m.group(1), {}).setdefault(int(m.group(2)), {})[m.group(3)] = t
        else:
            out[name] = t
    for prefix, experts in groups.items():
        ids = sorted(experts)
        if ids != list(range(len(ids))):
            raise ValueError(f"{prefix}: experts are not numbered 0..{len(ids) - 1}: {ids[:10]}")
        out[f"{prefix}.gate_up_proj"] = torch.stack([torch.cat([experts[e]["gate_proj"], experts[e]["up_proj"]]) for e in ids])
        out[f"{prefix}.down_proj"] = torch.stack([experts[e]["down_proj"] for e in ids])
    return out


def unfuse_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers' fused expert tensors -> K2's per-expert names (the inverse of
    ``fuse_experts``); the per-expert tensors are views of the fused ones."""
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        if name.endswith("mlp.experts.gate_up_proj"):
            prefix = name[: -len("gate_up_proj")]
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.gate_proj.weight"] = t[e, :inter]
                out[f"{prefix}{e}.up_proj.weight"] = t[e, inter:]
        elif name.endswith("mlp.experts.down_proj"):
            prefix = name[: -len("down_proj")]
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.down_proj.weight"] = t[e]
        else:
            out[name] = t
    return out


def fill_module(module: torch.nn.Module, tensors: Iterable[tuple[str, torch.Tensor]], dtype: torch.dtype, *,
                device: torch.device | None = None, requires_grad: bool = True, complete: bool = True) -> int:
    """Put each (name, tensor) into a meta-device transformers module, one at a time (so a
    caller streaming from a checkpoint holds one tensor beyond the module): floating tensors
    in ``dtype`` except the router's correction bias, which stays FP32 as K2 stores it.
    ``complete``: every parameter and buffer must then be filled. Returns the bytes placed.
    The one way a module is filled from a checkpoint (whole model, offload, layer stream)."""
    from k2mini.errors import CheckpointError

    placed = 0
    for name, t in tensors:
        if t.is_floating_point() and not name.endswith("e_score_correction_bias"):
            t = t.to(dtype)
        if device is not None:
            t = t.to(device)
        prefix, _, leaf = name.rpartition(".")
        mod = module.get_submodule(prefix)
        if leaf in mod._parameters:
            mod._parameters[leaf] = torch.nn.Parameter(t, requires_grad=requires_grad and t.is_floating_point())
        elif leaf in mod._buffers:
            mod._buffers[leaf] = t
        else:
            raise CheckpointError(f"tensor {name} has no place in transformers' DeepseekV3 model")
        placed += t.nbytes
    if complete:
        left = [n for n, p in module.named_parameters() if p.is_meta] + [n for n, b in module.named_buffers() if b.is_meta]
        if left:
            raise CheckpointError(f"checkpoint has no tensor for {left[0]} ({len(left)} missing)")
    return placed


def build_model(cfg: dict[str, Any], tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32):
    """A DeepseekV3ForCausalLM holding exactly ``tensors`` (K2 names); strict about keys."""
    from transformers import DeepseekV3ForCausalLM

    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(hf_config(cfg))
    # Non-persistent buffers (rotary inv_freq) were created on meta: rebuild them.
    model.model.rotary_emb = type(model.model.rotary_emb)(model.config)
    fill_module(model, fuse_experts(tensors).items(), dtype)
    return model.eval()


def load_checkpoint_model(ck, dtype: torch.dtype = torch.float32, names: Iterable[str] | None = None):
    """Whole model from a Checkpoint (small checkpoints only: everything is resident)."""
    from k2mini.checkpoint.names import Role

    wanted = names if names is not None else [n for n in ck.weight_names() if ck.tensors[n].parsed.role is not Role.INV_FREQ]
    return build_model(ck.config, {n: ck.read(n) for n in wanted}, dtype)
