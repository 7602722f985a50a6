//! Entry-gate analyses kept across runs. Deciding whether a function can
//! take an entry gate decodes the whole function (a direct branch into its
//! first bytes refuses it), which needs iced's decoder tables (3.3 M
//! instructions to build) and then costs in proportion to the object's
//! exported code: most of the entry gates' install time. The answer
//! depends only on the object's code, which its GNU build-id names, so it
//! is kept in `IA2_CACHE_DIR` (as strict mode's locators are,
//! `carveouts/cache.rs`), one file per object and audit setting
//! (`entry-v1-<n|a>-<build-id>`), one line per function, in hex offsets:
//!
//! - `OFF SIZE - REASON`: refused, and why;
//! - `OFF SIZE SKIP END c LEN.KIND ...`: the `jmp` goes at `OFF+SKIP`
//!   and overwrites up to `OFF+END`; each overwritten instruction is copied
//!   into the record as its KIND says ([`Prologue::copy`], `COPY_*`);
//! - `OFF SIZE SKIP END e`: other forms, so the install decodes those
//!   bytes (not the function) for iced's block encoder.
//!
//! Lines that do not parse or do not fit the function are ignored and the
//! function is analysed again. The files are the user's own, as
//! `~/.profile` is: whoever can write them can already run code as the user.

use super::entry::{Prologue, COPY_AS_IS, COPY_ENDS, COPY_REL32, COPY_REL8};
use crate::carveouts::cache::{append, hex};
use crate::objects::LoadedObject;

/// A function's analysis, as far as installing its gate needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Known {
    Refused(String),
    Shape {
        /// 0, or 4 after an `endbr64`.
        skip: usize,
        /// The first byte after the overwritten instructions, from the function.
        end: usize,
        copy: Option<Vec<(u8, u8)>>,
    },
}

impl Known {
    /// The cacheable part of an analysis of the function at `f`.
    pub(super) fn of(f: usize, r: &Result<Prologue, String>) -> Known {
        match r {
            Err(reason) => Known::Refused(reason.clone()),
            Ok(p) => Known::Shape {
                skip: p.at - f,
                end: p.end - f,
                copy: p.copy.clone(),
            },
        }
    }

    fn line(&self, off: usize, size: usize) -> String {
        match self {
            Known::Refused(reason) => format!("{off:x} {size:x} - {reason}\n"),
            Known::Shape { skip, end, copy } => {
                let mut l = format!("{off:x} {size:x} {skip:x} {end:x}");
                match copy {
                    None => l.push_str(" e"),
                    Some(c) => {
                        l.push_str(" c");
                        for (len, disp) in c {
                            l += &format!(" {len:x}.{disp:x}");
                        }
                    }
                }
                l.push('\n');
                l
            }
        }
    }

    /// A line's (offset, size, analysis), if it parses and is consistent.
    /// By bytes: curl's thirteen thousand lines cost 31 M instructions
    /// through `str::split` and `from_str_radix`.
    fn parse(line: &str) -> Option<(usize, usize, Known)> {
        let b = line.as_bytes();
        let mut pos = 0;
        let off = hex_token(b, &mut pos)?;
        let size = hex_token(b, &mut pos)?;
        if b.get(pos..pos + 2) == Some(b"- ") {
            return Some((off, size, Known::Refused(line[pos + 2..].to_string())));
        }
        let skip = hex_token(b, &mut pos)?;
        let end = hex_token(b, &mut pos)?;
        let copy = match (b.get(pos), b.get(pos + 1)) {
            (Some(b'e'), None | Some(b' ')) => None,
            (Some(b'c'), Some(b' ')) => {
                pos += 2;
                let mut c = Vec::new();
                loop {
                    let l = hex_byte(b, &mut pos, b'.')?;
                    let d = hex_byte(b, &mut pos, b' ')?;
                    c.push((l, d));
                    if pos >= b.len() {
                        break;
                    }
                }
                Some(c)
            }
            _ => return None,
        };
        let sane = matches!(skip, 0 | 4)
            && end >= skip + 5
            && end <= size
            && copy.as_ref().is_none_or(|c| {
                !c.is_empty()
                    && c.iter().map(|&(l, _)| l as usize).sum::<usize>() == end - skip
                    && c.iter().all(|&(l, k)| match k {
                        COPY_AS_IS | COPY_ENDS => l > 0,
                        COPY_REL32 => l == 5 || l == 6,
                        COPY_REL8 => l == 2,
                        d => d < 16 && d as usize + 4 <= l as usize,
                    })
            });
        sane.then_some((off, size, Known::Shape { skip, end, copy }))
    }
}

