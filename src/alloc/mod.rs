//! Who serves the malloc family (`IA2_HEAP`), and IA2's shared allocator
//! ABI (`shared_malloc` …), over the heaps of [`heap`].
//!
//! - `libc` (outside strict mode the default): the hooks forward to glibc's
//!   own `__libc_malloc` family, linked directly (no `dlsym`, which itself
//!   allocates), so the cost is one predictable branch.
//! - `shared`: every call is served from the shared heap (pkey 0).
//! - `compartment`: a call from a compartment's code is served from that
//!   compartment's heap, tagged with its key; calls from ld.so, libc and the
//!   other shared objects (and from the shim) from the shared heap. The
//!   caller is the hook's return address, looked up in [`route`].
//!
//! Before the constructor switches, every hook forwards to glibc. `free`,
//! `realloc` and `malloc_usable_size` find the owner of any pointer by
//! address: inside the shim's reservation it is ours, anything else came
//! from glibc (before the switch, or from code that calls glibc directly)
//! and goes back to glibc. `realloc` moves such a block into our heaps.
//!
//! The shim's own Rust allocations also reach these hooks (its `malloc`
//! calls bind to its own export). That is safe because nothing below the
//! hooks allocates: the heaps use syscalls, spin locks and static tables.
//!
//! Misuse is fatal: `shared_free`/`shared_realloc` of a pointer that the
//! shared heap did not hand out, and `free`/`realloc` of a pointer inside
//! the shim's heaps that is not a live allocation, print one report naming
//! the pointer and the caller and end the process with `abort()` (SIGABRT).

pub mod heap;
mod lock;
pub mod route;

use crate::config::HeapMode;
use crate::objects::PAGE;
use crate::real;
use crate::runtime::{Census, Runtime};
use crate::stackfmt::{pid, StackBuf};
use core::ffi::{c_char, c_int, c_void, CStr};
use core::fmt::Write;
use core::sync::atomic::{AtomicU8, Ordering};
use heap::{Bad, MAX_ALIGN, MIN_ALIGN};

const LIBC: u8 = 0;
const SHARED: u8 = 1;
const COMPARTMENT: u8 = 2;

/// Who serves the malloc family now (set once, by the constructor).
static SERVE: AtomicU8 = AtomicU8::new(LIBC);

/// The heap mode in force (`libc` until the constructor has switched).
pub fn serving() -> HeapMode {
    match SERVE.load(Ordering::Relaxed) {
        SHARED => HeapMode::Shared,
        COMPARTMENT => HeapMode::Compartment,
        _ => HeapMode::Libc,
    }
}

/// Early in the constructor: fork handlers and the address-space reservation.
pub fn prepare() {
    heap::register_fork_handlers();
    heap::reserve();
}

/// At the end of the constructor: the compartments' keys, the routes, and
/// the switch to `IA2_HEAP`'s mode. `IA2_PKU=off` keeps glibc's malloc.
pub fn start(rt: &Runtime) {
    for c in 1..16u8 {
        heap::set_key(c as usize, rt.key_of(c));
    }
    let mode = if rt.active() {
        rt.config.heap()
    } else {
        HeapMode::Libc
    };
    if mode == HeapMode::Compartment {
        if let Ok(census) = rt.census.read() {
            refresh_routes(&census);
        }
    }
    let serve = match mode {
        HeapMode::Libc => LIBC,
        HeapMode::Shared => SHARED,
        HeapMode::Compartment => COMPARTMENT,
    };
    SERVE.store(serve, Ordering::Release);
    log::info!(
        "IA2_HEAP: the malloc family is served by {}",
        match mode {
            HeapMode::Libc => "glibc",
            HeapMode::Shared => "the shim's shared heap (pkey 0)",
            HeapMode::Compartment =>
                "each compartment's own heap (calls from shared objects: the shared heap)",
        }
    );
}

/// Rebuild the routing table from the census; the `dlopen` path calls this
/// after it has assigned new objects to compartments.
pub fn refresh_routes(census: &Census) {
    route::install(route::Routes::build(
        &census.objects,
        &census.compartment_of,
    ));
}

#[inline]
fn heap_for(mode: u8, ra: usize) -> usize {
    if mode == COMPARTMENT {
        route::heap_for(ra)
    } else {
        0
    }
}

