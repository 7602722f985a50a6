//! Threads (DESIGN.md, "Threads, signals, fork"): the `pthread_create`
//! trampoline and per-thread set-up and tear-down.
//!
//! The creator passes (start, arg, PKRU) to the child in a record from a
//! static pool in the shim's `.bss` (never `malloc`: the child frees it
//! under whatever PKRU it runs with; on the shim key with `IA2_HARDEN=on`,
//! which only the shim opens for writing). In the child, before the start
//! routine: its gate-frame stack, its TLS blocks of compartment modules
//! tagged (pages wholly inside one compartment's blocks), and its PKRU set
//! to the compartment that owns the start routine (shared code: the
//! creator's). A `pthread_key` destructor, which glibc runs on return,
//! `pthread_exit` and cancellation before it frees or caches the stack,
//! puts the TLS pages back on key 0: glibc hands cached stacks to later
//! threads and initialises their TLS from the creating thread.

use crate::objects::{Range, PAGE};
use crate::pku;
use crate::plan::{self, PlanEntry, ThreadTls};
use crate::runtime::{self, Runtime};
use core::ffi::{c_int, c_void};
use core::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::OnceLock;

pub type StartFn = extern "C" fn(*mut c_void) -> *mut c_void;

/// One start record. `state`: 0 free, 1 claimed.
#[repr(C)]
struct Slot {
    state: AtomicU32,
    start: AtomicUsize,
    arg: AtomicUsize,
    pkru: AtomicU32,
}

const SLOTS: usize = 1024;

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    state: AtomicU32::new(0),
    start: AtomicUsize::new(0),
    arg: AtomicUsize::new(0),
    pkru: AtomicU32::new(0),
};
/// The records on pages of their own, which `IA2_HARDEN=on` puts on the
/// shim key: a compartment that could rewrite a record between
/// `pthread_create` and the child's start would choose the PKRU and start
/// routine the child runs with.
#[repr(C, align(4096))]
struct Pool([Slot; SLOTS]);
static POOL: Pool = Pool([FREE; SLOTS]);

/// Put the start records on the shim key (`IA2_HARDEN=on`, at install).
pub fn harden(key: u32) {
    pku::seal_static(&POOL, key, "thread-start records");
}

fn claim(start: StartFn, arg: *mut c_void, pkru: u32) -> Option<usize> {
    pku::with_shim_writes(|| {
        for (i, s) in POOL.0.iter().enumerate() {
            if s.state
                .compare_exchange(0, 1, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                s.start.store(start as usize, Ordering::Relaxed);
                s.arg.store(arg as usize, Ordering::Relaxed);
                s.pkru.store(pkru, Ordering::Relaxed);
                return Some(i);
            }
        }
        None
    })
}

fn take(i: usize) -> (StartFn, *mut c_void, u32) {
    let s = &POOL.0[i];
    let start = s.start.load(Ordering::Relaxed);
    let arg = s.arg.load(Ordering::Relaxed) as *mut c_void;
    let pkru = s.pkru.load(Ordering::Relaxed);
    pku::with_shim_writes(|| s.state.store(0, Ordering::Release));
    // SAFETY: `start` was stored from a StartFn by `claim`.
    (
        unsafe { core::mem::transmute::<usize, StartFn>(start) },
        arg,
        pkru,
    )
}

/// The PKRU a new thread starts with: the compartment that owns its start
/// routine, else (shared code, or another compartment's internal function:
/// see `crate::deputy`) the creator's current PKRU.
pub fn child_pkru(rt: &Runtime, start: usize) -> u32 {
    crate::deputy::entry_pkru(rt, start, pku::read_pkru())
}

