"""Merge vs prune at equal size on the trained nano K2, through the CLI.

Regenerate analysis/results/merge_vs_prune.{md,json}:
  python analysis/merge_vs_prune.py
  python analysis/merge_vs_prune.py --seeds 3 --eval-windows 16 --calib-samples 16

For each regime (balanced / unbalanced routing) and calibration seed S this runs, in process,
the same code as these commands (WORK is a temporary directory; the calibration files hold
the TRAIN split of the nano model's documents, one JSON line per document):

  k2mini analyze -s /work/nano_k2/balanced --calib prose=WORK/prose.jsonl --calib code=WORK/code.jsonl \\
      --samples 16 --seq-len 64 --seed S --no-plots -q -o WORK/a.json
  k2mini convert -s /work/nano_k2/balanced --analysis WORK/a.json --expert-strategy reap --experts 16 \\
      [--merge] -o WORK/out --no-progress

and loads each output like any checkpoint (Checkpoint.open + transformers) to measure, on
held-out TEST windows of each domain, KL(unpruned || reduced) per token, top-1 agreement and
perplexity with the study's helpers (k2mini.nano.study). Two in-process rows use the same kept
experts as the CLI's plan.json: ``prune (in-process)`` masks the other experts as the study does
(a check that convert writes what the study measures), and ``merge output-sim (in-process)``
merges with the study's output similarity on the same calibration tokens instead of convert's
router similarity.
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import click
import torch

from k2mini.analysis.calibration import build_calibration
from k2mini.analysis.tokenizer import load_tokenizer
from k2mini.checkpoint.reader import Checkpoint
from k2mini.cli import cli
from k2mini.nano import data
from k2mini.nano import study as S
from k2mini.textdata import code_corpus, prose_corpus, split_documents

RESULTS = Path(__file__).resolve().parent / "results"
REGIMES = {"balanced": Path("/work/nano_k2/balanced"), "unbalanced": Path("/work/nano_k2/unbalanced")}
METHODS = ["prune", "merge router (CLI)", "prune (in-process)", "merge output-sim (in-process)"]


def write_train_docs(work: Path, test_every: int = 10) -> list[str]:
    """The nano model's TRAIN documents (k2mini.nano.data's split) as --calib jsonl files."""
    specs = []
    for name, corpus in (("prose", prose_corpus), ("code", code_corpus)):
        docs = [d for i, d in enumerate(split_documents(corpus())) if i % test_every != test_every - 1]
        path = work / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
        specs.append(f"{name}={path}")
    return specs


def k2mini(*args) -> str:
    """Run one k2mini command in this process (the CLI's own code path); returns its stdout."""
    from click.testing import CliRunner

    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    if res.exit_code != 0:
        raise SystemExit(f"k2mini {' '.join(map(str, args))}: exit {res.exit_code}: {res.output}")
    return res.stdout


def run(seeds: int, keeps: list[int], strategies: list[str], calib_samples: int, eval_windows: int, seq_len: int) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="merge_vs_prune_") as tmp:
        work = Path(tmp)
        specs = write_train_docs(work)
        for regime, src in REGIMES.items():
            model, cfg = S.load_nano(src)
            dd = data.load(cfg["vocab_size"])
            evals = {d: data.windows(dd.test[d], seq_len, eval_windows) for d in ("prose", "code")}
            refs = {d: S.reference(model, ids) for d, ids in evals.items()}
            ck = Checkpoint.open(str(src))
            moe = S.moe_layers(model)

            def record(seed, strategy, keep, method, m):
                for d, ids in evals.items():
                    rows.append({"regime": regime, "seed": seed, "strategy": strategy, "keep": keep, "experts": cfg["n_routed_experts"],
                                 "method": method, "domain": d, **S.compare(m, ids, refs[d])})

            for seed in range(seeds):
                t0 = time.time()
                a = work / f"{regime}-{seed}.json"
                k2mini("analyze", "-s", src, *[x for s in specs for x in ("--calib", s)], "--samples", calib_samples,
                       "--seq-len", seq_len, "--seed", seed, "--no-plots", "-q", "-o", a)
                calib = build_calibration(load_tokenizer(ck), specs, samples=calib_samples, seq_len=seq_len, seed=seed)
                cal = S.calibrate(model, calib.input_ids, layer_metrics=False)
                for keep in keeps:
                    for strategy in strategies:
                        kept = None
                        for method, extra in (("prune", []), ("merge router (CLI)", ["--merge"])):
                            out = work / f"{regime}-{seed}-{strategy}-{keep}-{len(extra)}"
                            k2mini("convert", "-s", src, "--analysis", a, "--expert-strategy", strategy, "--experts", keep,
                                   *extra, "-o", out, "--no-progress", "--json")
                            plan = json.loads((out / "plan.json").read_text())
                            assert plan["layers"] == list(range(cfg["num_hidden_layers"]))
                            kept = {e["source_layer"]: e["kept"] for e in plan["experts"]}
                            reduced, _ = S.load_nano(out)
                            record(seed, strategy, keep, method, reduced)
                        assert sorted(kept) == moe
                        record(seed, strategy, keep, "prune (in-process)", S.prune_experts(model, cal, strategy, keep, seed, kept))
                        record(seed, strategy, keep, "merge output-sim (in-process)",
                               S.prune_experts(model, cal, "reap_merge", keep, seed, kept))
                print(f"{regime} seed {seed}: {time.time() - t0:.0f} s", file=sys.stderr)
    return rows


