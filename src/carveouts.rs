//! One locator per named carveout (DESIGN.md, "Carveouts"). Each returns the
//! ranges to keep on key 0, or says why it found nothing.

use crate::config::Config;
use crate::objects::{LoadedObject, Range};
use crate::plan::Carveout;
use crate::tls;

/// What a locator found, for the plan and for the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    pub carveout: Carveout,
    /// How the ranges were found.
    pub how: String,
    pub enabled: bool,
}

/// The calling thread's `tcb`, `below_tcb` and `dtv` carveouts.
pub fn thread_carveouts(config: &Config) -> Vec<Located> {
    let tp = tls::thread_pointer();
    let dtv = tls::dtv_pointer();
    // SAFETY: the calling thread's own DTV pointer.
    let dtv_range = unsafe { tls::dtv_range(dtv) };
    let rseq = rseq_area(tp);
    vec![
        Located {
            carveout: Carveout {
                name: "rseq",
                toggle: "IA2_SHARE_RSEQ",
                ranges: rseq.map(|r| vec![r.pages_out()]).unwrap_or_default(),
            },
            how: match rseq {
                Some(r) => format!("%fs:0 + __rseq_offset = {r}: the kernel writes it on preemption and signal delivery"),
                None => "no rseq area registered (__rseq_size is 0)".to_string(),
            },
            enabled: config.share_rseq,
        },
        Located {
            carveout: Carveout {
                name: "tcb",
                toggle: "IA2_SHARE_TCB",
                ranges: vec![tls::tcb_page(tp)],
            },
            how: format!("thread pointer %fs:0 = {tp:#x}"),
            enabled: config.share_tcb,
        },
        Located {
            carveout: Carveout {
                name: "below_tcb",
                toggle: "IA2_SHARE_BELOW_TCB",
                ranges: vec![tls::below_tcb_shared(tp)].into_iter().filter(|r| !r.is_empty()).collect(),
            },
            how: if tls::layout() {
                format!("none: under the TLS layout (IA2_TLS_LAYOUT) the page below the TCB page of {tp:#x} holds the first TLS module's block alone, and the plan decides its key")
            } else {
                format!("page below the TCB page of {tp:#x}")
            },
            enabled: config.share_below_tcb,
        },
        Located {
            carveout: Carveout {
                name: "dtv",
                toggle: "IA2_SHARE_DTV",
                ranges: vec![dtv_range.pages_out()],
            },
            how: format!("DTV pointer %fs:8 = {dtv:#x}, extent {dtv_range} including dtv[-1]"),
            enabled: config.share_dtv,
        },
    ]
}

/// The calling thread's rseq area (`%fs:0 + __rseq_offset`, `__rseq_size`
/// bytes, in glibc's `struct pthread`), or `None` when glibc registered no
/// rseq area (glibc < 2.35, or `GLIBC_TUNABLES=glibc.pthread.rseq=0`).
pub fn rseq_area(tp: usize) -> Option<Range> {
    let off = resolve_global(c"__rseq_offset")?;
    let size = resolve_global(c"__rseq_size")?;
    // SAFETY: glibc's exported `ptrdiff_t __rseq_offset` and `unsigned int
    // __rseq_size`, constant after start-up (in libc's RELRO).
    let (off, size) = unsafe { (*(off as *const isize), *(size as *const u32)) };
    if size == 0 {
        return None;
    }
    let start = tp.wrapping_add_signed(off);
    Some(Range::new(start, start + (size as usize).max(32)))
}

/// The carveouts that are switched on, as plan input.
pub fn enabled(located: &[Located]) -> Vec<Carveout> {
    located
        .iter()
        .filter(|l| l.enabled)
        .map(|l| l.carveout.clone())
        .collect()
}

/// The thread carveouts' pages, switched on or not: the TLS-area pages
/// whose sharing only their toggle decides (see `PlanInput::governed`).
pub fn governed(located: &[Located]) -> Vec<Range> {
    located
        .iter()
        .filter(|l| matches!(l.carveout.name, "tcb" | "below_tcb" | "dtv" | "rseq"))
        .flat_map(|l| l.carveout.ranges.iter().copied())
        .collect()
}

