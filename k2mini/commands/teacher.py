"""``k2mini teacher``: run the unpruned source once over a corpus and cache its predictions."""

from __future__ import annotations

import json
import math
from pathlib import Path

import click

from k2mini.errors import UsageError
from k2mini.sizes import format_size, parse_size


@click.command("teacher")
@click.option("--source", "-s", required=True, help="The unpruned source checkpoint (K2 / DeepSeek-V3 format): a directory or a Hub repo id org/name[@revision].")
@click.option("--output", "-o", required=True, type=click.Path(file_okay=False, path_type=Path), help="The cache directory to write.")
@click.option("--calib", "calib", multiple=True, metavar="[NAME=]SPEC",
              help="Corpus, repeatable, as for analyze: builtin (prose+code), builtin:prose, builtin:code, a text file or "
                   "a .jsonl file with a 'text' field (FILE.jsonl:FIELD for another field). Default: builtin.")
@click.option("--samples", type=click.IntRange(min=1), default=None, help="Sequences in the corpus [default: 32] (split evenly across sources).")
@click.option("--seq-len", default=512, show_default=True, type=int, help="Tokens per sequence.")
@click.option("--tokens", type=click.IntRange(min=1), default=None, help="Instead of --samples: at least this many tokens (whole sequences).")
@click.option("--seed", default=0, show_default=True, type=int, help="Shuffles each source's documents before they are cut into sequences.")
@click.option("--top-k", default=64, show_default=True, type=int, help="Teacher log-probs kept per position (392 bytes per token at 64).")
@click.option("--memory-budget", default="4GiB", show_default=True,
              help="RAM for the activations of one block of sequences (G = 10^9 bytes, GiB = 2^30); sets the block size unless --block-sequences does "
                   "(beyond the budget activations are kept on disk).")
@click.option("--block-sequences", type=click.IntRange(min=1), default=None,
              help="Sequences per block: each block is one sweep through every layer (the source is read once per block) "
                   "and one shard. Default: as many as fit --memory-budget.")
@click.option("--device", default="auto", show_default=True,
              help="Where the resident layer and the batch being computed live: auto (CUDA if present; under torchrun each "
                   "rank's local GPU), cpu, cuda, cuda:N. FP8 weights are copied as FP8 and dequantized there.")
@click.option("--dtype", "dtype_name", type=click.Choice(["auto", "float32", "bfloat16"]), default="auto", show_default=True,
              help="Compute dtype: auto = float32 on CPU, bfloat16 on CUDA.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty output (only once the new one is complete).")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run: finished blocks are kept (each block file is complete once it exists) and "
                   "only the missing ones are computed; the result is byte-identical to an uninterrupted run.")
@click.option("--engine", type=click.Choice(["auto", "layerwise", "vllm"]), default="auto", show_default=True,
              help="layerwise: stream the source one decoder layer at a time (any machine, one GPU or CPU); vllm: run it "
                   "in vLLM, held across GPUs and nodes (--tensor/pipeline/data-parallel-size). auto: vllm when "
                   "--engine-python is given or this interpreter has vllm, else layerwise.")
@click.option("--engine-python", default=None, metavar="PATH",
              help="With --engine vllm: the python of the environment that has vLLM (it runs in a subprocess of it).")
@click.option("--tensor-parallel-size", type=int, default=1, show_default=True, help="vllm: GPUs each layer is split over.")
@click.option("--pipeline-parallel-size", type=int, default=1, show_default=True, help="vllm: stages the layers are split into (e.g. one per node).")
@click.option("--data-parallel-size", type=int, default=1, show_default=True,
              help="vllm: engine replicas on this node, each computing a share of every block (with --enable-expert-parallel: DP + EP).")
