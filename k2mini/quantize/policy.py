"""Which tensors an integer format quantizes, in compressed-tensors' own matching syntax.

Ignore patterns are compressed-tensors targets: a module name (``lm_head``) or ``re:REGEX``
matched against module names (a weight's name without ``.weight``), with the library's own
matcher, so k2mini and every loader that reads the config agree on what is ignored.
"""

from __future__ import annotations

from compressed_tensors.utils.match import match_name

from k2mini.checkpoint.names import Role, TensorName

# Linear layers of DeepseekV3 that carry almost all parameters. The router (mlp.gate) is a
# Linear in vLLM too but routing is precision-sensitive and tiny: it stays BF16, like
# lm_head, embeddings and norms (which are not Linear and so never matched).
LINEAR_ROLES = frozenset({Role.ATTN, Role.DENSE_MLP, Role.EXPERT, Role.SHARED_EXPERT})
DEFAULT_IGNORE = ("lm_head", r"re:.*mlp\.gate$")


def module_of(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def is_linear_weight(parsed: TensorName, shape: tuple[int, ...]) -> bool:
    """A projection weight (attention, dense MLP, routed or shared expert), 2-D."""
    return parsed.role in LINEAR_ROLES and not parsed.is_scale and parsed.name.endswith(".weight") and len(shape) == 2


def is_ignored(name: str, ignore: tuple[str, ...]) -> bool:
    module = module_of(name)
    return any(match_name(module, pattern) for pattern in ignore)


def check_patterns(ignore: tuple[str, ...]) -> None:
    """Reject a ``re:`` pattern that does not compile, naming it (exit 2 via UsageError)."""
    import re

    from k2mini.errors import UsageError

    for p in ignore:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as exc:
                raise UsageError(f"--ignore {p!r}: not a valid regular expression ({exc})") from None
