/* fastbn's output cache: a NumPy memory handler (NEP 49) through which fastbn allocates
   its own large outputs. When NumPy frees such an array, its block waits in a bounded
   cache, its pages still mapped, for the next output of a fitting size: the kernel then
   writes into memory the operating system does not have to fault in and zero again.

   Each block is one anonymous mapping: a 64-byte head (its sizes) at its start, then the
   array's data, 64-byte aligned, at the page offset the caller asked for (fastbn asks for
   half a page away from the input the kernel reads beside it: loads and stores 4 KiB
   apart by a few bytes falsely depend on each other in the CPU's store buffer), with the
   head's address just before it. The cache is a short list of free blocks, oldest first,
   guarded by a lock: NumPy frees arrays from any thread. */
#ifndef FASTBN_OUTPUT_CACHE_H
#define FASTBN_OUTPUT_CACHE_H

#include <Python.h>
#include <pythread.h>
#include <stdint.h>
#include <string.h>
#include <numpy/arrayobject.h>
#ifdef _WIN32
#include <malloc.h>
#else
#include <sys/mman.h>
#include <unistd.h>
#endif

#define FASTBN_OC_HEAD 64         /* the head's bytes; the data starts at least this far in */
#define FASTBN_OC_SLOTS 64          /* free blocks held at most */
#define FASTBN_OC_HUGE (4u << 20)   /* blocks from this size ask for huge pages, as NumPy's */

typedef struct {
    size_t raw;     /* bytes mapped, head included */
    size_t size;    /* data bytes its array asked for */
    size_t offset;  /* where the data starts (bytes from the head) */
    int reused;     /* taken from the cache: its pages are mapped */
} fastbn_oc_head;

/* The page offset (64..4096) the next allocation of this thread puts its data at */
#if defined(_MSC_VER)
static __declspec(thread) size_t fastbn_oc_next_offset = FASTBN_OC_HEAD;
#else
static __thread size_t fastbn_oc_next_offset = FASTBN_OC_HEAD;
#endif

typedef struct {
    PyThread_type_lock lock;
    size_t max_bytes;               /* the most the free blocks may hold together */
    size_t held;                    /* bytes the free blocks hold */
    size_t n;
    fastbn_oc_head* free[FASTBN_OC_SLOTS];    /* oldest first */
    unsigned long long hits, misses;
    int poison;                     /* fill freed blocks with 0xFF bytes (NaN): for tests */
} fastbn_oc_state;

static fastbn_oc_state fastbn_oc;

static fastbn_oc_head* fastbn_oc_head_of(void* data) {
    fastbn_oc_head* h;
    memcpy(&h, (char*)data - sizeof(h), sizeof(h));
    return h;
}

/* The block's data for an array of `size` bytes at the thread's offset, with the head's
   address stored just before it. */
static void* fastbn_oc_data(fastbn_oc_head* h, size_t size, size_t offset) {
    char* d = (char*)h + offset;
    h->size = size;
    h->offset = offset;
    memcpy(d - sizeof(h), &h, sizeof(h));
    return d;
}

static size_t fastbn_oc_page(void) {
#ifdef _WIN32
    return 4096;
#else
    long p = sysconf(_SC_PAGESIZE);
    return p > 0 ? (size_t)p : 4096;
#endif
}

