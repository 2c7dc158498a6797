"""Run a checkpoint in vLLM's offline ``LLM`` API for k2mini (engine/process.py starts it).

It runs in the engine's interpreter, usually a venv of its own (vLLM pins its own torch and
transformers), so it imports the standard library, vllm and numpy (a vllm dependency) only,
never k2mini. Two modes:

    ENGINE_PYTHON -I vllm_worker.py check REQUEST.json RESULT.json      (validate --engine)

REQUEST: {"model": dir, "prompts": [[token ids], ...], "max_new_tokens": n, "max_model_len": n}
RESULT: {"status": "served", "version", "prompt_logprobs": [[logprob of token t | None, ...], ...],
         "greedy": [[token ids], ...], "load_seconds", "run_seconds"}
     or a failure: {"status": "refused" | "not_installed", "version", "reason": one line, "error": exception type}

    ENGINE_PYTHON -I vllm_worker.py teacher FD                          (teacher --engine vllm)

stdin, JSON lines: first {"model", "top_k", "flat": bool, "engine_args": {LLM keyword arguments}},
then per block {"block": i, "ids_file": path of int32 [n, L] token ids, "sequences": n, "seq_len": L},
finally {"op": "stop"}. On FD: {"status": "ready", "version", "load_seconds"}, then per block
a header line {"block", "sequences", "seq_len", "top_k", "generate_seconds", "convert_seconds"}
followed by int32 top-k ids [n, L, k] and float32 top-k log-probs [n, L, k] (native byte
order); or a failure line. Position t holds the distribution of token t + 1: vLLM's prompt
log-probs of positions 1..L-1 and the sampled step's log-probs (max_tokens=1) for the last.
``logprobs_mode="raw_logprobs"``: log-softmax of the raw logits over the full vocabulary, so
1 - sum(exp(top-k)) is the exact tail mass. If stdin closes before the stop message (the
parent died, even by SIGKILL), the worker kills its own session: no engine outlives its run.
"""

import json
import os
import signal
import sys
import threading
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


def _engine_env():
    # The engine core in this process, so its own exception reaches us (in a child process
    # it becomes "Engine core initialization failed. See root cause above.").
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; the default takes a large share of RAM
    # A local checkpoint needs nothing from outside: no usage statistics, no Hub look-ups.
    for var in ("VLLM_NO_USAGE_STATS", "DO_NOT_TRACK", "HF_HUB_OFFLINE"):
        os.environ.setdefault(var, "1")


# -- check ---------------------------------------------------------------------------------


def check(req):
    _engine_env()
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


def check_main(req_path, res_path):
    with open(req_path) as f:
        req = json.load(f)
    try:
        result = check(req)
    except Exception as exc:  # anything else the engine raised: still one line back, never a traceback
        result = _failure("refused", exc)
    with open(res_path, "w") as f:
        json.dump(result, f)


# -- teacher -------------------------------------------------------------------------------


class _Requests:
    """stdin read by a thread of its own (so a parent's death is seen while vLLM computes)."""

    def __init__(self):
        import queue

        self.queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in sys.stdin:
            msg = json.loads(line)
            self.queue.put(msg)
            if msg.get("op") == "stop":
                return
        # stdin closed without a stop: the parent is gone. End the whole session now (vLLM's
        # helper processes included) rather than compute blocks nobody will read.
        os.killpg(0, signal.SIGKILL)

    def get(self):
        return self.queue.get()


