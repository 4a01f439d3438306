"""The benchmarks (fastbn.bench): the speed table behind `python -m fastbn` runs, with and
without PyTorch; the Caffe engines' rows."""
import io

import numpy as np
import pytest

from fastbn.bench import caffe as caffe_bench
from fastbn.bench import cli, plot, table, timing


@pytest.mark.parametrize("with_torch", [False, True])
def test_run_small_table(with_torch):
    if with_torch:
        pytest.importorskip("torch")
    out = io.StringIO()
    rows = table.run(shapes=[(8, 32, 8, 8), (33, 64, 32, 32)], layouts=("NCHW", "NHWC"),
                      rounds=1, with_torch=with_torch, caffe=False, file=out)
    text = out.getvalue()
    assert "openmp" in text and "(8, 32, 8, 8)" in text
    ops = {(r["shape"], r["layout"], r["op"]) for r in rows}
    for layout in ("NCHW", "NHWC"):
        for op in ("train", "infer", "backward", "brn_train"):
            assert ((8, 32, 8, 8), layout, op) in ops
        assert ((33, 64, 32, 32), layout, "train_out") in ops      # roofline row (8 MB)
    timed = [r for r in rows if r["op"] in table.OPS]
    assert all(r["fastbn"] > 0 and r["ref"] > 0 for r in timed)
    if with_torch:
        assert all(np.isfinite(r["vs_torch"]) for r in timed)
    else:
        assert all(np.isnan(r["vs_torch"]) for r in timed)
    # the small shape's latency row: p50 <= p99 of LATENCY_CALLS calls of each op
    (lat,) = [r for r in rows if r["op"] == "latency" and r["layout"] == "NCHW"]
    assert lat["shape"] == (8, 32, 8, 8) and lat["calls"] == table.LATENCY_CALLS
    assert all(0 < lat[op][0] <= lat[op][1] for op in table.OPS)
    assert "latency   fastbn p50 / p99 of" in text
    assert not [r for r in rows if r["op"] == "latency" and r["shape"] == (33, 64, 32, 32)]
    md = table.markdown(rows, threads=2)
    assert md.count("\n| (8, 32, 8, 8) | NCHW |") == 5
    # the legend before the table, the summary after it
    assert "Rows: train, infer, backward" in text and "roofline   large inputs" in text
    tail = text.rstrip().splitlines()
    start = tail.index("Summary (fastbn's time / the peer's; < 1: fastbn faster):")
    summary = tail[start + 1:]
    assert summary[0].startswith("  PyTorch: " + ("fastbn faster in" if with_torch
                                                  else "not measured"))
    assert summary[2].startswith("  NumPy reference: fastbn faster in ")
    assert summary[3].startswith("  roofline: ") and "of 4 within 1.15x" in summary[3]


def test_summary_counts_wins_losses_and_the_roofline():
    rows = [dict(shape=(2, 3), layout="NCHW", op=op, vs_torch=v, vs_ort=float("nan"),
                 speedup=4.0) for op, v in zip(table.OPS, (0.5, 1.25, 0.75))]
    rows.append(dict(shape=(2, 3), layout="NCHW", op="self", train_vs_model=1.2,
                     backward_vs_model=1.0))
    lines = table.summary(rows)
    assert lines[1] == ("  PyTorch: fastbn faster in 2 of 3 rows (median 0.75, 0.50-1.25); "
                        "slower: (2, 3) NCHW infer 1.25")
    assert lines[2] == "  ONNX Runtime (inference): not measured"
    assert lines[3] == "  NumPy reference: fastbn faster in 3 of 3 rows (median 0.25, 0.25-0.25)"
    assert lines[4] == ("  roofline: 1 of 2 within 1.15x of the model; over: (2, 3) NCHW "
                        "train 1.20")


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_fused_rows(monkeypatch, dtype):
    """The fused-ReLU rows: every ratio measured and finite, in the Markdown table, and
    python -m fastbn --fused runs them alone; for 16-bit data too (the layers' rows take
    float32 parameters)."""
    out = io.StringIO()
    rows = table.fused_table(shapes=[(4, 8, 16, 16)], layouts=("NCHW", "NHWC"), rounds=1,
                              dtype=np.dtype(dtype), file=out)
    assert [r["layout"] for r in rows] == ["NCHW", "NHWC"]
    for r in rows:
        for k in ("relu_train", "relu_infer", "residual", "vs_max_train", "vs_max_infer",
                  "relu_backward"):
            assert np.isfinite(r[k]) and r[k] > 0, k
    assert out.getvalue().count("relu_backward/backward") == 2
    md = table.markdown(rows, threads=2)
    assert md.count("relu_backward / backward") == 2
    seen = {}
    monkeypatch.setattr(table, "fused_table", lambda **kw: seen.update(kw) or [])
    cli.main(["--fused", "--layout", "NHWC", "--rounds", "2"])
    assert seen["layouts"] == ("NHWC",) and seen["rounds"] == 2


