"""Caffe's BatchNorm layer (Forward_cpu / Backward_cpu) as its sequence of BLAS calls.

The data is a C-contiguous (num, channels, spatial) block. Per-channel reductions are two
matrix-vector products with vectors of ones: ``(num*channels, spatial) @ ones_s`` gives one
value per (n, c) plane, then ``(num, channels).T @ ones_n`` sums those over n. Per-channel
values are spread back over the data by two rank-1 products, ``ones_n x v`` -> (num,
channels), then ``that x ones_s`` -> (num*channels, spatial). Element-wise steps are plain
loops. Every buffer is owned and shaped by the caller (fastbn.caffe); all arithmetic is in
the data type, as in the original layer, which is why this engine is a faithfulness and
speed baseline rather than the fast path.
"""
from libc.math cimport sqrt
from libc.string cimport memcpy, memset
from cython cimport floating

from ._blas cimport _axpy, _copy, _gemv, _ger, _scal, RowMajor, NoTrans, Trans


cdef void _per_channel(const floating *data, int num, int channels, int spatial,
                       floating alpha, const floating *ones_n, const floating *ones_s,
                       floating *num_by_chans, floating *out) noexcept nogil:
    """out[c] = alpha * sum over (n, s) of data[n, c, s], by two gemv calls."""
    _gemv(RowMajor, NoTrans, num * channels, spatial, alpha, data, spatial,
          ones_s, 1, 0, num_by_chans, 1)
    _gemv(RowMajor, Trans, num, channels, <floating> 1, num_by_chans, channels,
          ones_n, 1, 0, out, 1)


cdef void _spread(const floating *per_c, int num, int channels, int spatial,
                  floating alpha, bint accumulate, const floating *ones_n,
                  const floating *ones_s, floating *num_by_chans, floating *dst,
                  Py_ssize_t count) noexcept nogil:
    """dst[n, c, s] (+)= alpha * per_c[c], by two rank-1 products (gemm with k = 1)."""
    memset(num_by_chans, 0, <size_t> num * channels * sizeof(floating))
    _ger(RowMajor, num, channels, <floating> 1, ones_n, 1, per_c, 1, num_by_chans, channels)
    if not accumulate:
        memset(dst, 0, <size_t> count * sizeof(floating))
    _ger(RowMajor, num * channels, spatial, alpha, num_by_chans, 1, ones_s, 1, dst, spatial)


def forward(const floating[::1] bottom, floating[::1] top, floating[::1] temp,
            floating[::1] x_norm, floating[::1] num_by_chans, floating[::1] mean,
            floating[::1] variance, const floating[::1] ones_n, const floating[::1] ones_s,
            floating[::1] blob_mean, floating[::1] blob_var, floating[::1] blob_scale,
            int num, int channels, int spatial, bint use_global_stats,
            double moving_average_fraction, double eps):
    """Caffe BatchNorm forward on flat (num*channels*spatial,) buffers.

    ``top`` may be ``bottom`` (in place). On return ``temp`` holds sqrt(var + eps) spread
    over the data and ``x_norm`` a copy of ``top``, as backward needs them; in training
    (``use_global_stats`` false) the three blobs are updated.
    """
    cdef Py_ssize_t count = <Py_ssize_t> num * channels * spatial, i
    cdef floating maf = <floating> moving_average_fraction
    cdef floating feps = <floating> eps
    cdef floating scale_factor, correction
    cdef Py_ssize_t m = <Py_ssize_t> num * spatial
    if count == 0:
        return
    with nogil:
        if <const void *> &top[0] != <const void *> &bottom[0]:
            memcpy(&top[0], &bottom[0], <size_t> count * sizeof(floating))
        if use_global_stats:
            scale_factor = 0 if blob_scale[0] == 0 else 1 / blob_scale[0]
            _copy(channels, &blob_mean[0], 1, &mean[0], 1)
            _scal(channels, scale_factor, &mean[0], 1)
            _copy(channels, &blob_var[0], 1, &variance[0], 1)
            _scal(channels, scale_factor, &variance[0], 1)
        else:
            _per_channel(&bottom[0], num, channels, spatial, <floating> (1.0 / m),
                         &ones_n[0], &ones_s[0], &num_by_chans[0], &mean[0])
        # top -= mean
        _spread(&mean[0], num, channels, spatial, <floating> -1, True, &ones_n[0],
                &ones_s[0], &num_by_chans[0], &top[0], count)
        if not use_global_stats:
            # variance = E((x - mean)^2)
            for i in range(count):
                temp[i] = top[i] * top[i]
            _per_channel(&temp[0], num, channels, spatial, <floating> (1.0 / m),
                         &ones_n[0], &ones_s[0], &num_by_chans[0], &variance[0])
            # moving sums: s = s * maf + 1; sums = batch + maf * sums (var unbiased)
            blob_scale[0] = blob_scale[0] * maf
            blob_scale[0] = blob_scale[0] + 1
            _scal(channels, maf, &blob_mean[0], 1)
            _axpy(channels, <floating> 1, &mean[0], 1, &blob_mean[0], 1)
            correction = (<floating> m) / (m - 1) if m > 1 else 1
            _scal(channels, maf, &blob_var[0], 1)
            _axpy(channels, correction, &variance[0], 1, &blob_var[0], 1)
        for i in range(channels):
            variance[i] = sqrt(variance[i] + feps)
        _spread(&variance[0], num, channels, spatial, <floating> 1, False, &ones_n[0],
                &ones_s[0], &num_by_chans[0], &temp[0], count)
        for i in range(count):
            top[i] = top[i] / temp[i]
        memcpy(&x_norm[0], &top[0], <size_t> count * sizeof(floating))


