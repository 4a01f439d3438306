"""Sphinx configuration for fastbn's documentation.

Build: ``python -m sphinx -W -b html docs docs/_build/html``. The checkout's own fastbn is
documented when its extensions are built in place (``python setup.py build_ext
--inplace``, or ``pip install -e .``); otherwise the installed fastbn is.
"""
import glob
import importlib
import os
import sys

from docutils import nodes
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

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.mathjax",
    "numpydoc",
]

exclude_patterns = ["_build"]
templates_path = []
html_static_path = []
html_theme = "alabaster"
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


def setup(app):
    app.add_directive("fastbn-if-available", IfAvailable)
