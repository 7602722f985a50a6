//! Allocation sites for `IA2_HEAP=compartment`: where each block of the
//! heaps was allocated, the `IA2_HEAP_SHARED` policy that sends chosen
//! sites to the shared heap, the sites audit mode learns, and per-compartment
//! byte counts (`IA2_REPORT=heap`).
//!
//! A site is (the malloc caller's return address, the return address saved
//! by the gate the thread entered last). Each distinct pair is interned
//! once in a fixed table of atomics in the shim's `.bss` (key 0, no
//! allocation, no lock) and its 16-bit id goes into the block's header.
//! Interning a new pair decides its heap once: the caller's compartment
//! (by [`super::route`]), or the shared heap when the policy names the site.
//! Afterwards a call costs one hash probe.
//!
//! Addresses are turned into run-independent terms only when printed: the
//! caller as `object+0xOFF` or `object:symbol+0xOFF` (dynsym), the gate as
//! `gate:symbol` of its target. The target is found when the pair is
//! interned, by decoding the gate caller's `call` (`call [rip+GOT]`, or
//! `call PLT` and the PLT entry's `jmp [rip+GOT]`) and reading the GOT slot,
//! which holds the gate's stub. A gate reached through a function pointer
//! has no decodable target and is not named.

use crate::config::{CodeRef, GateRef, HeapSharedList};
use crate::objects::LoadedObject;
use core::ffi::c_void;
use core::fmt::{self, Write};
use core::sync::atomic::{
    AtomicBool, AtomicI64, AtomicPtr, AtomicU64, AtomicU8, AtomicUsize, Ordering::*,
};

/// Sites the table holds; ids are 1..=CAP (0: none recorded).
pub const CAP: usize = 4096;

const EMPTY: u8 = 0;
const CLAIMED: u8 = 1;
const READY: u8 = 2;

/// Flag: `IA2_HEAP_SHARED` names this site.
pub const POLICY: u8 = 1;
/// Flag: audit mode saw another compartment touch one of its blocks.
pub const LEARNED: u8 = 2;

#[repr(align(64))]
pub struct Site {
    state: AtomicU8,
    /// The heap that serves the site now.
    heap: AtomicU8,
    /// The caller's compartment (0: shared code).
    pub compartment: AtomicU8,
    pub flags: AtomicU8,
    pub ra: AtomicUsize,
    pub gate_ra: AtomicUsize,
    /// The target of that gate (0: no gate, or not decodable).
    pub gate: AtomicUsize,
}

/// Bytes and blocks allocated at a site (counted with `IA2_REPORT=heap` or
/// in audit mode): on key 0, since every allocation writes them.
pub struct Counts {
    pub bytes: AtomicU64,
    pub blocks: AtomicU64,
}

#[allow(clippy::declare_interior_mutable_const)]
const NEW: Site = Site {
    state: AtomicU8::new(EMPTY),
    heap: AtomicU8::new(0),
    compartment: AtomicU8::new(0),
    flags: AtomicU8::new(0),
    ra: AtomicUsize::new(0),
    gate_ra: AtomicUsize::new(0),
    gate: AtomicUsize::new(0),
};

/// The sites: which call sites are known and which heap serves each, on
/// pages of their own that `IA2_HARDEN=on` puts on the shim key
/// ([`harden`]): a compartment that rewrote a site's call-site address or
/// heap would have another compartment's allocations served from its own
/// heap. Written when a site is first seen, when routes change and when
/// audit mode learns a site, each time with the key open.
#[repr(C, align(4096))]
struct Table([Site; CAP]);
static TABLE: Table = Table([NEW; CAP]);
// Large: with the other large statics (sealed.ld).
#[link_section = ".bss.ia2shim_large"]
static COUNTS: [Counts; CAP] = [const {
    Counts {
        bytes: AtomicU64::new(0),
        blocks: AtomicU64::new(0),
    }
}; CAP];

