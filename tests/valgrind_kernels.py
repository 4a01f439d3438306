"""A short tour of every fastbn kernel path for valgrind (not collected by pytest).

    PYTHONMALLOC=malloc valgrind --tool=memcheck --error-exitcode=1 --leak-check=full \
        python tests/valgrind_kernels.py

Covers planar (NCHW, whole channels per thread and teams per channel, blocks of a few runs,
and the shorter blocks of inputs beyond the cache), rows (NHWC, (N, C), HW = 1, and few
rows whose channels the threads split),
float32/float64, 1 and 2 threads (inputs above the serial threshold), out= and in place,
tails shorter than the SIMD width, training/eval backward, Batch Renormalization, the
layers (the fused ReLU layers keeping their mask as bits), ONNX and both Caffe engines;
and the output cache: outputs in reused blocks, grown and shrunk by resize, read through
np.frombuffer, freed in another order, given back.
"""
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the checkout's fastbn when its extensions are built there; else the installed one (an
# unpacked sdist's fastbn/ is unbuilt source)
if any(f.startswith("_kernels") and f.endswith((".so", ".pyd"))
       for f in os.listdir(os.path.join(ROOT, "fastbn"))):
    sys.path.insert(0, ROOT)

import fastbn                          # noqa: E402
from fastbn import caffe, onnx         # noqa: E402

SHAPES = [
    ((2, 3, 5, 7), "NCHW"), ((3, 1, 17), "NCHW"), ((2, 5, 1, 1), "NCHW"), ((2, 1), "NCHW"),
    ((4, 2, 70, 130), "NCHW"), ((2, 1, 160, 130), "NCHW"), ((3, 4, 2100), "NCHW"),
    ((2, 5, 7, 3), "NHWC"), ((3, 17, 1), "NHWC"), ((40000, 1), "NHWC"), ((9000, 7), "NHWC"),
    ((2, 600, 33, 2), "NHWC"), ((70, 530), "NCHW"), ((2, 5, 7, 700), "NHWC"),
    ((4, 5, 40, 40), "NCHW"), ((3, 5, 20, 20), "NCHW"), ((22, 1000, 7, 7), "NCHW"),
]


def tour():
    count = 0
    for shape, layout in SHAPES:
        axis = 1 if layout == "NCHW" else len(shape) - 1
        C = shape[axis]
        for dtype in (np.float32, np.float64):
            rng = np.random.default_rng(count)
            x = rng.normal(3.0, 2.0, size=shape).astype(dtype)
            g = rng.normal(size=shape).astype(dtype)
            w, b = rng.normal(size=C), rng.normal(size=C)
            for nt in (1, 2):
                rm, rv = np.zeros(C), np.ones(C)
                y, mean, invstd = fastbn.batch_norm_train(x, w, b, layout=layout,
                                                          running_mean=rm, running_var=rv,
                                                          num_threads=nt)
                xi = x.copy()
                fastbn.batch_norm_train(xi, layout=layout, out=xi, num_threads=nt)
                fastbn.batch_norm_infer(x, rm, rv, w, b, layout=layout, num_threads=nt)
                fastbn.batch_norm_infer(x.copy(), rm, rv, layout=layout,
                                        out=np.empty_like(x), num_threads=nt)
                gi = g.copy()
                for training in (True, False):
                    fastbn.batch_norm_backward(g, x, mean, invstd, w, layout=layout,
                                               training=training, num_threads=nt)
                fastbn.batch_norm_backward(gi, x, mean, invstd, layout=layout, out=gi,
                                           num_threads=nt)
                yr, m, s, r, d = fastbn.batch_renorm_train(x, w, b, np.zeros(C), np.ones(C),
                                                           layout=layout, num_threads=nt)
                fastbn.batch_renorm_backward(g, x, m, s, r, d, w, layout=layout,
                                             num_threads=nt)
                # a transposed (non-contiguous) input takes the copying path
                xt = np.asfortranarray(x)
                fastbn.batch_norm_train(xt, layout=layout, num_threads=nt)
                count += 1
            for cls in (fastbn.BatchNorm, fastbn.BatchRenorm):
                layer = cls(C, layout=layout, dtype=dtype)
                layer.forward(x)
                layer.backward(g)
                layer.eval()
                layer.forward(x)
                # the fused ReLU layers keep their mask as bits (float32, vector builds)
                relu_layer = cls(C, layout=layout, dtype=dtype, activation="relu")
                relu_layer.forward(x)
                relu_layer.backward(g)
                relu_layer.forward(x, g)
                relu_layer.backward(g)
            if layout == "NCHW":
                onnx.batch_normalization(x, w, b, np.zeros(C), np.ones(C), training_mode=1)
                for engine in ("fused", "gemv"):
                    cbn = caffe.BatchNorm(C, engine=engine, dtype=dtype)
                    top = cbn.forward(x, phase="TRAIN")
                    cbn.backward(g)
                    cbn.forward(x, phase="TEST")
                    xc = x.copy()
                    cbn.forward(xc, phase="TRAIN", out=xc)
                    del top
                sc = caffe.Scale(C, bias_term=True, dtype=dtype)
                sc.forward(x)
                sc.backward(g)
    return count + cache_tour()


def cache_tour():
    """Outputs from the output cache (from 1 MiB): reused blocks, resize, frombuffer."""
    fastbn.set_output_cache(64 << 20)
    x = np.random.default_rng(1).normal(size=(4, 8, 96, 96)).astype(np.float32)
    kept = []
    for step in range(4):
        y, mean, invstd = fastbn.batch_norm_train(x)
        dx = fastbn.batch_norm_backward(y, x, mean, invstd)[0]
        kept.append(np.frombuffer(memoryview(dx), np.float32)[::4096].sum())
        if step == 1:
            y.resize(y.size * 2, refcheck=False)       # grows into a new block
            y[-1] = 1.0
            dx.resize(10, refcheck=False)              # shrinks into a small block
            kept.append(float(dx.sum()))
        del y, dx
    n = fastbn.empty_output_cache()
    assert n > 0 and fastbn.output_cache_info()["bytes"] == 0
    return len(kept)


if __name__ == "__main__":
    n = tour()
    print(f"valgrind tour: {n} kernel rounds done")
