"""The package's shape, checked: layers without import cycles, the library never imports a
recipe, modules stay small. Every import counts, also those inside functions and under
``TYPE_CHECKING`` (those are how the cycles of the past hid)."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "unimodal"
MAX_LINES = 420  # "aim under ~400": a module past this has more than one job


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imported(name: str, path: Path, known: set[str]) -> set[str]:
    """Modules of this package that ``name`` imports anywhere in its file."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            # `from .x import y` imports x.y when y is a module, else x
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import unimodal.vq.model` -> that module
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    edges = {name: imported(name, path, set(mods)) for name, path in mods.items()}
    # A package's __init__ re-exports its submodules; importing a submodule runs the parent
    # __init__ first, but that is not a dependency of the submodule on its siblings, so the
    # edges from a submodule to its own parent package are dropped.
    return {name: {t for t in targets if not name.startswith(t + ".")} for name, targets in edges.items()}


def test_import_graph_has_no_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt):] + [nxt]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node)


def test_cycle_detection_sees_function_local_and_type_checking_imports(tmp_path):
    # The checker itself: both import forms that once hid cycles must produce edges.
    source = PACKAGE / "data" / "collator.py"
    assert "unimodal.processor" in imported("unimodal.data.collator", source, set(modules()))  # TYPE_CHECKING
    assert "unimodal.generation" in imported("unimodal.recipes.finetune", PACKAGE / "recipes" / "finetune.py",
                                             set(modules()))  # imported inside a function


def test_the_library_never_imports_a_recipe():
    edges = graph()
    offenders = {name: sorted(t for t in targets if t.startswith("unimodal.recipes"))
                 for name, targets in edges.items()
                 if not name.startswith("unimodal.recipes") and name != "unimodal.cli"}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_vocab_and_data_format_are_leaves():
    edges = graph()
    assert edges["unimodal.vocab"] == set()
    assert edges["unimodal.data.format"] == set()
    assert edges["unimodal.data.packing"] == set()


@pytest.mark.parametrize("name", sorted(modules()))
def test_modules_stay_small(name):
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines; split it along its jobs"
