"""The package's structure (docs/architecture.md): imports run one way through the layers, with no
cycle, only package ``__init__`` files re-export, and every public name is listed and documented.

Read from the source (``ast``), imports inside functions included, so that a lazy import cannot hide
an upward dependency."""
from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest

import pyalign

PKG = Path(pyalign.__file__).resolve().parent
DOCS = [PKG.parent / "README.md", *sorted((PKG.parent / "docs").glob("*.md"))]

# Lowest first. A module may import modules of its own layer or below, never above.
LAYERS = [
    ("shared helpers", ("pyalign._version", "pyalign._ext", "pyalign._checks", "pyalign._tensors", "pyalign._outputs",
                        "pyalign._overrides", "pyalign._numpy", "pyalign._metrics", "pyalign.reference")),
    ("ops", ("pyalign.ops",)),
    ("families", ("pyalign.logprob", "pyalign.losses", "pyalign.uncertainty", "pyalign.plasticity",
                  "pyalign.distributed", "pyalign.rl", "pyalign.distill")),
    ("public package", ("pyalign",)),
    ("consumers", ("pyalign.integrations", "pyalign.bench")),
]
PUBLIC = ["pyalign", "pyalign.logprob", "pyalign.losses", "pyalign.uncertainty", "pyalign.plasticity",
          "pyalign.distributed", "pyalign.rl", "pyalign.distill", "pyalign.integrations.trl"]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PKG.rglob("*.py"):
        rel = path.relative_to(PKG.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _layer(module: str) -> int:
    best, depth = None, -1
    for k, (_, prefixes) in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > depth:
                best, depth = k, len(p)
    assert best is not None, f"{module} belongs to no layer of tests/test_architecture.py"
    return best


def _imports(module: str) -> set[str]:
    """The pyalign modules ``module`` imports anywhere in its source (``from pkg import mod`` counts as
    an import of ``pkg.mod`` when that is a module, else of ``pkg``)."""
    path = MODULES[module]
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            for a in node.names:
                found.add(f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base)
    return {m for m in found if m == "pyalign" or m.startswith("pyalign.")} - {module}


GRAPH = {m: _imports(m) for m in MODULES}


def test_every_module_has_a_layer():
    for m in MODULES:
        _layer(m)


def test_imports_run_one_way():
    upward = [f"{m} ({LAYERS[_layer(m)][0]}) imports {t} ({LAYERS[_layer(t)][0]})"
              for m, targets in GRAPH.items() for t in targets if _layer(t) > _layer(m)]
    assert not upward, "upward imports:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    state: dict[str, int] = {}
    cycles = []

    def visit(m, stack):
        state[m] = 1
        for t in sorted(GRAPH.get(m, ())):
            if state.get(t) == 1:
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t in GRAPH and state.get(t) is None:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(GRAPH):
        if state.get(m) is None:
            visit(m, [m])
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_only_the_compiled_core_loader_touches_the_core():
    users = [m for m, path in MODULES.items()
             if any(isinstance(n, (ast.Import, ast.ImportFrom)) and any(a.name == "_pyalign" for a in n.names)
                    or isinstance(n, ast.ImportFrom) and n.module == "_pyalign"
                    for n in ast.walk(ast.parse(path.read_text())))]
    assert users == ["pyalign._ext"], users


def _defined_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
    return names


def _all(tree: ast.Module):
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return ast.literal_eval(node.value)
    return None


@pytest.mark.parametrize("module", sorted(m for m in MODULES
                                          if m in PUBLIC or any(m.startswith(p + ".") for p in PUBLIC[1:])))
def test_public_modules_list_their_names_and_only_packages_re_export(module):
    path = MODULES[module]
    if any(part.startswith("_") for part in module.split(".")[1:]):
        pytest.skip("a private module")
    tree = ast.parse(path.read_text())
    names = _all(tree)
    assert names is not None, f"{module} has no __all__"
    if path.name != "__init__.py":
        foreign = set(names) - _defined_names(tree)
        assert not foreign, f"{module} re-exports {sorted(foreign)}: only a package's __init__.py may"
    mod = importlib.import_module(module)
    for name in names:
        assert hasattr(mod, name), f"{module}.__all__ lists {name!r}, which it does not define"


@pytest.mark.parametrize("module", PUBLIC)
def test_every_public_name_is_documented(module):
    mod = importlib.import_module(module)
    docs = "\n".join(p.read_text() for p in DOCS)
    missing_doc = [n for n in mod.__all__ if n != "__version__" and (inspect.isfunction(getattr(mod, n))
                   or inspect.isclass(getattr(mod, n))) and not inspect.getdoc(getattr(mod, n))]
    assert not missing_doc, f"{module}: no docstring for {missing_doc}"
    unmentioned = [n for n in mod.__all__ if not inspect.ismodule(getattr(mod, n)) and n not in docs]
    assert not unmentioned, f"{module}: {unmentioned} appear nowhere in README.md or docs/"
