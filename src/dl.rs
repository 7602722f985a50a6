//! `dlopen` and `dlclose` (DESIGN.md, "Start-up sequence", step 3).
//!
//! After the real `dlopen` returns, the objects it loaded are counted (a new
//! census, compared with the old one by base address and name), assigned,
//! tagged with the plan for just those objects, registered in the census
//! (so fault reports and `ia2_addr_compartment` know them), scanned, and
//! their GOT slots and destructors are patched for gates. Objects loaded
//! earlier keep their slots: they were resolved at start-up.
//!
//! Assignment: an object that an explicit `IA2_COMPARTMENTS` pattern names
//! goes there. Otherwise an application object joins the compartment of the
//! object that called `dlopen` (else the compartment the calling thread runs
//! as), and system objects stay shared.
//!
//! Constructors of the new objects run inside the real `dlopen`, before the
//! shim sees the objects: with the rights of the thread that called
//! `dlopen`, on untagged data, and their calls are not gated yet.
//!
//! `dlclose` first puts the pages of every object loaded by `dlopen` back on
//! key 0 (its destructors and the unmapping then see shared pages), calls the
//! real `dlclose`, re-tags the objects that are still loaded, and drops the
//! unloaded ones from the census: their entries stay (indices are stable) but
//! lose their segments, so no address maps to them any more.

use crate::objects::{self, LoadedObject, ObjectKind};
use crate::pku;
use crate::plan::{PlanEntry, Reason};
use crate::runtime::{self, Census, Runtime};
use core::ffi::{c_char, c_int, c_void};
use core::sync::atomic::{AtomicUsize, Ordering};

/// Census index of the first object that `dlopen` added (objects before it
/// were loaded at start-up). `usize::MAX` until start-up is done.
static FIRST_DLOPENED: AtomicUsize = AtomicUsize::new(usize::MAX);

/// PKRU allowing every allocated key, for the duration of the guard (so the
/// shim can write GOTs of any compartment), then back.
struct AllKeys(u32);

impl AllKeys {
    fn enter(rt: &Runtime) -> AllKeys {
        let before = pku::read_pkru();
        pku::write_pkru(rt.pkru_all_compartments());
        AllKeys(before)
    }
}

impl Drop for AllKeys {
    fn drop(&mut self) {
        pku::write_pkru(self.0);
    }
}

fn census_mut(rt: &Runtime) -> std::sync::RwLockWriteGuard<'_, Census> {
    rt.census.write().unwrap_or_else(|e| e.into_inner())
}

fn first_dlopened(c: &Census) -> usize {
    match FIRST_DLOPENED.load(Ordering::Acquire) {
        usize::MAX => {
            FIRST_DLOPENED.store(c.objects.len(), Ordering::Release);
            c.objects.len()
        }
        n => n,
    }
}

fn same(a: &LoadedObject, b: &LoadedObject) -> bool {
    a.base == b.base && a.name == b.name && !a.segments.is_empty()
}

/// The compartment a new object joins.
fn assign_new(rt: &Runtime, o: &LoadedObject, caller: Option<u8>) -> Option<u8> {
    if o.kind == ObjectKind::Shim {
        return None;
    }
    if let Some(spec) = rt.config.compartments {
        if let Some((c, _)) = spec
            .rules()
            .find(|(_, p)| crate::compartments::glob_match(p, &o.basename))
        {
            return Some(c);
        }
    }
    match o.kind {
        ObjectKind::Application => caller,
        _ => None,
    }
}

