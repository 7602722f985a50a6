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

#[link_section = ".ia2shim_sealed"]
static PROGRAM_MAIN: AtomicUsize = AtomicUsize::new(0);

unsafe extern "C" fn main_in_compartment(
    argc: c_int,
    argv: *mut *mut c_char,
    envp: *mut *mut c_char,
) -> c_int {
    // libc calls main through this wrapper as through a gate: main runs as
    // the main compartment, with no start-up gate frame left behind.
    crate::gates::erase_popped_frames();
    let _caller_pkru = runtime::enter_main_compartment();
    // SAFETY: PROGRAM_MAIN holds the program's `main`, stored below.
    let main: MainFn =
        unsafe { core::mem::transmute::<usize, MainFn>(PROGRAM_MAIN.load(Ordering::Acquire)) };
    // SAFETY: calling the program's main with the arguments libc gave us.
    let status = unsafe { main(argc, argv, envp) };
    // Not back to the caller's all-keys PKRU: the exit path (atexit
    // handlers, destructors) continues with main's rights (see `exit`).
    crate::exit::after_main();
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
        crate::pku::with_shim_writes(|| PROGRAM_MAIN.store(main as usize, Ordering::Release));
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
/// chains to the program's; other handlers run in their compartment.
///
/// # Safety
/// As `sigaction(2)`.
#[no_mangle]
pub unsafe extern "C" fn sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    old: *mut libc::sigaction,
) -> c_int {
    // SIGSYS stays deliverable inside handlers (see `syscalls`), and the
    // deputy rule is decided at registration (see `deputy`).
    let mut copy: libc::sigaction;
    let act = if act.is_null() {
        act
    } else {
        // SAFETY: the caller passes a valid sigaction.
        copy = unsafe { *act };
        copy.sa_mask = crate::syscalls::unblockable(&copy.sa_mask);
        crate::signals::decide(sig, copy.sa_sigaction);
        &copy as *const libc::sigaction
    };
    if crate::syscalls::intercepts(sig) {
        // SAFETY: pointers are the caller's, valid as sigaction(2) requires.
        unsafe { crate::syscalls::intercept_sigaction(act, old) };
        return 0;
    }
    if runtime::active().is_some() {
        // SAFETY: forwarded contract.
        return unsafe { crate::signals::dispatch(sig, act, old) };
    }
    // SAFETY: forwarded contract.
    unsafe { real::sigaction(sig, act, old) }
}

/// The shim's handler-installing function while it is active, else glibc's.
fn signal_via(
    sig: c_int,
    handler: libc::sighandler_t,
    shim: fn(c_int, libc::sighandler_t) -> libc::sighandler_t,
    glibc: &real::RealFn,
) -> libc::sighandler_t {
    crate::signals::decide(sig, handler);
    if crate::syscalls::intercepts(sig) {
        // SAFETY: zeroed sigaction is valid.
        let mut act: libc::sigaction = unsafe { core::mem::zeroed() };
        act.sa_sigaction = handler;
        act.sa_flags = libc::SA_RESTART;
        // SAFETY: zeroed sigaction is valid.
        let mut old: libc::sigaction = unsafe { core::mem::zeroed() };
        // SAFETY: both structs are valid.
        unsafe { crate::syscalls::intercept_sigaction(&act, &mut old) };
        return old.sa_sigaction;
    }
    if runtime::active().is_some() {
        return shim(sig, handler);
    }
    // SAFETY: the slot holds glibc's function of this type.
    let f: SignalFn = unsafe { real::as_fn(glibc) };
    // SAFETY: forwarded contract.
    unsafe { f(sig, handler) }
}

/// `signal(3)`: `sigaction` with BSD semantics.
#[no_mangle]
pub extern "C" fn signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    signal_via(sig, handler, crate::signals::bsd_signal, &real::SIGNAL)
}

/// `bsd_signal(3)`: as `signal`.
#[no_mangle]
pub extern "C" fn bsd_signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    signal_via(sig, handler, crate::signals::bsd_signal, &real::BSD_SIGNAL)
}

/// `ssignal(3)`: as `signal`.
#[no_mangle]
pub extern "C" fn ssignal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    signal_via(sig, handler, crate::signals::bsd_signal, &real::SSIGNAL)
}

/// `sysv_signal(3)`: one-shot, unblocked, not restarting.
#[no_mangle]
pub extern "C" fn sysv_signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    signal_via(
        sig,
        handler,
        crate::signals::sysv_signal,
        &real::SYSV_SIGNAL,
    )
}

