"""The teacher cache: what the unpruned model predicts at every corpus position, on disk.

A cache is a directory of block shards plus ``manifest.json``. A block is a run of whole
sequences computed together in one layer sweep; it is the unit of work, of resume and of
distribution (a rank computes whole blocks), so a block's bytes do not depend on who
computed it or when. Each shard is a safetensors file with, for its ``n`` sequences of
``L`` tokens and the cache's ``k``:

==================  =============  =======  ===============================================
tensor              shape          dtype    what
==================  =============  =======  ===============================================
``input_ids``       [n, L]         int32    the corpus tokens
``topk_ids``        [n, L, k]      int32    the teacher's k most likely next tokens, best first
``topk_logprobs``   [n, L, k]      float16  their log-probabilities: log-softmax of the *full*
                                            logits, not renormalised over the k
``logsumexp``       [n, L]         float32  log-sum-exp of the full logits (optional, below)
==================  =============  =======  ===============================================

The tail mass ``1 - sum(exp(topk_logprobs))`` is therefore exact up to the float16
rounding of the kept log-probs, with or without ``logsumexp``: the log-probs are already
normalised over the full vocabulary, and that is all the heal loss reads (heal/loss.py).
``logsumexp`` recovers the teacher's raw logits from its log-probs; the layer-streamed
engine has it, vLLM does not return it (its ``raw_logprobs`` are log-softmax of the full
logits, the normaliser itself is not given), so a vLLM cache has no such tensor and its
manifest says ``"logsumexp": false``. Per token: 8 + 6k bytes (392 B at k = 64), 4 + 6k
without the log-sum-exp. float16 keeps about 3 significant digits: a log-prob of -10 is
stored within 0.004 nats, far below what a distillation loss resolves.

The manifest's ``compute`` says how the cache was produced, not what it means: the engine
(``layerwise`` or ``vllm``), its version and its device, dtype or parallel layout.

``TeacherCache`` is the reader ``heal`` trains from: random access by sequence index, each
shard's sha256 checked against the manifest before its first use.
"""

from __future__ import annotations

import bisect
import hashlib
import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from pydantic import BaseModel

from k2mini.analysis.schema import CalibrationInfo, SourceFingerprint
from k2mini.checkpoint.writer import write_file
from k2mini.errors import UsageError
from k2mini.versioned_file import load_versioned

MANIFEST = "manifest.json"
CACHE_VERSION = 1
SHARD_CACHE_BYTES = 1 << 30
TENSORS = {"input_ids": torch.int32, "topk_ids": torch.int32, "topk_logprobs": torch.float16, "logsumexp": torch.float32}


def bytes_per_token(k: int, logsumexp: bool = True) -> int:
    return 4 + 4 * logsumexp + k * (4 + 2)


def tensors(logsumexp: bool) -> dict[str, torch.dtype]:
    """The tensors of a shard, by name: all of TENSORS, or all but ``logsumexp``."""
    return {n: t for n, t in TENSORS.items() if logsumexp or n != "logsumexp"}


def block_file(index: int) -> str:
    return f"block-{index:05d}.safetensors"


class TokenizerIdentity(BaseModel):
    file: str  # tokenizer.json or tiktoken.model, relative to the source
    sha256: str
    eos_id: int | None
    vocab_size: int  # the model's vocabulary (config), which the cached ids index


class ShardEntry(BaseModel):
    file: str
    first_sequence: int
    sequences: int
    bytes: int
    sha256: str


class TeacherManifest(BaseModel):
    version: int = CACHE_VERSION
    tool_version: str
    source: SourceFingerprint
    tokenizer: TokenizerIdentity
    corpus: CalibrationInfo
    seq_len: int
    top_k: int
    sequences: int
    tokens: int
    block_sequences: int
    dtypes: dict[str, str]
    bytes_per_token: int
    shards: list[ShardEntry]
    compute: dict[str, str | bool | int | float]  # engine, its version, device/dtype or parallel layout: how, not what
    logsumexp: bool = True  # False: the shards have no logsumexp tensor (vLLM does not return it)

    @classmethod
    def load(cls, path: str | Path, *, flag: str = "--teacher") -> TeacherManifest:
        return load_versioned(cls, Path(path) / MANIFEST, flag=flag, version=CACHE_VERSION, what="teacher manifest")

    def save(self, path: str | Path) -> None:
        tmp = Path(path).with_suffix(".tmp")
        write_file(tmp, self.model_dump_json(indent=1).encode())
        os.replace(tmp, path)

    def sha256(self, path: str | Path) -> str:
        """Of the manifest file as written: what a healed checkpoint's provenance names."""
        return hashlib.sha256((Path(path) / MANIFEST).read_bytes()).hexdigest()


@dataclass
class TeacherBatch:
    """A batch of whole sequences, in the dtypes a loss wants."""

    input_ids: torch.Tensor  # [B, L] int64
    topk_ids: torch.Tensor  # [B, L, k] int64
    topk_logprobs: torch.Tensor  # [B, L, k] float32
    logsumexp: torch.Tensor | None  # [B, L] float32; None when the cache has none

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()


def encode_block(input_ids: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                 logsumexp: torch.Tensor | None = None) -> bytes:
    """One shard's bytes. safetensors orders tensors and writes its header deterministically,
    so the same block always gives the same bytes (what resume and N ranks are checked by)."""
    from safetensors.torch import save

    parts = {"input_ids": input_ids, "topk_ids": topk_ids, "topk_logprobs": topk_logprobs, "logsumexp": logsumexp}
    return save({n: t.to(TENSORS[n]).contiguous() for n, t in parts.items() if t is not None}, metadata={"format": "k2mini-teacher"})


