//! The SIGSEGV handler: a report for every `SEGV_PKUERR` (or, in audit mode,
//! a log line and a single step past it: see [`audit`]), and chaining to the
//! program's own handler for every other fault.
//!
//! The handler runs with the kernel's default PKRU (key 0 only), which is
//! enough: the shim's state lives on key 0. It formats into a stack buffer
//! and writes with `write(2)`; it takes locks only with `try_*`, so a fault
//! inside the shim's own critical section still gets a (shorter) report.

use crate::objects::{page_down, PAGE};
use crate::plan::Reason;
use crate::runtime;
use crate::signals::Chained;
use crate::stackfmt::{pid, StackBuf};
use core::ffi::{c_int, c_void, CStr};
use core::fmt::Write;
use core::sync::atomic::{AtomicI32, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

mod arena;
mod audit;

/// The shim's allocator: `System`, except while a fault report builds its
/// decoder and formatter (see [`arena`]).
#[global_allocator]
static ALLOC: arena::ShimAlloc = arena::ShimAlloc;

/// `si_code` of a protection-key fault.
pub const SEGV_PKUERR: i32 = 4;
/// Byte offset of `si_pkey` in x86-64 `siginfo_t` (after `si_addr` and the
/// 8-byte `_addr_bnd` padding).
const SI_PKEY_OFFSET: usize = 32;

// The program's own SIGSEGV disposition (0 = SIG_DFL, 1 = SIG_IGN, else a
// handler address), flags and `sa_mask`, recorded by the `sigaction` hook,
// are in the signal table (`signals::chained`, on the shim key once hardened).
/// Where reports go (stderr unless `IA2_REPORT_FILE`).
pub static REPORT_FD: AtomicI32 = AtomicI32::new(2);

/// The Intel formatter, made by the first report that needs it (building
/// it costs about 5 M instructions, which no run without a fault should
/// pay), from the arena, not `malloc`.
static FORMATTER: OnceLock<Mutex<SendFormatter>> = OnceLock::new();
/// Reports being written now: the first thread to finish waits for the
/// others before the process dies.
static REPORTS_IN_FLIGHT: AtomicUsize = AtomicUsize::new(0);

struct SendFormatter(iced_x86::IntelFormatter);
// SAFETY: the formatter's boxed trait objects are iced's defaults (no symbol
// resolver, default options provider), which hold no thread-affine state;
// the Mutex serialises all use.
unsafe impl Send for SendFormatter {}

/// Install the shim's SIGSEGV handler (through the real `sigaction`).
pub fn install() {
    // Address space for the first report's decoder tables and formatter.
    arena::reserve();
    // SAFETY: a zeroed sigaction is a valid starting point; we set every
    // field we rely on.
    let mut sa: libc::sigaction = unsafe { core::mem::zeroed() };
    sa.sa_sigaction = segv_handler as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO | libc::SA_ONSTACK;
    let mut old: libc::sigaction =
        // SAFETY: plain-old-data.
        unsafe { core::mem::zeroed() };
    // SAFETY: installing a handler with valid sigaction structs.
    let r = unsafe { crate::real::sigaction(libc::SIGSEGV, &sa, &mut old) };
    if r != 0 {
        crate::lifecycle::fatal(format_args!("sigaction(SIGSEGV) failed"));
    }
    // A handler installed before us (by a library constructor) is the program's.
    if old.sa_sigaction != libc::SIG_DFL && old.sa_sigaction != segv_handler as *const () as usize {
        crate::signals::set_chained(Chained::Segv, old.sa_sigaction, old.sa_flags);
        crate::signals::set_chained_mask(Chained::Segv, mask_word(&old.sa_mask));
    }
    audit::read_rseq_abi();
    if audit::configured() {
        audit::install();
    }
}

/// After the plan is applied (the handler is installed before it): the
/// audit mode's shared rseq page.
pub fn after_apply() {
    // The formatter is built by the first report (in the arena), not here.
    audit::after_apply();
}

/// Does the shim own this signal's disposition (SIGSEGV always, SIGTRAP in
/// audit mode)? The `sigaction` and `signal` hooks then record the
/// program's handler with [`intercept_sigaction`] instead of installing it.
pub fn intercepts(sig: c_int) -> bool {
    sig == libc::SIGSEGV || (sig == libc::SIGTRAP && audit::active())
}

/// Record the program's disposition of `sig` (one that [`intercepts`]
/// says the shim owns) instead of installing it, and report the previous
/// one. Returns `true` if the call was handled here.
///
/// # Safety
/// `act` and `oldact` must be null or valid `sigaction` pointers.
pub unsafe fn intercept_sigaction(
    sig: c_int,
    act: *const libc::sigaction,
    oldact: *mut libc::sigaction,
) -> bool {
    let which = if sig == libc::SIGTRAP {
        Chained::Trap
    } else {
        Chained::Segv
    };
    if !oldact.is_null() {
        // SAFETY: the caller passes a valid out pointer.
        let old = unsafe { &mut *oldact };
        // SAFETY: zeroed sigaction is valid.
        *old = unsafe { core::mem::zeroed() };
        (old.sa_sigaction, old.sa_flags) = crate::signals::chained(which);
        if sig == libc::SIGSEGV {
            set_mask_word(&mut old.sa_mask, crate::signals::chained_mask(which));
        }
    }
    if !act.is_null() {
        // SAFETY: the caller passes a valid sigaction.
        let act = unsafe { &*act };
        if sig == libc::SIGSEGV {
            crate::signals::set_chained_mask(which, mask_word(&act.sa_mask));
        }
        crate::signals::set_chained(which, act.sa_sigaction, act.sa_flags);
    }
    true
}

/// The kernel's part of a `sigset_t` (signals 1-64).
fn mask_word(set: &libc::sigset_t) -> u64 {
    // SAFETY: sigset_t is at least 8 bytes of plain data.
    unsafe { core::ptr::read_unaligned(set as *const libc::sigset_t as *const u64) }
}

fn set_mask_word(set: &mut libc::sigset_t, word: u64) {
    // SAFETY: zeroing then writing the first 8 bytes of plain data.
    unsafe {
        *set = core::mem::zeroed();
        core::ptr::write_unaligned(set as *mut libc::sigset_t as *mut u64, word);
    }
}

/// Read the interrupted PKRU from the signal frame's XSAVE area.
///
/// # Safety
/// `uc` must be the ucontext passed to a signal handler.
pub(crate) unsafe fn interrupted_pkru(uc: *const libc::ucontext_t) -> Option<u32> {
    // CPUID on first use (it traps to the hypervisor in a virtual
    // machine: microseconds that start-up need not pay).
    let off = crate::sigframe::pkru_offset();
    // SAFETY: the kernel passes a valid ucontext.
    let fp = unsafe { (*uc).uc_mcontext.fpregs } as *const u8;
    if off == 0 || fp.is_null() {
        return None;
    }
    // SAFETY: fpregs points at the frame's XSAVE area: legacy area (512
    // bytes), then the header whose first word is XSTATE_BV, then components.
    let xstate_bv = unsafe { core::ptr::read_unaligned(fp.add(512) as *const u64) };
    if xstate_bv & (1 << 9) == 0 {
        // PKRU in its init state: all keys allowed.
        return Some(0);
    }
    // SAFETY: PKRU component is present at the CPUID-given offset.
    Some(unsafe { core::ptr::read_unaligned(fp.add(off) as *const u32) })
}

extern "C" fn segv_handler(sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    // The kernel entered with PKRU allowing key 0 only; in strict mode the
    // libc and ld.so state the report needs (dladdr's lock, ...) carries the
    // libc compartment's key. The shim is trusted: allow every key. The
    // kernel restores the interrupted PKRU from the frame on return.
    // The hint, not the backend: that is sealed, not readable yet.
    if crate::pku::hardware_hint() {
        // SAFETY: the hint says PKU is on; every key for the trusted shim.
        unsafe { crate::pku::wrpkru(0) };
    }
    // SAFETY: the kernel's arguments, on the faulting thread.
    if unsafe { crate::gates::fixup_fault(info, ctx) } {
        return; // a gate's first use on a thread without a gate-frame stack
    }
    // SAFETY: the kernel passes a valid siginfo for SA_SIGINFO handlers.
    let code = unsafe { (*info).si_code };
    if code == SEGV_PKUERR {
        // Compartment code entered without a gate, on its own data: gate it.
        // SAFETY: the kernel's arguments, on the faulting thread.
        let pkru = unsafe { interrupted_pkru(ctx as *const libc::ucontext_t) };
        // SAFETY: as above.
        if pkru.is_some_and(|p| unsafe { crate::gates::fault_driven_entry(info, ctx, p) }) {
            return;
        }
        let on_fault = runtime::get().map(|r| r.config.on_fault);
        if on_fault == Some(crate::config::OnFault::Audit)
            // SAFETY: valid siginfo and ucontext from the kernel.
            && unsafe { audit::on_pku_fault(info, ctx as *mut libc::ucontext_t) }
        {
            return;
        }
        if on_fault != Some(crate::config::OnFault::Silent) {
            REPORTS_IN_FLIGHT.fetch_add(1, Ordering::AcqRel);
            // SAFETY: valid siginfo and ucontext from the kernel.
            unsafe { report_pku_fault(info, ctx as *const libc::ucontext_t) };
            REPORTS_IN_FLIGHT.fetch_sub(1, Ordering::AcqRel);
            wait_for_other_reports();
        }
        audit::summary(Some(sig));
        die_by_sigsegv();
        return;
    }
    // Not ours: the program's handler, or its disposition. A SIGSEGV sent
    // by kill/raise/sigqueue (si_code <= 0) does not come back when the
    // handler returns: honour the disposition now.
    let sent = code <= 0;
    let (h, flags) = crate::signals::chained(Chained::Segv);
    if h == libc::SIG_IGN && sent {
        return;
    }
    if h == libc::SIG_DFL || h == libc::SIG_IGN {
        if code == libc::SI_KERNEL {
            // SAFETY: valid ucontext from the kernel.
            unsafe { audit::kernel_segv(ctx as *const libc::ucontext_t) };
        }
        audit::summary(Some(sig));
        die_by_sigsegv();
        if sent {
            // Pending until this handler returns and unblocks SIGSEGV; then
            // the default action ends the process, as without the shim.
            // SAFETY: raise is async-signal-safe.
            unsafe { libc::raise(libc::SIGSEGV) };
        }
        return;
    }
    if flags & libc::SA_RESETHAND != 0 {
        // One-shot handler: the next SIGSEGV gets the default action (the
        // shim's handler stays installed to report it).
        crate::signals::reset_chained(Chained::Segv, h);
    }
    // The program's sa_mask (and SIGSEGV itself unless SA_NODEFER) is
    // blocked while its handler runs; sigreturn restores the interrupted mask.
    let mut block: u64 = crate::signals::chained_mask(Chained::Segv);
    if flags & libc::SA_NODEFER == 0 {
        block |= 1 << (libc::SIGSEGV - 1);
    }
    // SAFETY: zeroed sigsets are valid.
    let (mut set, mut old): (libc::sigset_t, libc::sigset_t) = unsafe { core::mem::zeroed() };
    set_mask_word(&mut set, block);
    // SAFETY: valid sigsets; pthread_sigmask is async-signal-safe.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, &mut old) };
    if flags & libc::SA_NODEFER != 0 {
        set_mask_word(&mut set, 1 << (libc::SIGSEGV - 1));
        // SAFETY: as above.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, core::ptr::null_mut()) };
    }
    call_program_handler(h, flags, sig, info, ctx);
    // SAFETY: as above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, core::ptr::null_mut()) };
}

/// Run the program's handler `h` for `sig` with its own compartment's
/// rights (the kernel runs handlers with only key 0 accessible), else the
/// rights of the code it interrupted.
fn call_program_handler(
    h: usize,
    flags: c_int,
    sig: c_int,
    info: *mut libc::siginfo_t,
    ctx: *mut c_void,
) {
    crate::signals::run_in_compartment(h, flags, sig, info, ctx);
}

/// Let reports that other threads are writing finish (up to two seconds)
/// before this thread's return ends the process.
fn wait_for_other_reports() {
    for _ in 0..2000 {
        if REPORTS_IN_FLIGHT.load(Ordering::Acquire) == 0 {
            return;
        }
        let ms = libc::timespec {
            tv_sec: 0,
            tv_nsec: 1_000_000,
        };
        // SAFETY: nanosleep is async-signal-safe.
        unsafe { libc::nanosleep(&ms, core::ptr::null_mut()) };
    }
}

/// Restore the default action and return: the faulting instruction runs
/// again and the process dies by SIGSEGV, as it would without the shim.
fn die_by_sigsegv() {
    // SAFETY: a zeroed sigaction with SIG_DFL is valid.
    let mut sa: libc::sigaction = unsafe { core::mem::zeroed() };
    sa.sa_sigaction = libc::SIG_DFL;
    // SAFETY: valid arguments; sigaction is async-signal-safe.
    unsafe { crate::real::sigaction(libc::SIGSEGV, &sa, core::ptr::null_mut()) };
}

struct Sym {
    name: &'static str,
    offset: usize,
    object: &'static str,
}

/// `dladdr` symbolisation (dynsym only; stripped objects give the object).
fn symbolize(addr: usize) -> Option<Sym> {
    // SAFETY: zeroed Dl_info is valid for dladdr to fill.
    let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
    // SAFETY: dladdr only reads loader data.
    if unsafe { libc::dladdr(addr as *const c_void, &mut info) } == 0 {
        return None;
    }
    let cstr = |p: *const libc::c_char| {
        if p.is_null() {
            ""
        } else {
            // SAFETY: dladdr returns NUL-terminated strings owned by the loader.
            unsafe { CStr::from_ptr(p) }.to_str().unwrap_or("?")
        }
    };
    let (name, base) = if info.dli_sname.is_null() {
        ("", info.dli_fbase as usize)
    } else {
        (cstr(info.dli_sname), info.dli_saddr as usize)
    };
    Some(Sym {
        name,
        offset: addr.wrapping_sub(base),
        object: cstr(info.dli_fname),
    })
}

fn write_sym<W: Write>(out: &mut W, addr: usize) {
    match symbolize(addr) {
        Some(s) if !s.name.is_empty() => {
            let _ = write!(out, "{}+{:#x} ({})", s.name, s.offset, s.object);
        }
        Some(s) => {
            let _ = write!(out, "{}+{:#x}", s.object, s.offset);
        }
        None => {
            let _ = write!(out, "{addr:#x} (no object)");
        }
    }
}

/// Formats into a stack buffer (iced's `FormatterOutput`).
struct InsnOut<'a, const N: usize>(&'a mut StackBuf<N>);

