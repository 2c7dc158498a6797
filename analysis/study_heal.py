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
  3. heal/recipe.train (what `k2mini heal` runs) for each setting (method, epochs over the
     cache's training share, learning rate) and seed, in process, so the test-split KL can be
     measured along the way (the curve). ``default`` in a setting is heal's own default, so a
     row ``lora:default:default`` is exactly what `k2mini heal` does without flags (it also
     holds out heal's default eval share of the cache).
Evaluation: KL(unpruned || model) per token and perplexity on fixed test windows of each
domain, before healing and after each method; seeds change the data order and LoRA's
initialisation.

  python analysis/study_heal.py --models muon=/work/nano_k2/muon_balanced,adamw=/work/nano_k2/adamw_balanced
  python analysis/study_heal.py --models muon=/work/nano_k2/muon_balanced --cuts e2 --seeds 1 --settings lora:1:3e-3   # a probe
  # the defaults sweep (one piece per model and cut, then combined):
  python analysis/study_heal.py --models m=DIR --cuts e8 --seeds 1 --no-curve --settings lora:default:default,lora:1:3e-3 --out sweep_m_e8
  python analysis/study_heal.py --combine analysis/results/sweep_*_*.json --out heal_defaults_sweep
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
# Expert cuts keep a count, not a share: on the 64-expert nano model "8 experts" is 8 of 64.
CUTS = {"e2": ("2 experts kept", ["--layers", "9", "--experts", "2"]),
        "e8": ("8 experts kept", ["--layers", "9", "--experts", "8"]),
        "l4": ("4 of 9 layers, 32 experts kept", ["--layers", "4", "--experts", "32"])}
METHODS = ["router", "lora", "full"]
DEFAULT_SETTINGS = "router:default:default,lora:default:default,full:default:default"


def parse_settings(text: str) -> list[tuple[str, float | None, float | None]]:
    """``METHOD:EPOCHS:LR,...`` -> [(method, epochs or None = heal's default, lr or None = heal's default)]."""
    out = []
    for item in text.split(","):
        method, epochs, lr = item.split(":")
        if method not in METHODS:
            raise click.BadParameter(f"{item}: method must be one of {METHODS}")
        out.append((method, None if epochs == "default" else float(epochs), None if lr == "default" else float(lr)))
    return out


def setting_name(method: str, epochs: float | None, lr: float | None) -> str:
    return f"{method} {'default' if epochs is None else f'{epochs:g} ep'} lr {'default' if lr is None else f'{lr:g}'}"


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


def run_model(name: str, path: Path, work: Path, cuts: list[str], settings: list, seeds: int, batch: int, teacher_samples: int,
              eval_windows: int, seq_len: int, curves: bool) -> list[dict]:
    from accelerate import Accelerator

    from k2mini.checkpoint.reader import Checkpoint
    from k2mini.heal import methods as M
    from k2mini.heal.recipe import DEFAULT_EVAL_FRACTION, HealOptions, default_steps, split, train
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
    rows = [{"model": name, "cut": "none", "method": "unpruned", "setting": "unpruned", "seed": 0, "tokens": 0, "domain": d, **m}
            for d, m in evaluate(source, evals, refs).items()]
    acc = Accelerator(cpu=True)
    for cut in cuts:
        reduced = work / f"cut-{cut}"
        if not reduced.exists():
            k2mini("convert", "-s", str(path), "--analysis", str(analysis), *CUTS[cut][1], "-o", str(reduced))
        before = evaluate(load_checkpoint_model(Checkpoint.open(str(reduced))), evals, refs)
        rows += [{"model": name, "cut": cut, "method": "none", "setting": "none", "seed": 0, "tokens": 0, "domain": d, **m}
                 for d, m in before.items()]
        for method, epochs, lr in settings:
            label = setting_name(method, epochs, lr)
            for seed in range(seeds):
                t0 = time.perf_counter()
                model = load_checkpoint_model(Checkpoint.open(str(reduced)))
                # heal's defaults: the held-out share and the amount of training it derives from the cache
                train_n = len(split(cache.sequences, DEFAULT_EVAL_FRACTION, seed)[0])
                n_steps = default_steps(train_n, batch) if epochs is None else default_steps(train_n, batch, epochs)
                opts = HealOptions(method=method, steps=n_steps, batch_size=batch, lr=lr, seed=seed,
                                   eval_fraction=DEFAULT_EVAL_FRACTION, eval_every=n_steps, save_every=n_steps, progress=False)
                curve_at = sorted({max(1, n_steps // 8), max(1, n_steps // 4), max(1, n_steps // 2)}) if curves else []
                curve = []

                def on_step(entry, model=model, curve=curve, seed=seed, curve_at=curve_at):
                    if seed == 0 and entry.step in curve_at:
                        curve.append((entry.tokens, evaluate(model, evals, refs)))

                with tempfile.TemporaryDirectory() as tmp:
                    student, res = train(model, cache, opts, work=Path(tmp), accelerator=acc, on_step=on_step)
                after = evaluate(M.base_model(student.trained), evals, refs)
                curve.append((res.tokens_seen, after))
                acc.free_memory()
                common = {"model": name, "cut": cut, "method": method, "setting": label, "seed": seed, "steps": n_steps,
                          "batch_size": batch, "epochs": round(n_steps * batch / train_n, 3), "train_sequences": train_n,
                          "cache_tokens": cache.manifest.tokens, "lr": opts.learning_rate}
                for d, m in after.items():
                    rows.append({**common, "tokens": res.tokens_seen, "domain": d, "seconds": round(time.perf_counter() - t0, 1), **m})
                if seed == 0:
                    for tokens, ev in curve[:-1]:
                        for d, m in ev.items():
                            rows.append({**common, "tokens": tokens, "domain": d, "curve": True, **m})
                kl = {d: round(m["kl"], 4) for d, m in after.items()}
                print(f"{name} {cut} {label} seed {seed} ({n_steps} steps): KL {kl} "
                      f"(before {({d: round(m['kl'], 4) for d, m in before.items()})}) {time.perf_counter() - t0:.0f} s", flush=True)
    return rows


def summarise(rows: list[dict]) -> tuple[str, list[dict]]:
    """The markdown table: per setting, mean and spread over seeds, and the share of KL removed."""
    final = [r for r in rows if not r.get("curve")]
    keyed: dict[tuple, list[dict]] = {}
    for r in final:
        keyed.setdefault((r["model"], r["cut"], r["setting"], r["domain"]), []).append(r)
    order = ["unpruned", "none", *dict.fromkeys(r["setting"] for r in final if r["method"] in METHODS)]
    out, table = [], []
    for (model, cut, setting, domain), rs in sorted(keyed.items(), key=lambda kv: (kv[0][0], kv[0][1], order.index(kv[0][2]), kv[0][3])):
        kls, ppls = [r["kl"] for r in rs], [r["ppl"] for r in rs]
        before = keyed.get((model, cut, "none", domain))
        removed = 1 - statistics.mean(kls) / before[0]["kl"] if before and rs[0]["method"] in METHODS and before[0]["kl"] > 0 else None
        s = {"model": model, "cut": cut, "setting": setting, "method": rs[0]["method"], "domain": domain, "seeds": len(rs),
             "steps": rs[0].get("steps", 0), "epochs": rs[0].get("epochs", 0), "lr": rs[0].get("lr"), "tokens": rs[0]["tokens"],
             "cache_tokens": rs[0].get("cache_tokens"), "kl_mean": statistics.mean(kls), "kl_min": min(kls), "kl_max": max(kls),
             "ppl_mean": statistics.mean(ppls), "ppl_min": min(ppls), "ppl_max": max(ppls), "kl_removed": removed}
        out.append(s)
        cut_name = CUTS[cut][0] if cut in CUTS else "unpruned"
        spread = f" ({s['kl_min']:.4f}-{s['kl_max']:.4f})" if len(rs) > 1 else ""
        pspread = f" ({s['ppl_min']:.1f}-{s['ppl_max']:.1f})" if len(rs) > 1 else ""
        rem = f"{100 * removed:.0f}%" if removed is not None else "-"
        amount = f"{s['steps']} ({s['epochs']:g} ep)" if s["steps"] else "-"
        table.append(f"| {model} | {cut_name} | {setting} | {domain} | {amount} | {s['tokens']:,} | "
                     f"{s['kl_mean']:.4f}{spread} | {s['ppl_mean']:.1f}{pspread} | {rem} |")
    head = ["| model | cut | setting | domain | steps (epochs of the training share) | teacher tokens seen | "
            "KL to unpruned (mean, min-max over seeds) | perplexity | KL removed |",
            "|---|---|---|---|---|---|---|---|---|"]
    return "\n".join(head + table), out


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    cuts = [c for c in CUTS if any(r["cut"] == c for r in rows)]
    settings = list(dict.fromkeys(r["setting"] for r in rows if r["method"] in METHODS))
    colors = plt.get_cmap("tab10")
    fig, axes = plt.subplots(len(models), len(cuts), figsize=(4.2 * len(cuts), 3.3 * len(models)), squeeze=False)
    for i, model in enumerate(models):
        for j, cut in enumerate(cuts):
            ax = axes[i][j]
            for domain, style in (("prose", "-"), ("code", "--")):
                before = [r for r in rows if (r["model"], r["cut"], r["setting"], r["domain"]) == (model, cut, "none", domain)]
                for k, setting in enumerate(settings):
                    pts = sorted((r["tokens"], r["kl"]) for r in rows if r["seed"] == 0
                                 and (r["model"], r["cut"], r["setting"], r["domain"]) == (model, cut, setting, domain))
                    if pts and before:
                        pts = [(0, before[0]["kl"])] + pts
                        ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker=".", color=colors(k), label=f"{setting} {domain}")
            ax.set_title(f"{model}: {CUTS[cut][0]}")
            ax.set_xlabel("teacher tokens seen")
            ax.set_ylabel("held-out KL to unpruned")
            ax.set_yscale("log")
            ax.grid(alpha=0.3)
            if i == 0 and j == 0:
                ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


@click.command()
@click.option("--models", default=None, help="NAME=DIR[,NAME=DIR...] of trained nano K2 checkpoints.")
@click.option("--combine", multiple=True, type=click.Path(exists=True, path_type=Path),
              help="Instead of running: merge the rows of earlier result JSONs (run as separate pieces) into OUT.")
@click.option("--cuts", default="e2,e8,l4", show_default=True, help="Which cuts: e2 (2 of 32 experts), e8, l4 (4 of 9 layers).")
@click.option("--settings", "settings_text", default=DEFAULT_SETTINGS, show_default=True,
              help="METHOD:EPOCHS:LR,... ; EPOCHS over the cache's training share, 'default' = heal's default for either.")
@click.option("--batch-size", default=8, show_default=True, help="Sequences per step (heal's default).")
@click.option("--seeds", default=3, show_default=True)
@click.option("--curve/--no-curve", "curves", default=True, show_default=True, help="Evaluate at 1/8, 1/4, 1/2 of each seed-0 run too.")
@click.option("--teacher-samples", default=1024, show_default=True, help="Teacher sequences (the healing corpus).")
@click.option("--eval-windows", default=64, show_default=True, help="Test windows per domain.")
@click.option("--seq-len", default=64, show_default=True)
@click.option("--threads", default=1, show_default=True, help="torch threads.")
@click.option("--work", default="/tmp/k2mini-heal-study", show_default=True, type=click.Path(path_type=Path),
              help="Analyses, cuts and teacher caches (reused when present).")
@click.option("--out", "out_name", default="study_heal", show_default=True, help="Result file stem under analysis/results/.")
def main(models, combine, cuts, settings_text, batch_size, seeds, curves, teacher_samples, eval_windows, seq_len, threads, work, out_name):
    """Run the healing study and write analysis/results/OUT.{json,md,png}."""
    torch.manual_seed(0)
    torch.set_num_threads(threads)
    settings = parse_settings(settings_text)
    rows = []
    t0 = time.perf_counter()
    if combine:
        parts = [json.loads(p.read_text()) for p in combine]
        rows = [r for part in parts for r in part["rows"]]
        batch_size, seq_len = parts[0]["batch_size"], parts[0]["seq_len"]
        teacher_samples = parts[0]["teacher_tokens"] // seq_len
        eval_windows = parts[0]["eval_tokens_per_domain"] // seq_len
        t0 -= sum(part["seconds"] for part in parts)  # the runs' own time, not the merge's
    elif not models:
        raise click.UsageError("give --models or --combine")
    for spec in models.split(",") if not combine else []:
        name, _, path = spec.partition("=")
        rows += run_model(name, Path(path), work / name, cuts.split(","), settings, seeds, batch_size, teacher_samples,
                          eval_windows, seq_len, curves)
    table, summary = summarise(rows)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{out_name}.json").write_text(json.dumps({"rows": rows, "summary": summary, "batch_size": batch_size, "seq_len": seq_len,
                                                          "teacher_tokens": teacher_samples * seq_len,
                                                          "eval_tokens_per_domain": eval_windows * seq_len,
                                                          "seconds": round(time.perf_counter() - t0)}, indent=1))
    (RESULTS / f"{out_name}.md").write_text(table + "\n")
    plot(rows, RESULTS / f"{out_name}.png")
    print(table)


if __name__ == "__main__":
    main()
