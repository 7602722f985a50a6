//! Reading a file whole, in safe Rust, without asking its size first.
//!
//! `std::fs::read_to_string` sizes its buffer with `statx` and `lseek`
//! before reading. For the files start-up reads that is pure cost: `/proc`
//! reports size 0, and the shim's cache files (two per gated object:
//! 400 `statx` calls for a program with 200 libraries) are read through
//! anyway. `Take` has no such size look-up: its `read_to_end` reads into
//! the vector's spare capacity until end of file.

use std::io::Read;
use std::path::Path;

/// The file at `path` as UTF-8 text, read with a first buffer of
/// `capacity` bytes (grown as needed).
pub fn read_to_string(path: impl AsRef<Path>, capacity: usize) -> std::io::Result<String> {
    let mut buf = Vec::with_capacity(capacity);
    std::fs::File::open(path)?
        .take(u64::MAX)
        .read_to_end(&mut buf)?;
    String::from_utf8(buf).map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_proc_and_regular_files_whole() {
        let maps = read_to_string("/proc/self/maps", 16).unwrap();
        // Past the first, tiny buffer: every line, the last one complete.
        assert!(maps.len() > 16 && maps.ends_with('\n'), "{maps}");
        assert!(maps.lines().count() > 5);
        let dir = std::env::temp_dir().join(format!("ia2shim-files-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("t");
        let text = "line\n".repeat(10_000);
        std::fs::write(&f, &text).unwrap();
        assert_eq!(read_to_string(&f, 64).unwrap(), text);
        std::fs::write(&f, [0xffu8, 0xfe]).unwrap();
        assert_eq!(
            read_to_string(&f, 64).unwrap_err().kind(),
            std::io::ErrorKind::InvalidData
        );
        assert!(read_to_string(dir.join("missing"), 64).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
