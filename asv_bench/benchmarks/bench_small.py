"""Small calls, where per-call work and thread start-up cost more than memory: the shapes of
an embedded network's inference or a small NumPy model (float32, fresh outputs, fastbn's
default threads). Times, fastbn / PyTorch in one process (unit "x", lower is better; skipped
without torch), and the spread of 300 consecutive calls (p99 / p50)."""
import time

import numpy as np

import fastbn

from . import common

SHAPES = [(1, 64, 56, 56), (1, 256, 14, 14), (8, 32, 8, 8), (256, 1024), (2, 1024),
          (1, 64, 7, 7)]
OPS = ("train", "infer", "backward")


class _Small:
    params = [SHAPES, common.LAYOUTS]
    param_names = ["shape", "layout"]

    def setup(self, shape, layout):
        common.skip_duplicate(shape, layout)
        self.x, self.dy, self.w, self.b = common.data(shape, layout, "float32")
        C = self.w.shape[0]
        self.rm, self.rv = np.zeros(C, np.float32), np.ones(C, np.float32)
        _, self.mean, self.invstd = fastbn.batch_norm_train(self.x, self.w, self.b,
                                                            layout=layout)
        self.layout = layout

    def _call(self, op):
        x, L = self.x, self.layout
        if op == "train":
            return lambda: fastbn.batch_norm_train(x, self.w, self.b, layout=L)
        if op == "infer":
            return lambda: fastbn.batch_norm_infer(x, self.rm, self.rv, self.w, self.b,
                                                   layout=L)
        return lambda: fastbn.batch_norm_backward(self.dy, x, self.mean, self.invstd, self.w,
                                                  layout=L)


class SmallCalls(_Small):
    def time_train(self, shape, layout):
        fastbn.batch_norm_train(self.x, self.w, self.b, layout=self.layout)

    def time_infer(self, shape, layout):
        fastbn.batch_norm_infer(self.x, self.rm, self.rv, self.w, self.b, layout=self.layout)

    def time_backward(self, shape, layout):
        fastbn.batch_norm_backward(self.dy, self.x, self.mean, self.invstd, self.w,
                                   layout=self.layout)


class SmallCallsVsTorch(_Small):
    """fastbn / PyTorch (same thread count, medians of 15 interleaved pairs of timed loops)."""
    unit = "x"
    timeout = 300

    def setup(self, shape, layout):
        try:
            import torch
        except ImportError as exc:
            raise NotImplementedError("torch is not installed") from exc
        super().setup(shape, layout)
        torch.set_num_threads(fastbn.get_num_threads())

        def t(a):
            t = torch.from_numpy(a)
            return t.movedim(-1, 1) if layout == "NHWC" and a.ndim > 2 else t
        tx, tdy = t(self.x), t(self.dy)
        tw, tb = torch.from_numpy(self.w), torch.from_numpy(self.b)
        trm, trv = torch.from_numpy(self.rm.copy()), torch.from_numpy(self.rv.copy())
        _, tmean, tinv = torch.native_batch_norm(tx, tw, tb, trm, trv, True, 0.1, 1e-5)
        self.peer = {
            "train": lambda: torch.native_batch_norm(tx, tw, tb, None, None, True, 0.1, 1e-5),
            "infer": lambda: torch.native_batch_norm(tx, tw, tb, trm, trv, False, 0.1, 1e-5),
            "backward": lambda: torch.ops.aten.native_batch_norm_backward(
                tdy, tx, tw, trm, trv, tmean, tinv, True, 1e-5, [True, True, True])}

    def _ratio(self, op):
        f, p = self._call(op), self.peer[op]

        def loop(g, k):
            t0 = time.perf_counter()
            for _ in range(k):
                g()
            return (time.perf_counter() - t0) / k
        k = max(1, min(200, int(2e-3 / max(loop(f, 5), 1e-7))))
        return float(np.median([loop(f, k) / loop(p, k) for _ in range(15)]))

    def track_train_vs_torch(self, shape, layout):
        return self._ratio("train")

    def track_infer_vs_torch(self, shape, layout):
        return self._ratio("infer")

    def track_backward_vs_torch(self, shape, layout):
        return self._ratio("backward")


class SmallCallSpread(_Small):
    """p99 / p50 of 300 consecutive calls (a thread of the team the scheduler put aside
    shows here, not in the best time)."""
    unit = "x"

    def _spread(self, op):
        f = self._call(op)
        f()
        times = np.empty(300)
        for i in range(300):
            t0 = time.perf_counter()
            f()
            times[i] = time.perf_counter() - t0
        p50, p99 = np.percentile(times, [50, 99])
        return float(p99 / p50)

    def track_train_p99_over_p50(self, shape, layout):
        return self._spread("train")

    def track_backward_p99_over_p50(self, shape, layout):
        return self._spread("backward")
