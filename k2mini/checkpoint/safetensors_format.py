"""The safetensors container: parse a header from bytes, write a shard one tensor at a time.

We parse headers ourselves instead of calling ``safetensors.safe_open`` because the reader
must work on byte ranges (a local file read with pread, or a Hub file fetched by HTTP Range)
without mapping whole shards, and because a hostile header must end in our own one-line
error rather than a Rust panic or an allocation sized by the header. We write shards
ourselves because ``safetensors.torch.save_file`` needs every tensor of a shard in memory at
once; here the header is written first and each tensor's bytes are streamed after it.
"""

from __future__ import annotations

import json
import math
import reprlib
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from k2mini.checkpoint.direct_write import DirectFile
from k2mini.errors import CheckpointError

if TYPE_CHECKING:
    import torch

# Upper bound on the JSON header. The real K2 shards have headers well under 1 MB; the
# Rust library uses 100 MB. A larger declared length is corruption or an attack.
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_RANK = 8
_ALIGN = 8

# safetensors dtype tag -> (torch dtype name, bytes per element)
_TAGS = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
}
ITEMSIZE = {tag: size for tag, (_, size) in _TAGS.items()}


def torch_dtype(tag: str) -> torch.dtype:
    # torch is imported with the first tensor, not with the module: reading headers
    # (inspect, planning) needs none of its 2 s and 300 MB.
    import torch

    return getattr(torch, _TAGS[tag][0])


def dtype_tag(dtype: torch.dtype) -> str | None:
    """The safetensors tag of a torch dtype, None for one safetensors cannot store."""
    import torch

    return next((tag for tag, (name, _) in _TAGS.items() if getattr(torch, name) == dtype), None)


@dataclass(frozen=True)
class HeaderEntry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offset within the data section
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass(frozen=True)
class ShardHeader:
    entries: dict[str, HeaderEntry]
    metadata: dict[str, str]
    data_start: int  # absolute file offset of the data section (8 + header length)


def read_header_length(prefix: bytes, *, where: str, file_size: int) -> int:
    if len(prefix) < 8:
        raise CheckpointError("file is shorter than the 8-byte safetensors header length", path=where)
    (n,) = struct.unpack("<Q", prefix[:8])
    if n == 0 or n > MAX_HEADER_BYTES:
        raise CheckpointError(f"declared header length {n} bytes is not plausible (limit {MAX_HEADER_BYTES})", path=where)
    if 8 + n > file_size:
        raise CheckpointError(f"truncated: header of {n} bytes declared but the file has {file_size} bytes", path=where)
    return n


def _no_duplicate_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    # json.loads keeps the last of two equal keys silently; another parser may keep the
    # first, so a duplicated tensor name could mean different data to different tools.
    out: dict[str, object] = {}
    for k, v in pairs:
        if k in out:
            raise _DuplicateKey(k)
        out[k] = v
    return out


class _DuplicateKey(ValueError):
    pass


def load_json_object(raw: bytes, *, what: str, where: str) -> dict[str, object]:
    """Parse untrusted JSON (a header, an index, a config) into a dict, or raise CheckpointError.

    Covers what ``json.loads`` lets escape as other exceptions: non-UTF-8 bytes, nesting deep
    enough to raise RecursionError, integers too long to convert, and duplicate keys.
    """
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{what} is not UTF-8 ({exc.reason} at byte {exc.start})", path=where) from None
    try:
        obj = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise CheckpointError(f"{what} JSON is nested too deeply", path=where) from None
    except _DuplicateKey as exc:
        raise CheckpointError(f"{what} has the key {str(exc)[:200]!r} twice", path=where) from None
    except ValueError as exc:
        raise CheckpointError(f"{what} is not valid JSON ({str(exc)[:200]})", path=where) from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{what} is not a JSON object", path=where)
    return obj


def parse_header(raw: bytes, *, where: str, file_size: int) -> ShardHeader:
    """Validate a header completely: every tensor fits, nothing overlaps, sizes agree."""
    obj = load_json_object(raw, what="header", where=where)
    data_start = 8 + len(raw)
    data_size = file_size - data_start
    metadata: dict[str, str] = {}
    entries: dict[str, HeaderEntry] = {}
    for name, spec in obj.items():
        if name == "__metadata__":
            if not isinstance(spec, dict) or not all(isinstance(v, str) for v in spec.values()):
                raise CheckpointError("__metadata__ must map strings to strings", path=where)
            metadata = dict(spec)
            continue
        entries[name] = _parse_entry(name, spec, where)
    spans = sorted((e.begin, e.end, e.name) for e in entries.values())
    prev_end, prev_name = 0, None
    for begin, end, name in spans:
        if begin < prev_end:
            raise CheckpointError(f"tensor {show_name(name)} overlaps tensor {show_name(prev_name)}", path=where)
        prev_end, prev_name = end, name
    if prev_end > data_size:
        raise CheckpointError(
            f"truncated: tensor {show_name(prev_name)} ends at data byte {prev_end} but the file holds {max(data_size, 0)} data bytes",
            path=where,
        )
    return ShardHeader(entries=entries, metadata=metadata, data_start=data_start)


