"""Build fastbn's Cython extensions.

Package metadata lives in pyproject.toml; this file only builds the extensions.

Environment switches
--------------------
FASTBN_DEBUG=1     bounds checks, wraparound and initialized checks back on, -O0 -g.
FASTBN_NATIVE=1    add -march=native (not portable: the wheel only runs on CPUs like the build host).
FASTBN_NO_OPENMP=1 build without OpenMP (every kernel runs on one thread).
FASTBN_BUILD_CACHE=DIR  where compiled modules are kept for reuse (default: build/fastbn-cache
                   beside this file; "0" turns the cache off).

Rebuilds are incremental: a module whose generated C, headers, flags, compiler, Python and
NumPy are unchanged is copied from the cache instead of compiled again (`pip install -e
".[mpi]"` after `pip install -e .` compiles nothing), and the modules that must be compiled
are compiled in parallel, one per CPU. `pip install -v` shows each module as it is built.
"""
import contextlib
import fnmatch
import glob
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import textwrap
import warnings

import numpy as np
from Cython.Build import cythonize
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext as _build_ext
from setuptools.command.sdist import sdist as _sdist
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


@contextlib.contextmanager
def _quiet():
    """The compiler's output to nowhere: a probe that fails is an answer, not an error."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    null = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(null, 1)
        os.dup2(null, 2)
        yield
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in saved + [null]:
            os.close(fd)


def probe(source, cflags, lflags=None, run=True):
    """Whether `source` compiles with `cflags` and, when `lflags` is given, also links with
    them and, when `run` (the target is the build host's), runs successfully."""
    compiler = new_compiler()
    customize_compiler(compiler)
    tmp = tempfile.mkdtemp(prefix="fastbn-probe-")
    try:
        with _quiet():
            return _probe(compiler, tmp, source, cflags, lflags, run)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _probe(compiler, tmp, source, cflags, lflags, run):
    try:
        src = os.path.join(tmp, "probe.c")
        with open(src, "w") as f:
            f.write(source)
        objs = compiler.compile([src], output_dir=tmp, extra_postargs=cflags)
        if lflags is not None:
            exe = os.path.join(tmp, "probe")
            compiler.link_executable(objs, exe, extra_postargs=lflags)
            if run:
                subprocess.run([exe], check=True, capture_output=True, timeout=60)
        return True
    except Exception:  # any failure means: not usable with these flags
        return False


def target_defines(*macros):
    """Whether the C compiler (CC for a cross build) targets a CPU that defines any of
    `macros`: the target's instruction set, not the build host's."""
    test = " || ".join("defined(%s)" % m for m in macros)
    return probe("#if !(%s)\n#error not this target\n#endif\nint main(void) { return 0; }\n"
                 % test, [])


if target_defines("__x86_64__", "_M_X64", "__i386__", "_M_IX86"):
    TARGET = "x86"
elif target_defines("__aarch64__", "_M_ARM64"):
    TARGET = "aarch64"
else:
    TARGET = "other"
HOST = {"x86_64": "x86", "amd64": "x86", "i686": "x86", "i386": "x86",
        "aarch64": "aarch64", "arm64": "aarch64"}.get(platform.machine().lower(), "other")
# A cross build (CC=aarch64-linux-gnu-gcc on an x86 host) cannot run what it compiles: its
# probes compile and link only.
CROSS = TARGET != HOST


def _libomp_prefixes():
    """Where libomp may be installed on macOS: LIBOMP_PREFIX, `brew --prefix libomp`, and
    Homebrew's default places (Apple silicon, Intel)."""
    found = [os.environ.get("LIBOMP_PREFIX")]
    try:
        found.append(subprocess.run(["brew", "--prefix", "libomp"], capture_output=True,
                                    text=True, timeout=30).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        pass
    found += ["/opt/homebrew/opt/libomp", "/usr/local/opt/libomp"]
    prefixes = []
    for p in found:
        if p and os.path.isdir(os.path.join(p, "include")) and p not in prefixes:
            prefixes.append(p)
    return prefixes


def openmp_flags():
    """Compile, link and run a tiny OpenMP program; return (compile, link) flags or ([], [])."""
    if NO_OPENMP:
        return [], []
    if sys.platform == "win32":
        candidates = [(["/openmp"], [])]
    elif sys.platform == "darwin":
        # Apple's clang has no OpenMP runtime of its own: libomp (Homebrew's, or LIBOMP_PREFIX)
        candidates = [(["-Xpreprocessor", "-fopenmp", "-I" + os.path.join(p, "include")],
                       ["-L" + os.path.join(p, "lib"), "-lomp",
                        "-Wl,-rpath," + os.path.join(p, "lib")])
                      for p in _libomp_prefixes()]
        candidates += [(["-Xpreprocessor", "-fopenmp"], ["-lomp"]), (["-fopenmp"], ["-fopenmp"])]
    else:
        candidates = [(["-fopenmp"], ["-fopenmp"])]
    for cflags, lflags in candidates:
        if probe(OPENMP_PROBE, cflags, lflags, run=not CROSS):
            return cflags, lflags
    warnings.warn("fastbn: OpenMP not available; building serial kernels (one thread)")
    return [], []


def compiles_with(flags):
    """Whether the C compiler accepts `flags` (the SIMD variants, GCC's vectorizer --param)."""
    return probe("int main(void) { return 0; }\n", flags)


omp_cflags, omp_lflags = openmp_flags()


X86 = TARGET == "x86"
# F16C: float16 <-> float32 conversions (every AVX2 CPU has them)
AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c"] if X86 and sys.platform != "win32" else []
BUILD_AVX2 = bool(AVX2_FLAGS) and not NATIVE and compiles_with(AVX2_FLAGS)
# 512-bit vectors: measured 5-15 % faster than the AVX2 build on most rows of the speed table
# (AMD EPYC, 2 threads); with 256-bit vectors the AVX-512 build was no faster than AVX2.
AVX512_FLAGS = (AVX2_FLAGS + ["-mavx512f", "-mavx512vl", "-mavx512dq", "-mavx512bw",
                              "-mprefer-vector-width=512"]) if AVX2_FLAGS else []
BUILD_AVX512 = BUILD_AVX2 and compiles_with(AVX512_FLAGS)

if sys.platform == "win32":
    opt = ["/Od"] if DEBUG else ["/O2"]
else:
    opt = ["-O0", "-g"] if DEBUG else ["-O3"]
    if NATIVE:
        opt.append("-march=native")
    # sqrt need not set errno, nor an operation keep its floating-point exception flags
    # unraised on paths the code does not take (fastbn reads neither): the per-channel
    # coefficient loops, 1 / sqrt(var + eps) and the float32 forms chosen by range among
    # them, then vectorize instead of running one channel at a time (a (2, 1024) call has
    # 1024 channels of 2 values). The values computed are the same IEEE results: neither
    # flag lets the compiler reassociate or contract anything.
    # And no a * b + c is contracted into one rounding unless the source writes it so
    # (fastbn_madd, fastbn/kernels/fma.h): a result is what the source says, the same in
    # every path that computes it (the fused ReLU backward and the unfused one, one thread
    # and several, one call and its phases) for any compiler. GCC contracts by default
    # wherever the target has FMA, and may do so in one path and not in another once they
    # are inlined differently: on 64-bit ARM the fused ReLU backward differed from the
    # unfused one by up to 2970 ulps where dx is near zero.
    FP_FLAGS = ["-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off"]
    if compiles_with(FP_FLAGS):
        opt += FP_FLAGS

# Cython compiles every combination of a fused function's types, and the kernels call only
# some of them (and not every module uses each helper of the shared headers): the unused ones
# are no defect, so the compiler is not asked to list them.
UNUSED = ["-Wno-unused-function"]
if sys.platform != "win32" and compiles_with(UNUSED):
    opt += UNUSED

# The rows kernels update several output rows per loop; GCC gives up vectorizing a loop after
# 10 run-time aliasing checks by default, so allow more.
ALIAS_PARAM = ["--param", "vect-max-version-for-alias-checks=64"]
if sys.platform != "win32" and not DEBUG and compiles_with(ALIAS_PARAM):
    opt += ALIAS_PARAM

directives = {
    "language_level": 3,
    "boundscheck": DEBUG,
    "wraparound": DEBUG,
    "initializedcheck": DEBUG,
    "cdivision": True,
    "nonecheck": False,
    "embedsignature": True,
    # A fused function returns from the branch its types select (`if floating is float:
    # return ...`); in the specializations that take it, the lines after it are dead by
    # design, and Cython would warn about each of them in every module.
    "warn.unreachable": False,
}



def extension(path):
    name = os.path.splitext(os.path.basename(path))[0]
    isa = {"_avx2": AVX2_FLAGS, "_avx512": AVX512_FLAGS}.get(name[name.rfind("_"):], [])
    flags = opt + isa + omp_cflags
    return Extension(
        "fastbn." + name,
        [path],
        include_dirs=[np.get_include(), os.path.join("fastbn", "kernels")],   # the C headers
        # a changed header rebuilds the module (the .c Cython writes does not change)
        depends=sorted(glob.glob(os.path.join("fastbn", "kernels", "*.h"))),
        define_macros=[
            ("NPY_NO_DEPRECATED_API", "NPY_1_7_API_VERSION"),
            # the oldest NumPy fastbn runs with (pyproject.toml); from 1.22 NumPy has the
            # memory-handler calls the output cache uses
            ("NPY_TARGET_VERSION", "NPY_1_25_API_VERSION"),
            ("FASTBN_CFLAGS", '"%s"' % " ".join(flags)),
        ],
        extra_compile_args=flags,
        extra_link_args=omp_lflags,
    )


HERE = os.path.dirname(os.path.abspath(__file__))
CACHE = os.environ.get("FASTBN_BUILD_CACHE", os.path.join(HERE, "build", "fastbn-cache"))
CACHE_KEEP = 3          # builds of each module kept (the newest): a few branches' worth


def _digest(*parts):
    h = hashlib.sha256()
    for part in parts:
        h.update(repr(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:32]


class build_ext(_build_ext):
    """setuptools' build_ext, incremental and parallel (see the module docstring)."""

    def finalize_options(self):
        super().finalize_options()
        if self.parallel is None:       # `build_ext -j N` still decides
            self.parallel = os.cpu_count() or 1

    def run(self):
        self._compiler_id = None
        self._done = 0
        super().run()

    def _compiler_identity(self):
        if self._compiler_id is None:
            cc = list(getattr(self.compiler, "compiler_so", None) or ["cl"])
            try:
                version = subprocess.run(cc[:1] + ["--version"], capture_output=True,
                                         timeout=60).stdout
            except (OSError, subprocess.SubprocessError):
                version = b""
            self._compiler_id = (cc, getattr(self.compiler, "linker_so", None), version)
        return self._compiler_id

    def _key(self, ext):
        """A digest of everything the compiled module depends on."""
        inputs = []
        for path in ext.sources + sorted(glob.glob(os.path.join(HERE, "fastbn", "kernels", "*.h"))):
            with open(path, "rb") as f:
                text = f.read()
            # Cython's metadata comment names the build environment's paths (a new one for
            # every isolated pip build); the code below it is what the compiler reads
            end = text.find(b"END: Cython Metadata */")
            inputs.append(text[end:] if end >= 0 else text)
        # NumPy's headers by its version: pip builds in a fresh environment each time
        numpy_dir = np.get_include()
        includes = [f"numpy {np.__version__}" if d == numpy_dir else d for d in ext.include_dirs]
        return _digest(ext.name, inputs, includes, ext.define_macros,
                       ext.extra_compile_args, ext.extra_link_args, ext.libraries,
                       self._compiler_identity(), sys.version, sys.platform,
                       platform.machine(), np.__version__, self.debug,
                       self.get_ext_filename(ext.name))

    def build_extension(self, ext):
        target = self.get_ext_fullpath(ext.name)
        total = len(self.extensions)
        if CACHE in ("", "0"):
            return self._compile(ext, total)
        entry = os.path.join(CACHE, ext.name, self._key(ext) + os.path.splitext(target)[1])
        if os.path.isfile(entry) and not self.force:
            os.makedirs(os.path.dirname(target) or ".", exist_ok=True)
            shutil.copyfile(entry, target)
            os.utime(entry)                              # the newest is kept longest
            self._done += 1
            print(f"[{self._done}/{total}] {ext.name} unchanged: reused from {entry}",
                  flush=True)
            return
        self._compile(ext, total)
        try:
            os.makedirs(os.path.dirname(entry), exist_ok=True)
            tmp = f"{entry}.{os.getpid()}.tmp"
            shutil.copyfile(target, tmp)
            os.replace(tmp, entry)
            old = sorted(glob.glob(os.path.join(os.path.dirname(entry), "*")),
                         key=os.path.getmtime, reverse=True)
            for path in old[CACHE_KEEP:]:
                os.remove(path)
        except OSError as exc:       # a read-only or full disk costs the next build only
            print(f"{ext.name} not cached ({exc})", flush=True)

    def _compile(self, ext, total):
        print(f"compiling {ext.name} ...", flush=True)
        super().build_extension(ext)
        self._done += 1
        print(f"[{self._done}/{total}] {ext.name} compiled", flush=True)


# Files of a working tree that are never part of the source distribution: build outputs,
# generated C and annotation pages, caches of Python, pytest and hypothesis, and the local
# environments of asv and the docs. (Filtered here rather than by MANIFEST.in's exclude
# lines, which warn on a clean checkout where there is nothing to exclude; the generated C,
# which setup.py writes before any command runs, is excluded there too, from the file list.)
_NOT_SHIPPED = ("*.so", "*.pyd", "*.o", "*.pyc", "*.pyo", "*.whl", "/fastbn/*.c",
                "/fastbn/*.html", "*/__pycache__/*", "*/.hypothesis/*", "*/.pytest_cache/*",
                "/docs/_build/*", "/asv_bench/env/*", "/asv_bench/results/*",
                "/asv_bench/html/*")


class sdist(_sdist):
    def make_release_tree(self, base_dir, files):
        shipped = [name for name in files
                   if not any(fnmatch.fnmatch("/" + name.replace(os.sep, "/"), pat)
                              for pat in _NOT_SHIPPED)]
        super().make_release_tree(base_dir, shipped)


sources = sorted(glob.glob(os.path.join("fastbn", "*.pyx")))
if not BUILD_AVX2:
    sources = [p for p in sources if not p.endswith("_avx2.pyx")]
if not BUILD_AVX512:
    sources = [p for p in sources if not p.endswith("_avx512.pyx")]
extensions = [extension(p) for p in sources]

def _cython_stamp(ext):
    """A digest of what Cython makes `ext`'s C from: every Cython source of the package, the
    directives, and the versions of Cython and of the libraries whose .pxd it reads."""
    import Cython
    import scipy
    inputs = []
    paths = [p for pattern in ("*.pyx", "*.pxd", "*.pxi")
             for p in glob.glob(os.path.join("fastbn", "**", pattern), recursive=True)]
    for path in sorted(paths):
        with open(path, "rb") as f:
            inputs.append((path, f.read()))
    return _digest(ext.name, inputs, directives, Cython.__version__, np.__version__,
                   scipy.__version__)


def cythonize_changed(exts):
    """cythonize, but a module whose C was made from the same inputs (the stamp beside it in
    the cache) keeps its C, and any other is made anew: Cython's own check compares times
    with the .pxd files of the build environment, which an isolated pip build installs anew
    each time, and does not see a change of directives."""
    todo, kept = [], []
    for ext in exts:
        c_file = os.path.splitext(ext.sources[0])[0] + ".c"
        stamp = os.path.join(CACHE, ext.name + ".c-inputs")
        try:
            with open(stamp) as f:
                same = f.read() == _cython_stamp(ext) and os.path.isfile(c_file)
        except OSError:
            same = False
        if same and CACHE not in ("", "0"):
            ext.sources = [c_file] + ext.sources[1:]
            kept.append(ext)
        else:
            todo.append(ext)
    # forced: Cython's own check sees no change of directives (FASTBN_DEBUG) or versions
    done = cythonize(todo, compiler_directives=directives, force=True) if todo else []
    if CACHE not in ("", "0"):
        for ext in done:
            try:
                os.makedirs(CACHE, exist_ok=True)
                with open(os.path.join(CACHE, ext.name + ".c-inputs"), "w") as f:
                    f.write(_cython_stamp(ext))
            except OSError:
                pass
    return kept + done


setup(
    ext_modules=cythonize_changed(extensions),
    cmdclass={"build_ext": build_ext, "sdist": sdist},
)
