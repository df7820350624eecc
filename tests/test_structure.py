"""The code's shape, read from the source with ``ast``: no import cycle
between the project's modules, no private name imported from another module,
no library file over 600 lines, and ``patternstore`` never imports ``attention``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("patternstore", "attention")
MAX_LINES = 600


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
    importer = next(name for name, targets in edges.items() if "attention.kernels" in targets)
    edges["attention.kernels"].add(importer)
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