/// Does carveout `l` locate the page holding `addr`? (fault reports)
pub fn covers(l: &Located, addr: usize) -> bool {
    l.carveout
        .ranges
        .iter()
        .any(|r| r.pages_out().contains(addr))
}

/// `copy_relocs`: the executable's copies of data defined by shared objects
/// (`R_X86_64_COPY`, e.g. libc's `stdout`, `stderr`, `environ`). After
/// copy relocation the copy is the only instance, and libc's own code reads
/// it, so a compartment that calls `printf` needs it on key 0.
pub fn copy_relocs(
    config: &Config,
    objects: &[LoadedObject],
    compartment_of: &[Option<u8>],
) -> Located {
    let mut ranges = Vec::new();
    let mut names = Vec::new();
    for (i, o) in objects.iter().enumerate() {
        if compartment_of.get(i).copied().flatten().is_none() {
            continue;
        }
        let Some(d) = o.dynamic_info() else { continue };
        for r in d.relocations(o.base) {
            if r.r_type != object::elf::R_X86_64_COPY {
                continue;
            }
            // SAFETY: the index comes from this object's own relocation.
            let sym = unsafe { d.symbol(r.sym) };
            let size = sym.map_or(8, |s| s.size.max(1) as usize);
            ranges.push(Range::new(r.slot, r.slot + size).pages_out());
            if let Some(s) = sym {
                names.push(s.name);
            }
        }
    }
    ranges.sort();
    ranges.dedup();
    let how = if names.is_empty() {
        "no R_X86_64_COPY relocations in compartment objects".to_string()
    } else {
        format!("R_X86_64_COPY relocations: {}", names.join(", "))
    };
    Located {
        carveout: Carveout {
            name: "copy_relocs",
            toggle: "IA2_SHARE_COPY_RELOCS",
            ranges,
        },
        how,
        enabled: config.share_copy_relocs,
    }
}

/// The run-time address of `name` as the dynamic linker resolves it for the
/// program (for an IFUNC, the selected implementation).
fn resolve_global(name: &core::ffi::CStr) -> Option<usize> {
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name.
    let a = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) } as usize;
    (a != 0).then_some(a)
}

/// The writable, non-RELRO pages of an object: where its mutable globals live.
fn mutable_data(o: &LoadedObject) -> Vec<Range> {
    crate::plan::data_pages(o)
}

