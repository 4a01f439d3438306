"""Build fastbn's Cython extensions.

Package metadata lives in pyproject.toml; this file only builds the extensions.

Environment switches
--------------------
FASTBN_DEBUG=1     bounds checks, wraparound and initialized checks back on, -O0 -g.
FASTBN_NATIVE=1    add -march=native (not portable: the wheel only runs on CPUs like the build host).
FASTBN_NO_OPENMP=1 build without OpenMP (every kernel runs on one thread).
"""
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools._distutils.ccompiler import new_compiler
from setuptools._distutils.sysconfig import customize_compiler

DEBUG = os.environ.get("FASTBN_DEBUG", "0") == "1"
NATIVE = os.environ.get("FASTBN_NATIVE", "0") == "1"
NO_OPENMP = os.environ.get("FASTBN_NO_OPENMP", "0") == "1"

OPENMP_PROBE = textwrap.dedent(
    """
    #include <omp.h>
    #include <stdio.h>
    int main(void) {
        int n = 0;
        #pragma omp parallel reduction(+:n)
        n += 1;
        printf("%d\\n", n);
        return n > 0 ? 0 : 1;
    }
    """
)


def openmp_flags():
    """Compile, link and run a tiny OpenMP program; return (compile, link) flags or ([], [])."""
    if NO_OPENMP:
        return [], []
    if sys.platform == "win32":
        candidates = [(["/openmp"], [])]
    elif sys.platform == "darwin":
        candidates = [(["-Xpreprocessor", "-fopenmp"], ["-lomp"]), (["-fopenmp"], ["-fopenmp"])]
    else:
        candidates = [(["-fopenmp"], ["-fopenmp"])]
    compiler = new_compiler()
    customize_compiler(compiler)
    tmp = tempfile.mkdtemp(prefix="fastbn-omp-")
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(OPENMP_PROBE)
        for cflags, lflags in candidates:
            try:
                objs = compiler.compile([src], output_dir=tmp, extra_postargs=cflags)
                exe = os.path.join(tmp, "probe")
                compiler.link_executable(objs, exe, extra_postargs=lflags)
                subprocess.run([exe], check=True, capture_output=True, timeout=60)
            except Exception:  # any failure means: no usable OpenMP with these flags
                continue
            return cflags, lflags
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    warnings.warn("fastbn: OpenMP not available; building serial kernels (one thread)")
    return [], []


omp_cflags, omp_lflags = openmp_flags()

if sys.platform == "win32":
    opt = ["/Od"] if DEBUG else ["/O2"]
else:
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    if NATIVE:
        opt.append("-march=native")

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "nonecheck": False,
    "embedsignature": True,
}

extensions = [
    Extension(
        "fastbn." + os.path.splitext(os.path.basename(path))[0],
        [path],
        include_dirs=[np.get_include()],
        define_macros=[
            ("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"),
            ("FASTBN_CFLAGS", '"%s"' % " ".join(opt + omp_cflags)),
        ],
        extra_compile_args=opt + omp_cflags,
        extra_link_args=omp_lflags,
    )
    for path in sorted(glob.glob(os.path.join("fastbn", "*.pyx")))
]

setup(
    ext_modules=cythonize(extensions, compiler_directives=directives),
)