/// A non-empty hexadecimal number at `*pos`, ended by a space (consumed)
/// or the end of the line.
fn hex_token(b: &[u8], pos: &mut usize) -> Option<usize> {
    let start = *pos;
    let mut v = 0usize;
    while let Some(&c) = b.get(*pos) {
        if c == b' ' {
            break;
        }
        v = v.checked_mul(16)? | (c as char).to_digit(16)? as usize;
        *pos += 1;
    }
    if *pos == start {
        return None;
    }
    if *pos < b.len() {
        *pos += 1;
    }
    Some(v)
}

/// A non-empty hexadecimal byte at `*pos`, ended by `stop` (consumed) or,
/// when `stop` is a space, the end of the line.
fn hex_byte(b: &[u8], pos: &mut usize, stop: u8) -> Option<u8> {
    let start = *pos;
    let mut v = 0u8;
    while let Some(&c) = b.get(*pos) {
        if c == stop {
            break;
        }
        v = v.checked_mul(16)? | (c as char).to_digit(16)? as u8;
        *pos += 1;
    }
    if *pos == start {
        return None;
    }
    match b.get(*pos) {
        Some(_) => *pos += 1,
        None if stop == b' ' => {}
        None => return None,
    }
    Some(v)
}

/// The cached analyses of one object's functions, and the lines to add.
/// A vector sorted by (offset, size), searched by halves: curl's 13,625
/// gated functions spent 41 M instructions in a SipHash map's build and
/// look-ups, a tenth of their install.
pub(super) struct EntryCache {
    file: Option<(String, String)>,
    known: Vec<((usize, usize), Known)>,
    added: String,
}

impl EntryCache {
    /// The cache of `obj` for this audit setting in `dir` (none without a
    /// directory or a build-id).
    pub(super) fn open(dir: Option<String>, obj: &LoadedObject, exact_sites: bool) -> EntryCache {
        let mut c = EntryCache {
            file: None,
            known: Vec::new(),
            added: String::new(),
        };
        let (Some(dir), Some(id)) = (dir, obj.build_id()) else {
            return c;
        };
        let path = format!(
            "{dir}/entry-v1-{}-{}",
            if exact_sites { 'a' } else { 'n' },
            hex(id)
        );
        if let Ok(text) = crate::files::read_to_string(&path, 16 << 10) {
            c.known = text
                .lines()
                .filter_map(Known::parse)
                .map(|(off, size, k)| ((off, size), k))
                .collect();
            // A stable sort keeps a key's first line first; dedup keeps it.
            c.known.sort_by_key(|e| e.0);
            c.known.dedup_by_key(|e| e.0);
        }
        c.file = Some((dir, path));
        c
    }

    pub(super) fn get(&self, off: usize, size: usize) -> Option<&Known> {
        let i = self
            .known
            .binary_search_by_key(&(off, size), |e| e.0)
            .ok()?;
        Some(&self.known[i].1)
    }

    /// A new analysis, for the file: this process looks each function up
    /// once, so it is not added to the search.
    pub(super) fn put(&mut self, off: usize, size: usize, k: &Known) {
        if self.file.is_some() {
            self.added += &k.line(off, size);
        }
    }

    /// Append what was analysed here, in one write.
    pub(super) fn flush(self) {
        let Some((dir, path)) = self.file else { return };
        if self.added.is_empty() {
            return;
        }
        if let Err(e) = append(&dir, &path, &self.added) {
            log::debug!("IA2_CACHE_DIR: cannot write {path}: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_trip_and_bad_ones_are_ignored() {
        let ks = [
            Known::Refused("its size is unknown (st_size 0)".into()),
            Known::Shape {
                skip: 4,
                end: 22,
                copy: Some(vec![(1, 0), (3, 0), (7, 3), (2, 0x81), (5, 0x80)]),
            },
            Known::Shape {
                skip: 0,
                end: 6,
                copy: None,
            },
        ];
        for k in ks {
            let l = k.line(0x1230, 0x40);
            assert_eq!(Known::parse(l.trim_end()), Some((0x1230, 0x40, k)), "{l}");
        }
        for bad in [
            "",
            "12 40",
            "12 40 4 c c 1.0",
            "12 40 2 8 e",         // skip is 0 or 4
            "12 40 0 3 e",         // shorter than the jmp
            "12 4 0 8 e",          // past the function
            "12 40 0 8 c 3.0 3.0", // lengths do not add up
            "12 40 0 6 c 6.3",     // the disp32 does not fit
            "12 40 0 6 c 6.81",    // a rel8 branch is 2 bytes
            "12 40 0 6 x",
            "12 40 0 6 c",       // no instruction
            "12 40 0 6 c 6",     // a length without its kind
            "12 40 0 6 c 6.",    // a kind without digits
            "12 40 0 6 c 100.0", // not a byte
            "12 40 -",           // a refusal without its reason
            "12 40 0 6 ex",      // not a kind
            "12 4g 0 6 e",       // not hexadecimal
        ] {
            assert_eq!(Known::parse(bad), None, "{bad}");
        }
    }
}
