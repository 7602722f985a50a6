//! Every exported `extern "C"` entry point of `libia2shim.so`: the
//! constructor, the interposed libc functions and the introspection API
//! (`include/ia2shim.h`). Each is a few lines that call the core. Keep
//! `shim.map` in step (a test compares it with `nm -D`).

use crate::real;
use crate::runtime;
use core::ffi::{c_char, c_int, c_uint, c_void};
use core::sync::atomic::{AtomicUsize, Ordering};

// ---------------------------------------------------------------- constructor

#[cfg_attr(test, allow(dead_code))]
extern "C" fn ia2shim_constructor(
    _argc: c_int,
    _argv: *const *const c_char,
    _envp: *const *const c_char,
) {
    crate::startup::init();
}

/// Runs inside ld.so's `_dl_init`, after every initially loaded object has
/// been relocated (so RELRO is final and the census is complete). Left out of
/// unit-test binaries, which are not preloaded programs.
#[cfg(not(test))]
#[used]
#[link_section = ".init_array"]
static CONSTRUCTOR: extern "C" fn(c_int, *const *const c_char, *const *const c_char) =
    ia2shim_constructor;

// ---------------------------------------------------------------- main

type MainFn = unsafe extern "C" fn(c_int, *mut *mut c_char, *mut *mut c_char) -> c_int;
type StartMainFn = unsafe extern "C" fn(
    MainFn,
    c_int,
    *mut *mut c_char,
    *const c_void,
    *const c_void,
    *const c_void,
    *mut c_void,
) -> c_int;

static PROGRAM_MAIN: AtomicUsize = AtomicUsize::new(0);

unsafe extern "C" fn main_in_compartment(
    argc: c_int,
    argv: *mut *mut c_char,
    envp: *mut *mut c_char,
) -> c_int {
    // libc calls main through this wrapper as through a gate: main runs as
    // the main compartment, and returning restores the caller's rights for
    // the exit path (atexit handlers, destructors).
    let caller_pkru = runtime::enter_main_compartment();
    // SAFETY: PROGRAM_MAIN holds the program's `main`, stored below.
    let main: MainFn =
        unsafe { core::mem::transmute::<usize, MainFn>(PROGRAM_MAIN.load(Ordering::Acquire)) };
    // SAFETY: calling the program's main with the arguments libc gave us.
    let status = unsafe { main(argc, argv, envp) };
    runtime::leave_main_compartment(caller_pkru);
    status
}

/// Wraps `main` so that it starts with the main compartment's PKRU, like
/// IA2's `__wrap_main`.
///
/// # Safety
/// Called by the program's `_start` with libc's contract.
#[no_mangle]
pub unsafe extern "C" fn __libc_start_main(
    main: MainFn,
    argc: c_int,
    argv: *mut *mut c_char,
    init: *const c_void,
    fini: *const c_void,
    rtld_fini: *const c_void,
    stack_end: *mut c_void,
) -> c_int {
    // SAFETY: the slot holds glibc's __libc_start_main.
    let real: StartMainFn = unsafe { real::as_fn(&real::LIBC_START_MAIN) };
    let main = if runtime::active().is_some() {
        PROGRAM_MAIN.store(main as usize, Ordering::Release);
        main_in_compartment as MainFn
    } else {
        main
    };
    // SAFETY: forwarding the caller's arguments unchanged (but for main).
    unsafe { real(main, argc, argv, init, fini, rtld_fini, stack_end) }
}

// ---------------------------------------------------------------- signals

type SignalFn = unsafe extern "C" fn(c_int, libc::sighandler_t) -> libc::sighandler_t;

/// SIGSEGV (and SIGTRAP in audit mode) stays with the shim's handler, which
/// chains to the program's.
///
/// # Safety
/// As `sigaction(2)`.
#[no_mangle]
pub unsafe extern "C" fn sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> c_int {
    if crate::fault::intercepts(sig) && runtime::active().is_some() {
        // SAFETY: pointers are the caller's, valid as sigaction(2) requires.
        unsafe { crate::fault::intercept_sigaction(sig, act, old) };
        return 0;
    }
    if crate::signals::wraps(sig) && runtime::active().is_some() {
        // SAFETY: forwarded contract.
        return unsafe { crate::signals::sigaction(sig, act, old) };
    }
    // SAFETY: forwarded contract.
    unsafe { real::sigaction(sig, act, old) }
}

