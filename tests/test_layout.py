"""The package's layout, read from its source: the imports run one way (no circles), the
library never imports its benchmarks, and the contributor guide's map names every file."""
import ast
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "fastbn")
SOURCES = (".py", ".pyx", ".pxd", ".pxi", ".h")

if not os.path.isfile(os.path.join(PACKAGE, "__init__.py")):     # an installed copy only
    pytest.skip("needs the source tree", allow_module_level=True)


def modules():
    """{dotted name: path} of every Python module of the package."""
    found = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                found[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return found


MODULES = modules()


def _package_of(name, path):
    return name if path.endswith("__init__.py") else name.rpartition(".")[0]


def imports(name):
    """The package's modules that module `name` imports (anywhere in its body), resolved
    from relative imports; `from package import submodule` counts as the submodule."""
    path = MODULES[name]
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    here = _package_of(name, path)
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = here.split(".")
                parts = parts[:len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                       for a in node.names]
        else:
            continue
        for t in targets:
            while t and t not in MODULES:          # fastbn.functional.x -> fastbn.functional
                t = t.rpartition(".")[0]
            if t and t != name and t != "fastbn":
                out.add(t)
    return out


GRAPH = {name: imports(name) for name in MODULES}
ENTRY_POINTS = {"fastbn.__main__", "fastbn.distributed.__main__"}


def is_bench(name):
    return name == "fastbn.bench" or name.startswith("fastbn.bench.")


def test_the_library_does_not_import_the_benchmarks():
    wrong = {name: sorted(filter(is_bench, deps)) for name, deps in GRAPH.items()
             if not is_bench(name) and name not in ENTRY_POINTS
             and any(map(is_bench, deps))}
    assert not wrong, wrong


def test_no_import_circles():
    state, path, circles = {}, [], []

    def visit(n):
        state[n] = "open"
        path.append(n)
        for m in sorted(GRAPH[n]):
            if state.get(m) == "open":
                circles.append(path[path.index(m):] + [m])
            elif m not in state:
                visit(m)
        path.pop()
        state[n] = "done"
    for n in sorted(GRAPH):
        if n not in state:
            visit(n)
    assert not circles, circles


def test_the_graph_is_read():
    """The parser sees the imports it should (a guard against a test that cannot fail)."""
    assert "fastbn._calls" in GRAPH["fastbn.layers"]
    assert "fastbn._validate" in GRAPH["fastbn._calls"]
    assert {"fastbn.bench.table", "fastbn.bench.options"} <= GRAPH["fastbn.bench.cli"]
    assert "fastbn.bench.cli" in GRAPH["fastbn.__main__"]
    assert "fastbn.distributed" in GRAPH["fastbn.bench.distributed"]


def private_names_used(name):
    """(module, name) of every underscore name module `name` takes from another module of
    the package: `from .m import _f`, or `m._f` with m a module it imported (private
    modules themselves, such as fastbn._validate, are the package's to import)."""
    path = MODULES[name]
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    here = _package_of(name, path)
    modules, used = {}, []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            parts = here.split(".")
            base = ".".join(parts[:len(parts) - node.level + 1] + [node.module or ""]
                            ) if node.level else node.module or ""
            base = base.rstrip(".")
            for a in node.names:
                full = f"{base}.{a.name}"
                if full in MODULES or full.replace(".", os.sep) + ".pyx" in PYX:
                    modules[a.asname or a.name] = full
                elif (a.name.startswith("_") and not a.name.startswith("__")
                      and base.startswith("fastbn")):
                    used.append((base, a.name))
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                and node.value.id in modules and node.attr.startswith("_")
                and not node.attr.startswith("__")):
            used.append((modules[node.value.id], node.attr))
    return used


PYX = {os.path.relpath(os.path.join(folder, f), ROOT)
       for folder, _, files in os.walk(PACKAGE) for f in files if f.endswith(".pyx")}


def test_no_module_takes_a_siblings_private_names():
    """Modules talk through public names (the call requests of fastbn._calls, among
    others), never through another module's underscore names."""
    wrong = {name: used for name in MODULES if (used := private_names_used(name))}
    assert not wrong, wrong


def test_private_names_are_seen():
    """The check above sees both forms (a guard against a test that cannot fail)."""
    code = "from .functional import _x\nfrom . import renorm\nrenorm._y()\n"
    path = os.path.join(PACKAGE, "_probe_for_test.py")
    MODULES["fastbn._probe_for_test"] = path
    try:
        with open(path, "w") as f:
            f.write(code)
        assert private_names_used("fastbn._probe_for_test") == [
            ("fastbn.functional", "_x"), ("fastbn.renorm", "_y")]
    finally:
        os.remove(path)
        del MODULES["fastbn._probe_for_test"]


def package_files():
    """Every source file of the package, relative to fastbn/ (generated C excluded)."""
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(SOURCES):
                yield os.path.relpath(os.path.join(folder, f), PACKAGE).replace(os.sep, "/")


def development_map():
    """The literal block under "Where things live" in docs/development.rst."""
    with open(os.path.join(ROOT, "docs", "development.rst"), encoding="utf-8") as f:
        text = f.read()
    lines = text[text.index("::\n", text.index("Where things live")) + 3:].split("\n")
    block = []
    for line in lines:
        if line and not line.startswith(" "):
            break
        block.append(line)
    return "\n".join(block)


@pytest.mark.parametrize("rel", sorted(package_files()))
def test_the_development_map_names_every_file(rel):
    text = development_map()
    if "/" in rel:
        assert rel in text, f"docs/development.rst does not name fastbn/{rel}"
    else:
        pattern = r"(fastbn/|[\s,])" + re.escape(rel) + r"(?![\w.])"
        assert re.search(pattern, text), f"docs/development.rst does not name fastbn/{rel}"


@pytest.mark.parametrize("rel", sorted(r for r in package_files() if r.endswith((".pyx", ".pxi",
                                                                                ".pxd"))))
def test_no_c_inside_python_strings(rel):
    """C lives in the headers of fastbn/kernels/, where C tools can read it."""
    with open(os.path.join(PACKAGE, rel), encoding="utf-8") as f:
        assert "cdef extern from *" not in f.read(), rel