/// Put the site table and the policy on the shim key (`IA2_HARDEN=on`).
pub fn harden(key: u32) {
    crate::pku::seal_static(&TABLE, key, "allocation-site table");
    crate::pku::seal_static(&POLICY_PTR, key, "IA2_HEAP_SHARED policy");
}

/// Site `id`'s counts.
pub fn counts(id: u16) -> Option<&'static Counts> {
    COUNTS.get((id as usize).checked_sub(1)?)
}
/// Pairs not recorded because the table was full (served by their route).
static DROPPED: AtomicU64 = AtomicU64::new(0);

#[inline]
fn hash(ra: usize, gate_ra: usize) -> usize {
    let h = (ra ^ gate_ra.rotate_left(23)).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    (h >> 40) & (CAP - 1)
}

/// The site of a call from `ra` inside the gate whose caller returns to
/// `gate_ra` (0: no gate): its id and the heap that serves it.
#[inline(always)]
pub fn lookup(ra: usize, gate_ra: usize) -> (u16, usize) {
    let i = hash(ra, gate_ra);
    let s = &TABLE.0[i];
    if s.ra.load(Relaxed) == ra
        && s.gate_ra.load(Relaxed) == gate_ra
        && s.state.load(Acquire) == READY
    {
        return ((i + 1) as u16, s.heap.load(Relaxed) as usize);
    }
    probe(i, ra, gate_ra)
}

#[inline(never)]
fn probe(mut i: usize, ra: usize, gate_ra: usize) -> (u16, usize) {
    let mut probes = 0;
    while probes < CAP {
        let s = &TABLE.0[i];
        match s.state.load(Acquire) {
            READY if s.ra.load(Relaxed) == ra && s.gate_ra.load(Relaxed) == gate_ra => {
                return ((i + 1) as u16, s.heap.load(Relaxed) as usize);
            }
            READY => {}
            EMPTY => match intern(i, ra, gate_ra) {
                Some(r) => return r,
                None => continue, // lost the race for this slot: look again
            },
            _ => {
                // Another thread is filling it in (a few stores and a decode).
                core::hint::spin_loop();
                continue;
            }
        }
        probes += 1;
        i = (i + 1) & (CAP - 1);
    }
    DROPPED.fetch_add(1, Relaxed);
    (0, super::route::heap_for(ra))
}

#[cold]
fn intern(i: usize, ra: usize, gate_ra: usize) -> Option<(u16, usize)> {
    crate::pku::with_shim_writes(|| intern_open(i, ra, gate_ra))
}

fn intern_open(i: usize, ra: usize, gate_ra: usize) -> Option<(u16, usize)> {
    let s = &TABLE.0[i];
    s.state
        .compare_exchange(EMPTY, CLAIMED, AcqRel, Acquire)
        .ok()?;
    let compartment = super::route::heap_for(ra);
    let gate = if gate_ra == 0 {
        0
    } else {
        gate_target(gate_ra)
    };
    let shared = compartment != 0 && policy().is_some_and(|p| p.matches(ra, gate));
    let heap = if shared { 0 } else { compartment };
    s.ra.store(ra, Relaxed);
    s.gate_ra.store(gate_ra, Relaxed);
    s.gate.store(gate, Relaxed);
    s.compartment.store(compartment as u8, Relaxed);
    s.flags.store(if shared { POLICY } else { 0 }, Relaxed);
    s.heap.store(heap as u8, Relaxed);
    s.state.store(READY, Release);
    Some(((i + 1) as u16, heap))
}

/// After the routes changed (`dlopen`, `dlclose`): every interned site takes
/// the heap of its call site's compartment under the new table (a site in a
/// `dlopen`ed object that allocated from its constructors, before the
/// object had a route, was interned on the shared heap). Sites that audit
/// mode moved to the shared heap stay there.
pub fn reroute() {
    crate::pku::with_shim_writes(reroute_open);
}

