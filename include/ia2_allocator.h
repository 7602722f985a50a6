/* IA2's shared allocator ABI (the declarations of IA2's ia2_allocator.h),
 * served by libia2shim.so from its shared heap: memory on protection key 0,
 * readable and writable from every compartment, whatever IA2_HEAP says.
 *
 * Linking: the declarations are weak, so a program written against IA2's
 * API compiles and links with only `-I include` and no library; under
 * LD_PRELOAD=libia2shim.so the dynamic linker binds the calls to the shim.
 * Without the shim the functions are NULL: test `ia2_allocator_present()`
 * before calling one. To link directly against libia2shim.so instead,
 * define IA2_ALLOCATOR_STRONG before including this header.
 *
 * Semantics: as malloc(3) and friends, with these guarantees:
 *  - thread-safe; every result is aligned to at least 16 bytes;
 *  - shared_memalign accepts any alignment up to 1 GiB (page and larger
 *    included) and rounds one that is not a power of two up to the next;
 *  - shared_calloc returns NULL with errno ENOMEM when nmemb * size
 *    overflows; shared_realloc(NULL, n) is shared_malloc(n), and
 *    shared_realloc(p, 0) frees p and returns NULL; shared_free(NULL) does
 *    nothing;
 *  - shared_free or shared_realloc of a pointer that the shared heap did not
 *    hand out (a malloc'd, static or stack pointer, an interior pointer, a
 *    double free) prints one report on stderr naming the pointer and the
 *    caller, and ends the process with abort() (SIGABRT, exit status 134).
 *
 * free() and realloc() also accept pointers from these functions. */
#pragma once
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

#ifdef IA2_ALLOCATOR_STRONG
#define IA2_ALLOCATOR_API __attribute__((visibility("default")))
#else
#define IA2_ALLOCATOR_API __attribute__((visibility("default"), weak))
#endif

IA2_ALLOCATOR_API void *shared_malloc(size_t bytes);
IA2_ALLOCATOR_API void shared_free(void *ptr);
IA2_ALLOCATOR_API void *shared_realloc(void *ptr, size_t size);
IA2_ALLOCATOR_API void *shared_calloc(size_t num, size_t size);
IA2_ALLOCATOR_API void *shared_memalign(size_t align, size_t size);
IA2_ALLOCATOR_API int shared_posix_memalign(void **res, size_t align, size_t size);
IA2_ALLOCATOR_API char *shared_strdup(const char *str);

/* Nonzero when the shared allocator is there (the shim is preloaded). */
#ifdef IA2_ALLOCATOR_STRONG
static inline int ia2_allocator_present(void) { return 1; }
#else
static inline int ia2_allocator_present(void) { return &shared_malloc != 0; }
#endif

#ifdef __cplusplus
}
#endif
