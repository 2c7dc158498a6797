"""Convert-fast straight from a (loopback) Hub repo: bytes fetched vs kept vs repo total, requests, time.

Serves a K2-format fixture through tests/hub_server.py (the Hub's resolve / model-info / tree
endpoints, optional CDN redirect and per-request latency), runs ``k2mini convert-fast`` from
disk and from the repo id, and prints what crossed the wire. With a latency, the Hub runs are
timed once with one connection and once with the default K2MINI_HUB_CONNECTIONS, and
``--analyze`` times ``k2mini analyze`` from the repo the same two ways. Everything is measured
in this run.

    python scripts/bench_hub_fetch.py --layers 12 --experts 32 --keep-layers 3 --keep-experts 4 --latency 0.05 --cdn --analyze
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

from click.testing import CliRunner
from huggingface_hub import constants

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from hub_server import FakeHub  # noqa: E402

from k2mini.checkpoint.hub import CONNECTIONS  # noqa: E402
from k2mini.checkpoint.reader import _HEADER_PROBE, Checkpoint  # noqa: E402
from k2mini.cli import cli  # noqa: E402
from k2mini.testing import build_fixture  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--keep-layers", type=int, default=3)
    ap.add_argument("--keep-experts", type=int, default=4)
    ap.add_argument("--latency", type=float, default=0.0, help="seconds the server waits before each answer")
    ap.add_argument("--cdn", action="store_true", help="redirect ranged GETs to a signed-URL origin, as the Hub does")
    ap.add_argument("--analyze", action="store_true", help="also time analyze (2 samples of 16 tokens) from the repo")
    a = ap.parse_args()

    tmp = Path(tempfile.mkdtemp(prefix="bench_hub_"))
    src = tmp / "src"
    build_fixture(src, "tiny", num_hidden_layers=a.layers, n_routed_experts=a.experts, vocab_size=256, n_shards=6, from_model=False)
    repo_bytes = sum(p.stat().st_size for p in src.iterdir())
    reduce = ["--layers", str(a.keep_layers), "--experts", str(a.keep_experts), "--no-progress", "--json"]
    # The first run pays for imports and numba compilation; time the second.
    for out in ("warm-up", "disk"):
        t = time.perf_counter()
        r = CliRunner().invoke(cli, ["convert-fast", "-s", str(src), "-o", str(tmp / out), *reduce])
        assert r.exit_code == 0, r.output
        disk_s = time.perf_counter() - t
    with FakeHub() as hub:
        hub.add("org/bench", src)
        hub.latency, hub.cdn = a.latency, a.cdn
        constants.ENDPOINT = hub.endpoint
        constants.HUGGINGFACE_CO_URL_TEMPLATE = hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        constants.HF_HUB_OFFLINE = False
        timings: dict[str, dict[int, float]] = {"convert-fast": {}, "analyze": {}}
        for conns in (1, CONNECTIONS) if a.latency else (CONNECTIONS,):
            os.environ["K2MINI_HUB_CONNECTIONS"] = str(conns)
            if a.analyze:
                # A fresh Hub cache per run, so each downloads the small files too.
                constants.HF_HUB_CACHE = str(tmp / f"hf_cache-analyze-{conns}")
                t = time.perf_counter()
                r = CliRunner().invoke(cli, ["analyze", "-s", "org/bench", "-o", str(tmp / f"a-{conns}.json"), "--samples", "2",
                                             "--seq-len", "16", "--no-plots", "-q"])
                assert r.exit_code == 0, r.output
                timings["analyze"][conns] = time.perf_counter() - t
            constants.HF_HUB_CACHE = str(tmp / f"hf_cache-convert-{conns}")
            hub.reset_counts()
            t = time.perf_counter()
            r = CliRunner().invoke(cli, ["convert-fast", "-s", "org/bench", "-o", str(tmp / f"hub-{conns}"), *reduce])
            assert r.exit_code == 0, r.output
            timings["convert-fast"][conns] = time.perf_counter() - t
        s = json.loads(r.output)
        shard_files = [f for f in hub.sent if f.endswith(".safetensors")]
        shard_sent = sum(hub.sent[f] for f in shard_files)
        probes = sum(min(_HEADER_PROBE, (src / f).stat().st_size) for f in shard_files)
        small = sum(hub.sent[f] for f in hub.sent if f not in shard_files)
        ranged = sum(1 for _, _, rng in hub.requests if rng)
        same = all(
            (tmp / "disk" / p.name).read_bytes() == p.read_bytes()
            for p in (tmp / f"hub-{CONNECTIONS}").iterdir()
            if p.suffix == ".safetensors" or p.name.endswith(".index.json")
        )
    kept = s["selected_source_bytes"]
    print(f"fixture          {a.layers} layers x {a.experts} experts, repo {repo_bytes:,} B, tensors {Checkpoint.open(src).total_bytes():,} B")
    print(f"reduction        {a.keep_layers} layers x {a.keep_experts} experts, kept tensor bytes {kept:,} ({kept / repo_bytes:.1%} of repo)")
    print(f"sent by server   {hub.total_sent():,} B = shards {shard_sent:,} + small files {small:,}")
    print(f"(shard bytes - header probes {probes:,}) / kept tensor bytes = {(shard_sent - probes) / kept:.3f} "
          "(scoring inputs included)")
    print(f"requests         {len(hub.requests)} ({ranged} ranged), latency {a.latency * 1e3:.0f} ms, cdn {a.cdn}")
    print(f"output           shards + index byte-identical to the disk run: {same}")
    print(f"convert-fast     disk {disk_s:.2f} s; " + ", ".join(f"hub with {c} connection(s) {v:.2f} s" for c, v in timings["convert-fast"].items()))
    for cmd, ts in timings.items():
        if len(ts) == 2:
            one, many = ts[1], ts[CONNECTIONS]
            print(f"{cmd:<16} hub {one:.2f} s with 1 connection, {many:.2f} s with {CONNECTIONS}: {one / many:.1f}x faster")


if __name__ == "__main__":
    main()
