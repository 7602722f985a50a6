//! `/proc/self/maps` and `/proc/self/smaps` parsing. The parsers are pure;
//! [`read_self_maps`] and [`read_self_smaps`] do the I/O.

/// One mapping. `pkey` comes from smaps' `ProtectionKey:` line (absent on
/// kernels or CPUs without PKU, and always absent in plain maps).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: usize,
    pub end: usize,
    /// `PROT_*` bits.
    pub prot: i32,
    pub shared: bool,
    pub offset: u64,
    pub path: String,
    pub pkey: Option<u32>,
}

impl Mapping {
    pub fn contains(&self, addr: usize) -> bool {
        self.start <= addr && addr < self.end
    }

    /// `rwxp`-style permissions.
    pub fn perms(&self) -> [u8; 4] {
        [
            if self.prot & libc::PROT_READ != 0 {
                b'r'
            } else {
                b'-'
            },
            if self.prot & libc::PROT_WRITE != 0 {
                b'w'
            } else {
                b'-'
            },
            if self.prot & libc::PROT_EXEC != 0 {
                b'x'
            } else {
                b'-'
            },
            if self.shared { b's' } else { b'p' },
        ]
    }
}

/// A non-empty hexadecimal field at `*pos` ending at `stop`; `*pos`
/// moves past the stop byte.
fn hex_field(b: &[u8], pos: &mut usize, stop: u8) -> Option<u64> {
    let start = *pos;
    let mut v = 0u64;
    while *b.get(*pos)? != stop {
        let d = (b[*pos] as char).to_digit(16)?;
        v = v.checked_mul(16)? | u64::from(d);
        *pos += 1;
    }
    if *pos == start {
        return None;
    }
    *pos += 1;
    Some(v)
}

/// One header line: `start-end perms offset dev inode [path]`. Parsed by
/// bytes: a process with 200 libraries has a thousand of these lines, and
/// the census reads them at every start-up.
fn parse_maps_line(line: &str) -> Option<Mapping> {
    let b = line.as_bytes();
    let mut pos = 0;
    let start = hex_field(b, &mut pos, b'-')? as usize;
    let end = hex_field(b, &mut pos, b' ')? as usize;
    let perms = b.get(pos..pos + 4)?;
    if b.get(pos + 4) != Some(&b' ') {
        return None;
    }
    pos += 5;
    let offset = hex_field(b, &mut pos, b' ')?;
    // dev and inode, then the path after its padding (none after a
    // trailing inode).
    let skip = |pos: &mut usize| -> Option<()> {
        *pos += b[*pos..].iter().position(|&c| c == b' ')? + 1;
        Some(())
    };
    skip(&mut pos)?;
    let path = match skip(&mut pos) {
        Some(()) => line[pos..].trim_start(),
        None => "",
    };
    let mut prot = 0;
    if perms[0] == b'r' {
        prot |= libc::PROT_READ;
    }
    if perms[1] == b'w' {
        prot |= libc::PROT_WRITE;
    }
    if perms[2] == b'x' {
        prot |= libc::PROT_EXEC;
    }
    Some(Mapping {
        start,
        end,
        prot,
        shared: perms[3] == b's',
        offset,
        path: path.to_string(),
        pkey: None,
    })
}

/// Parse `/proc/PID/maps` text.
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    // One allocation for the vector, sized by the line count.
    let mut out = Vec::with_capacity(text.bytes().filter(|&b| b == b'\n').count() + 1);
    out.extend(text.lines().filter_map(parse_maps_line));
    out
}

/// Parse `/proc/PID/smaps` text: header lines as in maps, followed by
/// `Key: value` lines, of which only `ProtectionKey:` matters here.
pub fn parse_smaps(text: &str) -> Vec<Mapping> {
    let mut out: Vec<Mapping> = Vec::new();
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("ProtectionKey:") {
            if let Some(m) = out.last_mut() {
                m.pkey = v.trim().parse().ok();
            }
        } else if line
            .split(' ')
            .next()
            .is_some_and(|f| f.contains('-') && !f.ends_with(':'))
        {
            if let Some(m) = parse_maps_line(line) {
                out.push(m);
            }
        }
    }
    out
}

