"""Every command that writes a reduced checkpoint (convert, quantize, heal) writes it through
one writer, so a K2-style tokenizer (``tiktoken.model`` plus its own code file named in
``tokenizer_config.json``'s ``auto_map``, as Kimi-K2 ships) loads from each output exactly as
from the source: the reference is transformers' AutoTokenizer on the source directory."""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from k2mini.checkpoint.reduced import companion_files
from k2mini.checkpoint.source import LocalSource
from k2mini.cli import cli

SAMPLE = "Kimi K2 is a model. It's 12345 tokens, DONE!\n\n  indented\tTAB  end"

# What Kimi-K2's tokenization_kimi.py is to transformers: a PreTrainedTokenizer over tiktoken
# ranks, found through auto_map and imported only with trust_remote_code=True.
TOKENIZER_CODE = '''
import tiktoken
from tiktoken.load import load_tiktoken_bpe
from transformers import PreTrainedTokenizer


class TikTokenTokenizer(PreTrainedTokenizer):
    vocab_files_names = {"vocab_file": "tiktoken.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(self, vocab_file, **kwargs):
        ranks = load_tiktoken_bpe(vocab_file)
        self.n = len(ranks)
        self.model = tiktoken.Encoding("kimi-style", pat_str=r"\\S+|\\s+", mergeable_ranks=ranks,
                                       special_tokens={"[BOS]": self.n, "[EOS]": self.n + 1})
        super().__init__(**kwargs)

    @property
    def vocab_size(self):
        return self.n + 2

    def get_vocab(self):
        return {str(i): i for i in range(self.vocab_size)}

    def _tokenize(self, text, **kwargs):
        return [str(i) for i in self.model.encode(text, allowed_special="all")]

    def _convert_token_to_id(self, token):
        return int(token)

    def _convert_id_to_token(self, index):
        return str(index)

    def convert_tokens_to_string(self, tokens):
        return self.model.decode([int(t) for t in tokens])
'''

LOAD = """
import json, sys
from transformers import AutoTokenizer
out = {}
for d in sys.argv[2:]:
    tok = AutoTokenizer.from_pretrained(d, trust_remote_code=True)
    out[d] = [type(tok).__name__, tok.encode(sys.argv[1]), tok.eos_token_id]
print(json.dumps(out))
"""


def invoke(*args) -> str:
    res = CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    return res.output


def write_ranks(path: Path, text: str) -> int:
    """Every byte, then every word of ``text`` and its prefixes (so BPE merges words whole)."""
    words = {w.encode() for w in text.split()}
    subs = {w[:i] for w in words for i in range(2, len(w) + 1)}
    ranks = [bytes([i]) for i in range(256)] + sorted(subs, key=lambda b: (len(b), b))
    path.write_text("".join(f"{base64.b64encode(b).decode()} {r}\n" for r, b in enumerate(ranks)))
    return len(ranks)


@pytest.fixture(scope="module")
def k2_style(tiny_fixture, tmp_path_factory):
    """The tiny checkpoint with a K2-style tokenizer, plus remote model code that must never travel."""
    src = tmp_path_factory.mktemp("k2tok") / "src"
    shutil.copytree(tiny_fixture.path, src)
    (src / "tokenizer.json").unlink()
    n = write_ranks(src / "tiktoken.model", SAMPLE)
    assert n + 2 <= json.loads((src / "config.json").read_text())["vocab_size"]
    (src / "tokenization_kimi.py").write_text(TOKENIZER_CODE)
    (src / "modeling_deepseek.py").write_text("raise RuntimeError('model code was imported')\n")
    tc = json.loads((src / "tokenizer_config.json").read_text())
    tc.update(tokenizer_class="TikTokenTokenizer", auto_map={"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]})
    (src / "tokenizer_config.json").write_text(json.dumps(tc, indent=2))
    return src


def test_companion_rule_keeps_the_tokenizer_code_and_drops_model_code(k2_style):
    copy, dropped = companion_files(LocalSource(k2_style), {"config.json"})
    assert {"tokenization_kimi.py", "tiktoken.model", "tokenizer_config.json"} <= set(copy)
    assert {"modeling_deepseek.py", "config.json"} <= set(dropped)
    assert not [f for f in copy if f.endswith(".safetensors")]


def test_k2_style_tokenizer_loads_from_convert_quantize_and_heal_outputs(k2_style, tmp_path):
    src = k2_style
    reduced, int4, healed, teacher = tmp_path / "reduced", tmp_path / "int4", tmp_path / "healed", tmp_path / "teacher"
    invoke("convert-fast", "-s", src, "--layers", "3", "--experts", "4", "-o", reduced, "--no-progress")
    invoke("quantize", reduced, "--bits", "4", "--group-size", "32", "-o", int4)
    invoke("teacher", "-s", src, "-o", teacher, "--samples", "4", "--seq-len", "16", "--top-k", "8", "--quiet")
    invoke("heal", reduced, "--teacher", teacher, "-o", healed, "--steps", "1", "--batch-size", "2", "--quiet")
    outputs = [reduced, int4, healed]
    for out in outputs:
        for f in ("tokenization_kimi.py", "tiktoken.model", "tokenizer_config.json"):
            assert (out / f).read_bytes() == (src / f).read_bytes(), f"{out.name}/{f}"
        assert not (out / "modeling_deepseek.py").exists(), out.name
    # The reference: the tokenizer files alone (the source's config.json names remote model
    # code, which the fixture makes raise).
    ref = tmp_path / "tokenizer-only"
    ref.mkdir()
    for f in ("tokenization_kimi.py", "tiktoken.model", "tokenizer_config.json"):
        shutil.copy(src / f, ref / f)
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"))
    res = subprocess.run([sys.executable, "-c", LOAD, SAMPLE, str(ref), *map(str, outputs)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout)
    want = got.pop(str(ref))
    assert want[0] == "TikTokenTokenizer" and len(want[1]) > 5 and want[2] is not None
    assert got == {str(o): want for o in outputs}
