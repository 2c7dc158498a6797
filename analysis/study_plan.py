"""Plan study on the trained nano K2 models: `k2mini plan`'s pick against the mission-shaped
cut at three weight budgets, before and after `k2mini heal`, and how well plan's proxy ranks
cuts against measured KL.

The mission-shaped cut, scaled to the nano K2 (9 layers: 1 dense + 8 MoE, 32 experts, top-2):
- layers: K2 keeps 24 of 61 (39%); 39% of 9 is 3.5, so 4 of 9 (the dense layer, the last
  layer and the two MoE layers skip-layer NLL ranks highest, as convert's default does);
- experts: K2 keeps 16 of 384 (4.2%), i.e. twice its top-k of 8. 4.2% of 32 is 1.3, below
  the nano's top-2, and keeping exactly top-k experts makes routing a no-op (every token uses
  both), which K2's cut does not do. So the nano keeps 4 of 32: twice its top-k, like K2;
- dtype: BF16, as the mission asks.
Budgets (weights alone, `plan --budget`): that cut's BF16 bytes, half of them and twice them.

Per model, the pipeline is the product's own, through the CLI:
  1. analyze (--nll) and teacher on the TRAIN split of the nano corpus (the documents the
     model was trained on, every 10th held out);
  2. plan --budget B --analysis --teacher --measure ALL (every largest-fitting cut measured on
     the held-out 10% of the teacher cache: this is where the proxy's rank correlation comes
     from), -o plan.json; convert --plan for the pick, convert --analysis for the mission cut;
  3. heal (lora) each cut in BF16 (heal trains BF16 only), then quantize it to the pick's
     dtype when that is INT (convert --dtype int* of the healed model is not possible: heal's
     output is BF16, so `k2mini quantize` does it);
Evaluation: KL(unpruned || model) per token and perplexity on fixed windows of the TEST split
(documents neither analyze, teacher nor heal saw), prose and code together.

  python analysis/study_plan.py --models muon=/work/nano_k2/muon_balanced --steps 60
  python analysis/study_plan.py --combine analysis/results/plan_muon.json --combine ... --out plan_nano
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import click
import torch

RESULTS = Path(__file__).resolve().parent / "results"
MISSION = (4, 4, "bf16")  # layers, experts, dtype (see the module doc)
BUDGET_FACTORS = (0.5, 1.0, 2.0)


def k2mini(*args: str) -> str:
    p = subprocess.run([sys.executable, "-m", "k2mini.cli", *args], capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"k2mini {' '.join(args)} failed:\n{p.stderr[-2000:]}")
    return p.stdout


def load(out: Path):
    """A written output in float32 (transformers decompresses compressed-tensors itself)."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()


def evaluate(model, ids, ref) -> dict[str, float]:
    from k2mini.nano import study as S

    return S.compare(model, ids, ref)


def prepare(path: Path, work: Path, seq_len: int, teacher_samples: int) -> tuple[Path, Path]:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from study_heal import write_train_text

    work.mkdir(parents=True, exist_ok=True)
    calib = write_train_text(work)
    analysis, teacher = work / "analysis.json", work / "teacher"
    if not analysis.exists():
        k2mini("analyze", "-s", str(path), "-o", str(analysis), *calib, "--samples", "32", "--seq-len", str(seq_len), "--nll",
               "--no-plots", "-q")
    if not teacher.exists():
        k2mini("teacher", "-s", str(path), "-o", str(teacher), *calib, "--samples", str(teacher_samples), "--seq-len", str(seq_len),
               "--top-k", "64", "--seed", "1", "-q")
    return analysis, teacher


def heal_and_eval(cut_bf16: Path, teacher: Path, work: Path, dtype: str, steps: int, batch: int, ids, ref) -> dict[str, float]:
    healed = work.with_name(work.name + "-healed")
    if not healed.exists():
        k2mini("heal", str(cut_bf16), "--teacher", str(teacher), "-o", str(healed), "--method", "lora", "--steps", str(steps),
               "--batch-size", str(batch), "--quiet")
    final = healed
    if dtype.startswith("int"):
        final = healed.with_name(healed.name + f"-{dtype}")
        if not final.exists():
            bits = ["--bits", "4"] if dtype.startswith("int4") else ["--bits", "8"]
            group = ["--group-size", dtype.split("-g")[1]] if "-g" in dtype else []
            k2mini("quantize", str(healed), *bits, *group, "-o", str(final), "--quiet")
    return evaluate(load(final), ids, ref)


