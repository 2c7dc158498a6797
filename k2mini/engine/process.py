"""The engine's process: started from the interpreter that has the engine (vLLM usually
lives in a venv of its own, pinned to its own torch and transformers) as

    ENGINE_PYTHON -I vllm_worker.py MODE ...

in a session of its own, so a timeout or an error ends the engine's helper processes too;
its log goes to a file whose last lines explain a crash. Two ways to talk to it:

- ``run_once``: one request file in, one result file out (``validate --engine``);
- ``EngineProcess`` in stream mode: JSON lines on its stdin, results on a pipe of their
  own (JSON header lines, optionally followed by raw bytes), each read with a timeout of
  silence, so a hung engine is noticed. The worker watches its stdin: when it closes
  without a stop message (this process died, even by SIGKILL) it kills its own session,
  so no engine outlives the run that started it.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from k2mini.errors import UsageError

WORKER = Path(__file__).with_name("vllm_worker.py")
LOG_TAIL = 20


def check_engine_python(path: str | None) -> str:
    """The interpreter to run the engine in: ``path`` (must exist), else this one."""
    if path is None:
        return sys.executable
    p = Path(path).expanduser()
    if not p.is_file() or not os.access(p, os.X_OK):
        raise UsageError(f"--engine-python {path}: not an executable file")
    return str(p)


def vllm_here() -> bool:
    """Whether this interpreter has vllm (without importing it: that takes seconds)."""
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class EngineFailure(Exception):
    """The engine did not do what was asked: ``status`` is ``not_installed`` or ``refused``
    (which includes crashes and hangs), ``reason`` one line in the engine's own words."""

    def __init__(self, status: str, reason: str, version: str | None = None, log_tail: str = ""):
        super().__init__(reason)
        self.status, self.reason, self.version, self.log_tail = status, reason, version, log_tail


def _tail(log: Path) -> str:
    try:
        return "\n".join(log.read_text(errors="replace").splitlines()[-LOG_TAIL:])
    except OSError:
        return ""


def exit_reason(code: int | None, tail: str, timeout: float) -> str:
    """Why an engine gave no result: it hung (``code`` None) or exited; plus its last log line."""
    why = f"did not finish within {timeout:g} s (--engine-timeout)" if code is None else \
        f"the engine process exited with code {code} before reporting"
    last = tail.splitlines()[-1] if tail else ""
    return why + (f": {' '.join(last.split())[:300]}" if last else "")


class EngineProcess:
    """The worker in ``mode``, started in ``workdir`` (its log: ``workdir/engine.log``).

    With ``stream=True`` the worker gets a pipe for its results (its fd number is its first
    argument) and its stdin stays open for requests: ``send`` / ``recv`` / ``recv_bytes``."""

    def __init__(self, python: str, mode: str, args: list[str], *, workdir: Path, stream: bool = False,
                 env: dict[str, str] | None = None):
        self.log = Path(workdir) / "engine.log"
        self.code: int | None = None
        self._buf = b""
        self._r = None
        pass_fds: tuple[int, ...] = ()
        if stream:
            self._r, w = os.pipe()
            args = [str(w), *args]
            pass_fds = (w,)
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen([python, "-I", str(WORKER), mode, *args],
                                         stdin=subprocess.PIPE if stream else subprocess.DEVNULL, stdout=logf,
                                         stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True, pass_fds=pass_fds,
                                         env={**os.environ, **(env or {})})
        if stream:
            os.close(w)

    # -- stream mode ----------------------------------------------------------------------

    def send(self, message: dict) -> None:
        try:
            self.proc.stdin.write((json.dumps(message) + "\n").encode())
            self.proc.stdin.flush()
        except (BrokenPipeError, OSError):
            self._died(hung=False, timeout=0)

    def _fill(self, n: int, timeout: float, until_newline: bool) -> None:
        """Read until the buffer holds ``n`` bytes (or a newline); ``timeout``: of silence."""
        while (b"\n" not in self._buf) if until_newline else (len(self._buf) < n):
            ready, _, _ = select.select([self._r], [], [], timeout)
            if not ready:
                self._died(hung=True, timeout=timeout)
            chunk = os.read(self._r, max(1 << 20, n - len(self._buf)))
            if not chunk:  # the worker closed the pipe: it exited
                self._died(hung=False, timeout=timeout)
            self._buf += chunk

    def recv(self, timeout: float) -> dict:
        """The next JSON message; a failure message, an exit or ``timeout`` s of silence raise EngineFailure."""
        self._fill(0, timeout, until_newline=True)
        line, _, self._buf = self._buf.partition(b"\n")
        msg = json.loads(line)
        if msg.get("status") in ("refused", "not_installed"):
            self.wait(30)
            raise EngineFailure(msg["status"], msg["reason"], msg.get("version"), _tail(self.log))
        return msg

    def recv_bytes(self, n: int, timeout: float) -> bytes:
        self._fill(n, timeout, until_newline=False)
        data, self._buf = self._buf[:n], self._buf[n:]
        return data

    def _died(self, *, hung: bool, timeout: float):
        if hung:
            self.kill()
        code = None if hung else self.wait(30)
        raise EngineFailure("refused", exit_reason(code, _tail(self.log), timeout), log_tail=_tail(self.log))

    def stop(self, timeout: float) -> int | None:
        """Ask the worker to end, close its stdin, and wait for it."""
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(b'{"op": "stop"}\n')
                self.proc.stdin.close()
            except (BrokenPipeError, OSError):
                pass
        return self.wait(timeout)

    # -- both modes -----------------------------------------------------------------------

    def wait(self, timeout: float) -> int | None:
        """The exit code, or None when it had to be killed after ``timeout`` s."""
        try:
            self.code = self.proc.wait(timeout=timeout)
            return self.code
        except subprocess.TimeoutExpired:
            self.kill()
            return None

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.proc.wait()

    def close(self) -> None:
        self.kill()
        for f in (self.proc.stdin,):
            if f is not None and not f.closed:
                try:
                    f.close()
                except OSError:
                    pass
        if self._r is not None:
            os.close(self._r)
            self._r = None

    def __enter__(self) -> EngineProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def run_once(python: str, request: dict, timeout: float) -> tuple[dict | None, str, int | None]:
    """``check`` mode: (result or None, tail of the engine's log, exit code or None on timeout)."""
    with tempfile.TemporaryDirectory(prefix="k2mini-engine-") as tmp:
        req, res = Path(tmp) / "request.json", Path(tmp) / "result.json"
        req.write_text(json.dumps(request))
        with EngineProcess(python, "check", [str(req), str(res)], workdir=Path(tmp)) as ep:
            code = ep.wait(timeout)
            tail = _tail(ep.log)
        result = json.loads(res.read_text()) if res.exists() else None
        return result, tail, code
