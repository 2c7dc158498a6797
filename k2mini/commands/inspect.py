"""``k2mini inspect``: what is in a checkpoint, from headers alone."""

from __future__ import annotations

import json

import click


@click.command("inspect")
@click.argument("source")
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
def inspect_cmd(source: str, as_json: bool) -> None:
    """Show architecture, tensor counts, dtypes, parameters, bytes and problems of SOURCE
    (a checkpoint directory). Reads only headers: seconds even for 1 TB.

    Exits 2 when problems are found (missing tensors, orphan scales, bad scale grids).

    \b
    Examples:
      k2mini inspect ./Kimi-K2-Instruct
      k2mini inspect ./k2-mini-24x16 --json | jq .params
    """
    # Here, not at the top: every command module is imported for `k2mini --help`.
    from k2mini.checkpoint.reader import Checkpoint
    from k2mini.inspection import inspect_checkpoint

    report = inspect_checkpoint(Checkpoint.open(source))
    if as_json:
        click.echo(json.dumps(report.model_dump(), indent=2))
    else:
        click.echo(report.render())
    if report.problems:
        raise SystemExit(2)
