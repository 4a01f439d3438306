"""The documentation runs: docstring examples, the examples in docs/*.rst, the Sphinx build.

* Every ``>>>`` example in the docstrings of the installed fastbn modules passes, and every
  public function and class has a numpydoc Examples section.
* Every ``>>>`` example in the pages of docs/ passes (doctest.testfile).
* ``python -m sphinx -W`` builds the site with no warnings, and the API reference documents
  every public name (skipped when sphinx or numpydoc is not installed).
"""
import doctest
import importlib
import inspect
import html
import os
import re
import subprocess
import sys
import zlib

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")

# Modules with docstrings to run. The framework adapters arrived after the core; a module
# that does not exist in this checkout is skipped, a module that fails to import is an error.
MODULES = [
    "fastbn",
    "fastbn.functional",
    "fastbn.reference",
    "fastbn._config",
    "fastbn.layers",
    "fastbn.renorm",
    "fastbn.fusion",
    "fastbn.onnx",
    "fastbn.caffe",
    "fastbn.distributed",
]

# Modules whose ``__all__`` is public API (the submodules fastbn re-exports are covered by
# fastbn's own ``__all__``).
PUBLIC = ["fastbn", "fastbn.reference", "fastbn.renorm", "fastbn.onnx", "fastbn.caffe",
          "fastbn.distributed"]


def _import(name):
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name == name:
            pytest.skip(f"{name} is not part of this checkout")
        raise


def _run_doctests(tests):
    """Run DocTests; return (examples run, report of the failures)."""
    runner = doctest.DocTestRunner(verbose=False, optionflags=doctest.ELLIPSIS)
    out = []
    for test in tests:
        runner.run(test, out=out.append)
    return runner.tries, "".join(out)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name):
    mod = _import(name)
    import fastbn
    saved = fastbn._threads.POLICY[:]
    try:
        tests = doctest.DocTestFinder(exclude_empty=True).find(mod, name)
        _, report = _run_doctests(tests)
    finally:
        fastbn._threads.POLICY[:] = saved
    assert not report, f"doctest failures in {name}:\n{report}"


def _public_callables():
    for modname in PUBLIC:
        try:
            mod = importlib.import_module(modname)
        except ModuleNotFoundError as exc:
            if exc.name == modname:
                continue
            raise
        for attr in getattr(mod, "__all__", []):
            obj = getattr(mod, attr)
            if inspect.isfunction(obj) or inspect.isclass(obj):
                yield f"{modname}.{attr}", obj


def _has_examples(doc):
    lines = inspect.cleandoc(doc or "").splitlines()
    return any(a.strip() == "Examples" and b.strip().startswith("---")
               for a, b in zip(lines, lines[1:]))


def test_every_public_name_has_an_examples_section():
    missing = sorted(label for label, obj in _public_callables()
                     if not _has_examples(obj.__doc__))
    assert not missing, "public names without a numpydoc Examples section: " + ", ".join(missing)


def _pages():
    if not os.path.isdir(DOCS):
        return []
    return sorted(f for f in os.listdir(DOCS) if f.endswith(".rst"))


@pytest.mark.skipif(not _pages(), reason="docs/ is not in this checkout")
@pytest.mark.parametrize("page", _pages())
def test_page_examples(page):
    import fastbn
    saved = fastbn._threads.POLICY[:]
    try:
        result = doctest.testfile(os.path.join(DOCS, page), module_relative=False,
                                  optionflags=doctest.ELLIPSIS, report=False,
                                  verbose=False, raise_on_error=False)
    finally:
        fastbn._threads.POLICY[:] = saved
    assert result.failed == 0, (f"{result.failed} of {result.attempted} examples in "
                                f"docs/{page} failed (run: python -m doctest -v docs/{page})")


def _inventory_names(path):
    """Names of the Python objects in a Sphinx objects.inv, by role."""
    with open(path, "rb") as f:
        for _ in range(4):           # the four plain-text header lines
            f.readline()
        body = zlib.decompress(f.read()).decode("utf-8")
    names = {}
    for line in body.splitlines():
        parts = line.split(" ", 4)
        if len(parts) >= 2 and parts[1].startswith("py:"):
            names.setdefault(parts[1], set()).add(parts[0])
    return names


def _resolve(dotted):
    """The object a documented dotted name refers to, or None."""
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for p in parts[i:]:
                obj = getattr(obj, p)
        except AttributeError:
            return None
        return obj
    return None


