"""fastbn: Batch Normalization on NumPy arrays, as fast as the CPU's memory allows.

Functional API: :func:`batch_norm_train`, :func:`batch_norm_infer`,
:func:`batch_norm_backward`, :func:`batch_norm_backward_from_output`, :func:`fold_batch_norm`, the fused residual add and ReLU
(:func:`batch_norm_relu_train`, :func:`batch_norm_relu_infer`,
:func:`batch_norm_relu_backward`), Batch Renormalization
(:func:`batch_renorm_train`, :func:`batch_renorm_backward`) and :func:`fuse_conv_bn`;
threads: :func:`get_num_threads`, :func:`set_num_threads`; build facts: :func:`show_config`;
the cache of freed outputs: :func:`set_output_cache`, :func:`empty_output_cache`,
:func:`output_cache_info`.
Stateful layers with PyTorch-compatible state: :class:`BatchNorm`, :class:`BatchRenorm`.
Framework conventions: :mod:`fastbn.caffe` (BatchNorm + Scale), :mod:`fastbn.onnx`;
synchronized Batch Normalization over MPI: :mod:`fastbn.distributed` (needs mpi4py).
:mod:`fastbn.reference` is the plain NumPy twin of the functional kernels.
"""
__version__ = "0.1.0"


def _unbuilt(error):
    """The ImportError for a fastbn whose compiled modules are missing: in a source tree
    (setup.py beside the package; Python puts the current directory first on its path, so
    a checkout shadows an installed fastbn) say so and what to do."""
    import os
    package = os.path.dirname(os.path.abspath(__file__))
    tree = os.path.dirname(package)
    if os.path.exists(os.path.join(tree, "setup.py")):
        return ImportError(
            f"fastbn is imported from its source tree ({tree}), whose compiled extensions "
            "are not built. Run Python from another directory to use an installed fastbn, "
            "or build this checkout: `pip install -e .` (or `python setup.py build_ext "
            f"--inplace`). (The import failed with: {error})")
    return ImportError(f"fastbn's compiled extensions cannot be imported ({error}); "
                       "reinstall fastbn (pip install --force-reinstall fastbn).")


try:
    from . import _support, _kernels     # noqa: F401  (the compiled core)
except ImportError as _error:
    raise _unbuilt(_error) from _error

from ._config import show_config
from ._threads import get_num_threads, set_num_threads
from ._memory import empty_output_cache, output_cache_info, set_output_cache
from .functional import (batch_norm_backward, batch_norm_backward_from_output, batch_norm_infer,
                         batch_norm_train, fold_batch_norm)
from .relu import batch_norm_relu_backward, batch_norm_relu_infer, batch_norm_relu_train
from .renorm import batch_renorm_backward, batch_renorm_train
from .fusion import fuse_conv_bn
from .layers import BatchNorm, BatchRenorm
from . import onnx
from . import caffe
from . import distributed      # imports mpi4py only when a function of it is called

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