def _topk_rows(container, p0, p1, k, np, own):
    """Top-k ids and log-probs of positions [p0, p1) of one request's log-probs, best first.

    ``flat_logprobs=True`` (vLLM's FlatLogprobs): every position holds k + 1 entries, the
    prompt's own (or sampled) token first, then ranks 1..k (vllm/logprobs.py,
    append_logprobs_for_next_position), so the block is one reshape of three flat lists.
    Otherwise one dict {token id: Logprob} per position: the own token (``own[i]``) merged
    into the top-k when it is one of them, else an extra entry, dropped here (by id: with
    ties at the k-th place its rank can equal a top-k entry's)."""
    if hasattr(container, "start_indices"):
        s, e = container.start_indices[p0], container.end_indices[p1 - 1]
        if e - s != (p1 - p0) * (k + 1):
            raise RuntimeError(f"flat log-probs: {e - s} entries for {p1 - p0} positions, expected k + 1 = {k + 1} each")
        ids = np.asarray(container.token_ids[s:e], dtype=np.int32).reshape(p1 - p0, k + 1)[:, 1:]
        lps = np.asarray(container.logprobs[s:e], dtype=np.float32).reshape(p1 - p0, k + 1)[:, 1:]
        return ids, lps
    ids = np.empty((p1 - p0, k), np.int32)
    lps = np.empty((p1 - p0, k), np.float32)
    for row, pos in enumerate(range(p0, p1)):
        entries = container[pos]
        top = sorted((lp.rank, tid, lp.logprob) for tid, lp in entries.items() if len(entries) == k or tid != own[row])
        if [r for r, _, _ in top] != list(range(1, k + 1)):
            raise RuntimeError(f"log-probs at position {pos}: ranks {[r for r, _, _ in top]}, expected 1..{k}")
        ids[row] = [t for _, t, _ in top]
        lps[row] = [v for _, _, v in top]
    return ids, lps


def dense_block(tokens, outs, k, np):
    """[n, L, k] int32 ids and float32 log-probs from vLLM's request outputs for ``tokens`` [n, L]."""
    n, seq_len = tokens.shape
    ids = np.empty((n, seq_len, k), np.int32)
    lps = np.empty((n, seq_len, k), np.float32)
    for r, out in enumerate(outs):
        if seq_len > 1:
            ids[r, : seq_len - 1], lps[r, : seq_len - 1] = _topk_rows(out.prompt_logprobs, 1, seq_len, k, np, tokens[r, 1:])
        ids[r, seq_len - 1 :], lps[r, seq_len - 1 :] = _topk_rows(out.outputs[0].logprobs, 0, 1, k, np, out.outputs[0].token_ids)
    return ids, lps


def teacher(out, requests):
    def send(msg, payload=()):
        out.write((json.dumps(msg) + "\n").encode())
        for p in payload:
            out.write(p)
        out.flush()

    cfg = requests.get()
    _engine_env()
    try:
        import numpy as np
        import vllm
        from vllm import LLM, SamplingParams
        from vllm.inputs import TokensPrompt
    except Exception as exc:
        return send(_failure("not_installed", exc))
    version = getattr(vllm, "__version__", None)
    k = int(cfg["top_k"])
    t0 = time.perf_counter()
    try:
        # Token ids in, log-probs out: no tokenizer needed (K2's is remote code), none loaded.
        llm = LLM(model=cfg["model"], skip_tokenizer_init=True, max_logprobs=k, logprobs_mode="raw_logprobs", seed=0,
                  **cfg["engine_args"])
    except Exception as exc:
        return send(_failure("refused", exc, version))
    send({"status": "ready", "version": version, "load_seconds": round(time.perf_counter() - t0, 3)})
    params = SamplingParams(temperature=0.0, max_tokens=1, prompt_logprobs=k, logprobs=k, detokenize=False,
                            ignore_eos=True, flat_logprobs=bool(cfg.get("flat", True)))
    while True:
        msg = requests.get()
        if msg.get("op") == "stop":
            return None
        n, seq_len = int(msg["sequences"]), int(msg["seq_len"])
        tokens = np.fromfile(msg["ids_file"], dtype=np.int32).reshape(n, seq_len)
        t1 = time.perf_counter()
        try:
            outs = llm.generate([TokensPrompt(prompt_token_ids=row.tolist()) for row in tokens], params, use_tqdm=False)
            t2 = time.perf_counter()
            ids, lps = dense_block(tokens, outs, k, np)
        except Exception as exc:
            return send(_failure("refused", exc, version))
        send({"block": msg["block"], "sequences": n, "seq_len": seq_len, "top_k": k, "generate_seconds": round(t2 - t1, 6),
              "convert_seconds": round(time.perf_counter() - t2, 6)}, (ids.tobytes(), lps.tobytes()))


def teacher_main(fd):
    with os.fdopen(int(fd), "wb") as out:
        requests = _Requests()
        try:
            teacher(out, requests)
        except Exception as exc:  # anything else: still one line back, never a traceback
            out.write((json.dumps(_failure("refused", exc)) + "\n").encode())


def main(argv):
    mode, args = argv[1], argv[2:]
    {"check": check_main, "teacher": teacher_main}[mode](*args)


if __name__ == "__main__":  # vLLM spawns processes that re-import the main module
    main(sys.argv)
