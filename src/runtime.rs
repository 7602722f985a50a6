//! The runtime core: the process-wide [`Runtime`] that start-up builds (the
//! configuration, the key table, the census), and the questions every
//! feature asks of it (which compartment, which key, which PKRU). It imports
//! no feature module.

use crate::carveouts::Located;
use crate::config::{Config, PkuMode};
use crate::lifecycle::{state, InitState};
use crate::maps::Mapping;
use crate::objects::LoadedObject;
use crate::pku::{self, PkuSupport};
use crate::plan::Plan;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU32, Ordering};
use std::sync::{
    LockResult, OnceLock, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError, TryLockResult,
};

/// The census, the compartment assignment and the applied plan. Mutable
/// because `dlopen` extends it.
#[derive(Clone, Debug, Default)]
pub struct Census {
    pub objects: Vec<LoadedObject>,
    pub compartment_of: Vec<Option<u8>>,
    pub carveouts: Vec<Located>,
    pub plan: Plan,
    /// Auto mode's grouping, when a program has more application objects
    /// than keys (one line per compartment; empty otherwise).
    pub groups: Vec<String>,
    /// `/proc/self/maps` as the latest census (start-up or `dlopen`) read
    /// it, once: the plan's page protections, and GOT patching's.
    pub maps: Vec<Mapping>,
}

impl Census {
    pub fn object_at(&self, addr: usize) -> Option<(usize, &LoadedObject)> {
        self.objects
            .iter()
            .enumerate()
            .find(|(_, o)| o.contains(addr))
    }
}

pub struct Runtime {
    pub config: Config,
    pub pku: PkuSupport,
    pub census: CensusLock,
}

/// The census behind a reader-writer lock, split in two: the census (its
/// header here, in the runtime's page, and its blocks in the sealed heap)
/// goes on the shim key once hardened, while the lock word stays on key 0,
/// because readers with a compartment's rights take it. A compartment that
/// holds the lock can stall the shim, not change its answers. Writers
/// change the census only through [`CensusWrite::update`], which opens
/// the shim key and allocates from the sealed heap.
pub struct CensusLock(UnsafeCell<Census>);

// SAFETY: the census is read under CENSUS_LOCK's read side and written
// under its write side only.
unsafe impl Sync for CensusLock {}

static CENSUS_LOCK: RwLock<()> = RwLock::new(());

/// The census, readable while this lives.
pub struct CensusRead<'a> {
    _g: RwLockReadGuard<'static, ()>,
    c: &'a Census,
}

impl core::ops::Deref for CensusRead<'_> {
    type Target = Census;
    fn deref(&self) -> &Census {
        self.c
    }
}

/// The census, held for writing: readable, and changed through [`Self::update`].
pub struct CensusWrite<'a> {
    _g: RwLockWriteGuard<'static, ()>,
    cell: &'a CensusLock,
}

impl core::ops::Deref for CensusWrite<'_> {
    type Target = Census;
    fn deref(&self) -> &Census {
        // SAFETY: the write lock is held: no one else has a reference.
        unsafe { &*self.cell.0.get() }
    }
}

impl CensusWrite<'_> {
    /// Change the census inside a sealed scope (the shim key open, new
    /// blocks from the sealed heap). Whatever `f` moves in must have been
    /// made inside the scope too: clone it there.
    pub fn update<R>(&mut self, f: impl FnOnce(&mut Census) -> R) -> R {
        // SAFETY: the write lock is held and `self` is borrowed mutably:
        // this is the only reference.
        let c = unsafe { &mut *self.cell.0.get() };
        crate::sealed::with_sealed(|| f(c))
    }
}

impl CensusLock {
    pub fn new(c: Census) -> Self {
        CensusLock(UnsafeCell::new(c))
    }

    /// Never poisoned (`panic = "abort"`); the `LockResult` keeps
    /// `RwLock`'s shape for the callers.
    pub fn read(&self) -> LockResult<CensusRead<'_>> {
        let g = CENSUS_LOCK.read().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the read lock is held: writers wait.
        let c = unsafe { &*self.0.get() };
        Ok(CensusRead { _g: g, c })
    }

    pub fn try_read(&self) -> TryLockResult<CensusRead<'_>> {
        let g = match CENSUS_LOCK.try_read() {
            Ok(g) => g,
            Err(TryLockError::Poisoned(e)) => e.into_inner(),
            Err(TryLockError::WouldBlock) => return Err(TryLockError::WouldBlock),
        };
        // SAFETY: the read lock is held: writers wait.
        let c = unsafe { &*self.0.get() };
        Ok(CensusRead { _g: g, c })
    }

    pub fn write(&self) -> LockResult<CensusWrite<'_>> {
        let g = CENSUS_LOCK.write().unwrap_or_else(|e| e.into_inner());
        Ok(CensusWrite { _g: g, cell: self })
    }
}