/// `signal(3)` is `sigaction` with BSD semantics; SIGSEGV (and SIGTRAP in
/// audit mode) is recorded, not installed.
///
/// # Safety
/// As `signal(3)`.
#[no_mangle]
pub unsafe extern "C" fn signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    if crate::fault::intercepts(sig) && runtime::active().is_some() {
        // SAFETY: zeroed sigaction is valid.
        let mut act: libc::sigaction = unsafe { core::mem::zeroed() };
        act.sa_sigaction = handler;
        act.sa_flags = libc::SA_RESTART;
        // SAFETY: zeroed sigaction is valid.
        let mut old: libc::sigaction = unsafe { core::mem::zeroed() };
        // SAFETY: both structs are valid.
        unsafe { crate::fault::intercept_sigaction(sig, &act, &mut old) };
        return old.sa_sigaction;
    }
    if crate::signals::wraps(sig) && runtime::active().is_some() {
        // SAFETY: forwarded contract.
        return unsafe { crate::signals::signal(sig, handler) };
    }
    // SAFETY: the slot holds glibc's signal.
    let f: SignalFn = unsafe { real::as_fn(&real::SIGNAL) };
    // SAFETY: forwarded contract.
    unsafe { f(sig, handler) }
}

// ---------------------------------------------------------------- dlopen, dlclose

// `dlopen` passes its return address (the caller's code, whose compartment
// a new application object joins) to the Rust entry point in rdx, like the
// malloc trampolines below. Left out of unit-test binaries.
#[cfg(not(test))]
core::arch::global_asm!(
    ".pushsection .text.dlopen,\"ax\",@progbits",
    ".globl dlopen",
    ".type dlopen,@function",
    ".p2align 4",
    "dlopen:",
    ".cfi_startproc",
    "mov rdx, qword ptr [rsp]",
    "jmp {dlopen}",
    ".cfi_endproc",
    ".size dlopen, .-dlopen",
    ".popsection",
    dlopen = sym hook_dlopen,
);

#[cfg_attr(test, allow(dead_code))]
unsafe extern "C" fn hook_dlopen(file: *const c_char, mode: c_int, ra: usize) -> *mut c_void {
    // SAFETY: dlopen's contract, from the caller.
    unsafe { crate::dl::dlopen(file, mode, ra) }
}

/// `dlclose(3)`: untag, close, re-tag the survivors (see `crate::dl`).
///
/// # Safety
/// As `dlclose(3)`.
#[cfg(not(test))]
#[no_mangle]
pub unsafe extern "C" fn dlclose(handle: *mut c_void) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { crate::dl::dlclose(handle) }
}

// `dlsym(RTLD_NEXT, …)` answers relative to its caller's object, so it
// jumps straight to glibc's `dlsym` with the caller's return address in
// place. Every other handle goes through `hook_dlsym`, which in strict mode
// runs the lookup with the libc compartment's rights added (it walks ld.so's
// link maps and takes its lock).
#[cfg(not(test))]
core::arch::global_asm!(
    ".pushsection .text.dlsym,\"ax\",@progbits",
    ".globl dlsym",
    ".type dlsym,@function",
    ".p2align 4",
    "dlsym:",
    ".cfi_startproc",
    "cmp rdi, -1",
    "jne {hook}",
    "mov rax, qword ptr [rip + {real}]",
    "test rax, rax",
    "jz {hook}",
    "jmp rax",
    ".cfi_endproc",
    ".size dlsym, .-dlsym",
    ".popsection",
    hook = sym hook_dlsym,
    real = sym crate::dl::REAL_DLSYM,
);

#[cfg_attr(test, allow(dead_code))]
unsafe extern "C" fn hook_dlsym(handle: *mut c_void, name: *const c_char) -> *mut c_void {
    // SAFETY: dlsym's contract, from the caller.
    unsafe { crate::dl::dlsym(handle, name) }
}

// ---------------------------------------------------------------- threads and fork

type PthreadCreateFn = unsafe extern "C" fn(
    *mut libc::pthread_t,
    *const libc::pthread_attr_t,
    crate::threads::StartFn,
    *mut c_void,
) -> c_int;

/// New threads start in the compartment of their start routine, with their
/// TLS tagged and a gate-frame stack (see `threads`).
///
/// # Safety
/// As `pthread_create(3)`.
#[no_mangle]
pub unsafe extern "C" fn pthread_create(
    thread: *mut libc::pthread_t,
    attr: *const libc::pthread_attr_t,
    start: crate::threads::StartFn,
    arg: *mut c_void,
) -> c_int {
    // SAFETY: the slot holds glibc's pthread_create.
    let real: PthreadCreateFn = unsafe { real::as_fn(&real::PTHREAD_CREATE) };
    // SAFETY: forwarded contract.
    unsafe { crate::threads::create(real, thread, attr, start, arg) }
}

