"""Peak memory of ``k2mini analyze`` does not grow with the number of layers.

Builds two real-dims fixtures (Kimi-K2 tensor shapes: hidden 7168, MLA, 2048-wide experts),
one with N layers and one with 2N, runs ``analyze`` on each in a fresh process and prints
both peak RSS figures, their ratio, and the memory a whole-model load would need.

    python scripts/bench_analyze_memory.py [--layers 3] [--samples 2] [--seq-len 64] [--workdir DIR]

Writes analysis/results/bench_analyze_memory.json. Goal: ratio <= 1.10.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import json, resource, sys, time
from k2mini.checkpoint.reader import Checkpoint
from k2mini.analysis.analyze import AnalyzeOptions, analyze
from k2mini.analysis.calibration import build_calibration
from k2mini.analysis.tokenizer import load_tokenizer
src, work, samples, seq_len = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ck = Checkpoint.open(src)
calib = build_calibration(load_tokenizer(ck), samples=samples, seq_len=seq_len, seed=0)
t = time.perf_counter()
a = analyze(ck, calib, AnalyzeOptions(progress=False), work_dir=work)
dt = time.perf_counter() - t
print(json.dumps({"peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "seconds": dt,
                  "bytes_read": ck.source.bytes_read, "checkpoint_bytes": ck.total_bytes(),
                  "layers": len(a.layers), "tokens": calib.info.tokens}))
"""


def measure(src: Path, work: Path, samples: int, seq_len: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(src), str(work), str(samples), str(seq_len)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=3)
    ap.add_argument("--samples", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--workdir", type=Path, default=None, help="Keep fixtures here (reused when present).")
    ap.add_argument("--out", type=Path, default=Path("analysis/results/bench_analyze_memory.json"))
    args = ap.parse_args()

    from k2mini.model.spec import ModelSpec
    from k2mini.testing.fixtures import build_fixture

    tmp = None
    root = args.workdir
    if root is None:
        tmp = tempfile.TemporaryDirectory(prefix="k2mini-bench-")
        root = Path(tmp.name)
    results = {}
    for n in (args.layers, 2 * args.layers):
        src = root / f"real-dims-{n}"
        if not (src / "config.json").is_file():
            t = time.perf_counter()
            build_fixture(src, "real-dims", num_hidden_layers=n)
            print(f"built {src} in {time.perf_counter() - t:.0f}s", file=sys.stderr)
        cfg = json.loads((src / "config.json").read_text())
        r = measure(src, root / f"work-{n}", args.samples, args.seq_len)
        r["whole_model_bf16_bytes"] = ModelSpec.from_config(cfg).param_count() * 2
        results[str(n)] = r
        print(f"{n} layers: peak RSS {r['peak_rss_bytes'] / 2**30:.2f} GiB, read {r['bytes_read'] / 2**30:.2f} of "
              f"{r['checkpoint_bytes'] / 2**30:.2f} GiB on disk, {r['seconds']:.0f}s; whole model in BF16 would be "
              f"{r['whole_model_bf16_bytes'] / 2**30:.2f} GiB (x2 in float32)")
    a, b = results[str(args.layers)], results[str(2 * args.layers)]
    ratio = b["peak_rss_bytes"] / a["peak_rss_bytes"]
    print(f"peak RSS ratio {2 * args.layers} layers / {args.layers} layers = {ratio:.3f} (goal <= 1.10)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"samples": args.samples, "seq_len": args.seq_len, "runs": results, "ratio": ratio}, indent=1) + "\n")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