/// `__sysv_signal`: what `signal` compiles to under `-std=c99`.
#[no_mangle]
pub extern "C" fn __sysv_signal(sig: c_int, handler: libc::sighandler_t) -> libc::sighandler_t {
    signal_via(
        sig,
        handler,
        crate::signals::sysv_signal,
        &real::SYSV_SIGNAL_INTERNAL,
    )
}

/// `sigset(3)`, `SIG_HOLD` included.
#[no_mangle]
pub extern "C" fn sigset(sig: c_int, disp: libc::sighandler_t) -> libc::sighandler_t {
    signal_via(sig, disp, crate::signals::sigset, &real::SIGSET)
}

/// `sigaltstack(2)`: the kernel keeps the shim's key-0 stack; the
/// program's is kept for its handlers (see `signals`).
///
/// # Safety
/// As `sigaltstack(2)`.
#[no_mangle]
pub unsafe extern "C" fn sigaltstack(ss: *const libc::stack_t, old: *mut libc::stack_t) -> c_int {
    // SAFETY: forwarded contract.
    unsafe { crate::signals::sigaltstack(ss, old) }
}

type SigmaskFn = unsafe extern "C" fn(c_int, *const libc::sigset_t, *mut libc::sigset_t) -> c_int;

/// # Safety
/// `set` is null or valid.
unsafe fn mask_without_sigsys(
    real: &real::RealFn,
    how: c_int,
    set: *const libc::sigset_t,
    old: *mut libc::sigset_t,
) -> c_int {
    // SAFETY: the slot holds glibc's function of this type.
    let f: SigmaskFn = unsafe { real::as_fn(real) };
    if set.is_null() {
        // SAFETY: forwarded contract.
        return unsafe { f(how, set, old) };
    }
    // SAFETY: the caller's valid set.
    let s = crate::syscalls::unblockable(unsafe { &*set });
    // SAFETY: forwarded contract, with our copy of the set.
    unsafe { f(how, &s, old) }
}

/// `sigprocmask(2)`; SIGSYS is never blocked while the syscall filter is
/// in (a trap with SIGSYS blocked would kill the process).
///
/// # Safety
/// As `sigprocmask(2)`.
#[no_mangle]
pub unsafe extern "C" fn sigprocmask(
    how: c_int,
    set: *const libc::sigset_t,
    old: *mut libc::sigset_t,
) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { mask_without_sigsys(&real::SIGPROCMASK, how, set, old) }
}

/// `pthread_sigmask(3)`, as `sigprocmask`.
///
/// # Safety
/// As `pthread_sigmask(3)`.
#[no_mangle]
pub unsafe extern "C" fn pthread_sigmask(
    how: c_int,
    set: *const libc::sigset_t,
    old: *mut libc::sigset_t,
) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { mask_without_sigsys(&real::PTHREAD_SIGMASK, how, set, old) }
}

// ---------------------------------------------------------------- dlopen, dlclose

// `dlopen` passes its return address (the caller's code, whose compartment
// a new application object joins, and whom ld.so must see as the caller)
// to the Rust entry point in rdx, like the malloc trampolines below. With
// the shim off it jumps straight to glibc's. Left out of unit-test binaries.
#[cfg(not(test))]
core::arch::global_asm!(
    ".pushsection .text.dlopen,\"ax\",@progbits",
    ".globl dlopen",
    ".type dlopen,@function",
    ".p2align 4",
    "dlopen:",
    ".cfi_startproc",
    "mov rax, qword ptr [rip + {pass}]",
    "test rax, rax",
    "jz 1f",
    "jmp rax",
    "1:",
    "mov rdx, qword ptr [rsp]",
    "jmp {dlopen}",
    ".cfi_endproc",
    ".size dlopen, .-dlopen",
    ".popsection",
    dlopen = sym hook_dlopen,
    pass = sym crate::dl::PASS_DLOPEN,
);

