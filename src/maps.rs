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

fn parse_maps_line(line: &str) -> Option<Mapping> {
    let mut it = line.splitn(6, ' ');
    let range = it.next()?;
    let perms = it.next()?.as_bytes();
    let offset = u64::from_str_radix(it.next()?, 16).ok()?;
    let _dev = it.next()?;
    let _inode = it.next()?;
    let path = it.next().unwrap_or("").trim_start().to_string();
    let (s, e) = range.split_once('-')?;
    if perms.len() < 4 {
        return None;
    }
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
        start: usize::from_str_radix(s, 16).ok()?,
        end: usize::from_str_radix(e, 16).ok()?,
        prot,
        shared: perms[3] == b's',
        offset,
        path,
        pkey: None,
    })
}

/// Parse `/proc/PID/maps` text.
pub fn parse_maps(text: &str) -> Vec<Mapping> {
    text.lines().filter_map(parse_maps_line).collect()
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

pub fn read_self_maps() -> std::io::Result<Vec<Mapping>> {
    Ok(parse_maps(&std::fs::read_to_string("/proc/self/maps")?))
}

pub fn read_self_smaps() -> std::io::Result<Vec<Mapping>> {
    Ok(parse_smaps(&std::fs::read_to_string("/proc/self/smaps")?))
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

    #[test]
    fn maps_of_this_process_include_the_stack() {
        let m = read_self_maps().unwrap();
        assert!(m.iter().any(|m| m.path == "[stack]"));
        let s = read_self_smaps().unwrap();
        assert!(s.iter().any(|m| m.path == "[stack]"));
    }
}
