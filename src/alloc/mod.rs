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
//!   Each block records its allocation site ([`sites`]: the caller and the
//!   gate the thread entered last); sites that `IA2_HEAP_SHARED` names are
//!   served from the shared heap. `realloc` keeps a block's heap and site.
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
pub mod route;
pub mod sites;

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

/// Who serves the malloc family now (set once, by the constructor), on a
/// page of its own that `IA2_HARDEN=on` puts on the shim key: a compartment
/// that switched it from compartment heaps to the shared one would have
/// every compartment's next blocks where it can read them.
#[repr(C, align(4096))]
struct Serve(AtomicU8);
static SERVE_PAGE: Serve = Serve(AtomicU8::new(LIBC));
static SERVE: &AtomicU8 = &SERVE_PAGE.0;

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
            match sites::Policy::resolve(&rt.config.heap_shared, &census.objects) {
                Ok(p) => sites::install(p),
                Err(e) => crate::lifecycle::fatal(format_args!("{e}")),
            }
        }
        let audit = rt.config.on_fault == crate::config::OnFault::Audit;
        if rt.config.reports.heap || audit {
            sites::ACCOUNT.store(true, Ordering::Relaxed);
        }
        if rt.config.reports.heap {
            // SAFETY: a plain function with no argument and no owning DSO.
            unsafe { __cxa_atexit(usage_at_exit, core::ptr::null_mut(), core::ptr::null_mut()) };
        }
    } else if !rt.config.heap_shared.is_empty() {
        log::warn!("IA2_HEAP_SHARED has no effect without IA2_HEAP=compartment");
    }
    let serve = match mode {
        HeapMode::Libc => LIBC,
        HeapMode::Shared => SHARED,
        HeapMode::Compartment => COMPARTMENT,
    };
    SERVE.store(serve, Ordering::Release);
    // Everything that decides which heap serves a call, on the shim key.
    let key = crate::pku::shim_key();
    if key != 0 {
        crate::pku::seal_static(&SERVE_PAGE, key, "heap mode");
        heap::harden(key);
        sites::harden(key);
        route::harden(key);
    }
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

/// After `dlopen` added or `dlclose` removed objects: new routes, and the
/// sites already interned follow them (`IA2_HEAP=compartment`).
pub fn objects_changed(census: &Census) {
    if SERVE.load(Ordering::Acquire) == COMPARTMENT {
        refresh_routes(census);
        sites::reroute();
    }
}

/// The heap and site for an allocation called from `ra`.
#[inline]
fn place(mode: u8, ra: usize) -> (usize, u16) {
    if mode == COMPARTMENT {
        let (site, heap) = sites::lookup(ra, crate::gates::current_gate_caller());
        (heap, site)
    } else {
        (0, 0)
    }
}

/// The end of every allocation from our heaps: count it, set errno on failure.
#[inline]
fn done(p: *mut u8, heap: usize, site: u16) -> *mut c_void {
    if !p.is_null() && sites::ACCOUNT.load(Ordering::Relaxed) {
        count(p as usize, heap, site, true);
    }
    or_enomem(p)
}

#[cold]
fn count(p: usize, heap: usize, site: u16, alloc: bool) {
    if let Ok((size, _)) = heap::usable_size_and_site(p) {
        sites::account(site, heap, size, alloc);
    }
}

/// Before `p` (ours) is freed or moved: uncount it.
#[inline]
fn uncount(p: usize) {
    if sites::ACCOUNT.load(Ordering::Relaxed) {
        if let (Ok((size, site)), Some(heap)) = (heap::usable_size_and_site(p), heap::heap_of(p)) {
            sites::account(site, heap, size, false);
        }
    }
}

extern "C" {
    fn __cxa_atexit(f: extern "C" fn(*mut c_void), arg: *mut c_void, dso: *mut c_void) -> c_int;
}

