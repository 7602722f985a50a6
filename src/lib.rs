//! ia2shim: split an unmodified x86-64 program into MPK/PKU compartments at
//! load time. This file is a manifest; see `DESIGN.md` for the architecture.
//!
//! # Layers
//!
//! Modules form layers, bottom up. A module imports only from its own layer
//! or below (`layering::tests` reads every `crate::` path under `src/` and
//! fails on an upward one):
//!
//! 1. pure core: `config`, `objects`, `compartments`, `plan`, `privacy`, `maps`, `files`, `stackfmt`, `scan`, `libc_gates`
//! 2. primitives: `lifecycle`, `logging`, `real`, `pku`, `anon`, `spin`, `sealed`, `sigframe`, `tagmap`, `tls`, `apply`, `carveouts`, `libc_data`, `unwinder`
//! 3. runtime core: `runtime`
//! 4. features: `alloc`, `bindnow`, `callbacks`, `cxx`, `deputy`, `dl`, `exit`, `fault`, `gates`, `keyguard`, `report`, `signals`, `syscalls`, `threads`
//! 5. entry points: `startup`, `hooks`
//!
//! The pure core is safe Rust with unit tests and no syscalls beyond reading
//! files; primitives wrap the kernel, libc and the loader (key syscalls, the
//! thread pointer, `dlsym(RTLD_NEXT)`, page tagging, carveout locators); the
//! runtime core holds the state every feature reads; features import the
//! core and each other, never the entry points; `startup` is the only module
//! that calls the features' `install`/`start`/`init`.
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

/// Every exported `extern "C"` entry point (constructor, interposed libc
/// functions, the introspection API).
pub mod hooks;

/// The shim's own anonymous mappings: reservations and guard-paged stacks.
pub mod anon;
/// The init state machine and fail-closed exits (`fatal`, `notice`).
pub mod lifecycle;
/// The real libc functions behind the hooks (`dlsym(RTLD_NEXT)`, resolved once).
pub mod real;
/// The process-wide runtime built at start-up: config, keys, census.
pub mod runtime;
/// The sealed heap: the runtime's configuration and census, on the shim key.
pub mod sealed;
/// A spin lock that a fork child can release (arenas, the sealed heap).
pub mod spin;
/// The constructor's sequence: the pipeline from configuration to threads.
pub mod startup;

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
/// Binding lazy PLT slots at start-up and after `dlopen` (as `LD_BIND_NOW`).
pub mod bindnow;
/// Callbacks that libc, libstdc++ and ld.so run for a compartment (`qsort`,
/// `dl_iterate_phdr`, fork and terminate handlers) run with its rights, never libc's.
pub mod callbacks;
/// One locator per named carveout (pages kept on the shared key 0).
pub mod carveouts;
/// Compartment assignment: which object belongs to which compartment.
pub mod compartments;
/// C++ exceptions: landing pads run with their compartment's exact rights, `std::terminate` with the thrower's.
pub mod cxx;
/// Whose rights a start routine or signal handler runs with (confused deputies).
pub mod deputy;
/// `dlopen`/`dlclose`: counting, assigning, tagging and patching new objects.
pub mod dl;
/// The exit path: `atexit`/`__cxa_atexit` handlers in their compartments.
pub mod exit;
/// SIGSEGV handling and fault reports.
pub mod fault;
/// Reading a file whole without asking its size (`/proc`, the caches).
pub mod files;
/// Call gates (stub pool, gate-frame stacks, unwinding) and GOT patching.
pub mod gates;
/// libc's `pkey_*` API, guarded: no compartment key or tagged page changes hands.
pub mod keyguard;
/// The `libc_data_imports` carveout: system data that application code reads directly.
pub mod libc_data;
/// Strict mode's libc-gate policy and hot list (`IA2_LIBC_GATES`).
pub mod libc_gates;
/// `/proc/self/maps` and `/proc/self/smaps` parsing.
pub mod maps;
/// Census of loaded objects (`dl_iterate_phdr` + dynamic sections).
pub mod objects;
/// PKU probe, key syscalls, RDPKRU/WRPKRU and the simulated backend.
pub mod pku;
/// Pure planning: objects + compartments + carveouts → tagged page ranges.
pub mod plan;
/// Per compartment: private versus shared bytes of static data and TLS, and why.
pub mod privacy;
/// Start-up census and plan reports, and the smaps cross-check.
pub mod report;
/// The WRPKRU/XRSTOR byte-sequence scanner (`IA2_SCAN_WRPKRU`).
pub mod scan;
/// The PKRU a signal frame's XSAVE area hands to `sigreturn`, guarded.
pub mod sigframe;
/// Signal handlers run with their own compartment's PKRU.
pub mod signals;
/// The seccomp filter and SIGSYS handler (`IA2_SYSCALLS`).
pub mod syscalls;
/// Which ranges carry a compartment's key now (every `pku::protect`).
pub mod tagmap;
/// The `pthread_create` trampoline: per-thread PKRU, TLS tags, gate stacks.
pub mod threads;
/// Thread-local-storage geometry: thread pointer, TCB, DTV, module blocks.
pub mod tls;
/// The shim's private copy of libgcc's unwinder, and which copy runs what.
pub mod unwinder;

#[cfg(test)]
mod layering;