fn set_errno(e: c_int) {
    // SAFETY: __errno_location always returns the calling thread's errno.
    unsafe { *libc::__errno_location() = e };
}

#[inline]
fn or_enomem(p: *mut u8) -> *mut c_void {
    if p.is_null() {
        set_errno(libc::ENOMEM);
    }
    p.cast()
}

/// Allocate from our heaps with memalign's rules (alignment rounded up to a
/// power of two).
fn aligned(heap: usize, align: usize, size: usize) -> *mut c_void {
    if align > MAX_ALIGN {
        set_errno(libc::EINVAL);
        return core::ptr::null_mut();
    }
    or_enomem(heap::alloc(
        heap,
        size,
        align.max(1).next_power_of_two(),
        false,
    ))
}

// ---------------------------------------------------------------- reports

/// Report a pointer that `func` must not accept, then abort (fail closed).
#[cold]
pub fn bad_pointer(func: &str, p: usize, ra: usize, why: Bad) -> ! {
    let mut b = StackBuf::<1024>::new();
    let _ = write!(b, "ia2shim[{}]: {func}({p:#x}): ", pid());
    let _ = match why {
        Bad::NotOurs => write!(b, "this pointer was not allocated by the shared heap"),
        Bad::NotLive => write!(
            b,
            "not the start of a live allocation in the shim's heaps (double free, interior pointer or corrupted header)"
        ),
    };
    let _ = write!(b, "; called from ");
    write_caller(&mut b, ra);
    let _ = writeln!(b, "; aborting");
    b.write_to_fd(2);
    // SAFETY: abort never returns; the process dies by SIGABRT.
    unsafe { libc::abort() }
}

/// `symbol+0xoff (object)` for a code address, via `dladdr` (no allocation).
pub fn write_caller<W: Write>(w: &mut W, ra: usize) {
    // SAFETY: an all-zero Dl_info is valid.
    let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
    // The return address may lie just past a noreturn call: look up ra - 1.
    // SAFETY: dladdr only reads the loader's tables.
    let found =
        ra != 0 && unsafe { libc::dladdr(ra.wrapping_sub(1) as *const c_void, &mut info) } != 0;
    let cstr = |p: *const c_char| {
        // SAFETY: dladdr returns NUL-terminated strings owned by the loader, or null.
        (!p.is_null()).then(|| unsafe { CStr::from_ptr(p) }.to_str().unwrap_or("?"))
    };
    let object = if found {
        cstr(info.dli_fname).filter(|s| !s.is_empty())
    } else {
        None
    };
    let _ = match (found.then(|| cstr(info.dli_sname)).flatten(), object) {
        (Some(sym), obj) => write!(
            w,
            "{sym}+{:#x} ({})",
            ra.wrapping_sub(info.dli_saddr as usize),
            obj.unwrap_or("main")
        ),
        (None, Some(obj)) => write!(
            w,
            "{ra:#x} ({obj}+{:#x})",
            ra.wrapping_sub(info.dli_fbase as usize)
        ),
        (None, None) => write!(w, "{ra:#x} (no object)"),
    };
}

// ---------------------------------------------------------------- the malloc family

/// # Safety
/// `malloc(3)`'s contract; `ra` is the caller's return address.
#[inline]
pub unsafe fn malloc(size: usize, ra: usize) -> *mut c_void {
    let mode = SERVE.load(Ordering::Relaxed);
    if mode == LIBC {
        // SAFETY: forwarding to glibc.
        return unsafe { real::__libc_malloc(size) };
    }
    or_enomem(heap::alloc(heap_for(mode, ra), size, MIN_ALIGN, false))
}

/// # Safety
/// `free(3)`'s contract.
#[inline]
pub unsafe fn free(p: *mut c_void, ra: usize) {
    if p.is_null() {
        return;
    }
    if heap::owns(p as usize) {
        // SAFETY: the caller gives up p.
        if let Err(e) = unsafe { heap::free(p as usize) } {
            bad_pointer("free", p as usize, ra, e);
        }
    } else {
        // SAFETY: not ours, so glibc's (or invalid, which glibc reports).
        unsafe { real::__libc_free(p) }
    }
}

