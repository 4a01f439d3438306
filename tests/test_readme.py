"""The README's example runs, and its commands are the ones CI runs."""
import pathlib
import re

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_readme_training_step_runs():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "README has no python example"
    scope = {}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    assert scope["y"].shape == scope["x"].shape
    assert np.isfinite(scope["dx"]).all()
    # one SGD step on 0.5*||y - 1||^2 moves beta towards 1
    assert (scope["beta"] > 0).all()


def _blocks():
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


def test_every_readme_snippet_runs_on_its_own():
    """Each Python block of the README runs alone, in a fresh namespace, as a reader
    pastes it (no names from another block)."""
    for i, block in enumerate(_blocks()):
        exec(compile(block, f"README.md python block {i + 1}", "exec"), {})


def test_readme_fused_relu_example_runs():
    blocks = _blocks()
    scope = {}
    exec(compile(blocks[1], "README.md", "exec"), scope)
    assert (scope["y"] >= 0).all() and (scope["y_eval"] >= 0).all()
    np.testing.assert_array_equal(scope["dres"], np.where(scope["y"] > 0, scope["dy"], 0))


def test_ci_runs_the_readme_test_command():
    if not (ROOT / ".ci" / "run").exists():
        pytest.skip("not a checkout (an unpacked sdist or a copy of the tests): no .ci/run")
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_cmd = [c for c in commands if "pytest" in c]
    assert len(test_cmd) == 1
    assert test_cmd[0] in (ROOT / ".ci" / "run").read_text()
