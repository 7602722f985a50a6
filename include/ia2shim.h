/* ia2shim introspection API, exported by libia2shim.so.
 *
 * The declarations are weak, so a program that uses them links without the
 * shim and runs without it too: test `&ia2_get_compartment != NULL` (or
 * `ia2shim_present()`) before calling. Under LD_PRELOAD=libia2shim.so the
 * dynamic linker binds them to the shim.
 *
 * Compartments are logical numbers 1-15; 0 means "shared" (pkey 0). */
#ifndef IA2SHIM_H
#define IA2SHIM_H

#ifdef __cplusplus
extern "C" {
#endif

/* The compartment the calling thread runs as: 1-15, 0 when its PKRU allows
 * no compartment key or several (e.g. before main), -1 if the shim is off. */
__attribute__((weak)) int ia2_get_compartment(void);

/* The compartment that owns the page holding `addr`: 0 if shared, -1 if the
 * shim is off. */
__attribute__((weak)) int ia2_addr_compartment(const void *addr);

/* The protection key of compartment `c`, or -1 if it does not exist. */
__attribute__((weak)) int ia2_compartment_pkey(int c);

/* The PKRU value that runs as compartment `c` (key 0 plus c's key), or 0. */
__attribute__((weak)) unsigned int ia2_compartment_pkru(int c);

/* Switch the calling thread to compartment `c`; 0 allows every compartment
 * (the state before main). Returns the previous compartment, or -1 if `c`
 * does not exist. A debugging aid that defeats isolation: it is refused
 * (-1, errno EPERM) unless the program runs with IA2_DEBUG_API=1. Normal
 * cross-compartment calls switch through the shim's call gates. */
__attribute__((weak)) int ia2_switch_compartment(int c);

static inline int ia2shim_present(void) { return &ia2_get_compartment != 0; }

#ifdef __cplusplus
}
#endif
#endif
