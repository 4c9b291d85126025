"""The package's shape: every import points down the layers, no two modules import each other (directly or in a
circle), every subpackage says its one job, and no module outgrows one idea.

Read from the source with `ast` (nothing is imported): module-level and function-level imports, `import kochat_trl.x`,
`from kochat_trl.x import y` and relative imports, `if TYPE_CHECKING:` ones included. Run it as a script
(`python tests/test_layout.py`) to print the layers and the counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "kochat_trl"

# Highest first. A module may import its own layer's modules and any layer below it, never one above. Names that
# share a layer are independent: none of them imports another. `kochat_trl` itself (its __init__: the version)
# sits below everything.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("__main__",),  # python -m kochat_trl
    ("cli",),  # the kochat-trl command
    ("pipeline", "ui", "fitcheck"),  # the whole pipeline; the web page over a run; will a stage fit on a GPU
    ("recipes",),  # one training stage each, and the steps they share
    ("rl",),  # TRL's RL and preference trainers
    ("eval",),  # judging, scoring, generating and reporting answers
    ("config",),  # a recipe's settings, parsed and checked
    ("models",),  # loading, building, merging and exporting models
    ("data",),  # Korean data layouts and the stage datasets
    ("run",),  # console, output folders, checkpoints, engines
    ("errors",),  # the one-line user errors
)
MAX_LINES = 400


def _modules() -> dict[str, tuple[Path, bool]]:
    """Dotted name -> (file, is a package __init__) for every module of the package."""
    found = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        found[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    return found


def _owner(name: str, modules: dict) -> str | None:
    """The module `name` (a module, or something defined in one) lives in."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def import_edges() -> dict[str, set[str]]:
    """module -> the kochat_trl modules it imports (anywhere in its file)."""
    modules = _modules()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, (path, is_package) in modules.items():
        package = name if is_package else name.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(parent + ([node.module] if node.module else []))
                # `from pkg import mod` imports the submodule; `from mod import name` the module `name` is in.
                targets = [f"{base}.{alias.name}" for alias in node.names]
            else:
                continue
            for target in targets:
                owner = _owner(target, modules) if target.split(".")[0] == "kochat_trl" else None
                if owner and owner != name:
                    edges[name].add(owner)
    return edges


def layer_of(module: str) -> tuple[int, str] | None:
    """(rank: 0 is the top, the layer's name) of a module; the package root is below every layer."""
    if module == "kochat_trl":
        return len(LAYERS), "kochat_trl"
    top = module.split(".")[1]
    return next(((rank, top) for rank, names in enumerate(LAYERS) if top in names), None)


def unplaced() -> list[str]:
    return sorted(module for module in _modules() if layer_of(module) is None)


def upward_edges() -> list[str]:
    """Imports from a lower layer to a higher one, or between two names of one layer."""
    found = []
    for source, targets in import_edges().items():
        for target in targets:
            if layer_of(source) is None or layer_of(target) is None:
                continue  # reported by test_every_module_has_a_layer
            (low, source_name), (high, target_name) = layer_of(source), layer_of(target)
            if high < low or (high == low and source_name != target_name):
                found.append(f"{source} -> {target}")
    return sorted(found)


def cycles() -> list[list[str]]:
    """Every circle of imports between modules (strongly connected components of more than one module)."""
    edges = import_edges()
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for target in sorted(edges[node]):
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in on_stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(edges):
        if node not in index:
            visit(node)
    return found


def test_every_module_has_a_layer():
    assert not unplaced(), f"modules in no layer of tests/test_layout.py LAYERS: {unplaced()}"


def test_imports_point_down_the_layers():
    found = upward_edges()
    assert not found, f"{len(found)} import(s) up the layers (or across one layer):\n" + "\n".join(found)


def test_no_import_cycles():
    found = cycles()
    assert not found, f"{len(found)} import circle(s):\n" + "\n".join(" <-> ".join(circle) for circle in found)


def test_every_subpackage_says_its_job_in_one_line():
    for init in sorted(PACKAGE.glob("*/__init__.py")):
        docstring = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8")))
        assert docstring, f"{init}: no docstring saying the subpackage's job"
        assert len(docstring.splitlines()[0]) <= 120, f"{init}: the job line runs over one line"


def test_no_module_outgrows_one_idea():
    long = {
        str(path.relative_to(PACKAGE.parent)): lines
        for path in PACKAGE.rglob("*.py")
        if (lines := len(path.read_text(encoding="utf-8").splitlines())) > MAX_LINES
    }
    assert not long, f"modules over {MAX_LINES} lines: {long}"


if __name__ == "__main__":
    for rank, names in enumerate(LAYERS):
        jobs = []
        for name in names:
            init = PACKAGE / name / "__init__.py"
            job = ast.get_docstring(ast.parse(init.read_text(encoding="utf-8"))) if init.is_file() else None
            jobs.append(f"{name}: {job.splitlines()[0]}" if job else name)
        print(f"{rank:2}  " + "\n    ".join(jobs))
    print(f"unplaced modules: {len(unplaced())}, upward imports: {len(upward_edges())}, circles: {len(cycles())}")
    for line in [*unplaced(), *upward_edges(), *(" <-> ".join(circle) for circle in cycles())]:
        print("  " + line)
