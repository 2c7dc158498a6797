"""Layer selectors: which source layers a reduced model keeps.

Each selector is ``fn(ctx, n) -> LayerChoice`` registered under a name with
``@layer_selector("name")``; ``convert --layer-strategy name`` picks it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from k2mini.errors import UsageError
from k2mini.selection.context import SelectionContext


@dataclass
class LayerChoice:
    layers: list[int]  # increasing source layer indices
    scores: list[float] | None = None  # per source layer (higher = more important), if any
    notes: list[str] | None = None


LayerSelector = Callable[[SelectionContext, int], LayerChoice]
LAYER_SELECTORS: dict[str, LayerSelector] = {}


def layer_selector(name: str):
    def deco(fn: LayerSelector) -> LayerSelector:
        LAYER_SELECTORS[name] = fn
        return fn
    return deco


def protected_layers(ctx: SelectionContext) -> list[int]:
    """The leading dense layer(s) and the last layer, unless --no-protect-ends."""
    if not ctx.options.protect_ends:
        return []
    L = ctx.spec.num_hidden_layers
    dense_front = [l for l in range(L) if not ctx.spec.is_moe(l) and all(not ctx.spec.is_moe(k) for k in range(l))]
    return sorted(set(dense_front) | {L - 1})


@layer_selector("uniform")
def uniform(ctx: SelectionContext, n: int) -> LayerChoice:
    """Evenly spaced over the source, first and last layer included (the old scripts' rule)."""
    L = ctx.spec.num_hidden_layers
    if n == 1:
        return LayerChoice([0])
    # Integer rounding of linspace(0, L-1, n): distinct because the step (L-1)/(n-1) >= 1.
    return LayerChoice([(i * (L - 1) + (n - 1) // 2) // (n - 1) for i in range(n)])


def _layer_metric(ctx: SelectionContext) -> list[float]:
    a = ctx.require_analysis("importance")
    metric = ctx.options.layer_metric
    by_layer = {s.layer: s for s in a.layers}
    out = []
    for l in range(ctx.spec.num_hidden_layers):
        s = by_layer.get(l)
        v = getattr(s, metric, None) if s is not None else None
        if v is None:
            raise UsageError(f"--analysis {ctx.analysis_path}: layer {l} has no {metric} (choose another --layer-metric)")
        out.append(float(v))
    return out


@layer_selector("importance")
def importance(ctx: SelectionContext, n: int) -> LayerChoice:
    """Highest block influence (or NLL increase when skipped) first; protected layers always kept."""
    scores = _layer_metric(ctx)
    keep = protected_layers(ctx)
    if n < len(keep):
        raise UsageError(f"--layers {n}: the first dense layer(s) and the last layer ({keep}) are kept; "
                         "ask for more layers or pass --no-protect-ends")
    rest = sorted((l for l in range(len(scores)) if l not in keep), key=lambda l: (-scores[l], l))
    return LayerChoice(sorted(keep + rest[: n - len(keep)]), scores)


@layer_selector("contiguous")
def contiguous(ctx: SelectionContext, n: int) -> LayerChoice:
    """Drop the cheapest block of consecutive layers (Gromov et al.'s angular distance)."""
    a = ctx.require_analysis("contiguous")
    L = ctx.spec.num_hidden_layers
    d = L - n
    if d == 0:
        return LayerChoice(list(range(L)))
    protected = set(protected_layers(ctx))
    starts = [s for s in range(L - d + 1) if not protected & set(range(s, s + d))]
    if not starts:
        raise UsageError(f"--layers {n}: no block of {d} consecutive layers avoids the protected layers {sorted(protected)}")
    ang = a.angular_distance.get(str(d))
    notes = []
    if ang is not None and len(ang) >= L - d + 1:
        cost = {s: float(ang[s]) for s in starts}
        scores = None
    else:
        # Without d(l, n) for this n, the sum of block influences over the window stands in.
        bi = {s.layer: s.block_influence for s in a.layers}
        cost = {s: sum(bi.get(l, 0.0) for l in range(s, s + d)) for s in starts}
        scores = [float(bi.get(l, 0.0)) for l in range(L)]
        notes.append(f"angular_distance for n={d} not in the analysis; used summed block influence")
    best = min(starts, key=lambda s: (cost[s], s))
    return LayerChoice([l for l in range(L) if not best <= l < best + d], scores, notes)


@layer_selector("explicit")
def explicit(ctx: SelectionContext, n: int) -> LayerChoice:
    keep = ctx.options.keep_layers
    if not keep:
        raise UsageError("--layer-strategy explicit needs --keep-layers 0,3,5,...")
    return LayerChoice(sorted(keep))
