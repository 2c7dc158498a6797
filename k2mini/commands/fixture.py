"""``k2mini fixture``: write a K2-format test checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import click

from k2mini.errors import UsageError


@click.command("fixture")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", default="tiny", show_default=True, help="tiny | aligned | grouped | mla | mla-grouped | real-dims")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--layers", type=int, default=None, help="Override the preset's number of layers.")
@click.option("--experts", type=int, default=None, help="Override the preset's routed experts per layer.")
@click.option("--shards", type=int, default=None, help="Override the preset's number of shards.")
def fixture_cmd(out: Path, preset: str, seed: int, layers: int | None, experts: int | None, shards: int | None) -> None:
    """Write a small checkpoint in the exact Kimi-K2 layout (FP8 + scales, shards, index,
    tokenizer), for trying the other commands without downloading 1 TB.

    \b
    Examples:
      k2mini fixture ./tiny-k2
      k2mini fixture ./k2-real-dims --preset real-dims --layers 4
      k2mini fixture ./k2-mla --preset mla-grouped      # K2's attention head dims, small hidden size
    """
    from k2mini.testing.fixtures import PRESETS

    if preset not in PRESETS:
        raise UsageError(f"--preset {preset!r} is not one of {', '.join(PRESETS)}")
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"output directory {out} exists and is not empty")
    overrides = {
        k: v for k, v in {"num_hidden_layers": layers, "n_routed_experts": experts, "n_shards": shards}.items() if v is not None
    }
    fx = write_fixture(out, preset, flag="OUT", seed=seed, **overrides)
    click.echo(json.dumps({"path": str(out), "preset": preset, "layers": fx.config["num_hidden_layers"],
                           "experts": fx.config["n_routed_experts"]}))


def write_fixture(out: Path, preset: str, *, flag: str, overwrite: bool = False, seed: int = 0, **overrides):
    """``build_fixture`` into a partial directory renamed into place when complete (as every
    output), so a full disk or an interrupt leaves nothing at ``out`` that looks finished."""
    from k2mini.output import OutputDir
    from k2mini.testing.fixtures import build_fixture

    with OutputDir(out, overwrite=overwrite, flag=flag) as od:
        fx = build_fixture(od.partial, preset, seed=seed, **overrides)
        od.commit()
    return fx
