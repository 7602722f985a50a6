//! `posix_spawn` file actions that open files, under the filter. glibc's
//! child (`CLONE_VM | CLONE_VFORK`) runs the actions with every signal
//! blocked and every handler reset to `SIG_DFL`, so the filter's trap on
//! its `openat` kills it. The hooks open those files in the parent instead,
//! through the check a trapped open gets ([`super::decide`]: `/proc/*/mem`
//! refused, with the caller's rights), as close-on-exec descriptors above
//! every descriptor the actions name, and hand glibc a copy of the actions
//! in which each open is a `dup2` of its descriptor: the child opens
//! nothing. Its result is the same (`dup2` closes the target first, as the
//! open action does; the parent's copies die with the `exec` and are closed
//! after the spawn) except that every file is opened before the child's
//! first action, so an open listed after an action that fails still
//! happens (`O_CREAT`, `O_TRUNC`).
//!
//! glibc's actions are read with the layout of its `struct __spawn_action`
//! (stable since 2.29; a unit test checks it against this glibc). Where the
//! rewrite could open something else than the child would, glibc gets the
//! actions as they are (and the child dies of SIGSYS, as before): a tag
//! this layout does not know, a relative path after a `chdir`/`fchdir`
//! action, an open after a `closefrom` action, `POSIX_SPAWN_RESETIDS` (the
//! child opens with the real IDs) and `POSIX_SPAWN_SETSID` (an open may
//! give the new session its terminal).

use crate::pku;
use crate::real::RealFn;
use crate::runtime;
use core::ffi::{c_char, c_int, c_short};
use core::sync::atomic::Ordering;

#[link_section = ".ia2shim_sealed"]
static POSIX_SPAWN: RealFn = RealFn::new(c"posix_spawn");
#[link_section = ".ia2shim_sealed"]
static POSIX_SPAWNP: RealFn = RealFn::new(c"posix_spawnp");

/// glibc's `posix_spawn_file_actions_t`.
#[repr(C)]
struct FileActions {
    allocated: c_int,
    used: c_int,
    actions: *const Action,
    pad: [c_int; 16],
}

/// glibc's `struct __spawn_action`: a tag and a union whose words hold
/// `fd` (close, fchdir, tcsetpgrp), `fd, newfd` (dup2), `from`
/// (closefrom), `path` (chdir) or `fd; path; oflag, mode` (open).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Action {
    tag: c_int,
    pad: c_int,
    u: [u64; 3],
}
const _: () = assert!(core::mem::size_of::<Action>() == 32);
const _: () = assert!(core::mem::size_of::<FileActions>() == 80);

const CLOSE: c_int = 0;
const DUP2: c_int = 1;
const OPEN: c_int = 2;
const CHDIR: c_int = 3;
const FCHDIR: c_int = 4;
const CLOSEFROM: c_int = 5;
const TCSETPGRP: c_int = 6;

fn low(w: u64) -> c_int {
    w as u32 as c_int
}

/// An open action: target descriptor, path, flags, mode.
fn open_of(a: &Action) -> (c_int, usize, c_int, u32) {
    (
        low(a.u[0]),
        a.u[1] as usize,
        low(a.u[2]),
        (a.u[2] >> 32) as u32,
    )
}

fn dup2_action(fd: c_int, newfd: c_int) -> Action {
    Action {
        tag: DUP2,
        pad: 0,
        u: [u64::from(fd as u32) | u64::from(newfd as u32) << 32, 0, 0],
    }
}

