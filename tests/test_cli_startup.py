"""Start-up cost: help and inspect import no ML library (inspect reads headers only); commands that need
one still find it (convert --dtype int4 gets the integer transforms from quantize when it runs)."""

from __future__ import annotations

import json
import subprocess
import sys

from every_command import cli_commands

from k2mini.model.spec import ModelSpec

# Each is hundreds of MB and seconds to import; none is needed to print help or read headers.
HEAVY = ("transformers", "compressed_tensors", "accelerate", "torch", "numba")
COMMANDS = cli_commands()  # from the click group: a new command is checked without editing this test

_PROBE = """
import json, sys
from k2mini.cli import cli
codes = []
for args in json.loads(sys.argv[1]):
    try:
        cli.main(args=args, prog_name="k2mini", standalone_mode=True)
    except SystemExit as exc:
        codes.append(exc.code or 0)
    else:
        codes.append(0)
print(json.dumps({"codes": codes, "heavy": sorted(m for m in %r if m in sys.modules)}), file=sys.stderr)
""" % (HEAVY,)


def _run(*invocations: list) -> tuple[list[int], list[str], str, str]:
    """Run k2mini with each argument list in turn, in one fresh interpreter:
    (exit codes, heavy modules imported, stdout, stdout + stderr)."""
    arg = json.dumps([[str(a) for a in args] for args in invocations])
    r = subprocess.run([sys.executable, "-c", _PROBE, arg], capture_output=True, text=True, timeout=300)
    result = json.loads(r.stderr.strip().splitlines()[-1])
    return result["codes"], result["heavy"], r.stdout, r.stdout + r.stderr


def test_help_pages_import_no_ml_stack():
    codes, heavy, _, out = _run(["--help"], *([cmd, "--help"] for cmd in COMMANDS))
    assert codes == [0] * (1 + len(COMMANDS)), out
    assert {"convert-fast", "teacher", "heal"} <= set(COMMANDS) and all(f"Usage: k2mini {cmd} " in out for cmd in COMMANDS)
    assert heavy == []


def test_inspect_reads_headers_without_any_ml_library(tiny_fixture):
    codes, heavy, stdout, out = _run(["inspect", tiny_fixture.path, "--json"])
    assert codes == [0], out
    assert json.loads(stdout)["params"] == ModelSpec.from_config(tiny_fixture.config).param_count()
    assert heavy == []


def test_convert_int4_works_in_a_fresh_process(tiny_fixture, tmp_path):
    """convert hands quantize's integer transforms to make_transform itself: --dtype int4 works
    in a fresh process, not because some other module happened to be imported first."""
    codes, heavy, stdout, out = _run(["convert-fast", "-s", tiny_fixture.path, "--layers", "3", "--experts", "4",
                              "--dtype", "int4-g32", "--dry-run", "--json", "-o", tmp_path / "o"])
    assert codes == [0], out
    assert json.loads(stdout)["dtype"] == "int4-g32"
    assert "compressed_tensors" in heavy