/// The real `dlopen`, then counting, assigning, tagging and patching the
/// objects it loaded. `caller` is the return address of the `dlopen` call.
///
/// # Safety
/// As `dlopen(3)`.
pub unsafe fn dlopen(file: *const c_char, mode: c_int, caller: usize) -> *mut c_void {
    type DlopenFn = unsafe extern "C" fn(*const c_char, c_int) -> *mut c_void;
    // SAFETY: the slot holds libc's dlopen.
    let real: DlopenFn = unsafe { crate::real::as_fn(&crate::real::DLOPEN) };
    // glibc searches the *calling* object's RPATH/RUNPATH for a bare name,
    // and the caller of the real dlopen is now the shim: search the
    // caller's path here and pass the file found.
    // SAFETY: file is null or a C string (dlopen's contract).
    let found = unsafe { search_for_caller(file, caller) };
    let mut handle = core::ptr::null_mut();
    if let Some(path) = &found {
        // SAFETY: a NUL-terminated path and the caller's mode.
        handle = runtime::with_libc_rights(|| unsafe { real(path.as_ptr(), mode) });
    }
    if handle.is_null() {
        // SAFETY: forwarding the caller's arguments.
        handle = runtime::with_libc_rights(|| unsafe { real(file, mode) });
    }
    if handle.is_null() {
        return handle;
    }
    if let Some(rt) = runtime::active() {
        after_dlopen(rt, caller);
    }
    handle
}

/// glibc's `Dl_serpath`.
#[repr(C)]
struct SerPath {
    name: *const c_char,
    flags: u32,
}

/// The file that a `dlopen(file)` from code at `caller` would load, found
/// in the caller's library search path (`RTLD_DI_SERINFO`: `DT_RPATH`,
/// `LD_LIBRARY_PATH`, `DT_RUNPATH`, default directories). `None` for paths
/// with a slash, for null, and when nothing is found there (the real
/// `dlopen` then also tries its cache).
///
/// # Safety
/// `file` is null or a NUL-terminated string.
unsafe fn search_for_caller(file: *const c_char, caller: usize) -> Option<std::ffi::CString> {
    const RTLD_DI_SERINFO: c_int = 4;
    const RTLD_DI_SERINFOSIZE: c_int = 5;
    const RTLD_DL_LINKMAP: c_int = 2;
    extern "C" {
        fn dladdr1(
            addr: *const c_void,
            info: *mut libc::Dl_info,
            extra: *mut *mut c_void,
            flags: c_int,
        ) -> c_int;
        fn dlinfo(handle: *mut c_void, request: c_int, arg: *mut c_void) -> c_int;
    }
    if file.is_null() {
        return None;
    }
    // SAFETY: the caller's contract.
    let name = unsafe { core::ffi::CStr::from_ptr(file) }.to_bytes();
    if name.is_empty() || name.contains(&b'/') {
        return None;
    }
    // SAFETY: a zeroed Dl_info is valid for dladdr1 to fill.
    let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
    let mut map: *mut c_void = core::ptr::null_mut();
    // SAFETY: dladdr1 reads loader data and fills our out-parameters.
    if unsafe {
        dladdr1(
            caller as *const c_void,
            &mut info,
            &mut map,
            RTLD_DL_LINKMAP,
        )
    } == 0
        || map.is_null()
    {
        return None;
    }
    // Dl_serinfo: size_t dls_size; unsigned dls_cnt; Dl_serpath dls_serpath[].
    let mut head = [0usize; 4];
    // SAFETY: SERINFOSIZE fills the two header fields of a Dl_serinfo.
    if unsafe { dlinfo(map, RTLD_DI_SERINFOSIZE, head.as_mut_ptr().cast()) } != 0 {
        return None;
    }
    let (size, count) = (head[0], head[1] & 0xffff_ffff);
    let mut buf = vec![0usize; size.div_ceil(8).max(2)];
    buf[0] = size;
    buf[1] = count;
    // SAFETY: a buffer of the size SERINFOSIZE asked for, header set as dlinfo(3) requires.
    if unsafe { dlinfo(map, RTLD_DI_SERINFO, buf.as_mut_ptr().cast()) } != 0 {
        return None;
    }
    // SAFETY: dlinfo wrote `count` Dl_serpath entries after the header.
    let paths =
        unsafe { core::slice::from_raw_parts(buf.as_ptr().add(2) as *const SerPath, count) };
    for p in paths {
        if p.name.is_null() {
            continue;
        }
        // SAFETY: dlinfo's strings live in our buffer, NUL-terminated.
        let dir = unsafe { core::ffi::CStr::from_ptr(p.name) }.to_bytes();
        let mut full = Vec::with_capacity(dir.len() + name.len() + 2);
        full.extend_from_slice(if dir.is_empty() { b"." } else { dir });
        full.push(b'/');
        full.extend_from_slice(name);
        let Ok(c) = std::ffi::CString::new(full) else {
            continue;
        };
        // SAFETY: a NUL-terminated path.
        if unsafe { libc::access(c.as_ptr(), libc::F_OK) } == 0 {
            return Some(c);
        }
    }
    None
}

