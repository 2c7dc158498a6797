"""``k2mini convert``, ``k2mini convert-fast`` and ``k2mini demo``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from k2mini.errors import UsageError
from k2mini.sizes import format_size, parse_size

_SRC = click.option("--source", "-s", "source", required=True, help="Source checkpoint (K2 / DeepSeek-V3 format): a directory or a Hub repo id org/name[@revision].")
_OUT = click.option("--output", "-o", "output", required=True, type=click.Path(path_type=Path), help="Output directory (created; must not exist or be empty).")


def _common(f):
    opts = [
        click.option("--layers", type=int, default=None, help="Decoder layers to keep (default: all)."),
        click.option("--experts", type=int, default=None, help="Routed experts to keep per MoE layer (default: all)."),
        click.option("--top-k", "top_k", type=int, default=None, help="Experts per token (default: the source's num_experts_per_tok)."),
        click.option("--dtype", "--quantize", "dtype", default=None,
                     help="Output weights: bf16 (dequantized, default), fp8 (FP8 bytes and scales copied, lossless, ~half the size), "
                          "or int4 | int4-g64 | int4-g32 | int8 (compressed-tensors, quantized in the same streaming pass; "
                          "--quantize int4 is the same flag)."),
        click.option("--groups", type=click.Choice(["auto", "keep", "flatten"]), default=None,
                     help="n_group>1 sources: keep routing groups (equal experts per group) or flatten to n_group=1; auto keeps them when possible."),
        click.option("--preset", default=None, help="A preset name from configs/presets (e.g. k2-mini) or a JSON file; flags override it."),
        click.option("--max-shard-size", default="5GB", show_default=True, help="Largest shard (e.g. 5GB, 500MB, 2GiB)."),
        click.option("--overwrite", is_flag=True, help="Replace an existing non-empty output (only once the new one is complete)."),
        click.option("--resume", is_flag=True, help="Continue an interrupted run into the same output, re-using its finished shards after checking them."),
        click.option("--dry-run", is_flag=True, help="Print the plan, parameter count and bytes per dtype; write nothing."),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout."),
        click.option("--no-progress", is_flag=True, help="No progress bar."),
    ]
    for o in reversed(opts):
        f = o(f)
    return f


def _parse_ints(text: str, flag: str) -> list[int]:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise UsageError(f"{flag} {text!r}: expected comma-separated integers such as 0,3,5") from None


def _parse_keep_experts(text: str) -> list[int] | dict[int, list[int]]:
    if ":" not in text:
        return _parse_ints(text, "--keep-experts")
    out: dict[int, list[int]] = {}
    for part in filter(None, text.split(";")):
        layer, _, ids = part.partition(":")
        try:
            out[int(layer)] = _parse_ints(ids, "--keep-experts")
        except ValueError:
            raise UsageError(f"--keep-experts {text!r}: expected L:ids;L:ids such as 1:0,4;2:1,5") from None
    return out


def _print_summary(s, plan, as_json: bool) -> None:
    if as_json:
        d = s.model_dump()
        d["plan"] = json.loads(plan.model_dump_json()) if s.dry_run else None
        click.echo(json.dumps(d, indent=1))
        return
    head = "plan (dry run, nothing written)" if s.dry_run else f"wrote {s.output}"
    click.echo(f"{head}: {len(s.layers)} layers, {s.experts_per_layer} experts/layer, top-{s.num_experts_per_tok}, dtype {s.dtype}")
    click.echo(f"  layers kept (source ids): {', '.join(map(str, s.layers))}   [{plan.layer_strategy}]")
    out_idx = {l: i for i, l in enumerate(plan.layers)}
    for e in plan.experts[:8] if not s.dry_run else plan.experts:
        ids = ", ".join(map(str, e.kept[:32])) + (" ..." if len(e.kept) > 32 else "")
        click.echo(f"  layer {out_idx[e.source_layer]} (source {e.source_layer}) experts: {ids}")
        if s.dry_run and e.merge:
            folded = ["+".join(f"{m}({w:.2f})" for m, w in g) for g in e.merge if len(g) > 1]
            click.echo(f"    merged ({plan.merge_similarity} similarity; expert(weight), kept one first): {' '.join(folded)}")
    if not s.dry_run and len(plan.experts) > 8:
        click.echo(f"  ... {len(plan.experts) - 8} more MoE layers (plan.json has them all)   [{plan.expert_strategy}]")
    click.echo(f"  routing groups: {s.group_policy}; parameters: {s.params:,}")
    click.echo("  bytes by dtype: " + ", ".join(f"{k} {format_size(v)}" for k, v in s.bytes_by_dtype.items())
               + f"; total {format_size(s.total_size)} in {s.shards} shard(s)")
    for n in s.notes:
        click.echo(f"  note: {n}")
    if s.dry_run and s.source_total_bytes:
        click.echo(f"  source bytes: {format_size(s.planning_bytes_read + s.bytes_to_read)} to read "
                   f"({format_size(s.planning_bytes_read)} already read to plan) of {format_size(s.source_total_bytes)} in the source "
                   f"({100 * (s.planning_bytes_read + s.bytes_to_read) / s.source_total_bytes:.1f}%)")
    if not s.dry_run:
        rate = s.total_size / s.seconds / 1e6 if s.seconds else 0.0
        click.echo(f"  {s.tensors} tensors in {s.seconds:.1f} s ({rate:.0f} MB/s written); source bytes read {format_size(s.bytes_read)} "
                   f"for {format_size(s.selected_source_bytes)} selected; {s.dropped_source_tensors} source tensors dropped"
                   + (f"; {s.reused_shards} shard(s) re-used from the interrupted run" if s.reused_shards else ""))
        click.echo(f"  copied: {', '.join(s.copied_files) or 'nothing'}; left out: {', '.join(s.dropped_files) or 'nothing'}")


def _default_expert_strategy(a, path) -> str:
    """output-error when the analysis has its orders (see --expert-strategy's help), else REAP."""
    if a.has_output_error():
        return "output-error"
    click.echo(f"k2mini: note: {path} has no output-error order (older k2mini or analyze --no-output-error); "
               "ranking experts by REAP", err=True)
    return "reap"


def run(
    *, source, output, layers, experts, top_k, dtype, groups, preset, max_shard_size, overwrite, resume, dry_run,
    as_json, no_progress, layer_strategy, expert_strategy, analysis=None, plan_path=None, keep_layers=None,
    keep_experts=None, layer_metric=None, protect_ends=True, fast=False, merge=None,
):
    """Shared by convert and convert-fast: options -> plan -> (dry run | write) -> summary."""
    from k2mini.analysis.schema import Analysis
    from k2mini.checkpoint.reader import Checkpoint
    from k2mini.convert.pipeline import dry_run as do_dry_run
    from k2mini.convert.pipeline import prepare, run_convert
    from k2mini.convert.presets import load_preset
    from k2mini.convert.transforms import make_transform
    from k2mini.output import check_output
    from k2mini.convert.transforms import TRANSFORMS
    from k2mini.quantize.convert_hook import INT_TRANSFORMS
    from k2mini.selection.build import build_plan, check_plan_source
    from k2mini.selection.context import SelectOptions
    from k2mini.selection.plan import Plan

    p = load_preset(preset) if preset else None

    def pick(flag_value, preset_value, default):
        return flag_value if flag_value is not None else (preset_value if preset_value is not None else default)

    shard_bytes = parse_size(max_shard_size, flag="--max-shard-size")
    if not dry_run:
        check_output(output, source=source, overwrite=overwrite, resume=resume, flag="--output")
    ck = Checkpoint.open(source)
    if plan_path is not None:
        if any(v is not None for v in (layers, experts, top_k, keep_layers, keep_experts, analysis, layer_strategy, expert_strategy, merge)):
            raise UsageError("--plan fixes the layers and experts; drop --layers/--experts/--top-k/--analysis/--merge/strategy flags")
        plan = Plan.load(plan_path)
        check_plan_source(plan, ck, str(plan_path))
        # The plan's dtype (k2mini plan chose it with the cut) unless --dtype overrides it.
        transform = make_transform(pick(dtype, plan.dtype or (p and p.dtype), "bf16"), {**TRANSFORMS, **INT_TRANSFORMS})
    else:
        transform = make_transform(pick(dtype, p and p.dtype, "bf16"), {**TRANSFORMS, **INT_TRANSFORMS})
        a = Analysis.load(analysis) if analysis else None
        # Layers default to importance by skip-layer NLL when analyzed (analyze --nll), else
        # uniform; not block influence, the worst layer score in all four trained nano K2 models
        # (7 of 9 layers kept, prose KL 0.068/0.025/0.050/0.061 vs uniform 0.038/0.012/0.032/0.035),
        # where skip-layer NLL tied or beat uniform.
        has_nll = a is not None and a.has_nll_increase()
        if fast:
            ls, es = "uniform", "weights"
        else:
            ls = pick(layer_strategy, p and p.layer_strategy, "importance" if has_nll else "uniform")
            es = pick(expert_strategy, p and p.expert_strategy, None)
            if keep_layers and layer_strategy is None:
                ls = "explicit"
            if keep_experts and expert_strategy is None:
                es = "explicit"
            if es is None:
                es = _default_expert_strategy(a, analysis) if a else "weights"
        opts = SelectOptions(
            layers=pick(layers, p and p.layers, None), experts=pick(experts, p and p.experts, None),
            top_k=pick(top_k, p and p.top_k, None), layer_strategy=ls, expert_strategy=es,
            keep_layers=_parse_ints(keep_layers, "--keep-layers") if keep_layers else None,
            keep_experts=_parse_keep_experts(keep_experts) if keep_experts else None,
            protect_ends=protect_ends, layer_metric=layer_metric or ("nll_increase" if has_nll else "block_influence"),
            groups=pick(groups, p and p.groups, "auto"), merge=merge,
        )
        plan = build_plan(ck, opts, a, str(analysis) if analysis else None)
    plan = plan.model_copy(update={"dtype": transform.name})
    prepared = prepare(ck, plan, transform)
    if dry_run:
        summary = do_dry_run(prepared, str(output), max_shard_bytes=shard_bytes)
    else:
        summary = run_convert(prepared, output, max_shard_bytes=shard_bytes, overwrite=overwrite, resume=resume,
                              progress=not no_progress)
        summary.bytes_read = ck.source.bytes_read  # everything since open: headers, scoring, files, tensors
    _print_summary(summary, plan, as_json)
    return summary


@click.command("convert", context_settings={"max_content_width": 110})
@_SRC
@_OUT
@_common
@click.option("--analysis", type=click.Path(path_type=Path), default=None, help="analysis.json from `k2mini analyze` (data-driven strategies).")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), default=None, help="Replay a plan.json (e.g. from an earlier output).")
@click.option("--layer-strategy", default=None, help="uniform | importance | contiguous | explicit. Default: importance by nll_increase when the analysis has it "
                   "(analyze --nll), else uniform. Block influence was the worst layer score in the nano K2 study (7/9 layers "
                   "kept, prose KL 0.050 vs uniform 0.032 on the Muon model, 0.068 vs 0.038 on the AdamW one).")
