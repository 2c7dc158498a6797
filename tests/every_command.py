"""Every command of the CLI, with arguments that make it do its work for real on the tiny
fixture: the project-wide guarantee tests (source unchanged, remote code never run, start-up
imports, resource limits) run what this lists. The list is checked against the click group
itself, so a new command fails those tests until it is added here."""

from __future__ import annotations

from pathlib import Path

from k2mini.cli import cli


def cli_commands() -> list[str]:
    """The commands as the CLI defines them (not as a test remembers them)."""
    return sorted(cli.commands)


def invocations(src: Path, out: Path) -> dict[str, list[str]]:
    """Each command reading SRC (or what an earlier entry wrote from it) and writing under
    OUT, in an order where later entries use earlier outputs: heal the convert output with
    the teacher's cache, validate the convert output against SRC."""
    s, o = str(src), Path(out)
    return {
        "inspect": ["inspect", s, "--json"],
        "analyze": ["analyze", "--source", s, "-o", str(o / "analysis.json"), "--samples", "2", "--seq-len", "16",
                    "--no-plots", "--quiet", "--weight-norms"],
        "convert": ["convert", "--source", s, "--layers", "3", "--experts", "4", "--analysis", str(o / "analysis.json"),
                    "-o", str(o / "conv"), "--no-progress"],
        "convert-fast": ["convert-fast", "--source", s, "--layers", "2", "--experts", "4", "--dtype", "fp8",
                         "-o", str(o / "fast"), "--no-progress"],
        "quantize": ["quantize", s, "--bits", "4", "--group-size", "32", "-o", str(o / "q4"), "--quiet"],
        "validate": ["validate", str(o / "conv"), "--reference", s, "--samples", "1", "--seq-len", "8",
                     "--max-new-tokens", "2", "--quiet", "--device", "cpu"],
        "run": ["run", s, "--offload", "--budget", "1MB", "--prompt", "hello", "--max-new-tokens", "2", "--device", "cpu",
                "--quiet"],
        "teacher": ["teacher", "-s", s, "-o", str(o / "teacher"), "--samples", "4", "--seq-len", "16", "--top-k", "8",
                    "--quiet"],
        "heal": ["heal", str(o / "conv"), "--teacher", str(o / "teacher"), "-o", str(o / "healed"), "--steps", "1",
                 "--batch-size", "2", "--quiet"],
        "plan": ["plan", "-s", s, "--budget", "3MB", "--analysis", str(o / "analysis.json"), "--teacher", str(o / "teacher"),
                 "--measure", "2", "-o", str(o / "plan.json"), "--quiet"],
        "fixture": ["fixture", str(o / "fixture")],
        "demo": ["demo", str(o / "demo")],
    }


# Commands that never open a checkpoint given to them: they build the tiny fixture themselves.
BUILDS_ITS_OWN_SOURCE = {"fixture", "demo"}


def output_of(args: list[str]) -> Path | None:
    """Where an invocation writes (its -o / OUT argument), None for one that writes nothing."""
    for flag in ("-o", "--output"):
        if flag in args:
            return Path(args[args.index(flag) + 1])
    if args[0] == "demo":
        return Path(args[1]) / "reduced"  # OUT/source is the demo's input, complete or absent
    return Path(args[1]) if args[0] == "fixture" else None
