"""convert benchmark on a real-dims fixture (K2 tensor shapes), measured in one run:

1. Wall time of `convert-fast` (fp8 pass-through and bf16 dequant) against
   (a) a plain sequential read of the same selected source bytes, in the same order, from a
       cold page cache (the source files are evicted with posix_fadvise DONTNEED first);
   (b) a plain write floor: the same number of bytes into files of the output's shard sizes,
       from one reused buffer, each file fsynced like convert's shards; once through the page
       cache (open/write/fsync) and once with O_DIRECT (+ fsync). The faster of the two is
       the floor: the least time any writer needs to make those bytes durable on this disk.
   (c) (a) and the O_DIRECT (b) at once, on two threads of one process: the least time a
       convert that overlaps its reads with its writes can take on this disk (max(read,
       write) if the device serves both at full speed, read + write if it shares one
       bandwidth between them).
   Printed: convert / read (targets: fp8 within 1.5x, bf16 within 2.5x) and convert /
   (read + write floor), the cost of convert beyond moving its bytes, and convert / (c). Each is timed inside
   its own process after imports; each convert is compared with the reads and floors taken
   just before and after it, and the load average is printed with every figure (the build
   machine is shared: the ratios are only as good as the load was steady). convert's time
   excludes Python imports (a dry run in the same process comes first) and includes
   planning, the fixed config, the model card and the commit.
2. Peak RSS (VmHWM of a fresh process) of each convert, against 2 x the largest output
   tensor + 500 MB, and the same on a fixture with half the layers (must not differ:
   doubling the layers must not grow memory).

    python scripts/bench_convert.py [--dir /tmp/k2mini-bench] [--layers 4] [--experts 4] [--no-double]

--layers 4 gives a 2.0 GB fixture (K2 shapes: dense layer 0, 3 MoE layers of 8 experts).

Fixtures are built under --dir (reused when present); outputs are removed after each run.
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


def _vm_hwm() -> int:
    # getrusage would include the parent's peak from before exec.
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM")


def evict(src: Path) -> None:
    for p in src.glob("*.safetensors"):
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _selected_ranges(src: str, experts: int) -> list[tuple[str, int, int]]:
    """(file, offset, length) of exactly the bytes convert selects, in its order."""
    from k2mini.checkpoint.reader import Checkpoint
    from k2mini.convert.pipeline import plan_jobs
    from k2mini.convert.transforms import TensorJob
    from k2mini.selection.build import build_plan
    from k2mini.selection.context import SelectOptions

    ck = Checkpoint.open(src)
    plan = build_plan(ck, SelectOptions(experts=experts))
    ranges = []
    for j in plan_jobs(ck, plan):
        t = ck.info(j.source)
        if j.rows is not None:
            rb = t.nbytes // t.shape[0]
            ranges += [(t.file, t.offset + r * rb, rb) for r in j.rows]
        else:
            ranges.append((t.file, t.offset, t.nbytes))
        s = ck.scale_of(j.source) if isinstance(j, TensorJob) and t.dtype == "F8_E4M3" else None
        if s is not None:
            ranges.append((s.file, s.offset, s.nbytes))
    return ranges


def _read_ranges(src: str, ranges: list[tuple[str, int, int]]) -> dict:
    buf = bytearray(max(n for _, _, n in ranges))
    mv = memoryview(buf)
    fds = {}
    t0 = time.perf_counter()
    total = 0
    for f, off, n in ranges:
        fd = fds.get(f) or fds.setdefault(f, os.open(Path(src) / f, os.O_RDONLY))
        done = 0
        while done < n:
            done += os.preadv(fd, [mv[done:n]], off + done)
        total += n
    return {"seconds": time.perf_counter() - t0, "bytes": total}


def child_read(src: str, experts: int) -> dict:
    """Plain sequential read of exactly the bytes convert selects, in its order."""
    ranges = _selected_ranges(src, experts)
    evict(Path(src))
    cpu0 = os.times()
    r = _read_ranges(src, ranges)
    cpu = os.times()
    return {**r, "cpu_seconds": cpu.user + cpu.system - cpu0.user - cpu0.system}


def child_read_write(src: str, experts: int, out: str, sizes: str) -> dict:
    """The plain read and the O_DIRECT write floor run at once, on two threads of one process.

    The least time any convert can take on this disk if reading and writing overlap as well
    as the device allows: max(read, write) where the device serves both streams at full
    speed, read + write where it has one bandwidth for both (measured on the build machine:
    see STATUS.md). Both calls release the GIL for the whole syscall.
    """
    import threading

    ranges = _selected_ranges(src, experts)
    evict(Path(src))
    res: dict = {}
    w = threading.Thread(target=lambda: res.update(write=child_write(out, sizes, "direct")))
    w.start()
    res["read"] = _read_ranges(src, ranges)
    w.join()
    # Not the time after join: that would include child_write removing its files.
    seconds = max(res["read"]["seconds"], res["write"]["seconds"])
    return {"seconds": seconds, "bytes": res["read"]["bytes"] + res["write"]["bytes"],
            "read_seconds": res["read"]["seconds"], "write_seconds": res["write"]["seconds"]}


def child_write(out: str, sizes: str, direct: str) -> dict:
    """Write files of the given sizes from one reused buffer, fsync each: a plain write floor."""
    from k2mini.checkpoint.direct_write import chunk_buffers

    # The same memory convert's writer uses (page-aligned, as O_DIRECT needs, on huge pages
    # where the kernel gives them: larger block requests), so the floor stays a floor.
    mapping, bufs = chunk_buffers()
    buf = bufs[0]
    chunk = len(buf)
    buf[:] = os.urandom(chunk)
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | (os.O_DIRECT if direct == "direct" else 0)
    d = Path(out)
    d.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    total = 0
    for k, n in enumerate(json.loads(sizes)):
        fd = os.open(d / f"floor-{k}", flags, 0o644)
        off = 0
        while off < n:
            # O_DIRECT writes whole aligned chunks; the tail is cut back with ftruncate.
            off += os.pwrite(fd, buf if direct == "direct" else memoryview(buf)[: min(chunk, n - off)], off)
        os.ftruncate(fd, n)
        os.fsync(fd)
        os.close(fd)
        total += n
    seconds = time.perf_counter() - t0
    for b in bufs:
        b.release()
    mapping.close()
    shutil.rmtree(d)
    return {"seconds": seconds, "bytes": total}


def child_convert(src: str, out: str, experts: int, dtype: str) -> dict:
    import torch

    from k2mini.checkpoint import fp8
    # The command's own code path without `k2mini.cli`, which imports every other command
    # too (transformers, compressed-tensors: ~160 MB more RSS that convert does not use).
    from k2mini.commands.convert import run

    q, sc = fp8.quantize(torch.randn(256, 256))
    fp8.dequantize(q, sc)  # load the compiled kernel
    kw = dict(source=src, output=Path(out), layers=None, experts=experts, top_k=None, dtype=dtype, groups=None, preset=None,
              max_shard_size="5GB", overwrite=False, resume=False, as_json=False, no_progress=True, layer_strategy=None,
              expert_strategy=None, fast=True)
    # run() imports what it needs lazily (the Hub client among them: ~300 modules, seconds
    # on a loaded machine): a dry run first, so the timed run is the work itself.
    import contextlib
    import importlib
    import io

    importlib.import_module("tqdm")  # the progress bar's import, also lazy
    with contextlib.redirect_stdout(io.StringIO()):
        run(dry_run=True, **kw)
    rss_before = _vm_hwm()
    evict(Path(src))
    cpu0 = os.times()
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        summary = run(dry_run=False, **kw)
    wall = time.perf_counter() - t0
    cpu = os.times()
    s = summary.model_dump()
    import json as _j

    idx = _j.loads((Path(out) / "model.safetensors.index.json").read_text())
    from k2mini.checkpoint.reader import Checkpoint

    largest = max(t.nbytes for t in Checkpoint.open(out).tensors.values())  # from the headers
    shard_sizes = [(Path(out) / f).stat().st_size for f in sorted(set(idx["weight_map"].values()))]
    return {"seconds": wall, "cpu_seconds": cpu.user + cpu.system - cpu0.user - cpu0.system, "shard_sizes": shard_sizes, "peak_rss": _vm_hwm(), "rss_after_imports": rss_before, "largest_tensor": largest, "written": s["total_size"],
            "selected": s["selected_source_bytes"], "bytes_read": s["bytes_read"]}


def run_child(*args) -> dict:
    load = os.getloadavg()[0]
    r = subprocess.run([sys.executable, __file__, "--child", *map(str, args)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(r.stderr[-3000:])
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["load"] = round((load + os.getloadavg()[0]) / 2, 2)  # 1-minute load average, before and after
    return out


def fixture(base: Path, layers: int) -> Path:
    src = base / f"real-dims-{layers}L"
    if not (src / "model.safetensors.index.json").exists():
        from k2mini.testing import build_fixture

        print(f"building real-dims fixture with {layers} layers in {src} ...", file=sys.stderr)
        shutil.rmtree(src, ignore_errors=True)
        build_fixture(src, "real-dims", num_hidden_layers=layers)
    return src


def bench(src: Path, base: Path, experts: int) -> dict:
    size = sum(p.stat().st_size for p in src.glob("*.safetensors"))
    # Not counted: the first cold read of a run was at times 1.6-3x slower than the next
    # ones, with 3-7x their CPU time (2.22 s / 1.8 s CPU, then 1.24 s / 0.7 s).
    warm_up = run_child("read", src, experts)
    res = {"fixture": str(src), "fixture_bytes": size, "warm_up_read": warm_up, "reads": [run_child("read", src, experts)]}
    for dtype in ("fp8", "bf16"):
        out = base / f"out-{dtype}"
        shutil.rmtree(out, ignore_errors=True)
        c = run_child("convert", src, out, experts, dtype)
        shutil.rmtree(out, ignore_errors=True)
        sizes = json.dumps(c["shard_sizes"])
        c["floor_direct"] = run_child("write", base / "floor", sizes, "direct")
        c["floor_buffered"] = run_child("write", base / "floor", sizes, "buffered")
        c["floor_read_write"] = run_child("readwrite", src, experts, base / "floor", sizes)
        res["reads"].append(run_child("read", src, experts))
        c["rss_bound"] = 2 * c["largest_tensor"] + 500 * 10**6
        res[dtype] = c
    # Each convert against the plain reads just before and after it (the machine may be
    # shared: adjacent measurements see about the same load).
    for k, dtype in enumerate(("fp8", "bf16")):
        c = res[dtype]
        c["plain_read_seconds"] = (res["reads"][k]["seconds"] + res["reads"][k + 1]["seconds"]) / 2
        c["write_floor_seconds"] = min(c["floor_direct"]["seconds"], c["floor_buffered"]["seconds"])
        c["ratio_vs_plain_read"] = c["seconds"] / c["plain_read_seconds"]
        c["ratio_vs_read_plus_write"] = c["seconds"] / (c["plain_read_seconds"] + c["write_floor_seconds"])
        c["ratio_vs_read_write_at_once"] = c["seconds"] / c["floor_read_write"]["seconds"]
    return res


def _rate(m: dict) -> str:
    cpu = f", {m['cpu_seconds']:.1f} s of CPU" if "cpu_seconds" in m else ""
    return f"{m['seconds']:.2f} s ({m['bytes'] / m['seconds'] / 1e6:.0f} MB/s, load {m['load']:.1f}{cpu})"


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        kind, *a = sys.argv[2:]
        if kind == "read":
            out = child_read(a[0], int(a[1]))
        elif kind == "write":
            out = child_write(*a)
        elif kind == "readwrite":
            out = child_read_write(a[0], int(a[1]), a[2], a[3])
        else:
            out = child_convert(a[0], a[1], int(a[2]), a[3])
        print(json.dumps(out))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/k2mini-bench"))
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=4, help="experts kept of the fixture's 8")
    ap.add_argument("--no-double", action="store_true", help="skip the run on a fixture with half the layers")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    args.dir.mkdir(parents=True, exist_ok=True)
    runs = [bench(fixture(args.dir, args.layers), args.dir, args.experts)]
    if not args.no_double:
        runs.insert(0, bench(fixture(args.dir, args.layers // 2), args.dir, args.experts))
    if args.json:
        print(json.dumps(runs, indent=1))
        return
    targets = {"fp8": 1.5, "bf16": 2.5}
    print(f"load average (1, 5, 15 min) at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())} on {os.cpu_count()} CPUs")
    for r in runs:
        reads = r["reads"]
        print(f"{r['fixture']} ({r['fixture_bytes'] / 1e9:.2f} GB), experts kept {args.experts}/8")
        print(f"  plain sequential read of the selected {reads[0]['bytes'] / 1e9:.2f} GB (cold cache): "
              + "; ".join(f"{w} {_rate(m)}" for w, m in zip(("first", "after fp8", "after bf16"), reads))
              + f" (a warm-up read before them, not counted: {_rate(r['warm_up_read'])})")
        for dtype in ("fp8", "bf16"):
            c = r[dtype]
            ok = "OK" if c["ratio_vs_plain_read"] <= targets[dtype] else "MISSED"
            rss_ok = "OK" if c["peak_rss"] <= c["rss_bound"] else "MISSED"
            print(f"  convert-fast --dtype {dtype}: {c['seconds']:.2f} s (load {c['load']:.1f}, {c['cpu_seconds']:.1f} s of CPU); wrote {c['written'] / 1e9:.2f} GB "
                  f"in {len(c['shard_sizes'])} shard(s); read {c['bytes_read'] / 1e9:.3f} GB for {c['selected'] / 1e9:.3f} GB "
                  f"selected ({c['bytes_read'] / c['selected']:.3f}x)")
            print(f"    write floor for {sum(c['shard_sizes']) / 1e9:.2f} GB, fsync per file: O_DIRECT {_rate(c['floor_direct'])}, "
                  f"page cache {_rate(c['floor_buffered'])}")
            print(f"    convert / plain read = {c['ratio_vs_plain_read']:.2f}x (target {targets[dtype]}x: {ok}); "
                  f"convert / (read + write floor {c['write_floor_seconds']:.2f} s) = {c['ratio_vs_read_plus_write']:.2f}x")
            rw = c["floor_read_write"]
            print(f"    read and O_DIRECT write at once (two threads, one process): {rw['seconds']:.2f} s (load {rw['load']:.1f}; "
                  f"read {rw['read_seconds']:.2f} s, write {rw['write_seconds']:.2f} s, {rw['bytes'] / rw['seconds'] / 1e6:.0f} MB/s "
                  f"both ways together); convert / that = {c['ratio_vs_read_write_at_once']:.2f}x; "
                  f"that / plain read = {rw['seconds'] / c['plain_read_seconds']:.2f}x (the least ratio any convert can reach here)")
            if rw["seconds"] / c["plain_read_seconds"] > targets[dtype]:
                print(f"    the {targets[dtype]}x target is out of reach on this disk in this run: merely reading and writing "
                      f"these bytes at once took {rw['seconds'] / c['plain_read_seconds']:.2f}x the plain read")
            print(f"    peak RSS {c['peak_rss'] / 1e6:.0f} MB vs bound {c['rss_bound'] / 1e6:.0f} MB "
                  f"(2 x largest tensor {c['largest_tensor'] / 1e6:.0f} MB + 500 MB): {rss_ok}; {c['rss_after_imports'] / 1e6:.0f} MB of it "
                  "is the process after imports")
    if len(runs) == 2:
        for dtype in ("fp8", "bf16"):
            a, b = runs[0][dtype]["peak_rss"], runs[1][dtype]["peak_rss"]
            print(f"peak RSS {dtype}: {a / 1e6:.0f} MB at {args.layers // 2} layers, {b / 1e6:.0f} MB at {args.layers} layers ({b / a:.2f}x)")


if __name__ == "__main__":
    main()