@click.option("--expert-strategy", default=None,
              help="weights | frequency | reap | ean | output-error | explicit. Default with --analysis: output-error "
                   "(reap if the file has no output-error order), which in the nano K2 study (3 seeds, KL to the unpruned "
                   "model, prose/code) was lowest or tied-lowest at every ratio with unbalanced routing (8/32 experts kept: "
                   "0.003/0.003 vs EAN 0.005/0.004, frequency 0.006/0.005, REAP 0.017/0.020) and within 0.011 of REAP with "
                   "balanced routing (16/32: 0.030/0.039 vs 0.032/0.034; 8/32: 0.074/0.079 vs 0.063/0.076); else weights.")
@click.option("--keep-layers", default=None, help="Explicit source layers, e.g. 0,3,5,60.")
@click.option("--keep-experts", default=None, help="Explicit source experts: 0,5,9 for every MoE layer, or 1:0,5;2:3,4 per layer.")
@click.option("--layer-metric", type=click.Choice(["block_influence", "nll_increase"]), default=None,
              help="Analysis metric ranked by --layer-strategy importance (default: nll_increase when the analysis has it, else block_influence).")
@click.option("--protect-ends/--no-protect-ends", default=True, show_default=True,
              help="importance/contiguous: always keep the leading dense layer(s) and the last layer.")
