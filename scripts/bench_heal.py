"""One heal step against a bare forward + backward of the same model on the same batch, in
the same run (goal: within 1.2x), and heal's tokens/s on this CPU.

The heal step is what heal/recipe.train runs per step: the Student forward (the model's
hidden states, the lm_head, the top-k + tail-bucket KL and the CE), backward and the
optimizer step. The bare step is the model's own forward (``model(ids).logits``), plain
cross-entropy, backward and the same optimizer step, with the same trainable parameters
(LoRA adapters included for ``lora``). Both alternate, so drifting load hits both alike;
the figure is the median over the repeats.

  python scripts/bench_heal.py --reduced DIR --teacher DIR [--method lora --method full] [--repeats 10]
  python scripts/bench_heal.py            # builds the tiny fixture, a 3x4 cut and its teacher cache in a temp dir
"""

from __future__ import annotations

import json
import os
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


def _inputs(tmp: Path, seq_len: int) -> tuple[Path, Path]:
    from k2mini.testing import build_fixture

    src = build_fixture(tmp / "src", "tiny").path
    _k2mini("convert-fast", "-s", str(src), "--layers", "3", "--experts", "4", "-o", str(tmp / "reduced"))
    _k2mini("teacher", "-s", str(src), "-o", str(tmp / "teacher"), "--samples", "32", "--seq-len", str(seq_len), "--top-k", "64", "-q")
    return tmp / "reduced", tmp / "teacher"


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
@click.option("--reduced", type=click.Path(exists=True, path_type=Path), default=None, help="A reduced bf16 checkpoint (default: built).")
@click.option("--teacher", type=click.Path(exists=True, path_type=Path), default=None, help="Its source's teacher cache.")
@click.option("--method", "methods_", multiple=True, default=("router", "lora", "full"), show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--seq-len", default=128, show_default=True, help="For the built teacher cache.")
@click.option("--repeats", default=10, show_default=True)
@click.option("--json-out", type=click.Path(path_type=Path), default=None)
def main(reduced, teacher, methods_, batch_size, seq_len, repeats, json_out):
    """Heal step vs bare forward+backward; prints the ratio per method."""
    with tempfile.TemporaryDirectory() as tmp:
        if reduced is None or teacher is None:
            reduced, teacher = _inputs(Path(tmp), seq_len)
        rows = [bench(reduced, teacher, m, batch_size, repeats) for m in methods_]
    load = os.getloadavg()[0]
    for r in rows:
        print(f"{r['method']:6s} heal step {r['heal_step_s'] * 1e3:7.1f} ms, bare forward+backward {r['bare_step_s'] * 1e3:7.1f} ms: "
              f"ratio {r['ratio']:.2f} (goal <= 1.2), {r['heal_tokens_per_s']:,.0f} tokens/s ({r['tokens_per_step']} tokens/step)")
    print(f"load average {load:.2f}, torch threads {torch.get_num_threads()}")
    if json_out:
        json_out.write_text(json.dumps({"rows": rows, "load_average": load, "threads": torch.get_num_threads()}, indent=1))


if __name__ == "__main__":
    main()
