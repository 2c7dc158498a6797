"""``k2mini quantize``: INT8 / INT4 weight-only checkpoint from a BF16 output or FP8 source."""

from __future__ import annotations

import click

from k2mini.quantize import FORMATS


@click.command("quantize")
@click.argument("source")
@click.option("--bits", type=int, required=True, help="4 or 8.")
@click.option("--group-size", type=int, default=None,
              help="Columns per scale: 32, 64 or 128 (compressed-tensors only); it must divide every quantized weight's "
                   "input dimension. Default for INT4: per tensor, the largest of 128, 64, 32 that divides it (routed "
                   "experts: both dimensions, since vLLM fuses them), else one scale per output channel; INT8: per "
                   "output channel.")
@click.option("--format", "fmt", default="compressed-tensors", show_default=True, help=f"One of: {', '.join(FORMATS)}.")
@click.option("--ignore", multiple=True, metavar="PATTERN",
              help="Keep matching modules BF16 (repeatable): a module name or re:REGEX, compressed-tensors syntax. "
                   "Router (mlp.gate), lm_head, embeddings and norms always stay BF16; routed experts cannot be ignored "
                   "in compressed-tensors output (transformers cannot load BF16 experts there).")
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="New output directory.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty output (only once the new one is complete).")
@click.option("--max-shard-size", default="5GB", show_default=True, help="Largest shard (e.g. 5GB, 500MB, 2GiB).")
@click.option("--json", "as_json", is_flag=True, help="Print the report summary as JSON on stdout.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def quantize_cmd(source: str, bits: int, group_size: int | None, fmt: str, ignore: tuple[str, ...], output: str,
                 overwrite: bool, max_shard_size: str, as_json: bool, quiet: bool) -> None:
    """Quantize the linear weights of SOURCE (a converted BF16 output or a K2 FP8 source;
    FP8 is dequantized per tensor) to INT4 or INT8, one tensor at a time, into OUTPUT.

    The default format, compressed-tensors pack-quantized, stores every projection
    including the routed experts as integers and loads in transformers and vLLM. bnb and
    quanto leave the routed experts BF16 (transformers' integrations replace nn.Linear only)
    and say how much. quantization_report.json in OUTPUT lists each tensor's relative error
    ||W - dequant(Q(W))|| / ||W|| and the bytes before and after.

    \b
    Examples:
      k2mini quantize ./k2-mini-24x16 --bits 4 -o ./k2-mini-24x16-int4
      k2mini quantize ./k2-mini-24x16 --bits 8 -o ./k2-mini-24x16-int8
      k2mini quantize ./k2-mini-24x16 --bits 4 --group-size 32 --ignore 're:.*self_attn.*' -o ./int4-g32
      k2mini quantize ./k2-mini-24x16 --bits 4 --format bnb -o ./k2-mini-bnb4
      k2mini quantize ./Kimi-K2-Instruct --bits 4 -o ./k2-int4          # FP8 source, full size
      k2mini convert -s ./Kimi-K2-Instruct --layers 24 --experts 16 --dtype int4 -o ./k2-mini-int4   # one pass
    """
    import json

    from k2mini.checkpoint.source import refuse_output_inside
    from k2mini.quantize.run import QuantOptions, quantize_checkpoint
    from k2mini.sizes import parse_size

    refuse_output_inside(source, output, flag="--output")  # robustness: never write into the source
    report = quantize_checkpoint(source, output, QuantOptions(bits, group_size, fmt, tuple(ignore)), progress=not quiet,
                                 overwrite=overwrite, max_shard_bytes=parse_size(max_shard_size, flag="--max-shard-size"))
    if report.warning:
        click.echo(f"k2mini: warning: {report.warning}", err=True)
    if as_json:
        click.echo(json.dumps(report.model_dump(exclude={"tensors"}), indent=2))
    else:
        click.echo(report.summary())
        click.echo(f"wrote {output} (report: {output}/quantization_report.json)")
