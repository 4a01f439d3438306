"""Batch Normalization functional API: training forward, inference forward, backward.

Parametrized by dtype x shape x layout (see common.py). The thread count comes from the
environment (asv's OMP_NUM_THREADS matrix), so no call passes num_threads.
"""
import numpy as np

import fastbn

from . import common


class TrainForward:
    """fastbn.batch_norm_train: batch statistics + normalization in one call."""

    params = common.PARAMS
    param_names = common.PARAM_NAMES

    def setup(self, dtype, shape, layout):
        common.skip_duplicate(shape, layout)
        self.x, _, self.w, self.b = common.data(shape, layout, dtype)
        C = self.w.shape[0]
        self.rm, self.rv = common.running_stats(C, dtype)
        self.out = common.filled_like(self.x)
        self.layout = layout

    def time_train(self, dtype, shape, layout):
        fastbn.batch_norm_train(self.x, self.w, self.b, layout=self.layout)

    def time_train_out(self, dtype, shape, layout):
        fastbn.batch_norm_train(self.x, self.w, self.b, layout=self.layout, out=self.out)

    def time_train_running(self, dtype, shape, layout):
        fastbn.batch_norm_train(self.x, self.w, self.b, layout=self.layout,
                                running_mean=self.rm, running_var=self.rv)

    def peakmem_train(self, dtype, shape, layout):
        # One output array on top of the inputs; a hidden copy of x shows up here.
        fastbn.batch_norm_train(self.x, self.w, self.b, layout=self.layout)


class InferForward:
    """fastbn.batch_norm_infer: normalization with fixed running statistics."""

    params = common.PARAMS
    param_names = common.PARAM_NAMES

    def setup(self, dtype, shape, layout):
        common.skip_duplicate(shape, layout)
        self.x, _, self.w, self.b = common.data(shape, layout, dtype)
        C = self.w.shape[0]
        rng = np.random.default_rng(1)
        self.rm = rng.uniform(0.0, 1.0, C).astype(dtype)
        self.rv = rng.uniform(0.5, 2.0, C).astype(dtype)
        self.out = common.filled_like(self.x)
        self.layout = layout

    def time_infer(self, dtype, shape, layout):
        fastbn.batch_norm_infer(self.x, self.rm, self.rv, self.w, self.b, layout=self.layout)

    def time_infer_out(self, dtype, shape, layout):
        fastbn.batch_norm_infer(self.x, self.rm, self.rv, self.w, self.b, layout=self.layout,
                                out=self.out)


class Backward:
    """fastbn.batch_norm_backward: the fused sum(dy) / sum(dy*(x-mean)) pass, then dx."""

    params = common.PARAMS
    param_names = common.PARAM_NAMES

    def setup(self, dtype, shape, layout):
        common.skip_duplicate(shape, layout)
        self.x, self.dy, self.w, self.b = common.data(shape, layout, dtype)
        _, self.mean, self.invstd = fastbn.batch_norm_train(self.x, self.w, self.b,
                                                            layout=layout)
        self.out = common.filled_like(self.x)
        self.layout = layout

    def time_backward(self, dtype, shape, layout):
        fastbn.batch_norm_backward(self.dy, self.x, self.mean, self.invstd, self.w,
                                   layout=self.layout)

    def time_backward_out(self, dtype, shape, layout):
        fastbn.batch_norm_backward(self.dy, self.x, self.mean, self.invstd, self.w,
                                   layout=self.layout, out=self.out)

    def time_backward_eval(self, dtype, shape, layout):
        fastbn.batch_norm_backward(self.dy, self.x, self.mean, self.invstd, self.w,
                                   training=False, layout=self.layout)
