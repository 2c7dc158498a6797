"""A stand-in for a venv with vLLM, shared by the engine tests (validate --engine, teacher
--engine vllm): an executable that runs this interpreter with a package named vllm (the
test's own code) on its path. FAKE_VLLM_MODE picks what its LLM does: ``broken`` (the
import fails as a CUDA torchvision beside a CPU torch makes it), ``refuse`` (a kernel's
refusal wrapped by the engine), ``crash`` (the process dies), ``hang``, or serve."""

from __future__ import annotations

import stat
import sys
import textwrap
from pathlib import Path

HEADER = '''
import json, os, sys
mode = os.environ.get("FAKE_VLLM_MODE", "serve")
if mode == "broken":
    raise ImportError("operator torchvision::nms does not exist")
__version__ = "0.0-fake"


class SamplingParams:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def fail_as_asked():
    """What LLM(...) does first in the failing modes."""
    if mode == "refuse":
        try:
            raise ValueError("CPUFp8BlockScaledMMKernel requires AMX tile support (Sapphire Rapids or newer).")
        except ValueError as inner:
            raise RuntimeError("Engine core initialization failed") from inner
    if mode == "crash":
        os._exit(9)
    if mode == "hang":
        import time
        time.sleep(120)
'''


def make_engine_python(root: Path, body: str, *, extra_path: Path | None = None) -> Path:
    """``root/python``: this interpreter with ``vllm`` = HEADER + ``body`` importable (and
    ``extra_path``, e.g. the checkout, for a reference model)."""
    site = root / "site" / "vllm"
    site.mkdir(parents=True)
    (site / "__init__.py").write_text(HEADER + textwrap.dedent(body))
    (site / "inputs.py").write_text("def TokensPrompt(prompt_token_ids):\n    return {'prompt_token_ids': prompt_token_ids}\n")
    path = str(root / "site") + (f":{extra_path}" if extra_path else "")
    py = root / "python"
    # The worker runs as `PYTHON -I WORKER ...`; -I would drop PYTHONPATH, so the stand-in drops it.
    py.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        [ "$1" = "-I" ] && shift
        OMP_NUM_THREADS=1 PYTHONPATH={path} exec {sys.executable} "$@"
        """))
    py.chmod(py.stat().st_mode | stat.S_IEXEC)
    return py
