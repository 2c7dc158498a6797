"""validate on outputs of `k2mini convert-fast` (bf16 and fp8) and `k2mini quantize` (int4,
int8): every one passes; keeping everything matches the source exactly, pruning does not."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from k2mini.cli import cli

SMALL = ["--samples", "2", "--seq-len", "48", "--max-new-tokens", "4", "--quiet", "--json"]


def convert_fast(src, out, *args):
    res = CliRunner().invoke(cli, ["convert-fast", "-s", str(src), "-o", str(out), "--no-progress", *args])
    assert res.exit_code == 0, res.output
    return out


def validate_json(out, *args):
    res = CliRunner().invoke(cli, ["validate", str(out), *SMALL, *args])
    assert res.exit_code in (0, 1), res.output
    return res.exit_code, json.loads(res.stdout)


@pytest.fixture(scope="module")
def converted(tiny_fixture, aligned_fixture, tmp_path_factory):
    root = tmp_path_factory.mktemp("vconv")
    return {
        "full": convert_fast(tiny_fixture.path, root / "full"),
        "pruned": convert_fast(tiny_fixture.path, root / "pruned", "--layers", "3", "--experts", "4"),
        "fp8": convert_fast(aligned_fixture.path, root / "fp8", "--experts", "4", "--dtype", "fp8"),
        "root": root,
    }


def test_convert_bf16_keep_all_matches_source(tiny_fixture, converted):
    code, rep = validate_json(converted["full"], "--reference", str(tiny_fixture.path))
    assert code == 0 and rep["passed"]
    assert rep["reference"]["kl_mean"] < 1e-9 and rep["reference"]["top1_agreement"] == 1.0


def test_convert_bf16_pruned_passes_with_worse_numbers(tiny_fixture, converted):
    code, rep = validate_json(converted["pruned"], "--reference", str(tiny_fixture.path))
    assert code == 0 and rep["static"]["format"] == "bf16"
    assert rep["reference"]["kl_mean"] > 1e-3 and rep["reference"]["top1_agreement"] < 1.0
    assert len(rep["run"]["routers"]) == 2 and all(r["experts"] == 4 for r in rep["run"]["routers"])


def test_convert_fp8_passes(converted):
    code, rep = validate_json(converted["fp8"])
    assert code == 0, rep
    assert rep["static"]["format"] == "fp8"


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_convert_output_passes(converted, bits):
    from k2mini.quantize.run import QuantOptions, quantize_checkpoint

    out = converted["root"] / f"int{bits}"
    quantize_checkpoint(converted["pruned"], out, QuantOptions(bits, 32 if bits == 4 else None), progress=False)
    code, rep = validate_json(out)
    assert code == 0, rep
    assert rep["static"]["format"].startswith(f"compressed-tensors int{bits}")
