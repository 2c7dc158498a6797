"""``k2mini plan``: the best cut (layers x experts x dtype) that fits a GPU or a byte budget."""

from __future__ import annotations

import json
from pathlib import Path

import click

from k2mini.errors import UsageError


@click.command("plan", context_settings={"max_content_width": 110})
@click.option("--source", "-s", "source", required=True,
              help="Source checkpoint (directory or org/name[@revision]); or a config.json alone (a directory holding only it) "
                   "to plan before downloading, scored by a prior.")
@click.option("--gpu", default=None, help="GPU profile (configs/gpus: h100, h200, rtx4090, ...): weights + KV cache + activations must fit.")
@click.option("--budget", default=None, help="Bytes for the weights alone, e.g. 60GB, 512MiB, 3MB (instead of --gpu).")
@click.option("--context", type=int, default=8192, show_default=True, help="Tokens of context per sequence (KV cache), with --gpu.")
@click.option("--batch", type=int, default=1, show_default=True, help="Sequences served at once, with --gpu.")
@click.option("--dtypes", default="bf16,fp8,int8,int4", show_default=True,
              help="Output types to consider (convert --dtype names; also int4-g64, int4-g32). fp8 only for an FP8 source.")
@click.option("--analysis", type=click.Path(exists=True, dir_okay=False), default=None,
              help="analysis.json from `k2mini analyze --nll`: the proxy score and convert's selection of layers and experts.")
@click.option("--teacher", type=click.Path(exists=True, file_okay=False), default=None,
              help="Teacher cache from `k2mini teacher`: the best --measure cuts by proxy are run on its held-out sequences "
                   "and scored by KL to the teacher.")
@click.option("--measure", "measure_n", type=int, default=8, show_default=True, help="Cuts measured with --teacher.")
@click.option("--eval-fraction", type=float, default=0.1, show_default=True, help="Held-out share of the teacher cache (heal's split).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the held-out split (heal's --seed).")
@click.option("--device", default="cpu", show_default=True, help="Where measured cuts run: cpu, cuda, cuda:N.")
@click.option("--output", "-o", type=click.Path(path_type=Path), default=None, help="Write the chosen cut as a plan.json for `convert --plan`.")
@click.option("--png", type=click.Path(path_type=Path), default=None, help="Frontier plot (default: next to -o as frontier.png).")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def plan_cmd(source, gpu, budget, context, batch, dtypes, analysis, teacher, measure_n, eval_fraction, seed, device, output, png, as_json, quiet):
    """Choose the reduced model that fits: layers kept, experts per layer and dtype.

    Enumerates, per dtype and number of kept layers, the most experts per MoE layer that
    fit (validate's memory model: weights, MLA KV cache at --context x --batch, activations,
    the GPU's reserved memory; or the weights alone with --budget), scores them (proxy from
    --analysis, or measured KL on --teacher's held-out sequences, the cut run on the fly,
    nothing written), prints the frontier and writes the best as a plan:
    `k2mini convert -s SRC --plan plan.json -o OUT` applies its layers, experts and dtype.

    \b
    Examples:
      k2mini plan -s ./configs/reference/kimi_k2_config.json --gpu h100 --context 32768
      k2mini plan -s ./Kimi-K2-Instruct --gpu h100 --analysis analysis.json -o plan.json
      k2mini plan -s ./nano --budget 3MB --analysis a.json --teacher ./nano.teacher -o plan.json
      k2mini convert -s ./Kimi-K2-Instruct --plan plan.json -o ./k2-fit
    """
    from k2mini.sizes import parse_size
    from k2mini.sizes import format_size
    from k2mini.planner.plot import plot, table
    from k2mini.planner.run import PlanOptions, make_plan

    from k2mini.checkpoint.source import refuse_output_inside

    if output is not None and output.exists() and output.is_dir():
        raise UsageError(f"-o {output}: is a directory (give the plan file's path, e.g. plan.json)")
    png = png or (output.with_name("frontier.png") if output is not None else None)
    for path, flag in ((output, "--output"), (png, "--png")):
        if path is not None:
            refuse_output_inside(source, path, flag=flag)  # before any work: never write into the source
    opts = PlanOptions(source=source, gpu=gpu, budget=parse_size(budget, flag="--budget") if budget is not None else None,
                       context=context, batch=batch, dtypes=tuple(d for d in dtypes.replace(" ", "").split(",") if d),
                       analysis=analysis, teacher=teacher, measure=measure_n, eval_fraction=eval_fraction, seed=seed,
                       device=device, progress=not quiet and not as_json)
    report, plan = make_plan(opts)
    if output is not None:
        if plan is None:
            raise UsageError(f"-o {output}: a config alone gives no plan file (choosing experts needs the weights); "
                             f"run: {report.convert_command}")
        tmp = output.with_name(output.name + ".tmp")
        tmp.write_bytes(plan.to_bytes())
        tmp.replace(output)
        report.plan_file = str(output)
        report.convert_command = report.convert_command.replace("PLAN.json", str(output))
    if png is not None:
        plot(report, png)
    if as_json:
        click.echo(json.dumps(report.model_dump(), indent=1))
        return
    p = report.picked()
    cap = format_size(report.capacity_bytes)
    what = f"{report.target} ({cap})" if not report.weights_only else f"weights budget {cap}"
    click.echo(f"k2mini plan for {what}: {len(report.candidates)} largest-fitting cuts, scored by {report.scored_by}")
    for line in table(report):
        click.echo("  " + line)
    score = f"held-out KL {p.kl:.4g}, NLL {p.nll:.4g}" if p.kl is not None else f"proxy {p.proxy:.4g}"
    need = f", needs {format_size(p.needed_bytes)} of {cap}" if p.needed_bytes is not None else ""
    click.echo(f"pick: {p.layers} layers x {p.experts} experts, {p.dtype}: weights {format_size(p.weights_bytes)}{need}; {score}")
    click.echo(f"  kept layers: {', '.join(map(str, p.kept_layers))}")
    if report.proxy_spearman is not None:
        click.echo(f"  proxy vs measured KL over the {sum(c.kl is not None for c in report.candidates)} measured cuts: "
                   f"Spearman {report.proxy_spearman:.2f}")
    for n in report.notes:
        click.echo(f"  note: {n}")
    if png is not None:
        click.echo(f"  frontier plot: {png}")
    click.echo(f"  next: {report.convert_command}")
