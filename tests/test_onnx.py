"""fastbn.onnx.batch_normalization against ONNX's own test cases and reference runtime."""
import os
import warnings

import numpy as np
import pytest

from fastbn.onnx import batch_normalization

onnx = pytest.importorskip("onnx")
from onnx import helper, numpy_helper  # noqa: E402

BN_ARGS = ("X", "scale", "B", "input_mean", "input_var")


def _attributes(node):
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def run_node(node, inputs):
    """Evaluate one BatchNormalization node with fastbn."""
    assert node.op_type == "BatchNormalization"
    attrs = _attributes(node)
    kwargs = {}
    if "epsilon" in attrs:
        kwargs["epsilon"] = attrs["epsilon"]
    if "momentum" in attrs:
        kwargs["momentum"] = attrs["momentum"]
    if attrs.get("training_mode", 0):
        kwargs["training_mode"] = 1
    result = batch_normalization(*inputs, **kwargs)
    return list(result) if isinstance(result, tuple) else [result]


@pytest.fixture(scope="module")
def node_cases():
    """ONNX's BatchNormalization node cases, regenerated in memory (takes a few seconds)."""
    from onnx.backend.test.case.node import collect_testcases
    with warnings.catch_warnings():
        # generating every operator's cases runs NumPy code that warns (overflowing casts)
        warnings.simplefilter("ignore")
        return collect_testcases("BatchNormalization")


def test_onnx_node_cases(node_cases):
    """Every BatchNormalization node case of ONNX (opset 15), with its reference outputs."""
    names = {c.name for c in node_cases}
    assert {"test_batchnorm_example", "test_batchnorm_epsilon",
            "test_batchnorm_example_training_mode",
            "test_batchnorm_epsilon_training_mode"} <= names
    for case in node_cases:
        (node,) = case.model.graph.node
        assert case.data_sets, case.name
        for inputs, outputs in case.data_sets:
            saved = [a.copy() for a in inputs]
            got = run_node(node, inputs)
            assert len(got) == len(outputs) == len(node.output), case.name
            for name, g, want in zip(node.output, got, outputs):
                assert g.shape == want.shape and g.dtype == want.dtype, f"{case.name} {name}"
                np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-6,
                                           err_msg=f"{case.name} output {name}")
            for a, s in zip(inputs, saved):
                np.testing.assert_array_equal(a, s, err_msg=f"{case.name}: input modified")


def _pytorch_converted():
    root = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data",
                        "pytorch-converted")
    if not os.path.isdir(root):
        return []
    return sorted(os.path.join(root, d) for d in os.listdir(root) if d.startswith("test_BatchNorm"))


PYTORCH_MODELS = _pytorch_converted()


def _load_tensor(path):
    t = onnx.TensorProto()
    with open(path, "rb") as f:
        t.ParseFromString(f.read())
    return numpy_helper.to_array(t)


def test_submodule_is_exported():
    import fastbn
    assert fastbn.onnx.batch_normalization is batch_normalization


def test_pytorch_converted_models_found():
    assert len(PYTORCH_MODELS) >= 5


@pytest.mark.parametrize("model_dir", PYTORCH_MODELS, ids=os.path.basename)
def test_pytorch_converted_models(model_dir):
    """The pytorch-converted BatchNorm models shipped in the onnx package."""
    model = onnx.load(os.path.join(model_dir, "model.onnx"))
    (node,) = model.graph.node
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    sets = sorted(d for d in os.listdir(model_dir) if d.startswith("test_data_set"))
    assert sets
    for ds in sets:
        env = dict(values)
        graph_inputs = [i.name for i in model.graph.input if i.name not in values]
        for k, name in enumerate(graph_inputs):
            env[name] = _load_tensor(os.path.join(model_dir, ds, f"input_{k}.pb"))
        got = run_node(node, [env[n] for n in node.input])
        for k, g in enumerate(got):
            want = _load_tensor(os.path.join(model_dir, ds, f"output_{k}.pb"))
            assert g.shape == want.shape and g.dtype == want.dtype
            np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-5,
                                       err_msg=os.path.basename(model_dir))


def _reference_run(inputs, **attrs):
    """ONNX's reference runtime on a one-node opset-15 model."""
    from onnx.reference import ReferenceEvaluator
    dtype = inputs[0].dtype
    elem = helper.np_dtype_to_tensor_dtype(dtype)
    train = attrs.get("training_mode", 0)
    outputs = ["Y", "running_mean", "running_var"] if train else ["Y"]
    node = helper.make_node("BatchNormalization", list(BN_ARGS), outputs, **attrs)
    graph = helper.make_graph(
        [node], "bn",
        [helper.make_tensor_value_info(n, elem, None) for n in BN_ARGS],
        [helper.make_tensor_value_info(n, elem, None) for n in outputs])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    return ReferenceEvaluator(model).run(None, dict(zip(BN_ARGS, inputs)))


