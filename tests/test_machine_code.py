"""Checks of the compiled kernels themselves, with the tools that read them: the AVX-512
build keeps its long-run accumulator lanes in vector registers (objdump), and a tour of
every kernel path runs clean under valgrind's memcheck. Each skips, saying why, when its
tool or build is absent."""
import glob
import os
import platform
import re
import shutil
import subprocess
import sys

import pytest

import fastbn

HERE = os.path.dirname(os.path.abspath(__file__))
PACKAGE = os.path.dirname(fastbn.__file__)


def disassembly(module):
    """{function name: its instructions} of a kernel build's shared object."""
    if shutil.which("objdump") is None:
        pytest.skip("needs objdump (binutils)")
    paths = glob.glob(os.path.join(PACKAGE, module + ".*.so"))
    if not paths:
        pytest.skip(f"{module} is not built here")
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", paths[0]],
                          capture_output=True, text=True, check=True, timeout=300).stdout
    functions, name = {}, None
    for line in text.splitlines():
        head = re.match(r"^[0-9a-f]+ <(.+)>:$", line)
        if head:
            name = head.group(1)
            functions[name] = []
        elif name is not None:
            functions[name].append(line)
    return {k: "\n".join(v) for k, v in functions.items()}


def register_loops(code, min_fma=4):
    """The loop bodies of a function (from a backward branch's target to the branch) whose
    lanes stay in registers: min_fma or more vfmadd on zmm registers (32 double lanes are
    4 zmm registers, 32 float lanes 2) and no operand on the stack."""
    lines = [ln for ln in code.splitlines() if re.match(r"^\s*[0-9a-f]+:", ln)]
    addr = [int(ln.split(":")[0], 16) for ln in lines]
    loops = []
    for i, ln in enumerate(lines):
        jump = re.search(r"\sj[a-z]+\s+([0-9a-f]+) <", ln)
        if jump and int(jump.group(1), 16) < addr[i] and int(jump.group(1), 16) in addr:
            body = "\n".join(lines[addr.index(int(jump.group(1), 16)):i + 1])
            if (len(re.findall(r"vfmadd\S*\s+.*zmm", body)) >= min_fma
                    and "(%rsp)" not in body and "(%rbp)" not in body):
                loops.append(body)
    return loops


def test_avx512_long_runs_keep_their_lanes_in_registers():
    """The float32 statistics (_block_devs) and backward sums of the AVX-512 build have a
    loop that accumulates their 32 lanes in zmm registers (vfmadd on zmm, nothing on the
    stack) and never zero a memory array (rep stos): GCC has turned them into 256-bit code
    with memory lanes after small edits (5-30 % slower); see docs/development.rst,
    "Reading the generated code". The sums' lane loops are _sums_run's (float32 data, with
    float32 and with double dot lanes; _block_sums_in, _block_sums or the chunk loop above
    them inline it or not as GCC decides)."""
    functions = disassembly("_kernels_avx512")
    devs = {k: v for k, v in functions.items()
            if re.search(r"fuse_0(_\d)?__pyx_f_\w*_block_devs\b", k)}
    sums = {k: v for k, v in functions.items()
            if re.search(r"fuse_0_\d_0__pyx_f_\w*_(sums_run|block_sums|block_sums_in)\b", k)}
    assert devs and sums, sorted(functions)[:20]
    for name, code in devs.items():
        assert register_loops(code), f"{name}: no loop keeps its lanes in zmm registers"
        assert "rep stos" not in code, name
    float_lanes = [k for k in sums if "fuse_0_0_0" in k]
    double_lanes = [k for k in sums if "fuse_0_1_0" in k]
    assert float_lanes, sorted(sums)
    for name in float_lanes:
        assert register_loops(sums[name], 2), f"{name}: float32 lanes not in zmm registers"
    for name in double_lanes:
        assert register_loops(sums[name]), f"{name}: double lanes not in zmm registers"
    if not double_lanes:
        # the plain variant's double lanes inlined into the chunk loop that calls them
        chunk = [v for k, v in functions.items()
                 if re.search(r"fuse_0__pyx_f_\w*_planar_chunk_sums\b", k)]
        assert chunk and all(register_loops(v) for v in chunk), "double lanes not in zmm"
    for name, code in sums.items():
        assert "rep stos" not in code, name


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="valgrind runs on Linux")
def test_every_kernel_path_is_clean_under_memcheck():
    """tests/valgrind_kernels.py under memcheck: no invalid read or write, no use of
    uninitialised memory, in any kernel path (planar and rows, every schedule, 1 and 2
    threads, the layers, ONNX, Caffe)."""
    if shutil.which("valgrind") is None:
        pytest.skip("needs valgrind")
    env = dict(os.environ, PYTHONMALLOC="malloc", OMP_NUM_THREADS="2")
    done = subprocess.run(
        ["valgrind", "--tool=memcheck", "--error-exitcode=99", "--leak-check=no",
         "--errors-for-leak-kinds=none", sys.executable,
         os.path.join(HERE, "valgrind_kernels.py")],
        capture_output=True, text=True, env=env, timeout=1200)
    assert "valgrind tour:" in done.stdout, done.stderr[-4000:]
    ours = [e for e in memcheck_errors(done.stderr) if "fastbn" in e]
    assert not ours, "\n\n".join(ours[:3])