#[cfg_attr(test, allow(dead_code))]
unsafe extern "C" fn hook_dlopen(file: *const c_char, mode: c_int, ra: usize) -> *mut c_void {
    // SAFETY: dlopen's contract, from the caller.
    let h = unsafe { crate::dl::dlopen(file, mode, ra) };
    if let (false, Some(rt)) = (h.is_null(), runtime::active()) {
        crate::syscalls::cover_new_code(rt);
    }
    h
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

// With the shim off every call jumps straight to glibc's `dlsym`.
// `dlsym(RTLD_NEXT, …)` answers relative to its caller's object (its
// return address), so the stub cannot simply call glibc's `dlsym`. In
// strict mode it adds the loader's rights (`dlsym` takes `dl_load_lock`)
// and calls the real `dlsym` with a return address inside the caller's
// object: a `ret` byte there (found by `dl::dlsym_next_enter`), which
// returns to the stub's pad, which restores the caller's PKRU. Otherwise
// it jumps straight to glibc's `dlsym`. Every other handle goes through
// `hook_dlsym` with the caller's address in rdx: in strict mode it runs the
// lookup with the libc compartment's rights added (it walks ld.so's link
// maps and takes its lock), as called from the caller's object.
#[cfg(not(test))]
core::arch::global_asm!(
    ".pushsection .text.dlsym,\"ax\",@progbits",
    ".globl dlsym",
    ".type dlsym,@function",
    ".p2align 4",
    "dlsym:",
    ".cfi_startproc",
    "mov rax, qword ptr [rip + {pass}]",
    "test rax, rax",
    "jnz 2f",
    "cmp rdi, -1",
    "jne 1f",
    "push rdi",
    "push rsi",
    "sub rsp, 8",
    "mov rdi, qword ptr [rsp + 24]",
    "call {enter}",
    "add rsp, 8",
    "pop rsi",
    "pop rdi",
    "test rax, rax",
    "jz 3f",
    // [rsp]: the gadget (dlsym's return address, in the caller's object);
    // [rsp+8]: the pad (the gadget's ret pops it); [rsp+16]: saved PKRU.
    "sub rsp, 32",
    "mov qword ptr [rsp], rax",
    "lea rax, [rip + 4f]",
    "mov qword ptr [rsp + 8], rax",
    "mov qword ptr [rsp + 16], rdx",
    "mov rax, qword ptr [rip + {real}]",
    "jmp rax",
    "4:",
    "mov qword ptr [rsp + 8], rax",
    "mov rdi, qword ptr [rsp]",
    "sub rsp, 8",
    "call {leave}",
    "add rsp, 8",
    "mov rax, qword ptr [rsp + 8]",
    "add rsp, 16",
    "ret",
    "3:",
    "mov rax, qword ptr [rip + {real}]",
    "test rax, rax",
    "jz 1f",
    "2:",
    "jmp rax",
    "1:",
    "mov rdx, qword ptr [rsp]",
    "jmp {hook}",
    ".cfi_endproc",
    ".size dlsym, .-dlsym",
    ".popsection",
    hook = sym hook_dlsym,
    real = sym crate::real::REAL_DLSYM,
    pass = sym crate::dl::PASS_DLSYM,
    enter = sym crate::dl::dlsym_next_enter,
    leave = sym crate::dl::dlsym_next_leave,
);

#[cfg_attr(test, allow(dead_code))]
unsafe extern "C" fn hook_dlsym(
    handle: *mut c_void,
    name: *const c_char,
    ra: usize,
) -> *mut c_void {
    // SAFETY: dlsym's contract, from the caller.
    unsafe { crate::dl::dlsym(handle, name, ra) }
}

// ---------------------------------------------------------------- the loader's rights, callbacks

/// `dladdr(3)` with the loader's rights added (strict mode).
///
/// # Safety
/// As `dladdr(3)`.
#[cfg(not(test))]
#[no_mangle]
pub unsafe extern "C" fn dladdr(addr: *const c_void, info: *mut libc::Dl_info) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { crate::dl::dladdr(addr, info) }
}

/// `dladdr1(3)` with the loader's rights added (strict mode).
///
/// # Safety
/// As `dladdr1(3)`.
#[cfg(not(test))]
#[no_mangle]
pub unsafe extern "C" fn dladdr1(
    addr: *const c_void,
    info: *mut libc::Dl_info,
    extra: *mut *mut c_void,
    flags: c_int,
) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { crate::dl::dladdr1(addr, info, extra, flags) }
}

/// `dl_iterate_phdr(3)`: the loader's rights for the walk, the callback's
/// own (or the caller's) for each call.
///
/// # Safety
/// As `dl_iterate_phdr(3)`.
#[cfg(not(test))]
#[no_mangle]
pub unsafe extern "C" fn dl_iterate_phdr(cb: usize, data: *mut c_void) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { crate::callbacks::dl_iterate_phdr(cb, data) }
}

/// `qsort(3)`: comparator calls with the comparator's compartment's rights.
///
/// # Safety
/// As `qsort(3)`.
#[no_mangle]
pub unsafe extern "C" fn qsort(base: *mut c_void, n: usize, size: usize, cmp: usize) {
    // SAFETY: the caller's contract.
    unsafe { crate::callbacks::qsort(base, n, size, cmp, None) }
}

/// `qsort_r(3)`, as `qsort`.
///
/// # Safety
/// As `qsort_r(3)`.
#[no_mangle]
pub unsafe extern "C" fn qsort_r(
    base: *mut c_void,
    n: usize,
    size: usize,
    cmp: usize,
    arg: *mut c_void,
) {
    // SAFETY: the caller's contract.
    unsafe { crate::callbacks::qsort(base, n, size, cmp, Some(arg)) }
}

