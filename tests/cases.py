"""The shapes the kernel tests sweep, each with the kernel branch it drives.

Every case is an NCHW-ordered shape and a layout (``case.shape`` is the array's shape in
that layout) and the branch a training forward or backward of it takes on 2 threads, as
``fastbn._kernels.schedule`` reports it (``tests/test_cases.py`` checks every label):

* ``serial``: below the thread threshold, one thread runs everything;
* ``planar groups``: NCHW memory, whole channels per thread (C >= 4 x threads);
* ``planar team``: NCHW memory with few channels, threads share each channel's chunks;
* ``, long planes``: planes longer than one block (1024 values), cut into pieces;
* ``rows chunks``: channels-last memory (or (N, C)), chunks of rows merged in order;
* ``rows columns``: at most 128 rows, whose channels the threads split.

Sizes are odd on purpose: C = 1, HW = 1, C not a multiple of the vector width, every ndim
from 2 to 5, one sample, planes of 1 to 40000 values.
"""
from collections import namedtuple

_Case = namedtuple("Case", "nchw layout branch")


class Case(_Case):
    @property
    def shape(self):
        """The array's shape: nchw with the channel axis moved last for NHWC."""
        s = self.nchw
        return s if self.layout == "NCHW" or len(s) == 2 else (s[0],) + s[2:] + (s[1],)

    def __str__(self):
        return f"{self.shape}-{self.layout}"


def _both(nchw, nchw_branch, nhwc_branch):
    return [Case(nchw, "NCHW", nchw_branch), Case(nchw, "NHWC", nhwc_branch)]


CASES = [
    Case((4, 3), "NCHW", "serial"),
    Case((7, 1), "NCHW", "serial"),
    Case((600, 3), "NCHW", "serial"),
    Case((100, 333), "NCHW", "rows columns"),
    Case((2048, 17), "NCHW", "rows chunks"),
    Case((9000, 17), "NCHW", "rows chunks"),
    Case((70000, 3), "NCHW", "rows chunks"),
    *_both((5, 7, 9), "serial", "serial"),
    *_both((3, 4, 5, 6), "serial", "serial"),
    *_both((4, 3, 5, 7), "serial", "serial"),
    *_both((2, 3, 4, 5, 3), "serial", "serial"),
    *_both((8, 17, 7, 7), "serial", "serial"),
    *_both((16, 1, 10, 10), "serial", "serial"),
    *_both((3, 130, 1, 1), "serial", "serial"),
    *_both((3, 100, 5, 5), "serial", "serial"),
    *_both((3, 5, 20, 20), "serial", "serial"),
    *_both((1, 5, 3000), "serial, long planes", "serial"),
    *_both((7, 6, 28, 28), "planar team", "rows chunks"),
    *_both((2, 33, 40, 40), "planar groups, long planes", "rows chunks"),
    *_both((64, 40, 9, 9), "planar groups", "rows chunks"),
    *_both((2, 70, 3, 300), "planar groups", "rows chunks"),
    *_both((3, 40, 17, 17), "planar groups", "rows chunks"),
    *_both((3, 700, 4, 4), "planar groups", "rows columns"),
    *_both((2, 1100, 4, 4), "planar groups", "rows columns"),
    *_both((32, 3, 40, 40), "planar team, long planes", "rows chunks"),
    *_both((4, 1, 200, 200), "planar team, long planes", "rows chunks"),
    *_both((8, 3, 64, 48), "planar team, long planes", "rows chunks"),
    *_both((16, 1, 64, 64), "planar team, long planes", "rows chunks"),
    *_both((3, 1, 200, 130), "planar team, long planes", "rows chunks"),
    *_both((40, 2, 40, 41), "planar team, long planes", "rows chunks"),
    *_both((40000, 3, 1, 1), "rows chunks", "rows chunks"),
]

# the sweep against the NumPy reference: every case
ORACLE = CASES
# against PyTorch (optional): the small ones of every ndim, and one of each parallel branch
TORCH = [c for c in CASES if c.branch == "serial" and c.nchw[0] < 100] + [
    c for c in CASES if c.nchw in ((100, 333), (64, 40, 9, 9), (7, 6, 28, 28), (3, 700, 4, 4))]
# bit-identical results on 1 and 2 threads: every case that runs on several threads
THREADS = [c for c in CASES if not c.branch.startswith("serial")]
# NaN and infinity stay in their channel (the tests poison channel 1 of 3): a serial, a
# planar team and a rows-chunks case of 3 channels
NAN = [c for c in CASES if c.nchw in ((4, 3, 5, 7), (8, 3, 64, 48), (70000, 3))]
# the layers and Batch Renormalization: one small shape of each ndim (NCHW-ordered)
LAYER_SHAPES = [(8, 5), (4, 6, 7), (4, 6, 5, 5), (2, 3, 3, 4, 5)]


def ids(cases):
    return [str(c) for c in cases]
