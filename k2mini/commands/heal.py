"""``k2mini heal``: distil a reduced checkpoint from the cached teacher."""

from __future__ import annotations

import json
from pathlib import Path

import click

from k2mini.errors import UsageError
from k2mini.sizes import format_size


@click.command("heal")
@click.argument("reduced", required=False)
@click.option("--teacher", "-t", "teacher", default=None, help="The teacher cache (k2mini teacher's output) of the source REDUCED was cut from.")
@click.option("--output", "-o", type=click.Path(file_okay=False, path_type=Path), default=None, help="The healed checkpoint to write.")
@click.option("--method", type=click.Choice(["router", "lora", "full"]), default="lora", show_default=True,
              help="What is trained: router = gate rows (correction bias by DeepSeek-V3's balancing rule); lora = LoRA on "
                   "attention, dense MLP, shared and routed experts, merged before writing; full = every weight. lora is the "
                   "default: in the nano study (analysis/results/study_heal.md) it removed 60-76% of the KL at every cut, more "
                   "than full in the same steps (router: 0-29%), and at K2's 24 x 16 it fits one 80 GB GPU, full does not.")
@click.option("--steps", type=int, default=None, help="Optimizer steps [default: from the cache, see --epochs].")
@click.option("--epochs", type=float, default=None,
              help="Instead of --steps: passes over the training share of the cache [default: 3, at most 20,000 steps. On five "
                   "nano K2s (3 cuts each, 65,536-token caches) 3 epochs of lora removed at least half of the held-out KL in "
                   "all 30 cut x domain cells (54-93%); 2 epochs left one at 49%: analysis/results/heal_defaults_sweep.md].")
@click.option("--lr", type=float, default=None, help="Peak learning rate [default: router 1e-2, lora 3e-3, full 3e-4, from the nano study "
              "and sweep]; transformers' linear warm-up, then cosine to 10%.")
@click.option("--batch-size", type=int, default=8, show_default=True, help="Sequences per step over all ranks (a multiple of the ranks).")
@click.option("--lora-rank", type=int, default=None, help="LoRA rank (--method lora only) [default: 16].")
@click.option("--ce-weight", type=float, default=0.0, show_default=True, help="Add this x cross-entropy on the corpus tokens to the KL.")
@click.option("--eval-fraction", type=float, default=0.1, show_default=True, help="Share of the cache's sequences held out for the held-out KL.")
@click.option("--eval-every", type=int, default=None, help="Steps between held-out evaluations [default: a tenth of the run].")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", "checkpointing", default=None,
              help="Recompute each decoder layer in backward instead of keeping its activations [default: on with CUDA, off on CPU].")
@click.option("--fsdp/--no-fsdp", "fsdp", default=None,
              help="Shard weights, gradients and optimizer state over the ranks with FSDP2 (each rank holds 1/N), instead of a "
                   "full replica per rank (DDP) [default: FSDP2 on several GPUs when a replica of the method's training state does "
                   "not fit one (heal --dry-run shows both), DDP otherwise: DDP exchanges only gradients, FSDP2 also all-gathers "
                   "every weight in forward and backward; measured on CPU, nano K2, 2 ranks: FSDP2 at 0.61x DDP's tokens/s for "
                   "lora, 0.64x for full (scripts/bench_heal.py --parallel)]. --fsdp on one process runs too.")
@click.option("--mixed-precision/--no-mixed-precision", "mixed_precision", default=None,
              help="BF16 compute over FP32 trained weights, gradients reduced in FP32 (accelerate's under DDP, FSDP2's policy "
                   "when sharded) [default: on with CUDA, off on CPU].")
@click.option("--cpu-offload", is_flag=True, help="With --fsdp on GPUs: keep the sharded weights, gradients and optimizer state in "
              "host memory, a layer at a time on the GPU (slower; for cuts that do not fit even sharded).")
@click.option("--seed", type=int, default=0, show_default=True, help="Data order, held-out split and LoRA initialisation.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if present; under torchrun each rank's local GPU), cpu, cuda, cuda:N.")
@click.option("--overwrite", is_flag=True, help="Replace an existing non-empty output (only once the new one is complete).")
@click.option("--resume", is_flag=True, help="Continue an interrupted run from its last training checkpoint (saved with every evaluation).")
@click.option("--dry-run", is_flag=True, help="Print per-GPU memory for each method, from the config alone (REDUCED may be a "
              "directory holding only a config.json); train nothing.")