extern "C" fn usage_at_exit(_: *mut c_void) {
    let json = crate::runtime::get()
        .is_some_and(|r| r.config.report_format == crate::config::ReportFormat::Json);
    // Symbolising reads ld.so's state, which strict mode tags: the shim is
    // trusted, so allow every key meanwhile.
    let hw = crate::pku::backend() == crate::pku::Backend::Hardware;
    let before = crate::pku::read_pkru();
    if hw {
        crate::pku::write_pkru(0);
    }
    write_usage(json, crate::fault::REPORT_FD.load(Ordering::Relaxed));
    if hw {
        crate::pku::write_pkru(before);
    }
}

/// `IA2_REPORT=heap`: each compartment's heap bytes that stayed private
/// (allocated in total, and the most live at once), and its shared sites.
pub fn write_usage(json: bool, fd: c_int) {
    let p = pid();
    for c in 1..16 {
        let (pt, st, pp, sp) = sites::usage(c);
        if pt + st == 0 {
            continue;
        }
        let pct = |a: u64, b: u64| {
            if a + b == 0 {
                100.0
            } else {
                100.0 * a as f64 / (a + b) as f64
            }
        };
        let nshared = sites::all()
            .filter(|(_, s)| {
                s.compartment.load(Ordering::Relaxed) as usize == c
                    && s.flags.load(Ordering::Relaxed) != 0
            })
            .count();
        let mut b = StackBuf::<512>::new();
        if json {
            let _ = writeln!(
                b,
                "{{\"type\":\"heap_usage\",\"pid\":{p},\"compartment\":{c},\"private_total\":{pt},\"shared_total\":{st},\"private_peak\":{pp},\"shared_peak\":{sp},\"shared_sites\":{nshared}}}"
            );
        } else {
            let _ = writeln!(
                b,
                "ia2shim[{p}]: heap: compartment {c}: {:.1}% of its heap bytes stayed private ({pt} of {} allocated); at peak {pp} private and {sp} shared bytes live ({:.1}% private); {nshared} shared site{}",
                pct(pt, st),
                pt + st,
                pct(pp, sp),
                if nshared == 1 { "" } else { "s" }
            );
        }
        b.write_to_fd(fd);
        write_sites(c, json, fd);
    }
}

/// `IA2_REPORT=heap`: compartment `c`'s allocation sites, the biggest first.
fn write_sites(c: usize, json: bool, fd: c_int) {
    let census = crate::runtime::get().and_then(|r| r.census.try_read().ok());
    let objects = census.as_deref().map(|c| c.objects.as_slice());
    let mut printed = 0u64;
    let mut last = u64::MAX;
    // Descending by bytes without sorting (nothing here may allocate).
    loop {
        let next = sites::all()
            .filter(|(_, s)| s.compartment.load(Ordering::Relaxed) as usize == c)
            .filter_map(|(id, _)| sites::counts(id))
            .map(|n| n.bytes.load(Ordering::Relaxed))
            .filter(|&b| b < last && b > 0)
            .max();
        let Some(bytes) = next else { break };
        last = bytes;
        for (id, s) in sites::all().filter(|(id, s)| {
            s.compartment.load(Ordering::Relaxed) as usize == c
                && sites::counts(*id).is_some_and(|n| n.bytes.load(Ordering::Relaxed) == bytes)
        }) {
            printed += 1;
            if printed > 64 {
                return;
            }
            let t = sites::Term {
                ra: s.ra.load(Ordering::Relaxed),
                gate: s.gate.load(Ordering::Relaxed),
                objects,
            };
            let flags = s.flags.load(Ordering::Relaxed);
            let how = match (flags & sites::POLICY != 0, flags & sites::LEARNED != 0) {
                (true, _) => "shared (IA2_HEAP_SHARED)",
                (false, true) => "shared (learned)",
                _ => "private",
            };
            let blocks = sites::counts(id).map_or(0, |n| n.blocks.load(Ordering::Relaxed));
            let mut b = StackBuf::<1024>::new();
            if json {
                let mut term = StackBuf::<512>::new();
                let _ = write!(term, "{t}");
                let _ = writeln!(
                    b,
                    "{{\"type\":\"heap_site\",\"pid\":{},\"compartment\":{c},\"site\":\"{}\",\"bytes\":{bytes},\"blocks\":{blocks},\"heap\":\"{how}\"}}",
                    pid(),
                    json_safe(term.as_str())
                );
            } else {
                let _ = writeln!(
                    b,
                    "ia2shim[{}]:   {how:<26} {bytes:>12} bytes in {blocks:>8} blocks at {t}",
                    pid()
                );
            }
            b.write_to_fd(fd);
        }
    }
}

