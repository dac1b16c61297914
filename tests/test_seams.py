"""Module seams: no import circle in tiger_fast/ or benchmarks/, no private name imported across
modules of the package, every module opens with a docstring (read with ast; nothing is imported)."""
import ast
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _modules():
    out = {}
    for top in ("tiger_fast", "benchmarks"):
        for d, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    p = os.path.join(d, f)
                    name = os.path.relpath(p, ROOT)[:-3].replace(os.sep, ".")
                    out[name[: -len(".__init__")] if name.endswith(".__init__") else name] = p
    return out


MODULES = _modules()


def _imports(name, path):
    """(module imported, names taken from it) for every import statement, at any depth."""
    pkg = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    for n in ast.walk(ast.parse(open(path).read())):
        if isinstance(n, ast.Import):
            for a in n.names:
                yield a.name, []
        elif isinstance(n, ast.ImportFrom):
            if n.level:
                base = pkg.split(".")[: len(pkg.split(".")) - (n.level - 1)]
                target = ".".join(base + ([n.module] if n.module else []))
            elif name.startswith("benchmarks.") and f"benchmarks.{n.module}" in MODULES:
                target = f"benchmarks.{n.module}"  # scripts import their siblings by bare name
            else:
                target = n.module
            yield target, [a.name for a in n.names]


def _graph():
    g = {}
    for name, path in MODULES.items():
        deps = set()
        for target, names in _imports(name, path):
            subs = [f"{target}.{x}" for x in names if f"{target}.{x}" in MODULES]
            deps.update(subs)  # `from . import metrics`: the submodule, not the package
            if len(subs) < len(names) or not names:
                deps.add(target)
        g[name] = {d for d in deps if d in MODULES and d != name}
    return g


def test_no_import_circle():
    g = _graph()
    state = {}

    def visit(m, stack):
        state[m] = "open"
        for d in sorted(g[m]):
            if state.get(d) == "open":
                pytest.fail("import circle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d, stack + [d])
        state[m] = "done"

    for m in sorted(g):
        if m not in state:
            visit(m, [m])


def test_no_private_name_imported_across_package_modules():
    bad = [f"{name}: from {target} import {x}"
           for name, path in MODULES.items() if name.startswith("tiger_fast")
           for target, names in _imports(name, path) if target and target.startswith("tiger_fast")
           for x in names if x.startswith("_") and not x.startswith("__")
           and f"{target}.{x}" not in MODULES  # a compiled extension module (_generate_ext) is a module
           and not (target == "tiger_fast" and x.endswith("_ext"))]
    assert bad == []


@pytest.mark.parametrize("name", sorted(MODULES))
def test_module_opens_with_a_docstring(name):
    doc = ast.get_docstring(ast.parse(open(MODULES[name]).read()))
    assert doc and doc.strip(), f"{name} has no module docstring saying its one job"
