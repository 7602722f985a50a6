//! `dlopen` and `dlclose` (DESIGN.md, "Start-up sequence", step 3).
//!
//! The shim's own lock (`DL_LOCK`, reentrant) is held across the real call
//! and the census work around it, so no two threads do that work at once
//! and a `dlclose` cannot unload what a `dlopen` is patching. Lock order:
//! `DL_LOCK`, then ld.so's locks, then the census lock; the census lock is
//! never held while calling into ld.so (a constructor running inside the
//! real `dlopen`, with ld.so's lock held, may start a thread, whose start
//! reads the census).
//!
//! The real `dlopen` and `dlsym` are called so that they see the program's
//! code as their caller (`ia2shim_call_as`): glibc picks the RUNPATH,
//! `$ORIGIN`, namespace and `RTLD_DEFAULT` scope by the caller. With
//! `IA2_PKU=off` the entry points jump straight to glibc.
//!
//! After the real `dlopen` returns, the objects it loaded are the handle's
//! object and, transitively, the new objects that its `DT_NEEDED` entries
//! name; objects that glibc loaded for itself meanwhile (gconv, NSS,
//! `dlmopen`) are left alone. They are assigned, tagged with the plan for
//! just those objects, registered in the census (so fault reports and
//! `ia2_addr_compartment` know them), scanned, and their GOT slots and
//! destructors are patched for gates (on a snapshot of the census, without
//! its lock). Objects loaded earlier keep their slots.
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
use crate::real::real_dlsym;
use crate::runtime::{self, Census, Runtime};
use core::ffi::{c_char, c_int, c_void};
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

/// Census index of the first object that `dlopen` added (objects before it
/// were loaded at start-up). `usize::MAX` until start-up is done.
#[link_section = ".ia2shim_sealed"]
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

fn census_mut(rt: &Runtime) -> crate::runtime::CensusWrite<'_> {
    rt.census.write().unwrap_or_else(|e| e.into_inner())
}

fn census_read(rt: &Runtime) -> crate::runtime::CensusRead<'_> {
    rt.census.read().unwrap_or_else(|e| e.into_inner())
}