def test_crossover_table_restores_thresholds():
    from fastbn import _threads
    saved = _threads.POLICY[:]
    out = io.StringIO()
    table.crossover(sizes=(1 << 12,), rounds=2, file=out)
    lines = out.getvalue().splitlines()
    assert lines[0].split()[:3] == ["values", "layout", "op"]
    assert [line.split()[:3] for line in lines[1:]] == [
        ["4096", layout, op] for layout in ("NCHW", "NHWC")
        for op in ("train", "infer", "backward")]
    assert all(float(line.split()[-1]) > 0 for line in lines[1:])
    assert _threads.POLICY == saved


def test_make_data_layouts():
    x, dy, w, b = timing.make_data((2, 3, 4, 5), "NHWC", np.float32)
    assert x.shape == dy.shape == (2, 4, 5, 3) and w.shape == b.shape == (3,)
    assert x.dtype == np.float32 and np.isfinite(x).all()


def test_main_quick_args(monkeypatch):
    seen = {}

    def fake_run(**kw):
        seen.update(kw)
        return []
    monkeypatch.setattr(table, "run", fake_run)
    cli.main(["--quick", "--layout", "NHWC", "--threads", "1", "--dtype", "float64"])
    assert seen["shapes"] == table.QUICK_SHAPES and seen["layouts"] == ("NHWC",)
    assert seen["threads"] == 1 and seen["dtype"] is np.float64 and seen["rounds"] == 3


def test_plot_of_a_small_table(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [dict(shape=s, layout=L, op=op, vs_torch=r)
            for s, r in (((8, 32, 8, 8), 0.5), ((32, 64, 16, 16), 1.5))
            for L in ("NCHW", "NHWC") for op in table.OPS]
    path = tmp_path / "speed.png"
    plot.plot(rows, str(path), "test")
    assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG"


def test_caffe_rows_structure():
    rows = caffe_bench.bench_rows([(2, 3, 4, 4)], rounds=1)
    assert [r["op"] for r in rows] == ["forward TRAIN", "backward"]
    for r in rows:
        assert r["shape"] == (2, 3, 4, 4) and r["dtype"] == "float32"
        assert r["fused"] > 0 and r["gemv"] > 0
        assert r["ratio"] == pytest.approx(r["gemv"] / r["fused"])


def test_roofline_model():
    """The issue's model: NCHW training I + kR and backward I + R + 2kR, k = 0 when a
    channel fits in half the L2; NHWC I + R and I + 3R."""
    I, R, l2 = 5.0, 2.0, 2 << 20
    assert table.roofline_model("NCHW", 1 << 20, l2, I, R) == (5.0, 7.0, 0)
    assert table.roofline_model("NCHW", (1 << 20) + 1, l2, I, R) == (7.0, 11.0, 1)
    assert table.roofline_model("NHWC", 1, l2, I, R) == (7.0, 11.0, 1)


def test_self_rows_carry_the_roofline_ratios():
    out = io.StringIO()
    rows = table.run(shapes=[(33, 64, 32, 32)], layouts=("NCHW",), rounds=1,
                     with_reference=False, with_torch=False, caffe=False, fused=False,
                     roofline=False, file=out)
    (row,) = [r for r in rows if r["op"] == "self"]
    assert row["train_vs_model"] == row["train_out"] / row["train_model"] > 0
    assert row["backward_vs_model"] == row["backward_out"] / row["backward_model"] > 0
    assert "roofline" in out.getvalue() and "target <= 1.15" in out.getvalue()
    assert "roofline model" in table.markdown(rows, threads=1)


def test_ort_inference_peer():
    """ONNX Runtime's BatchNormalization node: the same inference as fastbn (to float32
    rounding), timed in the table's ort column for NCHW inference only."""
    pytest.importorskip("onnx")
    pytest.importorskip("onnxruntime")
    from fastbn import batch_norm_infer
    from fastbn.bench import ort
    x, _, w, b = timing.make_data((4, 8, 5, 5), "NCHW", np.float32)
    rm = np.linspace(-1, 1, 8, dtype=np.float32)
    rv = np.linspace(0.5, 2, 8, dtype=np.float32)
    run = ort.ort_infer(x, rm, rv, w, b, threads=2)
    np.testing.assert_allclose(run(), batch_norm_infer(x, rm, rv, w, b), rtol=2e-6,
                               atol=2e-6)
    out = io.StringIO()
    rows = table.run(shapes=[(4, 8, 5, 5)], layouts=("NCHW", "NHWC"), rounds=1,
                     with_torch=False, with_reference=False, caffe=False, file=out)
    timed = {(r["layout"], r["op"]): r for r in rows if r["op"] in table.OPS}
    assert np.isfinite(timed["NCHW", "infer"]["vs_ort"])
    assert all(np.isnan(r["vs_ort"]) for k, r in timed.items() if k != ("NCHW", "infer"))
    assert "onnxruntime" in out.getvalue() and "| vs ort |" in table.markdown(rows, 2)
    out = io.StringIO()
    rows = table.run(shapes=[(4, 8, 5, 5)], layouts=("NCHW",), rounds=1, with_torch=False,
                     with_reference=False, caffe=False, with_ort=False, file=out)
    assert all(np.isnan(r["vs_ort"]) for r in rows if r["op"] in table.OPS)