impl<const N: usize> iced_x86::FormatterOutput for InsnOut<'_, N> {
    fn write(&mut self, text: &str, _kind: iced_x86::FormatterTextKind) {
        self.0.push_bytes(text.as_bytes());
    }
}

fn write_instruction<const N: usize>(out: &mut StackBuf<N>, rip: usize) {
    // SAFETY: RIP points into mapped text (it just executed); text stays on key 0.
    let bytes = unsafe { core::slice::from_raw_parts(rip as *const u8, 15) };
    // The decoder's tables and the formatter are built on first use, with
    // this thread's allocations served from the arena. Another thread may
    // be reporting its own fault: `with_arena` waits a little, but never
    // blocks (a fault inside the formatter must not deadlock).
    let done = arena::with_arena(|| {
        use iced_x86::Formatter;
        let mut dec =
            iced_x86::Decoder::with_ip(64, bytes, rip as u64, iced_x86::DecoderOptions::NONE);
        let insn = dec.decode();
        let f = FORMATTER
            .get_or_init(|| Mutex::new(SendFormatter(iced_x86::IntelFormatter::new())))
            .try_lock();
        match f {
            Ok(mut f) => f.0.format(&insn, &mut InsnOut(out)),
            Err(_) => {
                // Another report holds the formatter: the bytes (iced's
                // `Debug` names would cost every process their tables).
                for b in &bytes[..insn.len().max(1)] {
                    let _ = write!(out, "{b:02x} ");
                }
            }
        }
    });
    if done.is_none() {
        let _ = write!(out, "(not decoded: another report holds the decoder)");
    }
}

