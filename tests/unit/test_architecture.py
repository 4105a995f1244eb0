"""The layering of src/difflo, checked on the source (no imports run): no import cycles, and no module
reaching into another module's private names. See docs/decisions.md, "Architecture"."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[2] / "src"
PKG = SRC / "difflo"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules(root: Path = PKG) -> dict[str, Path]:
    return {module_name(p): p for p in sorted(root.rglob("*.py"))}


def _resolve(importer: str, is_pkg: bool, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names."""
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_pkg else base[:-1]
    base = base[:len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(name: str, path: Path, known: dict[str, Path]):
    """(module imported, names imported from it, line) for every import anywhere in the file,
    function-level imports included (they were how a cycle hid before)."""
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            mod = _resolve(name, is_pkg, node)
            for a in node.names:                     # `from pkg import submodule` imports the submodule
                if f"{mod}.{a.name}" in known:
                    yield f"{mod}.{a.name}", [], node.lineno
            yield mod, [a.name for a in node.names if f"{mod}.{a.name}" not in known], node.lineno


def graph(known: dict[str, Path]) -> dict[str, set[str]]:
    """difflo module -> the difflo modules it imports; importing a.b.c also runs the packages a.b (not
    the root package, whose __init__ only holds the version)."""
    edges: dict[str, set[str]] = {m: set() for m in known}
    for name, path in known.items():
        for mod, _, _ in imports(name, path, known):
            while mod and mod != "difflo":
                if mod in known and mod != name and not name.startswith(mod + "."):
                    edges[name].add(mod)
                mod = mod.rpartition(".")[0]
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the graph as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m):
        state[m] = 1
        stack.append(m)
        for n in sorted(edges.get(m, ())):
            if state.get(n) == 1:
                return stack[stack.index(n):] + [n]
            if n not in state and (c := visit(n)):
                return c
        stack.pop()
        state[m] = 2
        return None

    for m in sorted(edges):
        if m not in state and (c := visit(m)):
            return c
    return None


def private_imports(known: dict[str, Path]) -> list[str]:
    """`from other import _name` and `other_module._name` between difflo modules (dunders allowed)."""
    bad = []
    for name, path in known.items():
        aliases = {}
        for mod, names, line in imports(name, path, known):
            if mod != name and mod.startswith("difflo"):
                bad += [f"{path.relative_to(SRC)}:{line}: {n} from {mod}" for n in names
                        if n.startswith("_") and not n.startswith("__")]
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and _resolve(name, path.name == "__init__.py", node).startswith("difflo"):
                base = _resolve(name, path.name == "__init__.py", node)
                aliases.update({a.asname or a.name: f"{base}.{a.name}" for a in node.names
                                if f"{base}.{a.name}" in known})
            elif isinstance(node, ast.Import):
                aliases.update({a.asname or a.name: a.name for a in node.names if a.name in known})
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and node.attr.startswith("_") and not node.attr.startswith("__") \
                    and aliases[node.value.id] != name:
                bad.append(f"{path.relative_to(SRC)}:{node.lineno}: {node.value.id}.{node.attr}")
    return bad


CORE = {"difflo.schedules", "difflo.diffusion", "difflo.flow", "difflo.edm", "difflo.noise_paths", "difflo.guidance",
        "difflo.samplers", "difflo.edit.operators", "difflo.nn", "difflo.errors", "difflo.io", "difflo.images"}
STUDIES = {"difflo.experiments"}
FRONT_ENDS = {"difflo.cli", "difflo.serve", "difflo.__main__"}
LAYERS = ("numerical core", "library", "studies", "front ends")


def layer(module: str) -> int:
    """0 core, 1 library (everything else), 2 studies, 3 front ends; a package's modules share its layer."""
    for i, group in ((0, CORE), (2, STUDIES), (3, FRONT_ENDS)):
        if any(module == g or module.startswith(g + ".") for g in group):
            return i
    return 1


def test_layers_import_only_upwards():
    """A module imports from its own layer and the ones above it (docs/decisions.md); the web server
    never imports the CLI (front ends call the library, not each other)."""
    edges = graph(modules())
    bad = [f"{m} ({LAYERS[layer(m)]}) imports {n} ({LAYERS[layer(n)]})"
           for m, ns in edges.items() for n in ns if layer(n) > layer(m)]
    bad += [f"{m} imports {n}" for m, ns in edges.items() for n in ns
            if m.startswith("difflo.serve") and n.startswith("difflo.cli")]
    assert bad == []


def test_no_import_cycles():
    cycle = find_cycle(graph(modules()))
    assert cycle is None, " -> ".join(cycle)


@pytest.mark.slow
def test_no_private_names_across_modules():
    assert private_imports(modules()) == []


# ----------------------------------------------------------------------------- the checks can fail
def _write(root: Path, files: dict[str, str]) -> dict[str, Path]:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return {module_name(p): p for p in sorted((root / "difflo").rglob("*.py"))}


@pytest.fixture
def fake(tmp_path, monkeypatch):
    monkeypatch.setattr(f"{__name__}.SRC", tmp_path)
    return lambda files: _write(tmp_path, files)


def test_a_cycle_through_a_function_level_import_is_found(fake):
    known = fake({"difflo/__init__.py": "", "difflo/a.py": "from . import b\n",
                  "difflo/b.py": "def f():\n    from .c import g\n", "difflo/c.py": "from .a import x\n"})
    assert find_cycle(graph(known)) == ["difflo.a", "difflo.b", "difflo.c", "difflo.a"]


def test_a_cycle_through_a_package_init_is_found(fake):
    known = fake({"difflo/__init__.py": "", "difflo/cli/__init__.py": "from . import ev\n",
                  "difflo/cli/ev.py": "from ..ev.cli import run\n", "difflo/cli/argtypes.py": "",
                  "difflo/ev/__init__.py": "", "difflo/ev/cli.py": "from ..cli.argtypes import seed\n"})
    assert find_cycle(graph(known)) is not None


def test_private_names_across_modules_are_found(fake):
    known = fake({"difflo/__init__.py": "", "difflo/a.py": "def _p(): pass\n",
                  "difflo/b.py": "from .a import _p\nfrom . import a\na._p()\n", "difflo/c.py": "from .a import __doc__\n"})
    assert private_imports(known) == ["difflo/b.py:1: _p from difflo.a", "difflo/b.py:3: a._p"]
