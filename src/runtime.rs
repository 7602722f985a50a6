//! The init state machine (`Uninit → Initializing → Ready | Failed`) and the
//! process-wide runtime that the constructor builds.
//!
//! Hooks consult [`state`]: until the runtime is `Ready` they pass straight
//! through to the real function, because a hook can run before our
//! constructor (another library's constructor calling `sigaction`) or during
//! it (our own census calling into libc), and there is nothing to enforce yet.

use crate::carveouts::{self, Located};
use crate::compartments;
use crate::config::{Config, PkuMode};
use crate::maps;
use crate::objects::{self, LoadedObject};
use crate::pku::{self, Backend, PkuSupport};
use crate::plan::{self, Plan, ThreadTls};
use crate::stackfmt::{pid, StackBuf};
use core::fmt::Write;
use core::sync::atomic::{AtomicU8, Ordering};
use std::sync::{OnceLock, RwLock};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum InitState {
    Uninit = 0,
    Initializing = 1,
    Ready = 2,
    Failed = 3,
}

static STATE: AtomicU8 = AtomicU8::new(InitState::Uninit as u8);

pub fn state() -> InitState {
    match STATE.load(Ordering::Acquire) {
        0 => InitState::Uninit,
        1 => InitState::Initializing,
        2 => InitState::Ready,
        _ => InitState::Failed,
    }
}

/// The census, the compartment assignment and the applied plan. Mutable
/// because `dlopen` extends it.
#[derive(Debug, Default)]
pub struct Census {
    pub objects: Vec<LoadedObject>,
    pub compartment_of: Vec<Option<u8>>,
    pub carveouts: Vec<Located>,
    pub plan: Plan,
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
    /// Hardware (or simulated) key of each logical compartment; 0 = unused.
    pub keys: [u32; 16],
    pub census: RwLock<Census>,
}

impl Runtime {
    /// Is the shim enforcing (or simulating) compartments?
    pub fn active(&self) -> bool {
        self.config.pku != PkuMode::Off
    }

    pub fn key_of(&self, compartment: u8) -> u32 {
        self.keys.get(compartment as usize).copied().unwrap_or(0)
    }

    /// The logical compartment that owns `key`, if any.
    pub fn compartment_of_key(&self, key: u32) -> Option<u8> {
        (1..16u8).find(|&c| key != 0 && self.keys[c as usize] == key)
    }

    /// PKRU for running as `compartment`: key 0 plus its own key.
    pub fn pkru_for(&self, compartment: u8) -> u32 {
        pku::pkru_allowing(self.key_of(compartment))
    }

    /// PKRU allowing every key the shim allocated (the start-up state).
    pub fn pkru_all_compartments(&self) -> u32 {
        let mask = self
            .keys
            .iter()
            .fold(1u32, |m, &k| if k != 0 { m | 1 << k } else { m });
        pku::pkru_allowing_set(mask)
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

static RUNTIME: OnceLock<Runtime> = OnceLock::new();

/// The runtime, once the constructor has built it.
pub fn get() -> Option<&'static Runtime> {
    RUNTIME.get()
}

/// The runtime, only when it is `Ready` and active.
pub fn active() -> Option<&'static Runtime> {
    if state() == InitState::Ready {
        get().filter(|r| r.active())
    } else {
        None
    }
}

/// Print a one-line fatal error and exit with status 1 without running
/// anything else of the program (fail closed). Allocation-free.
pub fn fatal(args: core::fmt::Arguments<'_>) -> ! {
    STATE.store(InitState::Failed as u8, Ordering::Release);
    let mut b = StackBuf::<2048>::new();
    let _ = writeln!(b, "ia2shim[{}]: fatal: {}", pid(), args);
    b.write_to_fd(2);
    // SAFETY: _exit never returns; skipping atexit handlers is the point.
    unsafe { libc::_exit(1) }
}

/// Write a line to stderr regardless of the log level (banners and notices
/// that a user must see).
pub fn notice(args: core::fmt::Arguments<'_>) {
    let mut b = StackBuf::<1024>::new();
    let _ = writeln!(b, "ia2shim[{}]: {}", pid(), args);
    b.write_to_fd(2);
}

