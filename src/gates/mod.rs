//! Call gates and GOT patching (DESIGN.md, "Call gates").
//!
//! # Gates
//!
//! A gate is a stub from a pool written at build time (`global_asm!` below,
//! [`MAX_GATES`] stubs of 16 bytes in `.text`). Stub `i` loads the address
//! of table entry `i` into `r11` and jumps to the variant code that the
//! entry names. An entry holds the target, the variant and the callee's
//! PKRU. The table lives in the shim's `.bss` after a meta page, on the
//! shim key when hardened (`IA2_HARDEN=on`; key 0 otherwise), and is
//! read-only except while the shim writes a new entry. No page is ever
//! writable and executable at once.
//!
//! The variant code (hardware, hardware with a call counter, simulated)
//! keeps every argument register (`rdi rsi rdx rcx r8 r9`, `al`, `xmm0-7`)
//! and the stack arguments at their offsets. It moves the caller's return
//! address to a per-thread gate-frame stack, together with the caller's
//! PKRU and `rbx`, switches PKRU to the callee's, `call`s the target with
//! `rbx` pointing at the frame, then restores the caller's PKRU, `rbx` and
//! return address and returns. The return values (`rax rdx xmm0 xmm1`)
//! pass through untouched. A gate frame is 64 bytes:
//!
//! | offset | contents |
//! |---|---|
//! | 0 | caller's return address |
//! | 8, 16, 24 | `rax`, `rdx`, `rcx` while PKRU is switched (unhardened) |
//! | 32 | caller's PKRU |
//! | 40 | caller's `rbx` |
//!
//! Hardened variants (`pool.rs`, `IA2_HARDEN=on`) park `rax rdx rcx` in
//! the red zone instead of the frame (the frame is written between a WRPKRU
//! that opens the shim key and the one that installs the callee's PKRU),
//! and check on return that `rbx` is a 64-byte slot of the frame region
//! (`frames.rs`): the callee could have changed it. An entry gate's record
//! writes the same frame itself and returns through a variant's return
//! point (`entry.rs`).
//!
//! The frame stack is reserved before it is written and released after it
//! has been read, so a signal handler that crosses a gate in between uses
//! the frames above. Its top lives in the shim's static TLS
//! (`ia2shim_gate_tls`, initial-exec model, a page the plan never tags
//! because it holds a shared module's block). The simulated PKRU of
//! `IA2_PKU=sim` is the next TLS word, so the `sim` variant switches it with
//! plain moves.
//!
//! Because `rbx` holds the frame while the callee runs, the variant code's
//! CFI can say where the caller's return address and `rbx` are
//! (`DW_CFA_expression` on `rbx`), so unwinders, `backtrace(3)` and
//! debuggers walk through gates. The gate's FDE names a personality routine.
//! In the search phase of an exception it adds the caller's rights to the
//! thread's PKRU (the unwinder is about to read the caller's unwind data,
//! whose `DW.ref.*` personality and type-info pointers sit in the caller's
//! tagged .data). `crate::cxx` narrows PKRU back to the thrower's when the
//! search ends (or fails) and gives each landing pad its own compartment's
//! rights, so cleanups in the callee's frames never run with both.
//! In the cleanup phase (exceptions and forced unwinds such as
//! `pthread_exit`) it lands in a pad that restores the caller's exact PKRU,
//! pops the gate frame and resumes unwinding in the caller: a C++ exception
//! thrown in one compartment and caught in another leaves PKRU right.
//!
//! A thread that has no gate-frame stack yet (one not started through the
//! shim's thread trampoline) faults on its first gate's first frame store;
//! [`fixup_fault`], called first thing by the SIGSEGV handler, allocates
//! the stack and resumes. This keeps a null check off the hot path.
//!
//! # Entry gates
//!
//! `entry.rs`: every exported function of a compartment object gets a
//! `jmp` at its entry to a record holding a gate-table entry, a PKRU check
//! and its relocated first instructions, so the function switches to its
//! own compartment however it is reached (function pointers, vtables,
//! `dlsym`, callbacks from libc or another compartment) and pointers to it
//! stay equal. GOT patching below then only serves direct calls
//! (`JUMP_SLOT`: a gate straight to the relocated body, skipping the check)
//! and functions without an entry gate; `GLOB_DAT` slots into entry-gated
//! functions are left alone. `fault_gate.rs` (opt-in, `IA2_GATES=…,fault`)
//! gives functions that no table names (static callbacks) an entry gate on
//! their first protection-key fault on their own compartment's data.
//! `entry_cache.rs` keeps each function's analysis across runs under its
//! object's build-id, so a warm start-up decodes none.
//!
//! # GOT patching
//!
//! At start-up and after each `dlopen`, [`patch_objects`] walks each
//! compartment object's `R_X86_64_JUMP_SLOT` and `R_X86_64_GLOB_DAT`
//! relocations. A slot whose value lies in another compartment's object is
//! pointed at the gate for (target, callee compartment) if the target is a
//! function (`STT_FUNC`, `STT_GNU_IFUNC`, or an untyped symbol in an
//! executable segment); otherwise it is recorded as a cross-compartment data
//! import, which cannot be gated. Lazily bound slots that still point into
//! the importer's own PLT are resolved first with `dlsym`. Read-only pages
//! (RELRO) are made writable with plain `mprotect`, which keeps the page's
//! key, and restored. `DT_FINI` and every `DT_FINI_ARRAY` entry of a
//! compartment object are pointed at gates into its own compartment, so
//! destructors run with their own rights whichever thread calls `exit`.
//!
//! Only the executable and application libraries take part: calls into
//! system objects (libc, ld.so, … even when strict mode puts them in a
//! compartment) keep the caller's rights, and system objects' own slots are
//! not patched or scanned. In strict mode destructors are not gated either
//! (each object's first destructor calls `__cxa_finalize`, whose list is
//! libc-compartment data). Calls from shared code (libc, callbacks through
//! function pointers) into compartments are not gated: they run with the
//! caller's rights, as under IA2's `IA2_IGNORE`. Patching `GLOB_DAT` slots
//! makes `&function` taken in another compartment the gate's address, so
//! function pointers compare unequal across compartments. Relocations other
//! than `JUMP_SLOT` and `GLOB_DAT` (say `R_X86_64_64` in a table of function
//! pointers) are not gated. Lazily bound slots are resolved with
//! `dlsym(RTLD_DEFAULT)`, which ignores symbol versions. `longjmp` out of a
//! gated call leaves the callee's PKRU and a stale gate frame behind (not
//! supported, as in IA2); 21845 leaked frames overflow the gate-frame stack,
//! which is then reported.

