//! The PKRU that `sigreturn` installs. The kernel saves the interrupted
//! PKRU in the signal frame's XSAVE area and restores it from there, so a
//! handler that rewrites the slot (or clears PKRU's bit in the XSAVE header,
//! which restores PKRU's init value 0: every key; or redirects `fpregs`, or
//! breaks the software-reserved bytes so the kernel falls back to its
//! FXSAVE-only path) would return to the interrupted code with more rights
//! than it had. The shim's signal trampolines take a [`Snapshot`] of the
//! frame before the program's handler and [`Snapshot::enforce`] after it:
//! the frame's FP-state pointer and software bytes are put back and the
//! PKRU slot may narrow the interrupted rights but never widen them.

use core::sync::atomic::{AtomicUsize, Ordering};

/// `FP_XSTATE_MAGIC1` / `FP_XSTATE_MAGIC2` (arch/x86/include/uapi/asm/sigcontext.h).
const MAGIC1: u32 = 0x4650_5853;
const MAGIC2: u32 = 0x4650_5845;
const XFEATURE_PKRU: u64 = 1 << 9;
/// `struct _fpx_sw_bytes` lies in the legacy area's software-reserved bytes.
const SW_BYTES: usize = 464;
const SW_LEN: usize = 48;
/// The XSAVE header (XSTATE_BV first) follows the 512-byte legacy area.
const HEADER: usize = 512;

/// Offset of PKRU in the XSAVE area (CPUID.(0xD,9).EBX); 0: unknown yet.
#[link_section = ".ia2shim_sealed"]
static PKRU_OFFSET: AtomicUsize = AtomicUsize::new(0);

/// The offset of PKRU in a signal frame's XSAVE area (CPUID.(0xD,9).EBX,
/// asked once; 0 on CPUs without it). Never allocates.
pub fn pkru_offset() -> usize {
    match PKRU_OFFSET.load(Ordering::Relaxed) {
        0 => {
            let off = core::arch::x86_64::__cpuid_count(0xd, 9).ebx as usize;
            crate::pku::with_shim_writes(|| PKRU_OFFSET.store(off, Ordering::Relaxed));
            off
        }
        off => off,
    }
}

/// The PKRU slot in the signal frame's XSAVE area, if the frame has one
/// that the kernel will restore on `sigreturn`.
///
/// # Safety
/// `uc` must be the ucontext passed to a signal handler.
pub unsafe fn pkru_slot(uc: *mut libc::ucontext_t) -> Option<(*mut u32, *mut u64)> {
    let off = pkru_offset();
    // SAFETY: the kernel passes a valid ucontext.
    let fp = unsafe { (*uc).uc_mcontext.fpregs } as *mut u8;
    if off == 0 || fp.is_null() {
        return None;
    }
    // SAFETY: the legacy FXSAVE area is 512 bytes; its software-reserved
    // bytes 464.. hold `struct _fpx_sw_bytes` (magic1, extended_size,
    // xfeatures, xstate_size).
    let (magic, xfeatures, size) = unsafe {
        (
            core::ptr::read_unaligned(fp.add(SW_BYTES) as *const u32),
            core::ptr::read_unaligned(fp.add(SW_BYTES + 8) as *const u64),
            core::ptr::read_unaligned(fp.add(SW_BYTES + 16) as *const u32) as usize,
        )
    };
    if magic != MAGIC1 || xfeatures & XFEATURE_PKRU == 0 || size < off + 4 {
        return None;
    }
    // SAFETY: the XSAVE header follows the legacy area, and the PKRU
    // component lies inside the frame's xstate_size (checked above).
    Some(unsafe { (fp.add(off) as *mut u32, fp.add(HEADER) as *mut u64) })
}

/// # Safety
/// `slot` must come from [`pkru_slot`] for a live signal frame.
pub unsafe fn set_frame_pkru(slot: (*mut u32, *mut u64), pkru: u32) {
    // SAFETY: both pointers lie in the frame (see `pkru_slot`).
    unsafe {
        core::ptr::write_unaligned(slot.0, pkru);
        let bv = core::ptr::read_unaligned(slot.1);
        core::ptr::write_unaligned(slot.1, bv | XFEATURE_PKRU);
    }
}