/// The constructor's work. Runs once; later calls return at once.
pub fn init() {
    if STATE
        .compare_exchange(
            InitState::Uninit as u8,
            InitState::Initializing as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        )
        .is_err()
    {
        return;
    }
    let config = match Config::from_environ() {
        Ok(c) => c,
        Err(e) => fatal(format_args!("{e}")),
    };
    if config.help {
        let mut b = StackBuf::<16384>::new();
        let _ = crate::config::write_help(&mut b);
        b.write_to_fd(1);
        // SAFETY: exiting before the program runs, as IA2_HELP promises.
        unsafe { libc::_exit(0) }
    }
    if let Err(errno) = crate::logging::init(config.log_level, config.log_file) {
        fatal(format_args!(
            "IA2_LOG_FILE={:?}: cannot open for appending (errno {errno})",
            config.log_file.unwrap_or("")
        ));
    }
    crate::hooks::resolve_real_functions();
    crate::alloc::prepare();

    let support = match config.pku {
        PkuMode::Off => {
            notice(format_args!(
                "IA2_PKU=off: the shim is disabled; nothing is protected"
            ));
            let _ = RUNTIME.set(Runtime {
                config,
                pku: PkuSupport {
                    cpu_pku: false,
                    os_pke: false,
                    syscall: Err(0),
                },
                keys: [0; 16],
                census: RwLock::new(Census::default()),
            });
            STATE.store(InitState::Ready as u8, Ordering::Release);
            return;
        }
        PkuMode::Require => {
            let s = pku::probe();
            if !s.usable() {
                fatal(format_args!(
                    "IA2_PKU=require: no usable memory protection keys: {s}. \
                     Run the program under `ia2run --vm -- CMD` (a PKU-capable QEMU guest), \
                     or set IA2_PKU=sim to simulate keys without enforcement, or IA2_PKU=off"
                ));
            }
            pku::set_backend(Backend::Hardware);
            s
        }
        PkuMode::Sim => {
            notice(format_args!(
                "IA2_PKU=sim: protection keys are SIMULATED; nothing is enforced"
            ));
            pku::set_backend(Backend::Sim);
            pku::probe()
        }
    };

    let census = build_census(&config);
    let mut keys = [0u32; 16];
    let used = census
        .compartment_of
        .iter()
        .flatten()
        .fold(0u32, |m, &c| m | 1 << c);
    for c in 1..16u8 {
        if used & (1 << c) != 0 {
            keys[c as usize] = pku::alloc_key().unwrap_or_else(|e| {
                fatal(format_args!(
                    "pkey_alloc for compartment {c} failed (errno {e})"
                ))
            });
        }
    }
    if let Err((entry, errno)) = crate::apply::apply(&census.plan, &keys) {
        fatal(format_args!(
            "pkey_mprotect({}, prot {:#x}, key of compartment {:?}) failed (errno {errno})",
            entry.range, entry.prot, entry.compartment
        ));
    }
    let rt = Runtime {
        config,
        pku: support,
        keys,
        census: RwLock::new(census),
    };
    if RUNTIME.set(rt).is_err() {
        fatal(format_args!("runtime initialised twice"));
    }
    let rt = get().expect("just set");
    crate::fault::install();
    crate::gates::install(rt);
    crate::report::startup(rt);
    crate::alloc::start(rt);
    crate::threads::init();
    STATE.store(InitState::Ready as u8, Ordering::Release);
}

/// Census, assignment, carveouts and plan for the objects loaded now.
fn build_census(config: &Config) -> Census {
    let objects = objects::census();
    let assignment =
        compartments::assign(&objects, config).unwrap_or_else(|e| fatal(format_args!("{e}")));
    for w in &assignment.warnings {
        log::warn!("{w}");
    }
    let maps = maps::read_self_maps()
        .unwrap_or_else(|e| fatal(format_args!("reading /proc/self/maps: {e}")));
    let mut carveouts = carveouts::thread_carveouts(config);
    carveouts.push(carveouts::copy_relocs(
        config,
        &objects,
        &assignment.of_object,
    ));
    // The libc and ld.so carveouts matter only when libc and ld.so carry a
    // key (strict mode); their decoders cost start-up time, so they run then.
    if config.libc_compartment.is_some() {
        carveouts.push(carveouts::tls_generation(config, &objects));
        carveouts.push(carveouts::libc_tuning(config, &objects));
        carveouts.push(carveouts::libc_single_threaded(config, &objects));
        carveouts.push(carveouts::pthread_once(config, &objects));
        carveouts.push(carveouts::mutex_elision(config, &objects));
    }
    // Strict mode tags the loader heap with the libc compartment's key.
    let mut extra = Vec::new();
    if let Some(n) = config.libc_compartment {
        let heap = carveouts::loader_heap(&maps, &objects);
        extra.extend(heap.iter().map(|&range| plan::ExtraRange {
            range,
            compartment: n,
            reason: plan::Reason::LoaderHeap,
        }));
        carveouts.push(carveouts::loader_heap_carveout(config, &heap));
    }
    match carveouts::user_share(config, &objects) {
        Ok(Some(l)) => carveouts.push(l),
        Ok(None) => {}
        Err(e) => fatal(format_args!("{e}")),
    }
    let main_thread = ThreadTls {
        thread: 0,
        blocks: objects
            .iter()
            .enumerate()
            .filter_map(|(i, o)| {
                let t = o.tls?;
                (t.block != 0).then(|| (i, objects::Range::new(t.block, t.block + t.memsz)))
            })
            .collect(),
    };
    let enabled = carveouts::enabled(&carveouts);
    let governed = carveouts::governed(&carveouts);
    let plan = plan::build(&plan::PlanInput {
        objects: &objects,
        compartment_of: &assignment.of_object,
        threads: &[main_thread],
        extra: &extra,
        carveouts: &enabled,
        governed: &governed,
        maps: &maps,
    });
    Census {
        objects,
        compartment_of: assignment.of_object,
        carveouts,
        plan,
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
pub fn switch_compartment(c: i32) -> i32 {
    let Some(rt) = active() else { return -1 };
    let prev = current_compartment().map_or(0, i32::from);
    let pkru = if c == 0 {
        rt.pkru_all_compartments()
    } else {
        match key_of_compartment(c) {
            Some(k) => pku::pkru_allowing(k),
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