fn after_dlopen(rt: &Runtime, caller: usize) {
    // The census takes ld.so's lock (dl_iterate_phdr), which is libc
    // compartment data in strict mode: all keys first.
    let _keys = AllKeys::enter(rt);
    let now = objects::census();
    let mut c = census_mut(rt);
    first_dlopened(&c);
    let fresh: Vec<LoadedObject> = now
        .into_iter()
        .filter(|o| !c.objects.iter().any(|e| same(e, o)))
        .collect();
    if fresh.is_empty() {
        return;
    }
    let caller_comp = c
        .object_at(caller)
        .and_then(|(i, _)| c.compartment_of[i])
        .or_else(|| runtime::current_compartment().filter(|&x| x != 0));
    let start = c.objects.len();
    for o in fresh {
        let comp = assign_new(rt, &o, caller_comp);
        if let Some(k) = comp {
            if rt.key_of(k) == 0 {
                crate::lifecycle::fatal(format_args!(
                    "dlopen: {} belongs to compartment {k}, which has no protection key \
                     (only compartments in use at start-up get one)",
                    o.display_name()
                ));
            }
        }
        log::info!(
            "dlopen: {} at {:#x} joins {}",
            o.display_name(),
            o.base,
            comp.map_or("no compartment (shared)".to_string(), |k| format!(
                "compartment {k}"
            ))
        );
        c.objects.push(o);
        c.compartment_of.push(comp);
    }
    let only_new: Vec<Option<u8>> = (0..c.objects.len())
        .map(|i| {
            if i >= start {
                c.compartment_of[i]
            } else {
                None
            }
        })
        .collect();
    let maps = crate::maps::read_self_maps().unwrap_or_else(|e| {
        crate::lifecycle::fatal(format_args!("dlopen: reading /proc/self/maps: {e}"))
    });
    let carveouts = crate::carveouts::enabled(&c.carveouts);
    let governed = crate::carveouts::governed(&c.carveouts);
    let plan = crate::plan::build(&crate::plan::PlanInput {
        objects: &c.objects,
        compartment_of: &only_new,
        threads: &[],
        extra: &[],
        carveouts: &carveouts,
        governed: &governed,
        maps: &maps,
    });
    if let Err((e, errno)) = crate::apply::apply(&plan, &rt.keys) {
        crate::lifecycle::fatal(format_args!(
            "dlopen: pkey_mprotect({}, prot {:#x}, key of compartment {:?}) failed (errno {errno})",
            e.range, e.prot, e.compartment
        ));
    }
    c.plan.entries.extend(plan.entries);
    c.plan.entries.sort_by_key(|e| e.range.start);
    let end = c.objects.len();
    bind_new(rt, &c, start..end);
    crate::gates::patch_objects(rt, &c, start..end);
}

/// The object whose data or TLS a plan entry tags.
fn object_of(e: &PlanEntry) -> Option<usize> {
    match e.reason {
        Reason::Data { object } | Reason::Tls { object, .. } => Some(object),
        _ => None,
    }
}

/// The tagged entries of objects `from..`.
fn entries_of(c: &Census, from: usize) -> Vec<PlanEntry> {
    c.plan
        .tagged()
        .filter(|e| object_of(e).is_some_and(|o| o >= from))
        .cloned()
        .collect()
}

