"""The source checkpoint's tokenizer, loaded without running any code from the checkpoint.

K2 ships ``tiktoken.model`` (BPE ranks) plus remote code ``tokenization_kimi.py``; we never
import that file (no ``trust_remote_code``). A ``tokenizer.json`` is loaded with
``PreTrainedTokenizerFast``; a ``tiktoken.model`` is read as data by the tiktoken package,
with Kimi's pre-tokenization pattern written out here.
"""

from __future__ import annotations

import base64
import json
from typing import Protocol

from k2mini.checkpoint.reader import Checkpoint
from k2mini.errors import UsageError

# Kimi-K2's split pattern, as in tokenization_kimi.py (TikTokenTokenizer.pat_str).
KIMI_PATTERN = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)


class TextEncoder(Protocol):
    description: str
    eos_id: int | None

    def encode(self, text: str) -> list[int]: ...


class _HFEncoder:
    def __init__(self, tok, description: str):
        self.tok = tok
        self.description = description
        self.eos_id = tok.eos_token_id if tok.eos_token_id is not None else tok.convert_tokens_to_ids("[EOS]")
        if self.eos_id == tok.unk_token_id:
            self.eos_id = None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)


class _TiktokenEncoder:
    def __init__(self, enc, eos_id: int, description: str):
        self.enc = enc
        self.eos_id = eos_id
        self.description = description

    def encode(self, text: str) -> list[int]:
        return self.enc.encode(text, disallowed_special=())


def load_tokenizer(ck: Checkpoint) -> TextEncoder:
    """The checkpoint's tokenizer: tokenizer.json, else a Kimi tiktoken.model."""
    src = ck.source
    if src.exists("tokenizer.json"):
        from tokenizers import Tokenizer
        from transformers import PreTrainedTokenizerFast

        obj = Tokenizer.from_str(src.read_bytes("tokenizer.json").decode("utf-8"))
        eos = None
        if src.exists("tokenizer_config.json"):
            tc = json.loads(src.read_bytes("tokenizer_config.json"))
            eos = tc.get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
        tok = PreTrainedTokenizerFast(tokenizer_object=obj, eos_token=eos)
        return _HFEncoder(tok, f"{ck.description}/tokenizer.json")
    if src.exists("tiktoken.model"):
        try:
            import tiktoken
        except ImportError:
            raise UsageError(
                f"{ck.description}/tiktoken.model needs the tiktoken package to tokenize calibration text "
                "(pip install tiktoken); k2mini does not run the checkpoint's tokenization_kimi.py"
            ) from None
        ranks = {}
        for line in src.read_bytes("tiktoken.model").splitlines():
            if line.strip():
                tok_b64, rank = line.split()
                ranks[base64.b64decode(tok_b64)] = int(rank)
        # Kimi's special ids start right after the BPE ranks: [BOS] = n, [EOS] = n + 1.
        n = len(ranks)
        enc = tiktoken.Encoding(name="kimi_k2", pat_str=KIMI_PATTERN, mergeable_ranks=ranks,
                                special_tokens={"[BOS]": n, "[EOS]": n + 1})
        return _TiktokenEncoder(enc, n + 1, f"{ck.description}/tiktoken.model")
    raise UsageError(f"{ck.description}: no tokenizer.json or tiktoken.model to tokenize calibration text")