/// `pthread_create`: run `real` with the trampoline and a start record.
///
/// # Safety
/// As `pthread_create(3)`; `real` is glibc's.
pub unsafe fn create(
    real: unsafe extern "C" fn(
        *mut libc::pthread_t,
        *const libc::pthread_attr_t,
        StartFn,
        *mut c_void,
    ) -> c_int,
    thread: *mut libc::pthread_t,
    attr: *const libc::pthread_attr_t,
    start: StartFn,
    arg: *mut c_void,
) -> c_int {
    let Some(rt) = runtime::active() else {
        // SAFETY: forwarded unchanged.
        return unsafe { real(thread, attr, start, arg) };
    };
    let Some(slot) = claim(start, arg, child_pkru(rt, start as usize)) else {
        return libc::EAGAIN;
    };
    // Strict mode: glibc's stack cache and thread list live in ld.so's data.
    // SAFETY: the trampoline takes the slot index as its argument.
    let r = runtime::with_libc_rights(|| unsafe {
        real(thread, attr, trampoline, slot as *mut c_void)
    });
    if r != 0 {
        take(slot);
    }
    r
}

extern "C" fn trampoline(slot: *mut c_void) -> *mut c_void {
    let (start, arg, pkru) = take(slot as usize);
    if let Some(rt) = runtime::active() {
        crate::gates::thread_start();
        crate::signals::thread_start();
        thread_setup(rt);
    }
    pku::write_pkru(pkru);
    start(arg)
}

/// This thread's tagged TLS entries, owned by the pthread key's value.
struct ThreadState {
    entries: Vec<PlanEntry>,
}

static EXIT_KEY: OnceLock<libc::pthread_key_t> = OnceLock::new();

fn exit_key() -> libc::pthread_key_t {
    *EXIT_KEY.get_or_init(|| {
        let mut k: libc::pthread_key_t = 0;
        // SAFETY: creating a key with a destructor of the right type.
        if unsafe { libc::pthread_key_create(&mut k, Some(thread_teardown)) } != 0 {
            crate::lifecycle::fatal(format_args!("pthread_key_create failed"));
        }
        k
    })
}

/// Create the exit key now, outside any thread start, and install the
/// `fork` handlers (called by the constructor).
pub fn init() {
    exit_key();
    let r = crate::real::own_atfork(fork_prepare, fork_parent, fork_child);
    if r != 0 {
        log::warn!(
            "threads: pthread_atfork failed ({r}); a fork child may inherit a held shim lock"
        );
    }
}

// ---------------------------------------------------------------- fork

/// The census write lock, held by the forking thread from the prepare
/// handler to the parent or child handler. Only one thread is ever between
/// the two: the prepare handler takes the `dlopen` lock first.
static FORK_CENSUS: std::sync::Mutex<Option<ForkGuard>> = std::sync::Mutex::new(None);

struct ForkGuard(crate::runtime::CensusWrite<'static>);
// SAFETY: the guard is taken and dropped by the same thread (the forking
// one; in the child, its copy); the static only carries it between the
// fork handlers, which that thread runs.
unsafe impl Send for ForkGuard {}

fn fork_census() -> std::sync::MutexGuard<'static, Option<ForkGuard>> {
    FORK_CENSUS.lock().unwrap_or_else(|e| e.into_inner())
}

/// The forking thread's id in plan entries (0: the main thread).
static FORK_THREAD: AtomicUsize = AtomicUsize::new(0);

/// Take every shim lock, in lock order (the `dlopen` lock, then the census),
/// so the child never inherits one held by a thread it does not have.
extern "C" fn fork_prepare() {
    crate::dl::fork_prepare();
    // SAFETY: gettid and getpid have no preconditions.
    let (tid, pid) = unsafe { (libc::gettid(), libc::getpid()) };
    FORK_THREAD.store(if tid == pid { 0 } else { tid as usize }, Ordering::Relaxed);
    if let Some(rt) = runtime::get() {
        let g = rt.census.write().unwrap_or_else(|e| e.into_inner());
        *fork_census() = Some(ForkGuard(g));
    }
}

fn fork_release() {
    let g = fork_census().take();
    drop(g);
    crate::dl::fork_release();
}

extern "C" fn fork_parent() {
    fork_release();
}

/// The child has one thread. The other threads' TLS pages stay tagged in
/// their stacks, which glibc now caches for the child's next threads (and
/// initialises with the creator's rights): put them back on key 0.
extern "C" fn fork_child() {
    let me = FORK_THREAD.load(Ordering::Relaxed);
    {
        let mut c = fork_census();
        let Some(ForkGuard(census)) = c.as_mut() else {
            drop(c);
            fork_release();
            return;
        };
        let theirs = |e: &PlanEntry| match e.reason {
            plan::Reason::Tls { thread, .. } | plan::Reason::TlsShared { thread, .. } => {
                thread != me
            }
            _ => false,
        };
        for e in census
            .plan
            .entries
            .iter()
            .filter(|e| theirs(e) && e.compartment.is_some())
        {
            let _ = pku::protect(e.range.start, e.range.len(), e.prot, 0);
        }
        census.update(|c| c.plan.entries.retain(|e| !theirs(e)));
    }
    fork_release();
}

