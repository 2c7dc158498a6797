"""convert: stream the tensors a Plan selects from the source into a reduced checkpoint.

Reads each selected tensor once (router rows and correction biases only for kept experts),
passes it through a Transform, and hands it to the sharded writer, one tensor at a time.
Non-weight files (tokenizer, generation config, chat template) are copied through the
Source API, so a Hub source works the same way as a directory.
"""

from __future__ import annotations

import hashlib
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from k2mini.checkpoint.names import EXPERT_PROJS, Role, expert_weight, parse_name, rename
from k2mini.checkpoint.reader import INDEX_FILE, Checkpoint
from k2mini.checkpoint.reduced import CONFIG_FILE, ReducedCheckpoint, companion_files, config_bytes
from k2mini.checkpoint.writer import DEFAULT_MAX_SHARD_BYTES, WriteUnit
from k2mini.convert.card import model_card
from k2mini.convert.config import fixed_config
from k2mini.checkpoint.prefetch import PrefetchedCheckpoint, Prefetcher, raw_read_order
from k2mini.convert.transforms import TensorJob, Transform, selected_bytes
from k2mini.errors import CheckpointError
from k2mini.model.spec import ModelSpec
from k2mini.output import OutputDir
from k2mini.selection.plan import PLAN_FILE, Plan

# Written by convert itself, never copied from the source.
_OWN_FILES = {PLAN_FILE, "README.md"}


def plan_jobs(ck: Checkpoint, plan: Plan) -> list[TensorJob]:
    """Every output tensor's source, in output order: embeddings, kept layers, norm, lm_head."""
    spec = ModelSpec.from_config(ck.config)
    kept = {e.source_layer: e.kept for e in plan.experts}
    merges = {e.source_layer: e.merge for e in plan.experts if e.merge is not None}
    jobs: list[TensorJob] = []

    def add(src: str, out: str, rows: tuple[int, ...] | None = None, merge=None) -> None:
        for name in [src] + [n for n, _ in merge or ()]:
            if name not in ck.tensors:
                raise CheckpointError(f"tensor {name} is missing (the source config implies it)", path=ck.description)
        jobs.append(TensorJob(src, out, rows, merge))

    add("model.embed_tokens.weight", "model.embed_tokens.weight")
    for new, layer in enumerate(plan.layers):
        experts_done = False
        for t in spec.layer_tensors(layer):
            pn = parse_name(t.name)
            if pn.is_scale:
                continue
            if pn.role is Role.EXPERT:
                if not experts_done:
                    for new_e, src_e in enumerate(kept[layer]):
                        group = merges[layer][new_e] if layer in merges else []
                        for proj in EXPERT_PROJS:
                            src = expert_weight(layer, src_e, proj)
                            # A group of one (nothing folded in) is copied like a plain prune.
                            merge = tuple((expert_weight(layer, m, proj), w)
                                          for m, w in group) if len(group) > 1 else None
                            add(src, rename(src, layer=new, expert=new_e), merge=merge)
                    experts_done = True
                continue
            rows = tuple(kept[layer]) if pn.role in (Role.ROUTER, Role.ROUTER_BIAS) else None
            add(t.name, rename(t.name, layer=new), rows)
    add("model.norm.weight", "model.norm.weight")
    if not spec.tie_word_embeddings:
        add("lm_head.weight", "lm_head.weight")
    return jobs


def _read_order(ck: Checkpoint, jobs: list[TensorJob]) -> list[str]:
    # The order the transforms ask for raw tensors (row slices are read directly).
    return raw_read_order(ck, (name for j in jobs if j.rows is None for name in _sources(j)))


def _sources(job: TensorJob) -> list[str]:
    """Every source tensor a job reads (a merged expert reads its whole group)."""
    return [n for n, _ in job.merge] if job.merge else [job.source]


def _check_problems(ck: Checkpoint, jobs: list[TensorJob]) -> None:
    # The reader lists scale problems at open; only those touching a selected tensor matter.
    wanted = {n for j in jobs for n in _sources(j)}
    for p in ck.problems:
        if p.tensor in wanted or (p.kind != "unindexed" and parse_name(p.tensor).weight_name in wanted):
            raise CheckpointError(p.message, path=ck.description)


class ConvertSummary(BaseModel):
    source: str
    output: str
    dtype: str
    dry_run: bool
    layers: list[int]
    experts_per_layer: int
    num_experts_per_tok: int
    group_policy: str
    tensors: int
    params: int
    bytes_by_dtype: dict[str, int]
    total_size: int  # tensor bytes written (index metadata.total_size)
    shards: int
    selected_source_bytes: int  # source bytes the selected tensors occupy
    bytes_read: int = 0  # source bytes read by this run (config, headers, files, tensors)
    tensor_bytes_read: int = 0  # of which while writing tensors
    seconds: float = 0.0
    reused_shards: int = 0
    copied_files: list[str] = []
    dropped_files: list[str] = []
    dropped_source_tensors: int = 0
    notes: list[str] = []
    # What a run costs against what the source holds (for a Hub repo: bytes downloaded).
    source_total_bytes: int = 0  # every file in the source
    planning_bytes_read: int = 0  # read before writing: config, index, shard headers, scoring inputs
    bytes_to_read: int = 0  # still to read by a run: selected tensors (with scales) and copied files


