"""Peak RSS of `k2mini run --offload` on a real-dims checkpoint against what it may use:
budget + resident non-expert weights + stated overhead.

Overhead, stated: the process RSS before any weight is loaded (interpreter, torch,
transformers, tokenizer), plus the experts being materialised outside the budget: one on the
forward thread and one on the prefetch thread, each its FP8 bytes + the BF16 parts + the
concatenated gate_up copy (about 4.7 bytes per parameter), plus 64 MiB for activations, KV
cache and allocator slack. Each run is a fresh process so ru_maxrss is its own peak.

    k2mini fixture /tmp/k2_realdims16 --preset real-dims --experts 16
    python analysis/offload_memory.py /tmp/k2_realdims16 --budget-experts 4
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import click

from k2mini.checkpoint.reader import Checkpoint
from k2mini.checkpoint.names import expert_weights

HERE = Path(__file__).resolve().parent
SLACK = 64 << 20


def _run(src: Path, args: list[str]) -> dict:
    cmd = [sys.executable, "-m", "k2mini.cli", "run", str(src), "--prompt", "The quick brown fox", "--max-new-tokens", "4",
           "--json", "-q", "--no-plateau", *args]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


@click.command()
@click.argument("src", type=click.Path(file_okay=False, path_type=Path))
@click.option("--budget-experts", default=4, show_default=True, help="Device budget in experts (BF16).")
@click.option("--full/--no-full", default=True, show_default=True, help="Also measure the fully loaded model.")
def main(src: Path, budget_experts: int, full: bool) -> None:
    ck = Checkpoint.open(src)
    moe0 = int(ck.config.get("first_k_dense_replace", 0))
    names = expert_weights(moe0, 0)
    params = sum(ck.info(n).numel for n in names)
    fp8_bytes = sum(ck.info(n).nbytes + ck.scale_of(n).nbytes for n in names)
    one = 2 * params
    budget = budget_experts * one
    transient = 2 * (fp8_bytes + one + (2 * one) // 3)
    results = {}
    for label, args in (("offload", ["--offload", "--budget", str(budget), "--prefetch"]),
                        ("offload_prefetch_off", ["--offload", "--budget", str(budget), "--no-prefetch"])):
        r = _run(src, args)
        m = r["memory"]
        limit = m["budget"] + m["resident_weight_bytes"] + m["rss_before_load"] + transient + SLACK
        results[label] = {"peak_rss": m["peak_rss"], "budget": m["budget"], "resident_weight_bytes": m["resident_weight_bytes"],
                          "rss_before_load": m["rss_before_load"], "transient_allowance": transient, "slack": SLACK,
                          "limit": limit, "under_limit": m["peak_rss"] <= limit, "peak_device_tier_bytes": m["peak_device_tier_bytes"],
                          "all_experts_bytes": m["all_experts_bytes"], "disk_reads": r["offload_stats"]["disk_reads"],
                          "tokens_per_second": r["decode_tokens_per_second"]}
        print(json.dumps({label: results[label]}, indent=2), flush=True)
    if full:
        r = _run(src, [])
        results["full"] = {"peak_rss": r["memory"]["peak_rss"], "rss_before_load": r["memory"]["rss_before_load"],
                           "tokens_per_second": r["decode_tokens_per_second"]}
        print(json.dumps({"full": results["full"]}, indent=2), flush=True)
    results["source"] = str(src)
    results["expert_bf16_bytes"] = one
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "offload_memory.json").write_text(json.dumps(results, indent=2) + "\n")
    g = 2**30
    for label in ("offload", "offload_prefetch_off"):
        x = results[label]
        print(f"{label}: peak RSS {x['peak_rss'] / g:.2f} GiB <= budget {x['budget'] / g:.2f} + resident {x['resident_weight_bytes'] / g:.2f}"
              f" + before-load {x['rss_before_load'] / g:.2f} + transient {x['transient_allowance'] / g:.2f} + slack {SLACK / g:.2f}"
              f" = {x['limit'] / g:.2f} GiB: {'OK' if x['under_limit'] else 'OVER'}")
    if full:
        print(f"full load: peak RSS {results['full']['peak_rss'] / g:.2f} GiB")
    if not all(results[k]["under_limit"] for k in ("offload", "offload_prefetch_off")):
        sys.exit(1)


if __name__ == "__main__":
    main()
