"""Fused float/double wrappers over scipy's BLAS (scipy.linalg.cython_blas), GIL-free.

C code cimports the ``_``-prefixed functions declared in ``_blas.pxd``. The Python-level
functions below exist so the wrappers (in particular the row-major operand swap) can be
tested against NumPy; they take C-contiguous arrays and call the same wrappers.
"""
from scipy.linalg.cython_blas cimport (saxpy, daxpy, scopy, dcopy, sgemv, dgemv,
                                       sger, dger, sscal, dscal)


cdef void _gemv(BLAS_Order order, BLAS_Trans ta, int m, int n, floating alpha,
                const floating *A, int lda, const floating *x, int incx,
                floating beta, floating *y, int incy) noexcept nogil:
    """y := alpha * op(A) @ x + beta * y, A m x n, op(A) = A or A.T."""
    cdef char trans = ta
    if order == RowMajor:
        # row-major A is column-major A.T (n x m): flip the transpose flag
        trans = Trans if ta == NoTrans else NoTrans
        m, n = n, m
    if floating is float:
        sgemv(&trans, &m, &n, &alpha, <float *> A, &lda, <float *> x, &incx,
              &beta, y, &incy)
    else:
        dgemv(&trans, &m, &n, &alpha, <double *> A, &lda, <double *> x, &incx,
              &beta, y, &incy)


cdef void _ger(BLAS_Order order, int m, int n, floating alpha, const floating *x, int incx,
               const floating *y, int incy, floating *A, int lda) noexcept nogil:
    """A := alpha * x @ y.T + A, A m x n (a rank-1 update)."""
    if order == RowMajor:
        # column-major A.T (n x m) += alpha * y @ x.T: swap the vectors and the sizes
        if floating is float:
            sger(&n, &m, &alpha, <float *> y, &incy, <float *> x, &incx, A, &lda)
        else:
            dger(&n, &m, &alpha, <double *> y, &incy, <double *> x, &incx, A, &lda)
    else:
        if floating is float:
            sger(&m, &n, &alpha, <float *> x, &incx, <float *> y, &incy, A, &lda)
        else:
            dger(&m, &n, &alpha, <double *> x, &incx, <double *> y, &incy, A, &lda)


cdef void _scal(int n, floating alpha, floating *x, int incx) noexcept nogil:
    """x := alpha * x."""
    if floating is float:
        sscal(&n, &alpha, x, &incx)
    else:
        dscal(&n, &alpha, x, &incx)


cdef void _axpy(int n, floating alpha, const floating *x, int incx,
                floating *y, int incy) noexcept nogil:
    """y := alpha * x + y."""
    if floating is float:
        saxpy(&n, &alpha, <float *> x, &incx, y, &incy)
    else:
        daxpy(&n, &alpha, <double *> x, &incx, y, &incy)


cdef void _copy(int n, const floating *x, int incx, floating *y, int incy) noexcept nogil:
    """y := x."""
    if floating is float:
        scopy(&n, <float *> x, &incx, y, &incy)
    else:
        dcopy(&n, <double *> x, &incx, y, &incy)



# Python-level entry points (tests): C-contiguous (row-major) operands.

def gemv(bint trans, double alpha, const floating[:, ::1] A, const floating[::1] x,
         double beta, floating[::1] y):
    """y := alpha * op(A) @ x + beta * y for a C-contiguous A, in place; op(A) = A.T if trans."""
    cdef int m = A.shape[0], n = A.shape[1]
    if x.shape[0] != (m if trans else n) or y.shape[0] != (n if trans else m):
        raise ValueError("gemv: x and y must match the shape of op(A)")
    if m == 0 or n == 0:
        raise ValueError("gemv: A must not be empty")
    with nogil:
        _gemv(RowMajor, Trans if trans else NoTrans, m, n, <floating> alpha, &A[0, 0], n,
              &x[0], 1, <floating> beta, &y[0], 1)


def ger(double alpha, const floating[::1] x, const floating[::1] y, floating[:, ::1] A):
    """A := alpha * outer(x, y) + A for a C-contiguous A, in place."""
    cdef int m = A.shape[0], n = A.shape[1]
    if x.shape[0] != m or y.shape[0] != n:
        raise ValueError("ger: x and y must have lengths A.shape[0] and A.shape[1]")
    if m == 0 or n == 0:
        raise ValueError("ger: A must not be empty")
    with nogil:
        _ger(RowMajor, m, n, <floating> alpha, &x[0], 1, &y[0], 1, &A[0, 0], n)


def scal(double alpha, floating[::1] x):
    """x := alpha * x, in place."""
    if x.shape[0]:
        with nogil:
            _scal(<int> x.shape[0], <floating> alpha, &x[0], 1)


def axpy(double alpha, const floating[::1] x, floating[::1] y):
    """y := alpha * x + y, in place."""
    if x.shape[0] != y.shape[0]:
        raise ValueError("axpy: x and y must have the same length")
    if x.shape[0]:
        with nogil:
            _axpy(<int> x.shape[0], <floating> alpha, &x[0], 1, &y[0], 1)


def copy(const floating[::1] x, floating[::1] y):
    """y := x, in place."""
    if x.shape[0] != y.shape[0]:
        raise ValueError("copy: x and y must have the same length")
    if x.shape[0]:
        with nogil:
            _copy(<int> x.shape[0], &x[0], 1, &y[0], 1)

