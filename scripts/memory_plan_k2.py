"""Memory plan of the real Kimi-K2 config cut to 24 layers x 16 experts, without any weights.

Prints the parameter count, the bytes of a bf16 / fp8 / int4 (compressed-tensors, group 128)
checkpoint and the verdict on a GPU profile (H100 by default).

    python scripts/memory_plan_k2.py
    python scripts/memory_plan_k2.py --layers 40 --experts 96 --gpu h200 --context 32768 --json
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from k2mini.validate.gpus import load_profile
from k2mini.sizes import format_size
from k2mini.validate.memory import plan_variants, reduced_config

# A copy of the real Kimi-K2-Instruct config.json (../shared/reference/), kept in the repo so
# nothing here depends on a file outside it.
REFERENCE = Path(__file__).resolve().parents[1] / "configs" / "reference" / "kimi_k2_config.json"


@click.command()
@click.option("--config", "config_path", type=click.Path(exists=True, dir_okay=False), default=str(REFERENCE), show_default=True)
@click.option("--layers", type=int, default=24, show_default=True)
@click.option("--experts", type=int, default=16, show_default=True)
@click.option("--gpu", default="h100", show_default=True)
@click.option("--context", type=int, default=4096, show_default=True)
@click.option("--batch", type=int, default=1, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def main(config_path: str, layers: int, experts: int, gpu: str, context: int, batch: int, as_json: bool) -> None:
    cfg = reduced_config(json.loads(Path(config_path).read_text()), layers, experts)
    plans = plan_variants(cfg, load_profile(gpu), context=context, batch=batch)
    if as_json:
        click.echo(json.dumps({d: p.model_dump() for d, p in plans.items()}, indent=2))
        return
    first = next(iter(plans.values()))
    click.echo(f"Kimi-K2 reduced to {layers} layers x {experts} experts: {first.params:,} parameters")
    click.echo(f"KV cache at {context} tokens x batch {batch}: MLA latent {format_size(first.kv.latent_bytes, binary=True)} "
               f"({first.kv.latent_bytes_per_token:,} B/token), expanded {format_size(first.kv.expanded_bytes, binary=True)} "
               f"({first.kv.expanded_bytes_per_token:,} B/token); activations {format_size(first.activation_bytes, binary=True)}")
    for d, p in plans.items():
        by = ", ".join(f"{k} {format_size(v, binary=True)}" for k, v in p.weights_by_dtype.items())
        click.echo(f"{d:5s}: weights {p.weights_bytes:,} B = {format_size(p.weights_bytes, binary=True)} ({by}); "
                   f"{gpu} {format_size(p.memory_bytes, binary=True)}: latent-cache plan needs {format_size(p.needed_latent_bytes, binary=True)} "
                   f"-> {'FITS' if p.fits_latent else 'DOES NOT FIT'}; transformers+expanded "
                   f"{format_size(p.needed_expanded_bytes, binary=True)} -> {'fits' if p.fits_expanded else 'does not fit'}")


if __name__ == "__main__":
    main()