/// C++ `thread_local` destructors (registered by libstdc++'s
/// `__cxa_thread_atexit`) run in the compartment of their code (see
/// `threads::thread_atexit`).
///
/// # Safety
/// As glibc's `__cxa_thread_atexit_impl`.
#[no_mangle]
pub unsafe extern "C" fn __cxa_thread_atexit_impl(
    dtor: crate::threads::DtorFn,
    obj: *mut c_void,
    dso: *mut c_void,
) -> c_int {
    // SAFETY: the slot holds glibc's __cxa_thread_atexit_impl.
    let real: crate::threads::ThreadAtexitFn =
        unsafe { real::as_fn(&real::CXA_THREAD_ATEXIT_IMPL) };
    // SAFETY: forwarded contract.
    unsafe { crate::threads::thread_atexit(real, dtor, obj, dso) }
}

/// `fork` keeps tags and PKRU; in strict mode glibc's fork runs with the
/// libc compartment's rights added (its locks and lists are libc data).
#[no_mangle]
pub extern "C" fn fork() -> libc::pid_t {
    // SAFETY: the slot holds glibc's fork.
    let real: extern "C" fn() -> libc::pid_t = unsafe { real::as_fn(&real::FORK) };
    runtime::with_libc_rights(|| real())
}

// ---------------------------------------------------------------- introspection API

/// The compartment the calling thread runs as (0: none, -1: shim inactive).
#[no_mangle]
pub extern "C" fn ia2_get_compartment() -> c_int {
    runtime::current_compartment().map_or(-1, c_int::from)
}

/// The compartment that owns `addr` (0: shared, -1: shim inactive).
#[no_mangle]
pub extern "C" fn ia2_addr_compartment(addr: *const c_void) -> c_int {
    runtime::active().map_or(-1, |r| {
        r.page_compartment(addr as usize).map_or(0, c_int::from)
    })
}

/// The protection key of compartment `c` (-1: no such compartment).
#[no_mangle]
pub extern "C" fn ia2_compartment_pkey(c: c_int) -> c_int {
    runtime::key_of_compartment(c).map_or(-1, |k| k as c_int)
}

/// The PKRU value that runs as compartment `c` (0: no such compartment).
#[no_mangle]
pub extern "C" fn ia2_compartment_pkru(c: c_int) -> c_uint {
    runtime::key_of_compartment(c).map_or(0, crate::pku::pkru_allowing)
}

/// Switch the calling thread to compartment `c` (0: back to key 0 only
/// plus every compartment, as before `main`). A debugging and testing aid;
/// returns the previous compartment, or -1 if `c` does not exist.
#[no_mangle]
pub extern "C" fn ia2_switch_compartment(c: c_int) -> c_int {
    runtime::switch_compartment(c)
}

// ---------------------------------------------------------------- the malloc family

// The exported `malloc`, `free`, … and the `shared_*` calls that report
// their caller are these trampolines: each copies its own return address
// (the caller's code address, by which `IA2_HEAP=compartment` routes) into
// the next free argument register and tail-jumps to the Rust entry point
// below, leaving the stack and the arguments as the caller made them. Rust
// has no stable `__builtin_return_address`. Left out of unit-test binaries,
// whose own malloc must stay glibc's.
#[cfg(not(test))]
core::arch::global_asm!(
    ".macro ia2_ra_entry name, reg, target",
    ".pushsection .text.\\name,\"ax\",@progbits",
    ".globl \\name",
    ".type \\name,@function",
    ".p2align 4",
    "\\name:",
    ".cfi_startproc",
    "mov \\reg, qword ptr [rsp]",
    "jmp \\target",
    ".cfi_endproc",
    ".size \\name, .-\\name",
    ".popsection",
    ".endm",
    "ia2_ra_entry malloc, rsi, {malloc}",
    "ia2_ra_entry free, rsi, {free}",
    "ia2_ra_entry calloc, rdx, {calloc}",
    "ia2_ra_entry realloc, rdx, {realloc}",
    "ia2_ra_entry memalign, rdx, {memalign}",
    "ia2_ra_entry aligned_alloc, rdx, {aligned_alloc}",
    "ia2_ra_entry posix_memalign, rcx, {posix_memalign}",
    "ia2_ra_entry valloc, rsi, {valloc}",
    "ia2_ra_entry pvalloc, rsi, {pvalloc}",
    "ia2_ra_entry shared_free, rsi, {shared_free}",
    "ia2_ra_entry shared_realloc, rdx, {shared_realloc}",
    ".purgem ia2_ra_entry",
    malloc = sym hook_malloc,
    free = sym hook_free,
    calloc = sym hook_calloc,
    realloc = sym hook_realloc,
    memalign = sym hook_memalign,
    aligned_alloc = sym hook_aligned_alloc,
    posix_memalign = sym hook_posix_memalign,
    valloc = sym hook_valloc,
    pvalloc = sym hook_pvalloc,
    shared_free = sym hook_shared_free,
    shared_realloc = sym hook_shared_realloc,
);

