//! A fixed-capacity `fmt::Write` sink on the stack. Used wherever allocation is
//! not allowed: the constructor's fatal errors, signal handlers, the logger.

use core::fmt;

/// A byte buffer of capacity `N` that silently truncates on overflow
/// (a truncated diagnostic beats a recursive fault).
pub struct StackBuf<const N: usize> {
    buf: [u8; N],
    len: usize,
}

impl<const N: usize> Default for StackBuf<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> StackBuf<N> {
    pub const fn new() -> Self {
        Self {
            buf: [0; N],
            len: 0,
        }
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }

    pub fn as_str(&self) -> &str {
        // Truncation happens at byte granularity and may split a UTF-8 sequence.
        match core::str::from_utf8(self.as_bytes()) {
            Ok(s) => s,
            Err(e) => {
                let valid = e.valid_up_to();
                core::str::from_utf8(&self.buf[..valid]).unwrap_or("")
            }
        }
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    pub fn push_bytes(&mut self, bytes: &[u8]) {
        let room = N - self.len;
        let n = bytes.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    /// Write the buffer to a file descriptor with `write(2)`, retrying on short writes.
    /// `n` in decimal, without `core::fmt`.
    pub fn push_decimal(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            digits[i] = b'0' + (n % 10) as u8;
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push_bytes(&digits[i..]);
    }

    pub fn write_to_fd(&self, fd: i32) {
        write_all_fd(fd, self.as_bytes());
    }
}

impl<const N: usize> fmt::Write for StackBuf<N> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        self.push_bytes(s.as_bytes());
        Ok(())
    }
}

/// `write(2)` all of `bytes` to `fd`; async-signal-safe.
pub fn write_all_fd(fd: i32, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: the pointer and length describe a live slice.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n > 0 {
            bytes = &bytes[n as usize..];
        } else if n < 0 && errno() == libc::EINTR {
            continue;
        } else {
            return;
        }
    }
}

/// The calling thread's `errno`.
pub fn errno() -> i32 {
    // SAFETY: `__errno_location` always returns a valid thread-local pointer.
    unsafe { *libc::__errno_location() }
}

/// The process id, via the raw syscall (async-signal-safe, never cached wrongly after fork).
pub fn pid() -> i32 {
    // SAFETY: getpid has no preconditions.
    unsafe { libc::getpid() }
}

#[cfg(test)]
mod tests {
    use super::*;
    use core::fmt::Write;

    #[test]
    fn decimal_as_fmt_writes_it() {
        for n in [0u64, 7, 10, 99, 4_194_304, u64::MAX] {
            let mut b = StackBuf::<32>::new();
            b.push_decimal(n);
            assert_eq!(b.as_str(), n.to_string());
        }
    }

    #[test]
    fn truncates_instead_of_overflowing() {
        let mut b = StackBuf::<8>::new();
        write!(b, "hello, world").unwrap();
        assert_eq!(b.as_str(), "hello, w");
    }

    #[test]
    fn truncation_never_yields_invalid_utf8() {
        let mut b = StackBuf::<4>::new();
        write!(b, "aaé€").unwrap();
        assert_eq!(b.as_str(), "aaé");
    }
}