def _inputs(shape, dtype, seed=0):
    rng = np.random.default_rng(seed)
    C = shape[1]
    cshape = (1, C) + (1,) * (len(shape) - 2)
    X = rng.normal(size=shape) * rng.uniform(0.5, 3, C).reshape(cshape) \
        + rng.normal(0, 5, C).reshape(cshape)
    return [X.astype(dtype), rng.uniform(0.5, 1.5, C).astype(dtype),
            rng.normal(size=C).astype(dtype), rng.normal(size=C).astype(dtype),
            rng.uniform(0.5, 2.0, C).astype(dtype)]


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("shape", [(6, 4), (3, 4, 7), (2, 3, 4, 5), (2, 3, 2, 3, 4)])
@pytest.mark.parametrize("training_mode", [0, 1])
def test_against_onnx_reference_runtime(training_mode, shape, dtype):
    inputs = _inputs(shape, dtype)
    saved = [a.copy() for a in inputs]
    attrs = dict(epsilon=1e-3, momentum=0.7, training_mode=training_mode)
    want = _reference_run(inputs, **attrs)
    # ONNX float attributes are float32: pass the values the model holds
    attrs.update(epsilon=float(np.float32(1e-3)), momentum=float(np.float32(0.7)))
    got = batch_normalization(*inputs, **attrs)
    got = list(got) if training_mode else [got]
    tol = 1e-12 if dtype == np.float64 else 2e-6
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        np.testing.assert_allclose(g, w, rtol=tol, atol=tol)
    for a, s in zip(inputs, saved):
        np.testing.assert_array_equal(a, s)


def test_training_mode_conventions():
    """Momentum weighs the OLD value; the running variance takes the biased variance."""
    X = np.array([[0.0], [2.0]])            # batch mean 1, biased var 1 (unbiased 2)
    one, zero = np.ones(1), np.zeros(1)
    Y, rm, rv = batch_normalization(X, one, zero, np.array([5.0]), np.array([3.0]),
                                    epsilon=0.0, momentum=0.75, training_mode=1)
    np.testing.assert_array_equal(Y, [[-1.0], [1.0]])
    np.testing.assert_array_equal(rm, [5.0 * 0.75 + 1.0 * 0.25])
    np.testing.assert_array_equal(rv, [3.0 * 0.75 + 1.0 * 0.25])


def test_running_outputs_take_the_statistics_dtype():
    X, s, B, m, v = _inputs((4, 3, 5), np.float32)
    Y, rm, rv = batch_normalization(X, s, B, m.astype(np.float64), v.astype(np.float64),
                                    training_mode=True)
    assert Y.dtype == np.float32 and rm.dtype == rv.dtype == np.float64


@pytest.mark.parametrize("index,value,exc,name", [
    (0, np.ones((4, 3, 5), np.int32), TypeError, "X"),
    (0, np.ones(3, np.float32), ValueError, "X"),
    (1, np.ones(4, np.float32), ValueError, "scale"),
    (2, None, ValueError, "B"),
    (3, np.ones(3, np.int64), TypeError, "input_mean"),
    (4, np.ones((3, 1), np.float32), ValueError, "input_var"),
])
def test_bad_arrays(index, value, exc, name):
    inputs = _inputs((4, 3, 5), np.float32)
    inputs[index] = value
    saved = [None if a is None else a.copy() for a in inputs]
    for mode in (0, 1):
        with pytest.raises(exc, match=name):
            batch_normalization(*inputs, training_mode=mode)
    for a, s in zip(inputs, saved):
        if a is not None:
            np.testing.assert_array_equal(a, s)


@pytest.mark.parametrize("kwargs,exc,name", [
    (dict(training_mode=2), ValueError, "training_mode"),
    (dict(training_mode="1"), ValueError, "training_mode"),
    (dict(momentum=1.5), ValueError, "momentum"),
    (dict(epsilon=-1e-5), ValueError, "eps"),
    (dict(epsilon=float("inf")), ValueError, "eps"),
])
def test_bad_attributes(kwargs, exc, name):
    inputs = _inputs((4, 3, 5), np.float32)
    with pytest.raises(exc, match=name):
        batch_normalization(*inputs, **kwargs)


def test_training_with_one_value_per_channel():
    inputs = _inputs((1, 3), np.float64)
    with pytest.raises(ValueError, match="X"):
        batch_normalization(*inputs, training_mode=1)
    # inference needs no batch statistics
    assert batch_normalization(*inputs).shape == (1, 3)