fn first_dlopened(c: &Census) -> usize {
    match FIRST_DLOPENED.load(Ordering::Acquire) {
        usize::MAX => {
            let n = c.objects.len();
            crate::pku::with_shim_writes(|| FIRST_DLOPENED.store(n, Ordering::Release));
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

// ---------------------------------------------------------------- the shim's own lock

/// Serialises the shim's `dlopen`/`dlclose` work (the real call and the
/// census update around it). Lock order: this lock, then ld.so's locks,
/// then the census lock; the census lock is never held while calling into
/// ld.so. Reentrant, because constructors and destructors that the real
/// call runs may `dlopen` and `dlclose` themselves. A futex word, so that
/// the `fork` handlers can take and release it from plain functions.
struct DlLock {
    /// 0 free, 1 held, 2 held with waiters.
    state: AtomicU32,
    /// Thread pointer of the holder (0: none).
    owner: AtomicUsize,
    depth: AtomicUsize,
}

static DL_LOCK: DlLock = DlLock {
    state: AtomicU32::new(0),
    owner: AtomicUsize::new(0),
    depth: AtomicUsize::new(0),
};

fn futex(word: &AtomicU32, op: c_int, val: u32) {
    // SAFETY: a futex call on a live, aligned 32-bit word; no timeout.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            op | libc::FUTEX_PRIVATE_FLAG,
            val,
            core::ptr::null::<libc::timespec>(),
        )
    };
}

impl DlLock {
    fn lock(&self) {
        let me = crate::tls::thread_pointer();
        if self.owner.load(Ordering::Relaxed) == me {
            self.depth.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if self
            .state
            .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            while self.state.swap(2, Ordering::Acquire) != 0 {
                futex(&self.state, libc::FUTEX_WAIT, 2);
            }
        }
        self.owner.store(me, Ordering::Relaxed);
        self.depth.store(1, Ordering::Relaxed);
    }

    fn unlock(&self) {
        if self.depth.fetch_sub(1, Ordering::Relaxed) > 1 {
            return;
        }
        self.owner.store(0, Ordering::Relaxed);
        if self.state.swap(0, Ordering::Release) == 2 {
            futex(&self.state, libc::FUTEX_WAKE, 1);
        }
    }
}

struct DlGuard;

impl DlGuard {
    fn take() -> DlGuard {
        DL_LOCK.lock();
        DlGuard
    }

    /// Is this an inner `dlopen`/`dlclose`, from a constructor or destructor?
    fn nested(&self) -> bool {
        DL_LOCK.depth.load(Ordering::Relaxed) > 1
    }
}

impl Drop for DlGuard {
    fn drop(&mut self) {
        DL_LOCK.unlock();
    }
}

/// `fork` prepare handler: no thread is inside the shim's dlopen work when
/// the process is copied.
pub fn fork_prepare() {
    DL_LOCK.lock();
}

/// `fork` parent and child handler (the child's only thread is the one that
/// took the lock in [`fork_prepare`]).
pub fn fork_release() {
    DL_LOCK.unlock();
}

// ---------------------------------------------------------------- calling ld.so as the program

// `ia2shim_call_as(f, a, b, ret)`: call `f(a, b)` so that `f` sees `ret` as
// its return address. `ret` is a `ret` instruction (byte 0xc3) in the
// caller's object, which returns into the continuation below. glibc's
// `dlopen` and `dlsym` use their return address to find the calling object
// (its RUNPATH, `$ORIGIN`, namespace and lookup scope), so the program's
// object stays the caller although the shim made the call.
core::arch::global_asm!(
    ".pushsection .text.ia2shim_call_as,\"ax\",@progbits",
    ".globl ia2shim_call_as",
    ".hidden ia2shim_call_as",
    ".type ia2shim_call_as,@function",
    ".p2align 4",
    "ia2shim_call_as:",
    ".cfi_startproc",
    "push rbp",
    ".cfi_def_cfa_offset 16",
    ".cfi_offset rbp, -16",
    "mov rbp, rsp",
    ".cfi_def_cfa_register rbp",
    "and rsp, -16",
    "sub rsp, 8",
    "lea r11, [rip + 2f]",
    "push r11",
    "push rcx",
    "mov rax, rdi",
    "mov rdi, rsi",
    "mov rsi, rdx",
    "jmp rax",
    "2:",
    "mov rsp, rbp",
    "pop rbp",
    ".cfi_def_cfa rsp, 8",
    "ret",
    ".cfi_endproc",
    ".size ia2shim_call_as, .-ia2shim_call_as",
    ".popsection",
);

extern "C" {
    fn ia2shim_call_as(f: usize, a: usize, b: usize, ret: usize) -> usize;
}

/// A `ret` byte in the executable segment of the object that holds `addr`.
fn ret_gadget(addr: usize) -> Option<usize> {
    struct Search {
        addr: usize,
        found: Option<usize>,
    }
    unsafe extern "C" fn cb(
        info: *mut libc::dl_phdr_info,
        _size: usize,
        data: *mut c_void,
    ) -> c_int {
        // SAFETY: `data` is the Search below; glibc passes a valid info.
        let (s, info) = unsafe { (&mut *(data as *mut Search), &*info) };
        // SAFETY: dlpi_phdr points at dlpi_phnum program headers.
        let phdrs =
            unsafe { core::slice::from_raw_parts(info.dlpi_phdr, info.dlpi_phnum as usize) };
        for ph in phdrs {
            if ph.p_type != libc::PT_LOAD || ph.p_flags & libc::PF_X == 0 {
                continue;
            }
            let start = info.dlpi_addr as usize + ph.p_vaddr as usize;
            let len = ph.p_filesz as usize;
            if (start..start + len).contains(&s.addr) {
                // SAFETY: the loaded, readable text of this object.
                let text = unsafe { core::slice::from_raw_parts(start as *const u8, len) };
                s.found = text.iter().position(|&b| b == 0xc3).map(|i| start + i);
                return 1;
            }
        }
        0
    }
    let mut s = Search { addr, found: None };
    // SAFETY: the callback only touches `s` and the info glibc passes.
    unsafe { libc::dl_iterate_phdr(Some(cb), (&mut s as *mut Search).cast()) };
    s.found
}

/// `f(a, b)` with `caller` (a return address in the program) as the caller
/// that `f` sees; a direct call when no object holds `caller`.
fn call_as_caller(f: usize, a: usize, b: usize, caller: usize) -> usize {
    // The gadget search walks ld.so's list (dl_iterate_phdr) too: libc
    // compartment data in strict mode.
    runtime::with_libc_rights(|| match ret_gadget(caller) {
        // SAFETY: f takes two word arguments (dlopen, dlsym); the gadget is
        // a `ret` byte in mapped text.
        Some(g) => unsafe { ia2shim_call_as(f, a, b, g) },
        None => {
            // SAFETY: as above, called directly.
            let f: unsafe extern "C" fn(usize, usize) -> usize = unsafe { core::mem::transmute(f) };
            // SAFETY: forwarding the caller's arguments.
            unsafe { f(a, b) }
        }
    })
}

/// Real `dlopen`/`dlsym` addresses the entry points jump to directly when
/// the shim is off (`IA2_PKU=off`): then nothing stands between the program
/// and ld.so (`dlclose` does not depend on its caller).
#[link_section = ".ia2shim_sealed"]
pub static PASS_DLOPEN: AtomicUsize = AtomicUsize::new(0);
#[link_section = ".ia2shim_sealed"]
pub static PASS_DLSYM: AtomicUsize = AtomicUsize::new(0);

/// `IA2_PKU=off`: let `dlopen` and `dlsym` go straight to glibc.
pub fn pass_through() {
    PASS_DLOPEN.store(crate::real::DLOPEN.get(), Ordering::Release);
    PASS_DLSYM.store(real_dlsym(), Ordering::Release);
}

// ---------------------------------------------------------------- dlopen

/// The real `dlopen` (as called from `caller`), then counting, assigning,
/// tagging and patching the objects it loaded.
///
/// # Safety
/// As `dlopen(3)`.
pub unsafe fn dlopen(file: *const c_char, mode: c_int, caller: usize) -> *mut c_void {
    let real = crate::real::DLOPEN.get();
    let Some(rt) = runtime::active() else {
        return call_as_caller(real, file as usize, mode as usize, caller) as *mut c_void;
    };
    let guard = DlGuard::take();
    let handle = call_as_caller(real, file as usize, mode as usize, caller) as *mut c_void;
    if !handle.is_null() {
        after_dlopen(rt, caller, handle);
    }
    drop(guard);
    handle
}

/// `DT_NEEDED` names and `DT_SONAME` of a loaded object.
fn needed_and_soname(o: &LoadedObject) -> (Vec<String>, Option<String>) {
    let (Some(dynamic), Some(info)) = (o.dynamic, o.dynamic_info()) else {
        return (Vec::new(), None);
    };
    let string = |off: u64| -> Option<String> {
        if info.strtab == 0 || off as usize >= info.strsz {
            return None;
        }
        // SAFETY: an offset inside the object's mapped string table.
        let s = unsafe { core::ffi::CStr::from_ptr((info.strtab + off as usize) as *const c_char) };
        Some(String::from_utf8_lossy(s.to_bytes()).into_owned())
    };
    let mut needed = Vec::new();
    let mut soname = None;
    let mut p = dynamic as *const [u64; 2];
    loop {
        // SAFETY: the object's DT_NULL-terminated dynamic section, mapped while it is loaded.
        let [tag, val] = unsafe { *p };
        match tag as u32 {
            object::elf::DT_NULL => break,
            object::elf::DT_NEEDED => needed.extend(string(val)),
            object::elf::DT_SONAME => soname = string(val),
            _ => {}
        }
        // SAFETY: not past DT_NULL yet.
        p = unsafe { p.add(1) };
    }
    (needed, soname)
}

/// Of the objects that appeared since the census, those this `dlopen`
/// loaded: the handle's object and, transitively, the new objects its
/// `DT_NEEDED` entries name. Objects that glibc loaded for itself meanwhile
/// (gconv and NSS modules, `dlmopen`) are not among them.
fn loaded_by(handle: *mut c_void, fresh: &[LoadedObject]) -> Vec<usize> {
    const RTLD_DI_LINKMAP: c_int = 2;
    extern "C" {
        fn dlinfo(handle: *mut c_void, request: c_int, arg: *mut c_void) -> c_int;
    }
    let mut map: *mut libc::c_void = core::ptr::null_mut();
    // SAFETY: a handle the real dlopen returned; dlinfo writes a link_map pointer.
    if unsafe {
        dlinfo(
            handle,
            RTLD_DI_LINKMAP,
            (&mut map as *mut *mut c_void).cast(),
        )
    } != 0
        || map.is_null()
    {
        return Vec::new();
    }
    // SAFETY: the public head of glibc's struct link_map: l_addr, l_name.
    let (l_addr, l_name) = unsafe {
        (
            *(map as *const usize),
            *(map as *const *const c_char).add(1),
        )
    };
    let name = if l_name.is_null() {
        String::new()
    } else {
        // SAFETY: ld.so's NUL-terminated name of a loaded object.
        String::from_utf8_lossy(unsafe { core::ffi::CStr::from_ptr(l_name) }.to_bytes())
            .into_owned()
    };
    let Some(root) = fresh
        .iter()
        .position(|o| o.base == l_addr && o.name == name)
    else {
        return Vec::new();
    };
    let names: Vec<(Vec<String>, Option<String>)> = fresh.iter().map(needed_and_soname).collect();
    let mut ours = vec![root];
    let mut i = 0;
    while i < ours.len() {
        let needed = names[ours[i]].0.clone();
        for n in needed {
            let n = n.rsplit('/').next().unwrap_or(&n).to_string();
            if let Some(j) = (0..fresh.len()).find(|&j| {
                !ours.contains(&j)
                    && (fresh[j].basename == n || names[j].1.as_deref() == Some(n.as_str()))
            }) {
                ours.push(j);
            }
        }
        i += 1;
    }
    ours.sort_unstable();
    ours
}

fn after_dlopen(rt: &Runtime, caller: usize, handle: *mut c_void) {
    // The census takes ld.so's lock (dl_iterate_phdr), which is libc
    // compartment data in strict mode: all keys first. No shim lock but
    // DL_LOCK is held while ld.so is asked anything.
    let _keys = AllKeys::enter(rt);
    let now = objects::census();
    let (mut snapshot, fresh) = {
        let c = census_read(rt);
        first_dlopened(&c);
        let fresh: Vec<LoadedObject> = now
            .into_iter()
            .filter(|o| !c.objects.iter().any(|e| same(e, o)))
            .collect();
        if fresh.is_empty() {
            return;
        }
        (c.clone(), fresh)
    };
    let ours = loaded_by(handle, &fresh);
    let caller_comp = snapshot
        .object_at(caller)
        .and_then(|(i, _)| snapshot.compartment_of[i])
        .or_else(|| runtime::current_compartment().filter(|&x| x != 0));
    let start = snapshot.objects.len();
    for (i, o) in fresh.into_iter().enumerate() {
        if !ours.contains(&i) {
            log::debug!(
                "dlopen: {} was loaded by someone else (glibc itself, dlmopen); left alone",
                o.display_name()
            );
            continue;
        }
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
        snapshot.objects.push(o);
        snapshot.compartment_of.push(comp);
    }
    let end = snapshot.objects.len();
    if start == end {
        return;
    }
    crate::cxx::resolve(snapshot.objects[start..].iter());
    let only_new: Vec<Option<u8>> = (0..end)
        .map(|i| {
            if i >= start {
                snapshot.compartment_of[i]
            } else {
                None
            }
        })
        .collect();
    let maps = crate::maps::read_self_maps().unwrap_or_else(|e| {
        crate::lifecycle::fatal(format_args!("dlopen: reading /proc/self/maps: {e}"))
    });
    let carveouts = crate::carveouts::enabled(&snapshot.carveouts);
    let governed = crate::carveouts::governed(&snapshot.carveouts);
    let plan = crate::plan::build(&crate::plan::PlanInput {
        objects: &snapshot.objects,
        compartment_of: &only_new,
        threads: &[],
        extra: &[],
        carveouts: &carveouts,
        governed: &governed,
        maps: &maps,
    });
    if let Err((e, errno)) = crate::apply::apply(&plan, &rt.keys()) {
        crate::lifecycle::fatal(format_args!(
            "dlopen: pkey_mprotect({}, prot {:#x}, key of compartment {:?}) failed (errno {errno})",
            e.range, e.prot, e.compartment
        ));
    }
    {
        // Only DL_LOCK holders add objects, so the indices still hold.
        // Cloned inside the sealed scope: the census's blocks stay sealed.
        census_mut(rt).update(|c| {
            c.objects.extend(snapshot.objects[start..].iter().cloned());
            c.compartment_of
                .extend(snapshot.compartment_of[start..].iter().copied());
            c.plan.entries.extend(plan.entries.iter().cloned());
            c.plan.entries.sort_by_key(|e| e.range.start);
            c.maps = maps.clone();
        });
    }
    snapshot.maps = maps;
    snapshot.plan.entries.extend(plan.entries);
    snapshot.plan.entries.sort_by_key(|e| e.range.start);
    // Binding and patching ask ld.so (dladdr, dlsym): on the snapshot, no
    // census lock.
    bind_new(rt, &snapshot, start..end, handle);
    crate::gates::patch_objects(rt, &snapshot, start..end);
    crate::alloc::objects_changed(&snapshot);
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
    let guard = DlGuard::take();
    // An inner dlclose (from a destructor) leaves the outer one's untagging alone.
    let nested = guard.nested();
    let from = FIRST_DLOPENED.load(Ordering::Acquire);
    let tagged = {
        let c = census_read(rt);
        if from == usize::MAX || nested {
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
    // Only DL_LOCK is held here (reentrant: destructors may dlopen or dlclose).
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
        let o = &c.objects[i];
        log::info!("dlclose: {} at {:#x} unloaded", o.display_name(), o.base);
        for s in &o.segments {
            crate::gates::forget_range(s.range);
        }
    }
    c.update(|c| {
        for &i in &gone {
            let o = &mut c.objects[i];
            o.segments.clear();
            o.dynamic = None;
            o.relro = None;
            o.tls = None;
            c.compartment_of[i] = None;
        }
        c.plan
            .entries
            .retain(|e| object_of(e).is_none_or(|o| !gone.contains(&o)));
    });
    let survivors: Vec<PlanEntry> = tagged
        .into_iter()
        .filter(|e| object_of(e).is_some_and(|o| !gone.contains(&o)))
        .collect();
    let p = crate::plan::Plan {
        entries: survivors,
        untagged_tls: Vec::new(),
    };
    if let Err((e, errno)) = crate::apply::apply(&p, &rt.keys()) {
        crate::lifecycle::fatal(format_args!(
            "dlclose: re-tagging {} (compartment {:?}) failed (errno {errno})",
            e.range, e.compartment
        ));
    }
    crate::alloc::objects_changed(&c);
    r
}

/// Remember where start-up objects end (called once the start-up census is final).
pub fn startup_done(c: &Census) {
    first_dlopened(c);
}

/// `dlsym` for every handle but `RTLD_NEXT`, as called from `caller`
/// (`RTLD_DEFAULT` searches the caller's lookup scope), with the libc
/// compartment's rights in strict mode (see the hook in `hooks.rs`).
///
/// # Safety
/// As `dlsym(3)`.
pub unsafe fn dlsym(handle: *mut c_void, name: *const libc::c_char, caller: usize) -> *mut c_void {
    call_as_caller(real_dlsym(), handle as usize, name as usize, caller) as *mut c_void
}

type DladdrFn = unsafe extern "C" fn(*const c_void, *mut libc::Dl_info) -> c_int;
type Dladdr1Fn =
    unsafe extern "C" fn(*const c_void, *mut libc::Dl_info, *mut *mut c_void, c_int) -> c_int;

#[link_section = ".ia2shim_sealed"]
static REAL_DLADDR: crate::real::RealFn = crate::real::RealFn::new(c"dladdr");
#[link_section = ".ia2shim_sealed"]
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
/// `which`), before their GOTs are patched, looking symbols up in the
/// scope of `handle` too. PKRU allows every key.
pub fn bind_new(rt: &Runtime, c: &Census, which: core::ops::Range<usize>, handle: *mut c_void) {
    crate::bindnow::bind_objects(rt, c, which, handle);
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
