"""Peak RSS and time of quantizing a real-dims K2 fixture, next to convert's.

Each command runs in its own process; its peak RSS comes from ``os.wait4`` (the kernel's
ru_maxrss for exactly that child). Compared: importing the toolkit (the floor), ``convert
--dtype bf16`` (the streaming baseline), ``convert --dtype int4`` (FP8 -> BF16 -> INT4 in
one pass), ``quantize --bits 4`` and ``--bits 8`` straight from the FP8 source.

    k2mini fixture /tmp/rd3 --preset real-dims          # ~1 GB of FP8, K2 tensor shapes
    python scripts/bench_quantize.py /tmp/rd3 --work /tmp/bench-q
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from k2mini.checkpoint.reader import Checkpoint


def run(argv: list[str]) -> dict:
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(p.pid, 0)
    err = p.stderr.read().decode(errors="replace")
    p.stderr.close()
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({code}):\n{err[-2000:]}")
    return {"seconds": time.perf_counter() - t0, "peak_rss": usage.ru_maxrss * 1024}


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.glob("*.safetensors"))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("fixture", type=Path)
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    ck = Checkpoint.open(args.fixture)
    largest = max((t for t in ck.tensors.values()), key=lambda t: t.numel)
    src_bytes = ck.total_bytes()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    k2 = [sys.executable, "-m", "k2mini.cli"]
    conv = [*k2, "convert", "-s", str(args.fixture), "--no-progress"]
    cases = [
        ("import k2mini + torch + transformers", [sys.executable, "-c", "import k2mini.cli, transformers, compressed_tensors"], None),
        ("convert --dtype bf16", [*conv, "--dtype", "bf16", "-o", str(args.work / "bf16")], "bf16"),
        ("convert --dtype int4 (one pass)", [*conv, "--dtype", "int4", "-o", str(args.work / "cv-int4")], "cv-int4"),
        ("quantize --bits 4 (FP8 source)", [*k2, "quantize", str(args.fixture), "--bits", "4", "--quiet", "-o", str(args.work / "q4")], "q4"),
        ("quantize --bits 8 (FP8 source)", [*k2, "quantize", str(args.fixture), "--bits", "8", "--quiet", "-o", str(args.work / "q8")], "q8"),
    ]
    rows = []
    for label, argv, out in cases:
        r = run(argv)
        r.update(label=label, output_bytes=dir_bytes(args.work / out) if out else None)
        rows.append(r)
        if out and out != "bf16":
            shutil.rmtree(args.work / out)
    gib = 2**30
    print(f"fixture {args.fixture}: {len(ck.tensors)} tensors, {src_bytes / gib:.2f} GiB on disk; largest tensor "
          f"{largest.name} {list(largest.shape)} = {largest.numel * 2 / gib:.3f} GiB as BF16")
    base = next(r for r in rows if r["label"].startswith("convert --dtype bf16"))["peak_rss"]
    print(f"{'command':38s} {'peak RSS':>10s} {'vs convert bf16':>16s} {'seconds':>8s} {'output':>10s}")
    for r in rows:
        out = f"{r['output_bytes'] / gib:.2f} GiB" if r["output_bytes"] else "-"
        print(f"{r['label']:38s} {r['peak_rss'] / gib:8.2f} GiB {r['peak_rss'] / base:15.2f}x {r['seconds']:8.1f} {out:>10s}")
    if args.json:
        args.json.write_text(json.dumps({"fixture": str(args.fixture), "source_bytes": src_bytes, "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