def write_block(directory: Path, index: int, data: bytes) -> Path:
    """Durably and atomically: a block file that exists is complete (resume relies on it)."""
    path = directory / block_file(index)
    tmp = path.with_suffix(".tmp")
    write_file(tmp, data)
    os.replace(tmp, path)
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


class TeacherCache:
    """A finished cache, opened for reading: ``read(indices)`` and ``batches(...)``."""

    def __init__(self, path: str | Path, *, flag: str = "--teacher"):
        self.path = Path(path)
        self.flag = flag
        if not self.path.is_dir():
            raise UsageError(f"{flag} {self.path}: not a directory (expected the output of k2mini teacher)")
        self.manifest = TeacherManifest.load(self.path, flag=flag)
        m = self.manifest
        if sum(s.sequences for s in m.shards) != m.sequences or m.tokens != m.sequences * m.seq_len:
            raise UsageError(f"{flag} {self.path / MANIFEST}: shard sequence counts do not add up to {m.sequences}")
        self._starts = [s.first_sequence for s in m.shards]
        self._verified: set[str] = set()
        # Shards last used, up to SHARD_CACHE_BYTES: training batches are drawn at random, and
        # re-reading a shard for every sequence would cost a shard read per sequence.
        self._loaded: OrderedDict[str, dict[str, torch.Tensor]] = OrderedDict()
        self._bytes = {s.file: s.bytes for s in m.shards}
        self._held = 0
        self._tensors = tensors(m.logsumexp)

    @property
    def sequences(self) -> int:
        return self.manifest.sequences

    @property
    def seq_len(self) -> int:
        return self.manifest.seq_len

    @property
    def top_k(self) -> int:
        return self.manifest.top_k

    def manifest_sha256(self) -> str:
        return self.manifest.sha256(self.path)

    def check_source(self, config_sha256: str, index_sha256: str | None, *, what: str) -> None:
        """Refuse a cache made from another checkpoint than ``what`` was cut from."""
        src = self.manifest.source
        if (src.config_sha256, src.index_sha256) != (config_sha256, index_sha256):
            raise UsageError(
                f"{self.flag} {self.path}: made from {src.location} (config sha256 {src.config_sha256[:12]}), "
                f"but {what} was cut from a source with config sha256 {config_sha256[:12]}: use a teacher cache of the same source"
            )

    def _shard(self, i: int) -> dict[str, torch.Tensor]:
        entry = self.manifest.shards[i]
        if entry.file in self._loaded:
            self._loaded.move_to_end(entry.file)
            return self._loaded[entry.file]
        path = self.path / entry.file
        where = f"{self.flag} {path}"
        if not path.is_file():
            raise UsageError(f"{where}: shard listed in the manifest is missing")
        if entry.file not in self._verified:
            if path.stat().st_size != entry.bytes or sha256_file(path) != entry.sha256:
                raise UsageError(f"{where}: corrupt or truncated shard (size or sha256 differs from {MANIFEST}); rerun k2mini teacher")
            self._verified.add(entry.file)
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            tensors = load_file(path)
        except (SafetensorError, OSError) as exc:
            raise UsageError(f"{where}: unreadable shard ({exc})") from None
        k, L, n = self.manifest.top_k, self.manifest.seq_len, entry.sequences
        want = {"input_ids": (n, L), "topk_ids": (n, L, k), "topk_logprobs": (n, L, k), "logsumexp": (n, L)}
        for name in TENSORS.keys() - self._tensors.keys():
            del want[name]
        for name, shape in want.items():
            t = tensors.get(name)
            if t is None or tuple(t.shape) != shape or t.dtype != TENSORS[name]:
                raise UsageError(f"{where}: tensor {name} is missing or not {TENSORS[name]}{list(shape)}")
        self._loaded[entry.file] = tensors
        self._held += entry.bytes
        while len(self._loaded) > 1 and self._held > SHARD_CACHE_BYTES:
            old, _ = self._loaded.popitem(last=False)
            self._held -= self._bytes[old]
        return tensors

    def _locate(self, seq: int) -> tuple[int, int]:
        if not 0 <= seq < self.manifest.sequences:
            raise IndexError(f"sequence {seq} is outside the cache's {self.manifest.sequences}")
        i = bisect.bisect_right(self._starts, seq) - 1
        return i, seq - self._starts[i]

    def read(self, indices: Sequence[int]) -> TeacherBatch:
        """The given sequences, in that order (shards are loaded one at a time, so indices
        grouped by shard are cheapest: ``batches`` orders them that way)."""
        rows: dict[str, list[torch.Tensor]] = {n: [] for n in self._tensors}
        for seq in indices:
            i, r = self._locate(int(seq))
            shard = self._shard(i)
            for n in self._tensors:
                rows[n].append(shard[n][r])
        st = {n: torch.stack(v) for n, v in rows.items()}
        lse = st["logsumexp"].float() if "logsumexp" in st else None
        return TeacherBatch(st["input_ids"].long(), st["topk_ids"].long(), st["topk_logprobs"].float(), lse)

    def batches(self, batch_size: int, indices: Sequence[int] | None = None) -> Iterator[TeacherBatch]:
        """``read`` over ``indices`` (default: every sequence) in batches of ``batch_size``."""
        order = list(range(self.sequences)) if indices is None else list(indices)
        for b0 in range(0, len(order), batch_size):
            yield self.read(order[b0 : b0 + batch_size])

    def verify(self) -> None:
        """Check every shard against the manifest now (instead of on first use)."""
        for i in range(len(self.manifest.shards)):
            self._shard(i)

