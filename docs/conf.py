"""Sphinx configuration for fastbn's documentation.

Build: ``python -m sphinx -W -b html docs docs/_build/html``. The checkout's own fastbn is
documented when its extensions are built in place (``python setup.py build_ext
--inplace``, or ``pip install -e .``); otherwise the installed fastbn is.
"""
import glob
import importlib
import os
import re
import sys

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.util.docutils import SphinxDirective
from sphinx.util.nodes import nested_parse_with_titles

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def checkout_is_built(root):
    """Whether `root` holds a fastbn package with its extensions built in place (then the
    docs describe that tree); otherwise the installed fastbn is documented, since an
    unbuilt source tree cannot be imported."""
    pkg = os.path.join(root, "fastbn")
    return any(glob.glob(os.path.join(pkg, "_kernels*" + ext)) for ext in (".so", ".pyd"))


if checkout_is_built(ROOT):
    sys.path.insert(0, ROOT)
else:
    # `python -m sphinx` run from the checkout puts it on sys.path as "" or its path:
    # drop it, so that `import fastbn` finds the installed package
    sys.path[:] = [p for p in sys.path
                   if os.path.abspath(p or os.curdir) != ROOT]

import fastbn  # noqa: E402

project = "fastbn"
author = "the fastbn developers"
copyright = "the fastbn developers"
release = fastbn.__version__
version = ".".join(release.split(".")[:2])

# Math is rendered by a copy of MathJax that the build puts into _static/ (the
# sphinx-mathjax-offline package, in the docs and test extras): the pages need no network.
try:
    importlib.import_module("sphinx-mathjax-offline")
except ImportError as exc:
    raise ImportError("fastbn's docs render their math with a local copy of MathJax: "
                      "pip install sphinx-mathjax-offline (or the docs extra: "
                      'pip install -e ".[docs]")') from exc

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "sphinx-mathjax-offline",
    "numpydoc",
]

exclude_patterns = ["_build"]
templates_path = []
html_static_path = []
html_theme = "alabaster"
# wide enough for the speed table's ten columns at 1280 pixels
html_theme_options = {"page_width": "1240px", "sidebar_width": "200px", "body_max_width": "none"}
html_title = f"fastbn {release}"

autodoc_typehints = "none"
autodoc_member_order = "bysource"
# numpydoc: class pages list their methods through autodoc, not through autosummary stubs.
numpydoc_show_class_members = False
numpydoc_class_members_toctree = False
# numpydoc loads autosummary; nothing here uses generated stub pages.
autosummary_generate = False


class IfAvailable(SphinxDirective):
    """``.. fastbn-if-available:: module[:name]`` -- render the content only when the
    module (and name) can be imported from the fastbn being documented.

    fastbn's framework adapters land one by one; the API reference documents exactly what
    the installed package provides (tests/test_docs.py checks that every public name is
    documented), and says so when a part is absent instead of failing the build.
    """

    required_arguments = 1
    has_content = True

    def run(self):
        target = self.arguments[0]
        modname, _, attr = target.partition(":")
        try:
            mod = importlib.import_module(modname)
            if attr:
                getattr(mod, attr)
        except (ImportError, AttributeError):
            para = nodes.paragraph()
            para += nodes.emphasis(text=f"{target.replace(':', '.')} is not part of this "
                                        f"build of fastbn ({release}).")
            return [para]
        node = nodes.container()
        nested_parse_with_titles(self.state, self.content, node)
        return node.children


def readme_block_as_rst(text, marker):
    """The block of README.md between ``<!-- marker -->`` and ``<!-- /marker -->`` as
    reStructuredText: its Markdown pipe tables become list-tables, ``code`` spans literals.

    The README's speed section is written once, from one run of ``python -m fastbn``; the
    performance guide shows the same text, with its tables as real tables.
    """
    begin, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    if begin not in text or end not in text:
        raise ValueError(f"README.md has no {begin} ... {end} block")
    lines = text.split(begin, 1)[1].split(end, 1)[0].strip("\n").splitlines()
    out, i = [], 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                cells = [c.strip() for c in lines[i].strip().strip("|").split("|")]
                if not all(set(c) <= set("-:") and c for c in cells):   # not the rule row
                    rows.append(cells)
                i += 1
            out += ["", ".. list-table::", "   :header-rows: 1", ""]
            for row in rows:
                for k, cell in enumerate(row):
                    text = _md_inline(cell) if cell.strip("-") else "\\" + cell   # "-": no list
                    out.append(("   * - " if k == 0 else "     - ") + text)
            out.append("")
            continue
        out.append(_md_inline(line))
        i += 1
    return "\n".join(out)


def _md_inline(line):
    """Markdown code spans as reStructuredText literals."""
    return re.sub(r"(?<!`)`([^`]+)`(?!`)", r"``\1``", line)


class ReadmeBlock(SphinxDirective):
    """``.. fastbn-readme-block:: marker`` -- the README's marked block, rendered here."""

    required_arguments = 1

    def run(self):
        path = os.path.join(ROOT, "README.md")
        self.env.note_dependency(path)
        with open(path, encoding="utf-8") as f:
            rst = readme_block_as_rst(f.read(), self.arguments[0])
        node = nodes.container()
        self.state.nested_parse(StringList(rst.splitlines(), source=path), 0, node)
        return node.children


def setup(app):
    app.add_directive("fastbn-if-available", IfAvailable)
    app.add_directive("fastbn-readme-block", ReadmeBlock)