/// `__register_atfork` (what `pthread_atfork` calls): fork handlers run in
/// their compartment.
///
/// # Safety
/// As `pthread_atfork(3)`.
#[cfg(not(test))]
#[no_mangle]
pub unsafe extern "C" fn __register_atfork(
    prepare: usize,
    parent: usize,
    child: usize,
    dso: *mut c_void,
) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { crate::callbacks::register_atfork(prepare, parent, child, dso) }
}

/// `__cxa_atexit` (and so `atexit`, which calls it): the handler runs with
/// its compartment's rights (see `exit`).
///
/// # Safety
/// As `__cxa_atexit`.
#[no_mangle]
pub unsafe extern "C" fn __cxa_atexit(func: usize, arg: *mut c_void, dso: *mut c_void) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { crate::exit::cxa_atexit(func, arg, dso) }
}

/// `__cxa_thread_atexit_impl` (`thread_local` destructors), as `__cxa_atexit`.
///
/// # Safety
/// As `__cxa_thread_atexit_impl`.
#[no_mangle]
pub unsafe extern "C" fn __cxa_thread_atexit_impl(
    func: usize,
    arg: *mut c_void,
    dso: *mut c_void,
) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { crate::exit::cxa_thread_atexit(func, arg, dso) }
}

// ---------------------------------------------------------------- C++ exceptions (see `cxx`)

// `_Unwind_Resume(exc)`: add the libc compartment's key (strict mode), then
// libgcc's, with the stack and the return address as the caller left them
// (the unwinder starts from its caller's frame). Never returns.
#[cfg(not(test))]
core::arch::global_asm!(
    ".pushsection .text._Unwind_Resume,\"ax\",@progbits",
    ".globl _Unwind_Resume",
    ".type _Unwind_Resume,@function",
    ".p2align 4",
    "_Unwind_Resume:",
    ".cfi_startproc",
    "push rdi",
    ".cfi_adjust_cfa_offset 8",
    "call {enter}",
    "pop rdi",
    ".cfi_adjust_cfa_offset -8",
    "jmp rax",
    ".cfi_endproc",
    ".size _Unwind_Resume, .-_Unwind_Resume",
    ".popsection",
    enter = sym crate::cxx::unwind_resume_enter,
);

/// `_Unwind_RaiseException`: returns (no handler) with the thrower's PKRU.
///
/// # Safety
/// As `_Unwind_RaiseException`.
#[cfg(not(test))]
#[no_mangle]
pub unsafe extern "C" fn _Unwind_RaiseException(exc: *mut c_void) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { crate::cxx::raise(exc, false) }
}

/// `_Unwind_Resume_or_Rethrow` (`throw;`), as `_Unwind_RaiseException`.
///
/// # Safety
/// As `_Unwind_Resume_or_Rethrow`.
#[cfg(not(test))]
#[no_mangle]
pub unsafe extern "C" fn _Unwind_Resume_or_Rethrow(exc: *mut c_void) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { crate::cxx::raise(exc, true) }
}

/// libstdc++'s personality routine; landing pads get their compartment's rights.
///
/// # Safety
/// As a personality routine.
#[cfg(not(test))]
#[no_mangle]
pub unsafe extern "C" fn __gxx_personality_v0(
    version: c_int,
    actions: c_int,
    class: u64,
    exc: *mut c_void,
    ctx: *mut c_void,
) -> c_int {
    // SAFETY: the unwinder's contract.
    unsafe { crate::cxx::personality(false, version, actions, class, exc, ctx) }
}

/// libgcc's personality routine for C (`-fexceptions`, `cleanup` attribute).
///
/// # Safety
/// As a personality routine.
#[cfg(not(test))]
#[no_mangle]
pub unsafe extern "C" fn __gcc_personality_v0(
    version: c_int,
    actions: c_int,
    class: u64,
    exc: *mut c_void,
    ctx: *mut c_void,
) -> c_int {
    // SAFETY: the unwinder's contract.
    unsafe { crate::cxx::personality(true, version, actions, class, exc, ctx) }
}

// `__cxa_begin_catch(exc)` with its caller's return address in rsi.
#[cfg(not(test))]
core::arch::global_asm!(
    ".pushsection .text.__cxa_begin_catch,\"ax\",@progbits",
    ".globl __cxa_begin_catch",
    ".type __cxa_begin_catch,@function",
    ".p2align 4",
    "__cxa_begin_catch:",
    ".cfi_startproc",
    "mov rsi, qword ptr [rsp]",
    "jmp {hook}",
    ".cfi_endproc",
    ".size __cxa_begin_catch, .-__cxa_begin_catch",
    ".popsection",
    hook = sym hook_begin_catch,
);

