//! libc's protection-key API, guarded. glibc exports `pkey_set` (a WRPKRU in
//! shared code, which the WRPKRU scanner does not look at), `pkey_free` and
//! `pkey_mprotect`: with them any compartment could give itself another
//! compartment's key, free a compartment's key and allocate it again (the
//! kernel grants the allocating thread access), or move another
//! compartment's pages to a key it holds. The shim exports the same names;
//! a call that touches a key the shim allocated, or pages the plan tagged,
//! is refused with `EPERM` and one warning line. Calls about the program's
//! own keys go to libc. The shim's own key operations use raw syscalls
//! (`crate::pku`), never these. The same calls made as raw syscalls are the
//! syscall filter's business (`crate::syscalls`).

use crate::objects::Range;
use crate::pku;
use crate::real::{self, RealFn};
use crate::runtime::{self, Runtime};
use core::ffi::{c_int, c_uint, c_void};

/// Is `key` one of the shim's compartment keys, its own key (`IA2_HARDEN`),
/// or key 0 (which every compartment shares and none may give up)?
fn shim_key(rt: &Runtime, key: c_int) -> bool {
    key == 0
        || (key > 0 && rt.keys().iter().any(|&k| k != 0 && k as c_int == key))
        || (key > 0 && key as u32 == crate::pku::shim_key())
}

/// Does `[addr, addr+len)` overlap pages that carry a compartment's key?
pub fn overlaps_tagged(addr: usize, len: usize) -> bool {
    crate::tagmap::other_key_in(addr, len, 0, true).is_some()
}

fn refuse(what: core::fmt::Arguments<'_>) -> c_int {
    log::warn!("{what} refused: the key or the pages belong to a compartment");
    runtime::set_errno(libc::EPERM);
    -1
}

/// # Safety
/// `f` must have type `F`.
unsafe fn real_fn<F: Copy>(f: &RealFn) -> F {
    // SAFETY: forwarded contract.
    unsafe { real::as_fn(f) }
}

/// `pkey_set(3)`: refused for the shim's keys and key 0. Done here, as
/// glibc does it, rather than in libc, whose entry `install` redirects here.
pub fn pkey_set(key: c_int, rights: c_uint) -> c_int {
    let Some(rt) = runtime::active() else {
        // SAFETY: glibc's pkey_set has this type (not redirected: the shim is inactive).
        let f: extern "C" fn(c_int, c_uint) -> c_int = unsafe { real_fn(&real::PKEY_SET) };
        return f(key, rights);
    };
    if shim_key(rt, key) {
        return refuse(format_args!("pkey_set({key}, {rights})"));
    }
    if !(0..16).contains(&key) || rights > 3 {
        runtime::set_errno(libc::EINVAL);
        return -1;
    }
    let shift = 2 * key as u32;
    let pkru = (pku::read_pkru() & !(3 << shift)) | rights << shift;
    pku::write_pkru(pkru);
    0
}

/// `pkey_get(3)`: only reads the thread's PKRU; forwarded.
pub fn pkey_get(key: c_int) -> c_int {
    // SAFETY: glibc's pkey_get has this type.
    let f: extern "C" fn(c_int) -> c_int = unsafe { real_fn(&real::PKEY_GET) };
    f(key)
}

/// `pkey_alloc(2)`: forwarded. Getting back a key the shim holds means
/// someone freed it behind the shim's back (a raw syscall): the calling
/// thread now holds that compartment's rights, so the process dies.
pub fn pkey_alloc(flags: c_uint, rights: c_uint) -> c_int {
    // SAFETY: glibc's pkey_alloc has this type.
    let f: extern "C" fn(c_uint, c_uint) -> c_int = unsafe { real_fn(&real::PKEY_ALLOC) };
    let k = f(flags, rights);
    if let Some(rt) = runtime::active() {
        if k > 0 && shim_key(rt, k) {
            crate::lifecycle::fatal(format_args!(
                "pkey_alloc returned key {k}, which belongs to a compartment: it was freed behind the shim's back"
            ));
        }
    }
    k
}

/// `pkey_free(2)`: refused for the shim's keys and key 0.
pub fn pkey_free(key: c_int) -> c_int {
    if let Some(rt) = runtime::active() {
        if shim_key(rt, key) {
            return refuse(format_args!("pkey_free({key})"));
        }
    }
    // SAFETY: glibc's pkey_free has this type.
    let f: extern "C" fn(c_int) -> c_int = unsafe { real_fn(&real::PKEY_FREE) };
    f(key)
}

