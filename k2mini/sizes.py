"""Byte sizes: the one parser and the one formatter behind every size flag and variable
(--max-shard-size, --memory-budget, run --budget / --host-budget, K2MINI_CACHE_SIZE).

One meaning, IEC 80000-13 as pydantic's ``ByteSize`` reads it: a unit without ``i`` is a
power of 1000 and one with ``i`` a power of 1024, so ``8G`` = ``8GB`` = 8 000 000 000 bytes
and ``8GiB`` = 8 589 934 592 bytes; a bare number is bytes. ``ByteSize`` also reads bit
units ("8gbit") and text after the size; neither is a size a user means, so both are refused.
"""

from __future__ import annotations

import re

from pydantic import ByteSize, TypeAdapter, ValidationError

from k2mini.errors import UsageError

_FORM = re.compile(r"\s*\d*\.?\d+\s*(?:[kmgtpe]i?)?b?\s*", re.IGNORECASE)
_BYTES = TypeAdapter(ByteSize)
_DECIMAL = ("B", "KB", "MB", "GB", "TB", "PB")
_BINARY = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def parse_size(text: str | int, *, flag: str, minimum: int = 1) -> int:
    """``"5GB"`` / ``"5G"`` -> 5e9, ``"512MiB"`` -> 2**29, ``"1000"`` -> 1000; anything else,
    or a size under ``minimum``, is one line naming ``flag``."""
    if isinstance(text, int):
        n = text
    else:
        try:
            n = int(_BYTES.validate_python(text.strip())) if _FORM.fullmatch(text) else None
        except ValidationError:
            n = None
    if n is None or n < minimum:
        raise UsageError(f"{flag} {text!r}: expected a size such as 5GB, 500M or 2GiB (G = 10^9 bytes, GiB = 2^30)")
    return n


def format_size(n: int | float, *, binary: bool = False) -> str:
    """``5.10 GB`` (powers of 1000: file and disk sizes), or with ``binary`` ``4.75 GiB``
    (powers of 1024: RAM and GPU memory). Two decimals, where ``ByteSize.human_readable``
    gives one: a memory plan that fits by 0.05 GiB must not print the same figure as its limit."""
    step, units = (1024, _BINARY) if binary else (1000, _DECIMAL)
    x = float(n)
    for unit in units:
        if abs(x) < step or unit == units[-1]:
            return f"{int(x)} B" if unit == "B" else f"{x:.2f} {unit}"
        x /= step
    raise AssertionError("unreachable")
