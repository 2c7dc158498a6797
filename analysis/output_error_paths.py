"""Check that ``k2mini analyze`` and the selection study order experts identically by output error.

The study (k2mini/nano/study.py) computes each MoE layer's elimination order from the whole
in-memory nano model; analyze computes it layer-streamed from the checkpoint, one expert's
weights at a time. Both call analysis.output_error.elimination_order; this feeds analyze the
study's calibration tokens (8 windows x 64 = 512, analyze's default --output-error-tokens, so
no sampling) and counts the layers whose orders are equal.

  python analysis/output_error_paths.py --regimes balanced,unbalanced --seeds 0,1
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import click
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import study_selection as SS  # noqa: E402

from k2mini.analysis.analyze import AnalyzeOptions, analyze  # noqa: E402
from k2mini.analysis.calibration import CalibrationSet  # noqa: E402
from k2mini.analysis.schema import CalibrationInfo, CalibrationSource  # noqa: E402
from k2mini.checkpoint.reader import Checkpoint  # noqa: E402
from k2mini.nano import data  # noqa: E402
from k2mini.nano import study as S  # noqa: E402


@click.command()
@click.option("--root", type=click.Path(path_type=Path), default=Path("/work/nano_k2"), show_default=True)
@click.option("--regimes", default="balanced,unbalanced", show_default=True)
@click.option("--seeds", default="0", show_default=True, help="Calibration seeds, comma-separated (the study's).")
@click.option("--windows", default=8, show_default=True)
@click.option("--seq-len", default=64, show_default=True)
def main(root, regimes, seeds, windows, seq_len):
    torch.set_num_threads(1)
    for regime in regimes.split(","):
        model, cfg = S.load_nano(root / regime)
        dd = data.load(cfg["vocab_size"])
        for seed in map(int, seeds.split(",")):
            ids = SS.calib_ids(dd, "mix", windows, seq_len, seed)
            study = S.calibrate(model, ids, layer_metrics=False)
            info = CalibrationInfo(sources=[CalibrationSource(name="study", samples=windows)], samples=windows,
                                   seq_len=seq_len, seed=seed, tokens=ids.numel())
            with tempfile.TemporaryDirectory() as work:
                a = analyze(Checkpoint.open(str(root / regime)), CalibrationSet(ids, info), AnalyzeOptions(progress=False),
                            work_dir=Path(work) / "w")
            equal = [l for l, st in study.experts.items() if a.layers[l].experts.output_error_order == st.output_error_order]
            print(f"{regime} seed {seed}: {a.output_error_tokens} tokens, {len(equal)}/{len(study.experts)} MoE layers "
                  f"with equal output-error orders", flush=True)


if __name__ == "__main__":
    main()
