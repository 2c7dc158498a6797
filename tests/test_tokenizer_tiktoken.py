"""Kimi-K2 ships ``tiktoken.model`` and no tokenizer.json: analyze tokenizes calibration text
with the tiktoken package and Kimi's split pattern, never with the checkpoint's
tokenization_kimi.py. The reference for the split is the ``regex`` module running the same
pattern (an independent engine: tiktoken's is Rust's fancy-regex)."""

from __future__ import annotations

import base64
import json
import shutil

import pytest
import regex
from click.testing import CliRunner

from k2mini.analysis.calibration import build_calibration
from k2mini.analysis.tokenizer import KIMI_PATTERN, load_tokenizer
from k2mini.checkpoint.reader import Checkpoint
from k2mini.cli import cli


# Han and Latin runs, a contraction, digits in groups of at most three, punctuation, blank
# lines, tabs and trailing spaces: each alternative of the pattern is used.
SAMPLE = "Kimi K2 是一个模型。It's 12345 tokens, DONE!\n\n  indented\tTAB  end"


def kimi_pieces(text: str) -> list[str]:
    return regex.findall(KIMI_PATTERN, text, flags=regex.V1)


def write_tiktoken_model(path, texts: list[str]) -> int:
    """Every byte, then every substring (2+ bytes) of the pattern's pieces of ``texts``, shortest
    first: BPE can then merge each piece into exactly one token, so tokens show the split."""
    subs = set()
    for t in texts:
        for piece in kimi_pieces(t):
            b = piece.encode()
            subs |= {b[i:j] for i in range(len(b)) for j in range(i + 2, len(b) + 1)}
    ranks = [bytes([i]) for i in range(256)] + sorted(subs, key=lambda b: (len(b), b))
    path.write_text("".join(f"{base64.b64encode(b).decode()} {r}\n" for r, b in enumerate(ranks)))
    return len(ranks)


@pytest.fixture
def kimi_style(tiny_fixture, tmp_path):
    """The tiny checkpoint with Kimi's tokenizer files instead of tokenizer.json; importing the
    remote code file would raise."""
    src = tmp_path / "k2"
    shutil.copytree(tiny_fixture.path, src)
    (src / "tokenizer.json").unlink()
    (src / "tokenization_kimi.py").write_text("raise RuntimeError('remote code was imported')\n")
    n = write_tiktoken_model(src / "tiktoken.model", [SAMPLE])
    assert n + 2 <= json.loads((src / "config.json").read_text())["vocab_size"]
    return src, n


def test_tiktoken_model_splits_text_like_the_kimi_pattern(kimi_style):
    src, n = kimi_style
    enc = load_tokenizer(Checkpoint.open(src))
    assert enc.description.endswith("/tiktoken.model")
    ids = enc.encode(SAMPLE)
    pieces = kimi_pieces(SAMPLE)
    assert [enc.enc.decode_single_token_bytes(i) for i in ids] == [p.encode() for p in pieces]
    # The reference split is not trivial: Han apart from Latin, digits in threes.
    assert "是一个模型" in pieces and "123" in pieces and "45" in pieces and " K" in pieces
    assert max(ids) < n


def test_eos_follows_the_ranks_and_special_text_stays_text(kimi_style):
    src, n = kimi_style
    enc = load_tokenizer(Checkpoint.open(src))
    # Kimi numbers [BOS] and [EOS] right after the BPE ranks (K2: 163584 ranks, eos_token_id 163585).
    assert enc.eos_id == n + 1
    assert n + 1 not in enc.encode("[EOS]") and n not in enc.encode("[BOS]")


def test_analyze_runs_on_a_kimi_style_tokenizer(kimi_style, tmp_path):
    src, n = kimi_style
    calib = build_calibration(load_tokenizer(Checkpoint.open(src)), samples=2, seq_len=16, seed=0)
    assert int(calib.input_ids.max()) <= n + 1 < json.loads((src / "config.json").read_text())["vocab_size"]
    out = tmp_path / "analysis.json"
    r = CliRunner().invoke(cli, ["analyze", "-s", str(src), "-o", str(out), "--samples", "2", "--seq-len", "16",
                                 "--no-plots", "-q", "--no-output-error"])
    assert r.exit_code == 0, r.output
    assert json.loads(out.read_text())["layers"]