@click.option("--enable-expert-parallel", is_flag=True, help="vllm: spread the routed experts over the GPUs instead of splitting each.")
@click.option("--max-model-len", type=int, default=None, help="vllm: context length to reserve KV cache for [default: --seq-len + 1].")
@click.option("--gpu-memory-utilization", type=float, default=None, help="vllm: share of each GPU's memory vLLM may use [vLLM's default].")
@click.option("--engine-arg", "engine_arg", multiple=True, metavar="KEY=VALUE",
              help="vllm: any other LLM(...) argument, repeatable; VALUE is read as JSON when it parses (e.g. "
                   "distributed_executor_backend=ray, enforce_eager=true, max_num_seqs=64).")
@click.option("--engine-timeout", type=float, default=3600.0, show_default=True,
              help="vllm: seconds without an answer from the engine (loading the model included) before it counts as hung.")
@click.option("--dry-run", is_flag=True, help="Print tokens, cache bytes, bytes read per layer and a time estimate from a short probe; write nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print the result (or the --dry-run estimate) as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def teacher_cmd(source, output, calib, samples, seq_len, tokens, seed, top_k, memory_budget, block_sequences, device, dtype_name,
                overwrite, resume, engine, engine_python, tensor_parallel_size, pipeline_parallel_size, data_parallel_size,
                enable_expert_parallel, max_model_len, gpu_memory_utilization, engine_arg, engine_timeout, dry_run, as_json,
                quiet) -> None:
    """Run SOURCE (the unpruned model) once over a corpus and cache what it predicts at every
    position: the top-k token ids and their log-probs (of the full softmax), so the tail mass
    is exact, plus (layerwise engine) the log-sum-exp of the full logits. `k2mini heal` trains
    a reduced model on the cache, from either engine.

    Two engines write the same cache: layerwise streams the source one decoder layer at a
    time (any machine that holds one layer: one GPU, or CPU); vllm runs it in vLLM, which
    holds the model across GPUs and nodes in the layout given (tensor, pipeline, data and
    expert parallel), in a subprocess of --engine-python.

    The corpus is cut into blocks of whole sequences; each block is one sweep through every
    layer and one shard, so memory stays that of one block however large the corpus, and
    --resume continues after the last finished block.

    Data-parallel (layerwise): launch with torchrun or accelerate launch; rank r computes
    blocks r, r+N, ... and the cache equals a one-process run byte for byte. The vllm engine
    is launched once: vLLM does its own parallelism (across nodes through Ray:
    --engine-arg distributed_executor_backend=ray).

    \b
    Examples:
      k2mini teacher -s ./Kimi-K2-Instruct -o ./k2.teacher --calib corpus.jsonl --tokens 10000000 --seq-len 4096
      k2mini teacher -s ./tiny-k2 -o ./tiny.teacher --samples 64 --seq-len 128 --top-k 32
      k2mini teacher -s ./Kimi-K2-Instruct -o ./k2.teacher --calib corpus.jsonl --tokens 10000000 --dry-run
      torchrun --nproc_per_node 8 $(which k2mini) teacher -s ./Kimi-K2-Instruct -o ./k2.teacher --calib corpus.jsonl \\
          --tokens 10000000 --seq-len 4096 --block-sequences 256
      k2mini teacher -s ./Kimi-K2-Instruct -o ./k2.teacher --calib corpus.jsonl --tokens 10000000 --resume
      k2mini teacher -s ./Kimi-K2-Instruct -o ./k2.teacher --calib corpus.jsonl --tokens 1000000000 --seq-len 4096 \\
          --engine vllm --engine-python ~/vllm/bin/python --tensor-parallel-size 8
      k2mini teacher -s ./Kimi-K2-Instruct -o ./k2.teacher --calib corpus.jsonl --tokens 1000000000 --seq-len 4096 \\
          --engine vllm --tensor-parallel-size 8 --pipeline-parallel-size 2 --engine-arg distributed_executor_backend=ray
    """
    import torch

    from k2mini.analysis.calibration import build_calibration
    from k2mini.analysis.tokenizer import load_tokenizer
    from k2mini.checkpoint.reader import Checkpoint
    from k2mini.engine.process import check_engine_python, vllm_here
    from k2mini.model.device import resolve_device
    from k2mini.output import check_output
    from k2mini.teacher.run import TeacherOptions, check_top_k, estimate, run_teacher, tokenizer_identity

    if samples is not None and tokens is not None:
        raise UsageError("--samples and --tokens: give one of them")
    if seq_len < 2:
        raise UsageError(f"--seq-len {seq_len}: must be >= 2")
    if resume and overwrite:
        raise UsageError("--resume and --overwrite: give one of them")
    if engine == "auto":
        engine = "vllm" if engine_python is not None or vllm_here() else "layerwise"
    vllm_flags = {"--engine-python": engine_python is not None, "--tensor-parallel-size": tensor_parallel_size != 1,
                  "--pipeline-parallel-size": pipeline_parallel_size != 1, "--data-parallel-size": data_parallel_size != 1,
                  "--enable-expert-parallel": enable_expert_parallel, "--max-model-len": max_model_len is not None,
                  "--gpu-memory-utilization": gpu_memory_utilization is not None, "--engine-arg": bool(engine_arg)}
    if engine == "layerwise" and any(vllm_flags.values()):
        raise UsageError(f"{next(f for f, given in vllm_flags.items() if given)}: only for --engine vllm")
    if engine == "vllm" and (device != "auto" or dtype_name == "float32"):
        raise UsageError("--device/--dtype float32: only for --engine layerwise (vLLM places the model itself and computes in BF16)")
    n_samples = math.ceil(tokens / seq_len) if tokens is not None else (samples or 32)
    budget = parse_size(memory_budget, flag="--memory-budget", minimum=0)
    ck = Checkpoint.open(source)
    check_top_k(top_k, int(ck.config["vocab_size"]))
    if engine == "vllm":
        from k2mini.teacher.vllm_engine import VllmOptions, check_options

        vopts = VllmOptions(python=check_engine_python(engine_python), top_k=top_k, block_sequences=block_sequences,
                            memory_budget=budget, tensor_parallel_size=tensor_parallel_size,
                            pipeline_parallel_size=pipeline_parallel_size, data_parallel_size=data_parallel_size,
                            enable_expert_parallel=enable_expert_parallel, max_model_len=max_model_len,
                            gpu_memory_utilization=gpu_memory_utilization, dtype="auto" if dtype_name == "auto" else dtype_name,
                            extra=_engine_args(engine_arg), timeout=engine_timeout, progress=not quiet and not as_json)
        check_options(vopts, seq_len, int(ck.config["vocab_size"]))
    if not dry_run:
        check_output(output, source=source, overwrite=overwrite, resume=resume)  # before the corpus is tokenized
    tok = load_tokenizer(ck)
    calib_set = build_calibration(tok, list(calib) or None, samples=n_samples, seq_len=seq_len, seed=seed)
    if engine == "vllm":
        from k2mini.teacher.vllm_engine import estimate_cache, run_teacher_vllm

        if dry_run:
            est = estimate_cache(calib_set, vopts)
            _echo_estimate(est, as_json, f"in vLLM with {json.dumps(est['engine_args'])}", ", no log-sum-exp", [])
            return
        manifest, stats = run_teacher_vllm(ck, calib_set, tokenizer_identity(ck, tok.eos_id), output, vopts, source_arg=source,
                                           overwrite=overwrite, resume=resume)
        _report(output, manifest, stats, as_json)
        return
    dev = resolve_device(device)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype_name) or (torch.float32 if dev.type == "cpu" else torch.bfloat16)
    opts = TeacherOptions(top_k=top_k, memory_budget=budget, block_sequences=block_sequences, device=str(dev), dtype=dtype,
                          progress=not quiet and not as_json)
    if dry_run:
        est = estimate(ck, calib_set, opts)
        _echo_estimate(est, as_json, f"on {est['device']}", "", [
            f"  reads: at most {format_size(est['bytes_read_per_sweep'])} per sweep (largest layer "
            f"{format_size(max(est['bytes_read_per_layer'], default=0))}; MoE layers read only routed experts), "
            f"{format_size(est['bytes_read_total'])} in all",
            f"  time: about {est['estimated_seconds'] / 3600:.2f} h on this process (from a probe of {est['probe_tokens']} "
            "tokens through the first dense and MoE layers, reads included; divide by the ranks you launch)"])
        return
    manifest, stats = run_teacher(ck, calib_set, tokenizer_identity(ck, tok.eos_id), output, opts, source_arg=source,
                                  overwrite=overwrite, resume=resume)
    if manifest is None:  # not rank 0: rank 0 reports
        return
    _report(output, manifest, stats, as_json)