fn reroute_open() {
    for (_, s) in all() {
        let ra = s.ra.load(Relaxed);
        let compartment = super::route::heap_for(ra);
        let gate = s.gate.load(Relaxed);
        let shared = compartment != 0 && policy().is_some_and(|p| p.matches(ra, gate));
        let learned = s.flags.load(Relaxed) & LEARNED != 0;
        s.compartment.store(compartment as u8, Relaxed);
        if shared {
            s.flags.fetch_or(POLICY, Relaxed);
        } else {
            s.flags.fetch_and(!POLICY, Relaxed);
        }
        let heap = if shared || learned { 0 } else { compartment };
        s.heap.store(heap as u8, Relaxed);
    }
}

/// The site with id `id`, once interned.
pub fn get(id: u16) -> Option<&'static Site> {
    let s = TABLE.0.get((id as usize).checked_sub(1)?)?;
    (s.state.load(Acquire) == READY).then_some(s)
}

/// Every interned site with its id.
pub fn all() -> impl Iterator<Item = (u16, &'static Site)> {
    TABLE
        .0
        .iter()
        .enumerate()
        .filter(|(_, s)| s.state.load(Acquire) == READY)
        .map(|(i, s)| ((i + 1) as u16, s))
}

/// Audit mode: another compartment touched a block of site `id`. Later
/// allocations there come from the shared heap, as the learned policy
/// will make them; returns whether the site was new to the learned set.
pub fn learn_shared(id: u16) -> bool {
    let Some(s) = get(id) else { return false };
    if s.compartment.load(Relaxed) == 0 {
        return false;
    }
    crate::pku::with_shim_writes(|| {
        s.heap.store(0, Relaxed);
        s.flags.fetch_or(LEARNED, Relaxed) & LEARNED == 0
    })
}

// ---------------------------------------------------------------- gates

/// The target of the gate called from the call that returns to `gate_ra`.
fn gate_target(gate_ra: usize) -> usize {
    use super::route::heap_for;
    // The caller is compartment code (gates are patched into compartment
    // objects only): its text is mapped on both sides of the call.
    if heap_for(gate_ra) == 0 || heap_for(gate_ra - 6) == 0 {
        return 0;
    }
    // The GOT slot may be in the caller's tagged data (.got.plt of a lazily
    // bound object): read it with every key, as the shim's own code.
    let hw = crate::pku::backend() == crate::pku::Backend::Hardware;
    let before = crate::pku::read_pkru();
    if hw {
        crate::pku::write_pkru(0);
    }
    let t = call_slot(gate_ra)
        // SAFETY: a GOT slot inside the caller's object (checked mapped by
        // the decode), readable with every key.
        .map(|slot| unsafe { (slot as *const usize).read() })
        // A pool stub (GOT gate), or an entry-gated function that the slot
        // reaches directly (`-fno-plt` calls, GLOB_DAT slots).
        .and_then(|v| {
            crate::gates::stub_target(v).or_else(|| crate::gates::entry_gated(v).then_some(v))
        })
        .unwrap_or(0);
    if hw {
        crate::pku::write_pkru(before);
    }
    t
}

/// The GOT slot that the call ending at `ra` goes through.
fn call_slot(ra: usize) -> Option<usize> {
    let rel = |at: usize| {
        // SAFETY: text bytes of a compartment object (the caller checked
        // that the range is mapped code).
        let d = unsafe { core::ptr::read_unaligned(at as *const i32) };
        d as isize
    };
    // SAFETY: as above; ra - 6 is inside the caller's text.
    let b = unsafe { core::slice::from_raw_parts((ra - 6) as *const u8, 6) };
    if b[0] == 0xff && b[1] == 0x15 {
        // call qword ptr [rip + disp32]  (-fno-plt, -z now)
        return Some(ra.wrapping_add_signed(rel(ra - 4)));
    }
    if b[1] != 0xe8 {
        return None; // through a register or memory operand: a function pointer
    }
    // call rel32 to a PLT entry: [endbr64] [bnd] jmp qword ptr [rip + disp32]
    let plt = ra.wrapping_add_signed(rel(ra - 4));
    if super::route::heap_for(plt) == 0 || super::route::heap_for(plt + 16) == 0 {
        return None;
    }
    // SAFETY: a PLT entry in the same compartment's text (checked above).
    let e = unsafe { core::slice::from_raw_parts(plt as *const u8, 16) };
    let mut i = if e[..4] == [0xf3, 0x0f, 0x1e, 0xfa] {
        4
    } else {
        0
    };
    if e[i] == 0xf2 {
        i += 1;
    }
    (e[i] == 0xff && e[i + 1] == 0x25).then(|| (plt + i + 6).wrapping_add_signed(rel(plt + i + 2)))
}