@click.option("--merge", type=click.Choice(["router"]), is_flag=False, flag_value="router", default=None,
              help="Fold each pruned expert into the kept expert with the most similar router row (cosine), weighted "
                   "by the analysis' routing frequencies, instead of dropping it (needs --analysis). --merge = --merge router.")
def convert_cmd(**kw):
    """Write a reduced checkpoint: kept layers and experts, fixed config, model card.

    \b
    Examples:
      k2mini convert -s ./Kimi-K2-Instruct --analysis analysis.json --layers 24 --experts 16 -o ./k2-mini
      k2mini convert -s ./Kimi-K2-Instruct --preset k2-mini --analysis analysis.json -o ./k2-mini
      k2mini convert -s ./Kimi-K2-Instruct --plan ./k2-mini/plan.json --dtype fp8 -o ./k2-mini-fp8
      k2mini convert -s ./K2 --keep-layers 0,1,2,60 --keep-experts 0,1,2,3,4,5,6,7 -o ./k2-tiny --dry-run
      k2mini convert -s ./Kimi-K2-Instruct --analysis analysis.json --experts 16 --merge -o ./k2-merged --dry-run
    """
    run(**kw)


@click.command("convert-fast", context_settings={"max_content_width": 110})
@_SRC
@_OUT
@_common
def convert_fast_cmd(**kw):
    """Reduce without calibration: uniform layers, experts ranked by their weights alone.

    Experts are ranked by router row norm, correction bias and expert weight norm (FP8
    weight norms estimated from the scale grids), so the run reads little beyond what it
    writes.

    \b
    Examples:
      k2mini convert-fast -s ./Kimi-K2-Instruct --layers 24 --experts 16 -o ./k2-mini-fast
      k2mini convert-fast -s ./Kimi-K2-Instruct --layers 24 --experts 16 --dtype fp8 -o ./k2-mini-fp8
      k2mini convert-fast -s ./Kimi-K2-Instruct --preset k2-mini --dry-run -o ./x
    """
    run(**kw, layer_strategy=None, expert_strategy=None, fast=True)