@dataclass
class Prepared:
    ck: Checkpoint
    plan: Plan
    transform: Transform
    jobs: list[TensorJob]
    units: list[WriteUnit]
    config: dict[str, Any]
    params: int
    copy: list[str]
    dropped: list[str]


def prepare(ck: Checkpoint, plan: Plan, transform: Transform) -> Prepared:
    """Everything known before any tensor is read: jobs, planned tensors, config, file lists."""
    transform.check_source(ck)
    jobs = plan_jobs(ck, plan)
    _check_problems(ck, jobs)
    units = [WriteUnit(transform.plan(ck, j), (lambda j=j: transform.produce(ck, j))) for j in jobs]
    cfg = fixed_config(ck.config, plan, transform)
    params = ModelSpec.from_config({k: v for k, v in cfg.items() if k != "quantization_config"}).param_count()
    copy, dropped = companion_files(ck.source, {CONFIG_FILE, INDEX_FILE, *_OWN_FILES})
    return Prepared(ck, plan, transform, jobs, units, cfg, params, copy, dropped)


def _summary(p: Prepared, output: str, *, dry_run: bool, max_shard_bytes: int) -> ConvertSummary:
    by_dtype: Counter[str] = Counter()
    for u in p.units:
        for t in u.tensors:
            by_dtype[t.dtype] += t.nbytes
    used = {n for j in p.jobs for n in _sources(j)}
    used |= {s.name for n in list(used) if (s := p.ck.scale_of(n)) is not None}
    from k2mini.checkpoint.writer import layout

    return ConvertSummary(
        source=p.ck.description,
        output=output,
        dtype=p.transform.name,
        dry_run=dry_run,
        layers=p.plan.layers,
        experts_per_layer=p.plan.config.n_routed_experts,
        num_experts_per_tok=p.plan.config.num_experts_per_tok,
        group_policy=p.plan.group_policy,
        tensors=sum(len(u.tensors) for u in p.units),
        params=p.params,
        bytes_by_dtype=dict(sorted(by_dtype.items())),
        total_size=sum(by_dtype.values()),
        shards=len(layout(p.units, max_shard_bytes)),
        selected_source_bytes=sum(selected_bytes(p.ck, j) for j in p.jobs),
        copied_files=p.copy,
        dropped_files=p.dropped,
        dropped_source_tensors=len(set(p.ck.tensors) - used),
        notes=p.plan.notes,
        source_total_bytes=sum(p.ck.source.size(f) for f in p.ck.source.list_files()),
        planning_bytes_read=p.ck.source.bytes_read,
        bytes_to_read=sum(selected_bytes(p.ck, j) for j in p.jobs) + sum(p.ck.source.size(f) for f in p.copy),
    )


def dry_run(p: Prepared, output: str, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES) -> ConvertSummary:
    return _summary(p, output, dry_run=True, max_shard_bytes=max_shard_bytes)


def run_convert(
    p: Prepared,
    output: str | Path,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    resume: bool = False,
    progress: bool = True,
) -> ConvertSummary:
    from tqdm import tqdm

    t0 = time.perf_counter()
    summary = _summary(p, str(output), dry_run=False, max_shard_bytes=max_shard_bytes)
    ck = p.ck
    plan_bytes = p.plan.to_bytes()
    card = model_card(p.config, p.plan, params=p.params, total_size=summary.total_size,
                      src_layers=int(ck.config["num_hidden_layers"]), src_experts=int(ck.config.get("n_routed_experts") or 0))
    out = ReducedCheckpoint(ck.source, p.config, files={PLAN_FILE: plan_bytes, "README.md": card.encode()})
    key = hashlib.sha256(config_bytes(p.config) + plan_bytes + p.transform.key().encode()).hexdigest()
    read0 = ck.source.bytes_read
    with OutputDir(output, source=ck.description, overwrite=overwrite, resume=resume,
                   planned_bytes=out.planned_bytes(p.units, max_shard_bytes)) as od:
        out.write_files(od.partial)
        tensor_read0 = ck.source.bytes_read
        prefetcher = Prefetcher(ck, _read_order(ck, p.jobs))
        pck = PrefetchedCheckpoint(ck, prefetcher)
        units = [WriteUnit(u.tensors, (lambda j=j: p.transform.produce(pck, j))) for u, j in zip(p.units, p.jobs)]
        try:
            with tqdm(total=summary.total_size, unit="B", unit_scale=True, desc="convert", disable=not progress or None,
                      dynamic_ncols=True, leave=False) as bar:
                res = out.write_tensors(od.partial, units, max_shard_bytes=max_shard_bytes, resume=resume and od.resumed,
                                      key=key, on_tensor=lambda t: bar.update(t.nbytes),
                                      after=lambda: p.transform.output_files(ck.description, str(output)))
        finally:
            prefetcher.close()
        summary.tensor_bytes_read = ck.source.bytes_read - tensor_read0
        od.commit()
    summary.bytes_read = ck.source.bytes_read - read0
    summary.reused_shards = len(res.reused_shards)
    summary.seconds = round(time.perf_counter() - t0, 3)
    return summary