// ---------------------------------------------------------------- the policy

/// `IA2_HEAP_SHARED`, resolved to addresses at start-up.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy(pub Vec<(Option<usize>, Option<usize>)>);

impl Policy {
    /// Does an entry name the call from `ra` inside gate `gate` (0: none)?
    pub fn matches(&self, ra: usize, gate: usize) -> bool {
        self.0
            .iter()
            .any(|&(c, g)| c.is_none_or(|c| c == ra) && g.is_none_or(|g| g != 0 && g == gate))
    }

    /// Resolve each entry against the loaded objects. An entry that names
    /// nothing is an error (one line, for `fatal`).
    pub fn resolve(list: &HeapSharedList, objects: &[LoadedObject]) -> Result<Policy, String> {
        let mut v = Vec::new();
        for e in list.entries() {
            let code = e.code.map(|c| resolve_code(c, objects)).transpose()?;
            let gate = e.gate.map(|g| resolve_gate(g, objects)).transpose()?;
            v.push((code, gate));
        }
        Ok(Policy(v))
    }
}

fn matching<'a>(glob: &str, objects: &'a [LoadedObject]) -> Vec<&'a LoadedObject> {
    objects
        .iter()
        .filter(|o| crate::compartments::glob_match(glob, &o.basename))
        .collect()
}