def _echo_estimate(est: dict, as_json: bool, where: str, note: str, more: list[str]) -> None:
    """What --dry-run prints (``est``: the engine's estimate)."""
    if as_json:
        click.echo(json.dumps(est, indent=1))
        return
    click.echo(f"teacher (dry run, nothing written): {est['tokens']:,} tokens = {est['sequences']:,} sequences x {est['seq_len']}, "
               f"top-k {est['top_k']}, {where}")
    click.echo(f"  cache: {format_size(est['cache_bytes'])} ({est['bytes_per_token']} B/token{note}) in {est['blocks']} block(s) "
               f"of {est['block_sequences']} sequences")
    for line in more:
        click.echo(line)


def _engine_args(pairs: tuple[str, ...]) -> dict:
    """--engine-arg KEY=VALUE pairs as LLM(...) keyword arguments (VALUE as JSON when it parses)."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.isidentifier():
            raise UsageError(f"--engine-arg {pair!r}: expected KEY=VALUE with KEY an LLM(...) argument name")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def _report(output: Path, manifest, stats, as_json: bool) -> None:
    total = sum(s.bytes_requested for s in stats)
    result = {
        "output": str(output), "manifest_sha256": manifest.sha256(output), "engine": manifest.compute.get("engine"),
        "sequences": manifest.sequences, "tokens": manifest.tokens, "top_k": manifest.top_k, "shards": len(manifest.shards),
        "cache_bytes": sum(s.bytes for s in manifest.shards), "bytes_per_token": manifest.bytes_per_token,
        "ranks": len(stats), "seconds": max(s.seconds for s in stats),
        "per_rank": [{"rank": s.rank, "blocks": s.blocks, "blocks_resumed": s.blocks_resumed, "sequences": s.sequences,
                      "seconds": round(s.seconds, 3), "bytes_requested": s.bytes_requested,
                      "bytes_from_storage": s.bytes_from_storage, **({"engine": s.engine} if s.engine else {})} for s in stats],
    }
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    secs = result["seconds"]
    engine = manifest.compute.get("engine")
    click.echo(f"wrote {output}: {manifest.tokens:,} tokens ({manifest.sequences:,} x {manifest.seq_len}), top-{manifest.top_k}, "
               f"{len(manifest.shards)} shard(s), {format_size(result['cache_bytes'])} ({manifest.bytes_per_token} B/token)")
    if engine == "vllm":
        e = stats[0].engine
        click.echo(f"  vllm {manifest.compute.get('engine_version')}: {secs:.1f} s, {manifest.tokens / max(secs, 1e-9):,.0f} tokens/s "
                   f"(model load {e.get('load_seconds', 0):.1f} s, generate {e.get('generate_seconds', 0):.1f} s); "
                   f"{stats[0].blocks} block(s)" + (f", {stats[0].blocks_resumed} resumed" if stats[0].blocks_resumed else ""))
    else:
        click.echo(f"  {len(stats)} rank(s), {secs:.1f} s, {manifest.tokens / max(secs, 1e-9):,.0f} tokens/s; "
                   f"read {format_size(total)} from the source in all"
                   + "".join(f"; rank {s.rank}: {s.blocks} block(s), {format_size(s.bytes_requested)}"
                             + (f", {s.blocks_resumed} resumed" if s.blocks_resumed else "") for s in stats))
    click.echo(f"  manifest sha256 {result['manifest_sha256']}")
