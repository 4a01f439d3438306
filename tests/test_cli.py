"""The command lines: every option is checked before any work (argparse's exit status 2
and a message naming the option), and what runs, runs to the end."""
import os
import subprocess
import sys

import pytest

from fastbn.bench import cli, options, plot, table
from fastbn.bench import distributed as dist_bench


@pytest.fixture
def no_work(monkeypatch):
    """Replace every benchmark entry point by a recorder: a test then sees whether any
    work started."""
    ran = []
    for name in ("run", "fused_table", "crossover"):
        monkeypatch.setattr(table, name, lambda *a, _n=name, **kw: ran.append(_n) or [])
    monkeypatch.setattr(dist_bench, "launch", lambda args: ran.append("launch") or 0)
    monkeypatch.setattr(dist_bench, "worker", lambda args: ran.append("worker"))
    return ran


def refused(entry, argv, capsys, *needles):
    with pytest.raises(SystemExit) as exc:
        entry(argv)
    assert exc.value.code == 2, argv
    err = capsys.readouterr().err
    assert all(n in err for n in needles), (argv, err)
    return err


BAD_COUNTS = ["0", "-1", "1.5", "x", ""]


@pytest.mark.parametrize("option", ["--threads", "--rounds"])
@pytest.mark.parametrize("value", BAD_COUNTS)
@pytest.mark.parametrize("mode", [[], ["--quick"], ["--fused"]])
def test_counts_must_be_positive(option, value, mode, capsys, no_work):
    refused(cli.main, mode + [option, value], capsys, f"argument {option}", ">= 1")
    assert not no_work


@pytest.mark.parametrize("option", ["--threads", "--rounds"])
@pytest.mark.parametrize("value", BAD_COUNTS)
def test_distributed_counts_must_be_positive(option, value, capsys, no_work):
    refused(dist_bench.main, ["--bench", option, value], capsys,
            f"argument {option}", ">= 1")
    assert not no_work


@pytest.mark.parametrize("argv, needle", [
    (["--bench", "--procs", "0"], "--procs"),
    (["--bench", "--procs", "1,x"], "--procs"),
    (["--bench", "--shape", "4"], "--shape"),
    (["--bench", "--shape", "4,0,2"], "--shape"),
    (["--bench", "--layout", "nchw"], "--layout"),
    (["--bench", "--dtype", "float16"], "--dtype"),
    (["--rounds", "3"], "--bench"),
    (["--bench", "--bogus"], "unrecognized"),
])
def test_distributed_options(argv, needle, capsys, no_work):
    refused(dist_bench.main, argv, capsys, needle)
    assert not no_work


def test_distributed_good_options_reach_the_benchmark(no_work, monkeypatch):
    monkeypatch.setattr(dist_bench, "under_mpiexec", lambda: False)
    monkeypatch.setattr(dist_bench.importlib.util, "find_spec", lambda name: True)
    assert dist_bench.main(["--bench", "--threads", "2", "--rounds", "1"]) == 0
    assert no_work == ["launch"]


@pytest.mark.parametrize("option", ["--markdown", "--plot"])
def test_output_paths_are_tried_first(option, tmp_path, capsys, no_work):
    ext = ".md" if option == "--markdown" else ".png"
    missing_dir = str(tmp_path / "no" / "such" / ("table" + ext))
    refused(cli.main, ["--quick", option, missing_dir], capsys, f"argument {option}",
            "cannot write", "No such file or directory")
    refused(cli.main, ["--quick", option, str(tmp_path)], capsys, f"argument {option}",
            "is a directory")
    if os.geteuid() != 0:                 # root writes anywhere: the mode bits do not stop it
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        refused(cli.main, ["--quick", option, str(locked / ("t" + ext))], capsys,
                "cannot write")
    assert not no_work and not (tmp_path / "no").exists()