/// The highest descriptor the actions name (-1: they open nothing), or
/// why they must go to glibc as they are.
fn plan(actions: &[Action], flags: c_short) -> Result<c_int, &'static str> {
    let mut max_fd = 2;
    let mut moved = false;
    let mut closed_from = false;
    let mut opens = false;
    for a in actions {
        match a.tag {
            CLOSE | FCHDIR | TCSETPGRP => max_fd = max_fd.max(low(a.u[0])),
            DUP2 => max_fd = max_fd.max(low(a.u[0])).max(low(a.u[0] >> 32)),
            CLOSEFROM => closed_from = true,
            CHDIR => {}
            OPEN => {
                let (fd, path, _, _) = open_of(a);
                max_fd = max_fd.max(fd);
                opens = true;
                if closed_from {
                    return Err("an open action after a closefrom action");
                }
                // SAFETY: glibc's copy of the path, NUL-terminated.
                let first = unsafe { *(path as *const u8) };
                if moved && first != b'/' {
                    return Err("a relative open after a chdir or fchdir action");
                }
            }
            _ => return Err("an action this glibc layout does not know"),
        }
        moved |= matches!(a.tag, CHDIR | FCHDIR);
    }
    if !opens {
        return Ok(-1);
    }
    if flags & libc::POSIX_SPAWN_RESETIDS as c_short != 0 {
        return Err("POSIX_SPAWN_RESETIDS (the child opens with the real IDs)");
    }
    if flags & libc::POSIX_SPAWN_SETSID != 0 {
        return Err("POSIX_SPAWN_SETSID (an open may give the session its terminal)");
    }
    Ok(max_fd)
}

type Spawn = unsafe extern "C" fn(
    *mut libc::pid_t,
    *const c_char,
    *const FileActions,
    *const libc::posix_spawnattr_t,
    *const *mut c_char,
    *const *mut c_char,
) -> c_int;

/// `posix_spawn` (`search`: `posix_spawnp`) with open actions done in the
/// parent while the filter is in (see the module comment).
///
/// # Safety
/// As `posix_spawn(3)`; `fa` and `attr` are glibc's or null.
pub unsafe fn spawn(
    search: bool,
    pid: *mut libc::pid_t,
    path: *const c_char,
    fa: *const libc::posix_spawn_file_actions_t,
    attr: *const libc::posix_spawnattr_t,
    argv: *const *mut c_char,
    envp: *const *mut c_char,
) -> c_int {
    let slot = if search { &POSIX_SPAWNP } else { &POSIX_SPAWN };
    // SAFETY: the slot holds glibc's function of this type.
    let real = unsafe { core::mem::transmute::<usize, Spawn>(slot.get()) };
    let fa = fa as *const FileActions;
    // glibc's spawn takes its locks and reads its state: libc's rights.
    let call = |fa: *const FileActions| {
        // SAFETY: forwarded, with the caller's or our file actions.
        runtime::with_libc_rights(|| unsafe { real(pid, path, fa, attr, argv, envp) })
    };
    if fa.is_null() || !super::INSTALLED.load(Ordering::Acquire) {
        return call(fa);
    }
    // SAFETY: the caller's initialised file actions.
    let f = unsafe { &*fa };
    if f.used <= 0 || f.actions.is_null() {
        return call(fa);
    }
    // SAFETY: glibc's array of `used` actions.
    let actions = unsafe { core::slice::from_raw_parts(f.actions, f.used as usize) };
    let mut flags: c_short = 0;
    if !attr.is_null() {
        // SAFETY: the caller's initialised attributes.
        unsafe { libc::posix_spawnattr_getflags(attr, &mut flags) };
    }
    let max_fd = match plan(actions, flags) {
        Ok(-1) => return call(fa),
        Ok(m) => m,
        Err(why) => {
            log::warn!(
                "posix_spawn: {why}: the file actions run as they are, and the filter kills a child that opens a file"
            );
            return call(fa);
        }
    };
    let mut copy: Vec<Action> = actions.to_vec();
    let mut held: Vec<c_int> = Vec::new();
    let mut failed = 0;
    for a in copy.iter_mut().filter(|a| a.tag == OPEN) {
        let (target, p, oflag, mode) = open_of(a);
        match open_above(p, oflag, mode, max_fd) {
            Ok(fd) => {
                held.push(fd);
                *a = dup2_action(fd, target);
            }
            Err(e) => {
                failed = e;
                break;
            }
        }
    }
    let r = if failed != 0 {
        failed
    } else {
        let rewritten = FileActions {
            allocated: f.used,
            used: f.used,
            actions: copy.as_ptr(),
            pad: [0; 16],
        };
        call(&rewritten)
    };
    for fd in held {
        // SAFETY: a descriptor this function opened.
        unsafe { libc::close(fd) };
    }
    r
}

