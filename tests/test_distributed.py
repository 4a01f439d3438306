"""fastbn.distributed: synchronized Batch Normalization over MPI.

The checks run in K processes under ``mpiexec -n K python -m mpi4py tests/mpi/sync_checks.py
MODE...`` (see that script); here pytest launches them with a timeout, so a hang fails the
test instead of the suite. Without mpi4py or an mpiexec they are skipped, with the reason.
"""
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SCRIPT = os.path.join(HERE, "mpi", "sync_checks.py")


def _mpiexec():
    """The mpiexec of this environment (pip install mpich puts it next to the Python), else
    the one on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    return here if os.access(here, os.X_OK) else shutil.which("mpiexec")


MPIEXEC = _mpiexec()
HAVE_MPI4PY = importlib.util.find_spec("mpi4py") is not None
HAVE_ML_DTYPES = importlib.util.find_spec("ml_dtypes") is not None

needs_mpi = pytest.mark.skipif(
    not HAVE_MPI4PY or MPIEXEC is None,
    reason="needs mpi4py and an mpiexec: pip install mpi4py mpich (the 'test' extra has them)")

MODES = ["match", "groups", "layer", "errors", "out", "robust"] + (["half"] if HAVE_ML_DTYPES else [])


def run(cmd, timeout):
    """Run cmd in its own session; on timeout kill every process of it and fail."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"{' '.join(cmd)} hung for more than {timeout} s:\n{out}")
    return proc.returncode, out


def mpirun(k, *args, timeout=240):
    return run([MPIEXEC, "-n", str(k), sys.executable, "-m", "mpi4py"] + list(args), timeout)


@needs_mpi
@pytest.mark.parametrize("k", [1, 2, 3, 4, 8])
def test_sync_batch_norm_in_k_processes(k):
    """Against one process on the whole batch (uneven slices, the last process empty),
    bit-identical statistics everywhere, sub-communicators, the layer over several steps,
    the error cases, out=; 8 processes share the 2 cores."""
    code, out = mpirun(k, SCRIPT, *MODES)
    assert code == 0, out
    assert f"{k} processes" in out and " 0 failures" in out, out


@needs_mpi
def test_checks_fail_when_they_should(tmp_path):
    """The harness reports a wrong result as a failure (exit status 1), not a pass or a
    hang: here the merge keeps the first non-empty process's statistics only."""
    wrong = tmp_path / "wrong.py"
    wrong.write_text(
        "import runpy, sys\n"
        "import fastbn.distributed as d\n"
        "d._chan_merge = lambda parts: next((n, m.copy(), m2.copy()) "
        "for n, m, m2 in parts if n)\n"
        "sys.argv = [%r, 'match']\n"
        "runpy.run_path(%r, run_name='__main__')\n" % (SCRIPT, SCRIPT))
    code, out = mpirun(3, str(wrong))
    assert code != 0, out
    assert "FAIL process 0/3" in out and "mean off by" in out, out


@needs_mpi
def test_benchmark_runs():
    """python -m fastbn.distributed --bench spawns mpiexec and prints one row per count."""
    code, out = run([sys.executable, "-m", "fastbn.distributed", "--bench", "--procs", "1,2",
                     "--shape", "2,8,4,4", "--rounds", "1"], timeout=240)
    assert code == 0, out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["1"], ["2"])]
    assert [r[0] for r in rows] == ["1", "2"], out
    assert all(len(r) == 10 and all(float(v) > 0 for v in r[1:]) for r in rows), out
    assert "fwd/budget" in out


def test_core_does_not_import_mpi4py():
    code = ("import sys, fastbn; fastbn.batch_norm_train; "
            "assert 'mpi4py' not in sys.modules, 'fastbn imported mpi4py'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr


def test_without_mpi4py_the_error_says_what_to_install():
    code = ("import sys; sys.modules['mpi4py'] = None\n"
            "import numpy as np, fastbn.distributed as d\n"
            "try:\n"
            "    d.sync_batch_norm_train(np.ones((2, 3)), comm=object())\n"
            "except ImportError as e:\n"
            "    print('IMPORTERROR', e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr
    assert "IMPORTERROR" in done.stdout and "fastbn[mpi]" in done.stdout, done.stdout


@needs_mpi
def test_docs_training_example_is_independent_of_the_process_count():
    """docs/examples/data_parallel.py prints the same losses and running mean with 1 and
    with 3 processes (uneven slices): the data-parallel step is the whole-batch step."""
    example = os.path.join(os.path.dirname(HERE), "docs", "examples", "data_parallel.py")
    outputs = {}
    for k in (1, 3):
        code, out = mpirun(k, example)
        assert code == 0, out
        outputs[k] = [line for line in out.splitlines()
                      if line.startswith(("step", "running_mean"))]
    assert len(outputs[1]) == len(outputs[3]) == 9, outputs

    def numbers(line):                   # the decimals, before the "(... processes)" note
        return [float(v) for v in re.findall(r"-?\d+\.\d+", line.split("(")[0])]
    for one, three in zip(outputs[1], outputs[3]):
        a, b = numbers(one), numbers(three)
        assert len(a) == len(b) > 0 and all(abs(u - v) <= 2e-5 * max(1, abs(u))
                                        for u, v in zip(a, b)), (one, three)
    first = float(outputs[1][0].split("loss")[1].split()[0])
    last = float(outputs[1][7].split("loss")[1].split()[0])
    assert last < 0.5 * first, outputs[1]          # it learns
