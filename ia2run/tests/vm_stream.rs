//! `ia2run --vm -- CMD` streams: stdin from ia2run's stdin, output while the
//! command runs, byte for byte, and a terminal stays a terminal. Two VM
//! boots.

mod support;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::Duration;
use support::*;

/// Generous: a boot on a loaded 2-core host. Only a broken runner waits
/// this long.
const WAIT: Duration = Duration::from_secs(180);

/// Reads `r` in a thread, sending each chunk (an empty one at the end).
fn chunks(mut r: impl Read + Send + 'static) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 1 << 16];
        loop {
            let n = r.read(&mut buf).unwrap_or(0);
            let _ = tx.send(buf[..n].to_vec());
            if n == 0 {
                break;
            }
        }
    });
    rx
}

/// Collects chunks until `got` holds `want` (or the end, or `WAIT`).
fn until(rx: &mpsc::Receiver<Vec<u8>>, got: &mut Vec<u8>, want: &[u8]) -> bool {
    while !got.windows(want.len()).any(|w| w == want) {
        match rx.recv_timeout(WAIT) {
            Ok(c) if !c.is_empty() => got.extend_from_slice(&c),
            _ => return false,
        }
    }
    true
}

/// 64-bit FNV-1a, to name the bytes in a failure message.
fn fnv(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf29ce484222325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x100000001b3)
    })
}

/// Boot 1: one command reads a line, answers it while still running (it
/// then waits in `cat` for input we have not closed, so the answer cannot
/// be output held back until the end), then copies 10 MB of every byte
/// value through `cat` and exits 7.
#[test]
fn stdin_line_then_10mb_through_cat() {
    if skip_vm() {
        return;
    }
    let mut child = ia2run()
        .args(["--vm", "--no-shim", "--", "sh", "-c"])
        .arg("read line; echo \"got $line\"; echo to-err >&2; cat; exit 7")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let out = chunks(child.stdout.take().unwrap());
    let err = chunks(child.stderr.take().unwrap());
    stdin.write_all(b"hello\n").unwrap();
    let mut got = Vec::new();
    let answered = until(&out, &mut got, b"got hello\n");
    assert!(
        answered,
        "no answer while the command waits for more input; stdout so far: {:?}",
        String::from_utf8_lossy(&got)
    );
    assert!(child.try_wait().unwrap().is_none());

    // Pseudo-random bytes: every value, no pattern a lossy path keeps.
    let mut x = 0x9e3779b97f4a7c15u64;
    let data: Vec<u8> = (0..10 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    let writer = {
        let data = data.clone();
        std::thread::spawn(move || {
            stdin.write_all(&data).unwrap();
            // Dropping stdin closes it: cat sees the end.
        })
    };
    let mut rest = got.split_off(b"got hello\n".len());
    while let Ok(c) = out.recv_timeout(WAIT) {
        if c.is_empty() {
            break;
        }
        rest.extend_from_slice(&c);
    }
    writer.join().unwrap();
    let status = child.wait().unwrap();
    let mut errs = Vec::new();
    while let Ok(c) = err.recv_timeout(WAIT) {
        if c.is_empty() {
            break;
        }
        errs.extend_from_slice(&c);
    }
    assert_eq!(got, b"got hello\n");
    assert_eq!(
        (rest.len(), fnv(&rest)),
        (data.len(), fnv(&data)),
        "the 10 MB came back different"
    );
    assert_eq!(String::from_utf8_lossy(&errs), "to-err\n");
    assert_eq!(status.code(), Some(7));
}

/// Boot 2: with a terminal on ia2run's stdin, stdout and stderr the command
/// gets a pty of the same size; a line typed is echoed and read; ^C kills
/// it with SIGINT.
#[test]
fn terminal() {
    if skip_vm() {
        return;
    }
    let (mut m, mut s) = (0, 0);
    let ws = libc::winsize {
        ws_row: 33,
        ws_col: 111,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: valid out-pointers; the fds become ours.
    let rc = unsafe { libc::openpty(&mut m, &mut s, std::ptr::null_mut(), std::ptr::null(), &ws) };
    assert_eq!(rc, 0);
    // SAFETY: fresh fds from openpty.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(m), OwnedFd::from_raw_fd(s)) };
    let mut cmd = ia2run();
    cmd.args(["--vm", "--no-shim", "--", "sh", "-c"])
        .arg("tty; stty size; printf 'name? '; read x; echo \"got [$x]\"; sleep 1000")
        .stdin(slave.try_clone().unwrap())
        .stdout(slave.try_clone().unwrap())
        .stderr(slave.try_clone().unwrap());
    // A session of its own, as under a terminal emulator.
    std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
    let mut child = cmd.spawn().unwrap();
    drop(cmd);
    drop(slave);
    let mut w = std::fs::File::from(master.try_clone().unwrap());
    let out = chunks(std::fs::File::from(master));
    let mut got = Vec::new();
    let show = |g: &[u8]| format!("{:?}", String::from_utf8_lossy(g));
    assert!(until(&out, &mut got, b"name? "), "{}", show(&got));
    w.write_all(b"abc\r").unwrap();
    assert!(until(&out, &mut got, b"got [abc]\r\n"), "{}", show(&got));
    w.write_all(b"\x03").unwrap();
    let status = child.wait().unwrap();
    while let Ok(c) = out.recv_timeout(Duration::from_secs(5)) {
        if c.is_empty() {
            break;
        }
        got.extend_from_slice(&c);
    }
    let text = String::from_utf8_lossy(&got);
    let lines: Vec<&str> = text.split("\r\n").collect();
    assert!(lines[0].starts_with("/dev/pts/"), "{}", show(&got));
    assert_eq!(lines[1], "33 111", "{}", show(&got));
    // The guest's line discipline echoed what was typed.
    assert!(
        text.contains("name? abc\r\ngot [abc]\r\n"),
        "{}",
        show(&got)
    );
    assert_eq!(status.code(), Some(130), "{}", show(&got));
}