/// The TLS blocks of the calling thread: (census object index, block),
/// read from the thread's DTV (no call into ld.so).
fn thread_blocks(rt: &Runtime) -> Vec<(usize, Range)> {
    let Ok(c) = rt.census.read() else {
        return Vec::new();
    };
    c.objects
        .iter()
        .enumerate()
        .filter(|(_, o)| !o.segments.is_empty())
        .filter_map(|(i, o)| {
            let t = o.tls?;
            let block = crate::tls::dtv_block(t.modid)?;
            Some((i, Range::new(block, block + t.memsz)))
        })
        .collect()
}

fn thread_setup(rt: &Runtime) {
    let entries = tag_thread_tls(rt);
    let state = Box::into_raw(Box::new(ThreadState { entries }));
    // SAFETY: our own key; the value is released by thread_teardown.
    unsafe { libc::pthread_setspecific(exit_key(), state as *const c_void) };
}

/// Tag this thread's TLS pages of compartment modules; returns the entries.
fn tag_thread_tls(rt: &Runtime) -> Vec<PlanEntry> {
    let any_tls = {
        let Ok(c) = rt.census.read() else {
            return Vec::new();
        };
        c.objects
            .iter()
            .enumerate()
            .any(|(i, o)| o.tls.is_some() && c.compartment_of[i].is_some())
    };
    if !any_tls {
        return Vec::new();
    }
    // SAFETY: gettid has no preconditions.
    let tid = unsafe { libc::gettid() } as usize;
    let blocks = thread_blocks(rt);
    let tp = crate::tls::thread_pointer();
    // SAFETY: this thread's own DTV.
    let dtv = unsafe { crate::tls::dtv_range(crate::tls::dtv_pointer()) };
    let cfg = &rt.config;
    let mut carveouts = Vec::new();
    let rseq = crate::carveouts::rseq_area(tp)
        .map(|r| r.pages_out())
        .unwrap_or(Range::new(0, 0));
    let governed = vec![
        crate::tls::tcb_page(tp),
        crate::tls::below_tcb_shared(tp),
        dtv.pages_out(),
        rseq,
    ];
    for (on, name, toggle, r) in [
        (
            cfg.share_tcb,
            "tcb",
            "IA2_SHARE_TCB",
            crate::tls::tcb_page(tp),
        ),
        (
            cfg.share_below_tcb,
            "below_tcb",
            "IA2_SHARE_BELOW_TCB",
            crate::tls::below_tcb_shared(tp),
        ),
        (cfg.share_dtv, "dtv", "IA2_SHARE_DTV", dtv.pages_out()),
        (
            cfg.share_rseq && !rseq.is_empty(),
            "rseq",
            "IA2_SHARE_RSEQ",
            rseq,
        ),
    ] {
        if on {
            carveouts.push(plan::Carveout {
                name,
                toggle,
                ranges: vec![r],
            });
        }
    }
    let (compartment_of, pads) = {
        let Ok(c) = rt.census.read() else {
            return Vec::new();
        };
        let pads: Vec<bool> = c
            .objects
            .iter()
            .map(|o| plan::is_tls_pad(&o.basename))
            .collect();
        (c.compartment_of.clone(), pads)
    };
    // Thread stacks (and so their static TLS) are private read-write
    // mappings; describe them instead of reading /proc/self/maps per thread.
    let lo = blocks.iter().map(|(_, b)| b.start).min().unwrap_or(tp);
    let area = Range::new(lo, tp + PAGE).pages_out();
    let maps = vec![crate::maps::Mapping {
        start: area.start,
        end: area.end,
        prot: libc::PROT_READ | libc::PROT_WRITE,
        shared: false,
        offset: 0,
        path: String::new(),
        pkey: None,
    }];
    let tls = ThreadTls::new(tid, blocks, |i| pads.get(i).copied().unwrap_or(false));
    let p = plan::build(&plan::PlanInput {
        objects: &[],
        compartment_of: &compartment_of,
        threads: std::slice::from_ref(&tls),
        extra: &[],
        carveouts: &carveouts,
        governed: &governed,
        maps: &maps,
    });
    if p.tagged().next().is_none() {
        return Vec::new();
    }
    let entries: Vec<PlanEntry> = p.tagged().cloned().collect();
    let comp = |i: usize| compartment_of.get(i).copied().flatten();
    crate::report::thread_tls(rt, tid, &entries, &plan::tls_bytes(&p, &tls, &comp));
    // Tag and record under the census lock, so that a fork (whose prepare
    // handler takes it) never sees tagged pages that the plan lacks.
    let mut c = rt.census.write().unwrap_or_else(|e| e.into_inner());
    if let Err((e, errno)) = crate::apply::apply(&p, &rt.keys()) {
        crate::lifecycle::fatal(format_args!(
            "thread {tid}: pkey_mprotect({}, key of compartment {:?}) failed (errno {errno})",
            e.range, e.compartment
        ));
    }
    c.update(|c| {
        c.plan.entries.extend(entries.iter().cloned());
        c.plan.entries.sort_by_key(|e| e.range.start);
    });
    entries
}

