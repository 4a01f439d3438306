# Thin fused-type (float/double) nogil wrappers over scipy.linalg.cython_blas.
#
# BLAS is column-major; a C-contiguous (row-major) m x n matrix is the column-major
# n x m matrix of its transpose, so RowMajor calls swap the dimensions (and the
# operands of ger) and flip the transpose flag before calling Fortran BLAS.
from cython cimport floating

cdef enum BLAS_Order:
    RowMajor
    ColMajor

cdef enum BLAS_Trans:
    NoTrans = 110   # ord('n')
    Trans = 116     # ord('t')

cdef void _gemv(BLAS_Order order, BLAS_Trans ta, int m, int n, floating alpha,
                const floating *A, int lda, const floating *x, int incx,
                floating beta, floating *y, int incy) noexcept nogil

cdef void _ger(BLAS_Order order, int m, int n, floating alpha, const floating *x, int incx,
               const floating *y, int incy, floating *A, int lda) noexcept nogil

cdef void _scal(int n, floating alpha, floating *x, int incx) noexcept nogil

cdef void _axpy(int n, floating alpha, const floating *x, int incx,
                floating *y, int incy) noexcept nogil

cdef void _copy(int n, const floating *x, int incx, floating *y, int incy) noexcept nogil
