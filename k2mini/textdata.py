"""Offline text of two clearly different domains, present on every Python install.

English prose comes from the Python reference manual's topic pages (``pydoc_data``);
source code from a fixed list of standard-library modules. Used to train fixture
tokenizers, as the built-in calibration set, and as nano-model training data.
"""

from __future__ import annotations

import functools
import importlib
import inspect

# Pure-Python stdlib modules whose source is stable across 3.10-3.13.
CODE_MODULES = (
    "textwrap", "json.decoder", "json.encoder", "argparse", "difflib", "heapq", "bisect",
    "fractions", "statistics", "calendar", "shlex", "string", "csv", "configparser",
    "dataclasses", "functools", "pprint", "queue", "random", "tokenize", "ast", "gettext",
)


@functools.cache
def prose_corpus() -> str:
    import pydoc_data.topics

    topics = pydoc_data.topics.topics
    return "\n\n".join(topics[k] for k in sorted(topics))


@functools.cache
def code_corpus() -> str:
    parts = []
    for name in CODE_MODULES:
        parts.append(inspect.getsource(importlib.import_module(name)))
    return "\n\n".join(parts)


def split_documents(text: str, min_chars: int = 200) -> list[str]:
    """Split on blank lines and re-join into documents of at least ``min_chars``."""
    docs, cur = [], []
    size = 0
    for para in text.split("\n\n"):
        cur.append(para)
        size += len(para)
        if size >= min_chars:
            docs.append("\n\n".join(cur))
            cur, size = [], 0
    if cur:
        docs.append("\n\n".join(cur))
    return docs
