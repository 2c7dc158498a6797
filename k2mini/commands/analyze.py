"""``k2mini analyze``: layer-streamed calibration run -> analysis.json (+ plots)."""

from __future__ import annotations

import shutil

from pathlib import Path

import click

from k2mini.errors import UsageError
from k2mini.sizes import parse_size


@click.command("analyze")
@click.option("--source", "-s", required=True, help="Source checkpoint (K2 / DeepSeek-V3 format): a directory or a Hub repo id org/name[@revision].")
@click.option("--output", "-o", type=click.Path(dir_okay=False, path_type=Path), default=Path("analysis.json"),
              show_default=True, help="Where to write analysis.json.")
@click.option("--calib", "calib", multiple=True, metavar="[NAME=]SPEC",
              help="Calibration source, repeatable: builtin (prose+code), builtin:prose, builtin:code, a text file "
                   "or a .jsonl file with a 'text' field (FILE.jsonl:FIELD for another field). Default: builtin.")
@click.option("--samples", default=32, show_default=True, type=int, help="Calibration sequences (split evenly across sources).")
@click.option("--seq-len", default=512, show_default=True, type=int, help="Tokens per calibration sequence.")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--nll/--no-nll", default=False, show_default=True,
              help="Also score each layer by the calibration NLL increase when it is skipped (SLEB-style; "
                   "extra compute, no extra weight reads).")
@click.option("--nll-samples", default=4, show_default=True, type=int, help="Sequences used for the --nll score.")
@click.option("--output-error/--no-output-error", default=True, show_default=True,
              help="Also order each MoE layer's experts by greedy output-error elimination (the default expert "
                   "strategy of convert --analysis). Reads every expert of each MoE layer and holds every expert's "
                   "output on the sampled tokens for one layer: tokens x experts x hidden x 4 bytes (Kimi-K2: "
                   "512 x 384 x 7168 x 4 B = 5.6 GB).")
@click.option("--output-error-tokens", default=512, show_default=True, type=click.IntRange(min=1),
              help="Calibration tokens (a seeded random sample when there are more) for --output-error.")
@click.option("--weight-norms", is_flag=True, help="Also record every expert's weight norm (reads every expert once).")
@click.option("--memory-budget", default="4GiB", show_default=True,
              help="RAM for carried activations (G = 10^9 bytes, GiB = 2^30); beyond it they are kept on disk in the work directory.")
@click.option("--device", default="cpu", show_default=True,
              help="Where the resident layer and the batch being computed live: cpu, cuda, cuda:N or auto (under torchrun, "
                   "each rank's local GPU). Carried activations stay in host RAM or on disk. The results do not depend on it "
                   "beyond float rounding.")
@click.option("--work-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where per-layer state is kept for --resume (default: OUTPUT.work).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run after its last finished layer.")
@click.option("--plots/--no-plots", default=True, show_default=True,
              help="Write OUTPUT-stem.layers.png and .experts.png next to the output.")
@click.option("--json", "as_json", is_flag=True, help="Print analysis.json to stdout instead of the summary.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def analyze_cmd(source, output, calib, samples, seq_len, seed, nll, nll_samples, output_error, output_error_tokens, weight_norms,
                memory_budget, device, work_dir, resume, plots, as_json, quiet) -> None:
    """Run calibration text through SOURCE one decoder layer at a time and score every
    layer and routed expert; writes analysis.json for `convert --analysis`.

    Only one layer's weights are in memory at a time; in MoE layers only the experts that
    received tokens are read (every expert with --output-error, the default). One analysis
    serves any pruning ratio.

    \b
    Examples:
      k2mini analyze -s ./Kimi-K2-Instruct -o k2.analysis.json --samples 64 --seq-len 1024
      k2mini analyze -s ./tiny-k2 --calib prose=builtin:prose --calib mine=data.jsonl --nll
      k2mini analyze -s ./Kimi-K2-Instruct -o k2.analysis.json --resume
      k2mini analyze -s ./Kimi-K2-Instruct -o k2.analysis.json --output-error-tokens 256   # 2.8 GB per layer
    """
    from k2mini.analysis.analyze import AnalyzeOptions, analyze
    from k2mini.analysis.calibration import build_calibration
    from k2mini.analysis.report import render_summary, save_plots
    from k2mini.analysis.tokenizer import load_tokenizer
    from k2mini.checkpoint.reader import Checkpoint
    from k2mini.checkpoint.source import refuse_output_inside

    if nll_samples < 1:
        raise UsageError("--nll-samples must be >= 1")
    budget = parse_size(memory_budget, flag="--memory-budget", minimum=0)
    from k2mini.model.device import resolve_device

    device = str(resolve_device(device))  # a bad --device before any read
    ck = Checkpoint.open(source)
    if int(ck.config.get("num_hidden_layers") or 0) < 1:
        raise UsageError(f"{source}/config.json: num_hidden_layers must be >= 1")
    calib_set = build_calibration(load_tokenizer(ck), list(calib) or None, samples=samples, seq_len=seq_len, seed=seed)
    opts = AnalyzeOptions(nll=nll, nll_samples=nll_samples, weight_norms=weight_norms, memory_budget=budget, progress=not quiet,
                          output_error_tokens=output_error_tokens if output_error else 0, device=device)
    work = work_dir or output.with_name(output.name + ".work")
    for path, flag in ((output, "--output"), (work, "--work-dir")):
        refuse_output_inside(source, path, flag=flag)  # robustness: never write into the source
    result = analyze(ck, calib_set, opts, work_dir=work, resume=resume)

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(output.name + ".tmp")
    result.save(tmp)
    tmp.replace(output)  # never a half-written analysis.json
    shutil.rmtree(work, ignore_errors=True)  # only now: until the rename, --resume needs it
    written = []
    if plots:
        try:
            written = save_plots(result, output.with_suffix(""))
        except ImportError:
            click.echo("k2mini: note: no plots (matplotlib is not installed: pip install 'k2mini[plots]')", err=True)
    if as_json:
        click.echo(result.model_dump_json(indent=1))
    else:
        click.echo(render_summary(result))
        click.echo(f"\nwrote {output}" + "".join(f", {p}" for p in written))
