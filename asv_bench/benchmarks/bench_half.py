"""16-bit data (float16, bfloat16 from ml_dtypes) with float32 parameters: training forward,
inference and backward, against the same calls on float32 data in SpeedUpFloat32 (unit "x":
float32 time / 16-bit time, measured in one process). Commits without 16-bit support skip."""
import numpy as np

import fastbn

from . import common

DTYPES = ["float16", "bfloat16"]
SHAPES = [(8, 64, 56, 56), (256, 1024)]


def _dtype(name):
    if name == "bfloat16":
        try:
            import ml_dtypes
        except ImportError as exc:
            raise NotImplementedError("bfloat16 needs ml_dtypes") from exc
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _data(dtype, shape, layout):
    """16-bit x, dy with float32 weight and bias; NotImplementedError if this commit
    refuses 16-bit data."""
    common.skip_duplicate(shape, layout)
    x32, dy32, w, b = common.data(shape, layout, "float32")
    x, dy = x32.astype(dtype), dy32.astype(dtype)
    try:
        fastbn.batch_norm_infer(x[:2], np.zeros(w.shape), np.ones(w.shape), layout=layout)
    except TypeError as exc:
        raise NotImplementedError("no 16-bit data in this commit") from exc
    return x, dy, w, b


class HalfPrecision:
    params = [DTYPES, SHAPES, common.LAYOUTS]
    param_names = ["dtype", "shape", "layout"]

    def setup(self, dtype, shape, layout):
        self.x, self.dy, self.w, self.b = _data(_dtype(dtype), shape, layout)
        _, self.mean, self.invstd = fastbn.batch_norm_train(self.x, self.w, self.b,
                                                            layout=layout)
        self.layout = layout

    def time_train(self, dtype, shape, layout):
        fastbn.batch_norm_train(self.x, self.w, self.b, layout=self.layout)

    def time_infer(self, dtype, shape, layout):
        fastbn.batch_norm_infer(self.x, self.mean, 1 / self.invstd ** 2, self.w, self.b,
                                layout=self.layout)

    def time_backward(self, dtype, shape, layout):
        fastbn.batch_norm_backward(self.dy, self.x, self.mean, self.invstd, self.w,
                                   layout=self.layout)


class SpeedUpFloat32:
    """float32 time / 16-bit time of the training forward (higher is better)."""
    params = [DTYPES, [(8, 64, 56, 56)], common.LAYOUTS]
    param_names = ["dtype", "shape", "layout"]
    unit = "x"

    def setup(self, dtype, shape, layout):
        self.x, _, self.w, self.b = _data(_dtype(dtype), shape, layout)
        self.x32 = self.x.astype(np.float32)
        self.layout = layout

    def track_speedup_train(self, dtype, shape, layout):
        t16 = common.best_time(lambda: fastbn.batch_norm_train(self.x, self.w, self.b,
                                                               layout=self.layout), 20)
        t32 = common.best_time(lambda: fastbn.batch_norm_train(self.x32, self.w, self.b,
                                                               layout=self.layout), 20)
        return t32 / t16
