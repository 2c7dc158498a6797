"""Reduced outputs built by hand for the validate tests (independent of k2mini convert):
keep some layers and experts of a K2-format fixture, renumber, slice routers, write BF16
(FP8 dequantized with its scales) or FP8 pass-through, with a docs/facts.md §4 config. A ``mutate``
hook lets a test break the result deliberately."""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from k2mini.checkpoint.names import Role, rename
from k2mini.checkpoint.reader import Checkpoint


def reduce_by_hand(
    src: Path,
    out: Path,
    *,
    layers: Sequence[int] | None = None,
    experts: Sequence[int] | None = None,
    dtype: str = "bf16",
    mutate: Callable[[dict[str, torch.Tensor], dict], None] | None = None,
    partial_bf16: bool = False,
) -> Path:
    """``partial_bf16`` (fp8): store BF16 and list in modules_to_not_convert every FP8 weight that is
    not whole 128x128 blocks, with its q_a_proj / kv_a_proj_with_mqa partner and lm_head, the layout
    transformers and vLLM load; without it, every FP8 weight is passed through as stored."""
    ck = Checkpoint.open(src)
    cfg = copy.deepcopy(ck.config)
    skipped: dict[str, None] = {}

    def partial(name: str) -> bool:
        partner = {"q_a_proj": "kv_a_proj_with_mqa", "kv_a_proj_with_mqa": "q_a_proj"}
        prefix, proj, _ = name.rsplit(".", 2)
        names = [name] + ([f"{prefix}.{partner[proj]}.weight"] if proj in partner else [])
        return any(n in ck.tensors and any(d % 128 for d in ck.tensors[n].shape) for n in names)
    layers = list(range(cfg["num_hidden_layers"])) if layers is None else list(layers)
    experts = list(range(cfg["n_routed_experts"])) if experts is None else list(experts)
    first_dense = cfg.get("first_k_dense_replace", 0)
    tensors: dict[str, torch.Tensor] = {}

    def take(name: str, new: str) -> None:
        info = ck.tensors[name]
        bf16 = dtype != "fp8" or (partial_bf16 and ck.is_fp8(info.parsed.weight_name) and partial(info.parsed.weight_name))
        if info.parsed.is_scale:
            if not bf16:
                tensors[new] = ck.read_raw(name)
            return
        if dtype == "fp8" and bf16:
            module = new.removesuffix(".weight")
            skipped[module.rsplit(".", 2)[0] if ".experts." in module else module] = None
        tensors[new] = ck.read(name) if bf16 else ck.read_raw(name)

    for name, info in ck.tensors.items():
        pn = info.parsed
        if pn.role is Role.INV_FREQ:
            continue
        if pn.layer is None:
            take(name, name)
            continue
        if pn.layer not in layers:
            continue
        new_layer = layers.index(pn.layer)
        if pn.role is Role.EXPERT:
            if pn.expert in experts:
                take(name, rename(name, layer=new_layer, expert=experts.index(pn.expert)))
            continue
        new = rename(name, layer=new_layer)
        if pn.role in (Role.ROUTER, Role.ROUTER_BIAS):
            tensors[new] = ck.read(name)[experts].contiguous()
            continue
        take(name, new)

    cfg.pop("auto_map", None)
    cfg["model_type"] = "deepseek_v3"
    cfg["num_hidden_layers"] = len(layers)
    cfg["first_k_dense_replace"] = sum(1 for layer in layers if layer < first_dense)
    cfg["n_routed_experts"] = len(experts)
    cfg["num_experts_per_tok"] = min(cfg["num_experts_per_tok"], len(experts))
    if dtype == "bf16":
        cfg.pop("quantization_config", None)
    if skipped:
        cfg["quantization_config"]["modules_to_not_convert"] = [*skipped, "lm_head"]
    if mutate is not None:
        mutate(tensors, cfg)
    out.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / f).exists():
            shutil.copy(src / f, out / f)
    return out
