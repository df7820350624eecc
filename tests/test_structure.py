"""The code's shape, read from the source with ``ast``: no import cycle
between the project's modules; nothing in ``attention`` points back up its
layers (kernels below dilated and sparse, which never import each other,
below the Hugging Face integration and the multi-head layers); every name
imported from the module that defines it and every ``__all__`` listing only
what its module defines; no private name imported from another module; no
library file over 500 lines; and ``patternstore`` never imports ``attention``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("patternstore", "attention")
MAX_LINES = 500


def modules() -> dict[str, Path]:
    """Dotted module name -> file, for every module of the two packages."""
    found = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> list[tuple[str, tuple[str, ...]]]:
    """(imported project module, names taken from it) for each import of the file."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, ()) for alias in node.names if alias.name.split(".")[0] in PACKAGES]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(here[: len(here) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] not in PACKAGES:
                continue
            names = tuple(alias.name for alias in node.names)
            submodules = [f"{base}.{n}" for n in names if f"{base}.{n}" in known]
            found.append((base, tuple(n for n in names if f"{base}.{n}" not in known)))
            found += [(module, ()) for module in submodules]
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: {target for target, _ in imports(name, path, set(mods)) if target in mods and target != name}
            for name, path in mods.items()}


def test_there_is_no_import_cycle():
    edges = graph()
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            # a package's __init__ importing its own submodules is how packages work, not a cycle
            if nxt in PACKAGES and node.startswith(nxt + "."):
                continue
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for node in sorted(edges):
        if node not in state:
            visit(node, [node])


def test_the_cycle_check_finds_a_cycle(monkeypatch):
    """The check above can fail: a planted edge back from kernels to its importer is found."""
    edges = graph()
    importer = next(name for name, targets in edges.items() if "attention.kernels.attend" in targets)
    edges["attention.kernels.attend"].add(importer)
    monkeypatch.setattr(__import__(__name__), "graph", lambda: edges)
    with pytest.raises(AssertionError, match="import cycle"):
        test_there_is_no_import_cycle()


def test_no_private_name_is_imported_from_another_module():
    """Library modules, tools and tests alike take only public names from the library."""
    mods = modules()
    scripts = {f"{path.parent.name}/{path.name}": path for folder in ("tools", "tests") for path in (ROOT / folder).glob("*.py")}
    private = [f"{name}: {target}.{n}" for name, path in {**mods, **scripts}.items()
               for target, names in imports(name, path, set(mods)) for n in names
               if n.startswith("_") and target != name]
    assert not private, "private names imported across modules:\n" + "\n".join(private)


def test_patternstore_never_imports_attention():
    mods = modules()
    wrong = [name for name, path in mods.items() if name.startswith("patternstore")
             and any(target.startswith("attention") for target, _ in imports(name, path, set(mods)))]
    assert not wrong


@pytest.mark.parametrize("name", sorted(modules()))
def test_a_library_file_fits_in_a_head(name):
    lines = len(modules()[name].read_text().splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (at most {MAX_LINES})"


# The layers of ``attention``, lowest first: a module imports only from lower
# layers and from its own concept (the same subpackage or file).
LAYERS = {
    "attention.checks": 0, "attention.caches": 0, "attention.packed": 0, "attention.residue": 0,
    "attention.dense_reference": 0,
    "attention.kernels": 1, "attention.block_mask": 1,
    "attention.dilated": 2, "attention.sparse": 2,
    "attention.hf": 3, "attention.multihead": 3,
    "attention": 4,
}


def concept(module: str) -> str:
    """The LAYERS entry a module belongs to (its subpackage, or itself)."""
    parts = module.split(".")
    for i in range(len(parts), 0, -1):
        if ".".join(parts[:i]) in LAYERS:
            return ".".join(parts[:i])
    raise AssertionError(f"{module} is in no layer of tests/test_structure.py's LAYERS: add it there")


def back_edges(edges: dict[str, set[str]]) -> list[str]:
    wrong = []
    for name, targets in edges.items():
        if not name.startswith("attention"):
            continue
        for target in targets:
            if not target.startswith("attention"):
                continue
            mine, theirs = concept(name), concept(target)
            if mine != theirs and LAYERS[theirs] >= LAYERS[mine]:
                wrong.append(f"{name} -> {target}")
    return wrong


def test_nothing_points_back_up_the_layers():
    wrong = back_edges(graph())
    assert not wrong, "imports against the layers:\n" + "\n".join(sorted(wrong))


def test_the_layer_check_finds_a_back_edge():
    edges = graph()
    edges["attention.kernels.attend"].add("attention.dilated.module")
    edges["attention.dilated.module"].add("attention.sparse.module")
    assert back_edges(edges) == ["attention.dilated.module -> attention.sparse.module",
                                 "attention.kernels.attend -> attention.dilated.module"] or \
        sorted(back_edges(edges)) == ["attention.dilated.module -> attention.sparse.module",
                                      "attention.kernels.attend -> attention.dilated.module"]


# Where the two rules below hold today (patternstore's own re-exports are
# left to the store's issue, which rewrites those modules).
SCOPE = ("attention", "patternstore")


def defined(path: Path) -> set[str]:
    """Top-level names a file defines itself (functions, classes, assignments)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return names


def test_names_are_imported_from_the_module_that_defines_them():
    """Re-export hubs hide where things live: a name comes from its defining
    module; only a package's ``__init__`` (its public face) re-exports."""
    mods = modules()
    scripts = {f"{path.parent.name}/{path.name}": path for folder in ("tools", "tests", "examples")
               for path in (ROOT / folder).glob("*.py")}
    wrong = []
    for name, path in {**mods, **scripts}.items():
        for target, names in imports(name, path, set(mods)):
            if target not in mods or mods[target].name == "__init__.py" or not target.startswith(SCOPE):
                continue
            missing = [n for n in names if n not in defined(mods[target])]
            wrong += [f"{name}: {n} from {target}" for n in missing]
    assert not wrong, "names imported from a module that does not define them:\n" + "\n".join(wrong)


def test_all_lists_what_the_module_defines():
    wrong = []
    for name, path in modules().items():
        if path.name == "__init__.py" or not name.startswith(SCOPE):
            continue
        tree = ast.parse(path.read_text())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
                listed = {e.value for e in node.value.elts}
                wrong += [f"{name}.{n}" for n in sorted(listed - defined(path))]
    assert not wrong, "__all__ names a module does not define:\n" + "\n".join(wrong)