/// Terms hold no quotes, backslashes or control characters (object names,
/// symbols, hex): JSON needs no escaping beyond refusing them.
fn json_safe(s: &str) -> &str {
    if s.bytes().any(|b| b == b'"' || b == b'\\' || b < 0x20) {
        "?"
    } else {
        s
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
fn aligned(heap: usize, site: u16, align: usize, size: usize) -> *mut c_void {
    if align > MAX_ALIGN {
        set_errno(libc::EINVAL);
        return core::ptr::null_mut();
    }
    let p = heap::alloc(heap, size, align.max(1).next_power_of_two(), false, site);
    done(p, heap, site)
}

/// Count live block `p` again (after a `realloc`).
#[cold]
fn recount(p: usize) {
    if let (Ok((size, site)), Some(heap)) = (heap::usable_size_and_site(p), heap::heap_of(p)) {
        sites::account(site, heap, size, true);
    }
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
    let (h, site) = place(mode, ra);
    done(heap::alloc(h, size, MIN_ALIGN, false, site), h, site)
}

/// # Safety
/// `free(3)`'s contract.
#[inline]
pub unsafe fn free(p: *mut c_void, ra: usize) {
    if p.is_null() {
        return;
    }
    if heap::owns(p as usize) {
        uncount(p as usize);
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
        Some(total) => {
            let (h, site) = place(mode, ra);
            done(heap::alloc(h, total, MIN_ALIGN, true, site), h, site)
        }
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
        uncount(p as usize);
        // SAFETY: the caller gives up p if it moves.
        return match unsafe { heap::realloc(p as usize, size) } {
            Ok(q) if q.is_null() => {
                // p stays as it was.
                if sites::ACCOUNT.load(Ordering::Relaxed) {
                    recount(p as usize);
                }
                or_enomem(q)
            }
            Ok(q) => {
                if sites::ACCOUNT.load(Ordering::Relaxed) {
                    recount(q as usize);
                }
                q.cast()
            }
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
    let (h, site) = place(mode, ra);
    let q = done(heap::alloc(h, size, MIN_ALIGN, false, site), h, site) as *mut u8;
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
    let (h, site) = place(mode, ra);
    aligned(h, site, align, size)
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
    let (h, site) = place(mode, ra);
    aligned(h, site, align, size)
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
    let (h, site) = place(mode, ra);
    // SAFETY: the caller's out pointer.
    unsafe { posix_memalign_in(h, site, out, align, size) }
}

/// # Safety
/// `out` is writable.
unsafe fn posix_memalign_in(
    heap: usize,
    site: u16,
    out: *mut *mut c_void,
    align: usize,
    size: usize,
) -> c_int {
    if !align.is_power_of_two() || align % core::mem::size_of::<usize>() != 0 || align > MAX_ALIGN {
        return libc::EINVAL;
    }
    let p = heap::alloc(heap, size, align, false, site);
    if p.is_null() {
        return libc::ENOMEM;
    }
    if sites::ACCOUNT.load(Ordering::Relaxed) {
        count(p as usize, heap, site, true);
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
    let (h, site) = place(mode, ra);
    aligned(h, site, PAGE, size)
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
        Some(s) => {
            let (h, site) = place(mode, ra);
            aligned(h, site, PAGE, s & !(PAGE - 1))
        }
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
    or_enomem(heap::alloc(0, size, MIN_ALIGN, false, 0))
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
    uncount(p as usize);
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
        Some(total) => or_enomem(heap::alloc(0, total, MIN_ALIGN, true, 0)),
        None => or_enomem(core::ptr::null_mut()),
    }
}

pub fn shared_memalign(align: usize, size: usize) -> *mut c_void {
    aligned(0, 0, align, size)
}

/// # Safety
/// `out` is writable.
pub unsafe fn shared_posix_memalign(out: *mut *mut c_void, align: usize, size: usize) -> c_int {
    // SAFETY: the caller's out pointer.
    unsafe { posix_memalign_in(0, 0, out, align, size) }
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
    let p = heap::alloc(0, n, MIN_ALIGN, false, 0);
    if !p.is_null() {
        // SAFETY: p has n bytes; s has n bytes including the NUL.
        unsafe { core::ptr::copy_nonoverlapping(s.cast::<u8>(), p, n) };
    }
    or_enomem(p).cast()
}

#[cfg(test)]
mod tests;

// ---------------------------------------------------------------- fault reports

/// What a faulting address in a compartment's heap is: the block, its
/// allocation site and gate, and the `IA2_HEAP_SHARED` term that would have
/// put that site's blocks on the shared heap.
pub struct HeapFault {
    /// The heap = the owning compartment.
    pub heap: usize,
    pub block: Option<heap::Block>,
    pub site: Option<&'static sites::Site>,
}

/// `Some` for an address in a compartment heap (heap 1-15). Reads heap
/// memory: call with every key allowed (the fault handler does).
pub fn heap_fault(addr: usize) -> Option<HeapFault> {
    let h = heap::heap_of(addr).filter(|&h| h > 0)?;
    let block = heap::block_at(addr);
    Some(HeapFault {
        heap: h,
        block,
        site: block.and_then(|b| sites::get(b.site)),
    })
}

impl HeapFault {
    /// The site as a policy term.
    pub fn term<'a>(
        &self,
        objects: Option<&'a [crate::objects::LoadedObject]>,
    ) -> Option<sites::Term<'a>> {
        let s = self.site?;
        Some(sites::Term {
            ra: s.ra.load(Ordering::Relaxed),
            gate: s.gate.load(Ordering::Relaxed),
            objects,
        })
    }

    /// The owner line of a report.
    pub fn write_owner<W: Write>(
        &self,
        w: &mut W,
        objects: Option<&[crate::objects::LoadedObject]>,
    ) {
        let _ = write!(
            w,
            "compartment {}'s heap (IA2_HEAP=compartment): ",
            self.heap
        );
        let Some(b) = self.block else {
            let _ = write!(
                w,
                "not inside a live block (freed memory or allocator metadata)"
            );
            return;
        };
        let _ = write!(w, "block {:#x}, {} bytes", b.start, b.size);
        if b.cached {
            let _ = write!(w, " (freed: use after free)");
        }
        let Some(s) = self.site else {
            let _ = write!(w, ", allocation site not recorded");
            return;
        };
        let _ = write!(w, ", allocated at ");
        let ra = s.ra.load(Ordering::Relaxed);
        let _ = sites::write_code(w, ra, true, objects);
        let (gate, gate_ra) = (
            s.gate.load(Ordering::Relaxed),
            s.gate_ra.load(Ordering::Relaxed),
        );
        if gate != 0 {
            let _ = write!(w, " inside ");
            let _ = sites::write_gate(w, gate, objects);
            let _ = write!(w, " (called from ");
            let _ = sites::write_code(w, gate_ra, true, objects);
            let _ = write!(w, ")");
        } else if gate_ra != 0 {
            let _ = write!(w, " inside a gate called from ");
            let _ = sites::write_code(w, gate_ra, true, objects);
        } else {
            let _ = write!(w, " outside any gate");
        }
    }
}
