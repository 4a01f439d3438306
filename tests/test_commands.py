"""The documented commands that tools/check_commands.py runs (it runs them in CI, .ci/run):
here, that it finds every block of README.md and docs/getting-started.rst, and reads them
the way a shell would."""
import importlib.util
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOL = os.path.join(ROOT, "tools", "check_commands.py")

pytestmark = pytest.mark.skipif(
    not (os.path.isfile(TOOL) and os.path.isfile(os.path.join(ROOT, "docs", "getting-started.rst"))),
    reason="tools/ and docs/ are not in this tree")


def _tool():
    spec = importlib.util.spec_from_file_location("check_commands", TOOL)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_readme_and_guide_block_is_found():
    tool = _tool()
    readme, guide = tool.documented()
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        assert len(readme) == f.read().count("```bash")
    flat = [c for b in readme for c in b]
    assert flat[0] == "python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/python -m fastbn"
    assert any(c.endswith("-m pytest") and '".[test]"' in c for c in flat)
    assert any("mpiexec" in c for c in flat)
    # the guide's install and test blocks, comments stripped
    assert ["pip install -e .", "python -m fastbn --quick"] in guide
    assert ['pip install -e ".[test]"', "python -m pytest"] in guide
    for block in readme + guide:
        assert block and all(c and "  #" not in c for c in block)


def test_block_parsing():
    tool = _tool()
    text = ("Intro::\n\n    pip install x      # a comment\n    python -m y\n\nAfter.\n\n"
            ".. code-block:: text\n\n    not a command\n\nOther::\n\n    echo no\n")
    assert tool.rst_blocks(text) == [["pip install x", "python -m y"]]
    md = "a\n```bash\n# only a comment\ncmd one  # c\n\ncmd two\n```\n```python\nx = 1\n```\n"
    assert tool.readme_blocks(md) == [["cmd one", "cmd two"]]


def test_the_source_tree_message_is_the_one_fastbn_prints():
    with open(os.path.join(ROOT, "fastbn", "__init__.py"), encoding="utf-8") as f:
        assert _tool().SOURCE_TREE_MESSAGE in f.read()


def test_ci_runs_the_packaging_and_command_checks():
    ci = os.path.join(ROOT, ".ci", "run")
    if not os.path.isfile(ci):
        pytest.skip("not a checkout: no .ci/run")
    with open(ci, encoding="utf-8") as f:
        lines = [line.strip() for line in f if not line.lstrip().startswith("#")]
    assert "tools/check-packaging" in lines
    assert "python3 tools/check_commands.py --except-readme-tests" in lines
