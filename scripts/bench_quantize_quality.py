"""Logit agreement of quantized outputs with the BF16 model, and integer shares, per format.

Builds a fixture (random-init DeepseekV3 weights, FP8 in K2 layout), quantizes it with every
format/bit width, loads each result with transformers on CPU and compares logits on
held-out prose with the BF16 model read from the same source. Prints one table.

    python scripts/bench_quantize_quality.py [--preset aligned] [--seqs 16]

Random weights give nearly flat next-token distributions, so top-1 agreement there is a
harsh test (many near ties); KL is the steadier figure.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from k2mini.checkpoint.reader import Checkpoint
from k2mini.errors import UsageError
from k2mini.model.hf import load_checkpoint_model
from k2mini.quantize.quality import held_out_batches, logit_agreement
from k2mini.quantize.run import QuantOptions, quantize_checkpoint
from k2mini.testing import build_fixture

RUNS = [
    ("compressed-tensors INT8 channel", QuantOptions(8)),
    ("compressed-tensors INT4 g128", QuantOptions(4, 128)),
    ("compressed-tensors INT4 g64", QuantOptions(4, 64)),
    ("compressed-tensors INT4 g32", QuantOptions(4, 32)),
    ("bnb nf4", QuantOptions(4, format="bnb")),
    ("quanto int8 (at load)", QuantOptions(8, format="quanto")),
    ("quanto int4 (at load)", QuantOptions(4, format="quanto")),
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="aligned")
    ap.add_argument("--source", type=Path, help="an existing checkpoint (e.g. the trained nano K2) instead of a fixture")
    ap.add_argument("--seqs", type=int, default=16)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args()
    torch.manual_seed(0)
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        # kv_lora_rank 128 so that every input dimension is a multiple of 128 (group 128 fits).
        src = args.source or build_fixture(Path(tmp) / "src", args.preset, kv_lora_rank=128).path
        ref = load_checkpoint_model(Checkpoint.open(src), dtype=torch.bfloat16)
        ref32 = load_checkpoint_model(Checkpoint.open(src), dtype=torch.float32)
        batches = held_out_batches(src, n_seqs=args.seqs)
        floor = logit_agreement(ref32, ref, batches)
        rows.append({"run": "BF16 vs FP32 compute (noise floor)", "top1": floor.top1, "kl": floor.kl, "max_kl": floor.max_kl})
        for label, opts in RUNS:
            out = Path(tmp) / label.replace(" ", "_")
            try:
                rep = quantize_checkpoint(src, out, opts, progress=False)
            except UsageError as exc:
                print(f"skipped {label}: {exc}")
                continue
            model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
            a = logit_agreement(ref, model, batches)
            rows.append({
                "run": label, "top1": a.top1, "kl": a.kl, "max_kl": a.max_kl,
                "int_param_share_linear": rep.int_param_share_linear,
                "int_byte_share_linear": rep.int_byte_share_linear,
                "mean_rel_error": rep.mean_rel_error, "bytes_out": rep.bytes_out, "bytes_bf16": rep.bytes_bf16,
                "unquantized_linear_bytes": rep.unquantized_linear_bytes,
            })
            del model
    what = args.source or f"fixture preset {args.preset} (random init, kv_lora_rank 128)"
    print(f"{what}: {floor.tokens} held-out tokens")
    print(f"{'run':36s} {'top1':>6s} {'KL':>9s} {'maxKL':>8s} {'int params':>10s} {'int bytes':>9s} {'rel err':>8s} {'size':>6s}")
    for r in rows:
        extra = ""
        if "int_param_share_linear" in r:
            rel = "-" if r["mean_rel_error"] is None else f"{r['mean_rel_error']:.4f}"
            extra = (f" {100 * r['int_param_share_linear']:9.1f}% {100 * r['int_byte_share_linear']:8.1f}% {rel:>8s}"
                     f" {r['bytes_out'] / r['bytes_bf16']:6.3f}")
        print(f"{r['run']:36s} {r['top1']:6.3f} {r['kl']:9.2e} {r['max_kl']:8.2e}{extra}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
