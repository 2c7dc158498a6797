"""A serving engine (vLLM) run in a subprocess of its own interpreter: the process handling
(engine/process.py) and the worker script that runs there (engine/vllm_worker.py). Used by
``validate --engine`` (one request, one result) and ``teacher --engine vllm`` (a stream of
blocks)."""
