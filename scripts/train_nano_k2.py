"""Train the nano K2 (MLA, 1 dense + 8 MoE layers, 32 routed experts top-2 + 1 shared,
sigmoid routing with correction bias) on built-in prose + Python source, and save it in the
Kimi-K2 FP8 format.

Examples:
  python scripts/train_nano_k2.py --out /work/nano_k2/balanced
  python scripts/train_nano_k2.py --no-balance --out /work/nano_k2/unbalanced
  python scripts/train_nano_k2.py --optimizer adamw --out /tmp/nano_adamw --json
  python scripts/train_nano_k2.py --steps 20 --out /tmp/smoke     # smoke run
"""

from __future__ import annotations

import csv
import json
import sys
from dataclasses import asdict
from pathlib import Path

import click
import torch

from k2mini.nano import data
from k2mini.nano.train import NanoConfig, heldout_loss, train
from k2mini.testing.fixtures import k2_config, k2_named_tensors, snap_to_stored, write_checkpoint
from k2mini.testing.tokenizer import save_tokenizer

RESULTS = Path(__file__).resolve().parent.parent / "analysis" / "results"


def plot_curves(results: Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csvs = sorted(results.glob("nano_train_*.csv"))
    if not csvs:
        return None
    fig, ax = plt.subplots(1, 2, figsize=(11, 4))
    for p in csvs:
        with open(p) as fh:
            rows = list(csv.DictReader(fh))
        step = [int(r["step"]) for r in rows]
        loss = torch.tensor([float(r["loss"]) for r in rows])
        smooth = torch.nn.functional.avg_pool1d(loss[None, None], 20, 1, 10, count_include_pad=False)[0, 0][: len(step)]
        label = p.stem.removeprefix("nano_train_")
        ax[0].plot(step, smooth.tolist(), label=label)
        ax[1].plot(step, [float(r["max_load_over_mean"]) for r in rows], label=label)
    ax[0].set(xlabel="step", ylabel="train loss (20-step mean)", title="nano K2 training loss")
    ax[1].set(xlabel="step", ylabel="max expert load / mean (avg over layers)", title="routing imbalance", yscale="log")
    for a in ax:
        a.legend(fontsize=8)
    fig.tight_layout()
    out = results / "nano_training_loss.png"
    fig.savefig(out, dpi=110)
    return out


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--out", "out_dir", type=click.Path(path_type=Path), required=True, help="Output checkpoint directory (must be empty or absent).")
@click.option("--optimizer", type=click.Choice(["adamw", "muon"]), default="muon", show_default=True)
@click.option("--no-balance", is_flag=True, help="Train without auxiliary-loss-free bias balancing.")
@click.option("--steps", type=int, default=NanoConfig.steps, show_default=True)
@click.option("--experts", type=int, default=NanoConfig.n_routed_experts, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--gamma", type=float, default=NanoConfig.gamma, show_default=True, help="Bias update speed.")
@click.option("--threads", type=int, default=1, show_default=True,
              help="Torch threads. 1 on a shared machine: with more runnable threads than cores, OpenMP barriers made 2 threads 5-10x slower than 1 (measured).")
@click.option("--log", "log_csv", type=click.Path(path_type=Path), default=None,
              help="Loss CSV (default analysis/results/nano_train_<optimizer>_<balanced|unbalanced>.csv).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def main(out_dir, optimizer, no_balance, steps, experts, seed, gamma, threads, log_csv, as_json):
    torch.set_num_threads(threads)
    if out_dir.exists() and any(out_dir.iterdir()):
        click.echo(f"train_nano_k2: error: --out {out_dir} is not empty", err=True)
        sys.exit(2)
    cfg = NanoConfig(optimizer=optimizer, balance=not no_balance, steps=steps, seed=seed, gamma=gamma, n_routed_experts=experts)
    regime = "balanced" if cfg.balance else "unbalanced"
    log_csv = log_csv or RESULTS / f"nano_train_{optimizer}_{regime}.csv"
    model, dd, rows = train(cfg, log_csv)

    # What the checkpoint stores (FP8 projections, BF16 rest) is what we evaluate.
    tmp = out_dir.with_name(out_dir.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=False)
    spec = cfg.fixture_spec()
    vocab = save_tokenizer(tmp, cfg.vocab_size)
    assert vocab == dd.vocab_size
    kcfg = k2_config(spec)
    weights = k2_named_tensors(model)
    pairs = snap_to_stored(weights, kcfg)
    write_checkpoint(tmp, spec, kcfg, weights, pairs, seed=seed)

    report = {"config": asdict(cfg), "train_seconds": round(rows[-1][4], 1), "final_train_loss_20": sum(r[1] for r in rows[-20:]) / 20,
              "params": sum(p.numel() for p in model.parameters()), "domains": {}}
    for dom in ("prose", "code"):
        nll = heldout_loss(model, dd.test[dom], cfg.seq_len)
        report["domains"][dom] = {
            "heldout_ppl": round(float(torch.exp(torch.tensor(nll))), 3),
            "unigram_ppl": round(data.unigram_perplexity(dd.train[dom], dd.test[dom], dd.vocab_size), 3),
            "train_tokens": len(dd.train[dom]), "test_tokens": len(dd.test[dom]),
        }
    (tmp / "train_report.json").write_text(json.dumps(report, indent=2) + "\n")
    (tmp / "README.txt").write_text(
        f"nano K2 ({regime}, {optimizer}) written by scripts/train_nano_k2.py\n"
        f"K2 FP8 format: {cfg.num_hidden_layers} layers (1 dense + {cfg.num_hidden_layers - 1} MoE), "
        f"{cfg.n_routed_experts} routed experts top-{cfg.num_experts_per_tok} + 1 shared, hidden {cfg.hidden_size}, "
        f"vocab {vocab}, trained {cfg.steps} steps x {cfg.batch_size}x{cfg.seq_len} tokens.\n"
        f"held-out perplexity: " + ", ".join(f"{d} {v['heldout_ppl']} (unigram {v['unigram_ppl']})" for d, v in report["domains"].items()) + "\n"
        f"reproduce: python scripts/train_nano_k2.py --optimizer {optimizer}{'' if cfg.balance else ' --no-balance'} --steps {steps} --seed {seed} --out DIR\n"
        "full config and figures: train_report.json\n"
    )
    tmp.rename(out_dir)
    plot_curves(log_csv.parent)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo((out_dir / "README.txt").read_text())


if __name__ == "__main__":
    main()
