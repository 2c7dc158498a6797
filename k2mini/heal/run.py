"""``k2mini heal`` end to end: check that the reduced model and the teacher cache belong
together, train (heal/recipe.py), and write the healed checkpoint atomically (rank 0)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, replace
from pathlib import Path

import torch

from k2mini import __version__
from k2mini.checkpoint.reader import Checkpoint
from k2mini.checkpoint.source import refuse_output_inside
from k2mini.errors import UsageError
from k2mini.heal import state
from k2mini.heal.sharding import default_fsdp
from k2mini.heal.gather import LayerGather, in_group_order
from k2mini.heal.output import LOSS_PNG, REPORT, card_section, plot_log, weight_names, write_healed
from k2mini.heal.recipe import LOG_FILE, HealOptions, HealResult, train, write_log
from k2mini.teacher.cache import TeacherCache


def open_reduced(path: str) -> Checkpoint:
    """REDUCED, refused in one line unless it is a BF16 k2mini output."""
    ck = Checkpoint.open(path)
    q = ck.config.get("quantization_config")
    if q:
        kind = q.get("quant_method", "quantized")
        raise UsageError(
            f"{path}: is {kind}; heal trains BF16 weights. Convert again with --dtype bf16 (same plan: --plan {path}/plan.json), "
            "heal that, then quantize the healed model (k2mini quantize)")
    if "source_config_sha256" not in (ck.config.get("k2mini") or {}):
        raise UsageError(f"{path}/config.json: no k2mini provenance block; heal needs a checkpoint written by k2mini convert")
    return ck


def check_pair(reduced: Checkpoint, cache: TeacherCache, reduced_arg: str) -> None:
    """The cache must come from the source REDUCED was cut from, with its tokenizer and vocabulary."""
    k = reduced.config["k2mini"]
    cache.check_source(k["source_config_sha256"], k.get("source_index_sha256"), what=reduced_arg)
    tok = cache.manifest.tokenizer
    if tok.vocab_size != int(reduced.config["vocab_size"]):
        raise UsageError(f"--teacher {cache.path}: vocabulary {tok.vocab_size} differs from {reduced_arg}'s {reduced.config['vocab_size']}")
    if reduced.source.exists(tok.file) and hashlib.sha256(reduced.source.read_bytes(tok.file)).hexdigest() != tok.sha256:
        raise UsageError(f"--teacher {cache.path}: made with another {tok.file} than {reduced_arg}/{tok.file}")


def refuse_outputs(out: Path, reduced_arg: str, reduced: Checkpoint, teacher: str) -> None:
    refuse_output_inside(reduced_arg, out, flag="--output")
    refuse_output_inside(teacher, out, flag="--output")
    src = reduced.config["k2mini"].get("source")
    if isinstance(src, str) and Path(src).is_dir():
        refuse_output_inside(src, out, flag="--output")


def _replica_fits(reduced: Checkpoint, opts: HealOptions, device: torch.device, seq_len: int, world: int) -> bool:
    """Whether a full replica (DDP) of ``opts.method``'s training state fits one GPU (heal/memory.py); always on CPU."""
    if device.type != "cuda":
        return True
    from k2mini.heal import memory

    free = torch.cuda.get_device_properties(device).total_memory
    p = memory.plan(reduced.config, gpus=world, gpu_bytes=free, seq_len=seq_len, batch_per_gpu=opts.batch_size // world,
                    lora_rank=opts.lora_rank, checkpointing=opts.gradient_checkpointing)
    return p["methods"][opts.method]["layouts"]["DDP"]["fits"]


