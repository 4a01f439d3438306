"""Fresh outputs against out=: what a loop that drops each result pays over one that
reuses its output array (unit "x"; 1.0 is free, lower is better). From the commit with the
output cache (fastbn.set_output_cache) a fresh output reuses a freed block; before it,
each one is new memory the operating system faults in. The shape is past every cache, so
the difference shows."""
import fastbn

from . import common

SHAPES = [(32, 64, 56, 56)]


class FreshOverOut:
    params = [["float32"], SHAPES, common.LAYOUTS]
    param_names = ["dtype", "shape", "layout"]
    unit = "x"

    def setup(self, dtype, shape, layout):
        self.x, self.dy, self.w, self.b = common.data(shape, layout, dtype)
        C = self.w.shape[0]
        self.rm, self.rv = common.running_stats(C, dtype)
        self.out = common.filled_like(self.x)
        self.layout = layout
        _, self.mean, self.invstd = fastbn.batch_norm_train(self.x, self.w, self.b,
                                                            layout=layout)

    def _ratio(self, call):
        return common.best_time(lambda: call(None), 20) / common.best_time(
            lambda: call(self.out), 20)

    def track_infer_fresh_vs_out(self, dtype, shape, layout):
        return self._ratio(lambda o: fastbn.batch_norm_infer(
            self.x, self.rm, self.rv, self.w, self.b, layout=self.layout, out=o))

    def track_train_fresh_vs_out(self, dtype, shape, layout):
        return self._ratio(lambda o: fastbn.batch_norm_train(
            self.x, self.w, self.b, layout=self.layout, out=o))

    def track_backward_fresh_vs_out(self, dtype, shape, layout):
        return self._ratio(lambda o: fastbn.batch_norm_backward(
            self.dy, self.x, self.mean, self.invstd, self.w, layout=self.layout, out=o))
