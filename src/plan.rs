//! The plan: objects + compartments + carveouts → which page ranges get which
//! compartment's key, and why. Pure (no syscalls) and unit-tested on
//! synthetic objects; `apply` carries it out.

use crate::maps::Mapping;
use crate::objects::{page_down, LoadedObject, Range, PAGE};

/// Why a range is in the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reason {
    /// Writable `PT_LOAD` data (.data, .bss, …) of object `object`.
    Data { object: usize },
    /// The TLS block of object `object` in thread `thread` (0 = main).
    Tls { object: usize, thread: usize },
    /// Put back on key 0 by a carveout (only listed where it overlaps a tag).
    Carveout {
        name: &'static str,
        toggle: &'static str,
    },
    /// Strict mode: an anonymous mapping made by ld.so's start-up allocator.
    LoaderHeap,
    /// A TLS page of a compartment module that cannot carry its key (it is
    /// shared with another block or the TCB), kept on key 0 even where the
    /// loader heap around it is tagged.
    TlsShared { object: usize, thread: usize },
}

/// One contiguous range with one key and one protection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlanEntry {
    pub range: Range,
    /// `None`: stays on / goes back to key 0.
    pub compartment: Option<u8>,
    /// The current protection, which applying keeps (never widened).
    pub prot: i32,
    pub reason: Reason,
}

/// A TLS page that could not be tagged, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UntaggedTlsPage {
    pub page: usize,
    pub object: usize,
    pub thread: usize,
    pub why: &'static str,
}

/// A named set of ranges to keep on key 0.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Carveout {
    pub name: &'static str,
    pub toggle: &'static str,
    /// Page-aligned.
    pub ranges: Vec<Range>,
}

/// One thread's TLS blocks, for the TLS part of the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ThreadTls {
    pub thread: usize,
    /// (object index, block range) for every module with a block in this thread.
    pub blocks: Vec<(usize, Range)>,
    /// Blocks of the TLS layout's pad objects: filler that no code touches,
    /// so a page covered by one compartment's blocks and pads is private.
    pub pads: Vec<Range>,
}

/// Basename prefix of the TLS layout's pad objects (`ia2run`'s
/// `tlslayout`): shared objects whose only content is a `PT_TLS`.
pub const TLS_PAD_PREFIX: &str = "libia2shim-tlspad-";

/// Whether `basename` is a TLS layout pad object.
pub fn is_tls_pad(basename: &str) -> bool {
    basename.starts_with(TLS_PAD_PREFIX)
}

impl ThreadTls {
    /// A thread's blocks, with those of pad objects (`is_pad(object)`)
    /// moved to `pads`.
    pub fn new(
        thread: usize,
        blocks: Vec<(usize, Range)>,
        is_pad: impl Fn(usize) -> bool,
    ) -> ThreadTls {
        let (pads, blocks): (Vec<_>, Vec<_>) = blocks.into_iter().partition(|&(o, _)| is_pad(o));
        ThreadTls {
            thread,
            blocks,
            pads: pads.into_iter().map(|(_, r)| r).collect(),
        }
    }
}

/// How a thread's static TLS bytes are protected.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TlsBytes {
    /// Bytes of compartment modules' blocks on pages with their key.
    pub private: usize,
    /// Bytes of compartment modules' blocks left on key 0 (a page shared
    /// with another owner's block or the TCB, or a carveout).
    pub compartment_shared: usize,
    /// Bytes of shared modules' blocks (libc, the shim): key 0 by design.
    pub shared_modules: usize,
    /// Pad bytes of the TLS layout.
    pub pads: usize,
}

/// Count `t`'s TLS bytes by the key the plan gives their pages.
pub fn tls_bytes(
    plan: &Plan,
    t: &ThreadTls,
    compartment_of: &dyn Fn(usize) -> Option<u8>,
) -> TlsBytes {
    let mut out = TlsBytes {
        pads: t.pads.iter().map(Range::len).sum(),
        ..TlsBytes::default()
    };
    for &(obj, block) in &t.blocks {
        let Some(c) = compartment_of(obj) else {
            out.shared_modules += block.len();
            continue;
        };
        let mut page = page_down(block.start);
        while page < block.end {
            let n = block.intersect(&Range::new(page, page + PAGE)).len();
            if plan.lookup(page).is_some_and(|e| e.compartment == Some(c)) {
                out.private += n;
            } else {
                out.compartment_shared += n;
            }
            page += PAGE;
        }
    }
    out
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Sorted by address, non-overlapping.
    pub entries: Vec<PlanEntry>,
    pub untagged_tls: Vec<UntaggedTlsPage>,
}

