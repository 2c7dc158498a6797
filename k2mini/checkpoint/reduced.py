"""The one writer of a reduced checkpoint: convert, quantize and heal all write through it.

A reduced checkpoint is the source's companion files (tokenizer, generation config, chat
template, and the tokenizer's own code file where ``tokenizer_config.json``'s ``auto_map``
names one, as Kimi-K2's ``tokenization_kimi.py``), a config, the files the command writes
itself (model card, plan, report) and sharded weights with their index. One rule decides
which source files travel, so an output of convert, quantize or heal loads the same way::

    out = ReducedCheckpoint(source, config, files={"README.md": card}, own_files=(REPORT_FILE,))
    with OutputDir(path, planned_bytes=out.planned_bytes(units, max_shard_bytes)) as od:
        out.write(od.partial, units, max_shard_bytes=max_shard_bytes)
        od.commit()
"""

from __future__ import annotations

import json
from collections.abc import Callable, Collection, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from k2mini.checkpoint.source import Source
from k2mini.checkpoint.writer import (
    DEFAULT_MAX_SHARD_BYTES,
    INDEX_FILE,
    WriteResult,
    WriteUnit,
    planned_bytes,
    write_file,
    write_sharded,
)

CONFIG_FILE = "config.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
_CODE_SUFFIXES = (".py", ".pyc")
# Slack on top of the tensor and file bytes for the free-disk check (index, journal).
_SLACK = 2**20


def tokenizer_code_files(source: Source) -> set[str]:
    """The code files ``tokenizer_config.json``'s ``auto_map`` names (K2: tokenization_kimi.py):
    a tokenizer that needs remote code is unusable without its file."""
    if not source.exists(TOKENIZER_CONFIG):
        return set()
    try:
        tc = json.loads(source.read_bytes(TOKENIZER_CONFIG))
    except ValueError:
        return set()
    needed: set[str] = set()
    for v in (tc.get("auto_map") or {}).values() if isinstance(tc, dict) else ():
        for ref in v if isinstance(v, list) else [v]:
            if isinstance(ref, str):
                # "module.Class" or "repo--module.Class": the file is module.py
                needed.add(ref.split("--")[-1].split(".")[0] + ".py")
    return needed


def companion_files(source: Source, written: Collection[str]) -> tuple[list[str], list[str]]:
    """(files to copy, files left out): tokenizer and friends in; hidden files, weights,
    indexes, remote model code and whatever the writer writes itself (``written``) out."""
    code = tokenizer_code_files(source)
    copy, dropped = [], []
    for f in source.list_files():
        p = PurePosixPath(f)
        if any(part.startswith(".") for part in p.parts) or f in written or f.endswith(WEIGHT_SUFFIXES) \
                or f.endswith(".index.json") or (f.endswith(_CODE_SUFFIXES) and f not in code):
            dropped.append(f)
        else:
            copy.append(f)
    return copy, dropped


def config_bytes(config: dict[str, Any]) -> bytes:
    return (json.dumps(config, indent=2) + "\n").encode()


class ReducedCheckpoint:
    """What a command writes besides its tensors: ``config``, its own ``files`` (name ->
    bytes) and the source's companion files; ``own_files`` names files the command writes
    into the directory itself (logs, late reports), which are never copied from the source."""

    def __init__(self, source: Source, config: dict[str, Any], *, files: dict[str, bytes] | None = None,
                 own_files: Collection[str] = ()):
        self.source = source
        self.config = config
        self.files = dict(files or {})
        self.copy, self.dropped = companion_files(source, {CONFIG_FILE, INDEX_FILE, *self.files, *own_files})

    def planned_bytes(self, units: Sequence[WriteUnit], max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> int:
        """Bytes the output will take, for the free-disk check before anything is written."""
        return planned_bytes(units, max_shard_bytes) + sum(self.source.size(f) for f in self.copy) + _SLACK

    def write(self, partial: Path, units: Sequence[WriteUnit], **kwargs) -> WriteResult:
        """The whole output: ``write_files`` then ``write_tensors``."""
        self.write_files(partial)
        return self.write_tensors(partial, units, **kwargs)

    def write_files(self, partial: Path) -> None:
        """Companion files, config and the command's own files."""
        for f in self.copy:
            write_file(partial / f, self.source.read_bytes(f))
        write_file(partial / CONFIG_FILE, config_bytes(self.config))
        for name, data in self.files.items():
            write_file(partial / name, data)

    def write_tensors(self, partial: Path, units: Sequence[WriteUnit], *,
                      after: Callable[[], dict[str, bytes]] | None = None, **sharding: Any) -> WriteResult:
        """The shards and index by ``write_sharded`` (``sharding``: its max_shard_bytes, resume,
        key, on_tensor), then ``after()``'s files: reports that exist only once every tensor
        is produced."""
        res = write_sharded(partial, units, **sharding)
        for name, data in (after() if after else {}).items():
            write_file(partial / name, data)
        return res
