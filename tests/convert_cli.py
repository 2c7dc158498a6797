"""Running convert through the CLI and loading its output in transformers, shared by the
convert test modules."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner

from k2mini.cli import cli


def run_cli(*args: str, ok: bool = True):
    res = CliRunner().invoke(cli, [*map(str, args)], catch_exceptions=False)
    if ok:
        assert res.exit_code == 0, res.output
    return res


def convert(cmd: str, src, out, *args) -> dict:
    """``k2mini CMD -s SRC -o OUT --json ARGS``; the summary it prints."""
    res = run_cli(cmd, "-s", src, "-o", out, "--json", "--no-progress", *args)
    return json.loads(res.stdout)


def load(out, dtype=torch.float32):
    """The output through AutoModelForCausalLM, with no missing, unexpected or mismatched keys."""
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(str(out), dtype=dtype, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), info
    assert info["mismatched_keys"] == set() and not info["error_msgs"], info
    return model.eval()