/// Print the report for a `SEGV_PKUERR`.
///
/// # Safety
/// `info` and `uc` must be the kernel's arguments to a SIGSEGV handler.
unsafe fn report_pku_fault(info: *const libc::siginfo_t, uc: *const libc::ucontext_t) {
    // SAFETY: valid siginfo from the kernel.
    let addr = unsafe { (*info).si_addr() } as usize;
    // SAFETY: si_pkey lies inside siginfo_t (128 bytes) at a fixed offset.
    let pkey = unsafe { *((info as *const u8).add(SI_PKEY_OFFSET) as *const u32) };
    // SAFETY: valid ucontext from the kernel.
    let rip = unsafe { (*uc).uc_mcontext.gregs[libc::REG_RIP as usize] } as usize;
    // SAFETY: as above.
    let pkru = unsafe { interrupted_pkru(uc) };
    let rt = runtime::get();

    let mut b = StackBuf::<4096>::new();
    let p = pid();
    let _ = writeln!(
        b,
        "ia2shim[{p}]: ==== protection-key fault (SEGV_PKUERR) ===="
    );
    let _ = write!(
        b,
        "ia2shim[{p}]:   address     {addr:#x} (page {:#x}), page key {pkey}",
        page_down(addr)
    );
    if let Some(c) = rt.and_then(|r| r.compartment_of_key(pkey)) {
        let _ = write!(b, " = compartment {c}");
    } else if pkey != 0 && pkey == crate::pku::shim_key() {
        let _ = write!(
            b,
            " = the shim's own key (gate frames, gate table, thread-start records)"
        );
    }
    let _ = writeln!(b);
    let _ = write!(b, "ia2shim[{p}]:   running as  ");
    match pkru {
        Some(v) => {
            let cur = rt.and_then(|r| r.running_compartment(v));
            match cur {
                Some(c) => {
                    let _ = write!(b, "compartment {c}");
                }
                None => {
                    let _ = write!(b, "no compartment");
                }
            }
            let _ = writeln!(b, " (PKRU {v:#010x})");
        }
        None => {
            let _ = writeln!(b, "unknown (PKRU not in the signal frame)");
        }
    }

    let census = rt.and_then(|r| r.census.try_read().ok());
    let heap_fault = crate::alloc::heap_fault(addr);
    let _ = write!(b, "ia2shim[{p}]:   owner       ");
    let mut disabled_cover: Option<&[crate::carveouts::Located]> = None;
    match census.as_deref() {
        Some(c) => {
            let what = c.plan.lookup(addr);
            match what.map(|e| &e.reason) {
                Some(Reason::Data { object }) => {
                    let o = &c.objects[*object];
                    let _ = write!(b, "{} writable data (.data/.bss)", o.display_name());
                }
                Some(Reason::Tls { object, thread }) => {
                    let o = &c.objects[*object];
                    let modid = o.tls.map(|t| t.modid).unwrap_or(0);
                    let _ = write!(
                        b,
                        "TLS block of module {modid} ({}) in thread {thread}",
                        o.display_name()
                    );
                }
                Some(Reason::LoaderHeap) => {
                    let _ = write!(b, "loader heap (ld.so's start-up allocations)");
                }
                Some(Reason::TlsShared { object, thread }) => {
                    let o = &c.objects[*object];
                    let _ = write!(
                        b,
                        "shared TLS page of {} in thread {thread}",
                        o.display_name()
                    );
                }
                Some(Reason::Carveout { name, .. }) => {
                    let _ = write!(b, "carveout {name} (should be shared)");
                }
                None => match &heap_fault {
                    Some(h) => h.write_owner(&mut b, Some(&c.objects)),
                    None => {
                        let _ = write!(b, "not in the shim's plan");
                    }
                },
            }
            // Several carveouts can locate the same page (the DTV and the
            // rseq area often share one): name each; any disabled one's
            // toggle would share the page.
            for l in c
                .carveouts
                .iter()
                .filter(|l| crate::carveouts::covers(l, addr))
            {
                let _ = write!(
                    b,
                    "; this is the {} page (carveout {})",
                    l.carveout.name, l.carveout.name
                );
            }
            disabled_cover = Some(&c.carveouts);
            let _ = writeln!(b);
        }
        None => {
            let _ = writeln!(b, "unknown (shim state busy or not initialised)");
        }
    }
    let _ = write!(b, "ia2shim[{p}]:   symbol      ");
    write_sym(&mut b, addr);
    let _ = writeln!(b);
    let _ = write!(b, "ia2shim[{p}]:   instruction ");
    // An instruction an entry gate relocated: name the function's copy.
    match crate::gates::relocated_origin(rip) {
        Some(from) => {
            write_sym(&mut b, from);
            let _ = write!(b, " (entry gate's copy at {rip:#x})");
        }
        None => write_sym(&mut b, rip),
    }
    let _ = write!(b, ": ");
    write_instruction(&mut b, rip);
    let _ = writeln!(b);
    let _ = write!(b, "ia2shim[{p}]:   to share    ");
    let mut toggles = disabled_cover
        .into_iter()
        .flatten()
        .filter(|l| !l.enabled && crate::carveouts::covers(l, addr))
        .peekable();
    match toggles.peek() {
        Some(_) => {
            for (i, l) in toggles.enumerate() {
                let sep = if i == 0 { "" } else { " or " };
                let _ = write!(b, "{sep}{}=1", l.carveout.toggle);
            }
            let _ = writeln!(b);
        }
        None if heap_fault.is_some() => {
            let objects = census.as_deref().map(|c| c.objects.as_slice());
            match heap_fault.as_ref().and_then(|h| h.term(objects)) {
                Some(t) => {
                    let _ = writeln!(b, "IA2_HEAP_SHARED={t}");
                }
                None => {
                    let _ = writeln!(
                        b,
                        "shared_malloc in the source (no allocation site recorded)"
                    );
                }
            }
        }
        None => {
            // Run-independent terms only: `object:symbol` when a symbol
            // covers the address, else `object+0xOFFSET+LEN`; heap and
            // anonymous memory have none.
            let sym = audit::sym_info(addr).filter(|s| symbol_covers(s, addr));
            match (sym, object_page(addr)) {
                (Some(s), _) => {
                    let _ = writeln!(b, "IA2_SHARE={}:{}", s.object_base(), s.name);
                }
                (None, Some(o)) => {
                    let _ = writeln!(b, "IA2_SHARE={o}");
                }
                (None, None) => {
                    let _ = writeln!(
                        b,
                        "no IA2_SHARE term survives a new run: the page is heap or anonymous memory"
                    );
                }
            }
        }
    }
    b.write_to_fd(REPORT_FD.load(Ordering::Relaxed));
}

