"""The healed weights under their K2 names, one decoder layer at a time (then the root's
embeddings, norm and head), adapters merged: what rank 0 hands to the writer.

Under FSDP2 each group is all-gathered (``unshard``) on every rank, as its forward would do,
read, and freed (``reshard``) before the next: no rank holds more than its shard plus one
layer, never the whole model twice. Without FSDP the same code reads the local replica.
LoRA is merged per module as base + peft's own ``get_delta_weight`` (the update peft's
``merge`` would add), so the base model is never rebuilt whole.
"""

from __future__ import annotations

import torch

from k2mini.checkpoint.names import parse_name
from k2mini.heal import methods
from k2mini.heal.sharding import is_sharded
from k2mini.model.hf import unfuse_experts

ROOT = -1  # the group of every tensor outside the decoder layers


def group_of(name: str) -> int:
    layer = parse_name(name).layer
    return ROOT if layer is None else layer


def in_group_order(names: list[str]) -> list[str]:
    """``names`` with each group's tensors together (layers in order, the root last), so each
    group is gathered once."""
    return sorted(names, key=lambda n: (group_of(n) == ROOT, group_of(n)))


def _plain(name: str) -> str:
    """peft's module path -> the model's (``base_model.model.`` and ``.base_layer`` dropped)."""
    name = name.removeprefix("base_model.model.")
    return ".".join(p for p in name.split(".") if p != "base_layer")


@torch.no_grad()
def _merged(module: torch.nn.Module, prefix: str, skip: str | None) -> dict[str, torch.Tensor]:
    """The module's parameters and buffers (the correction biases) under the plain model's names,
    LoRA updates added: FP32 copies on the CPU (copies: the gathered storage is freed when the layer
    is resharded)."""
    from itertools import chain

    from peft.tuners.lora import LoraLayer

    out: dict[str, torch.Tensor] = {}
    persistent = ((f"{m}.{b}" if m else b, t) for m, sub in module.named_modules(prefix=prefix) for b, t in sub._buffers.items()
                  if t is not None and b not in sub._non_persistent_buffers_set)
    for name, p in chain(module.named_parameters(prefix=prefix), persistent):
        if (skip and name.startswith(skip)) or ".lora_" in name:
            continue
        out[_plain(name.replace(".parametrizations.", ".").replace(".original", ""))] = p.detach().to("cpu", torch.float32, copy=True)
    for name, sub in module.named_modules(prefix=prefix):
        if skip and name.startswith(skip):
            continue
        if isinstance(sub, LoraLayer):
            for adapter in sub.active_adapters:
                target = f"{_plain(name)}.{getattr(sub, 'parameter_name', 'weight')}"
                out[target] = out[target] + sub.get_delta_weight(adapter).detach().float().cpu()
    return out


class LayerGather:
    """``get(name)`` in the order of ``in_group_order``: the group is gathered on first use.

    Every rank must gather the same groups in the same order (the all-gathers are
    collective): rank 0 through ``get`` while writing, the others through ``follow``.
    """

    def __init__(self, root: torch.nn.Module, trained: torch.nn.Module, keep: bool):
        self.root, self.trained, self.keep = root, trained, keep
        self.base = methods.base_model(trained)
        self.layers_prefix = self._prefix_of(self.base.model.layers)
        self._group: int | None = None
        self._tensors: dict[str, torch.Tensor] = {}
        self.peak_bytes = 0  # the most tensor bytes held at once (one group)

    def _prefix_of(self, target: torch.nn.Module) -> str:
        return next(n for n, m in self.trained.named_modules() if m is target)

    def _gather(self, group: int) -> dict[str, torch.Tensor]:
        if group == ROOT:
            owner, module, prefix, skip = self.root, self.trained, "", self.layers_prefix + "."
        else:
            module = self.base.model.layers[group]
            owner, prefix, skip = module, f"{self.layers_prefix}.{group}", None
        if is_sharded(owner):
            owner.unshard()
        try:
            return unfuse_experts(_merged(module, prefix, skip)) if self.keep else {}
        finally:
            if is_sharded(owner):
                owner.reshard()

    def get(self, name: str) -> torch.Tensor:
        group = group_of(name)
        if group != self._group:
            self._tensors = {}
            self._tensors = self._gather(group)
            self._group = group
            self.peak_bytes = max(self.peak_bytes, sum(t.numel() * t.element_size() for t in self._tensors.values()))
        return self._tensors.pop(name)

    def follow(self, names: list[str]) -> None:
        """Take part in every gather rank 0 makes for ``names`` (ranks other than 0)."""
        for group in dict.fromkeys(group_of(n) for n in in_group_order(names)):
            self._gather(group)

