//! The syscall filter (`IA2_SYSCALLS=filter`, the default). Protection keys
//! only govern loads and stores; the kernel acts on memory and keys for any
//! caller: `pkey_mprotect`/`mprotect`/`munmap`/`mremap`/`mmap` with
//! `MAP_FIXED` on another compartment's pages, `pkey_free` of its key,
//! `process_vm_readv`/`ptrace`/`/proc/*/mem` (which ignore PKRU), and
//! `io_uring` (whose operations bypass seccomp). A seccomp-bpf filter
//! installed by the constructor traps these syscalls with SIGSYS when they
//! come from code loaded at start-up ([`bpf`]); the handler decides with the
//! interrupted PKRU (whose keys the caller holds) and the key map
//! (`crate::tagmap`), and carries out the allowed ones from the shim's own
//! syscall instruction ([`raw`]), which the filter lets through. Each
//! `dlopen` stacks one more filter for the new objects' text. Refused
//! calls return `EPERM` (`EACCES` for `/proc/*/mem`) with one warning line.
//! Calls whose caller is the shim (the trapping instruction, or the return
//! address of a libc wrapper, lies in the shim's text) are carried out.
//!
//! A program's own seccomp filters stack on top: the kernel runs them all
//! and the strictest action wins, so a syscall the program's filter denies
//! is still denied when the handler repeats it; SIGSYS from the program's
//! own `SECCOMP_RET_TRAP` rules (their `si_errno` is not ours) goes to the
//! program's SIGSYS handler, which the `sigaction` hook records.
//!
//! A trap while SIGSYS is blocked kills the process (the kernel forces the
//! default action), so the hooks keep SIGSYS out of the masks programs set
//! ([`unblockable`]). `madvise` with advice that may discard data
//! (`MADV_DONTNEED` zeroes private anonymous pages) is trapped too, but glibc
//! calls it with every signal blocked when a thread exits: so libc's
//! `madvise` entry jumps to [`libc_entry`] (`keyguard::install`), which
//! makes the same check without a trap and issues the call from the shim's
//! syscall instruction; so do libc's `mprotect` and `munmap`, which glibc
//! also calls with every signal blocked. Raw syscalls from watched code
//! trap. `posix_spawn`'s open actions, which glibc's child runs with every
//! signal blocked, are done in the parent ([`spawn`]).

mod bpf;
pub mod raw;
pub mod spawn;

use crate::config::Syscalls;
use crate::objects::Range;
use crate::pku;
use crate::runtime::{self, Runtime};
use crate::signals::Chained;
use crate::stackfmt::StackBuf;
use core::ffi::{c_int, c_void};
use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Mutex;

#[link_section = ".ia2shim_sealed"]
static INSTALLED: AtomicBool = AtomicBool::new(false);
#[link_section = ".ia2shim_sealed"]
static SHIM_TEXT: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];
// The program's own SIGSYS disposition (0 = SIG_DFL, 1 = SIG_IGN, else a
// handler) is in the signal table (`signals::chained`, on the shim key once
// hardened).

/// `SYS_SECCOMP`: `si_code` of a seccomp trap.
const SYS_SECCOMP: i32 = 1;
const PROC_SUPER_MAGIC: i64 = 0x9fa0;

/// Text ranges some installed filter already watches.
#[link_section = ".ia2shim_sealed"]
static COVERED: Mutex<Vec<Range>> = Mutex::new(Vec::new());

/// The executable ranges of census objects.
fn census_text(rt: &Runtime) -> Vec<Range> {
    let Ok(c) = rt.census.read() else {
        return Vec::new();
    };
    c.objects
        .iter()
        .flat_map(|o| o.segments.iter())
        .filter(|s| s.executable())
        .map(|s| s.range.pages_out())
        .collect()
}