/// The hardware (or simulated) key of each logical compartment (0 =
/// unused), on a page of its own that `IA2_HARDEN=on` puts on the shim key
/// ([`seal_keys`]): every PKRU the shim computes comes from here, so a
/// compartment that rewrote an entry would hand itself another
/// compartment's key at its next thread start, handler or gate.
#[repr(C, align(4096))]
struct KeyTable([AtomicU32; 16]);
static KEYS: KeyTable = KeyTable([const { AtomicU32::new(0) }; 16]);
const _: () = assert!(core::mem::size_of::<KeyTable>() == 4096);

/// Set the key table (start-up, before any compartment code runs).
pub fn set_keys(keys: [u32; 16]) {
    for (slot, k) in KEYS.0.iter().zip(keys) {
        slot.store(k, Ordering::Relaxed);
    }
}

/// Put the key table, the runtime and the sealed heap (the census's
/// blocks) on the shim key (`IA2_HARDEN=on`, hardware keys).
pub fn seal_keys(shim_key: u32) {
    pku::seal_static(&KEYS, shim_key, "key table");
    pku::seal_static(&RUNTIME, shim_key, "runtime (configuration and census)");
    crate::sealed::harden(shim_key);
}

impl Runtime {
    /// The key table (see [`KEYS`]).
    pub fn keys(&self) -> [u32; 16] {
        core::array::from_fn(|c| KEYS.0[c].load(Ordering::Relaxed))
    }

    /// Is the shim enforcing (or simulating) compartments?
    pub fn active(&self) -> bool {
        self.config.pku != PkuMode::Off
    }

    pub fn key_of(&self, compartment: u8) -> u32 {
        KEYS.0
            .get(compartment as usize)
            .map_or(0, |k| k.load(Ordering::Relaxed))
    }

    /// The logical compartment that owns `key`, if any.
    pub fn compartment_of_key(&self, key: u32) -> Option<u8> {
        (1..16u8).find(|&c| key != 0 && self.key_of(c) == key)
    }

    /// PKRU for running as `compartment`: key 0 plus its own key.
    pub fn pkru_for(&self, compartment: u8) -> u32 {
        pku::compartment_pkru(self.key_of(compartment))
    }

    /// PKRU allowing every key the shim allocated (the start-up state).
    pub fn pkru_all_compartments(&self) -> u32 {
        let mask = self
            .keys()
            .iter()
            .fold(1u32, |m, &k| if k != 0 { m | 1 << k } else { m });
        pku::pkru_allowing_set(mask) & !pku::shim_read_bit()
    }

    /// The first compartment whose key `pkru` lets read (fault reports: the
    /// compartment that was running).
    pub fn running_compartment(&self, pkru: u32) -> Option<u8> {
        (1..16u8).find(|&c| {
            let k = self.key_of(c);
            k != 0 && pku::pkru_allows(pkru, k, false)
        })
    }

    /// The compartment the main executable belongs to.
    pub fn main_compartment(&self) -> Option<u8> {
        self.census
            .read()
            .ok()?
            .compartment_of
            .first()
            .copied()
            .flatten()
    }

    /// The compartment of the object that contains `addr` (text, data or
    /// anything else it maps). Use it to route by code address; `None`: a
    /// shared object or no object.
    pub fn compartment_of_addr(&self, addr: usize) -> Option<u8> {
        let c = self.census.read().ok()?;
        c.object_at(addr).and_then(|(i, _)| c.compartment_of[i])
    }

    /// The compartment whose key tags the page holding `addr`, per the
    /// applied plan (`None`: the page is on key 0).
    pub fn page_compartment(&self, addr: usize) -> Option<u8> {
        let c = self.census.read().ok()?;
        c.plan.lookup(addr).and_then(|e| e.compartment)
    }
}