def test_path_probe_leaves_files_as_they_were(tmp_path, no_work):
    existing = tmp_path / "old.md"
    existing.write_text("keep me\n")
    assert options.writable_file(str(existing)) == str(existing)
    assert existing.read_text() == "keep me\n"
    new = tmp_path / "new.md"
    assert options.writable_file(str(new)) == str(new) and not new.exists()


def test_plot_format_and_needs(tmp_path, capsys, no_work, monkeypatch):
    pytest.importorskip("matplotlib")
    refused(cli.main, ["--quick", "--plot", str(tmp_path / "speed.txt")], capsys,
            "--plot", ".png", "speed.txt")
    refused(cli.main, ["--quick", "--plot", str(tmp_path / "speed")], capsys, "--plot")
    monkeypatch.setattr(plot, "available", lambda: False)
    refused(cli.main, ["--quick", "--plot", str(tmp_path / "speed.png")], capsys,
            "matplotlib", "pip install")
    assert not no_work and not list(tmp_path.iterdir())


def test_peer_options_need_torch(tmp_path, capsys, no_work, monkeypatch):
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec",
                        lambda name: None if name == "torch" else real(name))
    refused(cli.main, ["--vs-torch"], capsys, "--vs-torch", "pip install torch")
    if plot.available():
        refused(cli.main, ["--plot", str(tmp_path / "s.png")], capsys, "--plot",
                "pip install torch")
    assert not no_work


@pytest.mark.parametrize("argv, needle", [
    (["--crossover", "--quick"], "--crossover takes no other option"),
    (["--crossover", "--threads", "2"], "--crossover takes no other option"),
    (["--crossover", "--fused"], "not allowed with"),
    (["--fused", "--dtype", "float64"], "--fused takes only"),
    (["--fused", "--quick"], "--fused takes only"),
    (["--fused", "--vs-torch"], "--fused takes only"),
    (["--dtype", "int8"], "--dtype"),
    (["--layout", "nhwc"], "--layout"),
    (["--bogus"], "unrecognized"),
])
def test_combinations_that_would_be_ignored(argv, needle, capsys, no_work):
    refused(cli.main, argv, capsys, needle)
    assert not no_work


def test_bfloat16_needs_ml_dtypes(capsys, no_work, monkeypatch):
    real = cli.importlib.util.find_spec
    monkeypatch.setattr(cli.importlib.util, "find_spec",
                        lambda name: None if name == "ml_dtypes" else real(name))
    refused(cli.main, ["--quick", "--dtype", "bfloat16"], capsys, "ml_dtypes")
    assert not no_work


def test_good_options_reach_the_benchmark(no_work, tmp_path):
    assert cli.main(["--quick", "--threads", "1", "--rounds", "1",
                      "--markdown", str(tmp_path / "t.md")]) == 0
    assert cli.main(["--fused", "--layout", "NCHW", "--rounds", "2", "--threads", "1"]) == 0
    assert cli.main(["--crossover"]) == 0
    assert no_work == ["run", "fused_table", "crossover"]
    assert (tmp_path / "t.md").exists()          # written after the (recorded) run


def run(*args):
    return subprocess.run([sys.executable, "-W", "error", *args], capture_output=True,
                          text=True, timeout=120)


def test_distributed_module_runs_without_warnings():
    """python -m fastbn.distributed imports cleanly as __main__ (fastbn does not import it
    first, which made runpy warn) and prints its help."""
    done = run("-m", "fastbn.distributed")
    assert done.returncode == 0 and "--bench" in done.stdout, done.stderr
    assert done.stderr == "", done.stderr


def test_refused_from_the_shell_before_any_work():
    done = run("-m", "fastbn", "--rounds", "0")
    assert done.returncode == 2 and "argument --rounds" in done.stderr
    assert done.stdout == ""              # not even the header of the table
    done = run("-m", "fastbn.distributed", "--bench", "--threads", "0")
    assert done.returncode == 2 and "argument --threads" in done.stderr
    assert done.stdout == ""