/// Untag the objects `dlopen` added, the real `dlclose`, then re-tag those
/// still loaded and forget the others.
///
/// # Safety
/// As `dlclose(3)`.
pub unsafe fn dlclose(handle: *mut c_void) -> c_int {
    type DlcloseFn = unsafe extern "C" fn(*mut c_void) -> c_int;
    // SAFETY: the slot holds libc's dlclose.
    let real: DlcloseFn = unsafe { crate::real::as_fn(&crate::real::DLCLOSE) };
    let Some(rt) = runtime::active() else {
        // SAFETY: forwarded.
        return runtime::with_libc_rights(|| unsafe { real(handle) });
    };
    let from = FIRST_DLOPENED.load(Ordering::Acquire);
    let tagged = {
        let c = census_mut(rt);
        if from == usize::MAX {
            Vec::new()
        } else {
            entries_of(&c, from)
        }
    };
    if !tagged.is_empty() {
        let p = crate::plan::Plan {
            entries: tagged.clone(),
            untagged_tls: Vec::new(),
        };
        if let Err((e, errno)) = crate::apply::unapply(&p) {
            log::warn!(
                "dlclose: putting {} back on key 0 failed (errno {errno})",
                e.range
            );
        }
    }
    // The lock is not held here: destructors may dlopen or dlclose.
    // SAFETY: forwarded.
    let r = runtime::with_libc_rights(|| unsafe { real(handle) });
    if from == usize::MAX {
        return r;
    }
    // The census takes ld.so's lock (dl_iterate_phdr), which is libc
    // compartment data in strict mode: all keys first.
    let _keys = AllKeys::enter(rt);
    let now = objects::census();
    let mut c = census_mut(rt);
    let mut gone = Vec::new();
    for i in from..c.objects.len() {
        let o = &c.objects[i];
        if o.segments.is_empty() || now.iter().any(|n| same(o, n)) {
            continue;
        }
        gone.push(i);
    }
    for &i in &gone {
        let o = &mut c.objects[i];
        log::info!("dlclose: {} at {:#x} unloaded", o.display_name(), o.base);
        for s in &o.segments {
            crate::gates::forget_range(s.range);
        }
        o.segments.clear();
        o.dynamic = None;
        o.relro = None;
        o.tls = None;
        c.compartment_of[i] = None;
    }
    c.plan
        .entries
        .retain(|e| object_of(e).is_none_or(|o| !gone.contains(&o)));
    let survivors: Vec<PlanEntry> = tagged
        .into_iter()
        .filter(|e| object_of(e).is_some_and(|o| !gone.contains(&o)))
        .collect();
    let p = crate::plan::Plan {
        entries: survivors,
        untagged_tls: Vec::new(),
    };
    if let Err((e, errno)) = crate::apply::apply(&p, &rt.keys) {
        crate::lifecycle::fatal(format_args!(
            "dlclose: re-tagging {} (compartment {:?}) failed (errno {errno})",
            e.range, e.compartment
        ));
    }
    r
}

/// Remember where start-up objects end (called once the start-up census is final).
pub fn startup_done(c: &Census) {
    first_dlopened(c);
}

/// glibc's `dlsym`, found with `dlvsym` (which the shim does not
/// interpose), so that resolving it never recurses into the `dlsym` hook.
pub static REAL_DLSYM: AtomicUsize = AtomicUsize::new(0);

pub fn real_dlsym() -> usize {
    let a = REAL_DLSYM.load(Ordering::Acquire);
    if a != 0 {
        return a;
    }
    for version in [c"GLIBC_2.34", c"GLIBC_2.2.5"] {
        // SAFETY: dlvsym with RTLD_NEXT and NUL-terminated strings.
        let f =
            unsafe { libc::dlvsym(libc::RTLD_NEXT, c"dlsym".as_ptr(), version.as_ptr()) } as usize;
        if f != 0 {
            REAL_DLSYM.store(f, Ordering::Release);
            return f;
        }
    }
    crate::lifecycle::fatal(format_args!("dlvsym(RTLD_NEXT, \"dlsym\") found no dlsym"))
}