def backward(const floating[::1] top_diff, floating[::1] bottom_diff,
             const floating[::1] x_norm, const floating[::1] temp,
             floating[::1] num_by_chans, floating[::1] mean,
             const floating[::1] ones_n, const floating[::1] ones_s,
             int num, int channels, int spatial, bint use_global_stats):
    """Caffe BatchNorm backward on flat buffers from the matching forward.

    ``top_diff`` must not be ``bottom_diff`` (the caller copies it first for in-place use,
    as Caffe does): it is read again after bottom_diff has been written.
    """
    cdef Py_ssize_t count = <Py_ssize_t> num * channels * spatial, i
    cdef floating inv_m = <floating> (-1.0 / (<double> num * spatial))
    if count == 0:
        return
    if use_global_stats:
        with nogil:
            for i in range(count):
                bottom_diff[i] = top_diff[i] / temp[i]
        return
    with nogil:
        # dx = (dy - mean(dy) - mean(dy * y) * y) / sqrt(var + eps), with y = x_norm
        for i in range(count):
            bottom_diff[i] = x_norm[i] * top_diff[i]
        _per_channel(&bottom_diff[0], num, channels, spatial, <floating> 1, &ones_n[0],
                     &ones_s[0], &num_by_chans[0], &mean[0])
        _spread(&mean[0], num, channels, spatial, <floating> 1, False, &ones_n[0],
                &ones_s[0], &num_by_chans[0], &bottom_diff[0], count)
        for i in range(count):
            bottom_diff[i] = x_norm[i] * bottom_diff[i]
        _per_channel(&top_diff[0], num, channels, spatial, <floating> 1, &ones_n[0],
                     &ones_s[0], &num_by_chans[0], &mean[0])
        _spread(&mean[0], num, channels, spatial, <floating> 1, True, &ones_n[0],
                &ones_s[0], &num_by_chans[0], &bottom_diff[0], count)
        # bottom_diff = dy - bottom_diff / m  (Caffe's axpby: scal, then axpy)
        _scal_big(count, inv_m, &bottom_diff[0])
        _axpy_big(count, <floating> 1, &top_diff[0], &bottom_diff[0])
        for i in range(count):
            bottom_diff[i] = bottom_diff[i] / temp[i]


cdef void _scal_big(Py_ssize_t count, floating alpha, floating *x) noexcept nogil:
    """x := alpha * x over a count that may exceed a BLAS int (in int-sized pieces)."""
    cdef Py_ssize_t start = 0, step = 1 << 30
    while start < count:
        _scal(<int> min(step, count - start), alpha, x + start, 1)
        start += step


cdef void _axpy_big(Py_ssize_t count, floating alpha, const floating *x,
                    floating *y) noexcept nogil:
    """y := alpha * x + y over a count that may exceed a BLAS int (in int-sized pieces)."""
    cdef Py_ssize_t start = 0, step = 1 << 30
    while start < count:
        _axpy(<int> min(step, count - start), alpha, x + start, 1, y + start, 1)
        start += step
