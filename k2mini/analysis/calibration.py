"""Calibration data: named text sources, tokenized and cut into equal-length samples.

A source spec is ``[NAME=]WHAT`` where WHAT is ``builtin`` (prose + code mix),
``builtin:prose``, ``builtin:code``, a text file (documents separated by blank lines) or a
``.jsonl`` file (one JSON object per line with a ``text`` field; ``FILE.jsonl:FIELD`` picks
another field). Samples are split evenly across sources, because the calibration domain
decides which experts look important (REAP): a mix should be explicit and recorded.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from k2mini.analysis.schema import CalibrationInfo, CalibrationSource
from k2mini.analysis.tokenizer import TextEncoder
from k2mini.errors import UsageError
from k2mini.textdata import code_corpus, prose_corpus, split_documents

BUILTIN = {"builtin:prose": prose_corpus, "builtin:code": code_corpus}


@dataclass(frozen=True)
class SourceSpec:
    name: str
    what: str  # builtin:prose | builtin:code | a path (optionally "path.jsonl:field")

    @classmethod
    def parse(cls, spec: str) -> list[SourceSpec]:
        name, sep, what = spec.partition("=")
        if not sep:
            name, what = "", spec
        what = what.strip()
        if what == "builtin":
            return [cls(f"{name}:prose" if name else "builtin:prose", "builtin:prose"),
                    cls(f"{name}:code" if name else "builtin:code", "builtin:code")]
        if not what:
            raise UsageError(f"--calib {spec!r}: empty source")
        return [cls(name or what, what)]

    def documents(self) -> list[str]:
        if self.what in BUILTIN:
            return split_documents(BUILTIN[self.what]())
        path, field = self.what, "text"
        if ".jsonl:" in self.what:
            path, _, field = self.what.rpartition(":")
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"--calib {self.what}: file not found (expected builtin, builtin:prose, builtin:code, a .txt or a .jsonl file)")
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise UsageError(f"--calib {path}: not UTF-8 text ({exc})") from None
        if p.suffix == ".jsonl":
            docs = []
            for n, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except ValueError as exc:
                    raise UsageError(f"--calib {path}: line {n} is not JSON ({exc})") from None
                if not isinstance(obj, dict) or not isinstance(obj.get(field), str):
                    raise UsageError(f"--calib {path}: line {n} has no string field {field!r}")
                docs.append(obj[field])
            return docs
        return split_documents(text)


@dataclass
class CalibrationSet:
    input_ids: torch.Tensor  # [samples, seq_len] int64
    info: CalibrationInfo


def build_calibration(
    tokenizer: TextEncoder, specs: list[str] | None = None, *, samples: int = 32, seq_len: int = 512, seed: int = 0
) -> CalibrationSet:
    """``samples`` windows of ``seq_len`` tokens, split evenly across the named sources.

    Each source's documents are shuffled (seeded), tokenized in that order and joined with
    EOS until there are enough tokens for its windows, then cut into consecutive windows:
    only as much text as needed is tokenized, and no two samples overlap.
    """
    if samples < 1 or seq_len < 2:
        raise UsageError(f"--samples must be >= 1 and --seq-len >= 2 (got {samples}, {seq_len})")
    sources = [s for spec in (specs or ["builtin"]) for s in SourceSpec.parse(spec)]
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise UsageError(f"--calib: source names must be distinct, got {names}")
    if samples < len(sources):
        raise UsageError(f"--samples {samples} is fewer than the {len(sources)} calibration sources")
    share = [samples // len(sources) + (i < samples % len(sources)) for i in range(len(sources))]
    rng = random.Random(seed)
    rows, described = [], []
    for src, n in zip(sources, share):
        docs = [d for d in src.documents() if d.strip()]
        if not docs:
            raise UsageError(f"--calib {src.what}: no text in it")
        rng.shuffle(docs)
        need = n * seq_len
        stream: list[int] = []
        for doc in docs:
            stream.extend(tokenizer.encode(doc))
            if tokenizer.eos_id is not None:
                stream.append(tokenizer.eos_id)
            if len(stream) >= need:
                break
        if len(stream) < need:
            raise UsageError(
                f"--calib {src.what}: only {len(stream)} tokens, need {need} for {n} samples of --seq-len {seq_len}"
            )
        rows.extend(stream[i * seq_len : (i + 1) * seq_len] for i in range(n))
        described.append(CalibrationSource(name=src.name, samples=n))
    ids = torch.tensor(rows, dtype=torch.long)
    info = CalibrationInfo(sources=described, samples=samples, seq_len=seq_len, seed=seed, tokens=ids.numel())
    return CalibrationSet(ids, info)