/// Those of `text` that no filter watches yet. Inside a sealed scope
/// (COVERED is sealed state), which must not take the census lock: a
/// census writer waits for the scope.
fn uncovered(text: Vec<Range>) -> Vec<Range> {
    let covered = COVERED.lock().unwrap_or_else(|e| e.into_inner());
    text.into_iter().filter(|r| !covered.contains(r)).collect()
}

fn to_kernel(ranges: &[Range]) -> Vec<libc::sock_filter> {
    bpf::program(raw::stub_ip(), ranges)
        .iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect()
}

/// Stack one more filter, for every thread; the kernel's errno on failure.
fn load(prog: &[libc::sock_filter]) -> Result<(), i32> {
    let fprog = libc::sock_fprog {
        len: prog.len() as u16,
        filter: prog.as_ptr() as *mut libc::sock_filter,
    };
    // SAFETY: seccomp with a valid program, which the kernel copies.
    let r = unsafe {
        let mut r = libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_TSYNC,
            &fprog,
        );
        if r != 0 {
            r = libc::syscall(libc::SYS_seccomp, libc::SECCOMP_SET_MODE_FILTER, 0, &fprog);
        }
        r
    };
    if r == 0 {
        Ok(())
    } else {
        Err(crate::stackfmt::errno())
    }
}

/// After a `dlopen`: stack a filter that watches the new objects' text
/// (filters cannot be changed, only added; each costs every syscall a few
/// more BPF instructions).
pub fn cover_new_code(rt: &Runtime) {
    if !INSTALLED.load(Ordering::Acquire) {
        return;
    }
    let text = census_text(rt);
    // COVERED (its lock and its blocks) is sealed state.
    crate::sealed::with_sealed(|| cover_new_code_sealed(text));
}

fn cover_new_code_sealed(text: Vec<Range>) {
    let ranges = uncovered(text);
    if ranges.is_empty() {
        return;
    }
    match load(&to_kernel(&ranges)) {
        Ok(()) => COVERED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(&ranges),
        Err(e) => log::warn!(
            "IA2_SYSCALLS=filter: the kernel refused a filter for newly loaded code (errno {e}); its syscalls are not filtered"
        ),
    }
}

/// Install the filter and the SIGSYS handler (the constructor, last).
pub fn install(rt: &Runtime) {
    if rt.config.syscalls == Syscalls::Off {
        return;
    }
    let me = install as *const () as usize;
    if let Ok(c) = rt.census.read() {
        if let Some((_, o)) = c.object_at(me) {
            let text = o.segments.iter().filter(|s| s.executable());
            let lo = text.clone().map(|s| s.range.start).min().unwrap_or(0);
            let hi = text.map(|s| s.range.end).max().unwrap_or(0);
            SHIM_TEXT[0].store(lo, Ordering::Relaxed);
            SHIM_TEXT[1].store(hi, Ordering::Relaxed);
        }
    }
    let text = census_text(rt);
    let ranges = crate::sealed::with_sealed(|| uncovered(text));
    let prog = to_kernel(&ranges);
    // SAFETY: a zeroed sigaction is valid; we set what we rely on.
    let mut sa: libc::sigaction = unsafe { core::mem::zeroed() };
    sa.sa_sigaction = sigsys_handler as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    // SAFETY: installing our handler with a valid struct.
    if unsafe { crate::real::sigaction(libc::SIGSYS, &sa, core::ptr::null_mut()) } != 0 {
        log::warn!(
            "IA2_SYSCALLS=filter: cannot install the SIGSYS handler; syscalls are not filtered"
        );
        return;
    }
    INSTALLED.store(true, Ordering::Release);
    // Unprivileged filters need no_new_privs (exec'd set-uid programs then
    // run without their privileges: IA2_SYSCALLS=off for such programs).
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
    if let Err(e) = load(&prog) {
        INSTALLED.store(false, Ordering::Release);
        log::warn!(
            "IA2_SYSCALLS=filter: the kernel refused the seccomp filter (errno {e}); syscalls are not filtered"
        );
        return;
    }
    crate::sealed::with_sealed(|| {
        COVERED
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .extend_from_slice(&ranges)
    });
    log::info!(
        "IA2_SYSCALLS=filter: {} BPF instructions, {} watched text ranges",
        prog.len(),
        ranges.len()
    );
}