#[cfg_attr(test, allow(dead_code))]
unsafe extern "C" fn hook_malloc(size: usize, ra: usize) -> *mut c_void {
    // SAFETY: malloc's contract, from the caller.
    unsafe { crate::alloc::malloc(size, ra) }
}

#[cfg_attr(test, allow(dead_code))]
unsafe extern "C" fn hook_free(p: *mut c_void, ra: usize) {
    // SAFETY: free's contract, from the caller.
    unsafe { crate::alloc::free(p, ra) }
}

#[cfg_attr(test, allow(dead_code))]
unsafe extern "C" fn hook_calloc(n: usize, size: usize, ra: usize) -> *mut c_void {
    // SAFETY: calloc's contract, from the caller.
    unsafe { crate::alloc::calloc(n, size, ra) }
}

#[cfg_attr(test, allow(dead_code))]
unsafe extern "C" fn hook_realloc(p: *mut c_void, size: usize, ra: usize) -> *mut c_void {
    // SAFETY: realloc's contract, from the caller.
    unsafe { crate::alloc::realloc(p, size, ra) }
}

#[cfg_attr(test, allow(dead_code))]
unsafe extern "C" fn hook_memalign(align: usize, size: usize, ra: usize) -> *mut c_void {
    // SAFETY: memalign's contract, from the caller.
    unsafe { crate::alloc::memalign(align, size, ra) }
}

#[cfg_attr(test, allow(dead_code))]
unsafe extern "C" fn hook_aligned_alloc(align: usize, size: usize, ra: usize) -> *mut c_void {
    // SAFETY: aligned_alloc's contract, from the caller.
    unsafe { crate::alloc::aligned_alloc(align, size, ra) }
}

#[cfg_attr(test, allow(dead_code))]
unsafe extern "C" fn hook_posix_memalign(
    out: *mut *mut c_void,
    align: usize,
    size: usize,
    ra: usize,
) -> c_int {
    // SAFETY: posix_memalign's contract, from the caller.
    unsafe { crate::alloc::posix_memalign(out, align, size, ra) }
}

#[cfg_attr(test, allow(dead_code))]
unsafe extern "C" fn hook_valloc(size: usize, ra: usize) -> *mut c_void {
    // SAFETY: valloc's contract, from the caller.
    unsafe { crate::alloc::valloc(size, ra) }
}

#[cfg_attr(test, allow(dead_code))]
unsafe extern "C" fn hook_pvalloc(size: usize, ra: usize) -> *mut c_void {
    // SAFETY: pvalloc's contract, from the caller.
    unsafe { crate::alloc::pvalloc(size, ra) }
}

/// `malloc_usable_size(3)`; needs no caller address.
///
/// # Safety
/// `p` is null or a live allocation.
#[cfg(not(test))]
#[no_mangle]
pub unsafe extern "C" fn malloc_usable_size(p: *mut c_void) -> usize {
    // SAFETY: the caller's contract.
    unsafe { crate::alloc::malloc_usable_size(p) }
}

// ---------------------------------------------------------------- IA2's shared allocator ABI (include/ia2_allocator.h)

#[no_mangle]
pub extern "C" fn shared_malloc(size: usize) -> *mut c_void {
    crate::alloc::shared_malloc(size)
}

#[no_mangle]
pub extern "C" fn shared_calloc(n: usize, size: usize) -> *mut c_void {
    crate::alloc::shared_calloc(n, size)
}

#[no_mangle]
pub extern "C" fn shared_memalign(align: usize, size: usize) -> *mut c_void {
    crate::alloc::shared_memalign(align, size)
}

/// # Safety
/// `out` is writable.
#[no_mangle]
pub unsafe extern "C" fn shared_posix_memalign(
    out: *mut *mut c_void,
    align: usize,
    size: usize,
) -> c_int {
    // SAFETY: the caller's out pointer.
    unsafe { crate::alloc::shared_posix_memalign(out, align, size) }
}

/// # Safety
/// `s` is a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn shared_strdup(s: *const c_char) -> *mut c_char {
    // SAFETY: the caller's string.
    unsafe { crate::alloc::shared_strdup(s) }
}

#[cfg_attr(test, allow(dead_code))]
unsafe extern "C" fn hook_shared_free(p: *mut c_void, ra: usize) {
    // SAFETY: free's contract, from the caller.
    unsafe { crate::alloc::shared_free(p, ra) }
}

#[cfg_attr(test, allow(dead_code))]
unsafe extern "C" fn hook_shared_realloc(p: *mut c_void, size: usize, ra: usize) -> *mut c_void {
    // SAFETY: realloc's contract, from the caller.
    unsafe { crate::alloc::shared_realloc(p, size, ra) }
}
