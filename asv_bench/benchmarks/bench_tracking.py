"""Tracked numbers (not times): speed-up over the NumPy reference, and float32 accuracy.

The speed-up is measured in one process, the reference and fastbn timed back to back
(best of a few calls each), so it is meaningful even when the machine's absolute speed
drifts between runs. The accuracy benchmarks report the largest error of a float32 result
at a mean offset of 1e4 (where a naive E[x^2] - E[x]^2 or a float32 (x - mean) loses
digits) against a float64 computation from the same float32 inputs, in float32 ulps
(see common.max_ulp).
"""
import numpy as np

import fastbn
import fastbn.reference

from . import common


class SpeedUpOverReference:
    """time(fastbn.reference) / time(fastbn) for each operation; higher is better."""

    params = common.PARAMS
    param_names = common.PARAM_NAMES
    unit = "x"
    timeout = 300

    def setup(self, dtype, shape, layout):
        common.skip_duplicate(shape, layout)
        self.x, self.dy, self.w, self.b = common.data(shape, layout, dtype)
        C = self.w.shape[0]
        self.rm, self.rv = np.zeros(C, dtype=dtype), np.ones(C, dtype=dtype)
        _, self.mean, self.invstd = fastbn.batch_norm_train(self.x, self.w, self.b,
                                                            layout=layout)
        self.layout = layout

    def _ratio(self, op):
        impls = []
        for mod in (fastbn.reference, fastbn):
            if op == "train":
                impls.append(lambda m=mod: m.batch_norm_train(self.x, self.w, self.b,
                                                              layout=self.layout))
            elif op == "infer":
                impls.append(lambda m=mod: m.batch_norm_infer(self.x, self.rm, self.rv,
                                                              self.w, self.b,
                                                              layout=self.layout))
            else:
                impls.append(lambda m=mod: m.batch_norm_backward(self.dy, self.x, self.mean,
                                                                 self.invstd, self.w,
                                                                 layout=self.layout))
        t_ref = common.best_time(impls[0], repeat=3)
        t_fast = common.best_time(impls[1], repeat=10)
        return t_ref / t_fast

    def track_speedup_train(self, dtype, shape, layout):
        return self._ratio("train")

    def track_speedup_infer(self, dtype, shape, layout):
        return self._ratio("infer")

    def track_speedup_backward(self, dtype, shape, layout):
        return self._ratio("backward")


class AccuracyFloat32Offset1e4:
    """Max error in float32 ulps at offset 1e4 vs float64; lower is better."""

    params = [[(16, 8, 32, 32), (4096, 16)], common.LAYOUTS]
    param_names = ["shape", "layout"]
    unit = "ulp"
    offset = 1e4
    eps = 1e-5

    def setup(self, shape, layout):
        common.skip_duplicate(shape, layout)
        self.x, self.dy, self.w, self.b = common.data(shape, layout, "float32",
                                                      offset=self.offset, seed=2)
        self.layout = layout
        self.y64, self.mean64, self.invstd64 = common.train_forward64(
            self.x, self.w.astype(np.float64), self.b.astype(np.float64), self.eps, layout)

    def track_ulp_train(self, shape, layout):
        y, _, _ = fastbn.batch_norm_train(self.x, self.w, self.b, eps=self.eps,
                                          layout=self.layout)
        return common.max_ulp(y, self.y64)

    def track_ulp_infer(self, shape, layout):
        # Running statistics equal to the float64 batch statistics: the exact answer is y64.
        rm = self.mean64
        rv = 1.0 / self.invstd64 ** 2 - self.eps
        y = fastbn.batch_norm_infer(self.x, rm, rv, self.w, self.b, eps=self.eps,
                                    layout=self.layout)
        return common.max_ulp(y, self.y64)

    def track_ulp_backward(self, shape, layout):
        dx64 = common.backward64(self.dy, self.x, self.mean64, self.invstd64,
                                 self.w.astype(np.float64), self.layout)
        dx, _, _ = fastbn.batch_norm_backward(self.dy, self.x, self.mean64, self.invstd64,
                                              self.w, layout=self.layout)
        return common.max_ulp(dx, dx64)
