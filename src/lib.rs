//! ia2shim: split an unmodified x86-64 program into MPK/PKU compartments at
//! load time. This file is a manifest; see `DESIGN.md` for the architecture.
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

/// Every exported `extern "C"` entry point (constructor, interposed libc
/// functions, the introspection API).
pub mod hooks;

/// The real libc functions behind the hooks (`dlsym(RTLD_NEXT)`, resolved once).
pub mod real;
/// The init state machine and the process-wide runtime built by the constructor.
pub mod runtime;

/// `IA2_*` configuration: one struct, one table, parsed from `environ`.
pub mod config;
/// Logging through `log`, to stderr or `IA2_LOG_FILE`, without allocating.
pub mod logging;
/// Allocation-free formatting into stack buffers, for fatal paths and signal handlers.
pub mod stackfmt;

/// The malloc family (`IA2_HEAP`) and IA2's shared allocator ABI over the
/// shim's own heaps: shared (pkey 0) and one per compartment.
pub mod alloc;
/// Applying a plan with `pkey_mprotect`, and the registry the fault handler reads.
pub mod apply;
/// One locator per named carveout (pages kept on the shared key 0).
pub mod carveouts;
/// Compartment assignment: which object belongs to which compartment.
pub mod compartments;
/// `dlopen`/`dlclose`: counting, assigning, tagging and patching new objects.
pub mod dl;
/// SIGSEGV handling and fault reports.
pub mod fault;
/// Call gates (stub pool, gate-frame stacks, unwinding) and GOT patching.
pub mod gates;
/// `/proc/self/maps` and `/proc/self/smaps` parsing.
pub mod maps;
/// Census of loaded objects (`dl_iterate_phdr` + dynamic sections).
pub mod objects;
/// PKU probe, key syscalls, RDPKRU/WRPKRU and the simulated backend.
pub mod pku;
/// Pure planning: objects + compartments + carveouts → tagged page ranges.
pub mod plan;
/// Start-up census and plan reports, and the smaps cross-check.
pub mod report;
/// The WRPKRU/XRSTOR byte-sequence scanner (`IA2_SCAN_WRPKRU`).
pub mod scan;
/// Signal handlers run with their own compartment's PKRU.
pub mod signals;
/// The `pthread_create` trampoline: per-thread PKRU, TLS tags, gate stacks.
pub mod threads;
/// Thread-local-storage geometry: thread pointer, TCB, DTV, module blocks.
pub mod tls;
