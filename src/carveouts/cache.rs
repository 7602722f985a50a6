//! Strict mode's decoded locators, kept across runs. Decoding libc and
//! ld.so functions needs iced's decoder tables (about 3 M instructions to
//! build) and a few thousand decoded instructions: most of strict mode's
//! start-up. The result depends only on the object's code, which its GNU
//! build-id names, and on the entry point (an IFUNC's selection depends on
//! the CPU): so each result is kept under the build-id, with offsets from
//! the object's base, in `IA2_CACHE_DIR` (`decode-v1-<build-id>`, one line
//! per entry, appended).
//!
//! A line is `entry start end follow: ip,target ip,target ...` in hex
//! offsets. Lines that do not parse, or name offsets outside the object,
//! are ignored, and the decode runs. The files are the user's own, as
//! `~/.profile` is: whoever can write them can already run code as the user.

use crate::objects::{LoadedObject, Range};
use std::sync::Mutex;

/// Cache files read in this process: (build-id, lines).
static LOADED: Mutex<Vec<(Vec<u8>, String)>> = Mutex::new(Vec::new());

/// Drop what this process read (tests: the next lookup reads the file).
#[cfg(test)]
pub fn forget() {
    LOADED.lock().unwrap().clear();
}

/// Lower-case hex, as build-ids name cache files.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn key(o: &LoadedObject, entry: usize, within: Range, follow: bool) -> String {
    format!(
        "{:x} {:x} {:x} {}:",
        entry - o.base,
        within.start - o.base,
        within.end - o.base,
        u8::from(follow)
    )
}

/// The operands cached for `line`'s key, converted back to addresses.
fn parse(o: &LoadedObject, rest: &str) -> Option<Vec<(usize, usize)>> {
    let mut out = Vec::new();
    for pair in rest.split_whitespace() {
        let (ip, t) = pair.split_once(',')?;
        let ip = o.base.wrapping_add(usize::from_str_radix(ip, 16).ok()?);
        let t = o.base.wrapping_add(usize::from_str_radix(t, 16).ok()?);
        // The instruction lies in the object's text; the target anywhere.
        if !o.contains(ip) {
            return None;
        }
        out.push((ip, t));
    }
    Some(out)
}

/// `decode()`'s result for (`o`, `entry`, `within`, `follow`), from the
/// cache in `dir` when a run has already decoded it, else decoded and
/// appended there. Without a directory or a build-id: `decode()`.
pub fn operands(
    dir: Option<&str>,
    o: &LoadedObject,
    entry: usize,
    within: Range,
    follow: bool,
    decode: impl FnOnce() -> Vec<(usize, usize)>,
) -> Vec<(usize, usize)> {
    let (Some(dir), Some(id)) = (dir, o.build_id()) else {
        return decode();
    };
    if !o.contains(entry) || !o.contains(within.start) {
        return decode();
    }
    let path = format!("{dir}/decode-v1-{}", hex(id));
    let key = key(o, entry, within, follow);
    let mut loaded = match LOADED.lock() {
        Ok(l) => l,
        Err(e) => e.into_inner(),
    };
    if !loaded.iter().any(|(i, _)| i == id) {
        let text = crate::files::read_to_string(&path, 4096).unwrap_or_default();
        loaded.push((id.to_vec(), text));
    }
    let text = &mut loaded.iter_mut().find(|(i, _)| i == id).expect("pushed").1;
    if let Some(hit) = text
        .lines()
        .find_map(|l| l.strip_prefix(key.as_str()).and_then(|rest| parse(o, rest)))
    {
        return hit;
    }
    let result = decode();
    let mut line = key;
    for (ip, t) in &result {
        line += &format!(" {:x},{:x}", ip - o.base, t.wrapping_sub(o.base));
    }
    line.push('\n');
    text.push_str(&line);
    if let Err(e) = append(dir, &path, &line) {
        log::debug!("IA2_CACHE_DIR: cannot write {path}: {e}");
    }
    result
}

/// Append `line` (whole lines) to `path` in `dir`, creating both (0700, 0600).
pub fn append(dir: &str, path: &str, line: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    // One write of one line with O_APPEND: concurrent runs append whole lines.
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?
        .write_all(line.as_bytes())
}
