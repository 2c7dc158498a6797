"""Train/test text of two domains (English prose, Python source) for the nano model.

Documents are split deterministically (every ``test_every``-th document is held out), so
train and test never share a document; each split is tokenized once into one token stream
per domain, documents separated by EOS.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from k2mini.testing.tokenizer import SPECIAL_TOKENS, train_tokenizer
from k2mini.textdata import code_corpus, prose_corpus, split_documents

DOMAINS = {"prose": prose_corpus, "code": code_corpus}
EOS = SPECIAL_TOKENS.index("[EOS]")


@dataclass
class DomainData:
    train: dict[str, torch.Tensor]  # domain -> 1-D int64 token stream
    test: dict[str, torch.Tensor]
    vocab_size: int


@functools.cache
def tokenizer(vocab_size: int):
    return train_tokenizer(vocab_size)


def _stream(tok, docs: list[str]) -> torch.Tensor:
    ids: list[int] = []
    for enc in tok.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(EOS)
    return torch.tensor(ids, dtype=torch.long)


def load(vocab_size: int, test_every: int = 10) -> DomainData:
    tok = tokenizer(vocab_size)
    train, test = {}, {}
    for name, corpus in DOMAINS.items():
        docs = split_documents(corpus())
        train[name] = _stream(tok, [d for i, d in enumerate(docs) if i % test_every != test_every - 1])
        test[name] = _stream(tok, [d for i, d in enumerate(docs) if i % test_every == test_every - 1])
    return DomainData(train, test, tok.get_vocab_size())


def windows(stream: torch.Tensor, seq_len: int, n: int | None = None, offset: int = 0) -> torch.Tensor:
    """Consecutive non-overlapping windows [n, seq_len] starting at ``offset``."""
    avail = (len(stream) - offset) // seq_len
    n = avail if n is None else min(n, avail)
    return stream[offset : offset + n * seq_len].view(n, seq_len)


def random_windows(stream: torch.Tensor, seq_len: int, n: int, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - seq_len, (n,), generator=gen)
    return torch.stack([stream[s : s + seq_len] for s in starts.tolist()])


def unigram_perplexity(train: torch.Tensor, test: torch.Tensor, vocab_size: int) -> float:
    """Perplexity of an add-one-smoothed unigram model fitted on ``train``."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1.0
    logp = counts.log() - counts.sum().log()
    return float(torch.exp(-logp[test].mean()))