fn loaded(objects: &[LoadedObject]) -> String {
    objects
        .iter()
        .map(|o| o.basename.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

fn resolve_code(c: CodeRef, objects: &[LoadedObject]) -> Result<usize, String> {
    match c {
        CodeRef::Offset(glob, off) => match matching(glob, objects).first() {
            Some(o) => Ok(o.base + off),
            None => Err(format!(
                "IA2_HEAP_SHARED={glob}+{off:#x}: no loaded object matches {glob:?}; loaded objects: {}",
                loaded(objects)
            )),
        },
        CodeRef::Symbol(glob, sym, off) => {
            let objs = matching(glob, objects);
            if objs.is_empty() {
                return Err(format!(
                    "IA2_HEAP_SHARED={glob}:{sym}+{off:#x}: no loaded object matches {glob:?}; loaded objects: {}",
                    loaded(objects)
                ));
            }
            objs.iter()
                .find_map(|o| crate::carveouts::find_symbol(o, sym))
                .map(|(r, _)| r.start + off)
                .ok_or_else(|| {
                    format!("IA2_HEAP_SHARED={glob}:{sym}+{off:#x}: symbol {sym:?} not found in {glob} (searched dynsym, .symtab and /usr/lib/debug/.build-id)")
                })
        }
    }
}

fn resolve_gate(g: GateRef, objects: &[LoadedObject]) -> Result<usize, String> {
    let (objs, sym, text) = match g {
        GateRef::Symbol(sym) => (objects.iter().collect::<Vec<_>>(), sym, sym.to_string()),
        GateRef::ObjectSymbol(glob, sym) => (matching(glob, objects), sym, format!("{glob}:{sym}")),
    };
    // A gate's target is what a JUMP_SLOT or GLOB_DAT relocation resolved
    // to: a dynamic symbol (no object file needs reading).
    objs.iter()
        .find_map(|o| crate::carveouts::dynsym_range(o, sym))
        .map(|r| r.start)
        .ok_or_else(|| {
            format!(
                "IA2_HEAP_SHARED=gate:{text}: no dynamic symbol {sym:?} in any matching object; loaded objects: {}",
                loaded(objects)
            )
        })
}

/// The `IA2_HEAP_SHARED` policy (which sites the shared heap serves): the
/// pointer on a page of its own and the policy in the sealed heap, both on
/// the shim key once hardened.
#[repr(C, align(4096))]
struct PolicyPtr(AtomicPtr<Policy>);
static POLICY_PTR: PolicyPtr = PolicyPtr(AtomicPtr::new(core::ptr::null_mut()));

/// Publish the resolved policy (before the first compartment allocation).
pub fn install(p: Policy) {
    if !p.0.is_empty() {
        // Leaked on purpose: readers hold no lock.
        crate::sealed::with_sealed(|| {
            POLICY_PTR
                .0
                .store(Box::into_raw(Box::new(p.clone())), Release)
        });
    }
}

fn policy() -> Option<&'static Policy> {
    let p = POLICY_PTR.0.load(Acquire);
    // SAFETY: published policies are never freed.
    (!p.is_null()).then(|| unsafe { &*p })
}

// ---------------------------------------------------------------- accounting

/// Count bytes per compartment and site (set for `IA2_REPORT=heap` and audit mode).
pub static ACCOUNT: AtomicBool = AtomicBool::new(false);

/// Per compartment (the caller's), private [0] and shared [1]: bytes ever
/// allocated, bytes live now, and the most bytes live at once.
struct Usage {
    total: [AtomicU64; 2],
    live: [AtomicI64; 2],
    peak: [AtomicI64; 2],
}

#[allow(clippy::declare_interior_mutable_const)]
const NEW_USAGE: Usage = Usage {
    total: [const { AtomicU64::new(0) }; 2],
    live: [const { AtomicI64::new(0) }; 2],
    peak: [const { AtomicI64::new(0) }; 2],
};

static USAGE: [Usage; 16] = [NEW_USAGE; 16];

/// A block of `size` usable bytes allocated (`+`) or freed (`-`) at site `id`
/// in heap `heap`.
pub fn account(id: u16, heap: usize, size: usize, alloc: bool) {
    let Some(s) = get(id) else { return };
    let c = s.compartment.load(Relaxed) as usize;
    if c == 0 || c >= 16 {
        return;
    }
    let k = usize::from(heap == 0);
    let u = &USAGE[c];
    if alloc {
        if let Some(n) = counts(id) {
            n.bytes.fetch_add(size as u64, Relaxed);
            n.blocks.fetch_add(1, Relaxed);
        }
        u.total[k].fetch_add(size as u64, Relaxed);
        let now = u.live[k].fetch_add(size as i64, Relaxed) + size as i64;
        u.peak[k].fetch_max(now, Relaxed);
    } else {
        u.live[k].fetch_sub(size as i64, Relaxed);
    }
}

/// One compartment's usage: (private total, shared total, private peak, shared peak).
pub fn usage(c: usize) -> (u64, u64, u64, u64) {
    let u = &USAGE[c];
    (
        u.total[0].load(Relaxed),
        u.total[1].load(Relaxed),
        u.peak[0].load(Relaxed).max(0) as u64,
        u.peak[1].load(Relaxed).max(0) as u64,
    )
}

pub fn dropped() -> u64 {
    DROPPED.load(Relaxed)
}

// ---------------------------------------------------------------- terms

/// A site as a policy term: `object:symbol+0xOFF` or `object+0xOFF`, then
/// `@gate:symbol` when the allocation happened inside a named gate. Needs
/// the census for object names; `dladdr1` for symbols (call with all keys).
pub struct Term<'a> {
    pub ra: usize,
    pub gate: usize,
    pub objects: Option<&'a [LoadedObject]>,
}

impl fmt::Display for Term<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_code(f, self.ra, true, self.objects)?;
        if self.gate != 0 {
            f.write_str("@")?;
            write_gate(f, self.gate, self.objects)?;
        }
        Ok(())
    }
}

