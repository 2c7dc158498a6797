"""The config.json of a reduced checkpoint (docs/facts.md §4): native deepseek_v3, no remote code,
fields that match the kept layers and experts, and where it all came from."""

from __future__ import annotations

import copy
from typing import Any

from k2mini import __version__
from k2mini.convert.transforms import Transform
from k2mini.selection.plan import Plan


def fixed_config(src_cfg: dict[str, Any], plan: Plan, transform: Transform) -> dict[str, Any]:
    cfg = copy.deepcopy(src_cfg)
    # transformers, vLLM and SGLang all load deepseek_v3 natively; kimi_k2 + auto_map would
    # make them import the source's remote code.
    cfg.pop("auto_map", None)
    cfg["model_type"] = "deepseek_v3"
    cfg["architectures"] = ["DeepseekV3ForCausalLM"]
    cfg.update(plan.config.model_dump())
    # The plan keeps dense layers in front, then one MoE layer after another.
    cfg["moe_layer_freq"] = 1
    cfg["num_nextn_predict_layers"] = 0  # MTP layers are never written
    # A source's own k2mini block (it was itself reduced) is replaced, but what the transform
    # adds to the block (quantize settings) is kept.
    cfg.pop("k2mini", None)
    cfg = transform.update_config(cfg)
    cfg["k2mini"] = {
        "tool_version": __version__,
        "source": plan.source.location,
        "source_config_sha256": plan.source.config_sha256,
        "source_index_sha256": plan.source.index_sha256,
        "source_layers": plan.layers,
        "expert_map": plan.expert_map(),
        "layer_strategy": plan.layer_strategy,
        "expert_strategy": plan.expert_strategy,
        "group_policy": plan.group_policy,
        "analysis": plan.analysis,
        "merge": plan.merge_similarity,  # set: output experts are merges, expert_map names the kept one
        "dtype": transform.name,
        **cfg.get("k2mini", {}),
    }
    return cfg