@click.option("--gpus", type=int, default=1, show_default=True, help="With --dry-run: GPUs the run would use.")
@click.option("--gpu", "gpu_profile", default="h100", show_default=True, help="With --dry-run: GPU profile (configs/gpus/) or a profile .json.")
@click.option("--seq-len", type=int, default=None, help="With --dry-run and no --teacher: tokens per sequence [default: 4096].")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def heal_cmd(reduced, teacher, output, method, steps, epochs, lr, batch_size, lora_rank, ce_weight, eval_fraction, eval_every,
             checkpointing, fsdp, mixed_precision, cpu_offload, seed, device, overwrite, resume, dry_run, gpus, gpu_profile, seq_len, as_json, quiet) -> None:
    """Distil REDUCED (a k2mini BF16 output) from the cached predictions of the unpruned
    source (`k2mini teacher`): forward KL(teacher || student) over the teacher's top-k ids
    plus a tail bucket, optionally plus cross-entropy. The output is a complete checkpoint
    in the same format as convert's, adapters merged: it loads in transformers, passes
    `k2mini validate` and can be quantized.

    An fp8 or int4 REDUCED is refused: convert the same plan with --dtype bf16, heal it,
    and quantize the result.

    Data-parallel: launch with torchrun or accelerate launch, DDP or FSDP2 (--fsdp); N ranks
    with the same --batch-size train the same weights as one. The training checkpoint
    (torch.distributed.checkpoint) resumes on any number of ranks.

    Amount of training: without --steps or --epochs, 3 passes over the cache's training
    share (its sequences less the --eval-fraction held out), at most 20,000 steps.

    \b
    Examples:
      k2mini heal ./k2-24x16 --teacher ./k2.teacher -o ./k2-24x16-healed
      k2mini heal ./tiny-3x4 -t ./tiny.teacher -o ./tiny-healed --method router --steps 50
      k2mini heal ./k2-24x16 -t ./k2.teacher -o ./healed --method lora --lora-rank 32 --epochs 1 --ce-weight 0.1
      torchrun --nproc_per_node 8 $(which k2mini) heal ./k2-24x16 -t ./k2.teacher -o ./healed --batch-size 64
      torchrun --nproc_per_node 8 $(which k2mini) heal ./k2-61x32 -t ./k2.teacher -o ./healed --fsdp --batch-size 64
      k2mini heal ./k2-24x16 --dry-run --gpus 8 --gpu h100
      k2mini heal ./k2-24x16 -t ./k2.teacher -o ./healed --resume
    """
    from k2mini.heal.recipe import HealOptions

    if steps is not None and epochs is not None:
        raise UsageError("--steps and --epochs: give one of them")
    if steps is not None and steps < 1:
        raise UsageError(f"--steps {steps}: must be >= 1")
    if epochs is not None and epochs <= 0:
        raise UsageError(f"--epochs {epochs}: must be > 0")
    if lr is not None and not lr > 0:
        raise UsageError(f"--lr {lr}: must be > 0")
    if lora_rank is not None and method != "lora":
        raise UsageError(f"--lora-rank is for --method lora (got --method {method})")
    if lora_rank is not None and lora_rank < 1:
        raise UsageError(f"--lora-rank {lora_rank}: must be >= 1")
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: must be >= 1")
    if not 0 <= eval_fraction < 1:
        raise UsageError(f"--eval-fraction {eval_fraction}: must be in [0, 1)")
    if ce_weight < 0:
        raise UsageError(f"--ce-weight {ce_weight}: must be >= 0")
    if eval_every is not None and eval_every < 1:
        raise UsageError(f"--eval-every {eval_every}: must be >= 1")
    if cpu_offload and fsdp is not True:
        raise UsageError("--cpu-offload: offloads FSDP2's shards; give --fsdp too")
    if resume and overwrite:
        raise UsageError("--resume and --overwrite: give one of them")
    if reduced is None:
        raise UsageError("REDUCED: give the reduced checkpoint to heal (k2mini heal REDUCED --teacher T -o OUT)")
    if dry_run:
        _dry_run(reduced, teacher, method, batch_size, lora_rank, gpus, gpu_profile, seq_len, checkpointing is not False, as_json)
        return
    if teacher is None:
        raise UsageError("--teacher: required (the cache k2mini teacher wrote for REDUCED's source)")
    if output is None:
        raise UsageError("--output: required")

    from k2mini.heal.run import run_heal
    from k2mini.model.device import resolve_device
    from k2mini.teacher.cache import TeacherCache

    dev = resolve_device(device)
    if cpu_offload and dev.type != "cuda":
        raise UsageError("--cpu-offload: is for GPUs (on CPU the weights are in host memory already)")
    n_steps = steps
    if n_steps is None:
        from k2mini.heal.recipe import DEFAULT_EPOCHS, default_steps, split

        train_n = len(split(TeacherCache(teacher).sequences, eval_fraction, seed)[0])
        n_steps = default_steps(train_n, batch_size, epochs if epochs is not None else DEFAULT_EPOCHS)
    opts = HealOptions(method=method, steps=n_steps, lr=lr, batch_size=batch_size, lora_rank=lora_rank or 16,
                       ce_weight=ce_weight, eval_fraction=eval_fraction, eval_every=eval_every, seed=seed,
                       gradient_checkpointing=checkpointing if checkpointing is not None else dev.type == "cuda",
                       fsdp=fsdp, mixed_precision=mixed_precision if mixed_precision is not None else dev.type == "cuda",
                       cpu_offload=cpu_offload, progress=not quiet and not as_json)
    block, result = run_heal(reduced, teacher, output, opts, device=dev.type if dev.type == "cpu" else str(dev),
                             overwrite=overwrite, resume=resume)
    if block is None:  # not rank 0
        return
    summary = {"output": str(output), **block, "ranks": result.ranks, "parallel": result.parallel, "seconds": round(result.seconds, 3),
               "tokens_per_second": round(result.tokens_per_second, 1), "peak_gpu_bytes": result.peak_gpu_bytes,
               "resumed_from_step": result.resumed_from_step}
    if as_json:
        click.echo(json.dumps(summary, indent=1))
        return
    click.echo(f"wrote {output}: {block['method']} healing, {block['steps']} steps, {block['tokens_seen']:,} teacher tokens seen")
    click.echo(f"  train KL {block['first_loss']:.4f} -> {block['last_loss']:.4f}"
               + (f"; held-out KL {block['first_eval_kl']:.4f} -> {block['last_eval_kl']:.4f}" if block["first_eval_kl"] is not None else ""))
    click.echo(f"  {result.ranks} rank(s) ({result.parallel}), {result.seconds:.1f} s, {result.tokens_per_second:,.0f} tokens/s"
               + (f", peak GPU memory {format_size(result.peak_gpu_bytes, binary=True)}" if result.peak_gpu_bytes else "")
               + (f" (resumed at step {result.resumed_from_step})" if result.resumed_from_step else ""))
    click.echo(f"  next: k2mini validate {output} --reference SOURCE")


