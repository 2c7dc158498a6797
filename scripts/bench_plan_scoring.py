"""What measuring one cut costs: on paper at Kimi-K2's scale, measured on the real-dims fixture.

On paper (from the config): the source bytes a measured cut reads are its kept tensors as the
FP8 source stores them (only kept experts, and only those a token routes to, which on a
held-out set of thousands of tokens is all of them), plus the lm_head once per block of
``--head-sequences`` (it is streamed in row blocks); the compute is 2 x active parameters x
tokens. Measured: ``k2mini plan --teacher`` on the real-dims fixture (K2's tensor shapes,
few layers and experts), seconds and source bytes read per measured cut, against the same
on-paper formula for that fixture's cuts.

  python scripts/bench_plan_scoring.py --fixture /tmp/k2mini-rd --tokens 64
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import click

REFERENCE = Path(__file__).resolve().parents[1] / "configs" / "reference" / "kimi_k2_config.json"


def cut_read_bytes(cfg: dict, layers: int, experts: int) -> int:
    """Source bytes of a cut's kept tensors (FP8 weights + scale grids, BF16 rest), as stored."""
    from k2mini.model.spec import ModelSpec
    from k2mini.planner.space import cut_config

    dense = min(int(cfg.get("first_k_dense_replace") or 0), layers)
    c = cut_config(cfg, dense, layers - dense, experts)
    if cfg.get("quantization_config"):
        c["quantization_config"] = cfg["quantization_config"]
    return sum(ModelSpec.from_config(c).bytes_by_dtype().values())


def active_params(cfg: dict, layers: int) -> int:
    """Parameters one token multiplies through (attention, dense/shared MLP, top-k experts, head)."""
    from k2mini.model.spec import ModelSpec
    from k2mini.planner.space import cut_config

    k = int(cfg["num_experts_per_tok"])
    dense = min(int(cfg.get("first_k_dense_replace") or 0), layers)
    spec = ModelSpec.from_config(cut_config({x: v for x, v in cfg.items() if x != "quantization_config"}, dense, layers - dense, k))
    return spec.param_count() - int(cfg["vocab_size"]) * int(cfg["hidden_size"])  # the embedding is a lookup


@click.command()
@click.option("--fixture", type=click.Path(path_type=Path), default=Path("/tmp/k2mini-rd"), show_default=True,
              help="Real-dims fixture (built here if missing: about 2.4 GB).")
@click.option("--tokens", default=64, show_default=True, help="Held-out tokens per measured cut on the fixture.")
@click.option("--k2-tokens", default=65536, show_default=True, help="Held-out tokens per cut, on paper at K2 scale.")
@click.option("--json", "as_json", is_flag=True)
def main(fixture: Path, tokens: int, k2_tokens: int, as_json: bool) -> None:
    out: dict = {"load_average": os.getloadavg()}
    k2 = json.loads(REFERENCE.read_text())
    # K2 cuts: the mission's, what plan picks from the config for an RTX 4090 / H100 / H200 at 32k
    # context, and the whole model.
    paper = []
    cuts = {"mission 24x16": (24, 16), "61x8 (rtx4090)": (61, 8), "61x51 (h100)": (61, 51), "61x99 (h200)": (61, 99), "61x384": (61, 384)}
    for name, (layers, experts) in cuts.items():
        read = cut_read_bytes(k2, layers, experts)
        paper.append({"cut": name, "bytes_read": read, "tokens": k2_tokens,
                      "flops": 2 * active_params(k2, layers) * k2_tokens})
    out["k2_on_paper"] = paper

    if not fixture.exists():
        subprocess.run([sys.executable, "-m", "k2mini.cli", "fixture", str(fixture), "--preset", "real-dims"], check=True,
                       capture_output=True)
    teacher = fixture.with_name(fixture.name + ".teacher")
    seq = 32
    n_seq = max(10, 10 * tokens // seq)  # heal's 10% held out = ``tokens``
    if not teacher.exists():
        subprocess.run([sys.executable, "-m", "k2mini.cli", "teacher", "-s", str(fixture), "-o", str(teacher), "--samples", str(n_seq),
                        "--seq-len", str(seq), "--top-k", "16", "-q"], check=True, capture_output=True)
    cfg = json.loads((fixture / "config.json").read_text())
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "k2mini.cli", "plan", "-s", str(fixture), "--budget", "3GB", "--dtypes", "bf16,int4",
                        "--teacher", str(teacher), "--measure", "3", "--json", "--quiet"], check=True, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    rep = json.loads(p.stdout)
    measured = []
    for c in rep["candidates"]:
        if c["kl"] is None:
            continue
        predicted = cut_read_bytes(cfg, c["layers"], c["experts"])
        measured.append({"cut": f"{c['layers']}L x {c['experts']}E {c['dtype']}", "seconds": c["seconds"], "bytes_read": c["bytes_read"],
                         "predicted_bytes": predicted, "ratio": c["bytes_read"] / predicted, "positions": rep["eval_positions"]})
    out["fixture"] = {"path": str(fixture), "plan_wall_s": round(wall, 1), "measured": measured}
    if as_json:
        click.echo(json.dumps(out, indent=1))
        return
    click.echo(f"load average {out['load_average']}")
    for r in paper:
        click.echo(f"K2 {r['cut']}: reads {r['bytes_read'] / 1e9:.1f} GB of the FP8 source per measured cut, "
                   f"{r['tokens']:,} held-out tokens, {r['flops'] / 1e12:.0f} TFLOP")
    for r in measured:
        click.echo(f"fixture {r['cut']}: {r['seconds']:.1f} s, read {r['bytes_read'] / 1e9:.3f} GB vs {r['predicted_bytes'] / 1e9:.3f} GB "
                   f"predicted ({r['ratio']:.3f}x), {r['positions']} positions")
    click.echo(f"plan wall time {wall:.1f} s (3 cuts measured)")


if __name__ == "__main__":
    main()