/// # Safety
/// `calloc(3)`'s contract.
#[inline]
pub unsafe fn calloc(n: usize, size: usize, ra: usize) -> *mut c_void {
    let mode = SERVE.load(Ordering::Relaxed);
    if mode == LIBC {
        // SAFETY: forwarding to glibc.
        return unsafe { real::__libc_calloc(n, size) };
    }
    match n.checked_mul(size) {
        Some(total) => or_enomem(heap::alloc(heap_for(mode, ra), total, MIN_ALIGN, true)),
        None => or_enomem(core::ptr::null_mut()),
    }
}

/// # Safety
/// `realloc(3)`'s contract.
pub unsafe fn realloc(p: *mut c_void, size: usize, ra: usize) -> *mut c_void {
    if p.is_null() {
        // SAFETY: malloc's contract.
        return unsafe { malloc(size, ra) };
    }
    if heap::owns(p as usize) {
        if size == 0 {
            // SAFETY: realloc(p, 0) frees p, as glibc's does.
            unsafe { free(p, ra) };
            return core::ptr::null_mut();
        }
        // SAFETY: the caller gives up p if it moves.
        return match unsafe { heap::realloc(p as usize, size) } {
            Ok(q) => or_enomem(q),
            Err(e) => bad_pointer("realloc", p as usize, ra, e),
        };
    }
    let mode = SERVE.load(Ordering::Relaxed);
    if mode == LIBC {
        // SAFETY: a glibc block, forwarded.
        return unsafe { real::__libc_realloc(p, size) };
    }
    if size == 0 {
        // SAFETY: as above.
        unsafe { real::__libc_free(p) };
        return core::ptr::null_mut();
    }
    // A glibc block from before the switch: move it into our heaps.
    let q = heap::alloc(heap_for(mode, ra), size, MIN_ALIGN, false);
    if q.is_null() {
        return or_enomem(q);
    }
    // SAFETY: p is a live glibc block of at least `old` bytes; q is new.
    unsafe {
        let old = real::malloc_usable_size(p);
        core::ptr::copy_nonoverlapping(p as *const u8, q, old.min(size));
        real::__libc_free(p);
    }
    q.cast()
}

/// # Safety
/// `memalign(3)`'s contract.
pub unsafe fn memalign(align: usize, size: usize, ra: usize) -> *mut c_void {
    let mode = SERVE.load(Ordering::Relaxed);
    if mode == LIBC {
        // SAFETY: forwarding to glibc.
        return unsafe { real::__libc_memalign(align, size) };
    }
    aligned(heap_for(mode, ra), align, size)
}

/// # Safety
/// `aligned_alloc(3)`'s contract.
pub unsafe fn aligned_alloc(align: usize, size: usize, ra: usize) -> *mut c_void {
    let mode = SERVE.load(Ordering::Relaxed);
    if mode == LIBC {
        // SAFETY: forwarding to glibc.
        return unsafe { real::aligned_alloc(align, size) };
    }
    if !align.is_power_of_two() {
        set_errno(libc::EINVAL);
        return core::ptr::null_mut();
    }
    aligned(heap_for(mode, ra), align, size)
}

/// # Safety
/// `posix_memalign(3)`'s contract: `out` is writable.
pub unsafe fn posix_memalign(out: *mut *mut c_void, align: usize, size: usize, ra: usize) -> c_int {
    let mode = SERVE.load(Ordering::Relaxed);
    if mode == LIBC {
        // SAFETY: forwarding to glibc.
        return unsafe { real::posix_memalign(out, align, size) };
    }
    // SAFETY: the caller's out pointer.
    unsafe { posix_memalign_in(heap_for(mode, ra), out, align, size) }
}

/// # Safety
/// `out` is writable.
unsafe fn posix_memalign_in(
    heap: usize,
    out: *mut *mut c_void,
    align: usize,
    size: usize,
) -> c_int {
    if !align.is_power_of_two() || align % core::mem::size_of::<usize>() != 0 || align > MAX_ALIGN {
        return libc::EINVAL;
    }
    let p = heap::alloc(heap, size, align, false);
    if p.is_null() {
        return libc::ENOMEM;
    }
    // SAFETY: the caller's out pointer.
    unsafe { *out = p.cast() };
    0
}

