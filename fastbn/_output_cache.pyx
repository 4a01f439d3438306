"""The output cache (kernels/output_cache.h: a NumPy memory handler whose freed blocks wait
for the next output of a fitting size) as Python calls. fastbn._memory decides which
arrays go through it and holds the public functions."""
cimport numpy as cnp
import numpy as np

cnp.import_array()

cdef extern from "output_cache.h":
    object fastbn_oc_capsule()
    int fastbn_oc_reused(void* data) nogil
    size_t fastbn_oc_empty() nogil
    void fastbn_oc_set_max(size_t max_bytes) nogil
    void fastbn_oc_set_poison(int on) nogil
    void fastbn_oc_place_beside(size_t beside) nogil
    void fastbn_oc_counts(size_t* max_bytes, size_t* held, size_t* blocks,
                          unsigned long long* hits, unsigned long long* misses) nogil

cdef extern from "numpy/arrayobject.h":
    object PyDataMem_SetHandler(object handler)

cdef object _handler = fastbn_oc_capsule()


def empty(shape, dtype, size_t beside=0):
    """(np.empty(shape, dtype) allocated through the cache, whether its block was reused:
    its pages are then mapped already). Its data starts half a page from the page offset
    of the address `beside` (the array the kernel reads while it writes this one). The
    handler is fastbn's for this one allocation only (NumPy keeps it per context: other
    threads and the caller's arrays are not affected)."""
    fastbn_oc_place_beside(beside)
    old = PyDataMem_SetHandler(_handler)
    try:
        a = np.empty(shape, dtype)
    finally:
        PyDataMem_SetHandler(old)
    return a, bool(fastbn_oc_reused(cnp.PyArray_DATA(a)))


def set_max(size_t max_bytes):
    """The most bytes the free blocks may hold; blocks beyond it are given back now."""
    fastbn_oc_set_max(max_bytes)


def release():
    """Give every free block back to the system; returns the bytes given back."""
    return fastbn_oc_empty()


def counts():
    """(max_bytes, bytes held, blocks held, hits, misses)."""
    cdef size_t max_bytes, held, blocks
    cdef unsigned long long hits, misses
    fastbn_oc_counts(&max_bytes, &held, &blocks, &hits, &misses)
    return max_bytes, held, blocks, hits, misses


def set_poison(bint on):
    """For tests: fill every freed block with 0xFF bytes (NaN in every float dtype), so an
    output that is not fully overwritten shows."""
    fastbn_oc_set_poison(on)