/* A new block of at least `need` bytes (its pages not yet touched), or NULL. */
static fastbn_oc_head* fastbn_oc_map(size_t need) {
    size_t page = fastbn_oc_page(), raw;
    void* p;
    fastbn_oc_head* h;
    if (need > SIZE_MAX - page)
        return NULL;
    raw = (need + page - 1) / page * page;
#ifdef _WIN32
    p = _aligned_malloc(raw, 64);
    if (p == NULL)
        return NULL;
#else
    p = mmap(NULL, raw, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
#ifdef MADV_HUGEPAGE
    if (raw >= FASTBN_OC_HUGE)
        madvise(p, raw, MADV_HUGEPAGE);
#endif
#endif
    h = (fastbn_oc_head*)p;
    h->raw = raw;
    h->reused = 0;
    return h;
}

static void fastbn_oc_unmap(fastbn_oc_head* h) {
#ifdef _WIN32
    _aligned_free(h);
#else
    munmap(h, h->raw);
#endif
}

/* Unmap every free block; returns the bytes given back. */
static size_t fastbn_oc_empty(void) {
    fastbn_oc_head* out[FASTBN_OC_SLOTS];
    size_t n, i, bytes;
    PyThread_acquire_lock(fastbn_oc.lock, WAIT_LOCK);
    n = fastbn_oc.n;
    bytes = fastbn_oc.held;
    memcpy(out, fastbn_oc.free, n * sizeof(out[0]));
    fastbn_oc.n = 0;
    fastbn_oc.held = 0;
    PyThread_release_lock(fastbn_oc.lock);
    for (i = 0; i < n; i++)
        fastbn_oc_unmap(out[i]);
    return bytes;
}

/* The data of `size` bytes at this thread's offset: in the smallest free block that holds
   it without wasting more than a quarter of it, else in a new one; NULL if memory is
   short even after the cache is given back. */
static void* fastbn_oc_take(size_t size) {
    fastbn_oc_head* h = NULL;
    size_t i, best = (size_t)-1, offset = fastbn_oc_next_offset, need;
    if (size > SIZE_MAX - offset)
        return NULL;
    need = size + offset;
    PyThread_acquire_lock(fastbn_oc.lock, WAIT_LOCK);
    for (i = 0; i < fastbn_oc.n; i++) {
        size_t raw = fastbn_oc.free[i]->raw;
        if (raw >= need && raw - need <= need / 4 + fastbn_oc_page() &&
                (best == (size_t)-1 || raw < fastbn_oc.free[best]->raw))
            best = i;
    }
    if (best != (size_t)-1) {
        h = fastbn_oc.free[best];
        memmove(fastbn_oc.free + best, fastbn_oc.free + best + 1,
                (fastbn_oc.n - best - 1) * sizeof(h));
        fastbn_oc.n--;
        fastbn_oc.held -= h->raw;
        fastbn_oc.hits++;
        h->reused = 1;
    } else {
        fastbn_oc.misses++;
    }
    PyThread_release_lock(fastbn_oc.lock);
    if (h == NULL) {
        h = fastbn_oc_map(need);
        if (h == NULL && fastbn_oc_empty() > 0)     /* give the cache back and try again */
            h = fastbn_oc_map(need);
        if (h == NULL)
            return NULL;
    }
    return fastbn_oc_data(h, size, offset);
}

/* A freed block into the cache, the oldest blocks out to make room (or straight back to
   the system when it is larger than the cache may hold). */
static void fastbn_oc_give(fastbn_oc_head* h) {
    fastbn_oc_head* out[FASTBN_OC_SLOTS];
    size_t n = 0, i;
    if (fastbn_oc.poison)       /* every byte an array of this block may see */
        memset((char*)h + FASTBN_OC_HEAD, 0xFF, h->raw - FASTBN_OC_HEAD);
    PyThread_acquire_lock(fastbn_oc.lock, WAIT_LOCK);
    if (h->raw > fastbn_oc.max_bytes) {
        out[n++] = h;
    } else {
        while (fastbn_oc.n > 0 && (fastbn_oc.held + h->raw > fastbn_oc.max_bytes ||
                                   fastbn_oc.n == FASTBN_OC_SLOTS)) {
            out[n] = fastbn_oc.free[0];
            fastbn_oc.held -= out[n]->raw;
            n++;
            fastbn_oc.n--;
            memmove(fastbn_oc.free, fastbn_oc.free + 1, fastbn_oc.n * sizeof(h));
        }
        fastbn_oc.free[fastbn_oc.n++] = h;
        fastbn_oc.held += h->raw;
    }
    PyThread_release_lock(fastbn_oc.lock);
    for (i = 0; i < n; i++)
        fastbn_oc_unmap(out[i]);
}

/* The cap; the blocks that no longer fit go back to the system. */
static void fastbn_oc_set_max(size_t max_bytes) {
    fastbn_oc_head* out[FASTBN_OC_SLOTS];
    size_t n = 0, i;
    PyThread_acquire_lock(fastbn_oc.lock, WAIT_LOCK);
    fastbn_oc.max_bytes = max_bytes;
    while (fastbn_oc.n > 0 && fastbn_oc.held > max_bytes) {
        out[n] = fastbn_oc.free[0];
        fastbn_oc.held -= out[n]->raw;
        n++;
        fastbn_oc.n--;
        memmove(fastbn_oc.free, fastbn_oc.free + 1, fastbn_oc.n * sizeof(out[0]));
    }
    PyThread_release_lock(fastbn_oc.lock);
    for (i = 0; i < n; i++)
        fastbn_oc_unmap(out[i]);
}

/* The four functions of the handler (ctx unused: there is one cache) */
static void* fastbn_oc_malloc(void* ctx, size_t size) {
    (void)ctx;
    return fastbn_oc_take(size);
}

static void* fastbn_oc_calloc(void* ctx, size_t nelem, size_t elsize) {
    void* d;
    size_t size;
    (void)ctx;
    if (elsize != 0 && nelem > SIZE_MAX / elsize)
        return NULL;
    size = nelem * elsize;
    d = fastbn_oc_take(size);
    if (d != NULL && fastbn_oc_head_of(d)->reused)   /* a new mapping reads as zeros */
        memset(d, 0, size);
    return d;
}

static void fastbn_oc_free(void* ctx, void* ptr, size_t size) {
    (void)ctx;
    (void)size;
    if (ptr != NULL)
        fastbn_oc_give(fastbn_oc_head_of(ptr));
}

static void* fastbn_oc_realloc(void* ctx, void* ptr, size_t size) {
    fastbn_oc_head* h;
    void* q;
    size_t cap;
    if (ptr == NULL)
        return fastbn_oc_malloc(ctx, size);
    h = fastbn_oc_head_of(ptr);
    cap = h->raw - h->offset;
    if (size <= cap && size >= cap / 2) {          /* a shrunk array keeps at most twice */
        h->size = size;
        return ptr;
    }
    q = fastbn_oc_malloc(ctx, size);
    if (q == NULL)
        return NULL;
    memcpy(q, ptr, h->size < size ? h->size : size);
    fastbn_oc_free(ctx, ptr, h->size);
    return q;
}

static PyDataMem_Handler fastbn_oc_handler = {
    "fastbn_output_cache",
    1,
    {NULL, fastbn_oc_malloc, fastbn_oc_calloc, fastbn_oc_realloc, fastbn_oc_free}
};

/* Set up once, at import: the lock, and the handler as a capsule for NumPy; NULL with a
   Python error set on failure. */
static PyObject* fastbn_oc_capsule(void) {
    if (fastbn_oc.lock == NULL) {
        fastbn_oc.lock = PyThread_allocate_lock();
        if (fastbn_oc.lock == NULL)
            return PyErr_NoMemory();
    }
    return PyCapsule_New(&fastbn_oc_handler, "mem_handler", NULL);
}

/* Whether an array's data, allocated through the handler, came from the cache. */
static int fastbn_oc_reused(void* data) {
    return fastbn_oc_head_of(data)->reused;
}

static void fastbn_oc_counts(size_t* max_bytes, size_t* held, size_t* blocks,
                             unsigned long long* hits, unsigned long long* misses) {
    PyThread_acquire_lock(fastbn_oc.lock, WAIT_LOCK);
    *max_bytes = fastbn_oc.max_bytes;
    *held = fastbn_oc.held;
    *blocks = fastbn_oc.n;
    *hits = fastbn_oc.hits;
    *misses = fastbn_oc.misses;
    PyThread_release_lock(fastbn_oc.lock);
}

static void fastbn_oc_set_poison(int on) {
    fastbn_oc.poison = on;
}

/* The next allocations of this thread start their data half a page from `beside`'s page
   offset (64-byte aligned, at least FASTBN_OC_HEAD into the block). */
static void fastbn_oc_place_beside(size_t beside) {
    size_t page = 4096, t = (beside + page / 2) % page / 64 * 64;
    fastbn_oc_next_offset = t < FASTBN_OC_HEAD ? t + page : t;
}

#endif