/// # Safety
/// `valloc(3)`'s contract.
pub unsafe fn valloc(size: usize, ra: usize) -> *mut c_void {
    let mode = SERVE.load(Ordering::Relaxed);
    if mode == LIBC {
        // SAFETY: forwarding to glibc.
        return unsafe { real::__libc_valloc(size) };
    }
    aligned(heap_for(mode, ra), PAGE, size)
}

/// # Safety
/// `pvalloc(3)`'s contract.
pub unsafe fn pvalloc(size: usize, ra: usize) -> *mut c_void {
    let mode = SERVE.load(Ordering::Relaxed);
    if mode == LIBC {
        // SAFETY: forwarding to glibc.
        return unsafe { real::__libc_pvalloc(size) };
    }
    match size.max(1).checked_add(PAGE - 1) {
        Some(s) => aligned(heap_for(mode, ra), PAGE, s & !(PAGE - 1)),
        None => or_enomem(core::ptr::null_mut()),
    }
}

/// # Safety
/// `malloc_usable_size(3)`'s contract.
pub unsafe fn malloc_usable_size(p: *mut c_void) -> usize {
    if p.is_null() {
        0
    } else if heap::owns(p as usize) {
        heap::usable_size(p as usize).unwrap_or(0)
    } else {
        // SAFETY: a glibc block, forwarded.
        unsafe { real::malloc_usable_size(p) }
    }
}

// ---------------------------------------------------------------- IA2's shared allocator ABI

pub fn shared_malloc(size: usize) -> *mut c_void {
    or_enomem(heap::alloc(0, size, MIN_ALIGN, false))
}

/// # Safety
/// `free(3)`'s contract, for a pointer from the `shared_*` calls.
pub unsafe fn shared_free(p: *mut c_void, ra: usize) {
    if p.is_null() {
        return;
    }
    if heap::heap_of(p as usize) != Some(0) {
        bad_pointer("shared_free", p as usize, ra, Bad::NotOurs);
    }
    // SAFETY: the caller gives up p.
    if let Err(e) = unsafe { heap::free(p as usize) } {
        bad_pointer("shared_free", p as usize, ra, e);
    }
}

/// # Safety
/// `realloc(3)`'s contract, for a pointer from the `shared_*` calls.
pub unsafe fn shared_realloc(p: *mut c_void, size: usize, ra: usize) -> *mut c_void {
    if p.is_null() {
        return shared_malloc(size);
    }
    if heap::heap_of(p as usize) != Some(0) {
        bad_pointer("shared_realloc", p as usize, ra, Bad::NotOurs);
    }
    if size == 0 {
        // SAFETY: as realloc(p, 0).
        unsafe { shared_free(p, ra) };
        return core::ptr::null_mut();
    }
    // SAFETY: the caller gives up p if it moves.
    match unsafe { heap::realloc(p as usize, size) } {
        Ok(q) => or_enomem(q),
        Err(e) => bad_pointer("shared_realloc", p as usize, ra, e),
    }
}

pub fn shared_calloc(n: usize, size: usize) -> *mut c_void {
    match n.checked_mul(size) {
        Some(total) => or_enomem(heap::alloc(0, total, MIN_ALIGN, true)),
        None => or_enomem(core::ptr::null_mut()),
    }
}

pub fn shared_memalign(align: usize, size: usize) -> *mut c_void {
    aligned(0, align, size)
}

/// # Safety
/// `out` is writable.
pub unsafe fn shared_posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> c_int {
    // SAFETY: the caller's out pointer.
    unsafe { posix_memalign_in(0, out, align, size) }
}

/// # Safety
/// `s` is null or a NUL-terminated string.
pub unsafe fn shared_strdup(s: *const c_char) -> *mut c_char {
    if s.is_null() {
        set_errno(libc::EINVAL);
        return core::ptr::null_mut();
    }
    // SAFETY: the caller's string.
    let n = unsafe { libc::strlen(s) } + 1;
    let p = heap::alloc(0, n, MIN_ALIGN, false);
    if !p.is_null() {
        // SAFETY: p has n bytes; s has n bytes including the NUL.
        unsafe { core::ptr::copy_nonoverlapping(s.cast::<u8>(), p, n) };
    }
    or_enomem(p).cast()
}

#[cfg(test)]
mod tests;