#[cfg_attr(test, allow(dead_code))]
unsafe extern "C" fn hook_begin_catch(exc: *mut c_void, ra: usize) -> *mut c_void {
    // SAFETY: __cxa_begin_catch's contract, from the caller.
    unsafe { crate::cxx::begin_catch(exc, ra) }
}

/// `std::set_terminate`: the handler runs with its compartment's rights
/// (see `callbacks`).
///
/// # Safety
/// As `std::set_terminate`.
#[cfg(not(test))]
#[export_name = "_ZSt13set_terminatePFvvE"]
pub unsafe extern "C" fn set_terminate(h: usize) -> usize {
    // SAFETY: the caller's contract.
    unsafe { crate::callbacks::set_cxx_handler(crate::callbacks::CxxHandler::Terminate, h) }
}

/// `std::set_unexpected`, as `std::set_terminate`.
///
/// # Safety
/// As `std::set_unexpected`.
#[cfg(not(test))]
#[export_name = "_ZSt14set_unexpectedPFvvE"]
pub unsafe extern "C" fn set_unexpected(h: usize) -> usize {
    // SAFETY: the caller's contract.
    unsafe { crate::callbacks::set_cxx_handler(crate::callbacks::CxxHandler::Unexpected, h) }
}

// `std::get_terminate()` and `std::get_unexpected()` with their caller's
// return address in rdi: application code sees the handler it registered.
#[cfg(not(test))]
core::arch::global_asm!(
    ".pushsection .text._ZSt13get_terminatev,\"ax\",@progbits",
    ".globl _ZSt13get_terminatev",
    ".type _ZSt13get_terminatev,@function",
    ".p2align 4",
    "_ZSt13get_terminatev:",
    ".cfi_startproc",
    "mov rdi, qword ptr [rsp]",
    "jmp {terminate}",
    ".cfi_endproc",
    ".size _ZSt13get_terminatev, .-_ZSt13get_terminatev",
    ".globl _ZSt14get_unexpectedv",
    ".type _ZSt14get_unexpectedv,@function",
    ".p2align 4",
    "_ZSt14get_unexpectedv:",
    ".cfi_startproc",
    "mov rdi, qword ptr [rsp]",
    "jmp {unexpected}",
    ".cfi_endproc",
    ".size _ZSt14get_unexpectedv, .-_ZSt14get_unexpectedv",
    ".popsection",
    terminate = sym hook_get_terminate,
    unexpected = sym hook_get_unexpected,
);

#[cfg(not(test))]
unsafe extern "C" fn hook_get_terminate(ra: usize) -> usize {
    // SAFETY: std::get_terminate's contract, from the caller.
    unsafe { crate::callbacks::get_cxx_handler(crate::callbacks::CxxHandler::Terminate, ra) }
}