impl Plan {
    /// The entry covering `addr`, if any.
    pub fn lookup(&self, addr: usize) -> Option<&PlanEntry> {
        let i = self.entries.partition_point(|e| e.range.end <= addr);
        self.entries.get(i).filter(|e| e.range.contains(addr))
    }

    /// The entries that actually carry a compartment key.
    pub fn tagged(&self) -> impl Iterator<Item = &PlanEntry> {
        self.entries.iter().filter(|e| e.compartment.is_some())
    }
}

/// Subtract `cut` from every range in `from`.
pub fn subtract(from: &[Range], cut: &Range) -> Vec<Range> {
    let mut out = Vec::with_capacity(from.len() + 1);
    for r in from {
        if cut.end <= r.start || cut.start >= r.end {
            out.push(*r);
            continue;
        }
        if r.start < cut.start {
            out.push(Range::new(r.start, cut.start));
        }
        if cut.end < r.end {
            out.push(Range::new(cut.end, r.end));
        }
    }
    out
}

/// Pages of an object's writable segments, minus RELRO rounded out to pages.
pub fn data_pages(o: &LoadedObject) -> Vec<Range> {
    let mut pages: Vec<Range> = o
        .segments
        .iter()
        .filter(|s| s.writable())
        .map(|s| s.range.pages_out())
        .collect();
    if let Some(relro) = o.relro {
        pages = subtract(&pages, &relro.pages_out());
    }
    pages.retain(|r| !r.is_empty());
    pages
}

/// TLS pages that lie wholly inside blocks of one compartment. Pages that
/// touch another compartment's block, a shared module's block, or memory
/// outside any block (the TCB, padding) are reported instead.
fn tls_pages(
    threads: &[ThreadTls],
    compartment_of: &dyn Fn(usize) -> Option<u8>,
    entries: &mut Vec<PlanEntry>,
    untagged: &mut Vec<UntaggedTlsPage>,
) {
    for t in threads {
        for &(obj, block) in &t.blocks {
            let Some(c) = compartment_of(obj) else {
                continue;
            };
            if block.is_empty() {
                continue;
            }
            let mut page = page_down(block.start);
            while page < block.end {
                let p = Range::new(page, page + PAGE);
                // Every byte of the page must be covered by blocks of compartment c.
                let mut covered: Vec<Range> = vec![p];
                let mut foreign = false;
                for &(o2, b2) in &t.blocks {
                    let inter = b2.intersect(&p);
                    if inter.is_empty() {
                        continue;
                    }
                    if compartment_of(o2) == Some(c) {
                        covered = subtract(&covered, &inter);
                    } else {
                        foreign = true;
                    }
                }
                for pad in &t.pads {
                    let inter = pad.intersect(&p);
                    if !inter.is_empty() {
                        covered = subtract(&covered, &inter);
                    }
                }
                covered.retain(|r| !r.is_empty());
                if foreign {
                    untagged.push(UntaggedTlsPage {
                        page,
                        object: obj,
                        thread: t.thread,
                        why: "shared with another module's TLS block",
                    });
                } else if !covered.is_empty() {
                    untagged.push(UntaggedTlsPage {
                        page,
                        object: obj,
                        thread: t.thread,
                        why: "shared with the TCB or memory outside TLS blocks",
                    });
                } else if !entries.iter().any(|e| e.range.contains(page)) {
                    entries.push(PlanEntry {
                        range: p,
                        compartment: Some(c),
                        prot: 0,
                        reason: Reason::Tls {
                            object: obj,
                            thread: t.thread,
                        },
                    });
                }
                page += PAGE;
            }
        }
    }
}

/// Extra ranges to tag in strict mode (the loader heap), with their owner.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ExtraRange {
    pub range: Range,
    pub compartment: u8,
    pub reason: Reason,
}

/// Everything the plan is built from.
#[derive(Clone, Copy)]
pub struct PlanInput<'a> {
    pub objects: &'a [LoadedObject],
    /// Object `i`'s compartment (`None`: shared).
    pub compartment_of: &'a [Option<u8>],
    pub threads: &'a [ThreadTls],
    /// Further ranges to tag (strict mode's loader heap).
    pub extra: &'a [ExtraRange],
    /// The carveouts that are switched on.
    pub carveouts: &'a [Carveout],
    /// Pages whose sharing a carveout toggle decides, switched on or not
    /// (the TCB page, ...): untaggable TLS is not forced shared there, so
    /// that turning the toggle off really unshares them.
    pub governed: &'a [Range],
    /// Each page's current protection; pages outside every mapping are
    /// dropped, and ranges are split where protection changes.
    pub maps: &'a [Mapping],
}

