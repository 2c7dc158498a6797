"""The frontier as text and as a PNG: bytes of weights vs score, the pick marked."""

from __future__ import annotations

from pathlib import Path

from k2mini.planner.run import PlanReport


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f}" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def table(r: PlanReport, *, rows: int = 24) -> list[str]:
    """The frontier cuts (and the pick), one line each, smallest first."""
    unit = "GB" if r.picked().weights_bytes >= 1e8 else ""
    head = f"{'layers':>6} {'experts':>7} {'dtype':>8} {'weights ' + unit:>12}"
    if not r.weights_only:
        head += f" {'needed ' + unit:>12}"
    head += f" {'proxy':>9} {'KL':>9}"
    lines = [head]
    shown = list(dict.fromkeys(r.frontier + [r.pick]))
    shown.sort(key=lambda i: r.candidates[i].weights_bytes)
    if len(shown) > rows:  # keep the pick and the largest frontier cuts around it
        shown = sorted(sorted(shown, key=lambda i: i != r.pick)[:rows], key=lambda i: r.candidates[i].weights_bytes)
    for i in shown:
        c = r.candidates[i]
        line = f"{c.layers:>6} {c.experts:>7} {c.dtype:>8} {_gb(c.weights_bytes):>12}"
        if not r.weights_only:
            line += f" {_gb(c.needed_bytes):>12}"
        line += f" {c.proxy:>9.4g}" + (f" {c.kl:>9.4g}" if c.kl is not None else f" {'-':>9}")
        lines.append(line + ("   <- pick" if i == r.pick else ""))
    return lines


def plot(r: PlanReport, path: str | Path) -> bool:
    """Every candidate (colour = dtype), the frontier line and the pick; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    measured = r.scored_by == "teacher"
    key = "kl" if measured else "proxy"
    scale, unit = (1e9, "GB") if max(c.weights_bytes for c in r.candidates) >= 1e8 else (1e6, "MB")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for d in r.dtypes:
        pts = [(c.weights_bytes / scale, getattr(c, key)) for c in r.candidates if c.dtype == d and getattr(c, key) is not None]
        if pts:
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], s=14, label=d, alpha=0.7)
    fr = [r.candidates[i] for i in r.frontier]
    ax.plot([c.weights_bytes / scale for c in fr], [getattr(c, key) for c in fr], "k-", lw=1, label="frontier")
    p = r.picked()
    ax.scatter([p.weights_bytes / scale], [getattr(p, key)], marker="*", s=180, c="red", zorder=5,
               label=f"pick: {p.layers}L x {p.experts}E {p.dtype}")
    ax.set_xlabel(f"weights ({unit})")
    ax.set_ylabel("held-out KL to the teacher" if measured else f"proxy score ({r.scored_by})")
    ax.set_title(f"k2mini plan: {r.target}\nthe largest cut per layer count and dtype", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
