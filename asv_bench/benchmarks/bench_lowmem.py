"""The backward from the output (fastbn.batch_norm_backward_from_output) and Ghost Batch
Normalization (ghost_batch_size): their times, and their ratios to the usual calls, which
make the same passes over memory (1.0: no cost)."""
import fastbn

from . import common

GHOST = 8           # samples per ghost batch: four groups of a 32-sample batch
SLOPE = 0.1         # the leaky ReLU's slope below 0
RATIO_SHAPES = [(32, 64, 56, 56), (32, 256, 14, 14)]


class FromOutput:
    params = [common.DTYPES, common.SHAPES, common.LAYOUTS]
    param_names = common.PARAM_NAMES

    def setup(self, dtype, shape, layout):
        common.skip_duplicate(shape, layout)
        self.backward = common.feature("fastbn", "batch_norm_backward_from_output")
        self.x, self.dy, self.w, self.b = common.data(shape, layout, dtype)
        self.y, self.mean, self.invstd = fastbn.batch_norm_train(self.x, self.w, self.b,
                                                                 layout=layout)
        self.out = common.filled_like(self.x)
        self.layout = layout

    def time_backward_from_output(self, dtype, shape, layout):
        self.backward(self.dy, self.y, self.invstd, self.w, self.b, layout=self.layout,
                      out=self.out)


class Ghost:
    params = [["float32"], RATIO_SHAPES, common.LAYOUTS]
    param_names = common.PARAM_NAMES

    def setup(self, dtype, shape, layout):
        self.x, self.dy, self.w, self.b = common.data(shape, layout, dtype)
        try:
            _, self.mean, self.invstd = fastbn.batch_norm_train(
                self.x, self.w, self.b, layout=layout, ghost_batch_size=GHOST)
        except TypeError as exc:
            raise NotImplementedError("ghost_batch_size is not in this commit") from exc
        self.out = common.filled_like(self.x)
        self.layout = layout

    def time_ghost_train(self, dtype, shape, layout):
        fastbn.batch_norm_train(self.x, self.w, self.b, layout=self.layout, out=self.out,
                                ghost_batch_size=GHOST)

    def time_ghost_backward(self, dtype, shape, layout):
        fastbn.batch_norm_backward(self.dy, self.x, self.mean, self.invstd, self.w,
                                   layout=self.layout, out=self.out, ghost_batch_size=GHOST)


class LowMemoryRatios:
    """Time of the backward from y / the backward from x, and of the ghost training forward
    / the plain one (out= both)."""
    params = [["float32"], RATIO_SHAPES, common.LAYOUTS]
    param_names = common.PARAM_NAMES
    unit = "x"

    def setup(self, dtype, shape, layout):
        FromOutput.setup(self, dtype, shape, layout)
        Ghost.setup(self, dtype, shape, layout)
        _, self.mean1, self.invstd1 = fastbn.batch_norm_train(self.x, self.w, self.b,
                                                              layout=layout)

    def track_from_output_vs_backward(self, dtype, shape, layout):
        L, o = self.layout, self.out
        return common.best_time(
            lambda: self.backward(self.dy, self.y, self.invstd1, self.w, self.b, layout=L,
                                  out=o), 20) / common.best_time(
            lambda: fastbn.batch_norm_backward(self.dy, self.x, self.mean1, self.invstd1,
                                               self.w, layout=L, out=o), 20)

    def track_ghost_train_vs_train(self, dtype, shape, layout):
        L, o = self.layout, self.out
        return common.best_time(
            lambda: fastbn.batch_norm_train(self.x, self.w, self.b, layout=L, out=o,
                                            ghost_batch_size=GHOST), 20) / common.best_time(
            lambda: fastbn.batch_norm_train(self.x, self.w, self.b, layout=L, out=o), 20)


class LeakyFromOutput:
    """The leaky ReLU (negative_slope) of the fused calls: its backward from y (x not kept)
    and the usual one (dy, y and x read), and their ratio to the plain backward from x
    (out= all; the same passes over memory, 1.0: no cost)."""
    params = [["float32"], RATIO_SHAPES, common.LAYOUTS]
    param_names = common.PARAM_NAMES

    def setup(self, dtype, shape, layout):
        FromOutput.setup(self, dtype, shape, layout)
        self.relu_backward = common.feature("fastbn", "batch_norm_relu_backward")
        try:
            self.y, self.mean, self.invstd = fastbn.batch_norm_relu_train(
                self.x, self.w, self.b, layout=layout, negative_slope=SLOPE)
        except TypeError as exc:
            raise NotImplementedError("negative_slope is not in this commit") from exc

    def time_leaky_backward_from_output(self, dtype, shape, layout):
        self.backward(self.dy, self.y, self.invstd, self.w, self.b, layout=self.layout,
                      out=self.out, negative_slope=SLOPE)

    def time_leaky_backward(self, dtype, shape, layout):
        self.relu_backward(self.dy, self.y, self.x, self.mean, self.invstd, self.w,
                           layout=self.layout, out=self.out, negative_slope=SLOPE)

    def track_leaky_from_output_vs_backward(self, dtype, shape, layout):
        L, o = self.layout, self.out
        return common.best_time(
            lambda: self.backward(self.dy, self.y, self.invstd, self.w, self.b, layout=L,
                                  out=o, negative_slope=SLOPE), 20) / common.best_time(
            lambda: fastbn.batch_norm_backward(self.dy, self.x, self.mean, self.invstd,
                                               self.w, layout=L, out=o), 20)

    track_leaky_from_output_vs_backward.unit = "x"