def run_model(name: str, path: Path, work: Path, steps: int, batch: int, seq_len: int, teacher_samples: int, eval_windows: int) -> dict:
    from k2mini.checkpoint.reader import Checkpoint
    from k2mini.nano import data
    from k2mini.nano import study as S
    from k2mini.planner.space import Cut, MemoryModel

    analysis, teacher = prepare(path, work, seq_len, teacher_samples)
    source, cfg = S.load_nano(path)
    dd = data.load(cfg["vocab_size"])
    ids = torch.cat([data.windows(dd.test[d], seq_len, eval_windows) for d in ("prose", "code")])
    ref = S.reference(source, ids)
    model = MemoryModel(Checkpoint.open(str(path)).config, (MISSION[2],))
    mission_bytes = model.weights(Cut(*MISSION))
    mission = work / "mission"
    if not mission.exists():
        k2mini("convert", "-s", str(path), "--analysis", str(analysis), "--layers", str(MISSION[0]), "--experts", str(MISSION[1]),
               "-o", str(mission), "--no-progress")
    rows = []
    m_before = evaluate(load(mission), ids, ref)
    m_after = heal_and_eval(mission, teacher, work / "mission", "bf16", steps, batch, ids, ref)
    for f in BUDGET_FACTORS:
        budget = int(mission_bytes * f)
        tag = f"b{f:g}"
        t0 = time.perf_counter()
        rep = json.loads(k2mini("plan", "-s", str(path), "--budget", str(budget), "--analysis", str(analysis), "--teacher",
                                str(teacher), "--measure", "1000", "-o", str(work / f"plan-{tag}.json"), "--json", "--quiet"))
        plan_s = time.perf_counter() - t0
        pick = rep["candidates"][rep["pick"]]
        out, out16 = work / f"pick-{tag}", work / f"pick-{tag}-bf16"
        if not out.exists():
            k2mini("convert", "-s", str(path), "--plan", str(work / f"plan-{tag}.json"), "-o", str(out), "--no-progress")
        if pick["dtype"] != "bf16" and not out16.exists():
            k2mini("convert", "-s", str(path), "--plan", str(work / f"plan-{tag}.json"), "--dtype", "bf16", "-o", str(out16), "--no-progress")
        before = evaluate(load(out), ids, ref)
        after = heal_and_eval(out16 if pick["dtype"] != "bf16" else out, teacher, work / f"pick-{tag}", pick["dtype"], steps, batch, ids, ref)
        # The mission cut's own measured score from the same plan run, when it is a candidate at this budget.
        rows.append({"model": name, "budget_factor": f, "budget_bytes": budget, "mission_bytes": mission_bytes,
                     "pick": {k: pick[k] for k in ("layers", "experts", "dtype", "weights_bytes", "proxy", "kl", "nll")},
                     "pick_before": before, "pick_after": after, "mission_before": m_before, "mission_after": m_after,
                     "proxy_spearman": rep["proxy_spearman"], "measured": sum(c["kl"] is not None for c in rep["candidates"]),
                     "plan_seconds": round(plan_s, 1),
                     "candidates": [{k: c[k] for k in ("layers", "experts", "dtype", "weights_bytes", "proxy", "proxy_parts", "kl")} for c in rep["candidates"]]})
        print(f"{name} budget {f:g}x ({budget:,} B): pick {pick['layers']}L x {pick['experts']}E {pick['dtype']} "
              f"({pick['weights_bytes']:,} B) KL {before['kl']:.4f} -> healed {after['kl']:.4f}; mission ({mission_bytes:,} B) "
              f"KL {m_before['kl']:.4f} -> {m_after['kl']:.4f}; proxy Spearman {rep['proxy_spearman']}", flush=True)
    return {"model": name, "unpruned": evaluate(source, ids, ref), "rows": rows}


def _default_rho(cands: list[dict]) -> float | None:
    """Spearman of plan's proxy (its default weights) vs measured KL over measured cuts."""
    from k2mini.planner.proxy import EXPERT_WEIGHT, QUANT_WEIGHT

    data = [(c["proxy_parts"], c["kl"]) for c in cands if c.get("proxy_parts") and c["kl"] is not None]
    if len(data) < 3:
        return None
    return _spearman([d + EXPERT_WEIGHT * e + QUANT_WEIGHT * q for (d, e, q), _ in data], [kl for _, kl in data])


