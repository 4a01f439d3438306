"""Caffe's BatchNorm layer (fastbn.caffe.BatchNorm), both engines.

Caffe blobs are NCHW, so the layout parameter is replaced by the engine: "fused" runs the
fastbn kernels, "gemv" Caffe's BLAS call sequence. Skipped on commits without fastbn.caffe.
"""
from . import common


# The 4-D batch and the (N, C) batch: the small input adds nothing engine-specific.
SHAPES = common.SHAPES[:2]


class CaffeBatchNorm:
    params = [common.DTYPES, SHAPES, ["fused", "gemv"]]
    param_names = ["dtype", "shape", "engine"]

    def setup(self, dtype, shape, engine):
        layer_cls = common.feature("fastbn.caffe", "BatchNorm")
        self.x, self.dy, _, _ = common.data(shape, "NCHW", dtype)
        self.layer = layer_cls(shape[1], engine=engine, dtype=dtype)
        self.top = common.filled_like(self.x)
        self.bottom_diff = common.filled_like(self.x)
        # A TRAIN pass first: the sums in the blobs become non-trivial for TEST, and the
        # layer holds what its backward needs.
        self.layer.forward(self.x, phase="TRAIN", out=self.top)

    def time_forward_train(self, dtype, shape, engine):
        self.layer.forward(self.x, phase="TRAIN", out=self.top)

    def time_forward_test(self, dtype, shape, engine):
        self.layer.forward(self.x, phase="TEST", out=self.top)

    def time_backward(self, dtype, shape, engine):
        self.layer.backward(self.dy, out=self.bottom_diff)