/// `dlsym` for every handle but `RTLD_NEXT` (see the hook in `hooks.rs`).
///
/// # Safety
/// As `dlsym(3)`.
pub unsafe fn dlsym(handle: *mut c_void, name: *const libc::c_char) -> *mut c_void {
    type DlsymFn = unsafe extern "C" fn(*mut c_void, *const libc::c_char) -> *mut c_void;
    // SAFETY: REAL_DLSYM holds glibc's dlsym.
    let real: DlsymFn = unsafe { core::mem::transmute::<usize, DlsymFn>(real_dlsym()) };
    // SAFETY: forwarded contract.
    runtime::with_libc_rights(|| unsafe { real(handle, name) })
}

type DladdrFn = unsafe extern "C" fn(*const c_void, *mut libc::Dl_info) -> c_int;
type Dladdr1Fn =
    unsafe extern "C" fn(*const c_void, *mut libc::Dl_info, *mut *mut c_void, c_int) -> c_int;

static REAL_DLADDR: crate::real::RealFn = crate::real::RealFn::new(c"dladdr");
static REAL_DLADDR1: crate::real::RealFn = crate::real::RealFn::new(c"dladdr1");

/// Resolve the real `dladdr`/`dladdr1` (fault reports call `dladdr` from
/// the signal handler, which must not run `dlsym`).
pub fn resolve_dladdr() {
    REAL_DLADDR.get();
    REAL_DLADDR1.get();
}

/// `dladdr` with the loader's rights added (it takes `dl_load_lock` and
/// reads the link maps).
///
/// # Safety
/// As `dladdr(3)`.
pub unsafe fn dladdr(addr: *const c_void, info: *mut libc::Dl_info) -> c_int {
    // SAFETY: the slot holds glibc's dladdr.
    let real: DladdrFn = unsafe { core::mem::transmute::<usize, DladdrFn>(REAL_DLADDR.get()) };
    // SAFETY: forwarded contract.
    let r = runtime::with_libc_rights(|| unsafe { real(addr, info) });
    if r != 0 && !info.is_null() {
        // SAFETY: dladdr filled `info`.
        unsafe { (*info).dli_fname = shared_name((*info).dli_fname) };
    }
    r
}

/// `dladdr1`, as [`dladdr`].
///
/// # Safety
/// As `dladdr1(3)`.
pub unsafe fn dladdr1(
    addr: *const c_void,
    info: *mut libc::Dl_info,
    extra: *mut *mut c_void,
    flags: c_int,
) -> c_int {
    // SAFETY: the slot holds glibc's dladdr1.
    let real: Dladdr1Fn = unsafe { core::mem::transmute::<usize, Dladdr1Fn>(REAL_DLADDR1.get()) };
    // SAFETY: forwarded contract.
    let r = runtime::with_libc_rights(|| unsafe { real(addr, info, extra, flags) });
    if r != 0 && !info.is_null() {
        // SAFETY: dladdr1 filled `info`.
        unsafe { (*info).dli_fname = shared_name((*info).dli_fname) };
    }
    r
}

/// Bind the lazy slots of the objects `dlopen` just added (census indices
/// `which`), before their GOTs are patched. PKRU allows every key.
pub fn bind_new(rt: &Runtime, c: &Census, which: core::ops::Range<usize>) {
    crate::bindnow::bind_objects(rt, c, which);
    share_names(rt);
}

/// Copies of the loader's object names (`l_name`, on the loader heap in
/// strict mode) on the shared key, by the loader's pointer: `dladdr`'s
/// `dli_fname` and `dl_iterate_phdr`'s `dlpi_name` hand compartments these
/// copies, which they can read. Filled at start-up and after each `dlopen`
/// (never from the hooks, which may run in the fault handler).
static NAMES: std::sync::RwLock<Vec<(usize, Box<[u8]>)>> = std::sync::RwLock::new(Vec::new());