#[cfg(not(test))]
unsafe extern "C" fn hook_get_unexpected(ra: usize) -> usize {
    // SAFETY: std::get_unexpected's contract, from the caller.
    unsafe { crate::callbacks::get_cxx_handler(crate::callbacks::CxxHandler::Unexpected, ra) }
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

/// `timer_create(2)`: a `SIGEV_THREAD` notification runs through the shim's
/// thread start (see `threads::wrap_sigevent`).
///
/// # Safety
/// As `timer_create(2)`.
#[no_mangle]
pub unsafe extern "C" fn timer_create(
    clock: libc::clockid_t,
    sev: *const crate::threads::SigEvent,
    timer: *mut libc::timer_t,
) -> c_int {
    type F = unsafe extern "C" fn(
        libc::clockid_t,
        *const crate::threads::SigEvent,
        *mut libc::timer_t,
    ) -> c_int;
    // SAFETY: the slot holds glibc's timer_create.
    let real: F = unsafe { real::as_fn(&real::TIMER_CREATE) };
    // SAFETY: the caller's sigevent (null or valid).
    let wrapped = unsafe { crate::threads::wrap_sigevent(sev) };
    let sev = wrapped.as_ref().map_or(sev, |w| w as *const _);
    // SAFETY: forwarded contract, with our copy of the sigevent if wrapped.
    unsafe { real(clock, sev, timer) }
}

/// `mq_notify(3)`: as `timer_create`.
///
/// # Safety
/// As `mq_notify(3)`.
#[no_mangle]
pub unsafe extern "C" fn mq_notify(mq: libc::mqd_t, sev: *const crate::threads::SigEvent) -> c_int {
    type F = unsafe extern "C" fn(libc::mqd_t, *const crate::threads::SigEvent) -> c_int;
    // SAFETY: the slot holds glibc's mq_notify.
    let real: F = unsafe { real::as_fn(&real::MQ_NOTIFY) };
    // SAFETY: the caller's sigevent (null or valid).
    let wrapped = unsafe { crate::threads::wrap_sigevent(sev) };
    let sev = wrapped.as_ref().map_or(sev, |w| w as *const _);
    // SAFETY: forwarded contract, with our copy of the sigevent if wrapped.
    unsafe { real(mq, sev) }
}

/// `aio_read(3)` and friends: a `SIGEV_THREAD` completion notification
/// runs through the shim's thread start (see `threads::wrap_aiocb`).
macro_rules! aio_hook {
    ($name:ident, $real:ident) => {
        /// As the glibc function of this name; see `aio_hook`.
        ///
        /// # Safety
        /// As the glibc function.
        #[no_mangle]
        pub unsafe extern "C" fn $name(cb: *mut libc::aiocb) -> c_int {
            // SAFETY: the caller's aiocb (null or valid).
            unsafe { crate::threads::wrap_aiocb(cb) };
            type F = unsafe extern "C" fn(*mut libc::aiocb) -> c_int;
            // SAFETY: the slot holds glibc's function of this type.
            let real: F = unsafe { real::as_fn(&real::$real) };
            // SAFETY: forwarded contract.
            unsafe { real(cb) }
        }
    };
}
aio_hook!(aio_read, AIO_READ);
aio_hook!(aio_read64, AIO_READ64);
aio_hook!(aio_write, AIO_WRITE);
aio_hook!(aio_write64, AIO_WRITE64);

macro_rules! aio_fsync_hook {
    ($name:ident, $real:ident) => {
        /// `aio_fsync(3)`: as `aio_read`.
        ///
        /// # Safety
        /// As `aio_fsync(3)`.
        #[no_mangle]
        pub unsafe extern "C" fn $name(op: c_int, cb: *mut libc::aiocb) -> c_int {
            // SAFETY: the caller's aiocb (null or valid).
            unsafe { crate::threads::wrap_aiocb(cb) };
            type F = unsafe extern "C" fn(c_int, *mut libc::aiocb) -> c_int;
            // SAFETY: the slot holds glibc's function of this type.
            let real: F = unsafe { real::as_fn(&real::$real) };
            // SAFETY: forwarded contract.
            unsafe { real(op, cb) }
        }
    };
}
aio_fsync_hook!(aio_fsync, AIO_FSYNC);
aio_fsync_hook!(aio_fsync64, AIO_FSYNC64);

macro_rules! lio_hook {
    ($name:ident, $real:ident) => {
        /// `lio_listio(3)`: each request's notification and the list's.
        ///
        /// # Safety
        /// As `lio_listio(3)`.
        #[no_mangle]
        pub unsafe extern "C" fn $name(
            mode: c_int,
            list: *const *mut libc::aiocb,
            n: c_int,
            sev: *const crate::threads::SigEvent,
        ) -> c_int {
            for i in 0..n.max(0) as usize {
                // SAFETY: the caller's array of n aiocb pointers (null allowed).
                unsafe { crate::threads::wrap_aiocb(*list.add(i)) };
            }
            // SAFETY: the caller's sigevent (null or valid).
            let wrapped = unsafe { crate::threads::wrap_sigevent(sev) };
            let sev = wrapped.as_ref().map_or(sev, |w| w as *const _);
            type F = unsafe extern "C" fn(
                c_int,
                *const *mut libc::aiocb,
                c_int,
                *const crate::threads::SigEvent,
            ) -> c_int;
            // SAFETY: the slot holds glibc's function of this type.
            let real: F = unsafe { real::as_fn(&real::$real) };
            // SAFETY: forwarded contract, with our copy of the sigevent if wrapped.
            unsafe { real(mode, list, n, sev) }
        }
    };
}
lio_hook!(lio_listio, LIO_LISTIO);
lio_hook!(lio_listio64, LIO_LISTIO64);

/// `getaddrinfo_a(3)`: as `timer_create`.
///
/// # Safety
/// As `getaddrinfo_a(3)`.
#[no_mangle]
pub unsafe extern "C" fn getaddrinfo_a(
    mode: c_int,
    list: *mut *mut c_void,
    n: c_int,
    sev: *const crate::threads::SigEvent,
) -> c_int {
    type F = unsafe extern "C" fn(
        c_int,
        *mut *mut c_void,
        c_int,
        *const crate::threads::SigEvent,
    ) -> c_int;
    // SAFETY: the slot holds glibc's getaddrinfo_a.
    let real: F = unsafe { real::as_fn(&real::GETADDRINFO_A) };
    // SAFETY: the caller's sigevent (null or valid).
    let wrapped = unsafe { crate::threads::wrap_sigevent(sev) };
    let sev = wrapped.as_ref().map_or(sev, |w| w as *const _);
    // SAFETY: forwarded contract, with our copy of the sigevent if wrapped.
    unsafe { real(mode, list, n, sev) }
}

/// C11 `thrd_create`: glibc's calls its internal `pthread_create`, past the
/// hook above, so it goes through the same thread start here (compartment,
/// TLS tags, gate-frame stack). The `int` start routine is called as
/// glibc calls it (as a `void *` routine), and errors map as glibc's do.
///
/// # Safety
/// As `thrd_create(3)`.
#[no_mangle]
pub unsafe extern "C" fn thrd_create(
    thr: *mut libc::pthread_t,
    func: unsafe extern "C" fn(*mut c_void) -> c_int,
    arg: *mut c_void,
) -> c_int {
    const THRD_SUCCESS: c_int = 0;
    const THRD_ERROR: c_int = 2;
    const THRD_NOMEM: c_int = 3;
    // SAFETY: the slot holds glibc's pthread_create.
    let real: PthreadCreateFn = unsafe { real::as_fn(&real::PTHREAD_CREATE) };
    // SAFETY: glibc makes the same cast; the thread's `int` result is read
    // back by thrd_join from the low half of the `void *`.
    let start = unsafe {
        core::mem::transmute::<unsafe extern "C" fn(*mut c_void) -> c_int, crate::threads::StartFn>(
            func,
        )
    };
    // SAFETY: forwarded contract.
    match unsafe { crate::threads::create(real, thr, core::ptr::null(), start, arg) } {
        0 => THRD_SUCCESS,
        libc::ENOMEM => THRD_NOMEM,
        _ => THRD_ERROR,
    }
}

/// `pthread_cleanup_push` in C: the shim makes the buffer land through a
/// pad that restores the registration's PKRU and gate frames (see
/// `gates::cancel_register`).
///
/// # Safety
/// `buf` is a `__pthread_unwind_buf_t` with a fresh `sigsetjmp` buffer.
#[no_mangle]
pub unsafe extern "C" fn __pthread_register_cancel(buf: *mut c_void) {
    if runtime::active().is_some() {
        // SAFETY: the caller's buffer.
        unsafe { crate::gates::cancel_register(buf) };
    }
    // SAFETY: the slot holds glibc's function of this type.
    let f: unsafe extern "C" fn(*mut c_void) = unsafe { real::as_fn(&real::REGISTER_CANCEL) };
    // SAFETY: forwarded contract.
    unsafe { f(buf) }
}

/// `pthread_cleanup_pop` in C.
///
/// # Safety
/// `buf` is the buffer registered with `__pthread_register_cancel`.
#[no_mangle]
pub unsafe extern "C" fn __pthread_unregister_cancel(buf: *mut c_void) {
    // SAFETY: the slot holds glibc's function of this type.
    let f: unsafe extern "C" fn(*mut c_void) = unsafe { real::as_fn(&real::UNREGISTER_CANCEL) };
    // SAFETY: forwarded contract.
    unsafe { f(buf) };
    if runtime::active().is_some() {
        // SAFETY: the caller's buffer.
        unsafe { crate::gates::cancel_unregister(buf) };
    }
}

/// `fork` keeps tags and PKRU; in strict mode glibc's fork runs with the
/// libc compartment's rights added (its locks and lists are libc data).
#[no_mangle]
pub extern "C" fn fork() -> libc::pid_t {
    // SAFETY: the slot holds glibc's fork.
    let real: extern "C" fn() -> libc::pid_t = unsafe { real::as_fn(&real::FORK) };
    runtime::with_libc_rights(|| real())
}

/// `posix_spawn(3)`: under the syscall filter, file actions that open
/// files are opened in the parent (see `syscalls::spawn`).
///
/// # Safety
/// As `posix_spawn(3)`.
#[no_mangle]
pub unsafe extern "C" fn posix_spawn(
    pid: *mut libc::pid_t,
    path: *const c_char,
    fa: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut c_char,
    envp: *const *mut c_char,
) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { crate::syscalls::spawn::spawn(false, pid, path, fa, attr, argv, envp) }
}