def _dry_run(reduced, teacher, method, batch_size, lora_rank, gpus, gpu_profile, seq_len, checkpointing, as_json) -> None:
    from k2mini.heal import memory
    from k2mini.validate.gpus import load_profile

    if gpus < 1:
        raise UsageError(f"--gpus {gpus}: must be >= 1")
    if batch_size % gpus:
        raise UsageError(f"--batch-size {batch_size}: must be a multiple of --gpus {gpus}")
    profile = load_profile(gpu_profile)
    cfg = _config_alone(reduced)
    if seq_len is None:
        if teacher is not None:
            from k2mini.teacher.cache import TeacherCache

            seq_len = TeacherCache(teacher).seq_len
        else:
            seq_len = 4096
    usable = profile.memory_bytes - profile.reserved_bytes
    p = memory.plan(cfg, gpus=gpus, gpu_bytes=usable, seq_len=seq_len, batch_per_gpu=batch_size // gpus,
                    lora_rank=lora_rank or 16, checkpointing=checkpointing)
    p["gpu"] = profile.name
    if as_json:
        click.echo(json.dumps(p, indent=1))
        return
    click.echo(f"heal (dry run): {reduced}, {p['params'] / 1e9:.2f}B parameters, {gpus} x {profile.name} "
               f"({format_size(usable, binary=True)} usable each), {batch_size // gpus} sequence(s) of {seq_len} tokens per GPU, gradient checkpointing "
               f"{'on' if checkpointing else 'off'}")
    def gib(n: float) -> str:
        return format_size(n, binary=True)

    click.echo(f"  per GPU: params | grads | AdamW state | activations = total (host memory per rank with offload); "
               f"FSDP2 shards every decoder layer, then the root, and gathers the root plus two layers at a time")
    for name, m in p["methods"].items():
        click.echo(f"  {name}: trainable {m['trainable_params'] / 1e6:,.2f}M, default layout {m['default']}"
                   + ("  <- --method" if name == method else ""))
        for layout, x in m["layouts"].items():
            host = f"  host {gib(x['host'])}/rank" if x["host"] else ""
            click.echo(f"    {layout:14s} {gib(x['params']):>10s} | {gib(x['grads']):>10s} | {gib(x['optimizer']):>10s} | "
                       f"{gib(x['activations']):>9s} = {gib(x['total']):>10s}  {'fits' if x['fits'] else 'does NOT fit'}{host}")


def _config_alone(reduced: str) -> dict:
    """REDUCED's config.json: a checkpoint, or a directory holding only the config (plan a run before converting)."""
    from k2mini.checkpoint.reader import Checkpoint

    cfg_path = Path(reduced) / "config.json"
    if Path(reduced).is_dir() and cfg_path.is_file() and not any(Path(reduced).glob("*.safetensors*")):
        try:
            return json.loads(cfg_path.read_text())
        except ValueError as exc:
            raise UsageError(f"{cfg_path}: not valid JSON ({exc})") from None
    return Checkpoint.open(reduced).config
