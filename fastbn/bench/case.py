"""One shape of the speed table: its data, and the calls timed on it (fastbn, the NumPy
reference, PyTorch, ONNX Runtime's inference, and the read and copy passes that measure the
memory system)."""
import numpy as np

from .. import _threads, functional, layers, reference, relu, renorm
from .._dispatch import kernels
from .ort import ort_infer
from .timing import make_data


class Case:
    """Callables for one (shape, layout, dtype, threads): fastbn, NumPy reference, PyTorch."""

    def __init__(self, shape, layout, dtype, threads, torch=None):
        self.x, self.dy, self.w, self.b = make_data(shape, layout, dtype)
        self.layout, self.threads = layout, threads
        self.rm = np.zeros(self.w.shape, self.w.dtype)
        self.rv = np.ones(self.w.shape, self.w.dtype)
        self.y_out = np.empty_like(self.x)
        self.y_out.fill(0)     # faulted in: out= calls never pay page faults
        _, self.mean, self.invstd = functional.batch_norm_train(self.x, self.w, self.b,
                                                                layout=layout)
        self.torch = torch
        if torch is not None:
            self._torch_setup(torch)

    def _torch_setup(self, torch):
        def nchw(a):
            if a.dtype.name == "bfloat16":       # ml_dtypes' bfloat16: the same 16 bits
                t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16)
            else:
                t = torch.from_numpy(a)
            if self.layout == "NHWC" and a.ndim > 2:
                t = t.movedim(-1, 1)          # channels_last memory, as PyTorch lays it out
            return t
        self.tx, self.tdy = nchw(self.x), nchw(self.dy)
        self.tw, self.tb = torch.from_numpy(self.w), torch.from_numpy(self.b)
        self.trm, self.trv = torch.from_numpy(self.rm.copy()), torch.from_numpy(self.rv.copy())
        _, self.tmean, self.tinvstd = torch.native_batch_norm(
            self.tx, self.tw, self.tb, self.trm, self.trv, True, 0.1, 1e-5)

    # fastbn
    def fast(self, op, default_threads=False):
        """default_threads: num_threads=None (fastbn's own choice: `threads`, but one while the
        machine is contended, docs/getting-started.rst) instead of `threads`."""
        x, L = self.x, self.layout
        n = None if default_threads else self.threads
        if op == "train":
            return lambda: functional.batch_norm_train(x, self.w, self.b, layout=L,
                                                       running_mean=self.rm,
                                                       running_var=self.rv, num_threads=n)
        if op == "train_out":
            return lambda: functional.batch_norm_train(x, self.w, self.b, layout=L,
                                                       out=self.y_out, num_threads=n)
        if op == "infer":
            return lambda: functional.batch_norm_infer(x, self.rm, self.rv, self.w, self.b,
                                                       layout=L, num_threads=n)
        if op == "infer_out":
            return lambda: functional.batch_norm_infer(x, self.rm, self.rv, self.w, self.b,
                                                       layout=L, out=self.y_out, num_threads=n)
        if op == "backward_out":
            return lambda: functional.batch_norm_backward(self.dy, x, self.mean, self.invstd,
                                                          self.w, layout=L, out=self.y_out,
                                                          num_threads=n)
        return lambda: functional.batch_norm_backward(self.dy, x, self.mean, self.invstd,
                                                      self.w, layout=L, num_threads=n)

    def fused(self, op):
        """The fused residual add + ReLU (fastbn.relu) and the unfused way to the same
        result; ops: relu_train, relu_infer, relu_infer_res, relu_backward (out=), and
        relu_train_fresh, relu_infer_fresh, then_max_train, then_max_infer (fresh outputs:
        fastbn then np.maximum in place); layer_backward, layer_relu_backward: the backward
        of a training forward of fastbn.BatchNorm, plain and with activation="relu" (fresh
        outputs, as layers return them)."""
        x, L, n, w, b = self.x, self.layout, self.threads, self.w, self.b
        if not hasattr(self, "res"):
            self.res = np.ascontiguousarray(self.dy[::-1])          # filled, like x
            self.dres = np.empty_like(self.x)
            self.dres.fill(0)
            self.y_relu = relu.batch_norm_relu_train(x, w, b, layout=L)[0]
        if op == "relu_train":
            return lambda: relu.batch_norm_relu_train(x, w, b, layout=L, out=self.y_out,
                                                      num_threads=n)
        if op == "relu_infer":
            return lambda: relu.batch_norm_relu_infer(x, self.rm, self.rv, w, b, layout=L,
                                                      out=self.y_out, num_threads=n)
        if op == "relu_infer_res":
            return lambda: relu.batch_norm_relu_infer(x, self.rm, self.rv, w, b,
                                                      residual=self.res, layout=L,
                                                      out=self.y_out, num_threads=n)
        if op == "relu_backward":
            return lambda: relu.batch_norm_relu_backward(
                self.dy, self.y_relu, x, self.mean, self.invstd, w, layout=L, out=self.y_out,
                num_threads=n)
        if op == "relu_train_fresh":
            return lambda: relu.batch_norm_relu_train(x, w, b, layout=L, num_threads=n)
        if op == "relu_infer_fresh":
            return lambda: relu.batch_norm_relu_infer(x, self.rm, self.rv, w, b, layout=L,
                                                      num_threads=n)
        if op in ("layer_backward", "layer_relu_backward"):
            return self._layer_backward(op == "layer_relu_backward")
        if op == "then_max_train":
            def train_then_max():
                y = functional.batch_norm_train(x, w, b, layout=L, num_threads=n)[0]
                return np.maximum(y, 0, out=y)
            return train_then_max
        if op == "then_max_infer":
            def infer_then_max():
                y = functional.batch_norm_infer(x, self.rm, self.rv, w, b, layout=L,
                                                num_threads=n)
                return np.maximum(y, 0, out=y)
            return infer_then_max
        raise ValueError(op)

    def _layer_backward(self, relu_layer):
        """bn.backward(dy) after one training forward of a BatchNorm layer with this case's
        weight and bias, on this case's thread count."""
        x, n = self.x, self.threads
        C = self.w.shape[0]
        bn = layers.BatchNorm(C, layout=self.layout, dtype=self.w.dtype,   # float32 for 16-bit x
                              activation="relu" if relu_layer else None)
        bn.weight[...] = self.w
        bn.bias[...] = self.b
        with _threads.default_threads(n):
            bn(x)

        def backward():
            with _threads.default_threads(n):
                return bn.backward(self.dy)
        return backward

    def renorm_train(self):
        """Batch Renormalization training forward (compared with "train")."""
        x, L, n = self.x, self.layout, self.threads
        rm = np.zeros(self.w.shape)
        rs = np.ones(self.w.shape)
        return lambda: renorm.batch_renorm_train(x, self.w, self.b, rm, rs, layout=L,
                                                 num_threads=n)

    def ref(self, op):
        x, L = self.x, self.layout
        if op == "train":
            return lambda: reference.batch_norm_train(x, self.w, self.b, layout=L,
                                                      running_mean=self.rm.copy(),
                                                      running_var=self.rv.copy())
        if op == "infer":
            return lambda: reference.batch_norm_infer(x, self.rm, self.rv, self.w, self.b,
                                                      layout=L)
        return lambda: reference.batch_norm_backward(self.dy, x, self.mean, self.invstd,
                                                     self.w, layout=L)

    def peer(self, op):
        torch = self.torch
        if torch is None:
            return None
        if op == "train":
            return lambda: torch.native_batch_norm(self.tx, self.tw, self.tb, self.trm,
                                                   self.trv, True, 0.1, 1e-5)
        if op == "infer":
            return lambda: torch.native_batch_norm(self.tx, self.tw, self.tb, self.trm,
                                                   self.trv, False, 0.1, 1e-5)
        return lambda: torch.ops.aten.native_batch_norm_backward(
            self.tdy, self.tx, self.tw, self.trm, self.trv, self.tmean, self.tinvstd, True,
            1e-5, [True, True, True])

    def ort(self, op, with_ort=True):
        """ONNX Runtime's inference (fresh outputs), or None: other ops, channels-last data
        (its BatchNormalization takes the channel axis 1 only), or no onnxruntime."""
        if not with_ort or op != "infer" or (self.layout == "NHWC" and self.x.ndim > 2):
            return None
        if not hasattr(self, "_ort"):
            self._ort = ort_infer(self.x, self.rm, self.rv, self.w, self.b, self.threads)
        return self._ort

    def _bytes_as_float32(self):
        """x's bytes seen as float32 values (the yardsticks count bytes, not values)."""
        x = np.ascontiguousarray(self.x).reshape(-1)
        if x.dtype.itemsize == 4:
            return x.view(np.float32)
        if x.dtype.itemsize == 2:
            return x[:x.size // 2 * 2].view(np.float32)
        return np.ascontiguousarray(x, dtype=np.float32)

    def read_pass(self):
        """One read pass over x's bytes on the same threads."""
        x = self._bytes_as_float32()
        return lambda: kernels.read_pass(x, self.threads)

    def copy_pass(self):
        """One read + write pass over x's bytes on the same threads."""
        x = self._bytes_as_float32()
        dst = np.empty_like(x)
        return lambda: kernels.copy_pass(x, dst, self.threads)
