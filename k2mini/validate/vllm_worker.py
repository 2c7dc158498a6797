"""Run a checkpoint in vLLM's offline ``LLM`` API and write what it computed as JSON.

``k2mini validate --engine vllm`` starts this file with the engine's interpreter, which
is usually a venv of its own (vLLM pins its own torch and transformers), so it imports
the standard library and vllm only, never k2mini:

    ENGINE_PYTHON -I vllm_worker.py REQUEST.json RESULT.json

REQUEST: {"model": dir, "prompts": [[token ids], ...], "max_new_tokens": n, "max_model_len": n}
RESULT: {"status": "served", "version", "prompt_logprobs": [[logprob of token t | None, ...], ...],
         "greedy": [[token ids], ...], "load_seconds", "run_seconds"}
     or {"status": "refused" | "not_installed", "version", "reason": one line, "error": exception type}
"""

import json
import os
import sys
import time


def _one_line(text, limit=400):
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _root_cause(exc):
    """The innermost exception of a chain: vLLM wraps a kernel's refusal in its own errors."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = exc.__cause__ or exc.__context__
        if nxt is None:
            break
        exc = nxt
    return exc


def _failure(status, exc, version=None):
    root = _root_cause(exc)
    reason = _one_line(f"{type(root).__name__}: {root}")
    if root is not exc:
        reason = _one_line(f"{reason} (raised as {type(exc).__name__}: {exc})")
    return {"status": status, "version": version, "reason": reason, "error": type(root).__name__}


def run(req):
    # The engine core in this process, so its own exception reaches us (in a child process
    # it becomes "Engine core initialization failed. See root cause above.").
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes a large share of RAM
    # A local checkpoint needs nothing from outside: no usage statistics, no Hub look-ups.
    for var in ("VLLM_NO_USAGE_STATS", "DO_NOT_TRACK", "HF_HUB_OFFLINE"):
        os.environ.setdefault(var, "1")
    try:
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except Exception as exc:  # missing, or broken (e.g. a CUDA torchvision beside a CPU torch)
        return _failure("not_installed", exc)
    version = getattr(vllm, "__version__", None)
    t0 = time.perf_counter()
    try:
        llm = LLM(model=req["model"], dtype="bfloat16", enforce_eager=True, seed=0,
                  max_model_len=int(req["max_model_len"]), max_num_seqs=max(1, len(req["prompts"])),
                  trust_remote_code=False)
    except Exception as exc:
        return _failure("refused", exc, version)
    t1 = time.perf_counter()
    params = SamplingParams(temperature=0.0, max_tokens=int(req["max_new_tokens"]), prompt_logprobs=0,
                            ignore_eos=True)
    try:
        outs = llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in req["prompts"]], params, use_tqdm=False)
    except Exception as exc:  # some kernels are only chosen at the first forward pass
        return _failure("refused", exc, version)
    prompt_logprobs, greedy = [], []
    for prompt, out in zip(req["prompts"], outs):
        row = []
        for t, entry in zip(prompt, out.prompt_logprobs or []):
            row.append(None if entry is None else float(entry[t].logprob))
        prompt_logprobs.append(row)
        greedy.append(list(out.outputs[0].token_ids))
    return {"status": "served", "version": version, "prompt_logprobs": prompt_logprobs, "greedy": greedy,
            "load_seconds": round(t1 - t0, 3), "run_seconds": round(time.perf_counter() - t1, 3)}


def main(argv):
    with open(argv[1]) as f:
        req = json.load(f)
    try:
        result = run(req)
    except Exception as exc:  # anything else the engine raised: still one line back, never a traceback
        result = _failure("refused", exc)
    with open(argv[2], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":  # vLLM spawns processes that re-import the main module
    main(sys.argv)
