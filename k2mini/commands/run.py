"""``k2mini run``: generate from a checkpoint, optionally with routed experts offloaded."""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import click

from k2mini.errors import UsageError
from k2mini.sizes import format_size, parse_size


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _current_rss() -> int:
    with open("/proc/self/statm") as f:
        import os

        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _detok(tok, ids: list[int]) -> str:
    inner = getattr(tok, "tok", None) or getattr(tok, "enc", None)
    return inner.decode(ids) if inner is not None else " ".join(map(str, ids))


@click.command("run")
@click.argument("src")
@click.option("--offload", is_flag=True, help="Keep routed experts in the checkpoint and fetch them on demand.")
@click.option("--budget", default=None, help="Bytes of dequantized experts the device may hold (with --offload), e.g. 60GB, 512MiB.")
@click.option("--host-budget", default="0", show_default=True,
              help="Bytes of FP8 experts kept in host memory (second tier, with --offload).")
@click.option("--prefetch/--no-prefetch", default=None,
              help="Guess the next layer's experts with its router and read them in the background "
                   "(default: on for CUDA, off on CPU, where it cost 8-26% of tokens/s at 5 of 6 budgets: "
                   "analysis/offload_curve.md).")
@click.option("--prompt", default=None, help="Prompt text.")
@click.option("--file", "file_", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Read the prompt from a file.")
@click.option("--max-new-tokens", default=32, show_default=True, type=int)
@click.option("--device", default=None, help="cpu or cuda[:N] (default: cuda when available).")
@click.option("--dtype", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True)
@click.option("--plateau/--no-plateau", default=True, show_default=True,
              help="Report the LRU cache size at which the hit rate stops improving on this text.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON report (text, statistics, memory) to stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
def run_cmd(src, offload, budget, host_budget, prefetch, prompt, file_, max_new_tokens, device, dtype, plateau, as_json, quiet):
    """Greedy generation from SRC. With --offload only the non-expert weights are loaded; every
    routed expert is read from the checkpoint when a token routes to it and kept in a cache of
    --budget bytes (LRU, pinned while in use), with an optional host tier of FP8 bytes and
    router-guided prefetch of the next layer. Reports hit rate per tier, bytes read per token,
    time per token split into compute and fetch, and peak RSS.

    \b
    Examples:
      k2mini run ./Kimi-K2-Instruct --offload --budget 60GB --prompt "Hello"
      k2mini run ./Kimi-K2-Instruct --offload --budget 40GB --host-budget 200GB --file prompt.txt --json
      k2mini run ./tiny-k2 --prompt "def f(x):" --max-new-tokens 8
    """
    import torch

    from k2mini.analysis.tokenizer import load_tokenizer
    from k2mini.checkpoint.reader import Checkpoint
    from k2mini.offload import load_full, load_offloaded
    from k2mini.offload.cache import return_freed_memory_to_os
    from k2mini.offload.generate import decode

    prompt = _read_prompt(prompt, file_)
    if max_new_tokens < 1:
        raise UsageError("--max-new-tokens must be >= 1")
    if not offload and (budget is not None or host_budget != "0"):
        raise UsageError("--budget and --host-budget need --offload")
    if offload and budget is None:
        raise UsageError("--offload needs --budget (bytes of experts on the device, e.g. 60GB)")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device}: CUDA is not available here")
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    # On CPU the background reads and dequantization compete with the forward pass for the
    # same cores; on a GPU they overlap with it (not measured yet: no GPU in our runs).
    prefetch = dev.type == "cuda" if prefetch is None else prefetch

    ck = Checkpoint.open(src)
    tok = load_tokenizer(ck)
    ids = tok.encode(prompt)
    if not ids:
        raise UsageError("the prompt encodes to no tokens")
    baseline_rss = _current_rss()
    t0 = time.perf_counter()
    if offload:
        return_freed_memory_to_os()
        om = load_offloaded(ck, budget=parse_size(budget, flag="--budget", minimum=0),
                            host_budget=parse_size(host_budget, flag="--host-budget", minimum=0),
                            device=dev, dtype=torch_dtype, prefetch=prefetch, progress=not quiet)
        model = om.model
    else:
        om, model = None, load_full(ck, device=dev, dtype=torch_dtype)
    load_s = time.perf_counter() - t0
    loaded_rss = _current_rss()
    read0 = ck.source.bytes_read
    res = decode(model, ids, max_new_tokens=max_new_tokens)
    report = {
        "source": ck.description, "device": str(dev), "dtype": dtype, "offload": offload, "prefetch": offload and prefetch,
        "prompt_tokens": len(ids), "new_tokens": len(res.tokens), "text": _detok(tok, res.tokens), "token_ids": res.tokens,
        "load_seconds": round(load_s, 3), "prefill_seconds": round(res.prefill_seconds, 4),
        "decode_tokens_per_second": round(res.tokens_per_second, 3),
        "memory": {"rss_before_load": baseline_rss, "rss_after_load": loaded_rss, "peak_rss": _peak_rss()},
    }
    if om is not None:
        _add_offload_report(report, om, len(ids), res, ck.source.bytes_read - read0, plateau)
        om.close()
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    click.echo(report["text"])
    click.echo(_summary_line(report, offload=om is not None), err=True)
    sys.stderr.flush()


def _read_prompt(prompt: str | None, file_: Path | None) -> str:
    if (prompt is None) == (file_ is None):
        raise UsageError("give exactly one of --prompt or --file")
    if file_ is None:
        return prompt
    try:
        return file_.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"--file {file_}: cannot read it as UTF-8 text ({exc.__class__.__name__})") from None


def _add_offload_report(report: dict, om, prompt_tokens: int, res, bytes_read: int, plateau: bool) -> None:
    """The expert cache's figures: hit rates per tier, bytes and time per token, memory, and
    (``plateau``) the smallest cache that would have reached the best hit rate."""
    from k2mini.offload import plateau_capacity

    st = om.cache.stats
    st.tokens = prompt_tokens + len(res.step_seconds)
    report["offload_stats"] = st.summary(res.prefill_seconds + res.decode_seconds)
    report["memory"].update({"budget": om.cache.budget, "host_budget": om.cache.host_budget,
                             "resident_weight_bytes": om.resident_bytes, "all_experts_bytes": om.expert_bytes,
                             "peak_device_tier_bytes": om.cache.peak_device_bytes,
                             "source_bytes_read": bytes_read})
    if plateau:
        cap, best = plateau_capacity(st.trace)
        one = om.expert_bytes // om.n_experts
        report["plateau"] = {"experts": cap, "bytes": cap * one, "hit_rate": round(best, 4),
                             "distinct_experts_used": len(set(st.trace))}


def _summary_line(report: dict, *, offload: bool) -> str:
    line = (f"{report['new_tokens']} tokens, {report['decode_tokens_per_second']} tok/s decode, "
            f"peak RSS {format_size(report['memory']['peak_rss'], binary=True)}")
    if offload:
        s = report["offload_stats"]
        line += (f"; hit rate device {s['hit_rate']['device']:.1%} host {s['hit_rate']['host']:.1%}, "
                 f"{format_size(s['bytes_read_per_token'], binary=True)} read/token, fetch {s['fetch_ms_per_token']:.1f} ms + "
                 f"compute {s['compute_ms_per_token']:.1f} ms per token")
        if "plateau" in report:
            line += f"; hit rate plateaus at {report['plateau']['experts']} experts ({format_size(report['plateau']['bytes'], binary=True)})"
    return line