/// The exit key's value for a thread that the shim did not start: no
/// tagged TLS, only a gate-frame stack and an alternate signal stack to free.
const FOREIGN: usize = 1;

/// Called (from the SIGSEGV handler) when a thread that the shim did not
/// start maps its gate-frame stack on its first gate: have the exit key's
/// destructor free it, so such threads do not leak two mappings each.
/// Async-signal-safe in practice: the key exists (made by `init`), and
/// setting a low key's value writes the thread's own array.
pub fn adopt_foreign() {
    let Some(&key) = EXIT_KEY.get() else {
        return;
    };
    // SAFETY: our own key, created at start-up.
    if unsafe { libc::pthread_getspecific(key) }.is_null() {
        // SAFETY: as above; FOREIGN is a marker, never dereferenced.
        unsafe { libc::pthread_setspecific(key, FOREIGN as *const c_void) };
    }
}

/// Put the exiting thread's TLS pages back on key 0 (pthread key destructor).
unsafe extern "C" fn thread_teardown(state: *mut c_void) {
    if state.is_null() {
        return;
    }
    if state as usize == FOREIGN {
        crate::signals::thread_exit();
        crate::gates::thread_exit();
        return;
    }
    // SAFETY: the value set by thread_setup, released once here.
    let state = unsafe { Box::from_raw(state as *mut ThreadState) };
    if !state.entries.is_empty() {
        // Under the census lock, as the tagging was (see tag_thread_tls).
        let census = runtime::get().map(|rt| rt.census.write().unwrap_or_else(|e| e.into_inner()));
        for e in &state.entries {
            let _ = pku::protect(e.range.start, e.range.len(), e.prot, 0);
        }
        if let Some(mut c) = census {
            c.update(|c| c.plan.entries.retain(|x| !state.entries.contains(x)));
        }
    }
    crate::signals::thread_exit();
    crate::gates::thread_exit();
}

#[cfg(test)]
mod tests {
    use super::*;

    extern "C" fn nop(_: *mut c_void) -> *mut c_void {
        core::ptr::null_mut()
    }

    #[test]
    fn pool_slots_are_reused() {
        let a = claim(nop, 7 as *mut c_void, 0x55).unwrap();
        let (f, arg, pkru) = take(a);
        assert_eq!(
            (f as usize, arg as usize, pkru),
            (nop as *const () as usize, 7, 0x55)
        );
        let b = claim(nop, core::ptr::null_mut(), 0).unwrap();
        assert_eq!(a, b, "a freed slot is claimed again");
        take(b);
    }
}

// ---------------------------------------------------------------- SIGEV_THREAD

/// `struct sigevent` on x86-64 (the `libc` crate does not name the
/// `SIGEV_THREAD` members of its union).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct SigEvent {
    pub value: usize,
    pub signo: c_int,
    pub notify: c_int,
    pub function: usize,
    pub attributes: usize,
    _pad: [u8; 32],
}

