# Types of fastbn's public API (PEP 561: fastbn/py.typed). The functions and classes are
# defined in fastbn/functional.py, relu.py, renorm.py, fusion.py, layers.py, _threads.py,
# _memory.py and _config.py; tests/test_typing.py checks that every public name is here with
# the same parameters, and runs mypy --strict on a script that uses them.
from typing import Any, Callable, Literal, Optional, TextIO, Tuple, Union

from typing_extensions import Self

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from . import caffe as caffe
from . import distributed as distributed
from . import onnx as onnx

__version__: str

_Layout = Literal["NCHW", "NHWC"]
_Array = NDArray[Any]
_Vector = Optional[ArrayLike]

def batch_norm_train(
    x: ArrayLike, weight: _Vector = None, bias: _Vector = None, *, eps: float = 1e-05,
    layout: _Layout = "NCHW", running_mean: Optional[_Array] = None,
    running_var: Optional[_Array] = None, momentum: float = 0.1,
    out: Optional[_Array] = None, num_threads: Optional[int] = None,
    ghost_batch_size: Optional[int] = None,
) -> Tuple[_Array, _Array, _Array]: ...
def batch_norm_infer(
    x: ArrayLike, running_mean: ArrayLike, running_var: ArrayLike, weight: _Vector = None,
    bias: _Vector = None, *, eps: float = 1e-05, layout: _Layout = "NCHW",
    out: Optional[_Array] = None, num_threads: Optional[int] = None,
) -> _Array: ...
def batch_norm_backward(
    dy: ArrayLike, x: ArrayLike, mean: ArrayLike, invstd: ArrayLike, weight: _Vector = None,
    *, training: bool = True, layout: _Layout = "NCHW", out: Optional[_Array] = None,
    num_threads: Optional[int] = None, ghost_batch_size: Optional[int] = None,
) -> Tuple[_Array, _Array, _Array]: ...
def batch_norm_backward_from_output(
    dy: ArrayLike, y: ArrayLike, invstd: ArrayLike, weight: _Vector = None,
    bias: _Vector = None, *, negative_slope: Optional[float] = None, layout: _Layout = "NCHW",
    out: Optional[_Array] = None, num_threads: Optional[int] = None,
) -> Tuple[_Array, _Array, _Array]: ...
def fold_batch_norm(
    running_mean: ArrayLike, running_var: ArrayLike, weight: _Vector = None,
    bias: _Vector = None, eps: float = 1e-05,
) -> Tuple[_Array, _Array]: ...
def batch_norm_relu_train(
    x: ArrayLike, weight: _Vector = None, bias: _Vector = None, *,
    residual: Optional[ArrayLike] = None, eps: float = 1e-05, layout: _Layout = "NCHW",
    running_mean: Optional[_Array] = None, running_var: Optional[_Array] = None,
    momentum: float = 0.1, out: Optional[_Array] = None, num_threads: Optional[int] = None,
    negative_slope: float = 0.0,
) -> Tuple[_Array, _Array, _Array]: ...
def batch_norm_relu_infer(
    x: ArrayLike, running_mean: ArrayLike, running_var: ArrayLike, weight: _Vector = None,
    bias: _Vector = None, *, residual: Optional[ArrayLike] = None, eps: float = 1e-05,
    layout: _Layout = "NCHW", out: Optional[_Array] = None, num_threads: Optional[int] = None,
    negative_slope: float = 0.0,
) -> _Array: ...
def batch_norm_relu_backward(
    dy: ArrayLike, y: ArrayLike, x: ArrayLike, mean: ArrayLike, invstd: ArrayLike,
    weight: _Vector = None, *, training: bool = True, layout: _Layout = "NCHW",
    out: Optional[_Array] = None, dresidual: Optional[_Array] = None,
    num_threads: Optional[int] = None, negative_slope: float = 0.0,
) -> Tuple[_Array, _Array, _Array]: ...
def batch_renorm_train(
    x: ArrayLike, weight: _Vector, bias: _Vector, running_mean: _Array, running_std: _Array,
    *, rmax: float = 3.0, dmax: float = 5.0, momentum: float = 0.01, eps: float = 1e-05,
    layout: _Layout = "NCHW", out: Optional[_Array] = None, num_threads: Optional[int] = None,
) -> Tuple[_Array, _Array, _Array, _Array, _Array]: ...
def batch_renorm_backward(
    dy: ArrayLike, x: ArrayLike, mean: ArrayLike, std: ArrayLike, r: ArrayLike, d: ArrayLike,
    weight: _Vector = None, *, layout: _Layout = "NCHW", out: Optional[_Array] = None,
    num_threads: Optional[int] = None,
) -> Tuple[_Array, _Array, _Array]: ...
def fuse_conv_bn(
    weight: ArrayLike, bias: _Vector, running_mean: ArrayLike, running_var: ArrayLike,
    bn_weight: _Vector, bn_bias: _Vector, eps: float,
) -> Tuple[_Array, _Array]: ...
def get_num_threads() -> int: ...
def set_num_threads(n: Optional[int]) -> None: ...
def show_config(file: Optional[TextIO] = None) -> None: ...
def set_output_cache(max_bytes: int) -> None: ...
def empty_output_cache() -> int: ...
def output_cache_info() -> dict[str, int]: ...

