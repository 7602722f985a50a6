//! Protection keys: the CPUID/OSPKE probe, the key syscalls, RDPKRU/WRPKRU,
//! the PKRU formula, and the simulated backend used by `IA2_PKU=sim`.
//!
//! Every key operation in the shim goes through this module, so that `sim`
//! runs exactly the same code paths with the hardware effects replaced.

use core::fmt;
use core::sync::atomic::{AtomicU32, AtomicU8, Ordering};

/// PKRU value the kernel gives a new process: only key 0 accessible.
pub const DEFAULT_PKRU: u32 = 0x5555_5554;
/// Number of hardware keys.
pub const NUM_KEYS: u32 = 16;

/// What the probe found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PkuSupport {
    /// `pkey_alloc` then `pkey_free` succeeded; otherwise the errno.
    pub syscall: Result<(), i32>,
}

impl PkuSupport {
    pub fn usable(&self) -> bool {
        self.syscall.is_ok()
    }

    /// CPUID.(EAX=7,ECX=0):ECX bits 3 (PKU) and 4 (OSPKE: the OS has set
    /// CR4.PKE). The kernel hands out keys only when both are set, so
    /// CPUID (which traps to the hypervisor on a virtual machine, 4 µs
    /// here) is asked only to explain a failure, when it is printed.
    pub fn cpu_pku_os_pke(&self) -> (bool, bool) {
        if self.syscall.is_ok() {
            return (true, true);
        }
        // Leaf 7 returns zeros on CPUs that lack it.
        let leaf7 = core::arch::x86_64::__cpuid_count(7, 0);
        (leaf7.ecx & (1 << 3) != 0, leaf7.ecx & (1 << 4) != 0)
    }
}

impl fmt::Display for PkuSupport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (cpu_pku, os_pke) = self.cpu_pku_os_pke();
        if !cpu_pku {
            write!(f, "the CPU does not report PKU (CPUID.7.0:ECX bit 3)")
        } else if !os_pke {
            write!(
                f,
                "the kernel has not enabled PKU (CPUID.7.0:ECX bit 4, OSPKE)"
            )
        } else if let Err(e) = self.syscall {
            write!(f, "pkey_alloc failed with errno {e}")
        } else {
            write!(f, "PKU available")
        }
    }
}

/// Probe the CPU and the kernel. Allocates and frees one real key.
pub fn probe() -> PkuSupport {
    let syscall = match sys_pkey_alloc(0) {
        Ok(k) => {
            sys_pkey_free(k);
            Ok(())
        }
        Err(e) => Err(e),
    };
    PkuSupport { syscall }
}

/// PKRU that allows key 0 and `key` and denies (AD and WD) every other key:
/// `!((3 << 2k) | 3)`.
pub const fn pkru_allowing(key: u32) -> u32 {
    pkru_allowing_set(1 | (1 << key))
}

/// PKRU allowing exactly the keys in bitmask `keys` (bit k = key k).
pub const fn pkru_allowing_set(keys: u32) -> u32 {
    let mut pkru = 0u32;
    let mut k = 0;
    while k < NUM_KEYS {
        if keys & (1 << k) == 0 {
            pkru |= 3 << (2 * k);
        }
        k += 1;
    }
    pkru
}

/// Does `pkru` allow reading (and, if `write`, writing) pages with `key`?
pub const fn pkru_allows(pkru: u32, key: u32, write: bool) -> bool {
    let bits = (pkru >> (2 * key)) & 3;
    if write {
        bits == 0
    } else {
        bits & 1 == 0
    }
}

// ---------------------------------------------------------------- the shim key

/// The shim's own key (`IA2_HARDEN=on`; 0: none). Gate frames, the gate
/// table and thread-start records carry it. Every PKRU the shim hands a
/// compartment write-disables it and leaves it readable, so that gates read
/// their table and frames with the caller's rights; only the shim opens it
/// for writing, between its own WRPKRUs.
#[link_section = ".ia2shim_sealed"]
static SHIM_KEY: AtomicU32 = AtomicU32::new(0);

pub fn set_shim_key(key: u32) {
    SHIM_KEY.store(key, Ordering::Release);
}

pub fn shim_key() -> u32 {
    SHIM_KEY.load(Ordering::Acquire)
}

/// The access-disable bit of the shim key (0 without one): cleared in
/// every PKRU the shim computes, so the key stays readable.
pub fn shim_read_bit() -> u32 {
    match shim_key() {
        0 => 0,
        k => 1 << (2 * k),
    }
}