/// `posix_spawnp(3)`, as `posix_spawn`.
///
/// # Safety
/// As `posix_spawnp(3)`.
#[no_mangle]
pub unsafe extern "C" fn posix_spawnp(
    pid: *mut libc::pid_t,
    file: *const c_char,
    fa: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut c_char,
    envp: *const *mut c_char,
) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { crate::syscalls::spawn::spawn(true, pid, file, fa, attr, argv, envp) }
}

// ---------------------------------------------------------------- libc's protection-key API

/// `pkey_set(3)`, refused for compartment keys (see `keyguard`).
#[no_mangle]
pub extern "C" fn pkey_set(key: c_int, rights: c_uint) -> c_int {
    crate::keyguard::pkey_set(key, rights)
}

/// `pkey_get(3)`.
#[no_mangle]
pub extern "C" fn pkey_get(key: c_int) -> c_int {
    crate::keyguard::pkey_get(key)
}

/// `pkey_alloc(2)`.
#[no_mangle]
pub extern "C" fn pkey_alloc(flags: c_uint, rights: c_uint) -> c_int {
    crate::keyguard::pkey_alloc(flags, rights)
}

// `madvise(addr, len, advice)` (exported; libc's entry jumps here too) and
// libc's `mprotect(addr, len, prot)` and `munmap(addr, len)` entries, with
// the caller's return address as the next argument (the shim's own calls
// are not checked). See `syscalls::libc_entry`.
#[cfg(not(test))]
core::arch::global_asm!(
    ".pushsection .text.madvise,\"ax\",@progbits",
    ".globl madvise",
    ".type madvise,@function",
    ".p2align 4",
    "madvise:",
    ".cfi_startproc",
    "mov rcx, qword ptr [rsp]",
    "jmp {madvise}",
    ".cfi_endproc",
    ".size madvise, .-madvise",
    ".p2align 4",
    ".globl ia2shim_libc_mprotect",
    ".hidden ia2shim_libc_mprotect",
    ".type ia2shim_libc_mprotect,@function",
    "ia2shim_libc_mprotect:",
    ".cfi_startproc",
    "mov rcx, qword ptr [rsp]",
    "jmp {mprotect}",
    ".cfi_endproc",
    ".size ia2shim_libc_mprotect, .-ia2shim_libc_mprotect",
    ".p2align 4",
    ".globl ia2shim_libc_munmap",
    ".hidden ia2shim_libc_munmap",
    ".type ia2shim_libc_munmap,@function",
    "ia2shim_libc_munmap:",
    ".cfi_startproc",
    "mov rdx, qword ptr [rsp]",
    "jmp {munmap}",
    ".cfi_endproc",
    ".size ia2shim_libc_munmap, .-ia2shim_libc_munmap",
    ".popsection",
    madvise = sym hook_madvise,
    mprotect = sym hook_mprotect,
    munmap = sym hook_munmap,
);

