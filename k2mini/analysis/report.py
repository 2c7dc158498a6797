"""Readable summary and PNG plots of an Analysis."""

from __future__ import annotations

import statistics
from pathlib import Path

from k2mini.analysis.schema import Analysis

# An expert whose peak output exceeds this multiple of its layer's median peak is flagged:
# such "super experts" carry outlier activations and must not be pruned silently.
SUPER_EXPERT_FACTOR = 5.0


def super_experts(a: Analysis, factor: float = SUPER_EXPERT_FACTOR) -> list[tuple[int, int, float]]:
    """(layer, expert, max activation / layer median) for outlier experts."""
    out = []
    for st in a.layers:
        if st.experts is None:
            continue
        peaks = [m for m, f in zip(st.experts.max_activation, st.experts.frequency) if f > 0]
        if not peaks:
            continue
        med = statistics.median(peaks)
        for e, m in enumerate(st.experts.max_activation):
            if med > 0 and m > factor * med:
                out.append((st.layer, e, m / med))
    return out


def render_summary(a: Analysis) -> str:
    c = a.calibration
    lines = [
        f"source: {a.source.location} ({a.source.num_hidden_layers} layers, {a.source.n_routed_experts} routed experts)",
        f"calibration: {c.samples} samples x {c.seq_len} tokens = {c.tokens} tokens, seed {c.seed}, from "
        + ", ".join(f"{s.name} ({s.samples})" for s in c.sources),
    ]
    if a.baseline_nll is not None:
        lines.append(f"baseline NLL: {a.baseline_nll:.4f}")
    lines.append("")
    head = f"{'layer':>5} {'kind':>5} {'block_infl':>10} {'hidden_norm':>11}"
    if a.baseline_nll is not None:
        head += f" {'nll_skip+':>9}"
    head += f" {'experts_used':>12} {'top_reap':>8}"
    lines.append(head)
    for st in a.layers:
        row = f"{st.layer:>5} {st.kind:>5} {st.block_influence:>10.4f} {st.hidden_norm:>11.3f}"
        if a.baseline_nll is not None:
            row += f" {st.nll_increase:>9.4f}" if st.nll_increase is not None else f" {'-':>9}"
        if st.experts is not None:
            used = sum(1 for f in st.experts.frequency if f > 0)
            top = max(range(len(st.experts.reap)), key=st.experts.reap.__getitem__)
            row += f" {used:>5}/{len(st.experts.frequency):<6} {top:>8}"
        lines.append(row)
    if a.angular_distance:
        lines.append("")
        lines.append("cheapest block of n consecutive layers to drop (angular distance, lower = more redundant):")
        for n, row in sorted(a.angular_distance.items(), key=lambda kv: int(kv[0])):
            best = min(range(len(row)), key=row.__getitem__)
            lines.append(f"  n={n}: layers {best}..{best + int(n) - 1}  d={row[best]:.4f}")
    sup = super_experts(a)
    if sup:
        lines.append("")
        lines.append("super experts (peak activation >> layer median; keep them): "
                     + ", ".join(f"L{l}/E{e} ({r:.1f}x)" for l, e, r in sup[:20]))
    return "\n".join(lines)


def save_plots(a: Analysis, prefix: str | Path) -> list[Path]:
    """``<prefix>.layers.png`` (per-layer importance) and ``<prefix>.experts.png`` (expert
    usage heatmap, layers x experts, share of the layer's routed tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefix = Path(prefix)
    written = []
    xs = [st.layer for st in a.layers]
    panels = 2 + (a.baseline_nll is not None)
    fig, axes = plt.subplots(panels, 1, figsize=(max(6, 0.25 * len(xs) + 3), 2.4 * panels), sharex=True)
    axes[0].bar(xs, [st.block_influence for st in a.layers], color="tab:blue")
    axes[0].set_ylabel("block influence")
    if "1" in a.angular_distance:
        d1 = a.angular_distance["1"]
        axes[1].plot(range(len(d1)), d1, marker="o", color="tab:orange")
    axes[1].set_ylabel("angular dist. (n=1)")
    if a.baseline_nll is not None:
        axes[2].bar(xs, [st.nll_increase or 0.0 for st in a.layers], color="tab:red")
        axes[2].set_ylabel("NLL increase if skipped")
    axes[-1].set_xlabel("layer")
    fig.suptitle("Layer importance (low = removable)")
    fig.tight_layout()
    p = prefix.with_name(prefix.name + ".layers.png")
    fig.savefig(p, dpi=100)
    plt.close(fig)
    written.append(p)

    moe = [st for st in a.layers if st.experts is not None]
    if moe:
        import numpy as np

        grid = np.array([np.array(st.experts.frequency, dtype=float) / max(1, sum(st.experts.frequency)) for st in moe])
        fig, ax = plt.subplots(figsize=(min(16, 2 + 0.08 * grid.shape[1] + 4), max(3, 0.25 * len(moe) + 2)))
        im = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis")
        ax.set_yticks(range(len(moe)))
        ax.set_yticklabels([str(st.layer) for st in moe])
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_title("Expert usage (share of the layer's routed tokens)")
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        p = prefix.with_name(prefix.name + ".experts.png")
        fig.savefig(p, dpi=100)
        plt.close(fig)
        written.append(p)
    return written
