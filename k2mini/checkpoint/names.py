"""Parse and rebuild Kimi-K2 / DeepSeek-V3 tensor names.

Every later stage (selection, renumbering, validation) needs to know, from a name alone,
which layer and expert a tensor belongs to and what role it plays; this is the one place
that knows the naming scheme.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum

SCALE_SUFFIX = ".weight_scale_inv"

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(.+)$")


class Role(str, Enum):
    EMBED = "embed"
    LM_HEAD = "lm_head"
    FINAL_NORM = "final_norm"
    NORM = "norm"  # per-layer RMSNorm weights (layer norms and MLA lora norms)
    ATTN = "attn"
    DENSE_MLP = "dense_mlp"
    ROUTER = "router"
    ROUTER_BIAS = "router_bias"
    EXPERT = "expert"
    SHARED_EXPERT = "shared_expert"
    INV_FREQ = "inv_freq"
    OTHER = "other"


@dataclass(frozen=True)
class TensorName:
    """What a tensor name says about the tensor."""

    name: str
    role: Role
    layer: int | None = None
    expert: int | None = None
    is_scale: bool = False

    @property
    def weight_name(self) -> str:
        """The weight a scale belongs to (the name itself for a weight)."""
        if self.is_scale:
            return self.name[: -len(SCALE_SUFFIX)] + ".weight"
        return self.name


def scale_name(weight_name: str) -> str:
    """``...proj.weight`` -> ``...proj.weight_scale_inv``."""
    if not weight_name.endswith(".weight"):
        raise ValueError(f"not a weight name: {weight_name}")
    return weight_name[: -len(".weight")] + SCALE_SUFFIX


def _role_in_layer(rest: str) -> Role:
    if rest.startswith("self_attn."):
        if rest.endswith("rotary_emb.inv_freq"):
            return Role.INV_FREQ
        if "layernorm" in rest:
            return Role.NORM
        return Role.ATTN
    if rest.endswith("layernorm.weight"):
        return Role.NORM
    if rest.startswith("mlp.shared_experts."):
        return Role.SHARED_EXPERT
    if rest == "mlp.gate.weight":
        return Role.ROUTER
    if rest == "mlp.gate.e_score_correction_bias":
        return Role.ROUTER_BIAS
    if rest.startswith("mlp.") and rest.split(".")[1] in ("gate_proj", "up_proj", "down_proj"):
        return Role.DENSE_MLP
    return Role.OTHER


def parse_name(name: str) -> TensorName:
    is_scale = name.endswith(SCALE_SUFFIX)
    m = _LAYER.match(name)
    if m is None:
        role = {
            "model.embed_tokens.weight": Role.EMBED,
            "lm_head.weight": Role.LM_HEAD,
            "model.norm.weight": Role.FINAL_NORM,
        }.get(name, Role.OTHER)
        return TensorName(name, role, is_scale=is_scale)
    layer, rest = int(m.group(1)), m.group(2)
    e = _EXPERT.match(rest)
    if e is not None:
        return TensorName(name, Role.EXPERT, layer=layer, expert=int(e.group(1)), is_scale=is_scale)
    return TensorName(name, _role_in_layer(rest), layer=layer, is_scale=is_scale)


def rename(name: str, *, layer: int | None = None, expert: int | None = None) -> str:
    """Renumber the layer and/or routed-expert index in a tensor name."""
    m = _LAYER.match(name)
    if m is None:
        if layer is not None or expert is not None:
            raise ValueError(f"{name} has no layer index to renumber")
        return name
    new_layer = int(m.group(1)) if layer is None else layer
    rest = m.group(2)
    if expert is not None:
        e = _EXPERT.match(rest)
        if e is None:
            raise ValueError(f"{name} is not a routed-expert tensor")
        rest = f"mlp.experts.{expert}.{e.group(2)}"
    return f"model.layers.{new_layer}.{rest}"


# -- building names (the inverse of parse_name) -----------------------------------------

EXPERT_PROJS = ("gate_proj", "up_proj", "down_proj")


def layer_prefix(layer: int) -> str:
    """``model.layers.{layer}.``: every tensor of the layer starts with it."""
    return f"model.layers.{layer}."


def router_weight(layer: int) -> str:
    return f"{layer_prefix(layer)}mlp.gate.weight"


def router_bias(layer: int) -> str:
    """The noaux_tc correction bias (absent for other routers)."""
    return f"{layer_prefix(layer)}mlp.gate.e_score_correction_bias"


def expert_prefix(layer: int, expert: int) -> str:
    return f"{layer_prefix(layer)}mlp.experts.{expert}."


def expert_weight(layer: int, expert: int, proj: str) -> str:
    return f"{expert_prefix(layer, expert)}{proj}.weight"


def expert_weights(layer: int, expert: int) -> list[str]:
    """The routed expert's gate, up and down projection weights, in that order."""
    return [expert_weight(layer, expert, p) for p in EXPERT_PROJS]