#[cfg_attr(test, allow(dead_code))]
extern "C" fn hook_madvise(addr: usize, len: usize, advice: c_int, ret: usize) -> c_int {
    crate::syscalls::libc_entry(28, [addr, len, advice as usize, 0, 0, 0], ret) as c_int
}

#[cfg_attr(test, allow(dead_code))]
extern "C" fn hook_mprotect(addr: usize, len: usize, prot: c_int, ret: usize) -> c_int {
    crate::syscalls::libc_entry(10, [addr, len, prot as usize, 0, 0, 0], ret) as c_int
}

#[cfg_attr(test, allow(dead_code))]
extern "C" fn hook_munmap(addr: usize, len: usize, ret: usize) -> c_int {
    crate::syscalls::libc_entry(11, [addr, len, 0, 0, 0, 0], ret) as c_int
}

/// Where libc's `madvise`, `mprotect` and `munmap` entries jump.
pub fn libc_entries() -> [usize; 3] {
    #[cfg(not(test))]
    {
        extern "C" {
            fn madvise();
            fn ia2shim_libc_mprotect();
            fn ia2shim_libc_munmap();
        }
        [
            madvise as *const () as usize,
            ia2shim_libc_mprotect as *const () as usize,
            ia2shim_libc_munmap as *const () as usize,
        ]
    }
    #[cfg(test)]
    [0; 3]
}

/// `pkey_free(2)`, refused for compartment keys.
#[no_mangle]
pub extern "C" fn pkey_free(key: c_int) -> c_int {
    crate::keyguard::pkey_free(key)
}

/// `pkey_mprotect(2)`, refused with compartment keys or on tagged pages.
///
/// # Safety
/// As `pkey_mprotect(2)`.
#[no_mangle]
pub unsafe extern "C" fn pkey_mprotect(
    addr: *mut c_void,
    len: usize,
    prot: c_int,
    key: c_int,
) -> c_int {
    // SAFETY: the caller's contract.
    unsafe { crate::keyguard::pkey_mprotect(addr, len, prot, key) }
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
    runtime::key_of_compartment(c).map_or(0, crate::pku::compartment_pkru)
}

/// Switch the calling thread to compartment `c` (0: every compartment, as
/// before `main`). A debugging aid that defeats isolation, so refused (-1,
/// `EPERM`) unless `IA2_DEBUG_API=1`; returns the previous compartment, or
/// -1 if `c` does not exist.
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
