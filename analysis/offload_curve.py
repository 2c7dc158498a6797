"""Hit rate and decode tokens/s of offloaded experts against the device-tier budget, with and
without prefetch, next to the fully loaded model's tokens/s on the same text, in one run.

Every configuration processes the same tokens: a prompt (prefill), then the following
tokens of the text fed one at a time with the KV cache (teacher forcing), so the expert
accesses differ only through the cache. Host tier off: a device-tier miss reads the
checkpoint (page cache after the first read). Writes analysis/offload_curve.png,
analysis/offload_curve.md and analysis/results/offload_curve.json.

    python analysis/offload_curve.py --source /work/nano_k2/balanced
    python analysis/offload_curve.py            # nano model if present, else a fixture (said so)
"""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import click
import numba
import torch

from k2mini.analysis.tokenizer import load_tokenizer
from k2mini.checkpoint.reader import Checkpoint
from k2mini.offload import load_full, load_offloaded, lru_hit_curve, plateau_capacity
from k2mini.offload.generate import decode
from k2mini.textdata import prose_corpus

HERE = Path(__file__).resolve().parent
NANO = Path("/work/nano_k2/balanced")


def _fallback_fixture(out: Path) -> Path:
    """Random-weight stand-in shaped like the nano model (9 layers, 32 experts top-2)."""
    from k2mini.testing import build_fixture

    if not (out / "config.json").exists():
        build_fixture(out, "tiny", num_hidden_layers=9, n_routed_experts=32)
    return out


@click.command()
@click.option("--source", type=click.Path(file_okay=False, path_type=Path), default=None)
@click.option("--prompt-tokens", default=32, show_default=True)
@click.option("--tokens", default=96, show_default=True, help="Teacher-forced decode steps per configuration.")
@click.option("--fractions", default="0.03125,0.0625,0.125,0.25,0.5,1", show_default=True,
              help="Device budgets as fractions of all routed experts.")
@click.option("--reps", default=2, show_default=True, help="Runs per configuration; the fastest is kept (shared machine).")
@click.option("--dtype", type=click.Choice(["fp32", "bf16"]), default="fp32", show_default=True)
@click.option("--threads", default=1, show_default=True, help="torch and numba threads (1 is steadiest on a shared machine).")
def main(source, prompt_tokens, tokens, fractions, reps, dtype, threads):
    torch.set_num_threads(threads)
    numba.set_num_threads(threads)
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    if source is None:
        source = NANO if (NANO / "README.txt").exists() else _fallback_fixture(Path("/tmp/k2mini_offload_curve_fixture"))
    trained = (source / "README.txt").exists() and "nano K2" in (source / "README.txt").read_text()
    ck = Checkpoint.open(source)
    tok = load_tokenizer(ck)
    ids = tok.encode(prose_corpus()[-20000:])[: prompt_tokens + tokens]
    prompt, teacher = ids[:prompt_tokens], ids[prompt_tokens:]

    full_tps = []
    model = load_full(ck, dtype=torch_dtype)
    model.set_experts_implementation("eager")  # the loop our offloaded module runs; grouped_mm below
    for _ in range(reps):
        full_tps.append(decode(model, prompt, teacher=teacher).tokens_per_second)
    model.set_experts_implementation("grouped_mm")
    full_grouped = max(decode(model, prompt, teacher=teacher).tokens_per_second for _ in range(reps))
    del model

    rows, trace = [], None
    for frac in [float(f) for f in fractions.split(",")]:
        for prefetch in (False, True):
            best = None
            for _ in range(reps):
                om = load_offloaded(ck, budget=1, dtype=torch_dtype, prefetch=prefetch)
                one = om.expert_bytes // om.n_experts
                n_cache = max(1, round(frac * om.n_experts))
                om.cache.budget = n_cache * one
                t = time.perf_counter()
                res = decode(om.model, prompt, teacher=teacher)
                wall = time.perf_counter() - t
                om.cache.drain()
                st = om.cache.stats
                st.tokens = len(prompt) + len(res.step_seconds)
                s = st.summary(res.prefill_seconds + res.decode_seconds)
                row = {"fraction": frac, "cache_experts": n_cache, "budget_bytes": om.cache.budget, "prefetch": prefetch,
                       "device_hit_rate": s["hit_rate"]["device"], "prefetch_hits": st.prefetch_hits,
                       "prefetch_wasted": st.prefetch_wasted, "tokens_per_second": res.tokens_per_second,
                       "bytes_read_per_token": s["bytes_read_per_token"], "fetch_ms_per_token": s["fetch_ms_per_token"],
                       "compute_ms_per_token": s["compute_ms_per_token"], "wall_seconds": wall}
                if not prefetch:
                    trace = list(st.trace)
                om.close()
                if best is None or row["tokens_per_second"] > best["tokens_per_second"]:
                    best = row
            rows.append(best)
            print(json.dumps(best), flush=True)

    n_experts = rows[0]["cache_experts"] / rows[0]["fraction"]
    caps = sorted({r["cache_experts"] for r in rows})
    simulated = lru_hit_curve(trace, caps)
    plateau, best_rate = plateau_capacity(trace)
    result = {
        "source": str(source), "trained_nano_model": trained, "dtype": dtype, "threads": threads,
        "machine": platform.processor() or platform.machine(), "prompt_tokens": len(prompt), "decode_tokens": len(teacher),
        "routed_experts_total": round(n_experts), "expert_bytes": rows[0]["budget_bytes"] // rows[0]["cache_experts"],
        "full_model_tokens_per_second_eager": max(full_tps), "full_model_tokens_per_second_grouped_mm": full_grouped,
        "lru_simulated_hit_rate": simulated, "plateau_experts": plateau, "plateau_hit_rate": best_rate,
        "distinct_experts_used": len(set(trace)), "rows": rows,
    }
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / "offload_curve.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(result)
    _table(result)
    print(json.dumps({k: v for k, v in result.items() if k != "rows"}, indent=2))


