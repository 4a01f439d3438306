"""The fused residual add + ReLU (fastbn.batch_norm_relu_*): time of the fused calls, and
their ratios to the plain calls and to "fastbn then np.maximum", measured in one process
(unit "x"; lower is better). Commits without the fused functions skip."""
import numpy as np

import fastbn

from . import common

SHAPES = [(8, 64, 56, 56), (256, 1024)]
RATIO_SHAPES = [(8, 64, 56, 56)]


def _fused(name):
    return common.feature("fastbn", name)


class FusedRelu:
    params = [common.DTYPES, SHAPES, common.LAYOUTS]
    param_names = ["dtype", "shape", "layout"]

    def setup(self, dtype, shape, layout):
        common.skip_duplicate(shape, layout)
        self.train = _fused("batch_norm_relu_train")
        self.infer = _fused("batch_norm_relu_infer")
        self.backward = _fused("batch_norm_relu_backward")
        self.x, self.dy, self.w, self.b = common.data(shape, layout, dtype)
        self.res = common.data(shape, layout, dtype, seed=1)[0] - dtype_half(dtype)
        self.layout = layout
        self.y, self.mean, self.invstd = self.train(self.x, self.w, self.b, layout=layout)
        self.var = 1 / self.invstd ** 2
        self.out = common.filled_like(self.x)
        self.dres = common.filled_like(self.x)

    def time_relu_train(self, dtype, shape, layout):
        self.train(self.x, self.w, self.b, layout=self.layout)

    def time_relu_infer(self, dtype, shape, layout):
        self.infer(self.x, self.mean, self.var, self.w, self.b, layout=self.layout)

    def time_relu_infer_residual(self, dtype, shape, layout):
        self.infer(self.x, self.mean, self.var, self.w, self.b, residual=self.res,
                   layout=self.layout, out=self.out)

    def time_relu_backward(self, dtype, shape, layout):
        self.backward(self.dy, self.y, self.x, self.mean, self.invstd, self.w,
                      layout=self.layout)

    def time_relu_backward_dresidual(self, dtype, shape, layout):
        self.backward(self.dy, self.y, self.x, self.mean, self.invstd, self.w,
                      layout=self.layout, out=self.out, dresidual=self.dres)


def dtype_half(dtype):
    return np.dtype(dtype).type(0.5)


class FusedReluRatios:
    """Fused time / plain time (out= both; the ReLU's cost, 1.0 is free), and fused time /
    (fastbn, then np.maximum in place) with fresh outputs (what fusing saves)."""
    params = [["float32"], RATIO_SHAPES, common.LAYOUTS]
    param_names = ["dtype", "shape", "layout"]
    unit = "x"

    def setup(self, dtype, shape, layout):
        FusedRelu.setup(self, dtype, shape, layout)
        self.rm, self.rv = self.mean, self.var

    def _ratio(self, fused, plain):
        return common.best_time(fused, 20) / common.best_time(plain, 20)

    def track_relu_train_vs_train(self, dtype, shape, layout):
        L, o = self.layout, self.out
        return self._ratio(lambda: self.train(self.x, self.w, self.b, layout=L, out=o),
                           lambda: fastbn.batch_norm_train(self.x, self.w, self.b, layout=L,
                                                           out=o))

    def track_relu_infer_vs_infer(self, dtype, shape, layout):
        L, o = self.layout, self.out
        return self._ratio(
            lambda: self.infer(self.x, self.rm, self.rv, self.w, self.b, layout=L, out=o),
            lambda: fastbn.batch_norm_infer(self.x, self.rm, self.rv, self.w, self.b,
                                            layout=L, out=o))

    def track_relu_backward_vs_backward(self, dtype, shape, layout):
        L, o = self.layout, self.out
        return self._ratio(
            lambda: self.backward(self.dy, self.y, self.x, self.mean, self.invstd, self.w,
                                  layout=L, out=o),
            lambda: fastbn.batch_norm_backward(self.dy, self.x, self.mean, self.invstd,
                                               self.w, layout=L, out=o))

    def track_fused_vs_then_maximum_infer(self, dtype, shape, layout):
        L = self.layout

        def unfused():
            y = fastbn.batch_norm_infer(self.x, self.rm, self.rv, self.w, self.b, layout=L)
            np.maximum(y, 0, out=y)
        return self._ratio(
            lambda: self.infer(self.x, self.rm, self.rv, self.w, self.b, layout=L), unfused)

    def track_layer_relu_backward_vs_layer_backward(self, dtype, shape, layout):
        """BatchNorm(activation="relu").backward / BatchNorm.backward after one training
        forward each (fresh outputs): the ReLU layer keeps its mask as bits where the
        kernels read them, so 1.0 is the target."""
        C = self.w.shape[0]
        try:
            relu_bn = fastbn.BatchNorm(C, layout=self.layout, activation="relu")
        except TypeError as exc:
            raise NotImplementedError("no activation= in this commit") from exc
        plain_bn = fastbn.BatchNorm(C, layout=self.layout)
        for bn in (relu_bn, plain_bn):
            bn.weight[...], bn.bias[...] = self.w, self.b
            bn(self.x)
        return self._ratio(lambda: relu_bn.backward(self.dy), lambda: plain_bn.backward(self.dy))
