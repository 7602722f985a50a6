//! The init state machine (`Uninit → Initializing → Ready | Failed`) and the
//! shim's fail-closed exits. Every module may use it: `fatal` marks the
//! state `Failed` before it exits.
//!
//! Hooks consult [`state`]: until the runtime is `Ready` they pass straight
//! through to the real function, because a hook can run before our
//! constructor (another library's constructor calling `sigaction`) or during
//! it (our own census calling into libc), and there is nothing to enforce yet.

use crate::stackfmt::{pid, StackBuf};
use core::fmt::Write;
use core::sync::atomic::{AtomicU8, Ordering};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum InitState {
    Uninit = 0,
    Initializing = 1,
    Ready = 2,
    Failed = 3,
}

#[link_section = ".ia2shim_sealed"]
static STATE: AtomicU8 = AtomicU8::new(InitState::Uninit as u8);

/// Move from `from` to `to`; false if the state was not `from`.
pub fn transition(from: InitState, to: InitState) -> bool {
    STATE
        .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
        .is_ok()
}

/// Set the state (the constructor's last step).
pub fn set_state(s: InitState) {
    crate::pku::with_shim_writes(|| STATE.store(s as u8, Ordering::Release));
}

pub fn state() -> InitState {
    match STATE.load(Ordering::Acquire) {
        0 => InitState::Uninit,
        1 => InitState::Initializing,
        2 => InitState::Ready,
        _ => InitState::Failed,
    }
}

/// Print a one-line fatal error and exit with status 1 without running
/// anything else of the program (fail closed). Allocation-free.
pub fn fatal(args: core::fmt::Arguments<'_>) -> ! {
    crate::pku::with_shim_writes(|| STATE.store(InitState::Failed as u8, Ordering::Release));
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
    // A constant message (IA2_PKU's banners) is copied, not formatted: the
    // first use of `core::fmt` costs a new process ~10 µs of page faults on
    // its code, and in sim mode the banner is often the only formatting.
    match args.as_str() {
        Some(text) => {
            b.push_bytes(b"ia2shim[");
            b.push_decimal(u64::from(pid().unsigned_abs()));
            b.push_bytes(b"]: ");
            b.push_bytes(text.as_bytes());
            b.push_bytes(b"\n");
        }
        None => {
            let _ = writeln!(b, "ia2shim[{}]: {}", pid(), args);
        }
    }
    b.write_to_fd(2);
}