/// Build the plan.
///
/// Page claims are painted in priority order, so the result never overlaps:
/// loader heap < object data < TLS (tagged or kept shared) < carveouts. A
/// key-0 claim (shared TLS, carveout) is listed only where it overrode a tag.
pub fn build(input: &PlanInput<'_>) -> Plan {
    use std::collections::BTreeMap;
    let PlanInput {
        objects,
        compartment_of,
        threads,
        extra,
        carveouts,
        governed,
        maps,
    } = *input;
    let comp = |i: usize| compartment_of.get(i).copied().flatten();
    // page -> (compartment, reason, overrode a tag)
    let mut pages: BTreeMap<usize, (Option<u8>, Reason, bool)> = BTreeMap::new();
    let mut paint = |r: Range, c: Option<u8>, reason: &Reason| {
        let r = r.pages_out();
        let mut p = r.start;
        while p < r.end {
            let below_tagged = pages.get(&p).is_some_and(|(c, _, _)| c.is_some());
            if c.is_some() || below_tagged {
                pages.insert(p, (c, reason.clone(), below_tagged));
            }
            p += PAGE;
        }
    };
    for e in extra {
        paint(e.range, Some(e.compartment), &e.reason);
    }
    for (i, o) in objects.iter().enumerate() {
        let Some(c) = comp(i) else { continue };
        for r in data_pages(o) {
            paint(r, Some(c), &Reason::Data { object: i });
        }
    }
    let mut tls_entries = Vec::new();
    let mut untagged_tls = Vec::new();
    tls_pages(threads, &comp, &mut tls_entries, &mut untagged_tls);
    for e in &tls_entries {
        paint(e.range, e.compartment, &e.reason);
    }
    // TLS blocks of shared modules (the shim's own, and libc's outside strict
    // mode) stay on key 0 even inside a tagged loader heap: shared code
    // reaches them from every compartment.
    for t in threads {
        for &(obj, block) in &t.blocks {
            if comp(obj).is_none() && !block.is_empty() {
                let reason = Reason::TlsShared {
                    object: obj,
                    thread: t.thread,
                };
                let mut p = block.pages_out().start;
                while p < block.end {
                    if !governed.iter().any(|g| g.pages_out().contains(p)) {
                        paint(Range::new(p, p + PAGE), None, &reason);
                    }
                    p += PAGE;
                }
            }
        }
    }
    for u in &untagged_tls {
        if governed.iter().any(|g| g.pages_out().contains(u.page)) {
            continue;
        }
        let reason = Reason::TlsShared {
            object: u.object,
            thread: u.thread,
        };
        paint(Range::new(u.page, u.page + PAGE), None, &reason);
    }
    for cv in carveouts {
        let reason = Reason::Carveout {
            name: cv.name,
            toggle: cv.toggle,
        };
        for r in &cv.ranges {
            paint(*r, None, &reason);
        }
    }

    // Coalesce pages into ranges, split by mapping, and take each mapping's
    // protection (never widened).
    // /proc/self/maps is sorted by address: a binary search per page keeps
    // the plan linear in the number of objects (a linear scan otherwise).
    let sorted = maps.windows(2).all(|w| w[0].end <= w[1].start);
    let mapping_of = |page: usize| {
        if sorted {
            let i = maps.partition_point(|m| m.end <= page);
            maps.get(i).filter(|m| m.start <= page)
        } else {
            maps.iter().find(|m| m.start <= page && page < m.end)
        }
    };
    let mut entries: Vec<PlanEntry> = Vec::new();
    for (page, (c, reason, _)) in pages {
        let Some(m) = mapping_of(page) else {
            continue;
        };
        if let Some(last) = entries.last_mut() {
            if last.range.end == page
                && last.compartment == c
                && last.reason == reason
                && last.prot == m.prot
                && page != m.start
            {
                last.range.end += PAGE;
                continue;
            }
        }
        entries.push(PlanEntry {
            range: Range::new(page, page + PAGE),
            compartment: c,
            prot: m.prot,
            reason,
        });
    }
    Plan {
        entries,
        untagged_tls,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compartments::tests::obj;
    use crate::objects::Segment;
    use object::elf::{PF_R, PF_W, PF_X};

    const RW: i32 = libc::PROT_READ | libc::PROT_WRITE;
    const R: i32 = libc::PROT_READ;

    fn mapping(start: usize, end: usize, prot: i32) -> Mapping {
        Mapping {
            start,
            end,
            prot,
            shared: false,
            offset: 0,
            path: String::new(),
            pkey: None,
        }
    }

    /// An object at `base` with text, rodata, and a RW segment whose first
    /// page and a half are RELRO (a typical `-z relro -z now` layout).
    fn lib(name: &str, first: bool, base: usize) -> LoadedObject {
        let mut o = obj(name, first);
        o.base = base;
        o.segments = vec![
            Segment {
                range: Range::new(base, base + 0x1000),
                flags: PF_R,
            },
            Segment {
                range: Range::new(base + 0x1000, base + 0x3000),
                flags: PF_R | PF_X,
            },
            Segment {
                range: Range::new(base + 0x3000, base + 0x3800),
                flags: PF_R,
            },
            Segment {
                range: Range::new(base + 0x4df0, base + 0x8010),
                flags: PF_R | PF_W,
            },
        ];
        o.relro = Some(Range::new(base + 0x4df0, base + 0x6000));
        o
    }

    fn input<'a>(
        objects: &'a [LoadedObject],
        compartment_of: &'a [Option<u8>],
        threads: &'a [ThreadTls],
        carveouts: &'a [Carveout],
        maps: &'a [Mapping],
    ) -> PlanInput<'a> {
        PlanInput {
            objects,
            compartment_of,
            threads,
            extra: &[],
            carveouts,
            governed: &[],
            maps,
        }
    }

    fn maps_for(base: usize) -> Vec<Mapping> {
        vec![
            mapping(base, base + 0x1000, R),
            mapping(base + 0x1000, base + 0x3000, R | libc::PROT_EXEC),
            mapping(base + 0x3000, base + 0x4000, R),
            mapping(base + 0x4000, base + 0x6000, R), // RELRO, now read-only
            mapping(base + 0x6000, base + 0x8000, RW),
            mapping(base + 0x8000, base + 0x9000, RW), // .bss tail
        ]
    }

    #[test]
    fn data_minus_relro_text_and_rodata_stay_shared() {
        let objs = vec![lib("main", true, 0x10000)];
        let p = build(&input(&objs, &[Some(1)], &[], &[], &maps_for(0x10000)));
        let tagged: Vec<_> = p.tagged().map(|e| (e.range, e.prot)).collect();
        assert_eq!(
            tagged,
            vec![
                (Range::new(0x16000, 0x18000), RW),
                (Range::new(0x18000, 0x19000), RW)
            ]
        );
        assert!(p.lookup(0x11000).is_none(), "text is shared");
        assert!(p.lookup(0x14000).is_none(), "RELRO is shared");
        assert_eq!(p.lookup(0x18fff).unwrap().compartment, Some(1));
        assert_eq!(
            p.lookup(0x18fff).unwrap().reason,
            Reason::Data { object: 0 }
        );
    }

    #[test]
    fn protection_is_never_widened() {
        let objs = vec![lib("main", true, 0x10000)];
        let mut maps = maps_for(0x10000);
        maps[4].prot = R; // the program made a data page read-only
        let p = build(&input(&objs, &[Some(1)], &[], &[], &maps));
        assert_eq!(p.lookup(0x16000).unwrap().prot, R);
        assert_eq!(p.lookup(0x18000).unwrap().prot, RW);
    }

    #[test]
    fn shared_objects_get_no_entries() {
        let objs = vec![lib("main", true, 0x10000), lib("libc.so.6", false, 0x40000)];
        let mut maps = maps_for(0x10000);
        maps.extend(maps_for(0x40000));
        let p = build(&input(&objs, &[Some(1), None], &[], &[], &maps));
        assert!(p.entries.iter().all(|e| e.range.start < 0x40000));
    }

    #[test]
    fn carveouts_cut_pages_and_are_reported() {
        let objs = vec![lib("main", true, 0x10000)];
        let cv = Carveout {
            name: "libc_tuning",
            toggle: "IA2_SHARE_LIBC_TUNING",
            ranges: vec![Range::new(0x17000, 0x17008)],
        };
        let p = build(&input(&objs, &[Some(1)], &[], &[cv], &maps_for(0x10000)));
        let e = p.lookup(0x17004).unwrap();
        assert_eq!(e.compartment, None);
        assert_eq!(e.range, Range::new(0x17000, 0x18000));
        assert!(matches!(
            e.reason,
            Reason::Carveout {
                name: "libc_tuning",
                ..
            }
        ));
        assert_eq!(p.lookup(0x16000).unwrap().compartment, Some(1));
        assert_eq!(p.lookup(0x18000).unwrap().compartment, Some(1));
        // Entries never overlap.
        for w in p.entries.windows(2) {
            assert!(w[0].range.end <= w[1].range.start);
        }
    }

    #[test]
    fn tls_pages_shared_with_other_blocks_or_the_tcb_stay_shared() {
        // Variant II: blocks sit below the thread pointer at 0x9_0100.
        // main's block spans 3 pages below tp; lib2's block (other
        // compartment) shares main's lowest page.
        let tp = 0x9_0100;
        let objs = vec![obj("main", true), obj("lib2.so", false)];
        let main_block = Range::new(tp - 0x2100 - 0x100, tp);
        let lib2_block = Range::new(main_block.start - 0x1800, main_block.start);
        let threads = vec![ThreadTls {
            thread: 0,
            blocks: vec![(0, main_block), (1, lib2_block)],
            pads: vec![],
        }];
        let maps = vec![mapping(0x8_0000, 0xa_0000, RW)];
        let p = build(&input(&objs, &[Some(1), Some(2)], &threads, &[], &maps));
        let tagged: Vec<_> = p.tagged().map(|e| (e.range, e.compartment)).collect();
        // main's block is [0x8df00, 0x90100): pages 0x8e000 and 0x8f000 lie wholly
        // inside it; page 0x8d000 is shared with lib2's block; page 0x90000
        // holds the TCB. lib2's block [0x8c700, 0x8df00) has no whole page.
        assert_eq!(tagged, vec![(Range::new(0x8_e000, 0x9_0000), Some(1))]);
        let why: Vec<_> = p
            .untagged_tls
            .iter()
            .map(|u| (u.page, u.object, u.why))
            .collect();
        assert!(why.contains(&(0x8_d000, 0, "shared with another module's TLS block")));
        assert!(why.contains(&(
            0x9_0000,
            0,
            "shared with the TCB or memory outside TLS blocks"
        )));
        assert!(why.contains(&(0x8_d000, 1, "shared with another module's TLS block")));
        assert!(why.contains(&(
            0x8_c000,
            1,
            "shared with the TCB or memory outside TLS blocks"
        )));
        assert_eq!(why.len(), 4);
    }

    /// ia2run's layout step names pads and classifies objects as the shim does.
    #[test]
    fn ia2run_agrees_on_pads_and_object_classes() {
        use crate::objects::{classify, ObjectKind};
        use ia2run::tlslayout::{self as tl, Kind};
        assert_eq!(tl::PAD_PREFIX, TLS_PAD_PREFIX);
        for name in [
            "libc.so.6",
            "libm.so.6",
            "ld-linux-x86-64.so.2",
            "linux-vdso.so.1",
            "libia2shim.so",
            "libia2shim-tlspad-4092-4096-0.so",
            "libstdc++.so.6",
            "libgcc_s.so.1",
            "libdav1d.so.6",
            "libnss_files.so.2",
            "libfoo.so",
            "libpthread.so.0",
        ] {
            let (a, b) = (tl::classify(name, false), classify(name, false));
            let same = matches!(
                (a, b),
                (Kind::Loader, ObjectKind::Loader)
                    | (Kind::Vdso, ObjectKind::Vdso)
                    | (Kind::System, ObjectKind::System)
                    | (Kind::Shim, ObjectKind::Shim)
                    | (Kind::Application, ObjectKind::Application)
            );
            assert!(same, "{name}: ia2run {a:?}, shim {b:?}");
        }
    }

    #[test]
    fn pads_fill_a_compartments_page() {
        // tp page-aligned; main's 4-byte block at the top of the page below,
        // a pad below it to the page boundary; lib2's block on the next
        // page down with its own pad; the shim's block on a third page.
        let tp = 0x9_0000;
        let objs = vec![obj("main", true), obj("lib2.so", false), obj("shim", false)];
        let blocks = vec![
            (0, Range::new(tp - 4, tp)),
            (3, Range::new(tp - 0x1000, tp - 4)),
            (1, Range::new(tp - 0x1004, tp - 0x1000)),
            (4, Range::new(tp - 0x2000, tp - 0x1004)),
            (2, Range::new(tp - 0x2100, tp - 0x2000)),
        ];
        let t = ThreadTls::new(0, blocks, |i| i >= 3);
        assert_eq!(t.pads.len(), 2);
        let maps = vec![mapping(0x8_0000, 0xa_0000, RW)];
        let threads = [t];
        let p = build(&input(
            &objs,
            &[Some(1), Some(2), None],
            &threads,
            &[],
            &maps,
        ));
        let tagged: Vec<_> = p.tagged().map(|e| (e.range, e.compartment)).collect();
        assert_eq!(
            tagged,
            vec![
                (Range::new(0x8_e000, 0x8_f000), Some(2)),
                (Range::new(0x8_f000, 0x9_0000), Some(1))
            ]
        );
        let comp = |i: usize| [Some(1), Some(2), None].get(i).copied().flatten();
        let b = tls_bytes(&p, &threads[0], &comp);
        assert_eq!(
            (b.private, b.compartment_shared, b.shared_modules),
            (8, 0, 0x100)
        );
        assert_eq!(b.pads, 0x1ffc - 4);
        // Without the pads counted as filler, the pages are not covered.
        let bare = ThreadTls::new(0, threads[0].blocks.clone(), |_| false);
        let p = build(&input(
            &objs,
            &[Some(1), Some(2), None],
            &[bare],
            &[],
            &maps,
        ));
        assert_eq!(p.tagged().count(), 0);
    }

    #[test]
    fn pages_outside_mappings_are_dropped() {
        let objs = vec![lib("main", true, 0x10000)];
        let maps = vec![mapping(0x16000, 0x17000, RW)];
        let p = build(&input(&objs, &[Some(1)], &[], &[], &maps));
        assert_eq!(p.tagged().count(), 1);
        assert_eq!(p.entries[0].range, Range::new(0x16000, 0x17000));
    }

    #[test]
    fn strict_mode_loader_heap_tls_and_carveouts() {
        // A 4-page loader-heap mapping; the TCB at 0x83100; main's TLS block
        // [0x81f00, 0x83100); libc's (compartment 4, the libc compartment)
        // below it.
        let tp = 0x8_3100;
        let objs = vec![obj("main", true), obj("libc.so.6", false)];
        let threads = vec![ThreadTls {
            thread: 0,
            blocks: vec![
                (0, Range::new(0x8_1f00, tp)),
                (1, Range::new(0x8_1e00, 0x8_1f00)),
            ],
            pads: vec![],
        }];
        let heap = vec![ExtraRange {
            range: Range::new(0x8_0000, 0x8_4000),
            compartment: 4,
            reason: Reason::LoaderHeap,
        }];
        let tcb = Carveout {
            name: "tcb",
            toggle: "IA2_SHARE_TCB",
            ranges: vec![Range::new(0x8_3000, 0x8_4000)],
        };
        let governed = vec![Range::new(0x8_3000, 0x8_4000)];
        let maps = vec![mapping(0x8_0000, 0x8_4000, RW)];
        let mut inp = input(
            &objs,
            &[Some(1), Some(4)],
            &threads,
            std::slice::from_ref(&tcb),
            &maps,
        );
        inp.extra = &heap;
        inp.governed = &governed;
        let p = build(&inp);
        let got: Vec<_> = p
            .entries
            .iter()
            .map(|e| (e.range.start, e.compartment, e.reason.clone()))
            .collect();
        assert_eq!(
            got,
            vec![
                (0x8_0000, Some(4), Reason::LoaderHeap),
                // Shared by main's and libc's blocks: key 0 despite the heap's tag.
                (
                    0x8_1000,
                    None,
                    Reason::TlsShared {
                        object: 0,
                        thread: 0
                    }
                ),
                (
                    0x8_2000,
                    Some(1),
                    Reason::Tls {
                        object: 0,
                        thread: 0
                    }
                ),
                (
                    0x8_3000,
                    None,
                    Reason::Carveout {
                        name: "tcb",
                        toggle: "IA2_SHARE_TCB"
                    }
                ),
            ]
        );
        // With the tcb carveout off, the TCB page keeps the loader heap's key.
        inp.carveouts = &[];
        let p = build(&inp);
        assert_eq!(p.lookup(0x8_3100).unwrap().compartment, Some(4));
        assert_eq!(p.lookup(0x8_3100).unwrap().reason, Reason::LoaderHeap);
    }
}
