"""Batch Renormalization (fastbn.batch_renorm_train / batch_renorm_backward).

Skipped (NotImplementedError in setup) on commits that do not have them yet.
"""
import numpy as np

from . import common


class RenormTrainForward:
    """Training forward: the BN statistics pass with r and d folded into the coefficients."""

    params = common.PARAMS
    param_names = common.PARAM_NAMES

    def setup(self, dtype, shape, layout):
        self.train = common.feature("fastbn", "batch_renorm_train")
        common.skip_duplicate(shape, layout)
        self.x, _, self.w, self.b = common.data(shape, layout, dtype)
        C = self.w.shape[0]
        self.rmean = np.zeros(C, dtype=dtype)
        self.rstd = np.ones(C, dtype=dtype)
        self.layout = layout

    def time_train(self, dtype, shape, layout):
        self.train(self.x, self.w, self.b, self.rmean, self.rstd, layout=self.layout)


class RenormBackward:
    """Backward with r, d held constant."""

    params = common.PARAMS
    param_names = common.PARAM_NAMES

    def setup(self, dtype, shape, layout):
        train = common.feature("fastbn", "batch_renorm_train")
        self.backward = common.feature("fastbn", "batch_renorm_backward")
        common.skip_duplicate(shape, layout)
        self.x, self.dy, self.w, self.b = common.data(shape, layout, dtype)
        C = self.w.shape[0]
        # Running statistics away from the batch's so r != 1 and d != 0.
        rmean = np.full(C, 0.25, dtype=dtype)
        rstd = np.full(C, 1.5, dtype=dtype)
        _, self.mean, self.std, self.r, self.d = train(self.x, self.w, self.b, rmean, rstd,
                                                       layout=layout)
        self.layout = layout

    def time_backward(self, dtype, shape, layout):
        self.backward(self.dy, self.x, self.mean, self.std, self.r, self.d, self.w,
                      layout=self.layout)
