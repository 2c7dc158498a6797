"""The ``k2mini`` command line: a click group; each command lives in k2mini/commands/."""

from __future__ import annotations

import errno
import sys

import click

from k2mini import __version__
from k2mini.commands.analyze import analyze_cmd
from k2mini.commands.convert import convert_cmd, convert_fast_cmd, demo_cmd
from k2mini.commands.fixture import fixture_cmd
from k2mini.commands.heal import heal_cmd
from k2mini.commands.inspect import inspect_cmd
from k2mini.commands.plan import plan_cmd
from k2mini.commands.quantize import quantize_cmd
from k2mini.commands.run import run_cmd
from k2mini.commands.teacher import teacher_cmd
from k2mini.commands.validate import validate_cmd
from k2mini.errors import K2MiniError


class _Group(click.Group):
    """Turns K2MiniError into one line on stderr and exit code 2 (traceback with --debug)."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except K2MiniError as exc:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            _fail(str(exc), exc.exit_code)
        except OSError as exc:
            # The machine, not the input: a full disk, a quota, an unreadable or unwritable path.
            if ctx.obj and ctx.obj.get("debug"):
                raise
            where = f"{exc.filename}: " if exc.filename else ""
            hint = " (free some space or choose another output directory)" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
            _fail(f"{where}{exc.strerror or exc}{hint}", 2)
        except MemoryError:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            _fail("out of memory: this run needs more RAM than is free (--debug shows where)", 2)
        except KeyboardInterrupt:
            click.echo("k2mini: interrupted", err=True)
            sys.exit(130)


def _fail(message: str, code: int) -> None:
    # Names from a hostile checkpoint can hold newlines; the error must stay one line.
    click.echo("k2mini: error: " + " ".join(message.split()), err=True)
    sys.exit(code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="k2mini")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Shrink Kimi-K2 / DeepSeek-V3 MoE checkpoints, one tensor at a time.

    \b
    Examples:
      k2mini demo /tmp/k2mini-demo
      k2mini inspect moonshotai/Kimi-K2-Instruct
      k2mini analyze -s ./Kimi-K2-Instruct -o analysis.json
      k2mini convert -s ./Kimi-K2-Instruct --analysis analysis.json --layers 24 --experts 16 -o ./k2-mini
      k2mini convert-fast -s ./Kimi-K2-Instruct --layers 24 --experts 16 --dtype fp8 -o ./k2-mini-fp8
      k2mini quantize ./k2-mini --bits 4 -o ./k2-mini-int4
      k2mini validate ./k2-mini-int4 --gpu h100 --reference ./Kimi-K2-Instruct
      k2mini run ./Kimi-K2-Instruct --offload --budget 60GB --prompt "Hello"
      k2mini teacher -s ./Kimi-K2-Instruct -o ./k2.teacher --calib corpus.jsonl --tokens 10000000
      k2mini heal ./k2-mini --teacher ./k2.teacher -o ./k2-mini-healed
      k2mini plan -s ./Kimi-K2-Instruct --gpu h100 --context 32768 --analysis analysis.json -o plan.json
    """
    ctx.obj = {"debug": debug}


cli.add_command(inspect_cmd)
cli.add_command(quantize_cmd)
cli.add_command(fixture_cmd)
cli.add_command(analyze_cmd)
cli.add_command(run_cmd)
cli.add_command(validate_cmd)
cli.add_command(teacher_cmd)
cli.add_command(heal_cmd)
cli.add_command(plan_cmd)
for _cmd in (convert_cmd, convert_fast_cmd, demo_cmd):
    cli.add_command(_cmd)


def main() -> None:
    cli(prog_name="k2mini")


if __name__ == "__main__":
    main()