/// PKRU for running as the compartment on `key`: key 0, `key`, and the
/// shim key read-only.
pub fn compartment_pkru(key: u32) -> u32 {
    pkru_allowing(key) & !shim_read_bit()
}

/// Make the shim key readable in this thread's PKRU (a signal handler's
/// first step: the kernel enters with only key 0 accessible). The shim
/// key's number is sealed state itself, so every key is made readable
/// for the two loads that find it (no program code runs meanwhile), then
/// only the shim key stays so.
pub fn open_shim_reads() {
    if !hardware_hint() {
        return;
    }
    let old = rdpkru();
    // Every PKRU the shim hands out leaves the shim key readable, and so
    // some key besides 0: only the kernel's signal-entry PKRU (key 0 alone)
    // needs opening. One RDPKRU otherwise.
    if old & 0x5555_5554 != 0x5555_5554 {
        return;
    }
    // SAFETY: the hint says PKU is on; clearing access-disable bits only.
    unsafe { wrpkru(old & 0xaaaa_aaaa) };
    let k = shim_key();
    let open = if k == 0 { old } else { old & !(1 << (2 * k)) };
    // SAFETY: as above; the caller's PKRU with at most one bit cleared.
    unsafe { wrpkru(open) };
}

/// Run `f` with the shim key writable (its AD and WD bits cleared), then
/// put the caller's PKRU back. For the shim's own writes to its state.
pub fn with_shim_writes<R>(f: impl FnOnce() -> R) -> R {
    let k = shim_key();
    if k == 0 {
        return f();
    }
    let old = read_pkru();
    let open = old & !(3 << (2 * k));
    if open != old {
        write_pkru(open);
    }
    let r = f();
    if open != old {
        write_pkru(old);
    }
    r
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Backend {
    /// Not chosen yet, or `IA2_PKU=off`: key operations are refused.
    None = 0,
    Hardware = 1,
    Sim = 2,
}

#[link_section = ".ia2shim_sealed"]
static BACKEND: AtomicU8 = AtomicU8::new(Backend::None as u8);
/// Keys handed out by the sim backend (bitmask).
static SIM_KEYS: AtomicU32 = AtomicU32::new(1);

// The shim's per-thread words (`ia2shim_gate_tls`, initial-exec TLS, a page
// the plan never tags because it holds a shared module's block): offset 0
// the gate-frame stack top, 8 the simulated PKRU, 16 the gate-frame stack
// base (both read and written by `crate::gates`). The simulated PKRU sits
// next to the frame-stack top so that the `sim` call gates switch it with
// plain moves. New threads start with the kernel default, as a new process
// would; the thread trampoline sets the inherited value.
core::arch::global_asm!(
    ".pushsection .tdata.ia2shim_gate_tls,\"awT\",@progbits",
    ".balign 8",
    ".globl ia2shim_gate_tls",
    ".hidden ia2shim_gate_tls",
    ".type ia2shim_gate_tls,@object",
    ".size ia2shim_gate_tls, 24",
    "ia2shim_gate_tls:",
    ".quad 0",
    ".long {default_pkru}",
    ".long 0",
    ".quad 0",
    ".popsection",
    default_pkru = const DEFAULT_PKRU,
);

/// The calling thread's simulated PKRU (`IA2_PKU=sim`), which the `sim`
/// gates switch.
pub fn sim_pkru() -> u32 {
    let v: u32;
    // SAFETY: reads this thread's copy of the shim's TLS word.
    unsafe {
        core::arch::asm!(
            "mov {t}, qword ptr [rip + ia2shim_gate_tls@GOTTPOFF]",
            "mov {v:e}, dword ptr fs:[{t} + 8]",
            t = out(reg) _,
            v = out(reg) v,
            options(nostack, readonly, preserves_flags)
        );
    }
    v
}

/// Set the calling thread's simulated PKRU.
pub fn set_sim_pkru(pkru: u32) {
    // SAFETY: writes this thread's copy of the shim's TLS word.
    unsafe {
        core::arch::asm!(
            "mov {t}, qword ptr [rip + ia2shim_gate_tls@GOTTPOFF]",
            "mov dword ptr fs:[{t} + 8], {v:e}",
            t = out(reg) _,
            v = in(reg) pkru,
            options(nostack, preserves_flags)
        );
    }
}

pub fn set_backend(b: Backend) {
    BACKEND.store(b as u8, Ordering::Release);
    BACKEND_HINT.store(b as u8, Ordering::Release);
}

/// A copy of the backend on key 0, for the first instruction of a signal
/// handler, which the kernel enters with only key 0 accessible (the
/// sealed [`BACKEND`] is not readable yet). A compartment that rewrote it
/// can only make a handler skip opening the keys (its next read of sealed
/// state faults) or execute WRPKRU without PKU (`#UD`): the process dies.
static BACKEND_HINT: AtomicU8 = AtomicU8::new(Backend::None as u8);

/// Does the hint say hardware keys? See [`BACKEND_HINT`].
pub fn hardware_hint() -> bool {
    BACKEND_HINT.load(Ordering::Relaxed) == Backend::Hardware as u8
}

pub fn backend() -> Backend {
    match BACKEND.load(Ordering::Acquire) {
        1 => Backend::Hardware,
        2 => Backend::Sim,
        _ => Backend::None,
    }
}

/// Read the calling thread's PKRU (real or simulated).
pub fn read_pkru() -> u32 {
    match backend() {
        Backend::Hardware => rdpkru(),
        Backend::Sim => sim_pkru(),
        Backend::None => 0,
    }
}

/// Set the calling thread's PKRU (real or simulated).
pub fn write_pkru(pkru: u32) {
    match backend() {
        // SAFETY: only reached once the probe has shown PKU is usable.
        Backend::Hardware => unsafe { wrpkru(pkru) },
        Backend::Sim => set_sim_pkru(pkru),
        Backend::None => {}
    }
}

/// Allocate a key with full access for the calling thread.
pub fn alloc_key() -> Result<u32, i32> {
    match backend() {
        Backend::Hardware => sys_pkey_alloc(0),
        Backend::Sim => {
            let mut cur = SIM_KEYS.load(Ordering::Relaxed);
            loop {
                let free = !cur & 0xffff;
                if free == 0 {
                    return Err(libc::ENOSPC);
                }
                let k = free.trailing_zeros();
                match SIM_KEYS.compare_exchange(
                    cur,
                    cur | (1 << k),
                    Ordering::AcqRel,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => {
                        // Like the kernel: the allocating thread gets access.
                        set_sim_pkru(sim_pkru() & !(3 << (2 * k)));
                        return Ok(k);
                    }
                    Err(now) => cur = now,
                }
            }
        }
        Backend::None => Err(libc::ENOSYS),
    }
}

/// `pkey_mprotect` on page-aligned `[start, start+len)`; a no-op under sim.
/// Every success is recorded in `crate::tagmap`.
pub fn protect(start: usize, len: usize, prot: i32, key: u32) -> Result<(), i32> {
    let r = match backend() {
        Backend::Hardware => sys_pkey_mprotect(start, len, prot, key),
        Backend::Sim => Ok(()),
        Backend::None => Err(libc::ENOSYS),
    };
    if r.is_ok() {
        crate::tagmap::record(start, len, key);
    }
    r
}

/// Put the shim's own state at `[start, start+len)` on the shim key
/// (`IA2_HARDEN=on`): read-write (every compartment PKRU write-disables the
/// key, and the shim opens it for its writes) or `prot`; recorded in the
/// key map, so the guards refuse to move it. Hardware keys only (sim mode
/// enforces nothing); a failure is fatal, naming `what`.
pub fn seal(start: usize, len: usize, prot: i32, key: u32, what: &str) {
    if backend() != Backend::Hardware {
        return;
    }
    if let Err(e) = protect(start, len, prot, key) {
        crate::lifecycle::fatal(format_args!(
            "IA2_HARDEN=on: pkey_mprotect of the {what} failed (errno {e})"
        ));
    }
}

// The sealed section (`sealed.ld`): whole pages that hold only the statics
// marked `#[link_section = ".ia2shim_sealed"]`, the ones whose rewrite would
// change rights the shim hands out (the shim key and PKU backend, every
// real function the shim calls with widened rights, the syscall filter's
// trusted range, ...). Written at start-up, or later with the key open.
#[cfg(not(test))]
extern "C" {
    static ia2shim_sealed_start: u8;
    static ia2shim_sealed_end: u8;
}

/// The sealed section's range (empty in unit tests, which link no script).
pub fn sealed_section() -> (usize, usize) {
    #[cfg(not(test))]
    {
        // Linker-defined symbols; only their addresses are taken.
        (
            core::ptr::addr_of!(ia2shim_sealed_start) as usize,
            core::ptr::addr_of!(ia2shim_sealed_end) as usize,
        )
    }
    #[cfg(test)]
    {
        (0, 0)
    }
}

/// Put the sealed section on the shim key (`IA2_HARDEN=on`).
pub fn seal_section(key: u32) {
    let (start, end) = sealed_section();
    if end > start {
        seal(
            start,
            end - start,
            libc::PROT_READ | libc::PROT_WRITE,
            key,
            "sealed statics",
        );
    }
}

/// [`seal`] a static of the shim's, read-write: a page-aligned table whose
/// pages hold nothing else.
pub fn seal_static<T>(table: &'static T, key: u32, what: &str) {
    let len = core::mem::size_of::<T>().next_multiple_of(4096);
    seal(
        table as *const T as usize,
        len,
        libc::PROT_READ | libc::PROT_WRITE,
        key,
        what,
    );
}

/// Raw `pkey_mprotect(2)`.
pub fn sys_pkey_mprotect(start: usize, len: usize, prot: i32, key: u32) -> Result<(), i32> {
    // SAFETY: pkey_mprotect only changes page attributes; the caller owns
    // the decision that these pages may change key.
    let r = unsafe { libc::syscall(libc::SYS_pkey_mprotect, start, len, prot, key as i64) };
    if r == 0 {
        Ok(())
    } else {
        Err(crate::stackfmt::errno())
    }
}

fn sys_pkey_alloc(rights: u32) -> Result<u32, i32> {
    // SAFETY: pkey_alloc takes two integer arguments and touches no memory.
    let r = unsafe { libc::syscall(libc::SYS_pkey_alloc, 0u64, rights as u64) };
    if r >= 0 {
        Ok(r as u32)
    } else {
        Err(crate::stackfmt::errno())
    }
}

fn sys_pkey_free(key: u32) {
    // SAFETY: pkey_free takes an integer and touches no memory.
    unsafe { libc::syscall(libc::SYS_pkey_free, key as u64) };
}

/// RDPKRU. Only valid when the OS has enabled PKU.
pub fn rdpkru() -> u32 {
    let eax: u32;
    // SAFETY: callers reach this only with the hardware backend, i.e. after
    // the probe saw OSPKE; RDPKRU reads a register and needs ecx = 0.
    unsafe {
        core::arch::asm!("rdpkru", out("eax") eax, in("ecx") 0u32, out("edx") _, options(nomem, nostack, preserves_flags));
    }
    eax
}

/// WRPKRU.
///
/// # Safety
/// PKU must be enabled, and the caller must not lose access to memory it is
/// about to use (its own stack and TLS are on key 0 unless tagged on purpose).
pub unsafe fn wrpkru(pkru: u32) {
    // SAFETY: the caller upholds the contract above; WRPKRU needs ecx = edx = 0.
    unsafe {
        core::arch::asm!("wrpkru", in("eax") pkru, in("ecx") 0u32, in("edx") 0u32, options(nostack, preserves_flags));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formula_matches_design() {
        for k in 1..16u32 {
            assert_eq!(pkru_allowing(k), !((3u32 << (2 * k)) | 3), "key {k}");
        }
        assert_eq!(pkru_allowing(0), 0xffff_fffc);
        assert_eq!(pkru_allowing(1), 0xffff_fff0);
        assert_eq!(pkru_allowing_set(0xffff), 0);
        assert_eq!(pkru_allowing_set(0b111), !0x3f);
    }

    #[test]
    fn allows_checks_ad_and_wd() {
        let p = pkru_allowing(2);
        assert!(pkru_allows(p, 0, true) && pkru_allows(p, 2, true));
        assert!(!pkru_allows(p, 1, false) && !pkru_allows(p, 3, false));
        // Write-disable only.
        let wd_only = 0b10 << 2;
        assert!(pkru_allows(wd_only, 1, false) && !pkru_allows(wd_only, 1, true));
    }

    #[test]
    fn sim_backend_allocates_distinct_keys_and_tracks_pkru() {
        set_backend(Backend::Sim);
        let a = alloc_key().unwrap();
        let b = alloc_key().unwrap();
        assert_ne!(a, b);
        assert!(a >= 1 && b >= 1);
        let p = read_pkru();
        assert!(pkru_allows(p, a, true) && pkru_allows(p, b, true));
        write_pkru(pkru_allowing(a));
        assert_eq!(read_pkru(), pkru_allowing(a));
        assert_eq!(protect(0x1000, 0x1000, libc::PROT_READ, a), Ok(()));
    }

    #[test]
    fn probe_reports_a_cause_when_unusable() {
        let p = probe();
        if !p.usable() {
            let msg = p.to_string();
            assert!(msg.contains("PKU") || msg.contains("pkey_alloc"), "{msg}");
        }
    }
}
