"""Timing for the speed table: test data, and interleaved best-of-rounds timing.

Every implementation of an operation is timed interleaved in one process (one call of
each per round, best of several rounds), so the ratios are fair on a noisy machine even
when the absolute times drift.
"""
import time

import numpy as np


def make_data(shape, layout, dtype, seed=0):
    """x, dy (filled, so no page is lazily zeroed) and per-channel parameters.

    `shape` is given NCHW; for layout "NHWC" the arrays are (N, ..., C).
    """
    rng = np.random.default_rng(seed)
    if layout == "NHWC" and len(shape) > 2:
        shape = (shape[0],) + tuple(shape[2:]) + (shape[1],)
    C = shape[1] if layout == "NCHW" else shape[-1]
    x = (rng.standard_normal(shape, dtype=np.float32) + np.float32(0.5)).astype(dtype,
                                                                                 copy=False)
    dy = rng.standard_normal(shape, dtype=np.float32).astype(dtype, copy=False)
    # 16-bit data comes with float32 parameters (mixed precision, as PyTorch's)
    pdt = np.float32 if np.dtype(dtype).itemsize == 2 else dtype
    w = rng.uniform(0.5, 1.5, C).astype(pdt)
    b = rng.uniform(-0.5, 0.5, C).astype(pdt)
    return x, dy, w, b


def torch_module():
    """PyTorch, or None when it is absent or fails to import (the peer column is left
    out)."""
    try:
        import torch
    except Exception:
        return None
    return torch


def latencies(func, calls):
    """The times (s) of `calls` consecutive calls of func, after one warm-up call: the
    spread of a small call (a descheduled thread, a page fault) that the best time hides."""
    func()
    times = np.empty(calls)
    for i in range(calls):
        t0 = time.perf_counter()
        func()
        times[i] = time.perf_counter() - t0
    return times


def interleaved(funcs, rounds, budget=None):
    """Best time (s) of each callable, timed one after the other in each round."""
    best = [np.inf] * len(funcs)
    start = time.perf_counter()
    for f in funcs:            # warm-up: page in outputs, build caches
        if f is not None:
            f()
    for _ in range(rounds):
        for i, f in enumerate(funcs):
            if f is None:
                continue
            t0 = time.perf_counter()
            f()
            best[i] = min(best[i], time.perf_counter() - t0)
        if budget is not None and time.perf_counter() - start > budget:
            break
    return best