def show_name(name: str, limit: int = 160) -> str:
    """A tensor or file name from an untrusted file, made safe for a one-line message."""
    if name.isprintable() and len(name) <= limit:
        return name
    r = repr(name)
    return r if len(r) <= limit else r[:limit] + "..."


def _short(value: object) -> str:
    # reprlib bounds the work and the text for huge or deeply nested values.
    return reprlib.repr(value)


def _parse_entry(name: str, spec: object, where: str) -> HeaderEntry:
    name_s = show_name(name)
    if not isinstance(spec, dict):
        raise CheckpointError(f"tensor {name_s}: header entry is not an object", path=where)
    dtype = spec.get("dtype")
    if not isinstance(dtype, str) or dtype not in ITEMSIZE:
        raise CheckpointError(f"tensor {name_s}: unknown dtype {_short(dtype)}", path=where)
    shape = spec.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) > MAX_RANK
        or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**40 for d in shape)
    ):
        raise CheckpointError(f"tensor {name_s}: invalid shape {_short(shape)}", path=where)
    offsets = spec.get("data_offsets")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(isinstance(o, int) and not isinstance(o, bool) and 0 <= o < 2**62 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise CheckpointError(f"tensor {name_s}: invalid data_offsets {_short(offsets)}", path=where)
    expected = math.prod(shape) * ITEMSIZE[dtype]
    if offsets[1] - offsets[0] != expected:
        raise CheckpointError(
            f"tensor {name_s}: data_offsets span {offsets[1] - offsets[0]} bytes but {dtype}{shape} needs {expected}",
            path=where,
        )
    return HeaderEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor whose name, dtype and shape are known before its data is produced."""

    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * ITEMSIZE[self.dtype]


def encode_header(tensors: Iterable[PlannedTensor], metadata: dict[str, str] | None = None) -> bytes:
    """Header bytes (length prefix included) for tensors laid out in the given order."""
    obj: dict[str, object] = {"__metadata__": metadata or {"format": "pt"}}
    offset = 0
    for t in tensors:
        obj[t.name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    body = json.dumps(obj, separators=(",", ":")).encode("utf-8")
    body += b" " * (-len(body) % _ALIGN)
    return struct.pack("<Q", len(body)) + body


def tensor_bytes(t: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, without a copy when it is contiguous."""
    import torch  # see torch_dtype

    t = t.detach().contiguous().cpu()
    if t.numel() == 0:
        return memoryview(b"")
    return memoryview(t.view(torch.uint8).reshape(-1).numpy())


def write_shard(
    path: Path,
    plan: list[PlannedTensor],
    data: Iterator[torch.Tensor],
    metadata: dict[str, str] | None = None,
    fsync: bool = True,
) -> int:
    """Write one shard: the header, then each tensor as ``data`` yields it, in ``plan`` order.

    Each yielded tensor must match its planned dtype and shape; the file is fsynced (unless
    the caller fsyncs it later, e.g. in the background) so a finished shard survives a crash
    of what follows. Bytes go through ``DirectFile`` (past the page cache where the
    filesystem allows; identical bytes either way). Returns the bytes written.
    """
    written = 0
    with DirectFile(path) as f:
        head = encode_header(plan, metadata)
        f.write(head)
        written += len(head)
        for planned in plan:
            t = next(data)
            written += _write_tensor(f, planned, t)
            del t  # else it stays alive while the next tensor is produced
        f.finish(fsync=fsync)
    return written


def _write_tensor(f: DirectFile, planned: PlannedTensor, t: torch.Tensor) -> int:
    tag = dtype_tag(t.dtype)
    if tag != planned.dtype or tuple(t.shape) != planned.shape:
        raise ValueError(f"{planned.name}: planned {planned.dtype}{list(planned.shape)}, got {tag}{list(t.shape)}")
    buf = tensor_bytes(t)
    f.write(buf)
    return len(buf)