/// Open `path` as the child would (checked as a trapped open is, with the
/// caller's rights), close-on-exec, on a descriptor above `max_fd`; the
/// errno on failure.
fn open_above(path: usize, oflag: c_int, mode: u32, max_fd: c_int) -> Result<c_int, c_int> {
    // The parent must not take a terminal the child (no session leader
    // without POSIX_SPAWN_SETSID) would not.
    let flags = oflag | libc::O_CLOEXEC | libc::O_NOCTTY;
    let args = [
        libc::AT_FDCWD as usize,
        path,
        flags as usize,
        mode as usize,
        0,
        0,
    ];
    let here = open_above as *const () as usize;
    let fd = super::decide(libc::SYS_openat, args, pku::read_pkru(), true, here, here);
    if fd < 0 {
        return Err(-fd as c_int);
    }
    let fd = fd as c_int;
    // SAFETY: our descriptor; F_DUPFD_CLOEXEC takes an integer.
    let high = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, max_fd + 1) };
    let e = crate::stackfmt::errno();
    // SAFETY: our descriptor.
    unsafe { libc::close(fd) };
    if high < 0 {
        return Err(e);
    }
    Ok(high)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout matches this glibc: actions built by its public API read
    /// back as written.
    #[test]
    fn glibc_file_actions_have_the_expected_layout() {
        // SAFETY: glibc's API on a zeroed, then initialised object.
        unsafe {
            let mut fa: libc::posix_spawn_file_actions_t = core::mem::zeroed();
            assert_eq!(libc::posix_spawn_file_actions_init(&mut fa), 0);
            libc::posix_spawn_file_actions_addclose(&mut fa, 7);
            libc::posix_spawn_file_actions_adddup2(&mut fa, 4, 5);
            libc::posix_spawn_file_actions_addopen(&mut fa, 3, c"/x".as_ptr(), 0o101, 0o640);
            let f = &*(&fa as *const _ as *const FileActions);
            assert_eq!(f.used, 3);
            let a = core::slice::from_raw_parts(f.actions, 3);
            assert_eq!((a[0].tag, low(a[0].u[0])), (CLOSE, 7));
            // The unused words of the union are whatever glibc left there.
            assert_eq!((a[1].tag, a[1].u[0]), (DUP2, dup2_action(4, 5).u[0]));
            let (fd, p, oflag, mode) = open_of(&a[2]);
            assert_eq!((a[2].tag, fd, oflag, mode), (OPEN, 3, 0o101, 0o640));
            assert_eq!(core::ffi::CStr::from_ptr(p as *const c_char), c"/x");
            assert_eq!(plan(a, 0), Ok(7));
            assert!(plan(a, libc::POSIX_SPAWN_SETSID).is_err());
            libc::posix_spawn_file_actions_destroy(&mut fa);
        }
    }

    fn open(fd: c_int, path: &'static core::ffi::CStr) -> Action {
        Action {
            tag: OPEN,
            pad: 0,
            u: [fd as u64, path.as_ptr() as u64, 0],
        }
    }

    #[test]
    fn rewrites_only_what_keeps_its_meaning() {
        let chdir = Action {
            tag: CHDIR,
            pad: 0,
            u: [c"/tmp".as_ptr() as u64, 0, 0],
        };
        let closefrom = Action {
            tag: CLOSEFROM,
            pad: 0,
            u: [3, 0, 0],
        };
        assert_eq!(plan(&[dup2_action(1, 9)], 0), Ok(-1));
        assert_eq!(plan(&[open(1, c"out"), dup2_action(1, 9)], 0), Ok(9));
        assert_eq!(plan(&[chdir, open(1, c"/abs")], 0), Ok(2));
        assert!(plan(&[chdir, open(1, c"rel")], 0).is_err());
        assert_eq!(plan(&[open(0, c"/dev/null"), closefrom], 0), Ok(2));
        assert!(plan(&[closefrom, open(0, c"/dev/null")], 0).is_err());
        let unknown = Action {
            tag: 99,
            pad: 0,
            u: [0; 3],
        };
        assert!(plan(&[unknown, open(0, c"/dev/null")], 0).is_err());
        assert!(plan(
            &[open(0, c"/dev/null")],
            libc::POSIX_SPAWN_RESETIDS as c_short
        )
        .is_err());
    }
}
