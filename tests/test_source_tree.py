"""Importing fastbn from a source tree whose extensions are not built (a fresh clone, with
fastbn installed elsewhere or not at all) says so and what to do, instead of Python's
'partially initialized module' message."""
import os
import shutil
import subprocess
import sys

import fastbn

PACKAGE = os.path.dirname(fastbn.__file__)


def _unbuilt_tree(tmp_path, with_setup=True):
    tree = tmp_path / "checkout"
    shutil.copytree(PACKAGE, tree / "fastbn",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "*.c", "__pycache__"))
    if with_setup:
        (tree / "setup.py").write_text("# the checkout's build script\n")
    return tree


def _import_in(tree):
    # -S: no site-packages, so no installed (or editable) fastbn can answer the import
    return subprocess.run([sys.executable, "-S", "-c", "import fastbn"], cwd=str(tree),
                          capture_output=True, text=True, timeout=120)


def test_unbuilt_source_tree_says_what_to_do(tmp_path):
    proc = _import_in(_unbuilt_tree(tmp_path))
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: fastbn is imported from its source tree"), last
    assert "not built" in last and "pip install -e ." in last
    assert "another directory" in last


def test_missing_extensions_outside_a_source_tree(tmp_path):
    proc = _import_in(_unbuilt_tree(tmp_path, with_setup=False))
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert "fastbn's compiled extensions cannot be imported" in last, last