/// Does the shim own `sig`'s handler (SIGSYS once the filter is in)?
pub fn intercepts(sig: c_int) -> bool {
    sig == libc::SIGSYS && INSTALLED.load(Ordering::Acquire)
}

/// The program's `sigaction(SIGSYS, …)`: recorded, not installed.
///
/// # Safety
/// As `sigaction(2)`.
pub unsafe fn intercept_sigaction(act: *const libc::sigaction, old: *mut libc::sigaction) {
    let prev = crate::signals::chained(Chained::Sys);
    if !act.is_null() {
        // SAFETY: the caller's valid sigaction.
        let a = unsafe { &*act };
        crate::signals::set_chained(Chained::Sys, a.sa_sigaction, a.sa_flags);
    }
    if !old.is_null() {
        // SAFETY: a zeroed sigaction is valid; the caller's out pointer.
        unsafe {
            let mut o: libc::sigaction = core::mem::zeroed();
            o.sa_sigaction = prev.0;
            o.sa_flags = prev.1;
            *old = o;
        }
    }
}

/// `set` without SIGSYS while the filter is in: the `sigprocmask`,
/// `pthread_sigmask` and `sigaction` hooks pass this to libc.
pub fn unblockable(set: &libc::sigset_t) -> libc::sigset_t {
    let mut s = *set;
    if INSTALLED.load(Ordering::Acquire) {
        // SAFETY: a valid sigset.
        unsafe { libc::sigdelset(&mut s, libc::SIGSYS) };
    }
    s
}

fn in_shim(addr: usize) -> bool {
    (SHIM_TEXT[0].load(Ordering::Relaxed)..SHIM_TEXT[1].load(Ordering::Relaxed)).contains(&addr)
}

/// Keys (bitmask) that `pkru` may write.
fn held(pkru: u32) -> u32 {
    (0..16)
        .filter(|&k| pku::pkru_allows(pkru, k, true))
        .fold(0, |m, k| m | 1 << k)
}

fn name(nr: i64) -> &'static str {
    match nr {
        2 => "open",
        9 => "mmap",
        10 => "mprotect",
        11 => "munmap",
        25 => "mremap",
        28 => "madvise",
        101 => "ptrace",
        257 => "openat",
        310 => "process_vm_readv",
        311 => "process_vm_writev",
        329 => "pkey_mprotect",
        330 => "pkey_alloc",
        331 => "pkey_free",
        425 => "io_uring_setup",
        437 => "openat2",
        _ => "?",
    }
}

