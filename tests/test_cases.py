"""Each shared test case drives the kernel branch tests/cases.py says it does."""
import numpy as np
import pytest

from fastbn import _calls, _dispatch, _threads
from cases import CASES, ids


@pytest.mark.parametrize("case", CASES, ids=ids(CASES))
def test_case_drives_its_branch(case):
    x = np.empty(case.shape, np.float32)
    axis = 1 if case.layout == "NCHW" else x.ndim - 1
    plan, _ = _calls.plan(x, axis, case.layout)
    n = _threads.effective_threads(2, x.size, plan.view == _calls.PLANAR)
    if not _threads.OPENMP:
        pytest.skip("a build without OpenMP runs every call on one thread")
    assert _dispatch.kernels.schedule(plan.view, plan.N, plan.C, plan.S, n) == case.branch


def test_every_branch_has_cases():
    branches = {c.branch for c in CASES}
    assert {"serial", "planar groups", "planar team", "rows chunks", "rows columns",
            "planar groups, long planes", "planar team, long planes"} <= branches