/// The runtime, on pages of its own that `IA2_HARDEN=on` puts on the shim
/// key ([`seal_keys`]): the configuration (`IA2_DEBUG_API` among it) and
/// the census header.
#[repr(C, align(4096))]
struct RuntimeCell(OnceLock<Runtime>);
static RUNTIME: RuntimeCell = RuntimeCell(OnceLock::new());

/// Publish the runtime that start-up built; false if one was already set.
/// The census is cloned into the sealed heap on the way.
pub fn set(rt: Runtime) -> bool {
    let Runtime {
        config,
        pku,
        census,
    } = rt;
    let census = census.0.into_inner();
    crate::sealed::with_sealed(|| {
        RUNTIME
            .0
            .set(Runtime {
                config,
                pku,
                census: CensusLock::new(census.clone()),
            })
            .is_ok()
    })
}

/// The runtime, once the constructor has built it.
pub fn get() -> Option<&'static Runtime> {
    RUNTIME.0.get()
}

/// The runtime, only when it is `Ready` and active.
pub fn active() -> Option<&'static Runtime> {
    if state() == InitState::Ready {
        get().filter(|r| r.active())
    } else {
        None
    }
}

/// Switch to the main executable's compartment right before `main`;
/// returns the PKRU to restore when `main` returns.
pub fn enter_main_compartment() -> u32 {
    let before = pku::read_pkru();
    if let Some(rt) = active() {
        if let Some(c) = rt.main_compartment() {
            pku::write_pkru(rt.pkru_for(c));
        }
    }
    before
}

/// Restore the PKRU that `enter_main_compartment` saved.
pub fn leave_main_compartment(pkru: u32) {
    if active().is_some() {
        pku::write_pkru(pkru);
    }
}

/// The compartment whose key the calling thread's PKRU allows; 0 when it
/// allows none or several (start-up state, shared code).
pub fn current_compartment() -> Option<u8> {
    let rt = active()?;
    let pkru = pku::read_pkru();
    let mut found = None;
    for c in 1..16u8 {
        let k = rt.key_of(c);
        if k != 0 && pku::pkru_allows(pkru, k, false) {
            if found.is_some() {
                return Some(0);
            }
            found = Some(c);
        }
    }
    Some(found.unwrap_or(0))
}

/// The key of compartment `c`, if the shim allocated one.
pub fn key_of_compartment(c: i32) -> Option<u32> {
    let rt = active()?;
    let c = u8::try_from(c).ok().filter(|c| (1..16).contains(c))?;
    Some(rt.key_of(c)).filter(|&k| k != 0)
}

/// `ia2_switch_compartment`: returns the previous compartment or -1.
/// Refused (-1, `EPERM`) unless `IA2_DEBUG_API=1`: it hands any caller any
/// compartment's rights, so it must not exist for compartment code.
pub fn switch_compartment(c: i32) -> i32 {
    let Some(rt) = active() else { return -1 };
    if !rt.config.debug_api {
        log::warn!("ia2_switch_compartment({c}) refused: set IA2_DEBUG_API=1 to allow it");
        set_errno(libc::EPERM);
        return -1;
    }
    let prev = current_compartment().map_or(0, i32::from);
    let pkru = if c == 0 {
        rt.pkru_all_compartments()
    } else {
        match key_of_compartment(c) {
            Some(k) => pku::compartment_pkru(k),
            None => return -1,
        }
    };
    pku::write_pkru(pkru);
    prev
}

/// Run `f` with the libc compartment's rights added to the caller's, in
/// strict mode (otherwise as it is): the shim's interposed libc and ld.so
/// entry points (`pthread_create`, `fork`, `dlopen`, `dlclose`, `dlsym`)
/// call the real function this way, because it touches libc or loader state.
pub fn with_libc_rights<R>(f: impl FnOnce() -> R) -> R {
    let union = active().and_then(|rt| {
        let n = rt.config.libc_compartment?;
        Some(pku::read_pkru() & !(3 << (2 * rt.key_of(n))))
    });
    let Some(u) = union else { return f() };
    let saved = pku::read_pkru();
    pku::write_pkru(u);
    let r = f();
    pku::write_pkru(saved);
    r
}

/// Set the calling thread's `errno` (refused calls of interposed functions).
pub fn set_errno(e: i32) {
    // SAFETY: __errno_location returns the calling thread's errno slot.
    unsafe { *libc::__errno_location() = e };
}