def table(rows: list[dict]) -> str:
    groups = defaultdict(list)
    for r in rows:
        groups[(r["regime"], r["keep"], r["strategy"], r["method"], r["domain"])].append(r)

    def ms(vals, f="{:.3f}"):
        m = statistics.mean(vals)
        sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
        return f"{f.format(m)} ± {f.format(sd)}"

    out = []
    for regime in dict.fromkeys(r["regime"] for r in rows):
        out += [f"\n## {regime}\n", "| experts kept | selection | method | prose KL | prose top1 | prose ppl | code KL | code top1 | code ppl |",
                "|---|---|---|---|---|---|---|---|---|"]
        keys = sorted({(k[1], k[2]) for k in groups if k[0] == regime}, key=lambda x: (-x[0], x[1]))
        for keep, strategy in keys:
            for method in METHODS:
                cells = []
                for d in ("prose", "code"):
                    g = groups.get((regime, keep, strategy, method, d), [])
                    if not g:
                        break
                    cells += [ms([r["kl"] for r in g], "{:.4f}"), ms([r["top1"] for r in g]), ms([r["ppl"] for r in g], "{:.2f}")]
                if cells:
                    E = groups[(regime, keep, strategy, method, "prose")][0]["experts"]
                    out.append(f"| {keep}/{E} | {strategy} | {method} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def ratios(rows: list[dict]) -> str:
    """KL of each merge over KL of plain pruning with the same kept experts, per seed and domain, then averaged."""
    by = {(r["regime"], r["seed"], r["strategy"], r["keep"], r["method"], r["domain"]): r["kl"] for r in rows}
    out = ["\n## Merge KL / prune KL (same kept experts; mean over seeds and both domains)\n",
           "| regime | experts kept | selection | merge router (CLI) | merge output-sim |", "|---|---|---|---|---|"]
    for regime, keep, strategy in dict.fromkeys((r["regime"], r["keep"], r["strategy"]) for r in rows):
        cells = []
        for method in ("merge router (CLI)", "merge output-sim (in-process)"):
            q = [by[(regime, sd, strategy, keep, method, d)] / by[(regime, sd, strategy, keep, "prune", d)]
                 for (rg, sd, st, kp, m, d) in by if (rg, st, kp, m) == (regime, strategy, keep, "prune")]
            cells.append(f"{statistics.mean(q):.2f}x (range {min(q):.2f}-{max(q):.2f})")
        out.append(f"| {regime} | {keep}/{rows[0]['experts']} | {strategy} | " + " | ".join(cells) + " |")
    return "\n".join(out)


@click.command()
@click.option("--seeds", type=int, default=3, show_default=True, help="Calibration samples (analyze --seed 0..N-1).")
@click.option("--keep", "keeps", type=int, multiple=True, default=(16, 8), show_default=True)
@click.option("--strategy", "strategies", multiple=True, default=("reap", "frequency"), show_default=True)
@click.option("--calib-samples", type=int, default=16, show_default=True)
@click.option("--eval-windows", type=int, default=16, show_default=True)
@click.option("--seq-len", type=int, default=64, show_default=True)
@click.option("--render-only", is_flag=True, help="Re-write the markdown from results/merge_vs_prune.json without measuring.")
def main(seeds, keeps, strategies, calib_samples, eval_windows, seq_len, render_only):
    torch.manual_seed(0)
    RESULTS.mkdir(exist_ok=True)
    if render_only:
        rows = json.loads((RESULTS / "merge_vs_prune.json").read_text())
    else:
        rows = run(seeds, list(keeps), list(strategies), calib_samples, eval_windows, seq_len)
        (RESULTS / "merge_vs_prune.json").write_text(json.dumps(rows, indent=1) + "\n")
    head = (f"# Merge vs prune at equal size on the nano K2\n\nGenerated by `python analysis/merge_vs_prune.py --seeds {seeds}"
            f" --calib-samples {calib_samples} --eval-windows {eval_windows} --seq-len {seq_len}`"
            f" (keep {', '.join(map(str, keeps))}; selection {', '.join(strategies)}). Mean ± sample std over {seeds} calibration seeds.\n"
            f"Calibration: `k2mini analyze` on {calib_samples}x{seq_len} tokens of the train split (half prose, half code); "
            f"evaluation: {eval_windows}x{seq_len} held-out tokens per domain. KL = KL(unpruned || reduced) per token (nats), "
            "top1 = top-1 agreement with the unpruned model.\n\n"
            "Methods: `prune` = `convert --analysis a.json --expert-strategy S --experts N`; `merge router (CLI)` = the same with "
            "`--merge` (each pruned expert folded into the kept expert with the most similar router row, weights (frequency + 1) / "
            "group sum); `prune (in-process)` = the study's masking with the CLI's kept experts (checks convert); "
            "`merge output-sim (in-process)` = the study's merge (output similarity on the same calibration tokens) with the CLI's "
            "kept experts.\n")
    (RESULTS / "merge_vs_prune.md").write_text(head + table(rows) + "\n" + ratios(rows) + "\n")
    print(table(rows) + "\n" + ratios(rows))


if __name__ == "__main__":
    main()