@click.command("demo")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--overwrite", is_flag=True, help="Replace OUT/source and OUT/reduced if they exist.")
def demo_cmd(out: Path, overwrite: bool):
    """Build a tiny K2-format checkpoint under OUT/source and reduce it into OUT/reduced.

    Runs in seconds, offline: shows what convert-fast does (layers and experts kept, the
    fixed config, the files written) without a 1 TB download.

    \b
    Example:
      k2mini demo ./k2mini-demo && ls ./k2mini-demo/reduced
    """
    from k2mini.commands.fixture import write_fixture

    src, red = out / "source", out / "reduced"
    if src.exists() and any(src.iterdir()) and not overwrite:
        raise UsageError(f"{src}: exists and is not empty (pass --overwrite to rebuild the demo)")
    click.echo(f"1. building a tiny Kimi-K2-format FP8 checkpoint in {src} (4 layers: 1 dense + 3 MoE, 8 experts, top-2)")
    write_fixture(src, "tiny", flag="OUT", overwrite=overwrite, seed=0)
    click.echo(f"2. k2mini convert-fast --source {src} --layers 3 --experts 4 --output {red}")
    s = run(source=str(src), output=red, layers=3, experts=4, top_k=None, dtype=None, groups=None, preset=None,
            max_shard_size="5GB", overwrite=overwrite, resume=False, dry_run=False, as_json=False, no_progress=True,
            layer_strategy=None, expert_strategy=None, fast=True)
    cfg = json.loads((red / "config.json").read_text())
    click.echo(f"3. {red}/config.json: model_type {cfg['model_type']}, {cfg['num_hidden_layers']} layers, "
               f"{cfg['n_routed_experts']} experts, no auto_map; load it with "
               f"transformers.AutoModelForCausalLM.from_pretrained('{red}') (no trust_remote_code)")
    return s
