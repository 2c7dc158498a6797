"""Write a K2-format fixture checkpoint: python scripts/build_fixture.py OUT [--preset real-dims]."""

from k2mini.cli import cli

if __name__ == "__main__":
    import sys

    cli(["fixture", *sys.argv[1:]], prog_name="build_fixture")