/// Does `s` cover `addr` (a zero-sized symbol covers its own address)?
fn symbol_covers(s: &audit::SymInfo, addr: usize) -> bool {
    addr >= s.addr && addr < s.addr + s.size.max(1)
}

/// The executable's load base, for naming it `main` in policy terms (set
/// at start-up; the loader's name for it is a path or empty).
static MAIN_BASE: core::sync::atomic::AtomicUsize =
    core::sync::atomic::AtomicUsize::new(usize::MAX);

/// Record the executable's load base (start-up).
pub fn set_main_base(base: usize) {
    MAIN_BASE.store(base, Ordering::Relaxed);
}

/// An object's name in policy terms: `main` for the executable, else the
/// basename of its path (what `IA2_COMPARTMENTS` and `IA2_SHARE` match).
pub fn term_name(path: &'static str, base: usize) -> &'static str {
    if base == MAIN_BASE.load(Ordering::Relaxed) {
        "main"
    } else {
        path.rsplit('/').next().unwrap_or(path)
    }
}

/// A page of an object, named relative to the object's load base: the
/// `object+0xOFFSET+LEN` form of `IA2_SHARE`, which survives ASLR.
#[derive(Clone, Copy, Debug)]
pub struct ObjectPage {
    pub object: &'static str,
    pub base: usize,
    pub page: usize,
}

impl core::fmt::Display for ObjectPage {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{}+{:#x}+{PAGE}", self.object, self.page - self.base)
    }
}

/// The object page holding `addr`, if an object maps it (`dladdr`, which
/// only reads loader data and never allocates).
pub fn object_page(addr: usize) -> Option<ObjectPage> {
    // SAFETY: zeroed Dl_info is valid for dladdr to fill.
    let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
    // SAFETY: dladdr only reads loader data.
    if unsafe { libc::dladdr(addr as *const c_void, &mut info) } == 0 || info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: NUL-terminated string owned by the loader.
    let path = unsafe { CStr::from_ptr(info.dli_fname) }.to_str().ok()?;
    let base = info.dli_fbase as usize;
    Some(ObjectPage {
        object: term_name(path, base),
        base,
        page: page_down(addr),
    })
}