def memcheck_errors(report):
    """The error records of a memcheck report, each as its text (kind and stack). CPython
    itself gives some (uninitialised values in its small-int cache, under this
    interpreter build): the test counts those whose stack passes through fastbn."""
    records, current = [], []
    for line in report.splitlines():
        body = re.sub(r"^==\d+==\s?", "", line)
        if not body.strip():
            if current:
                records.append("\n".join(current))
            current = []
        else:
            current.append(body)
    if current:
        records.append("\n".join(current))
    kinds = ("Invalid ", "Conditional jump", "Use of uninitialised", "Syscall param",
             "Mismatched free", "Source and destination overlap")
    return [r for r in records if r.startswith(kinds)]


def test_memcheck_errors_are_read():
    """The report parser finds an error record and its stack (a guard for the test above)."""
    report = ("==7== Memcheck\n==7== \n==7== Invalid read of size 4\n"
              "==7==    at 0x1: __pyx_f_6fastbn_8_kernels__rows_reduce (in _kernels.so)\n"
              "==7== \n==7== ERROR SUMMARY: 1 errors\n")
    errors = memcheck_errors(report)
    assert len(errors) == 1 and "fastbn" in errors[0]


def _aarch64_only():
    if platform.machine().lower() not in ("aarch64", "arm64"):
        pytest.skip("64-bit ARM build only (this is %s)" % platform.machine())


def test_aarch64_float16_conversions_are_vector_instructions():
    """On 64-bit ARM, float16 data is widened and narrowed with the CPU's vector conversions
    (fcvtl v.4s, v.4h; fcvtn v.4h, v.4s), not the portable bit code one value at a time."""
    _aarch64_only()
    code = "\n".join(disassembly("_kernels").values())     # the helpers are inlined
    assert re.search(r"fcvtl2?\s+v\d+\.4s, v\d+\.[48]h", code), "no vector float16 widening"
    assert re.search(r"fcvtn2?\s+v\d+\.[48]h, v\d+\.4s", code), "no vector float16 narrowing"


@pytest.mark.parametrize("module", ["_kernels", "_kernels_avx2", "_kernels_avx512"])
def test_no_build_lets_the_compiler_contract(module):
    """Every kernel build is compiled with -ffp-contract=off: its fused multiply-adds are
    the ones the source writes (kernels/fma.h), so the paths that promise the same bits
    compute the same expressions whatever the compiler would choose."""
    if sys.platform == "win32":
        pytest.skip("MSVC does not contract unless asked (/fp:contract)")
    paths = glob.glob(os.path.join(PACKAGE, module + ".*.so"))
    if not paths:
        pytest.skip(f"{module} is not built here")
    # the flags the module was compiled with, as build_flags() reports them, read from the
    # file (a variant this CPU cannot run must not be imported)
    with open(paths[0], "rb") as f:
        data = f.read()
    flags = re.search(rb"\x00(-O[0-3s] [^\x00]*)\x00", data)      # FASTBN_CFLAGS
    assert flags, "no compiler flags in " + paths[0]
    assert b"-ffp-contract=off" in flags.group(1).split()