/// RIP-relative memory operands `(instruction, target)` of the code at
/// `entry`, found by a bounded recursive-descent decode: direct branches
/// (and, with `follow_calls`, direct calls) into `within` are followed;
/// `ret`, indirect jumps and leaving `within` end a path. `within` must lie
/// in mapped, executable memory.
pub fn rip_relative_operands(
    entry: usize,
    within: Range,
    follow_calls: bool,
) -> Vec<(usize, usize)> {
    use iced_x86::{Decoder, DecoderOptions, FlowControl};
    let end = within.end;
    let mut todo = vec![entry];
    let mut decoded = std::collections::BTreeSet::new();
    let mut out = Vec::new();
    let mut budget = 20_000usize;
    while let Some(start) = todo.pop() {
        if !within.contains(start) {
            continue;
        }
        // SAFETY: callers pass `within` inside mapped executable memory.
        let bytes = unsafe { core::slice::from_raw_parts(start as *const u8, end - start) };
        let mut dec = Decoder::with_ip(64, bytes, start as u64, DecoderOptions::NONE);
        while dec.can_decode() && budget > 0 {
            budget -= 1;
            if !decoded.insert(dec.ip() as usize) {
                break; // joined a path already decoded
            }
            let insn = dec.decode();
            if insn.is_invalid() {
                break;
            }
            if insn.is_ip_rel_memory_operand() {
                out.push((insn.ip() as usize, insn.ip_rel_memory_address() as usize));
            }
            let target = insn.near_branch_target() as usize;
            let inside = within.contains(target);
            match insn.flow_control() {
                FlowControl::Call if follow_calls && inside => todo.push(target),
                FlowControl::ConditionalBranch if inside => todo.push(target),
                FlowControl::UnconditionalBranch => {
                    if inside {
                        todo.push(target);
                    }
                    break;
                }
                FlowControl::Return
                | FlowControl::IndirectBranch
                | FlowControl::Interrupt
                | FlowControl::Exception => break,
                _ => {}
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

fn object_named<'a>(objects: &'a [LoadedObject], prefix: &str) -> Option<&'a LoadedObject> {
    objects.iter().find(|o| o.basename.starts_with(prefix))
}

/// `tls_generation`: the ld.so page holding `_dl_tls_generation`, found by
/// decoding the start of `__tls_get_addr` for its RIP-relative load.
pub fn tls_generation(config: &Config, objects: &[LoadedObject]) -> Located {
    let mut ranges = Vec::new();
    let how = match (
        resolve_global(c"__tls_get_addr"),
        objects
            .iter()
            .find(|o| o.kind == crate::objects::ObjectKind::Loader),
    ) {
        (Some(f), Some(ld)) => {
            let data = mutable_data(ld);
            let hit = rip_relative_operands(f, Range::new(f, f + 64), false)
                .into_iter()
                .find(|(_, t)| data.iter().any(|r| r.contains(*t)));
            match hit {
                Some((ip, target)) => {
                    ranges.push(Range::new(target, target + 8).pages_out());
                    format!(
                        "__tls_get_addr+{:#x} loads {target:#x} = {}+{:#x}",
                        ip - f,
                        ld.basename,
                        target - ld.base
                    )
                }
                None => {
                    "no RIP-relative load into ld.so's data in the first 64 bytes of __tls_get_addr"
                        .to_string()
                }
            }
        }
        (None, _) => "__tls_get_addr not found".to_string(),
        (_, None) => "ld.so not in the census".to_string(),
    };
    Located {
        carveout: Carveout {
            name: "tls_generation",
            toggle: "IA2_SHARE_TLS_GENERATION",
            ranges,
        },
        how,
        enabled: config.share_tls_generation,
    }
}

/// `libc_single_threaded`: libc's page holding `__libc_single_threaded`
/// (exported since glibc 2.32), which `wait4`, stdio and other libc code
/// read on every call to pick their single-threaded fast paths. Found in
/// strict mode by the fault reports (a `fork` + `waitpid` from compartment 2).
pub fn libc_single_threaded(config: &Config, objects: &[LoadedObject]) -> Located {
    let libc = object_named(objects, "libc.so");
    let (ranges, how) = match (resolve_global(c"__libc_single_threaded"), libc) {
        (Some(a), Some(l)) if l.contains(a) => (
            vec![Range::new(a, a + 1).pages_out()],
            format!("dynsym __libc_single_threaded = libc+{:#x}", a - l.base),
        ),
        _ => (
            Vec::new(),
            "__libc_single_threaded not found in libc's dynsym".to_string(),
        ),
    };
    Located {
        carveout: Carveout {
            name: "libc_single_threaded",
            toggle: "IA2_SHARE_LIBC_SINGLE_THREADED",
            ranges,
        },
        how,
        enabled: config.share_libc_single_threaded,
    }
}

/// A carveout found by decoding libc functions for RIP-relative reads of
/// libc's writable, non-RELRO data: the functions are resolved as the
/// program would resolve them (an IFUNC gives the selected implementation)
/// and decoded from their entry, following direct jumps within libc's text.
struct DecodedLocator {
    name: &'static str,
    toggle: &'static str,
    functions: &'static [&'static core::ffi::CStr],
}

fn decoded_libc_data(d: &DecodedLocator, enabled: bool, objects: &[LoadedObject]) -> Located {
    let mut ranges = Vec::new();
    let mut found = Vec::new();
    let libc = object_named(objects, "libc.so");
    if let Some(libc) = libc {
        let data = mutable_data(libc);
        for name in d.functions {
            let Some(f) = resolve_global(name) else {
                continue;
            };
            let Some(text) = libc
                .segments
                .iter()
                .find(|s| s.executable() && s.range.contains(f))
                .map(|s| s.range)
            else {
                continue;
            };
            for (ip, t) in rip_relative_operands(f, text, false) {
                // Exported data (`__libc_single_threaded`, ...) is its own
                // carveout's business: keep these locators to hidden state.
                if data.iter().any(|r| r.contains(t)) && !is_exported_symbol(t) {
                    ranges.push(Range::new(t, t + 4).pages_out());
                    found.push(format!(
                        "{} at libc+{:#x} reads libc+{:#x}",
                        name.to_str().unwrap_or("?"),
                        ip - libc.base,
                        t - libc.base
                    ));
                }
            }
        }
    }
    ranges.sort();
    ranges.dedup();
    found.sort();
    found.dedup();
    let names: Vec<&str> = d
        .functions
        .iter()
        .map(|f| f.to_str().unwrap_or("?"))
        .collect();
    let how = match (libc, found.is_empty()) {
        (None, _) => "libc.so.6 not loaded".to_string(),
        (Some(_), true) => format!("no RIP-relative reads of libc data in {}", names.join(", ")),
        (Some(_), false) => format!("decoded {}: {}", names.join(", "), found.join("; ")),
    };
    Located {
        carveout: Carveout {
            name: d.name,
            toggle: d.toggle,
            ranges,
        },
        how,
        enabled,
    }
}

/// Is `addr` exactly the address of a symbol in some object's dynsym?
fn is_exported_symbol(addr: usize) -> bool {
    // SAFETY: zeroed Dl_info is valid for dladdr to fill.
    let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
    // SAFETY: dladdr only reads loader data.
    let found = unsafe { libc::dladdr(addr as *const libc::c_void, &mut info) } != 0;
    found && !info.dli_sname.is_null() && info.dli_saddr as usize == addr
}

/// `libc_tuning`: the x86 string-function thresholds
/// (`__x86_shared_non_temporal_threshold`, `__x86_rep_movsb_threshold`, …),
/// hidden symbols a distro libc's dynsym lacks, read by the selected
/// `memmove`, `memcpy` and `memset`.
pub fn libc_tuning(config: &Config, objects: &[LoadedObject]) -> Located {
    let d = DecodedLocator {
        name: "libc_tuning",
        toggle: "IA2_SHARE_LIBC_TUNING",
        functions: &[c"memmove", c"memcpy", c"memset"],
    };
    decoded_libc_data(&d, config.share_libc_tuning, objects)
}

/// `pthread_once`: `__fork_generation` (hidden), read by `pthread_once`'s
/// slow path. Found in strict mode by the fault report on the real dav1d,
/// whose `dav1d_open` initialises through `pthread_once`.
pub fn pthread_once(config: &Config, objects: &[LoadedObject]) -> Located {
    let d = DecodedLocator {
        name: "pthread_once",
        toggle: "IA2_SHARE_PTHREAD_ONCE",
        functions: &[c"pthread_once"],
    };
    decoded_libc_data(&d, config.share_pthread_once, objects)
}

/// `mutex_elision`: the lock-elision tunables (`__pthread_force_elision`,
/// hidden) that `pthread_mutex_lock` and friends read on every call. Found
/// in strict mode by the fault report on the real dav1d (`dlsym` from
/// `dav1d_open`, then libdav1d's own mutexes).
pub fn mutex_elision(config: &Config, objects: &[LoadedObject]) -> Located {
    let d = DecodedLocator {
        name: "mutex_elision",
        toggle: "IA2_SHARE_MUTEX_ELISION",
        functions: &[
            c"pthread_mutex_lock",
            c"pthread_mutex_trylock",
            c"pthread_mutex_unlock",
        ],
    };
    decoded_libc_data(&d, config.share_mutex_elision, objects)
}

/// The loader heap: what ld.so's start-up allocator put in anonymous
/// writable memory. glibc 2.36 does not name those mappings, so they are
/// found from what they hold: the TCB (`%fs:0`, with `struct pthread` after
/// it), the static TLS blocks below it, the DTV, and the `link_map`s and
/// names reachable from `_r_debug`. Per mapping, the pages from the lowest
/// to the highest of those extents are taken (bump allocation keeps them
/// together), minus any object's segments: the kernel merges adjacent
/// anonymous mappings, such as an object's `.bss` tail.
pub fn loader_heap(maps: &[crate::maps::Mapping], objects: &[LoadedObject]) -> Vec<Range> {
    /// glibc 2.36 x86-64: sizeof(struct pthread) and sizeof(struct link_map).
    const PTHREAD_SIZE: usize = 0x900;
    const LINK_MAP_SIZE: usize = 0x480;
    let tp = tls::thread_pointer();
    // SAFETY: the calling thread's own DTV pointer.
    let dtv = unsafe { tls::dtv_range(tls::dtv_pointer()) };
    let mut extents = vec![Range::new(tp, tp + PTHREAD_SIZE), dtv];
    for o in objects {
        if let Some(t) = o.tls.filter(|t| t.block != 0) {
            extents.push(Range::new(t.block, t.block + t.memsz));
        }
    }
    #[repr(C)]
    struct RDebug {
        version: i32,
        map: *const LinkMap,
    }
    #[repr(C)]
    struct LinkMap {
        addr: usize,
        name: *const libc::c_char,
        ld: usize,
        next: *const LinkMap,
        prev: *const LinkMap,
    }
    if let Some(r) = resolve_global(c"_r_debug") {
        // SAFETY: _r_debug is ld.so's debugger interface; its link_map list
        // is valid and stable while no dlopen runs (we are in the constructor).
        let mut lm = unsafe { (*(r as *const RDebug)).map };
        let mut n = 0;
        while !lm.is_null() && n < 4096 {
            extents.push(Range::new(lm as usize, lm as usize + LINK_MAP_SIZE));
            // SAFETY: as above.
            let l = unsafe { &*lm };
            extents.push(Range::new(l.name as usize, l.name as usize + 1));
            lm = l.next;
            n += 1;
        }
    }
    let segments: Vec<Range> = objects
        .iter()
        .flat_map(|o| o.segments.iter().map(|s| s.range.pages_out()))
        .collect();
    let mut out: Vec<Range> = Vec::new();
    for m in maps
        .iter()
        .filter(|m| m.path.is_empty() && m.prot & libc::PROT_WRITE != 0)
    {
        let mr = Range::new(m.start, m.end);
        let inside: Vec<Range> = extents
            .iter()
            .filter(|e| mr.contains(e.start))
            .map(|e| e.intersect(&mr))
            .collect();
        let (Some(lo), Some(hi)) = (
            inside.iter().map(|e| e.start).min(),
            inside.iter().map(|e| e.end).max(),
        ) else {
            continue;
        };
        let mut pieces = vec![Range::new(lo, hi).pages_out()];
        for s in &segments {
            pieces = crate::plan::subtract(&pieces, s);
        }
        out.extend(pieces.into_iter().filter(|p| !p.is_empty()));
    }
    out.sort();
    out.dedup();
    out
}

/// `loader_heap`: the broad policy, every loader-heap mapping on key 0.
pub fn loader_heap_carveout(config: &Config, heap: &[Range]) -> Located {
    Located {
        carveout: Carveout {
            name: "loader_heap",
            toggle: "IA2_SHARE_LOADER_HEAP",
            ranges: heap.to_vec(),
        },
        how: format!(
            "{} anonymous mappings holding the TCB, the DTV or link_maps",
            heap.len()
        ),
        enabled: config.share_loader_heap,
    }
}

/// A symbol's run-time range in `o`: dynsym through the loader, else the
/// file's `.symtab`, else a debug file found by build-id.
fn find_symbol(o: &LoadedObject, sym: &str) -> Option<(Range, &'static str)> {
    if let Some(r) = dynsym_range(o, sym) {
        return Some((r, "dynsym"));
    }
    let path = if o.name.is_empty() {
        return None;
    } else {
        o.name.as_str()
    };
    let data = std::fs::read(path).ok()?;
    if let Some(r) = symtab_range(&data, o.base, sym) {
        return Some((r, ".symtab"));
    }
    let debug = build_id(&data).map(|id| {
        let hex: String = id.iter().map(|b| format!("{b:02x}")).collect();
        format!("/usr/lib/debug/.build-id/{}/{}.debug", &hex[..2], &hex[2..])
    })?;
    let dbg = std::fs::read(debug).ok()?;
    symtab_range(&dbg, o.base, sym).map(|r| (r, "debug file"))
}

fn dynsym_range(o: &LoadedObject, sym: &str) -> Option<Range> {
    let d = o.dynamic_info()?;
    let count = dynsym_count(&d)?;
    for i in 1..count {
        // SAFETY: i < the symbol count derived from the hash table.
        let s = unsafe { d.symbol(i as u32) }?;
        if s.name == sym && s.shndx != 0 && s.value != 0 {
            let start = o.base + s.value as usize;
            return Some(Range::new(start, start + (s.size as usize).max(1)));
        }
    }
    None
}

/// Number of dynamic symbols, from DT_HASH or DT_GNU_HASH.
fn dynsym_count(d: &crate::objects::DynamicInfo) -> Option<usize> {
    if d.hash != 0 {
        // SAFETY: DT_HASH starts with nbucket, nchain; nchain = symbol count.
        return Some(unsafe { *((d.hash + 4) as *const u32) } as usize);
    }
    if d.gnu_hash == 0 {
        return None;
    }
    // SAFETY: the GNU hash table layout: nbuckets, symoffset, bloom_size,
    // bloom_shift, bloom[bloom_size] (u64), buckets[nbuckets], chains[].
    unsafe {
        let h = d.gnu_hash as *const u32;
        let (nbuckets, symoffset, bloom) = (*h as usize, *h.add(1) as usize, *h.add(2) as usize);
        let buckets = h.add(4 + bloom * 2);
        let chains = buckets.add(nbuckets);
        let mut last = 0usize;
        for b in 0..nbuckets {
            last = last.max(*buckets.add(b) as usize);
        }
        if last < symoffset {
            return Some(symoffset);
        }
        while *chains.add(last - symoffset) & 1 == 0 {
            last += 1;
        }
        Some(last + 1)
    }
}

fn symtab_range(file: &[u8], base: usize, sym: &str) -> Option<Range> {
    use object::{Object, ObjectSymbol};
    let f = object::File::parse(file).ok()?;
    let s = f
        .symbols()
        .find(|s| s.name() == Ok(sym) && s.address() != 0)?;
    let start = base + s.address() as usize;
    Some(Range::new(start, start + (s.size() as usize).max(1)))
}

fn build_id(file: &[u8]) -> Option<Vec<u8>> {
    use object::Object;
    object::File::parse(file)
        .ok()?
        .build_id()
        .ok()
        .flatten()
        .map(<[u8]>::to_vec)
}

/// User `IA2_SHARE` entries. An entry that names nothing is an error.
pub fn user_share(config: &Config, objects: &[LoadedObject]) -> Result<Option<Located>, String> {
    use crate::config::ShareEntry;
    if config.share.is_empty() {
        return Ok(None);
    }
    let loaded = || {
        objects
            .iter()
            .map(|o| o.basename.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut ranges = Vec::new();
    let mut how = Vec::new();
    for e in config.share.entries() {
        match e {
            ShareEntry::Range(a, len) => {
                ranges.push(Range::new(a, a + len).pages_out());
                how.push(format!("{a:#x}+{len:#x}"));
            }
            ShareEntry::ObjectSymbol(glob, sym) => {
                let matching: Vec<&LoadedObject> = objects
                    .iter()
                    .filter(|o| crate::compartments::glob_match(glob, &o.basename))
                    .collect();
                if matching.is_empty() {
                    return Err(format!("IA2_SHARE={glob}:{sym}: no loaded object matches {glob:?}; loaded objects: {}", loaded()));
                }
                let hit = matching
                    .iter()
                    .find_map(|o| find_symbol(o, sym).map(|h| (o, h)));
                let Some((o, (r, src))) = hit else {
                    return Err(format!(
                        "IA2_SHARE={glob}:{sym}: symbol {sym:?} not found in {glob} (searched dynsym, .symtab and /usr/lib/debug/.build-id)"
                    ));
                };
                ranges.push(r.pages_out());
                how.push(format!("{}:{sym} at {r} ({src})", o.basename));
            }
            ShareEntry::Symbol(sym) => {
                let hit = objects
                    .iter()
                    .find_map(|o| find_symbol(o, sym).map(|h| (o, h)));
                let Some((o, (r, src))) = hit else {
                    return Err(format!(
                        "IA2_SHARE={sym}: symbol {sym:?} not found in any loaded object (searched dynsym, .symtab and debug files); loaded objects: {}",
                        loaded()
                    ));
                };
                ranges.push(r.pages_out());
                how.push(format!("{}:{sym} at {r} ({src})", o.basename));
            }
        }
    }
    Ok(Some(Located {
        carveout: Carveout {
            name: "user",
            toggle: "IA2_SHARE",
            ranges,
        },
        how: how.join("; "),
        enabled: true,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locators_find_the_glibc_state_of_this_process() {
        let objects = crate::objects::census();
        let cfg = Config::default();
        let g = tls_generation(&cfg, &objects);
        assert_eq!(g.carveout.ranges.len(), 1, "{}", g.how);
        assert!(g.how.starts_with("__tls_get_addr+0x"), "{}", g.how);
        let ld = objects
            .iter()
            .find(|o| o.kind == crate::objects::ObjectKind::Loader)
            .unwrap();
        assert!(ld.contains(g.carveout.ranges[0].start), "{}", g.how);

        let once = pthread_once(&cfg, &objects);
        assert_eq!(once.carveout.ranges.len(), 1, "{}", once.how);

        let t = libc_tuning(&cfg, &objects);
        assert!(!t.carveout.ranges.is_empty(), "{}", t.how);
        assert!(t.how.contains("memmove at libc+0x"), "{}", t.how);
        let m = mutex_elision(&cfg, &objects);
        assert!(!m.carveout.ranges.is_empty(), "{}", m.how);
        // Exported state has its own carveout: not picked up by decoding.
        let single = libc_single_threaded(&cfg, &objects);
        assert!(
            !m.carveout.ranges.contains(&single.carveout.ranges[0])
                || t.carveout.ranges.contains(&single.carveout.ranges[0]),
            "{}",
            m.how
        );
        let libc = objects.iter().find(|o| o.basename == "libc.so.6").unwrap();
        for r in &t.carveout.ranges {
            assert!(
                libc.contains(r.start) && r.len() == crate::objects::PAGE,
                "{r}"
            );
            assert!(
                !libc.relro.unwrap().pages_out().contains(r.start),
                "not RELRO: {r}"
            );
        }

        let maps = crate::maps::read_self_maps().unwrap();
        let heap = loader_heap(&maps, &objects);
        // The link_maps of the initial objects are in the loader heap; no
        // object's own pages are.
        assert!(!heap.is_empty());
        for r in &heap {
            assert!(r.len() >= crate::objects::PAGE);
            assert!(objects.iter().all(|o| !o.contains(r.start)), "{r}");
        }
    }

    #[test]
    fn decoder_follows_branches_within_the_span() {
        // cmp rdi,0; je +7; mov rax,[rip+0x10]; ret; mov rcx,[rip+0x20]; ret
        let code: [u8; 22] = [
            0x48, 0x83, 0xff, 0x00, // cmp rdi,0
            0x74, 0x08, // je +8 -> offset 14
            0x48, 0x8b, 0x05, 0x10, 0x00, 0x00, 0x00, // mov rax,[rip+0x10]
            0xc3, // ret
            0x48, 0x8b, 0x0d, 0x20, 0x00, 0x00, 0x00, // mov rcx,[rip+0x20]
            0xc3, // ret
        ];
        let base = code.as_ptr() as usize;
        let ops = rip_relative_operands(base, Range::new(base, base + code.len()), false);
        assert_eq!(
            ops,
            vec![(base + 6, base + 13 + 0x10), (base + 14, base + 21 + 0x20)]
        );
    }
}