/// `pkey_mprotect(2)`: refused with one of the shim's keys, or on pages the
/// plan tagged.
///
/// # Safety
/// As `pkey_mprotect(2)`.
pub unsafe fn pkey_mprotect(addr: *mut c_void, len: usize, prot: c_int, key: c_int) -> c_int {
    if let Some(rt) = runtime::active() {
        if (key != -1 && shim_key(rt, key) && key != 0) || overlaps_tagged(addr as usize, len) {
            return refuse(format_args!(
                "pkey_mprotect({addr:p}, {len:#x}, {prot:#x}, {key})"
            ));
        }
    }
    // SAFETY: glibc's pkey_mprotect has this type.
    let f: unsafe extern "C" fn(*mut c_void, usize, c_int, c_int) -> c_int =
        unsafe { real_fn(&real::PKEY_MPROTECT) };
    // SAFETY: forwarded contract.
    unsafe { f(addr, len, prot, key) }
}

/// `jmp qword ptr [rip+0]` followed by the 8-byte target: 14 bytes.
const JMP_ABS: [u8; 6] = [0xff, 0x25, 0, 0, 0, 0];

/// Make libc's own `pkey_set` entry jump to the shim's, so that a
/// compartment that finds libc's by address (`dlvsym(…, "GLIBC_2.27")`,
/// `dlsym(RTLD_NEXT, …)`, walking the link maps) still meets the guard.
/// Its body keeps a WRPKRU that code jumping past the entry can reach: that
/// is an attacker with arbitrary control flow, outside the threat model.
/// libc's `madvise`, `mprotect` and `munmap` entries likewise jump to the
/// shim's (`crate::syscalls::libc_entry`), so that glibc's own calls, some
/// made with every signal blocked, are checked without a trap; a jump
/// past an entry reaches a syscall instruction that the filter traps.
/// Called by the constructor before the syscall filter exists.
pub fn install(pkey_set_ours: usize, [madvise, mprotect, munmap]: [usize; 3]) {
    // Called before the state is Ready: ask the runtime itself.
    let Some(rt) = runtime::get().filter(|r| r.active()) else {
        return;
    };
    let jumps: Vec<(usize, usize, &str)> = [
        (&real::PKEY_SET, pkey_set_ours, "pkey_set"),
        (&real::MADVISE, madvise, "madvise"),
        (&real::MPROTECT, mprotect, "mprotect"),
        (&real::MUNMAP, munmap, "munmap"),
    ]
    .into_iter()
    .map(|(real, ours, name)| (real.get(), ours, name))
    .filter(|&(entry, ours, _)| entry != ours && entry != 0 && ours != 0)
    .collect();
    // The pages holding an entry's first 14 bytes (the jump and its target).
    let pages = |entry: usize| Range::new(entry, entry + JMP_ABS.len() + 8).pages_out();
    // One write window over the pages of all four entries when they lie in
    // one executable segment (libc's text): two `mprotect`s instead of
    // eight, and no other mapping's protection changes.
    let window = jumps
        .iter()
        .map(|&(e, ..)| pages(e))
        .reduce(|a, b| Range::new(a.start.min(b.start), a.end.max(b.end)));
    let one_segment = window.is_some_and(|w| {
        let census = rt.census.read().unwrap_or_else(|e| e.into_inner());
        census.object_at(w.start).is_some_and(|(_, o)| {
            o.segments.iter().any(|s| {
                s.executable() && s.range.start <= w.start && w.end <= s.range.pages_out().end
            })
        })
    });
    match window {
        Some(w) if one_segment => write_jumps(w, &jumps),
        _ => {
            for &j in &jumps {
                write_jumps(pages(j.0), &[j]);
            }
        }
    }
}

/// Overwrite the first 14 bytes of each libc entry in `jumps` (entry,
/// ours, name) with a jump to ours, with the text pages `window` writable
/// for the copy.
fn write_jumps(window: Range, jumps: &[(usize, usize, &str)]) {
    let (lo, len) = (window.start as *mut c_void, window.len());
    let rwx = libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC;
    // SAFETY: libc's text pages holding the functions' first 14 bytes; made
    // writable for the copy, then read-and-execute again. No other thread
    // runs yet (the constructor).
    unsafe {
        if libc::mprotect(lo, len, rwx) != 0 {
            let errno = crate::stackfmt::errno();
            for (_, _, name) in jumps {
                log::warn!(
                    "cannot patch libc's {name} (mprotect errno {errno}); it stays reachable by address"
                );
            }
            return;
        }
        for &(entry, ours, _) in jumps {
            let p = entry as *mut u8;
            core::ptr::copy_nonoverlapping(JMP_ABS.as_ptr(), p, JMP_ABS.len());
            core::ptr::write_unaligned(p.add(6) as *mut u64, ours as u64);
        }
        libc::mprotect(lo, len, libc::PROT_READ | libc::PROT_EXEC);
    }
}