def _plot(r: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for pf, style in ((False, "o-"), (True, "s--")):
        rows = [x for x in r["rows"] if x["prefetch"] == pf]
        label = "prefetch" if pf else "no prefetch"
        a.plot([x["cache_experts"] for x in rows], [x["device_hit_rate"] for x in rows], style, label=label)
        b.plot([x["cache_experts"] for x in rows], [x["tokens_per_second"] for x in rows], style, label=label)
    caps = sorted(int(k) for k in r["lru_simulated_hit_rate"])
    a.plot(caps, [r["lru_simulated_hit_rate"][k] for k in caps], ":", color="gray", label="LRU simulated on trace")
    a.axvline(r["plateau_experts"], color="gray", lw=0.8)
    b.axhline(r["full_model_tokens_per_second_eager"], color="k", lw=1, label="fully loaded (eager experts)")
    b.axhline(r["full_model_tokens_per_second_grouped_mm"], color="k", lw=1, ls="--", label="fully loaded (grouped_mm)")
    for ax, yl in ((a, "device-tier hit rate"), (b, "decode tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel(f"cache budget (experts of {r['routed_experts_total']}; 1 expert = {r['expert_bytes'] / 1024:.0f} KiB)")
        ax.set_ylabel(yl)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    what = "trained nano K2" if r["trained_nano_model"] else "random-weight FIXTURE (nano model not available)"
    fig.suptitle(f"Offloaded experts: {what}, {r['decode_tokens']} decode tokens, {r['dtype']}, CPU {r['threads']} threads")
    fig.tight_layout()
    fig.savefig(HERE / "offload_curve.png", dpi=110)


def _table(r: dict) -> None:
    what = ("the trained nano K2 model" if r["trained_nano_model"]
            else "a RANDOM-WEIGHT FIXTURE shaped like the nano model, because the trained nano model was not available")
    lines = [
        "# Offloaded experts: hit rate and tokens/s against cache budget", "",
        f"Source: `{r['source']}` ({what}). {r['prompt_tokens']} prompt tokens, then {r['decode_tokens']} tokens of the same "
        f"text fed one at a time (KV cache), compute dtype {r['dtype']}, CPU, {r['threads']} torch threads, shared 2-core machine "
        "(timings are the fastest of the repetitions). Host tier off: misses read the checkpoint from the page cache.", "",
        f"Fully loaded model on the same text: **{r['full_model_tokens_per_second_eager']:.1f} tok/s** with transformers' eager "
        f"expert loop (the loop the offloaded module runs), {r['full_model_tokens_per_second_grouped_mm']:.1f} tok/s with grouped_mm.", "",
        f"LRU hit rate plateaus (within 1 point of its best, {r['plateau_hit_rate']:.1%}) at **{r['plateau_experts']} experts** "
        f"of {r['routed_experts_total']} ({r['distinct_experts_used']} distinct experts used by this text).", "",
        "| budget (experts) | fraction | prefetch | device hit rate | LRU simulated | prefetch hits | tok/s | "
        "KiB read/token | fetch ms/token | compute ms/token |",
        "|---:|---:|:---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for x in r["rows"]:
        sim = r["lru_simulated_hit_rate"][x["cache_experts"]] if x["cache_experts"] in r["lru_simulated_hit_rate"] \
            else r["lru_simulated_hit_rate"][str(x["cache_experts"])]
        lines.append(f"| {x['cache_experts']} | {x['fraction']:g} | {'yes' if x['prefetch'] else 'no'} | {x['device_hit_rate']:.1%} | "
                     f"{sim:.1%} | {x['prefetch_hits']} | {x['tokens_per_second']:.1f} | {x['bytes_read_per_token'] / 1024:.0f} | "
                     f"{x['fetch_ms_per_token']:.2f} | {x['compute_ms_per_token']:.2f} |")
    lines += ["", "Reproduce: `python analysis/offload_curve.py" + (f" --source {r['source']}`" if r["trained_nano_model"] else "`"),
              "Figure: offload_curve.png; raw numbers: results/offload_curve.json.", ""]
    (HERE / "offload_curve.md").write_text("\n".join(lines))


if __name__ == "__main__":
    main()
