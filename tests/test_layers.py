"""The layering contract: k2mini's packages form layers, and a module may import only from
layers below its own (never one above, never a sibling in its own layer), so there is no
import cycle between packages; inside a package, modules import each other without cycles.
Every import counts, including those inside functions (they are how the CLI stays fast to
start, not a way around the layers).

The same check as import-linter's ``layers`` contract, written out so that it needs no
extra tool: ``python tests/test_layers.py`` prints the contract and what breaks it (.ci/run).
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "k2mini"

# Highest first. Names in one string separated by "|" are independent siblings. The most
# specific name a module falls under decides its layer (testing.faults runs the CLI under
# injected faults, so it sits above cli; the rest of testing builds fixtures).
LAYERS = [
    "k2mini.testing.faults",
    "k2mini.cli",
    "k2mini.commands",
    "k2mini.planner",
    "k2mini.heal | k2mini.validate | k2mini.nano | k2mini.inspection",
    "k2mini.teacher | k2mini.quantize | k2mini.offload",
    "k2mini.convert",
    "k2mini.selection",
    "k2mini.analysis",
    "k2mini.testing",
    "k2mini.model",
    "k2mini.output",
    "k2mini.checkpoint",
    "k2mini.sizes | k2mini.versioned_file | k2mini.resources | k2mini.textdata | k2mini.engine",
    "k2mini.errors",
]
ROOT = "k2mini"  # the package itself (__version__) is below every layer


def _layer_of() -> dict[str, int]:
    return {name.strip(): i for i, layer in enumerate(LAYERS) for name in layer.split("|")}


def unit(module: str, layers: dict[str, int]) -> str | None:
    """The most specific contract name ``module`` falls under (None: the root package)."""
    parts = module.split(".")
    for n in range(len(parts), 1, -1):
        if ".".join(parts[:n]) in layers:
            return ".".join(parts[:n])
    return None


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PACKAGE.rglob("*.py")):
        rel = f.relative_to(PACKAGE.parent).with_suffix("")
        out[".".join(rel.parts).removesuffix(".__init__")] = f
    return out


def imports(path: Path, module: str, known: set[str]) -> set[str]:
    """k2mini modules ``path`` imports anywhere in it (``from k2mini.x import y`` counts
    k2mini.x.y when that is a module, else k2mini.x)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    pkg = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in _runtime_nodes(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == ROOT}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = pkg.split(".")[: len(pkg.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base.split(".")[0] != ROOT:
                continue
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in known]
            found |= set(subs) if subs and len(subs) == len(node.names) else {base} | set(subs)
    return found - {module}


def _runtime_nodes(tree: ast.AST):
    """Every node except those under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    todo = [tree]
    while todo:
        node = todo.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", getattr(child.test, "attr", None)) == "TYPE_CHECKING":
                todo.extend(child.orelse)
                continue
            todo.append(child)


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, m, set(mods)) for m, p in mods.items()}


def violations(g: dict[str, set[str]]) -> list[str]:
    layers = _layer_of()
    out = []
    for m in sorted(g):
        src = unit(m, layers)
        if src is None and m != ROOT:
            out.append(f"{m}: in no layer of the contract")
            continue
        for d in sorted(g[m]):
            dst = unit(d, layers)
            if src is None or dst is None or src == dst:
                continue
            if layers[dst] < layers[src]:
                out.append(f"{m} imports {d}: {dst} is a layer above {src}")
            elif layers[dst] == layers[src]:
                out.append(f"{m} imports {d}: {dst} and {src} are independent siblings")
    return out


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of modules with more than one member (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in g:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


# Package __init__ modules that re-export their submodules (k2mini.testing, k2mini.offload)
# import their own children: a cycle by the graph, not one that can fail at import.
def _real_cycles(g: dict[str, set[str]]) -> list[list[str]]:
    return [c for c in cycles({m: {d for d in ds if not d.startswith(m + ".")} for m, ds in g.items()})]


def test_no_module_imports_a_layer_above_its_own():
    assert violations(graph()) == []


def test_no_import_cycles_between_modules():
    assert _real_cycles(graph()) == []


def test_every_package_is_in_the_contract():
    layers = _layer_of()
    pkgs = {f"{ROOT}.{p.parent.name}" if p.name == "__init__.py" else f"{ROOT}.{p.stem}" for p in PACKAGE.glob("*/__init__.py")}
    pkgs |= {f"{ROOT}.{p.stem}" for p in PACKAGE.glob("*.py") if p.stem != "__init__"}
    assert sorted(p for p in pkgs if p not in layers) == []


def test_the_checker_sees_an_upward_import():
    """A reference violation: the checker must flag checkpoint importing convert."""
    g = {"k2mini.checkpoint.reader": {"k2mini.convert.pipeline"}, "k2mini.convert.pipeline": {"k2mini.checkpoint.reader"}}
    assert violations(g) == ["k2mini.checkpoint.reader imports k2mini.convert.pipeline: k2mini.convert is a layer above k2mini.checkpoint"]
    assert cycles(g) == [["k2mini.checkpoint.reader", "k2mini.convert.pipeline"]]


if __name__ == "__main__":
    g = graph()
    print("layers (highest first; a module imports only from layers below its own):")
    for i, layer in enumerate(LAYERS):
        print(f"  {i + 1:2d}. {layer}")
    bad, loops = violations(g), _real_cycles(g)
    edges = sum(len(v) for v in g.values())
    print(f"{len(g)} modules, {edges} imports between them: "
          f"{'contract KEPT' if not bad and not loops else 'contract BROKEN'}")
    for v in bad:
        print("  BROKEN:", v)
    for c in loops:
        print("  CYCLE:", " <-> ".join(c))
    sys.exit(1 if bad or loops else 0)
