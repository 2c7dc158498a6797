"""Write a sharded safetensors checkpoint one tensor at a time, resumably and reproducibly.

API (reused by convert, quantize and anything else that writes weights)::

    units = [WriteUnit((PlannedTensor(...), ...), produce=lambda: [tensor, ...]), ...]
    result = write_sharded(partial_dir, units, max_shard_bytes=5 * 10**9,
                           resume=False, key="<what these inputs are>")

- A ``WriteUnit`` is what one producer call yields (e.g. an FP8 weight and its scale grid,
  or the packed weight, scales and shape of an INT4 tensor). A unit never spans two shards,
  so a producer is called exactly once per unit and its outputs stay side by side.
- Units are packed in order into shards of at most ``max_shard_bytes`` of tensor data (a
  unit larger than the limit gets a shard of its own), named
  ``model-00001-of-0000N.safetensors``. The layout depends only on the planned names,
  dtypes and shapes, so identical inputs give byte-identical files.
- Shards go into ``partial_dir`` (see ``k2mini.output.OutputDir``, which renames it into
  place when everything is written). A journal there records each shard after its fsync;
  with ``resume=True`` a journaled shard whose size, header and tail checksum still match
  is kept and its producers are not called at all.
- The index (``model.safetensors.index.json`` with ``metadata.total_size``) is written
  last, after every shard. The journal stays until ``OutputDir.commit`` removes it, so a
  crash between the index and the rename still resumes without rewriting.

We do not use ``safetensors.torch.save_file`` because it needs a whole shard in memory;
``write_shard`` streams one tensor at a time.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import zlib
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from k2mini.checkpoint.safetensors_format import PlannedTensor, encode_header, write_shard

INDEX_FILE = "model.safetensors.index.json"
JOURNAL_FILE = ".k2mini-journal.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 10**9  # "5GB" as Hugging Face counts it
# Resume checks the last bytes of a finished shard against a checksum taken when it was
# written: catches a truncated or overwritten tail without re-hashing gigabytes (hashing
# every byte while writing would cost more than the FP8 pass-through copy itself).
_TAIL_BYTES = 1 << 20

@dataclass(frozen=True)
class WriteUnit:
    """Tensors produced together: ``produce()`` returns them in the order of ``tensors``."""

    tensors: tuple[PlannedTensor, ...]
    produce: Callable[[], Sequence[torch.Tensor]] = field(compare=False, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)


@dataclass
class WriteResult:
    shards: list[str]
    weight_map: dict[str, str]
    total_size: int  # tensor bytes (what metadata.total_size says)
    bytes_written: int  # file bytes written by this run (reused shards excluded)
    reused_shards: list[str]


def shard_name(k: int, n: int) -> str:
    return f"model-{k:05d}-of-{n:05d}.safetensors"


def layout(units: Sequence[WriteUnit], max_shard_bytes: int) -> list[list[WriteUnit]]:
    """Units packed in order into shards of at most ``max_shard_bytes`` tensor bytes."""
    shards: list[list[WriteUnit]] = []
    size = 0
    for u in units:
        if not shards or (shards[-1] and size + u.nbytes > max_shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(u)
        size += u.nbytes
    return shards


def planned_bytes(units: Sequence[WriteUnit], max_shard_bytes: int) -> int:
    """File bytes the shards will take (headers included), for a free-disk check."""
    return sum(len(encode_header([t for u in s for t in u.tensors], _metadata())) + sum(u.nbytes for u in s)
               for s in layout(units, max_shard_bytes))


def _metadata() -> dict[str, str]:
    return {"format": "pt"}


def _tail_crc(path: Path, size: int) -> int:
    with open(path, "rb") as f:
        f.seek(max(0, size - _TAIL_BYTES))
        return zlib.crc32(f.read(_TAIL_BYTES))


def _layout_key(key: str, shards: list[list[WriteUnit]]) -> str:
    h = hashlib.sha256(key.encode())
    for s in shards:
        h.update(encode_header([t for u in s for t in u.tensors], _metadata()))
    return h.hexdigest()


def _load_journal(partial: Path, fingerprint: str) -> dict[str, dict]:
    try:
        j = json.loads((partial / JOURNAL_FILE).read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(j, dict) or j.get("fingerprint") != fingerprint or not isinstance(j.get("shards"), dict):
        return {}
    return j["shards"]


def _save_journal(partial: Path, fingerprint: str, done: dict[str, dict]) -> None:
    tmp = partial / (JOURNAL_FILE + ".tmp")
    tmp.write_text(json.dumps({"fingerprint": fingerprint, "shards": done}, sort_keys=True))
    os.replace(tmp, partial / JOURNAL_FILE)


def _shard_ok(path: Path, head: bytes, entry: dict) -> bool:
    try:
        size = path.stat().st_size
        if size != entry.get("size"):
            return False
        with open(path, "rb") as f:
            if f.read(len(head)) != head:
                return False
        return _tail_crc(path, size) == entry.get("tail_crc32")
    except OSError:
        return False


def write_sharded(
    partial: Path,
    units: Sequence[WriteUnit],
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    resume: bool = False,
    key: str = "",
    on_tensor: Callable[[PlannedTensor], None] | None = None,
) -> WriteResult:
    """Write ``units`` as shards plus the index into the existing directory ``partial``.

    ``key`` names the inputs (source fingerprint, plan, output dtype...): a journal written
    under another key, or for another layout, is ignored on resume. ``on_tensor`` is called
    after each tensor is written or found in a reused shard (progress bars).
    """
    shards = layout(units, max_shard_bytes)
    n = len(shards)
    fingerprint = _layout_key(key, shards)
    done = _load_journal(partial, fingerprint) if resume else {}
    if not resume:
        (partial / JOURNAL_FILE).unlink(missing_ok=True)
    kept: dict[str, dict] = {}
    result = WriteResult([], {}, 0, 0, [])
    # A finished shard is fsynced and journaled on a background thread while the next one
    # is read and written: the disk flushes one shard as we fill the next, instead of the
    # whole run waiting on every flush. The journal only ever names fsynced shards.
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="k2mini-fsync") as flusher:
        pending = []
        for k, shard in enumerate(shards, start=1):
            fname = shard_name(k, n)
            plan = [t for u in shard for t in u.tensors]
            head = encode_header(plan, _metadata())
            path = partial / fname
            result.shards.append(fname)
            result.weight_map.update({t.name: fname for t in plan})
            result.total_size += sum(t.nbytes for t in plan)
            if fname in done and _shard_ok(path, head, done[fname]):
                with _journal_lock:
                    kept[fname] = done[fname]
                result.reused_shards.append(fname)
                if on_tensor:
                    for t in plan:
                        on_tensor(t)
                continue
            size = write_shard(path, plan, _produce(shard, on_tensor), _metadata(), fsync=False)
            result.bytes_written += size
            pending.append(flusher.submit(_flush_and_journal, partial, fingerprint, kept, fname, path, size))
            for f in pending:  # surface a failed flush now, not after the last shard
                if f.done():
                    f.result()
        for f in pending:
            f.result()
    # Shards of an earlier, different layout would otherwise ride along into the output.
    for p in partial.glob("model-*-of-*.safetensors"):
        if p.name not in kept:
            p.unlink()
    index = {"metadata": {"total_size": result.total_size}, "weight_map": dict(sorted(result.weight_map.items()))}
    write_file(partial / INDEX_FILE, (json.dumps(index, indent=2) + "\n").encode())
    return result


def _produce(shard: list[WriteUnit], on_tensor) -> Iterator[torch.Tensor]:
    for u in shard:
        produced = list(u.produce())
        if len(produced) != len(u.tensors):
            raise ValueError(f"{u.tensors[0].name}: producer returned {len(produced)} tensors for {len(u.tensors)} planned")
        produced.reverse()
        for planned in u.tensors:
            # Popped so that no reference outlives its write (peak memory: one unit).
            yield produced.pop()
            if on_tensor:
                on_tensor(planned)


_journal_lock = threading.Lock()


def _flush_and_journal(partial: Path, fingerprint: str, kept: dict[str, dict], fname: str, path: Path, size: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    entry = {"size": size, "tail_crc32": _tail_crc(path, size)}
    with _journal_lock:
        kept[fname] = entry
        _save_journal(partial, fingerprint, dict(kept))


def write_file(path: Path, data: bytes) -> None:
    """A small file, fsynced (config, index, model card, copied tokenizer files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
