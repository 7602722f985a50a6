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
use std::collections::HashMap;

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
    fn parse(line: &str) -> Option<(usize, usize, Known)> {
        let hexn = |t: &str| usize::from_str_radix(t, 16).ok();
        let mut it = line.splitn(4, ' ');
        let off = hexn(it.next()?)?;
        let size = hexn(it.next()?)?;
        let third = it.next()?;
        let rest = it.next()?;
        if third == "-" {
            return Some((off, size, Known::Refused(rest.to_string())));
        }
        let skip = hexn(third)?;
        let mut t = rest.split(' ');
        let end = hexn(t.next()?)?;
        let copy = match t.next()? {
            "e" => None,
            "c" => Some(
                t.map(|p| {
                    let (l, d) = p.split_once('.')?;
                    Some((
                        u8::from_str_radix(l, 16).ok()?,
                        u8::from_str_radix(d, 16).ok()?,
                    ))
                })
                .collect::<Option<Vec<_>>>()?,
            ),
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

/// The cached analyses of one object's functions, and the lines to add.
pub(super) struct EntryCache {
    file: Option<(String, String)>,
    known: HashMap<(usize, usize), Known>,
    added: String,
}

impl EntryCache {
    /// The cache of `obj` for this audit setting in `dir` (none without a
    /// directory or a build-id).
    pub(super) fn open(dir: Option<String>, obj: &LoadedObject, exact_sites: bool) -> EntryCache {
        let mut c = EntryCache {
            file: None,
            known: HashMap::new(),
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
            for (off, size, k) in text.lines().filter_map(Known::parse) {
                c.known.entry((off, size)).or_insert(k);
            }
        }
        c.file = Some((dir, path));
        c
    }

    pub(super) fn get(&self, off: usize, size: usize) -> Option<&Known> {
        self.known.get(&(off, size))
    }

    pub(super) fn put(&mut self, off: usize, size: usize, k: Known) {
        if self.file.is_some() {
            self.added += &k.line(off, size);
        }
        self.known.insert((off, size), k);
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
        ] {
            assert_eq!(Known::parse(bad), None, "{bad}");
        }
    }
}