_Activation = Union[None, Literal["relu"], Tuple[Literal["leaky_relu"], float]]

class _Norm:
    num_features: int
    eps: float
    momentum: float
    affine: bool
    dtype: np.dtype[Any]
    weight: Optional[_Array]
    bias: Optional[_Array]
    weight_grad: Optional[_Array]
    bias_grad: Optional[_Array]
    running_mean: Optional[_Array]
    @property
    def training(self) -> bool: ...
    @property
    def layout(self) -> _Layout: ...
    @property
    def activation(self) -> _Activation: ...
    @property
    def num_batches_tracked(self) -> int: ...
    def train(self, mode: bool = True) -> Self: ...
    def eval(self) -> Self: ...
    def forward(self, x: ArrayLike, residual: Optional[ArrayLike] = None) -> _Array: ...
    def __call__(self, x: ArrayLike, residual: Optional[ArrayLike] = None) -> _Array: ...
    def backward(self, dy: ArrayLike) -> Union[_Array, Tuple[_Array, _Array]]: ...
    def zero_grad(self) -> None: ...
    def state_dict(self) -> dict[str, _Array]: ...
    def load_state_dict(self, state_dict: dict[str, ArrayLike], strict: bool = True) -> None: ...

class BatchNorm(_Norm):
    track_running_stats: bool
    running_var: Optional[_Array]
    ghost_batch_size: Optional[int]
    memory: str
    def __init__(
        self, num_features: int, *, eps: float = 1e-05, momentum: float = 0.1,
        affine: bool = True, track_running_stats: bool = True, layout: _Layout = "NCHW",
        dtype: DTypeLike = ..., activation: _Activation = None,
        ghost_batch_size: Optional[int] = None, memory: str = "normal",
    ) -> None: ...
    def reset_running_stats(self) -> None: ...

# a constant, a schedule of the training step, or "paper" (the paper's schedule)
_Clip = Union[float, Callable[[int], float], Literal["paper"]]

class BatchRenorm(_Norm):
    running_std: _Array
    rmin: Optional[float]
    def __init__(
        self, num_features: int, *, rmax: _Clip = 3.0, dmax: _Clip = 5.0,
        rmin: Optional[float] = None, momentum: float = 0.01, eps: float = 1e-05,
        affine: bool = True, layout: _Layout = "NCHW", dtype: DTypeLike = ...,
        activation: _Activation = None,
    ) -> None: ...
    def clipping(self, step: Optional[int] = None) -> Tuple[float, float, float]: ...

__all__ = [
    "batch_norm_train",
    "batch_norm_infer",
    "batch_norm_backward",
    "batch_norm_backward_from_output",
    "fold_batch_norm",
    "batch_norm_relu_train",
    "batch_norm_relu_infer",
    "batch_norm_relu_backward",
    "get_num_threads",
    "set_num_threads",
    "show_config",
    "set_output_cache",
    "empty_output_cache",
    "output_cache_info",
    "batch_renorm_train",
    "batch_renorm_backward",
    "fuse_conv_bn",
    "BatchNorm",
    "BatchRenorm",
    "onnx",
    "caffe",
    "distributed",
]
