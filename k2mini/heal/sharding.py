"""How heal spreads the student over the ranks: FSDP2 (``torch.distributed.fsdp.fully_shard``)
or DDP (through accelerate), and what each rank then holds.

FSDP2 shards every decoder layer, then the root (the embeddings, final norm and head that
are left), the layout torchtune and accelerate use: a layer's full weights exist only while
it runs (all-gathered before its forward and backward, freed after), gradients are
reduce-scattered, and each rank keeps 1/N of the weights and of the optimizer state. For
``lora`` the frozen base is sharded the same way and only the adapters have optimizer state.
accelerate 1.16 switches FSDP on only with GPUs, so torch's API is called directly: the
same code runs on CPU with gloo, which is how the tests show that N ranks train what one does.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def default_fsdp(ranks: int, replica_fits: bool) -> bool:
    """FSDP2 on several ranks when a full replica of ``method``'s training state (weights,
    and for the trained ones FP32 master, gradient and AdamW moments) does not fit the device;
    DDP otherwise. DDP is the faster where it fits: it exchanges only gradients, once per step,
    where FSDP2 also all-gathers every weight in forward and again in backward (measured on
    CPU/gloo, nano K2, 2 ranks: FSDP2 at 0.61x DDP's tokens/s for lora, 0.64x for full;
    scripts/bench_heal.py --parallel)."""
    return ranks > 1 and not replica_fits


def ensure_process_group(device: torch.device) -> None:
    """FSDP2 needs a process group; a single process (no torchrun) gets a one-rank one in memory."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)


def shard(root: torch.nn.Module, layers, device: torch.device, *, mixed_precision: bool = False, cpu_offload: bool = False) -> None:
    """``fully_shard`` each of ``layers``, then ``root`` (the module whose forward runs the step).

    ``mixed_precision``: BF16 weights in forward and backward, gradients reduced in FP32 (FP32
    masters stay sharded). ``cpu_offload``: the sharded weights, gradients and optimizer state
    live in host memory, copied to the GPU a layer at a time. Both are GPU options.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    ensure_process_group(device)
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    kw = {"mesh": mesh, "offload_policy": CPUOffloadPolicy() if cpu_offload else OffloadPolicy(),
          "mp_policy": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if mixed_precision
          else MixedPrecisionPolicy()}
    if not cpu_offload:
        root.to(device)
    for layer in layers:
        fully_shard(layer, **kw)
    fully_shard(root, **kw)


def is_sharded(module: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(module, FSDPModule)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def resident_bytes(module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, int]:
    """Bytes this rank holds of the parameters and of the optimizer state, read off the
    tensors' own storages (the local shard of a sharded one), each storage counted once."""
    def total(tensors) -> int:
        seen, n = set(), 0
        for t in tensors:
            s = _local(t).untyped_storage()
            if s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                n += s.nbytes()
        return n

    opt = [v for st in optimizer.state.values() for v in st.values() if isinstance(v, torch.Tensor)]
    return {"params": total(p.detach() for p in module.parameters()), "optimizer": total(opt)}