def table(results: list[dict]) -> str:
    head = ["| model | budget (weights) | cut | bytes | held-out KL before heal | after heal (lora) | ppl before | ppl after | proxy Spearman (cuts measured) |",
            "|---|---|---|---|---|---|---|---|---|"]
    out = []
    for res in results:
        rows = res["rows"]
        if not rows:
            continue
        r0 = rows[0]
        if res.get("unpruned"):
            out.append(f"| {res['model']} | - | unpruned | - | 0 | - | {res['unpruned']['ppl']:.1f} | - | - |")
        out.append(f"| {res['model']} | - | mission-shaped 4L x 4E bf16 | {r0['mission_bytes']:,} | {r0['mission_before']['kl']:.4f} | "
                   f"{r0['mission_after']['kl']:.4f} | {r0['mission_before']['ppl']:.1f} | {r0['mission_after']['ppl']:.1f} | - |")
        for r in rows:
            p = r["pick"]
            sp = _default_rho(r["candidates"])
            sp = f"{sp:.2f} ({r['measured']})" if sp is not None else f"- ({r['measured']})"
            out.append(f"| {res['model']} | {r['budget_factor']:g}x = {r['budget_bytes']:,} | plan: {p['layers']}L x {p['experts']}E {p['dtype']} | "
                       f"{p['weights_bytes']:,} | {r['pick_before']['kl']:.4f} | {r['pick_after']['kl']:.4f} | "
                       f"{r['pick_before']['ppl']:.1f} | {r['pick_after']['ppl']:.1f} | {sp} |")
    return "\n".join(head + out)


BETAS = (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0)
GAMMAS = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0)


def _spearman(a, b) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def fit_proxy(results: list[dict]) -> dict:
    """Weights of the proxy's expert-cut (beta) and quantization (gamma) terms that best rank
    the measured cuts: per model in-sample, and fitted on the other models (leave one out)."""
    pts = {res["model"]: [(c["proxy_parts"], c["kl"]) for r in res["rows"] for c in r["candidates"]
                          if c.get("proxy_parts") and c["kl"] is not None] for res in results}

    def rho(data, b, g):
        return _spearman([d + b * e + g * q for (d, e, q), _ in data], [kl for _, kl in data])

    out = {}
    for m, data in pts.items():
        if len(data) < 3:
            continue
        best = max(((b, g) for b in BETAS for g in GAMMAS), key=lambda bg: rho(data, *bg))
        others = [x for o, d in pts.items() if o != m for x in d]
        loo = max(((b, g) for b in BETAS for g in GAMMAS), key=lambda bg: rho(others, *bg)) if len(others) >= 3 else None
        out[m] = {"cuts": len(data), "rho_unweighted": rho(data, 1.0, 1.0), "best": best, "rho_best": rho(data, *best),
                  "fit_on_others": loo, "rho_fit_on_others": rho(data, *loo) if loo else None}
    # Not pooled over models: plan ranks the cuts of one model, and KL scales differ between models.
    return out


@click.command()
@click.option("--models", default=None, help="NAME=DIR[,NAME=DIR...] of trained nano K2 checkpoints.")
@click.option("--combine", multiple=True, type=click.Path(exists=True, path_type=Path), help="Merge earlier result JSONs instead of running.")
@click.option("--work", type=click.Path(path_type=Path), default=Path("/tmp/k2mini-plan-study"), show_default=True)
@click.option("--steps", default=60, show_default=True, help="Heal steps per cut.")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--seq-len", default=64, show_default=True)
@click.option("--teacher-samples", default=256, show_default=True)
@click.option("--eval-windows", default=64, show_default=True, help="Test windows per domain.")
@click.option("--threads", default=1, show_default=True)
@click.option("--out", default="plan_nano", show_default=True, help="Result name under analysis/results/.")
def main(models, combine, work, steps, batch_size, seq_len, teacher_samples, eval_windows, threads, out):
    torch.set_num_threads(threads)
    RESULTS.mkdir(exist_ok=True)
    if combine:
        results = [r for p in combine for r in json.loads(p.read_text())["results"]]
    else:
        results = []
        for spec in models.split(","):
            name, _, path = spec.partition("=")
            results.append(run_model(name, Path(path), work / name, steps, batch_size, seq_len, teacher_samples, eval_windows))
    (RESULTS / f"{out}.json").write_text(json.dumps({"results": results}, indent=1))
    md = table(results)
    fit = fit_proxy(results)
    md += "\n\nProxy = dropped-layer cost + beta x expert-cut cost + gamma x quantization cost; Spearman vs measured KL:\n"
    md += "\n".join(f"- {m}: {f}" for m, f in fit.items())
    (RESULTS / f"{out}.md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    main()
