"""Open a K2-format checkpoint and hand out one tensor at a time.

Opening reads config.json, the index and every shard's header (a few MB for K2's 959 GiB),
never tensor data. ``read`` fetches exactly one tensor's bytes (plus its scale grid for
FP8 weights, wherever the index puts it) and dequantizes to BF16; ``read_raw`` returns the
stored bytes for pass-through. Memory use is one tensor, whatever the checkpoint size.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from k2mini.checkpoint.fp8_grid import scale_grid_shape
from k2mini.checkpoint.names import TensorName, parse_name, scale_name
from k2mini.checkpoint.safetensors_format import load_json_object, parse_header, read_header_length, show_name, torch_dtype
from k2mini.checkpoint.source import Source, check_relative
from k2mini.errors import CheckpointError

if TYPE_CHECKING:
    import torch

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
# Bytes fetched up front per shard: the length prefix and, for typical headers, the whole
# header in one request (one round trip per shard on remote sources).
_HEADER_PROBE = 1 << 16


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors tag
    shape: tuple[int, ...]
    file: str  # shard path relative to the checkpoint root
    offset: int  # absolute byte offset in the shard
    nbytes: int
    parsed: TensorName

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class Problem:
    """Something wrong with a checkpoint, found without reading tensor data."""

    kind: str  # missing_scale, orphan_scale, scale_shape, scale_dtype, unindexed
    tensor: str
    file: str
    message: str


class Checkpoint:
    """A checkpoint directory (or any Source): config, tensor table, per-tensor reads."""

    def __init__(self, source: Source):
        self.source = source
        self.config: dict[str, Any] = self._load_config()
        self.tensors: dict[str, TensorInfo] = {}
        self.index_file: str | None = None
        self.problems: list[Problem] = []
        self._load_tensor_table()

    @classmethod
    def open(cls, location: str | Path) -> Checkpoint:
        """A local directory, or a Hub repo id ``org/name[@revision]`` that is not a local path."""
        from k2mini.checkpoint.hub import open_source  # huggingface_hub only when opening

        return cls(open_source(location))

    @property
    def description(self) -> str:
        return self.source.description

    # -- loading ---------------------------------------------------------------------

    def _load_config(self) -> dict[str, Any]:
        if not self.source.exists("config.json"):
            raise CheckpointError("config.json is missing", path=self.source.description)
        return load_json_object(
            self.source.read_bytes("config.json"), what="config.json", where=f"{self.source.description}/config.json"
        )

    def _load_tensor_table(self) -> None:
        where = self.source.description
        if self.source.exists(INDEX_FILE):
            self.index_file = INDEX_FILE
            index = load_json_object(self.source.read_bytes(INDEX_FILE), what=INDEX_FILE, where=f"{where}/{INDEX_FILE}")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
                raise CheckpointError("weight_map must map tensor names to file names", path=f"{where}/{INDEX_FILE}")
        elif self.source.exists(SINGLE_FILE):
            weight_map = None
        else:
            raise CheckpointError(f"neither {INDEX_FILE} nor {SINGLE_FILE} found", path=where)

        files = sorted(set(weight_map.values())) if weight_map is not None else [SINGLE_FILE]
        for f in files:
            check_relative(f, where=f"{where}/{INDEX_FILE}")
        for f in files:
            if not self.source.exists(f):
                example = next(k for k, v in weight_map.items() if v == f) if weight_map else f
                raise CheckpointError(
                    f"shard {show_name(f)} listed in {INDEX_FILE} (e.g. for {show_name(example)}) is missing", path=where
                )
        # One round trip per shard from the Hub (K2 has 62 shards): overlapped there.
        workers = min(self.source.concurrency, len(files))
        if workers < 2:
            headers = {f: self._read_header(f) for f in files}
        else:
            with ThreadPoolExecutor(workers, thread_name_prefix="k2mini-header") as pool:
                headers = dict(zip(files, pool.map(self._read_header, files)))

        if weight_map is None:
            weight_map = {name: SINGLE_FILE for name in headers[SINGLE_FILE].entries}
        for name, f in weight_map.items():
            h = headers[f]
            e = h.entries.get(name)
            if e is None:
                raise CheckpointError(
                    f"tensor {show_name(name)} is listed in {INDEX_FILE} but absent from {show_name(f)}", path=where
                )
            self.tensors[name] = TensorInfo(
                name, e.dtype, e.shape, f, h.data_start + e.begin, e.nbytes, _parse_untrusted_name(name, f"{where}/{f}")
            )
        for f, h in headers.items():
            for name in h.entries:
                if name not in weight_map:
                    self.problems.append(Problem("unindexed", name, f, f"{show_name(name)} is in {show_name(f)} but not in the index (ignored)"))
        self._check_scales()

    def _read_header(self, f: str):
        where = f"{self.source.description}/{f}"
        size = self.source.size(f)
        probe = bytearray(min(_HEADER_PROBE, size))
        self.source.read_into(f, 0, memoryview(probe))
        n = read_header_length(bytes(probe[:8]), where=where, file_size=size)
        if 8 + n <= len(probe):
            raw = bytes(probe[8 : 8 + n])
        else:
            buf = bytearray(n)
            self.source.read_into(f, 8, memoryview(buf))
            raw = bytes(buf)
        return parse_header(raw, where=where, file_size=size)

    def _check_scales(self) -> None:
        for name, t in self.tensors.items():
            if t.parsed.is_scale:
                w = self.tensors.get(t.parsed.weight_name)
                if w is None:
                    self.problems.append(Problem("orphan_scale", name, t.file, f"{show_name(name)} in {show_name(t.file)} has no weight {show_name(t.parsed.weight_name)}"))
                elif t.dtype != "F32":
                    self.problems.append(Problem("scale_dtype", name, t.file, f"{show_name(name)} in {show_name(t.file)} is {t.dtype}, expected F32"))
                elif len(w.shape) != 2 or t.shape != scale_grid_shape(w.shape):
                    expected = list(scale_grid_shape(w.shape)) if len(w.shape) == 2 else "a 2-D weight"
                    self.problems.append(
                        Problem("scale_shape", name, t.file, f"{show_name(name)} in {show_name(t.file)} is {list(t.shape)} but weight {list(w.shape)} needs {expected}")
                    )
            elif t.dtype == "F8_E4M3" and scale_name_or_none(name) not in self.tensors:
                self.problems.append(Problem("missing_scale", name, t.file, f"FP8 weight {show_name(name)} in {show_name(t.file)} has no {show_name(str(scale_name_or_none(name)))}"))

    # -- queries ---------------------------------------------------------------------

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"tensor {name} is not in the checkpoint", path=self.description) from None

    def scale_of(self, name: str) -> TensorInfo | None:
        s = scale_name_or_none(name)
        return self.tensors.get(s) if s else None

    def is_fp8(self, name: str) -> bool:
        return self.info(name).dtype == "F8_E4M3"

    def weight_names(self) -> list[str]:
        """Every tensor that is not a scale grid."""
        return [n for n, t in self.tensors.items() if not t.parsed.is_scale]

    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())

    # -- reads -----------------------------------------------------------------------

    def read_raw(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """The tensor exactly as stored (FP8 stays FP8); into ``out`` (its dtype and shape, contiguous) when given."""
        import torch  # only with tensor data: opening and planning need none (see torch_dtype)

        t = self.info(name)
        if out is None:
            out = torch.empty(t.shape, dtype=torch_dtype(t.dtype))
        elif out.dtype != torch_dtype(t.dtype) or tuple(out.shape) != t.shape or not out.is_contiguous():
            raise ValueError(f"{name}: out is {out.dtype}{list(out.shape)}, the tensor is {t.dtype}{list(t.shape)}")
        if t.nbytes:
            self.source.read_into(t.file, t.offset, memoryview(out.view(-1).view(torch.uint8).numpy()))
        return out

    def read_fp8(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """An FP8 weight and its scale grid, checked against each other."""
        t = self.info(name)
        s = self.scale_of(name)
        where = f"{self.description}/{t.file}"
        if s is None:
            raise CheckpointError(f"FP8 weight {name} has no {scale_name_or_none(name)}", path=where)
        if len(t.shape) != 2 or s.shape != scale_grid_shape(t.shape) or s.dtype != "F32":
            raise CheckpointError(
                f"scale grid {s.name} is {s.dtype}{list(s.shape)} but weight {name} {list(t.shape)} needs F32"
                f"{list(scale_grid_shape(t.shape)) if len(t.shape) == 2 else ''}",
                path=f"{self.description}/{s.file}",
            )
        return self.read_raw(name), self.read_raw(s.name)

    def read(self, name: str) -> torch.Tensor:
        """The tensor for computation: FP8 weights dequantized to BF16, others as stored."""
        if self.is_fp8(name):
            from k2mini.checkpoint import fp8  # numba's 0.4 s import, with the first FP8 weight

            w, s = self.read_fp8(name)
            return fp8.dequantize(w, s, out=self._dequant_buffer(tuple(w.shape)))
        return self.read_raw(name)

    def _dequant_buffer(self, shape: tuple[int, ...]) -> torch.Tensor | None:
        """Where ``read`` dequantizes to: None, a new tensor (subclasses reuse buffers)."""
        return None

    def read_many(self, names: Iterable[str]) -> dict[str, torch.Tensor]:
        """``read`` of each name, up to the source's ``concurrency`` at once: many small reads
        from the Hub cost one round trip each, which then overlap. All results are held at
        once, so this is for small tensors (scale grids, router rows), not a layer's experts."""
        names = list(names)
        workers = min(self.source.concurrency, len(names))
        if workers < 2:
            return {n: self.read(n) for n in names}
        with ThreadPoolExecutor(workers, thread_name_prefix="k2mini-read") as pool:
            return dict(zip(names, pool.map(self.read, names)))


def _parse_untrusted_name(name: str, where: str) -> TensorName:
    # parse_name turns digit runs into ints; a 5000-digit layer number raises ValueError.
    try:
        return parse_name(name)
    except ValueError:
        raise CheckpointError(f"tensor name {show_name(name)} has an impossible layer or expert number", path=where) from None


def scale_name_or_none(name: str) -> str | None:
    return scale_name(name) if name.endswith(".weight") else None
