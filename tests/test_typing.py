"""fastbn's type information (PEP 561: fastbn/py.typed and the stub fastbn/__init__.pyi):
every public name of fastbn is in the stub with the parameters the code has (names, kinds
and defaults), and mypy --strict accepts a script that uses the public API."""
import ast
import inspect
import os
import subprocess
import sys
import textwrap

import pytest

import fastbn

PACKAGE = os.path.dirname(os.path.abspath(fastbn.__file__))
STUB = os.path.join(PACKAGE, "__init__.pyi")


def _stub():
    with open(STUB) as f:
        return ast.parse(f.read())


def _stub_defs():
    """{name: FunctionDef} of the stub's module-level functions, and {class: {method: def}}."""
    functions, classes = {}, {}
    for node in _stub().body:
        if isinstance(node, ast.FunctionDef):
            functions[node.name] = node
        elif isinstance(node, ast.ClassDef):
            classes[node.name] = {n.name: n for n in node.body if isinstance(n, ast.FunctionDef)}
            for base in node.bases:            # methods of a stub base class (_Norm)
                if isinstance(base, ast.Name) and base.id in classes:
                    classes[node.name] = {**classes[base.id], **classes[node.name]}
    return functions, classes


def _params(fn):
    """[(name, kind, default)] of a stub function, kinds as inspect names them; a default of
    `...` is 'any' (the stub does not spell it)."""
    a = fn.args
    out = []
    positional = a.posonlyargs + a.args
    defaults = [None] * (len(positional) - len(a.defaults)) + list(a.defaults)
    for arg, d in zip(positional, defaults):
        out.append((arg.arg, "POSITIONAL_OR_KEYWORD", d))
    for arg, d in zip(a.kwonlyargs, a.kw_defaults):
        out.append((arg.arg, "KEYWORD_ONLY", d))
    result = []
    for name, kind, d in out:
        if d is None:
            default = inspect.Parameter.empty
        elif isinstance(d, ast.Constant) and d.value is Ellipsis:
            default = "any"
        else:
            default = ast.literal_eval(d)
        result.append((name, kind, default))
    return result


def _runtime(fn):
    return [(p.name, p.kind.name, p.default) for p in inspect.signature(fn).parameters.values()]


def _same(stub, runtime):
    if len(stub) != len(runtime):
        return False
    return all(s[:2] == r[:2] and (s[2] == "any" or s[2] == r[2] or
                                   (s[2] is inspect.Parameter.empty) == (r[2] is inspect.Parameter.empty)
                                   and s[2] == r[2])
               for s, r in zip(stub, runtime))


def test_the_package_is_typed():
    assert os.path.exists(os.path.join(PACKAGE, "py.typed"))
    stub_all = next(node.value for node in _stub().body if isinstance(node, ast.Assign)
                    and any(getattr(t, "id", None) == "__all__" for t in node.targets))
    assert ast.literal_eval(stub_all) == fastbn.__all__


@pytest.mark.parametrize("name", [n for n in fastbn.__all__
                                  if inspect.isroutine(getattr(fastbn, n))])
def test_stub_functions_match_the_code(name):
    functions, _ = _stub_defs()
    assert name in functions, f"{name} is not in fastbn/__init__.pyi"
    stub, runtime = _params(functions[name]), _runtime(getattr(fastbn, name))
    assert _same(stub, runtime), f"{name}: stub {stub} != code {runtime}"


@pytest.mark.parametrize("name", [n for n in fastbn.__all__
                                  if inspect.isclass(getattr(fastbn, n))])
def test_stub_classes_match_the_code(name):
    _, classes = _stub_defs()
    cls = getattr(fastbn, name)
    assert name in classes, f"{name} is not in fastbn/__init__.pyi"
    stub = classes[name]
    public = [m for m in dir(cls) if not m.startswith("_") or m in ("__init__", "__call__")]
    for m in public:
        member = inspect.getattr_static(cls, m)
        if isinstance(member, property) or not callable(member):
            continue
        assert m in stub, f"{name}.{m} is not in the stub"
        assert _same(_params(stub[m]), _runtime(getattr(cls, m))), \
            f"{name}.{m}: stub {_params(stub[m])} != code {_runtime(getattr(cls, m))}"


SCRIPT = """
    import numpy as np
    import fastbn

    x = np.random.default_rng(0).normal(size=(4, 3, 5, 5)).astype(np.float32)
    w, b = np.ones(3, np.float32), np.zeros(3, np.float32)
    rm, rv = np.zeros(3, np.float32), np.ones(3, np.float32)
    y, mean, invstd = fastbn.batch_norm_train(x, w, b, running_mean=rm, running_var=rv,
                                              momentum=0.1, num_threads=1)
    dx, dw, db = fastbn.batch_norm_backward(y - 1.0, x, mean, invstd, w, layout="NCHW")
    yi: np.ndarray = fastbn.batch_norm_infer(x, rm, rv, w, b, out=np.empty_like(x))
    yr, _, _ = fastbn.batch_norm_relu_train(x, w, b, residual=np.ones_like(x))
    scale, shift = fastbn.fold_batch_norm(rm, rv, w, b, eps=1e-5)
    fw, fb = fastbn.fuse_conv_bn(np.ones((3, 2, 3, 3)), None, rm, rv, w, b, eps=1e-5)
    n: int = fastbn.get_num_threads()
    fastbn.set_num_threads(None)
    info: dict[str, int] = fastbn.output_cache_info()
    layer = fastbn.BatchNorm(3, activation="relu")
    out = layer(x)
    grad = layer.backward(np.ones_like(out))
    state = layer.eval().state_dict()
    renorm = fastbn.BatchRenorm(3, rmax="paper")
    rmin, rmax, dmax = renorm.clipping(0)
    print(dx.shape, dw, db, yi.shape, yr.shape, scale, shift, fw.shape, fb, n, info,
          type(grad), sorted(state), rmin + rmax + dmax)
"""


def test_mypy_strict_accepts_the_public_api(tmp_path):
    pytest.importorskip("mypy")
    script = tmp_path / "uses_fastbn.py"
    script.write_text(textwrap.dedent(SCRIPT))
    env, extra = dict(os.environ), []
    if "site-packages" not in PACKAGE:
        # a checkout (an editable install, which mypy cannot follow): its tree, whose
        # modules mypy then reads as the user's own; report only what it reports for an
        # installed package, the errors of the script that uses it
        env["MYPYPATH"] = os.path.dirname(PACKAGE)
        extra = ["--follow-imports=silent"]
    proc = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental",
                           "--cache-dir", str(tmp_path / "cache"), *extra, str(script)],
                          capture_output=True, text=True, env=env, cwd=str(tmp_path),
                          timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    # and the script runs
    subprocess.run([sys.executable, str(script)], check=True, capture_output=True, timeout=300)
