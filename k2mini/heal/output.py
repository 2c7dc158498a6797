"""A healed model written back as a plain checkpoint in the reduced model's own format:
the same tensor names, shapes and dtypes (adapters merged), sharded by the project's writer,
with the reduced model's other files, its config extended by a ``k2mini.heal`` block, and
the model card, training log and loss curve."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from k2mini.checkpoint.names import Role
from k2mini.checkpoint.reader import Checkpoint
from k2mini.checkpoint.safetensors_format import PlannedTensor
from k2mini.checkpoint.reduced import ReducedCheckpoint
from k2mini.checkpoint.writer import WriteUnit

LOSS_PNG = "heal_loss.png"
REPORT = "heal_report.json"
_DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}


def weight_names(ck: Checkpoint) -> list[str]:
    """The reduced checkpoint's tensors a healed one holds too (all of them: it is BF16)."""
    return [n for n in ck.weight_names() if ck.tensors[n].parsed.role is not Role.INV_FREQ]


def write_healed(partial: Path, reduced: Checkpoint, names: list[str], weight: Callable[[str], torch.Tensor],
                 heal_block: dict[str, Any], card_section: str, own_files: tuple[str, ...] = ()) -> int:
    """Write the healed tensors ``names`` (the reduced model's, in the order ``weight`` can
    produce them: heal/gather.py) into ``partial``; returns tensor bytes.
    ``own_files``: what heal writes there itself (log, curve), never copied from REDUCED."""

    def produce(name: str, info) -> list[torch.Tensor]:
        t = weight(name)
        if tuple(t.shape) != info.shape:
            raise RuntimeError(f"{name}: healed shape {list(t.shape)} differs from the reduced model's {list(info.shape)}")
        return [t.detach().to("cpu", _DTYPES[info.dtype]).contiguous()]

    units = []
    for name in names:
        info = reduced.info(name)
        units.append(WriteUnit((PlannedTensor(name, info.dtype, info.shape),), lambda name=name, info=info: produce(name, info)))
    cfg = json.loads(reduced.source.read_bytes("config.json"))
    cfg.setdefault("k2mini", {})["heal"] = heal_block
    card = reduced.source.read_bytes("README.md").decode() if reduced.source.exists("README.md") else "# Reduced model\n"
    writer = ReducedCheckpoint(reduced.source, cfg, files={"README.md": (card.rstrip("\n") + "\n\n" + card_section).encode()},
                               own_files=own_files)
    return writer.write(partial, units).total_size


def card_section(block: dict[str, Any]) -> str:
    lines = [
        "## Healing (k2mini heal)",
        "",
        f"Distilled from the unpruned source's cached predictions (teacher manifest sha256 `{block['teacher_manifest_sha256']}`): "
        f"forward KL over the teacher's top-{block['teacher_top_k']} ids plus a tail bucket"
        + (f", plus {block['ce_weight']} x cross-entropy" if block["ce_weight"] else "") + ".",
        "",
        "| | |",
        "|---|---|",
        f"| method | {block['method']}" + (f" (LoRA rank {block['lora_rank']}, merged)" if block["method"] == "lora" else "") + " |",
        f"| steps | {block['steps']} (batch {block['batch_size']} sequences, lr {block['lr']:g}) |",
        f"| teacher tokens seen | {block['tokens_seen']:,} of {block['teacher_tokens']:,} cached |",
        f"| training loss (KL), first / last step | {block['first_loss']:.4f} / {block['last_loss']:.4f} |",
    ]
    if block.get("first_eval_kl") is not None:
        lines.append(f"| held-out KL ({block['eval_sequences']} sequences), first / last evaluation | "
                     f"{block['first_eval_kl']:.4f} / {block['last_eval_kl']:.4f} |")
    lines += ["", f"Log: `heal_log.jsonl`; curve: `{LOSS_PNG}`. Measure it yourself: `k2mini validate . --reference SOURCE`.", ""]
    return "\n".join(lines)


def plot_log(log: list[dict], path: Path) -> bool:
    """The loss curve (train KL per step, held-out KL where evaluated); False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([x["tokens"] for x in log], [x["kl"] for x in log], label="train KL", lw=1)
    ev = [x for x in log if x.get("eval_kl") is not None]
    if ev:
        ax.plot([x["tokens"] for x in ev], [x["eval_kl"] for x in ev], "o-", label="held-out KL")
    ax.set_xlabel("teacher tokens seen")
    ax.set_ylabel("KL(teacher || student), nats/token")
    ax.set_yscale("log")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
