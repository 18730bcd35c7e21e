"""The package's layers, as docs/ARCHITECTURE.md declares them, hold in the code (issue 20).

Every ``import`` of a tvtool module is read with ``ast``, at module level and inside functions alike (an import in
a function that points up a layer is a circle waiting to happen, however late it runs). A module may import its own
layer and the layers its layer "may import" (and what those may import, transitively); every module belongs to
exactly one layer; and apart from the circles listed below, the import graph has none.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tvtool"
ARCHITECTURE = ROOT / "docs" / "ARCHITECTURE.md"

# Circles that exist and are scheduled to go: delete the entry when the circle is gone.
KNOWN_CYCLES: list[set[str]] = []


# ------------------------------------------------------------------------------------------------ reading
def module_files() -> dict[str, Path]:
    """{dotted module name: file} for every module of the package (a package is its __init__)."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: set[str]) -> set[tuple[str, int]]:
    """(tvtool module imported, line) for every import statement in the file, wherever it stands."""
    is_package = path.name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            # `from pkg import mod` imports the module pkg.mod; `from mod import name` imports mod
            targets = [f"{origin}.{a.name}" if f"{origin}.{a.name}" in modules else origin for a in node.names]
        else:
            continue
        for target in targets:
            if target == "tvtool" or target.startswith("tvtool."):
                while target and target not in modules:  # `from tvtool.x import name` inside a module
                    target = target.rpartition(".")[0]
                if target:
                    found.add((target, node.lineno))
    return found


def declared_layers() -> tuple[list[str], dict[str, list[str]], dict[str, set[str]]]:
    """(layer names in table order, {layer: module patterns}, {layer: layers it may import, closure included})
    from the table under "## Layers" in docs/ARCHITECTURE.md."""
    text = ARCHITECTURE.read_text()
    section = text.split("\n## Layers", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("|")]
    header = [c.strip() for c in rows[0].strip("|").split("|")]
    col = {name: header.index(name) for name in ("layer", "modules", "may import")}
    names, patterns, direct = [], {}, {}
    for row in rows[2:]:
        cells = [c.strip() for c in row.strip("|").split("|")]
        layer = cells[col["layer"]]
        names.append(layer)
        patterns[layer] = re.findall(r"`([^`]+)`", cells[col["modules"]])
        direct[layer] = {x.strip() for x in cells[col["may import"]].split(",") if x.strip() not in ("", "-", "—")}
    allowed = {}
    for layer in names:
        seen, todo = {layer}, list(direct[layer])
        while todo:
            other = todo.pop()
            assert other in direct, f"ARCHITECTURE.md: layer {layer!r} may import {other!r}, which is no layer"
            if other not in seen:
                seen.add(other)
                todo.extend(direct[other])
        allowed[layer] = seen
    return names, patterns, allowed


def layer_of(module: str, patterns: dict[str, list[str]]) -> list[str]:
    def matches(pattern: str) -> bool:
        if pattern.endswith(".*"):
            return module.startswith(pattern[:-1])
        return module == pattern

    return [layer for layer, pats in patterns.items() if any(matches(p) for p in pats)]


def graph() -> dict[str, set[tuple[str, int]]]:
    files = module_files()
    return {name: imports_of(name, path, set(files)) for name, path in files.items()}


# ------------------------------------------------------------------------------------------------ tests
def test_every_module_is_in_exactly_one_layer():
    _, patterns, _ = declared_layers()
    misplaced = {m: layer_of(m, patterns) for m in module_files() if len(layer_of(m, patterns)) != 1}
    assert not misplaced, f"modules in no layer or in several (fix the table in docs/ARCHITECTURE.md): {misplaced}"


def test_every_listed_module_exists():
    _, patterns, _ = declared_layers()
    modules = module_files()
    stale = [p for pats in patterns.values() for p in pats
             if not (p.endswith(".*") and any(m.startswith(p[:-1]) for m in modules)) and p not in modules]
    assert not stale, f"docs/ARCHITECTURE.md lists modules that do not exist: {stale}"


def test_no_module_imports_from_a_layer_above_its_own():
    _, patterns, allowed = declared_layers()
    files = module_files()
    bad = []
    for module, imported in graph().items():
        (layer,) = layer_of(module, patterns)
        for target, line in sorted(imported):
            # importing a.b.c also runs the packages a and a.b
            for reached in [target] + [target.rsplit(".", i)[0] for i in range(1, target.count("."))]:
                (target_layer,) = layer_of(reached, patterns)
                if target_layer not in allowed[layer]:
                    bad.append(f"{files[module].relative_to(ROOT)}:{line}: {module} ({layer}) imports {reached} "
                               f"({target_layer})")
    assert not bad, "imports pointing up a layer:\n" + "\n".join(sorted(set(bad)))


def _cycles(edges: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components with more than one module (Tarjan), or a module importing itself."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1 or v in edges.get(v, ()):
                out.append(comp)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    edges = {m: {t for t, _ in imported} for m, imported in graph().items()}
    cycles = _cycles(edges)
    unknown = [sorted(c) for c in cycles if c not in KNOWN_CYCLES]
    assert not unknown, f"import circles: {unknown}"
    gone = [sorted(c) for c in KNOWN_CYCLES if c not in cycles]
    assert not gone, f"these circles are gone: remove them from KNOWN_CYCLES in {Path(__file__).name}: {gone}"


# ------------------------------------------------------------------------------------------------ the checker
def test_checker_sees_function_level_and_relative_imports(tmp_path):
    """The reader behind the tests above finds imports inside functions, relative ones at any depth, and `from pkg
    import module` as that module: otherwise the layer test could not fail."""
    src = tmp_path / "m.py"
    src.write_text("from . import models\nfrom ..errors import TVToolError\n\n"
                   "def f():\n    from .formats.arch import infer\n    import tvtool.cli.models\n")
    modules = {"tvtool", "tvtool.models", "tvtool.errors", "tvtool.formats", "tvtool.formats.arch", "tvtool.cli",
               "tvtool.cli.models", "tvtool.x", "tvtool.x.m"}
    found = {(t, line) for t, line in imports_of("tvtool.x.m", src, modules)}
    # in the subpackage tvtool.x, "." is tvtool.x (which holds no module named models or formats)
    assert found == {("tvtool.x", 1), ("tvtool.errors", 2), ("tvtool.x", 5), ("tvtool.cli.models", 6)}
    # as a module of the top package, the same file's relative imports resolve one level up
    (tmp_path / "n.py").write_text(src.read_text().replace("..errors", ".errors"))
    found = {t for t, _ in imports_of("tvtool.n", tmp_path / "n.py", modules)}
    assert found == {"tvtool.models", "tvtool.errors", "tvtool.formats.arch", "tvtool.cli.models"}


def test_checker_flags_an_upward_import(monkeypatch):
    """A module of the bottom layer importing the CLI is reported, with file and line."""
    real = imports_of

    def with_violation(name, path, modules):
        found = real(name, path, modules)
        return found | {("tvtool.cli", 1)} if name == "tvtool.errors" else found

    monkeypatch.setitem(globals(), "imports_of", with_violation)  # graph() looks it up when called
    with pytest.raises(AssertionError, match=r"tvtool/errors.py:1: tvtool.errors \(foundation\) imports tvtool.cli"):
        test_no_module_imports_from_a_layer_above_its_own()


def test_cycle_finder():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [{"a", "b", "c"}]
    assert _cycles({"a": {"b"}, "b": set()}) == []
