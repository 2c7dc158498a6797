"""Time and memory of the output-error elimination for one MoE layer at Kimi-K2's dims.

Random router and expert outputs of the real shapes (E 384, H 7168, top-8, sigmoid routing
with a correction bias): the greedy's cost depends on the shapes, not on the values. Expert
outputs are random here (computing them is N * E expert applications, timed by analyze).

  python scripts/bench_output_error.py --tokens 64 --threads 2
"""

from __future__ import annotations

import resource
import time

import click
import torch

from k2mini.model.routing import Routing
from k2mini.analysis.output_error import elimination_order


@click.command()
@click.option("--tokens", default=64, show_default=True, help="Calibration tokens N (analyze --output-error-tokens).")
@click.option("--experts", default=384, show_default=True)
@click.option("--hidden", default=7168, show_default=True)
@click.option("--top-k", default=8, show_default=True)
@click.option("--threads", default=2, show_default=True)
def main(tokens, experts, hidden, top_k, threads):
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(tokens, hidden, generator=g)
    r = Routing(torch.randn(experts, hidden, generator=g) * 0.02, torch.randn(experts, generator=g) * 0.01, top_k, True, 2.827)
    outs = torch.randn(tokens, experts, hidden, generator=g)
    t0 = time.perf_counter()
    order = elimination_order(x, r, outs)
    dt = time.perf_counter() - t0
    assert sorted(order) == list(range(experts))
    print(f"N {tokens} E {experts} H {hidden} top-{top_k}, {threads} threads: outputs {outs.nbytes / 1e9:.2f} GB, "
          f"elimination {dt:.1f} s, peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6:.2f} GB")


if __name__ == "__main__":
    main()
