"""Two heal benchmarks (figures, not timed tests):

1. ``--step``: one heal step against a bare forward + backward of the same model on the same
   batch, in the same run (goal: within 1.2x), and heal's tokens/s on this CPU. The heal step
   is what heal/recipe.train runs per step: the Student forward (the model's hidden states,
   the lm_head, the top-k + tail-bucket KL and the CE), backward and the optimizer step. The
   bare step is the model's own forward (``model(ids).logits``), plain cross-entropy, backward
   and the same optimizer step, with the same trainable parameters (LoRA adapters included
   for ``lora``). Both alternate, so drifting load hits both alike; the figure is the median.
2. ``--parallel``: ``k2mini heal`` itself on 1 rank, 2 ranks DDP and 2 ranks FSDP2 (torchrun,
   gloo), the same global batch and steps: tokens/s over the steps after the first (from
   heal_log.jsonl), each rank's resident parameter + optimizer bytes (heal_report.json,
   read off the tensors) and peak RSS.

  python scripts/bench_heal.py --step [--reduced DIR --teacher DIR] [--method lora --method full] [--repeats 10]
  python scripts/bench_heal.py --parallel --reduced DIR --teacher DIR --method lora --steps 6
  python scripts/bench_heal.py --parallel --fixture real-dims --method lora --steps 4 --batch-size 2
  python scripts/bench_heal.py            # --step on the tiny fixture, a 3x4 cut and its teacher cache in a temp dir
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import click
import torch


def _k2mini(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "k2mini.cli", *args], check=True, capture_output=True)


def _inputs(tmp: Path, seq_len: int, fixture: str = "tiny", layers: int = 3, experts: int = 4, samples: int = 32) -> tuple[Path, Path]:
    from k2mini.testing import build_fixture

    src = build_fixture(tmp / "src", fixture).path
    _k2mini("convert-fast", "-s", str(src), "--layers", str(layers), "--experts", str(experts), "-o", str(tmp / "reduced"))
    _k2mini("teacher", "-s", str(src), "-o", str(tmp / "teacher"), "--samples", str(samples), "--seq-len", str(seq_len), "--top-k", "64", "-q")
    return tmp / "reduced", tmp / "teacher"


def bench_parallel(reduced: Path, teacher: Path, method: str, batch: int, steps: int, tmp: Path) -> list[dict]:
    """k2mini heal on 1 rank, 2 ranks DDP, 2 ranks FSDP2: the same global batch and steps."""
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, ranks, layout in (("1 rank", 1, "--no-fsdp"), ("DDP x2", 2, "--no-fsdp"), ("FSDP2 x2", 2, "--fsdp")):
        out = tmp / name.replace(" ", "_")
        args = ["heal", str(reduced), "-t", str(teacher), "-o", str(out), "--method", method, "--steps", str(steps),
                "--batch-size", str(batch), "--eval-fraction", "0", "--eval-every", str(steps), "--device", "cpu", layout, "-q", "--json"]
        launcher = [sys.executable, "-m", "k2mini.cli"] if ranks == 1 else \
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}", "-m", "k2mini.cli"]
        subprocess.run([*launcher, *args], check=True, capture_output=True, env=env)
        log = [json.loads(x) for x in (out / "heal_log.jsonl").read_text().splitlines()]
        report = json.loads((out / "heal_report.json").read_text())
        tokens = (log[-1]["tokens"] - log[0]["tokens"])
        rows.append({"layout": name, "method": method, "ranks": ranks, "global_batch": batch, "steps": steps,
                     "tokens_per_s": tokens / (log[-1]["seconds"] - log[0]["seconds"]),
                     "resident_bytes_per_rank": report["resident_bytes_per_rank"], "peak_rss_rank0": report["peak_host_bytes"]})
        shutil.rmtree(out)
    return rows


def bench(reduced: Path, teacher: Path, method: str, batch: int, repeats: int) -> dict:
    from k2mini.checkpoint.reader import Checkpoint
    from k2mini.heal import methods
    from k2mini.heal.loss import next_token_targets
    from k2mini.heal.recipe import Student
    from k2mini.model.hf import load_checkpoint_model
    from k2mini.teacher.cache import TeacherCache

    torch.manual_seed(0)
    trained = methods.prepare(load_checkpoint_model(Checkpoint.open(str(reduced))), method)
    base = methods.base_model(trained)
    student = Student(trained).train()
    params = [p for p in trained.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    b = TeacherCache(teacher).read(range(batch))
    tgt = next_token_targets(b.input_ids)

    def heal_step():
        kl, ce = student(b.input_ids, b.topk_ids, b.topk_logprobs, tgt)
        (kl / b.input_ids.numel()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    def bare_step():
        logits = base(input_ids=b.input_ids, use_cache=False).logits
        torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for f in (heal_step, bare_step):  # warm-up: first calls allocate and pick kernels
        f()
    times = {"heal": [], "bare": []}
    for _ in range(repeats):
        for name, f in (("heal", heal_step), ("bare", bare_step)):
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    heal, bare = statistics.median(times["heal"]), statistics.median(times["bare"])
    return {"method": method, "batch_sequences": batch, "tokens_per_step": b.input_ids.numel(), "heal_step_s": heal,
            "bare_step_s": bare, "ratio": heal / bare, "heal_tokens_per_s": b.input_ids.numel() / heal}


@click.command()
@click.option("--parallel", is_flag=True, help="1 rank vs 2 ranks DDP vs 2 ranks FSDP2 (instead of the step benchmark).")
@click.option("--reduced", type=click.Path(exists=True, path_type=Path), default=None, help="A reduced bf16 checkpoint (default: built).")
@click.option("--teacher", type=click.Path(exists=True, path_type=Path), default=None, help="Its source's teacher cache.")
@click.option("--fixture", default="tiny", show_default=True, help="Without --reduced: the fixture to build (tiny, real-dims).")
@click.option("--cut", default="3x4", show_default=True, help="Without --reduced: LAYERSxEXPERTS of the built cut.")
@click.option("--method", "methods_", multiple=True, default=("router", "lora", "full"), show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--steps", default=6, show_default=True, help="--parallel: heal steps per layout.")
@click.option("--seq-len", default=128, show_default=True, help="For the built teacher cache.")
@click.option("--repeats", default=10, show_default=True)
@click.option("--json-out", type=click.Path(path_type=Path), default=None)
def main(parallel, reduced, teacher, fixture, cut, methods_, batch_size, steps, seq_len, repeats, json_out):
    """Heal step vs bare forward+backward per method, or (--parallel) heal's layouts."""
    with tempfile.TemporaryDirectory() as tmp:
        if reduced is None or teacher is None:
            layers, experts = (int(x) for x in cut.split("x"))
            reduced, teacher = _inputs(Path(tmp), seq_len, fixture, layers, experts, samples=max(4 * batch_size, 32))
        if parallel:
            rows = [r for m in methods_ for r in bench_parallel(reduced, teacher, m, batch_size, steps, Path(tmp))]
        else:
            rows = [bench(reduced, teacher, m, batch_size, repeats) for m in methods_]
    load = os.getloadavg()[0]
    for r in rows:
        if parallel:
            per = ", ".join(f"{(p + o) / 2**20:,.1f} MiB" for p, o in r["resident_bytes_per_rank"])
            print(f"{r['method']:6s} {r['layout']:9s} {r['tokens_per_s']:9,.1f} tokens/s  params+optimizer per rank: {per}  "
                  f"peak RSS rank 0 {r['peak_rss_rank0'] / 2**30:.2f} GiB")
        else:
            print(f"{r['method']:6s} heal step {r['heal_step_s'] * 1e3:7.1f} ms, bare forward+backward {r['bare_step_s'] * 1e3:7.1f} ms: "
                  f"ratio {r['ratio']:.2f} (goal <= 1.2), {r['heal_tokens_per_s']:,.0f} tokens/s ({r['tokens_per_step']} tokens/step)")
    if parallel:
        for m in methods_:
            by = {r["layout"]: r["tokens_per_s"] for r in rows if r["method"] == m}
            print(f"{m}: FSDP2 x2 / DDP x2 = {by['FSDP2 x2'] / by['DDP x2']:.2f}, FSDP2 x2 / 1 rank = {by['FSDP2 x2'] / by['1 rank']:.2f}, "
                  f"DDP x2 / 1 rank = {by['DDP x2'] / by['1 rank']:.2f} (tokens/s)")
    print(f"load average {load:.2f}, torch threads per rank {1 if parallel else torch.get_num_threads()}")
    if json_out:
        json_out.write_text(json.dumps({"rows": rows, "load_average": load}, indent=1))


if __name__ == "__main__":
    main()