def run_heal(reduced_arg: str, teacher_arg: str, out: Path, opts: HealOptions, *, device: str = "cpu",
             overwrite: bool = False, resume: bool = False) -> tuple[dict | None, HealResult]:
    """Returns (the heal block written into config.json on rank 0, else None; the result)."""
    from accelerate import Accelerator

    from k2mini.model.hf import load_checkpoint_model
    from k2mini.output import open_on_main_rank, partial_dir

    reduced = open_reduced(reduced_arg)
    cache = TeacherCache(teacher_arg)
    check_pair(reduced, cache, reduced_arg)
    refuse_outputs(out, reduced_arg, reduced, teacher_arg)
    # Mixed precision: accelerate's autocast under DDP, FSDP2's own policy when sharded.
    accelerator = Accelerator(cpu=device == "cpu", mixed_precision="bf16" if opts.mixed_precision and not opts.fsdp else "no")
    world = accelerator.num_processes
    if opts.batch_size % world:
        raise UsageError(f"--batch-size {opts.batch_size}: must be a multiple of the {world} ranks (each takes an equal slice)")
    if opts.fsdp is None:
        opts = replace(opts, fsdp=default_fsdp(world, _replica_fits(reduced, opts, accelerator.device, cache.seq_len, world)))
    cache.verify()  # a corrupt shard is found now, not hours into training
    planned = sum(reduced.info(n).nbytes for n in weight_names(reduced)) + (1 << 20)
    with open_on_main_rank(out, state=accelerator.state, source=reduced_arg, overwrite=overwrite, resume=resume,
                           planned_bytes=planned) as od:
        cuda = accelerator.device.type == "cuda"
        # On CUDA the frozen weights stay BF16 (LoRA, router); trained ones are FP32 masters
        # computed in BF16 (mixed precision); on CPU everything is FP32.
        # (FSDP2 without mixed precision all-gathers each layer in its stored dtype: one dtype, FP32.)
        load_dtype = torch.bfloat16 if cuda and opts.method != "full" and (opts.mixed_precision or not opts.fsdp) else torch.float32
        model = load_checkpoint_model(reduced, dtype=load_dtype)
        work = partial_dir(out)
        student, result = train(model, cache, opts, work=work, accelerator=accelerator)
        names = in_group_order(weight_names(reduced))
        gather = LayerGather(student, student.trained, keep=od is not None)
        if od is None:
            gather.follow(names)  # rank 0's all-gathers, one layer at a time
            return None, result
        ro = opts.resolved()
        evals = [x.eval_kl for x in result.log if x.eval_kl is not None]
        block = {
            "tool_version": __version__,
            "teacher": str(teacher_arg),
            "teacher_manifest_sha256": cache.manifest_sha256(),
            "teacher_top_k": cache.top_k,
            "teacher_tokens": cache.manifest.tokens,
            "method": ro.method, "lora_rank": ro.lora_rank if ro.method == "lora" else None,
            "steps": ro.steps, "batch_size": ro.batch_size, "lr": ro.lr, "ce_weight": ro.ce_weight, "seed": ro.seed,
            "bias_gamma": ro.bias_gamma if ro.method in ("router", "full") else None,
            "eval_fraction": ro.eval_fraction, "train_sequences": result.train_sequences, "eval_sequences": result.eval_sequences,
            "tokens_seen": result.tokens_seen,
            "first_loss": result.log[0].loss, "last_loss": result.log[-1].loss,
            "first_eval_kl": evals[0] if evals else None, "last_eval_kl": evals[-1] if evals else None,
        }
        write_log(od.partial / LOG_FILE, result.log)
        plot_log([asdict(x) for x in result.log], od.partial / LOSS_PNG)
        write_healed(od.partial, reduced, names, gather.get, block, card_section(block), own_files=(LOG_FILE, LOSS_PNG, REPORT))
        state.remove(work)
        report = {"heal": block, "ranks": result.ranks, "parallel": result.parallel, "seconds": result.seconds,
                  "tokens_per_second": result.tokens_per_second, "peak_gpu_bytes": result.peak_gpu_bytes,
                  "peak_host_bytes": result.peak_host_bytes, "resident_bytes_per_rank": result.resident_per_rank,
                  "gather_peak_bytes": gather.peak_bytes, "resumed_from_step": result.resumed_from_step}
        (od.partial / REPORT).write_text(json.dumps(report, indent=1))
        od.commit()
        return block, result