/// What the kernel wrote into a signal frame, taken before the program's
/// handler runs.
pub struct Snapshot {
    fpregs: usize,
    sw: [u8; SW_LEN],
    xstate_size: usize,
    /// The interrupted PKRU.
    pkru: u32,
}

impl Snapshot {
    /// Take the frame's state; `None` when the frame has no XSAVE area with
    /// PKRU (no PKU, or the simulated backend: nothing to guard).
    ///
    /// # Safety
    /// `uc` must be the ucontext the kernel passed to this signal handler.
    pub unsafe fn take(uc: *const libc::ucontext_t) -> Option<Snapshot> {
        let off = pkru_offset();
        // SAFETY: the kernel passes a valid ucontext.
        let fp = unsafe { (*uc).uc_mcontext.fpregs } as *const u8;
        if off == 0 || fp.is_null() {
            return None;
        }
        let mut sw = [0u8; SW_LEN];
        // SAFETY: the legacy FXSAVE area is 512 bytes; bytes 464..512 are
        // `struct _fpx_sw_bytes` (magic1, extended_size, xfeatures, xstate_size).
        unsafe { core::ptr::copy_nonoverlapping(fp.add(SW_BYTES), sw.as_mut_ptr(), SW_LEN) };
        let magic = u32::from_ne_bytes(sw[0..4].try_into().ok()?);
        let xfeatures = u64::from_ne_bytes(sw[8..16].try_into().ok()?);
        let xstate_size = u32::from_ne_bytes(sw[16..20].try_into().ok()?) as usize;
        if magic != MAGIC1 || xfeatures & XFEATURE_PKRU == 0 || xstate_size < off + 4 {
            return None;
        }
        // SAFETY: the header and the PKRU component lie inside xstate_size.
        let (bv, pkru) = unsafe {
            (
                core::ptr::read_unaligned(fp.add(HEADER) as *const u64),
                core::ptr::read_unaligned(fp.add(off) as *const u32),
            )
        };
        Some(Snapshot {
            fpregs: fp as usize,
            sw,
            xstate_size,
            // PKRU in its init state (bit clear) is 0: every key.
            pkru: if bv & XFEATURE_PKRU != 0 { pkru } else { 0 },
        })
    }

    /// The interrupted PKRU.
    pub fn pkru(&self) -> u32 {
        self.pkru
    }

    /// Put the kernel's frame layout back and keep the PKRU slot within the
    /// interrupted rights. Returns the widening PKRU the handler had
    /// written, if it had (the slot now holds the interrupted PKRU).
    ///
    /// # Safety
    /// `uc` must be the ucontext this snapshot was taken from, and the
    /// handler must have returned.
    pub unsafe fn enforce(&self, uc: *mut libc::ucontext_t) -> Option<u32> {
        let off = pkru_offset();
        // SAFETY: the kernel's ucontext for this signal, still on our stack.
        unsafe { (*uc).uc_mcontext.fpregs = self.fpregs as *mut libc::_libc_fpstate };
        let fp = self.fpregs as *mut u8;
        // SAFETY: the same frame as in `take`: the software bytes, the
        // header, PKRU and MAGIC2 (at xstate_size) all lie inside it.
        unsafe {
            core::ptr::copy_nonoverlapping(self.sw.as_ptr(), fp.add(SW_BYTES), SW_LEN);
            core::ptr::write_unaligned(fp.add(self.xstate_size) as *mut u32, MAGIC2);
            let bv = core::ptr::read_unaligned(fp.add(HEADER) as *const u64);
            let now = if bv & XFEATURE_PKRU != 0 {
                core::ptr::read_unaligned(fp.add(off) as *const u32)
            } else {
                0
            };
            // A clear bit in `now` where the interrupted PKRU had it set
            // grants access or write the interrupted code did not have.
            let widened = self.pkru & !now != 0;
            let out = if widened { self.pkru } else { now };
            core::ptr::write_unaligned(fp.add(off) as *mut u32, out);
            core::ptr::write_unaligned(fp.add(HEADER) as *mut u64, bv | XFEATURE_PKRU);
            widened.then_some(now)
        }
    }
}