/// `gate:symbol` for a gate's target (else `gate:object+0xOFF`).
pub fn write_gate<W: Write>(
    f: &mut W,
    gate: usize,
    objects: Option<&[LoadedObject]>,
) -> fmt::Result {
    f.write_str("gate:")?;
    match dynsym_at(gate, false) {
        Some((name, 0)) => f.write_str(name),
        _ => write_code(f, gate, false, objects),
    }
}

/// `object:symbol+0xOFF` or `object+0xOFF` of a code address (`ret`: a
/// return address, symbolised by the call before it).
pub fn write_code<W: Write>(
    f: &mut W,
    addr: usize,
    ret: bool,
    objects: Option<&[LoadedObject]>,
) -> fmt::Result {
    let obj = objects.and_then(|os| os.iter().find(|o| o.contains(addr)));
    let Some(o) = obj else {
        return write!(f, "{addr:#x}");
    };
    match dynsym_at(addr, ret) {
        Some((name, off)) => write!(f, "{}:{name}+{off:#x}", o.basename),
        None => write!(f, "{}+{:#x}", o.basename, addr - o.base),
    }
}

/// The dynsym symbol whose extent holds `addr` (a return address, `ret`,
/// may be one past a `noreturn` call's end: looked up at `addr - 1`), and
/// the offset of `addr` from it.
fn dynsym_at(addr: usize, ret: bool) -> Option<(&'static str, usize)> {
    const RTLD_DL_SYMENT: i32 = 1;
    // SAFETY: zeroed Dl_info is valid for dladdr1 to fill.
    let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
    let mut sym: *mut c_void = core::ptr::null_mut();
    let probe = if ret {
        addr.saturating_sub(1).max(1)
    } else {
        addr
    };
    // SAFETY: dladdr1 only reads loader data and fills the out pointers.
    if unsafe { libc::dladdr1(probe as *const c_void, &mut info, &mut sym, RTLD_DL_SYMENT) } == 0
        || info.dli_sname.is_null()
        || sym.is_null()
    {
        return None;
    }
    // SAFETY: RTLD_DL_SYMENT yields the ElfW(Sym); st_size is at offset 16.
    let size = unsafe { core::ptr::read_unaligned((sym as *const u8).add(16) as *const u64) };
    let start = info.dli_saddr as usize;
    if probe < start || probe >= start + size.max(1) as usize {
        return None;
    }
    // SAFETY: a NUL-terminated string owned by the loader.
    let name = unsafe { core::ffi::CStr::from_ptr(info.dli_sname) }
        .to_str()
        .ok()?;
    Some((name, addr - start))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policy_matching() {
        let p = Policy(vec![
            (Some(0x1000), None),
            (None, Some(0x9000)),
            (Some(0x2000), Some(0x8000)),
        ]);
        assert!(p.matches(0x1000, 0));
        assert!(p.matches(0x1000, 0x7777));
        assert!(p.matches(0x5555, 0x9000), "gate alone");
        assert!(!p.matches(0x5555, 0));
        assert!(p.matches(0x2000, 0x8000));
        assert!(!p.matches(0x2000, 0x9001), "code and gate both needed");
        assert!(!p.matches(0x2000, 0));
        assert!(!Policy::default().matches(0x1000, 0));
    }

    #[test]
    fn call_slots_are_decoded() {
        // call [rip+0x100] ending at the buffer's end.
        let mut code = [0x90u8; 32];
        code[10..16].copy_from_slice(&[0xff, 0x15, 0x00, 0x01, 0x00, 0x00]);
        let ra = code.as_ptr() as usize + 16;
        assert_eq!(call_slot(ra), Some(ra + 0x100));
        code[10..16].copy_from_slice(&[0x90, 0xff, 0xd0, 0x90, 0x90, 0x90]);
        assert_eq!(call_slot(ra), None, "call through a register");
    }
}