/// Read a `/proc` file whole. Its size is unknown (stat says 0), and each
/// `read` makes the kernel regenerate text from the last position, so
/// start with a buffer that holds a typical process's maps in one call.
fn read_proc(path: &str) -> std::io::Result<String> {
    crate::files::read_to_string(path, 64 << 10)
}

pub fn read_self_maps() -> std::io::Result<Vec<Mapping>> {
    Ok(parse_maps(&read_proc("/proc/self/maps")?))
}

pub fn read_self_smaps() -> std::io::Result<Vec<Mapping>> {
    Ok(parse_smaps(&read_proc("/proc/self/smaps")?))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0a00000-55d0c0a01000 r--p 00000000 08:01 1234                       /usr/bin/prog
Size:                  4 kB
ProtectionKey:         0
55d0c0c03000-55d0c0c05000 rw-p 00002000 08:01 1234                       /usr/bin/prog
Size:                  8 kB
VmFlags: rd wr mr mw me ac
ProtectionKey:         2
7ffd1000-7ffd3000 rw-p 00000000 00:00 0                                  [stack]
Size:                  8 kB
7f0000000000-7f0000003000 rw-p 00000000 00:00 0 
ProtectionKey:         1
";

    #[test]
    fn smaps_keys_and_fields() {
        let m = parse_smaps(SMAPS);
        assert_eq!(m.len(), 4);
        assert_eq!(m[0].path, "/usr/bin/prog");
        assert_eq!(m[0].prot, libc::PROT_READ);
        assert_eq!(m[1].pkey, Some(2));
        assert_eq!(m[1].prot, libc::PROT_READ | libc::PROT_WRITE);
        assert_eq!(m[1].offset, 0x2000);
        assert_eq!(&m[1].perms(), b"rw-p");
        assert_eq!(m[2].path, "[stack]");
        assert_eq!(m[2].pkey, None);
        assert_eq!(m[3].path, "");
        assert_eq!(
            (m[3].start, m[3].end, m[3].pkey),
            (0x7f0000000000, 0x7f0000003000, Some(1))
        );
        assert!(m[3].contains(0x7f0000002fff) && !m[3].contains(0x7f0000003000));
    }

    /// The field-splitting parser the byte parser replaced.
    fn reference_line(line: &str) -> Option<Mapping> {
        let mut it = line.splitn(6, ' ');
        let range = it.next()?;
        let perms = it.next()?.as_bytes();
        let offset = u64::from_str_radix(it.next()?, 16).ok()?;
        let _dev = it.next()?;
        let _inode = it.next()?;
        let path = it.next().unwrap_or("").trim_start().to_string();
        let (s, e) = range.split_once('-')?;
        if perms.len() != 4 {
            return None;
        }
        let bit = |i: usize, c: u8, p: i32| if perms[i] == c { p } else { 0 };
        Some(Mapping {
            start: usize::from_str_radix(s, 16).ok()?,
            end: usize::from_str_radix(e, 16).ok()?,
            prot: bit(0, b'r', libc::PROT_READ)
                | bit(1, b'w', libc::PROT_WRITE)
                | bit(2, b'x', libc::PROT_EXEC),
            shared: perms[3] == b's',
            offset,
            path,
            pkey: None,
        })
    }

    #[test]
    fn byte_parser_agrees_with_field_splitting() {
        let text = std::fs::read_to_string("/proc/self/maps").unwrap();
        let lines = text.lines().chain([
            "7f00-7f10 rw-p 00000000 00:00 0",
            "7f00-7f10 rw-p 00000000 00:00 0 ",
            "7f00-7f10 r-xp 00001000 08:01 42    /a path/with spaces (deleted)",
            "7f00-7f10 rw-p",
            "7f00 rw-p 0 0 0",
            "zz-7f10 rw-p 0 00:00 0",
            "",
        ]);
        for line in lines {
            assert_eq!(parse_maps_line(line), reference_line(line), "{line:?}");
        }
    }

    #[test]
    fn maps_of_this_process_include_the_stack() {
        let m = read_self_maps().unwrap();
        assert!(m.iter().any(|m| m.path == "[stack]"));
        let s = read_self_smaps().unwrap();
        assert!(s.iter().any(|m| m.path == "[stack]"));
    }
}