const _: () = assert!(core::mem::size_of::<SigEvent>() == 64);

const SIGEV_THREAD: c_int = 2;

/// What a wrapped `SIGEV_THREAD` notification runs: the program's function
/// and value and the PKRU it runs with. Leaked: glibc may start a
/// notification thread for as long as the timer or queue exists.
struct Notify {
    function: usize,
    value: usize,
    pkru: u32,
}

/// `timer_create`/`mq_notify`: for `SIGEV_THREAD`, a copy of `*sev` whose
/// function is [`notify_trampoline`]. glibc runs each notification in a
/// thread it starts itself (past the `pthread_create` hook), which would
/// keep compartment TLS on key 0 and the helper's inherited PKRU; the
/// trampoline gives it the same start as the shim's own threads.
///
/// # Safety
/// `sev` is null or a valid `struct sigevent`.
pub unsafe fn wrap_sigevent(sev: *const SigEvent) -> Option<SigEvent> {
    let rt = runtime::active()?;
    if sev.is_null() {
        return None;
    }
    // SAFETY: the caller's valid sigevent.
    let mut s = unsafe { *sev };
    if s.notify != SIGEV_THREAD || s.function == 0 {
        return None;
    }
    let record = Notify {
        function: s.function,
        value: s.value,
        pkru: child_pkru(rt, s.function),
    };
    // In the sealed heap: a compartment that rewrote the record would pick
    // the function a notification runs or its rights.
    let n = crate::sealed::with_sealed(|| Box::into_raw(Box::new(record)));
    s.function = notify_trampoline as *const () as usize;
    s.value = n as usize;
    Some(s)
}

/// `aio_read`/`aio_write`/`aio_fsync`/`lio_listio`: glibc reads an
/// `aiocb`'s `aio_sigevent` when the request completes, so a
/// `SIGEV_THREAD` notification is wrapped in place (the program sees the
/// shim's function and record there until then).
///
/// # Safety
/// `cb` is null or a valid `struct aiocb` the caller may write.
pub unsafe fn wrap_aiocb(cb: *mut libc::aiocb) {
    if cb.is_null() {
        return;
    }
    // SAFETY: the caller's valid aiocb; its aio_sigevent is a sigevent.
    let sev = unsafe { core::ptr::addr_of_mut!((*cb).aio_sigevent) } as *mut SigEvent;
    // SAFETY: as above.
    if let Some(w) = unsafe { wrap_sigevent(sev) } {
        // SAFETY: as above.
        unsafe { sev.write(w) };
    }
}

extern "C" fn notify_trampoline(value: usize) {
    // glibc keeps the value in memory compartments can write: a record
    // forged there must not run.
    if !crate::sealed::contains(value as *mut u8) {
        crate::lifecycle::fatal(format_args!(
            "notification record {value:#x} is not one of the shim's: refused"
        ));
    }
    // SAFETY: the record wrap_sigevent leaked for this notification.
    let n = unsafe { &*(value as *const Notify) };
    if let Some(rt) = runtime::active() {
        // glibc starts notification threads with every signal blocked. A
        // trap (SIGSYS: tagging the TLS below) or a fault (SIGSEGV: a key
        // check) while its signal is blocked kills the process without
        // the shim's handler, so without the fault report: unblock both,
        // as the shim keeps SIGSYS unblocked everywhere else.
        // SAFETY: a sigset on the stack; rt_sigprocmask changes only this
        // thread's mask.
        unsafe {
            let mut set: libc::sigset_t = core::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGSYS);
            libc::sigaddset(&mut set, libc::SIGSEGV);
            libc::syscall(
                libc::SYS_rt_sigprocmask,
                libc::SIG_UNBLOCK,
                &set,
                core::ptr::null_mut::<libc::sigset_t>(),
                8,
            );
        }
        crate::gates::thread_start();
        crate::signals::thread_start();
        thread_setup(rt);
    }
    // SAFETY: the program's notification function, of this type.
    let f = unsafe { core::mem::transmute::<usize, extern "C" fn(usize)>(n.function) };
    pku::write_pkru(n.pkru);
    f(n.value);
}
