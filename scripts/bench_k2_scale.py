"""The reference job at Kimi-K2's real scale, without its weights.

Builds a sparse checkpoint with K2's exact tensor table (configs/reference/kimi_k2_config.json:
61 layers x 384 experts, 139,583 tensors, 1.03 TB in 62 shards): every header is real, every
byte of tensor data is a hole in a sparse file (it reads as zeros and takes no disk). Then
runs, each in a fresh process, with its wall time and peak RSS:

  k2mini inspect SRC --json
  k2mini convert-fast -s SRC -o OUT --layers 24 --experts 16 --dtype fp8 --dry-run --json
  k2mini convert-fast -s SRC -o OUT --layers 24 --experts 16 --dtype fp8 --json
  k2mini validate OUT --gpu h100 --skip run --json

and compares the output's bytes with the memory plan of the same config cut to 24 x 16
(scripts/memory_plan_k2.py) and convert's peak RSS with 2 x its largest tensor + 500 MB.

Zero weights make every selection score tie (ties go to the lowest id) and dequantize to
zeros: this measures scale (139k tensors planned, bytes read and written, memory, time), not
quality. Needs about 26 GB free for the fp8 output; the source takes a few MB.

    python scripts/bench_k2_scale.py [--dir /tmp/k2-sparse] [--keep]
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
from k2mini.checkpoint.safetensors_format import PlannedTensor, encode_header
from k2mini.model.spec import ModelSpec

REFERENCE = Path(__file__).resolve().parents[1] / "configs" / "reference" / "kimi_k2_config.json"

# Runs the CLI and reports the process's own peak RSS on stderr at exit.
_CHILD = (
    "import atexit, resource, runpy, sys\n"
    "atexit.register(lambda: print('PEAK_RSS', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, file=sys.stderr))\n"
    "sys.argv = ['k2mini', *sys.argv[1:]]\n"
    "runpy.run_module('k2mini.cli', run_name='__main__')\n"
)


def build_sparse_k2(out: Path) -> dict:
    cfg = json.loads(REFERENCE.read_text())
    spec = ModelSpec.from_config(cfg)
    n_layers = int(cfg["num_hidden_layers"])
    shards: dict[str, list[PlannedTensor]] = {}
    n_files = n_layers + 1
    for t in spec.tensors():
        layer = t.name.split(".")[2] if t.name.startswith("model.layers.") else None
        k = int(layer) + 1 if layer is not None else n_files  # embeddings, final norm, lm_head last
        shards.setdefault(f"model-{k:05d}-of-{n_files:05d}.safetensors", []).append(PlannedTensor(t.name, t.dtype, t.shape))
    out.mkdir(parents=True, exist_ok=True)
    weight_map, total = {}, 0
    for name, tensors in sorted(shards.items()):
        header = encode_header(tensors)
        data = sum(t.nbytes for t in tensors)
        with open(out / name, "wb") as f:
            f.write(header)
            f.truncate(len(header) + data)  # the data is a hole
        weight_map.update({t.name: name for t in tensors})
        total += data
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return {"tensors": len(weight_map), "shards": len(shards), "tensor_bytes": total,
            "disk_bytes": sum(os.stat(p).st_blocks * 512 for p in out.iterdir())}


def run(args: list[str]) -> dict:
    t = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True)
    wall = time.perf_counter() - t
    peak = next(int(line.split()[1]) for line in r.stderr.splitlines() if line.startswith("PEAK_RSS"))
    report = json.loads(r.stdout) if r.stdout.strip().startswith("{") else None
    if r.returncode not in (0, 1) or report is None:
        raise SystemExit(f"k2mini {' '.join(args)} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return {"seconds": wall, "peak_rss": peak, "exit": r.returncode, "report": report}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/k2-sparse"))
    ap.add_argument("--keep", action="store_true", help="keep the converted output")
    ap.add_argument("--no-validate", action="store_true", help="skip validate (3-4 minutes: it scans all 25 GB)")
    a = ap.parse_args()
    src, out = a.dir / "src", a.dir / "k2-24x16-fp8"
    shutil.rmtree(out, ignore_errors=True)
    t = time.perf_counter()
    built = build_sparse_k2(src) if not (src / "model.safetensors.index.json").exists() else None
    if built:
        print(f"sparse K2 source: {built['tensors']:,} tensors in {built['shards']} shards, {built['tensor_bytes'] / 1e12:.3f} TB "
              f"of tensor data, {built['disk_bytes'] / 1e6:.1f} MB on disk, built in {time.perf_counter() - t:.1f} s")

    ins = run(["inspect", str(src), "--json"])
    print(f"inspect: {ins['seconds']:.1f} s, peak RSS {ins['peak_rss'] / 1e6:.0f} MB; {ins['report']['params']:,} parameters, "
          f"{ins['report'].get('n_tensors', ins['report'].get('tensors', '?'))} tensors")

    reduce = ["convert-fast", "-s", str(src), "-o", str(out), "--layers", "24", "--experts", "16", "--dtype", "fp8", "--json"]
    dry = run([*reduce, "--dry-run"])
    print(f"convert-fast --dry-run: {dry['seconds']:.1f} s, peak RSS {dry['peak_rss'] / 1e6:.0f} MB; "
          f"planned {dry['report']['total_size'] / 1e9:.2f} GB, {dry['report']['bytes_to_read'] / 1e9:.2f} GB to read")

    conv = run([*reduce, "--no-progress"])
    s = conv["report"]
    written = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    largest = max(t.nbytes for t in Checkpoint.open(out).tensors.values())  # from the headers
    bound = 2 * largest + 500 * 10**6
    print(f"convert-fast --dtype fp8: {conv['seconds']:.1f} s, peak RSS {conv['peak_rss'] / 1e6:.0f} MB "
          f"(bound 2 x largest tensor {largest / 1e6:.0f} MB + 500 MB = {bound / 1e6:.0f} MB: "
          f"{'OK' if conv['peak_rss'] <= bound else 'OVER'}); read {s['bytes_read'] / 1e9:.2f} GB for "
          f"{s['selected_source_bytes'] / 1e9:.2f} GB selected ({s['bytes_read'] / s['selected_source_bytes']:.3f}x); "
          f"wrote {written / 1e9:.2f} GB in {len(list(out.glob('*.safetensors')))} shards (planned {dry['report']['total_size'] / 1e9:.2f} GB)")

    from k2mini.validate.memory import reduced_config, weights_from_config

    planned = sum(weights_from_config(reduced_config(json.loads(REFERENCE.read_text()), 24, 16), "fp8").values())
    print(f"the config cut to 24 x 16, from the config alone: fp8 tensor bytes {planned / 1e9:.2f} GB; "
          f"written {written / 1e9:.2f} GB (with headers)")

    if a.no_validate:
        if not a.keep:
            shutil.rmtree(out)
        return
    val = run(["validate", str(out), "--gpu", "h100", "--skip", "run", "--json", "--quiet"])
    rep = val["report"]
    m = rep["memory"]
    print(f"validate --gpu h100 --skip run: exit {val['exit']} (passed: {rep['passed']}), {val['seconds']:.1f} s, "
          f"peak RSS {val['peak_rss'] / 1e6:.0f} MB; {rep['static']['tensors_scanned']:,} tensors, "
          f"{rep['static']['bytes_scanned'] / 1e9:.2f} GB scanned")
    print(f"  memory plan on {m['gpu']}: weights {m['weights_bytes'] / 2**30:.2f} GiB; needed {m['needed_latent_bytes'] / 2**30:.2f} GiB "
          f"with the MLA latent cache at {m['kv']['context']} tokens (fits: {m['fits_latent']}), "
          f"{m['needed_expanded_bytes'] / 2**30:.2f} GiB expanded (fits: {m['fits_expanded']}), of {m['memory_bytes'] / 2**30:.2f} GiB")
    counts: dict[tuple[str, str], int] = {}
    for f in rep["static"]["findings"]:
        counts[(f["severity"], f["check"])] = counts.get((f["severity"], f["check"]), 0) + 1
    for (sev, check), n in sorted(counts.items()):
        example = next(f["message"] for f in rep["static"]["findings"] if f["check"] == check)
        print(f"  {sev} {check} x{n}: {example[:160]}")
    if not a.keep:
        shutil.rmtree(out)


if __name__ == "__main__":
    main()
