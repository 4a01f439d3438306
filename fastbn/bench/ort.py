"""ONNX Runtime as an inference peer of the speed table: one BatchNormalization node (the
CPU execution provider, graph optimizations off so that the node runs as it is, intra-op
threads = fastbn's), run with fresh outputs as a deployed model runs it. Needs onnx (to
write the model) and onnxruntime: ``pip install "fastbn[bench]"``."""
import numpy as np

# the ONNX element types of the dtypes the speed table times
_ELEM = {"float32": 1, "float16": 10, "float64": 11, "bfloat16": 16}


def ort_modules():
    """(onnxruntime, onnx), or None when either is absent or fails to import."""
    try:
        import onnx
        import onnxruntime
    except Exception:
        return None
    return onnxruntime, onnx


def ort_version():
    mods = ort_modules()
    return "not installed" if mods is None else mods[0].__version__


def bn_model(onnx, shape, dtype, eps=1e-5):
    """The bytes of a model with one BatchNormalization node (opset 15): input x of this
    shape and dtype, output y; scale, bias, mean and var are float32 inputs (16-bit x
    takes float32 parameters in opset 15, as fastbn does)."""
    from onnx import TensorProto, helper
    elem = _ELEM[np.dtype(dtype).name]
    C = shape[1]
    node = helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"],
                            ["y"], epsilon=eps)
    pdt = TensorProto.FLOAT if np.dtype(dtype).itemsize == 2 else elem
    inputs = [helper.make_tensor_value_info("x", elem, list(shape))] + [
        helper.make_tensor_value_info(name, pdt, [C]) for name in ("scale", "bias", "mean",
                                                                     "var")]
    graph = helper.make_graph([node], "bn", inputs,
                              [helper.make_tensor_value_info("y", elem, list(shape))])
    # IR version 8, opset 15's own: ONNX Runtime releases older than the onnx package that
    # writes the model (which stamps its newest IR version) still read it
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)],
                              ir_version=8)
    return model.SerializeToString()


def ort_infer(x, running_mean, running_var, weight, bias, threads, eps=1e-5):
    """A callable running ONNX Runtime's inference of x (NCHW) with these parameters, or
    None when onnxruntime is missing or has no CPU kernel for x's dtype."""
    mods = ort_modules()
    if mods is None or np.dtype(x.dtype).name not in _ELEM:
        return None
    ort, onnx = mods
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    try:
        sess = ort.InferenceSession(bn_model(onnx, x.shape, x.dtype, eps), opts,
                                    providers=["CPUExecutionProvider"])
        pdt = np.float32 if x.dtype.itemsize == 2 else x.dtype
        feed = {"x": x, "scale": weight.astype(pdt), "bias": bias.astype(pdt),
                "mean": running_mean.astype(pdt), "var": running_var.astype(pdt)}
        sess.run(None, feed)
    except Exception:        # no kernel for this dtype, or a model the build rejects
        return None
    return lambda: sess.run(None, feed)[0]