extern "C" fn sigsys_handler(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    // As in the SIGSEGV handler: the kernel entered with key 0 only, but in
    // strict mode the TCB (read for any TLS access) and libc's state carry
    // the libc compartment's key. The shim is trusted: every key. The
    // caller's PKRU comes from the frame, and sigreturn restores it.
    // The hint, not the backend: that is sealed, not readable yet.
    if pku::hardware_hint() {
        // SAFETY: the hint says PKU is on; every key for the trusted shim.
        unsafe { pku::wrpkru(0) };
    }
    // SAFETY: the kernel's siginfo: si_errno at 4, si_code at 8, and for
    // SIGSYS `_syscall` at 24.
    let (data, code, nr) = unsafe {
        let b = info as *const u8;
        (
            *(b.add(4) as *const i32),
            *(b.add(8) as *const i32),
            *(b.add(24) as *const i32),
        )
    };
    if code != SYS_SECCOMP || data != bpf::TRAP_DATA as i32 {
        chain(sig, info, ctx);
        return;
    }
    let uc = ctx as *mut libc::ucontext_t;
    // SAFETY: the kernel's ucontext for this signal.
    let g = unsafe { &mut (*uc).uc_mcontext.gregs };
    let r = |i: c_int| g[i as usize] as usize;
    let args = [
        r(libc::REG_RDI),
        r(libc::REG_RSI),
        r(libc::REG_RDX),
        r(libc::REG_R10),
        r(libc::REG_R8),
        r(libc::REG_R9),
    ];
    let (rip, rsp) = (r(libc::REG_RIP), r(libc::REG_RSP));
    // A libc wrapper is a leaf: its caller's return address is at the top
    // of the stack. (Code that forges it is outside the threat model.)
    let ret = if rsp != 0 && rsp % 8 == 0 {
        // SAFETY: the interrupted thread's stack pointer; stacks are on
        // key 0. A bogus one faults here and kills the process: fail closed.
        unsafe { *(rsp as *const usize) }
    } else {
        0
    };
    let trusted = in_shim(rip) || in_shim(ret);
    // SAFETY: the kernel's ucontext.
    let pkru =
        unsafe { crate::sigframe::Snapshot::take(uc) }.map_or_else(pku::read_pkru, |s| s.pkru());
    let result = decide(nr as i64, args, pkru, trusted, rip, ret);
    g[libc::REG_RAX as usize] = result as i64;
}

/// Refuse with `errno`, saying why.
fn refuse(nr: i64, args: &[usize; 6], rip: usize, ret: usize, errno: i32, why: &str) -> isize {
    let mut b = StackBuf::<512>::new();
    let _ = write!(
        b,
        "{}({:#x}, {:#x}, {:#x}, {:#x}) at {rip:#x} (called from {ret:#x}) refused: {why}",
        name(nr),
        args[0],
        args[1],
        args[2],
        args[3]
    );
    log::warn!("{}", b.as_str());
    -(errno as isize)
}

fn shim_key(key: usize) -> bool {
    let key = key as i32;
    runtime::get().is_some_and(|rt| key > 0 && rt.keys().iter().any(|&k| k != 0 && k as i32 == key))
}

fn decide(nr: i64, args: [usize; 6], pkru: u32, trusted: bool, rip: usize, ret: usize) -> isize {
    let mine = held(pkru);
    // Keys of compartment pages in [a, a+len) that the caller does not hold.
    let foreign = |a: usize, len: usize| crate::tagmap::keys_in(a, len, true) & !mine;
    if !trusted {
        let (a, len) = (args[0], args[1]);
        let why = match nr {
            101 | 310 | 311 => Some("reads or writes memory regardless of protection keys"),
            425 => Some("io_uring operations bypass the syscall filter"),
            331 if shim_key(args[0]) => Some("the key belongs to a compartment"),
            329 if shim_key(args[3]) && mine & (1 << args[3]) == 0 => {
                Some("the key belongs to a compartment the caller is not running as")
            }
            9 | 10 | 11 | 25 | 28 | 329 if foreign(a, len) != 0 => {
                Some("the pages carry the key of a compartment the caller is not running as")
            }
            25 if args[3] & libc::MREMAP_FIXED as usize != 0 && foreign(args[4], args[2]) != 0 => {
                Some("the target pages carry another compartment's key")
            }
            _ => None,
        };
        if let Some(why) = why {
            return refuse(nr, &args, rip, ret, libc::EPERM, why);
        }
    }
    // Carry it out with the caller's rights (its pointers may lie in its
    // compartment's memory), from the shim's syscall instruction.
    let saved = pku::read_pkru();
    pku::write_pkru(pkru);
    // SAFETY: the program's own syscall, with its own arguments.
    let r = unsafe { raw::syscall6(nr, args) };
    pku::write_pkru(saved);
    if r < 0 {
        return r;
    }
    match nr {
        330 if shim_key(r as usize) => crate::lifecycle::fatal(format_args!(
            "pkey_alloc returned key {r}, which belongs to a compartment: it was freed behind the shim's back"
        )),
        2 | 257 | 437 if is_proc_mem(r as c_int) => {
            // SAFETY: closing the descriptor we just opened.
            unsafe { raw::syscall6(libc::SYS_close, [r as usize, 0, 0, 0, 0, 0]) };
            refuse(nr, &args, rip, ret, libc::EACCES, "/proc/*/mem reads and writes regardless of protection keys")
        }
        // The pages are gone or fresh: they no longer carry a key.
        9 | 11 => {
            crate::tagmap::record(args[0], args[1], 0);
            r
        }
        329 if args[3] as i32 != -1 => {
            crate::tagmap::record(args[0], args[1], args[3] as u32);
            r
        }
        _ => r,
    }
}

