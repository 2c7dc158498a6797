"""Reader benchmarks, measured in one run:

1. FP8 -> BF16 dequant throughput on a [7168, 2048] K2 expert tensor: our kernel vs the
   naive torch broadcast (repeat_interleave the scale grid to full size).
2. Peak RSS while reading every tensor of a real-dims fixture once (in a fresh process),
   against the bound 2 x the largest tensor's BF16 size + 500 MB.

    python scripts/bench_reader.py [--fixture DIR] [--layers 4] [--experts 12]

Without --fixture, a real-dims fixture is built under a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch


def dequant_throughput(repeats: int = 20) -> dict:
    from k2mini.checkpoint import fp8

    gen = torch.Generator().manual_seed(0)
    q, s = fp8.quantize(torch.randn(7168, 2048, generator=gen) * 0.02)
    fp8.dequantize(q, s)  # compile / load the kernel cache

    def naive():
        full = s.repeat_interleave(128, 0)[:7168].repeat_interleave(128, 1)[:, :2048]
        return (q.float() * full).to(torch.bfloat16)

    assert torch.equal(naive(), fp8.dequantize(q, s))
    out = {}
    for label, fn, n in (("k2mini", lambda: fp8.dequantize(q, s), repeats), ("naive_torch", naive, 3)):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        dt = (time.perf_counter() - t) / n
        out[label] = {"seconds": dt, "fp8_gb_per_s": q.numel() / dt / 1e9}
    out["speedup"] = out["k2mini"]["fp8_gb_per_s"] / out["naive_torch"]["fp8_gb_per_s"]
    out["threads"] = torch.get_num_threads()
    return out


def _vm_hwm() -> int:
    """Peak RSS of this process image. (getrusage's ru_maxrss would include the parent's
    peak from before exec, so it cannot measure a child.)"""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def read_all(path: str) -> None:
    """Child process: read every tensor once, report peak RSS and sizes as JSON."""
    from k2mini.checkpoint.reader import Checkpoint

    base = _vm_hwm()
    ck = Checkpoint.open(path)
    largest_bf16 = max(t.numel * 2 for t in ck.tensors.values())
    t = time.perf_counter()
    for name in ck.weight_names():
        ck.read(name)
    dt = time.perf_counter() - t
    peak = _vm_hwm()
    print(json.dumps({"bytes": ck.total_bytes(), "tensors": len(ck.tensors), "seconds": dt, "peak_rss": peak,
                      "rss_after_imports": base, "largest_tensor_bf16": largest_bf16}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--fixture")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=12)
    ap.add_argument("--read-all", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.read_all:
        read_all(args.read_all)
        return

    results = {"dequant": dequant_throughput()}
    d = results["dequant"]
    print(f"dequant [7168, 2048]: k2mini {d['k2mini']['fp8_gb_per_s']:.2f} GB/s of FP8, "
          f"naive torch {d['naive_torch']['fp8_gb_per_s']:.2f} GB/s ({d['speedup']:.1f}x), {d['threads']} threads")

    with tempfile.TemporaryDirectory() as tmp:
        path = args.fixture
        if path is None:
            from k2mini.testing import build_fixture

            path = str(Path(tmp) / "real-dims")
            t = time.perf_counter()
            build_fixture(path, "real-dims", num_hidden_layers=args.layers, n_routed_experts=args.experts)
            print(f"built real-dims fixture ({args.layers} layers, {args.experts} experts) in {time.perf_counter() - t:.0f} s")
        child = subprocess.run([sys.executable, __file__, "--read-all", path], capture_output=True, text=True, check=True)
        r = json.loads(child.stdout.strip().splitlines()[-1])
    bound = 2 * r["largest_tensor_bf16"] + 500 * 2**20
    r["bound"] = bound
    r["within_bound"] = r["peak_rss"] < bound
    results["read_all"] = r
    print(f"read every tensor of {r['bytes'] / 2**30:.2f} GiB ({r['tensors']} tensors) in {r['seconds']:.1f} s "
          f"({r['bytes'] / r['seconds'] / 1e9:.2f} GB/s incl. dequant)")
    print(f"peak RSS {r['peak_rss'] / 2**20:.0f} MiB (after imports {r['rss_after_imports'] / 2**20:.0f} MiB); "
          f"bound 2 x largest tensor BF16 ({r['largest_tensor_bf16'] / 2**20:.0f} MiB) + 500 MiB = {bound / 2**20:.0f} MiB: "
          f"{'OK' if r['within_bound'] else 'EXCEEDED'}")
    out = Path(__file__).resolve().parents[1] / "analysis" / "results" / "bench_reader.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