@pytest.mark.skipif(not _pages(), reason="docs/ is not in this checkout")
def test_sphinx_build_has_no_warnings_and_covers_the_api(tmp_path):
    pytest.importorskip("sphinx")
    pytest.importorskip("numpydoc")
    pytest.importorskip("sphinx-mathjax-offline")     # the local MathJax (docs/conf.py)
    out = tmp_path / "html"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run(
        [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-E", "-q", "-b", "html",
         DOCS, str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"sphinx -W failed:\n{proc.stdout}\n{proc.stderr}"
    assert (out / "index.html").is_file()

    # Offline: no page loads a script, style sheet, font or image from the network; the
    # math comes from the local MathJax copy the build writes into _static/.
    remote = re.compile(r"<(script|link|img|iframe|source)\b[^>]*\b(src|href)=[\"'](https?:)?//",
                        re.IGNORECASE)
    pages = sorted(out.glob("**/*.html"))
    offenders = [p.name for p in pages if remote.search(p.read_text(encoding="utf-8"))]
    assert not offenders, f"pages that load from the network: {offenders}"
    math = (out / "math.html").read_text(encoding="utf-8")
    assert '<script defer="defer" src="_static/mathjax/tex-chtml.js">' in math
    assert (out / "_static" / "mathjax" / "tex-chtml.js").is_file()

    # The speed section of README.md is rendered in the performance guide, its Markdown
    # tables as HTML tables with the same cells.
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        readme = f.read()
    block = readme.split("<!-- speed-table -->")[1].split("<!-- /speed-table -->")[0]
    md_rows = [[c.strip() for c in line.strip().strip("|").split("|")]
               for line in block.splitlines()
               if line.startswith("|") and not set(line) <= set("|-: ")]
    assert len(md_rows) > 50
    perf = (out / "performance.html").read_text(encoding="utf-8")
    html_rows = [[html.unescape(re.sub(r"<[^>]+>", "", c)).strip()
                  for c in re.findall(r"<t[hd][^>]*>(.*?)</t[hd]>", row, re.S)]
                 for row in re.findall(r"<tr[^>]*>(.*?)</tr>", perf, re.S)]
    missing = [r for r in md_rows if [c.replace("`", "") for c in r] not in html_rows]
    assert not missing, f"README speed rows not in performance.html: {missing[:3]}"

    names = _inventory_names(out / "objects.inv")
    documented = {id(_resolve(n)) for role in ("py:function", "py:class", "py:method")
                  for n in names.get(role, ())}
    modules = names.get("py:module", set())
    undocumented = []
    for label, obj in _public_callables():
        if id(obj) not in documented:
            undocumented.append(label)
    import fastbn
    for attr in fastbn.__all__:
        if inspect.ismodule(getattr(fastbn, attr)) and f"fastbn.{attr}" not in modules:
            undocumented.append(f"fastbn.{attr} (module)")
    assert not undocumented, "not in the API reference: " + ", ".join(sorted(undocumented))


def _conf_fastbn(tmp_path, with_extensions):
    """Run docs/conf.py from a copy of the checkout in tmp_path (its fastbn/ holding the
    Python sources, and the built extensions if asked) and return the fastbn it imported."""
    import shutil
    tree = tmp_path / "checkout"
    (tree / "docs").mkdir(parents=True)
    shutil.copy(os.path.join(DOCS, "conf.py"), tree / "docs" / "conf.py")
    pkg = os.path.join(ROOT, "fastbn")
    ignore = None if with_extensions else shutil.ignore_patterns("*.so", "*.pyd")
    shutil.copytree(pkg, tree / "fastbn", ignore=ignore)
    code = ("import runpy, sys; runpy.run_path(sys.argv[1]); import fastbn; "
            "print(fastbn.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    # run from the checkout's root, as `python -m sphinx ... docs out` is: "" on sys.path
    proc = subprocess.run([sys.executable, "-c", code, str(tree / "docs" / "conf.py")],
                          capture_output=True, text=True, cwd=str(tree), env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    return os.path.realpath(proc.stdout.strip()), os.path.realpath(str(tree))


@pytest.mark.skipif(not _pages(), reason="docs/ is not in this checkout")
@pytest.mark.skipif(not os.path.isdir(os.path.join(ROOT, "fastbn")),
                    reason="the tests run beside an installed fastbn, not in its checkout")
@pytest.mark.parametrize("built", [False, True])
def test_docs_conf_documents_the_built_fastbn(tmp_path, built):
    """docs/conf.py puts the checkout first only when its extensions are built there; an
    unbuilt source tree (a fresh clone next to a `pip install .`) would not import."""
    pytest.importorskip("sphinx")
    pytest.importorskip("sphinx-mathjax-offline")
    if built and not any(f.endswith((".so", ".pyd")) for f in os.listdir(os.path.join(ROOT, "fastbn"))):
        pytest.skip("this checkout has no in-place build to copy")
    imported, tree = _conf_fastbn(tmp_path, built)
    assert imported.startswith(tree + os.sep) == built, imported