/// Record a shared copy of every loaded object's name (strict mode).
pub fn share_names(rt: &Runtime) {
    if rt.config.libc_compartment.is_none() {
        return;
    }
    unsafe extern "C" fn cb(info: *mut libc::dl_phdr_info, _: usize, data: *mut c_void) -> c_int {
        // SAFETY: glibc's info and our Vec.
        let (info, out) = unsafe { (&*info, &mut *(data as *mut Vec<(usize, Box<[u8]>)>)) };
        if !info.dlpi_name.is_null() {
            // SAFETY: a NUL-terminated name owned by the loader.
            let bytes = unsafe { core::ffi::CStr::from_ptr(info.dlpi_name) }.to_bytes_with_nul();
            out.push((info.dlpi_name as usize, bytes.into()));
        }
        0
    }
    let mut found: Vec<(usize, Box<[u8]>)> = Vec::new();
    // SAFETY: the callback only touches `found`.
    unsafe {
        crate::callbacks::real_dl_iterate_phdr(
            cb,
            (&mut found as *mut Vec<(usize, Box<[u8]>)>).cast(),
        )
    };
    let mut names = NAMES.write().unwrap_or_else(|e| e.into_inner());
    for (p, b) in found {
        if !names.iter().any(|(q, c)| *q == p && **c == *b) {
            names.retain(|(q, _)| *q != p);
            names.push((p, b));
        }
    }
}

/// The shared copy of the loader's name at `p`, or `p`.
pub fn shared_name(p: *const libc::c_char) -> *const libc::c_char {
    if p.is_null() {
        return p;
    }
    let Ok(names) = NAMES.try_read() else {
        return p;
    };
    names
        .iter()
        .find(|(q, _)| *q == p as usize)
        .map_or(p, |(_, b)| b.as_ptr().cast())
}

/// What `dlsym(RTLD_NEXT)`'s stub (hooks.rs) needs: `gadget`, the address
/// of a `ret` byte in the caller's object, for the real `dlsym` to return
/// through (it answers relative to its return address's object), and the
/// caller's PKRU to restore afterwards. `gadget` 0: no rights to add.
#[repr(C)]
pub struct NextEnter {
    pub gadget: usize,
    pub saved_pkru: usize,
}

/// Before the real `dlsym(RTLD_NEXT)` (strict mode): add the loader's
/// rights (it takes `dl_load_lock`) and find the caller's `ret` byte.
pub extern "C" fn dlsym_next_enter(caller: usize) -> NextEnter {
    let none = NextEnter {
        gadget: 0,
        saved_pkru: 0,
    };
    let Some(rt) = runtime::active() else {
        return none;
    };
    let Some(n) = rt.config.libc_compartment else {
        return none;
    };
    let gadget = {
        let Ok(c) = rt.census.read() else { return none };
        let Some((_, o)) = c.object_at(caller) else {
            return none;
        };
        let seg = o
            .segments
            .iter()
            .filter(|s| s.executable())
            .find(|s| s.range.contains(caller));
        let Some(seg) = seg else { return none };
        // SAFETY: the caller's executable segment, mapped and readable.
        let text =
            unsafe { core::slice::from_raw_parts(seg.range.start as *const u8, seg.range.len()) };
        match text.iter().position(|&b| b == 0xc3) {
            Some(i) => seg.range.start + i,
            None => return none,
        }
    };
    let saved = pku::read_pkru();
    pku::write_pkru(saved & !(3 << (2 * rt.key_of(n))));
    NextEnter {
        gadget,
        saved_pkru: saved as usize,
    }
}

/// After the real `dlsym(RTLD_NEXT)`: the caller's PKRU again.
pub extern "C" fn dlsym_next_leave(saved_pkru: usize) {
    pku::write_pkru(saved_pkru as u32);
}