/// libc's `mprotect`, `munmap` and `madvise` entries jump here (see
/// `keyguard::install`; `madvise` is also the shim's export): the check
/// the SIGSYS handler would make, without a trap, with the caller's
/// current PKRU, and the call from the shim's syscall instruction. glibc
/// makes these calls with every signal blocked (a new thread's stack guard
/// while `timer_create` starts its helper thread, freeing cached stacks
/// and `madvise(MADV_DONTNEED)` at thread exit), where a trap would kill
/// the process. `madvise` advice that keeps the pages' contents, calls
/// from the shim itself (`ret`, the caller's return address) and calls
/// without the filter (`IA2_SYSCALLS=off`) are not checked.
/// Allocation-free; returns the libc convention (-1 and `errno`).
pub fn libc_entry(nr: i64, args: [usize; 6], ret: usize) -> isize {
    let harmless = nr == 28 && bpf::HARMLESS_ADVICE.contains(&(args[2] as u32));
    let trusted = !INSTALLED.load(Ordering::Acquire) || harmless || in_shim(ret);
    let r = decide(nr, args, pku::read_pkru(), trusted, ret, ret);
    if r < 0 {
        runtime::set_errno(-r as c_int);
        return -1;
    }
    r
}

/// Is `fd` a `mem` file of procfs (any process's, any mount)?
fn is_proc_mem(fd: c_int) -> bool {
    // SAFETY: fstatfs fills a plain struct.
    let mut st: libc::statfs = unsafe { core::mem::zeroed() };
    // SAFETY: a valid out pointer.
    if unsafe { libc::fstatfs(fd, &mut st) } != 0 || st.f_type as i64 != PROC_SUPER_MAGIC {
        return false;
    }
    let mut path = StackBuf::<64>::new();
    let _ = write!(path, "/proc/self/fd/{fd}\0");
    let mut link = [0u8; 256];
    // SAFETY: NUL-terminated path, valid buffer.
    let n = unsafe {
        libc::readlink(
            path.as_str().as_ptr() as *const libc::c_char,
            link.as_mut_ptr() as *mut libc::c_char,
            link.len(),
        )
    };
    // Unreadable (no /proc/self): fail closed.
    n < 0 || link[..n as usize].ends_with(b"/mem")
}

/// A SIGSYS that is not ours: the program's handler, or its default (death).
fn chain(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    let (h, flags) = crate::signals::chained(Chained::Sys);
    match h {
        libc::SIG_IGN => {}
        libc::SIG_DFL => {
            // SAFETY: restoring the default and re-raising, as the kernel would.
            unsafe {
                let mut sa: libc::sigaction = core::mem::zeroed();
                sa.sa_sigaction = libc::SIG_DFL;
                crate::real::sigaction(sig, &sa, core::ptr::null_mut());
                let mut set: libc::sigset_t = core::mem::zeroed();
                libc::sigemptyset(&mut set);
                libc::sigaddset(&mut set, sig);
                libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, core::ptr::null_mut());
                libc::raise(sig);
            }
        }
        _ => crate::signals::run_in_compartment(h, flags, sig, info, ctx),
    }
}