use crate::config::{ReportFormat, ScanWrpkru};
use crate::objects::{self, page_down, LoadedObject, ObjectKind, PAGE};
use crate::pku::{self, Backend};
use crate::runtime::{self, Census, Runtime};
use core::cell::UnsafeCell;
use core::ffi::{c_int, c_void, CStr};
use core::fmt::Write as _;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use object::elf;
use std::collections::BTreeMap;
use std::sync::Mutex;

mod entry;
mod entry_cache;
#[cfg(test)]
mod entry_tests;
mod fault_gate;
mod frames;
mod patch;
mod pool;
mod report;
mod table;
#[cfg(test)]
mod tests;
mod unwind;

pub use entry::*;
pub use fault_gate::{fault_driven_entry, FAULT_GATED};
pub use frames::*;
pub use patch::*;
pub use pool::*;
pub use report::*;
pub use table::*;
use unwind::*;

/// Start-up: map the main thread's gate-frame stack, patch every
/// compartment object and scan their code. Called by `startup::init` after
/// the plan is applied, with every key accessible.
pub fn install(rt: &Runtime) {
    {
        let mut st = state();
        if st.installed {
            return;
        }
        st.installed = true;
        st.enabled = rt.config.gates;
        st.got = rt.config.gate_mechanisms.got;
        st.entry = rt.config.gate_mechanisms.entry;
        fault_gate::ENABLED.store(rt.config.gate_mechanisms.fault, Ordering::Relaxed);
    }
    if rt.config.gates && rt.config.harden {
        let key = pku::alloc_key().unwrap_or_else(|e| {
            crate::lifecycle::fatal(format_args!(
                "IA2_HARDEN=on needs a protection key for the shim's own state besides the \
                 compartments' (pkey_alloc: errno {e}); merge compartments or set IA2_HARDEN=off"
            ))
        });
        frames::harden(key);
        HARDEN.store(true, Ordering::Relaxed);
        pku::set_shim_key(key);
        crate::threads::harden(key);
        crate::signals::harden(key);
        crate::tagmap::harden(key);
        crate::runtime::seal_keys(key);
        crate::exit::harden(key);
    }
    if rt.config.gates {
        patch_tls();
        thread_start();
    }
    let census = match rt.census.read() {
        Ok(c) => c,
        Err(e) => e.into_inner(),
    };
    patch_objects(rt, &census, 0..census.objects.len());
    crate::dl::startup_done(&census);
    drop(census);
    if rt.config.gates {
        protect_table(false);
    }
    if rt.config.reports.gates {
        extern "C" {
            fn __cxa_atexit(
                f: extern "C" fn(*mut c_void),
                arg: *mut c_void,
                dso: *mut c_void,
            ) -> c_int;
        }
        // Registered with no DSO handle, so that no `__cxa_finalize` (the
        // shim's own destructor) runs it early; registered before
        // `__libc_start_main` registers `_dl_fini`, so it runs after every
        // object's destructors and counts their gates too.
        // SAFETY: registering a plain function; the handle may be null.
        unsafe {
            __cxa_atexit(
                exit_report_hook,
                core::ptr::null_mut(),
                core::ptr::null_mut(),
            )
        };
    }
}

/// Mark the gates into objects that `dlclose` unmapped.
pub fn forget_range(range: objects::Range) {
    let mut st = state();
    for g in st.gates.iter_mut().filter(|g| range.contains(g.target)) {
        g.dead = true;
    }
    let gone: Vec<usize> = st
        .entry_by_function
        .range(range.start..range.end)
        .map(|(&f, _)| f)
        .collect();
    for f in gone {
        if let Some(i) = st.entry_by_function.remove(&f) {
            st.entries[i].dead = true;
            let body = st.entries[i].body;
            for g in st.gates.iter_mut().filter(|g| g.target == body) {
                g.dead = true;
            }
        }
    }
}
