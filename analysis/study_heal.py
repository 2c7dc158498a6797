"""Healing study on the trained nano K2 models: how much of the KL a cut costs comes back
after `k2mini heal`, per method, cut and domain.

For each model: the healing corpus is the TRAIN split of the built-in prose and code text
(the documents the nano model was trained on, every 10th held out), the evaluation text
is the TEST split (the held-out documents), so the two share no document. The pipeline is
the product's own:
  1. k2mini analyze on the train split (--nll), then k2mini convert --analysis at three
     cuts, selected as convert's defaults do (experts by output-error, layers by
     skip-layer NLL): 2 of 32 experts (K2's 16 of 384 analogue), 8 of 32, 4 of 9 layers;
  2. k2mini teacher on the train split;
  3. heal/recipe.train (what `k2mini heal` runs) for each method and seed, in process, so
     the test-split KL can be measured along the way (the curve).
Evaluation: KL(unpruned || model) per token and perplexity on fixed test windows of each
domain, before healing and after each method; seeds change the data order and LoRA's
initialisation.

  python analysis/study_heal.py --models muon=/work/nano_k2/muon_balanced,adamw=/work/nano_k2/adamw_balanced
  python analysis/study_heal.py --models muon=/work/nano_k2/muon_balanced --cuts e2 --seeds 1 --steps 40   # a probe
Needs the checkpoints from scripts/train_nano_k2.py (--optimizer muon|adamw, balanced).
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import torch

from k2mini.nano import data
from k2mini.nano import study as S
from k2mini.textdata import code_corpus, prose_corpus, split_documents

RESULTS = Path(__file__).resolve().parent / "results"
CUTS = {"e2": ("2 of 32 experts", ["--layers", "9", "--experts", "2"]),
        "e8": ("8 of 32 experts", ["--layers", "9", "--experts", "8"]),
        "l4": ("4 of 9 layers", ["--layers", "4", "--experts", "32"])}
METHODS = ["router", "lora", "full"]


def k2mini(*args: str) -> None:
    p = subprocess.run([sys.executable, "-m", "k2mini.cli", *args], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"k2mini {' '.join(args)} failed:\n{p.stderr[-2000:]}")


def write_train_text(work: Path) -> list[str]:
    """The train split as text files (the same documents nano/data.py trains on)."""
    specs = []
    for name, corpus in (("prose", prose_corpus), ("code", code_corpus)):
        docs = split_documents(corpus())
        path = work / f"train_{name}.txt"
        path.write_text("\n\n".join(d for i, d in enumerate(docs) if i % 10 != 9))
        specs += ["--calib", f"{name}={path}"]
    return specs


def evaluate(model, evals, refs) -> dict[str, dict[str, float]]:
    return {d: S.compare(model, ids, refs[d]) for d, ids in evals.items()}


def run_model(name: str, path: Path, work: Path, cuts: list[str], steps: int, seeds: int, batch: int, lrs: dict, teacher_samples: int,
              eval_windows: int, seq_len: int) -> list[dict]:
    from accelerate import Accelerator

    from k2mini.checkpoint.reader import Checkpoint
    from k2mini.heal import methods as M
    from k2mini.heal.recipe import HealOptions, train
    from k2mini.model.hf import load_checkpoint_model
    from k2mini.teacher.cache import TeacherCache

    work.mkdir(parents=True, exist_ok=True)
    calib = write_train_text(work)
    analysis, teacher = work / "analysis.json", work / "teacher"
    if not analysis.exists():
        k2mini("analyze", "-s", str(path), "-o", str(analysis), *calib, "--samples", "32", "--seq-len", str(seq_len), "--nll", "--no-plots", "-q")
    if not teacher.exists():
        k2mini("teacher", "-s", str(path), "-o", str(teacher), *calib, "--samples", str(teacher_samples), "--seq-len", str(seq_len),
               "--top-k", "64", "--seed", "1", "-q")
    cache = TeacherCache(teacher)
    source, cfg = S.load_nano(path)
    dd = data.load(cfg["vocab_size"])
    evals = {d: data.windows(dd.test[d], seq_len, eval_windows) for d in ("prose", "code")}
    refs = {d: S.reference(source, ids) for d, ids in evals.items()}
    rows = [{"model": name, "cut": "none", "method": "unpruned", "seed": 0, "tokens": 0, "domain": d, **m}
            for d, m in evaluate(source, evals, refs).items()]
    acc = Accelerator(cpu=True)
    curve_at = sorted({max(1, steps // 8), max(1, steps // 4), max(1, steps // 2), steps})
    for cut in cuts:
        reduced = work / f"cut-{cut}"
        if not reduced.exists():
            k2mini("convert", "-s", str(path), "--analysis", str(analysis), *CUTS[cut][1], "-o", str(reduced))
        before = evaluate(load_checkpoint_model(Checkpoint.open(str(reduced))), evals, refs)
        rows += [{"model": name, "cut": cut, "method": "none", "seed": 0, "tokens": 0, "domain": d, **m} for d, m in before.items()]
        for method in METHODS:
            for seed in range(seeds):
                t0 = time.perf_counter()
                model = load_checkpoint_model(Checkpoint.open(str(reduced)))
                opts = HealOptions(method=method, steps=steps, batch_size=batch, lr=lrs[method], seed=seed, eval_fraction=0.0,
                                   save_every=steps, progress=False)
                curve = []

                def on_step(entry, model=model, curve=curve, seed=seed):
                    if seed == 0 and entry.step in curve_at and entry.step != steps:
                        curve.append((entry.tokens, evaluate(model, evals, refs)))

                with tempfile.TemporaryDirectory() as tmp:
                    trained, res = train(model, cache, opts, work=Path(tmp), accelerator=acc, on_step=on_step)
                after = evaluate(M.base_model(trained), evals, refs)
                curve.append((res.tokens_seen, after))
                acc.free_memory()
                for d, m in after.items():
                    rows.append({"model": name, "cut": cut, "method": method, "seed": seed, "tokens": res.tokens_seen, "domain": d,
                                 "lr": opts.learning_rate, "seconds": round(time.perf_counter() - t0, 1), **m})
                if seed == 0:
                    for tokens, ev in curve:
                        for d, m in ev.items():
                            rows.append({"model": name, "cut": cut, "method": method, "seed": 0, "tokens": tokens, "domain": d,
                                         "curve": True, **m})
                kl = {d: round(m["kl"], 4) for d, m in after.items()}
                print(f"{name} {cut} {method} seed {seed}: KL {kl} (before {({d: round(m['kl'], 4) for d, m in before.items()})}) "
                      f"{time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def summarise(rows: list[dict], default: str) -> tuple[str, list[dict]]:
    """The markdown table: mean and spread over seeds, and the share of KL removed."""
    final = [r for r in rows if not r.get("curve")]
    keyed: dict[tuple, list[dict]] = {}
    for r in final:
        keyed.setdefault((r["model"], r["cut"], r["method"], r["domain"]), []).append(r)
    out, table = [], []
    for (model, cut, method, domain), rs in sorted(keyed.items(), key=lambda kv: (kv[0][0], kv[0][1], ["unpruned", "none", *METHODS].index(kv[0][2]), kv[0][3])):
        kls, ppls = [r["kl"] for r in rs], [r["ppl"] for r in rs]
        before = keyed.get((model, cut, "none", domain))
        removed = 1 - statistics.mean(kls) / before[0]["kl"] if before and method in METHODS and before[0]["kl"] > 0 else None
        s = {"model": model, "cut": cut, "method": method, "domain": domain, "seeds": len(rs), "tokens": rs[0]["tokens"],
             "kl_mean": statistics.mean(kls), "kl_min": min(kls), "kl_max": max(kls), "ppl_mean": statistics.mean(ppls),
             "ppl_min": min(ppls), "ppl_max": max(ppls), "kl_removed": removed}
        out.append(s)
        cut_name = CUTS[cut][0] if cut in CUTS else "unpruned"
        spread = f" ({s['kl_min']:.4f}-{s['kl_max']:.4f})" if len(rs) > 1 else ""
        pspread = f" ({s['ppl_min']:.1f}-{s['ppl_max']:.1f})" if len(rs) > 1 else ""
        rem = f"{100 * removed:.0f}%" if removed is not None else "-"
        table.append(f"| {model} | {cut_name} | {method}{' (default)' if method == default else ''} | {domain} | {s['tokens']:,} | "
                     f"{s['kl_mean']:.4f}{spread} | {s['ppl_mean']:.1f}{pspread} | {rem} |")
    head = ["| model | cut | method | domain | teacher tokens | KL to unpruned (mean, min-max over seeds) | perplexity | KL removed |",
            "|---|---|---|---|---|---|---|---|"]
    return "\n".join(head + table), out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    cuts = [c for c in CUTS if any(r["cut"] == c for r in rows)]
    fig, axes = plt.subplots(len(models), len(cuts), figsize=(4.2 * len(cuts), 3.3 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, cut in enumerate(cuts):
            ax = axes[i][j]
            for domain, style in (("prose", "-"), ("code", "--")):
                before = [r for r in rows if (r["model"], r["cut"], r["method"], r["domain"]) == (model, cut, "none", domain)]
                for method, color in zip(METHODS, ("tab:blue", "tab:orange", "tab:green")):
                    pts = sorted((r["tokens"], r["kl"]) for r in rows
                                 if r.get("curve") and (r["model"], r["cut"], r["method"], r["domain"]) == (model, cut, method, domain))
                    if pts and before:
                        pts = [(0, before[0]["kl"])] + pts
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, label=f"{method} {domain}")
            ax.set_title(f"{model}: {CUTS[cut][0]}")
            ax.set_xlabel("teacher tokens seen")
            ax.set_ylabel("held-out KL to unpruned")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@click.command()
@click.option("--models", default=None, help="NAME=DIR[,NAME=DIR...] of trained nano K2 checkpoints.")
@click.option("--combine", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Instead of running: merge the rows of earlier result JSONs (one model each, run in parallel) into OUT.")
@click.option("--cuts", default="e2,e8,l4", show_default=True, help="Which cuts: e2 (2 of 32 experts), e8, l4 (4 of 9 layers).")
@click.option("--steps", default=100, show_default=True, help="Heal steps per run.")
@click.option("--batch-size", default=16, show_default=True, help="Sequences per step.")
@click.option("--seeds", default=3, show_default=True)
@click.option("--lr-router", default=None, type=float, help="[default: heal's default for the method]")
@click.option("--lr-lora", default=None, type=float)
@click.option("--lr-full", default=None, type=float)
@click.option("--teacher-samples", default=1024, show_default=True, help="Teacher sequences (the healing corpus).")
@click.option("--eval-windows", default=64, show_default=True, help="Test windows per domain.")
@click.option("--seq-len", default=64, show_default=True)
@click.option("--work", default="/tmp/k2mini-heal-study", show_default=True, type=click.Path(path_type=Path),
              help="Analyses, cuts and teacher caches (reused when present).")
@click.option("--out", "out_name", default="study_heal", show_default=True, help="Result file stem under analysis/results/.")
def main(models, combine, cuts, steps, batch_size, seeds, lr_router, lr_lora, lr_full, teacher_samples, eval_windows, seq_len, work,
         out_name):
    """Run the healing study and write analysis/results/OUT.{json,md,png}."""
    from k2mini.heal.recipe import DEFAULT_LR

    torch.manual_seed(0)
    lrs = {"router": lr_router or DEFAULT_LR["router"], "lora": lr_lora or DEFAULT_LR["lora"], "full": lr_full or DEFAULT_LR["full"]}
    rows = []
    t0 = time.perf_counter()
    if combine:
        parts = [json.loads(p.read_text()) for p in combine]
        rows = [r for part in parts for r in part["rows"]]
        lrs, steps, batch_size, seq_len = parts[0]["lrs"], parts[0]["steps"], parts[0]["batch_size"], parts[0]["seq_len"]
        teacher_samples = parts[0]["teacher_tokens"] // seq_len
        eval_windows = parts[0]["eval_tokens_per_domain"] // seq_len
        t0 -= sum(part["seconds"] for part in parts)  # the runs' own time, not the merge's
    elif not models:
        raise click.UsageError("give --models or --combine")
    for spec in models.split(",") if not combine else []:
        name, _, path = spec.partition("=")
        rows += run_model(name, Path(path), work / name, cuts.split(","), steps, seeds, batch_size, lrs, teacher_samples,
                          eval_windows, seq_len)
    default = "lora"
    table, summary = summarise(rows, default)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{out_name}.json").write_text(json.dumps({"rows": rows, "summary": summary, "lrs": lrs, "steps": steps,
                                                          "batch_size": batch_size, "seq_len": seq_len,
                                                          "teacher_tokens": teacher_samples * seq_len,
                                                          "eval_tokens_per_domain": eval_windows * seq_len,
                                                          "seconds": round(time.perf_counter() - t0)}, indent=1))
    (RESULTS / f"{out_name}.md").write_text(table + "\n")
    plot(rows, RESULTS / f"{out_name}.png")
    print(table)


if __name__ == "__main__":
    main()
