//! One locator per named carveout (DESIGN.md, "Carveouts"). Each returns the
//! ranges to keep on key 0, or says why it found nothing.

use crate::config::Config;
use crate::objects::{LoadedObject, Range};
use crate::plan::Carveout;
use crate::tls;

pub mod cache;

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
    // Resolved once (at start-up, by the main thread's carveouts): a thread
    // started inside a constructor must not call dlsym, whose lock the
    // thread running the constructor holds while it joins this one.
    static RSEQ: std::sync::OnceLock<Option<(isize, u32)>> = std::sync::OnceLock::new();
    let (off, size) = (*RSEQ.get_or_init(|| {
        let off = resolve_global(c"__rseq_offset")?;
        let size = resolve_global(c"__rseq_size")?;
        // SAFETY: glibc's exported `ptrdiff_t __rseq_offset` and `unsigned
        // int __rseq_size`, constant after start-up (in libc's RELRO).
        Some(unsafe { (*(off as *const isize), *(size as *const u32)) })
    }))?;
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

/// Data that one compartment's object imports from another's through a
/// `GLOB_DAT` slot (a library's exported variable, a hook pointer, a globals
/// struct): the importer reads it by design, so its pages are shared. Each
/// import is one start-up warning (`IA2_SHARE_DATA_IMPORTS=0` keeps them
/// tagged, for experiments). Functions are not data: calls are gated.
pub fn data_imports(
    config: &Config,
    objects: &[LoadedObject],
    compartment_of: &[Option<u8>],
    copies: &Located,
) -> Located {
    let mut ranges = Vec::new();
    let mut names = Vec::new();
    let comp = |i: usize| compartment_of.get(i).copied().flatten();
    let owner_of = |addr: usize| objects.iter().position(|o| o.contains(addr));
    for (i, o) in objects.iter().enumerate() {
        let Some(own) = comp(i) else { continue };
        if !matches!(
            o.kind,
            crate::objects::ObjectKind::Main | crate::objects::ObjectKind::Application
        ) {
            continue;
        }
        let Some(d) = o.dynamic_info() else { continue };
        for r in d.relocations(o.base) {
            if r.r_type != object::elf::R_X86_64_GLOB_DAT || r.sym == 0 || !o.contains(r.slot) {
                continue;
            }
            // SAFETY: the index comes from this object's own relocation.
            let Some(sym) = (unsafe { d.symbol(r.sym) }) else {
                continue;
            };
            if !matches!(sym.st_type, object::elf::STT_OBJECT | object::elf::STT_TLS)
                && sym.st_type != object::elf::STT_NOTYPE
            {
                continue;
            }
            // SAFETY: an aligned GOT word of this loaded object, relocated.
            let value = unsafe { core::ptr::read_volatile(r.slot as *const usize) };
            let Some(k) = (value != 0).then(|| owner_of(value)).flatten() else {
                continue;
            };
            let owner = &objects[k];
            // System objects' data (libc's `stdin` in strict mode) is the
            // libc_data_imports carveout's decision, off by default.
            if !matches!(
                owner.kind,
                crate::objects::ObjectKind::Main | crate::objects::ObjectKind::Application
            ) {
                continue;
            }
            let theirs = comp(k);
            let executable = owner
                .segments
                .iter()
                .any(|s| s.executable() && s.range.contains(value));
            // The executable's copies of libraries' data (`stdout`) are
            // the copy_relocs carveout's, whether it is on or off.
            let copied = copies.carveout.ranges.iter().any(|r| r.contains(value));
            if k == i || theirs.is_none() || theirs == Some(own) || executable || copied {
                continue;
            }
            let size = (sym.size as usize).max(1);
            ranges.push(Range::new(value, value + size).pages_out());
            let line = format!(
                "{} (compartment {own}) imports {} from {} (compartment {})",
                o.basename,
                sym.name,
                owner.basename,
                theirs.unwrap_or(0)
            );
            if config.share_data_imports {
                log::warn!("sharing a cross-compartment data import: {line} (IA2_SHARE_DATA_IMPORTS=0 keeps it tagged)");
            }
            names.push(line);
        }
    }
    ranges.sort();
    ranges.dedup();
    let how = if names.is_empty() {
        "no cross-compartment data imports".to_string()
    } else {
        names.join("; ")
    };
    Located {
        carveout: Carveout {
            name: "data_imports",
            toggle: "IA2_SHARE_DATA_IMPORTS",
            ranges,
        },
        how,
        enabled: config.share_data_imports,
    }
}

/// The run-time address of `name` as the dynamic linker resolves it for the
/// program (for an IFUNC, the selected implementation).
fn resolve_global(name: &core::ffi::CStr) -> Option<usize> {
    crate::real::global_symbol(name)
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
            let span = Range::new(f, f + 64);
            let dir = config.cache_dir();
            let hit = cache::operands(dir.as_deref(), ld, f, span, false, || {
                rip_relative_operands(f, span, false)
            })
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

/// `libgcc` (strict mode, where libgcc_s joins the libc compartment):
/// libgcc_s's writable data. After a personality routine returns
/// `_URC_INSTALL_CONTEXT`, the unwinder reads its own data
/// (`uw_install_context`: `dwarf_reg_size_table`) with the landing pad's
/// rights; shared, a pad needs no libc key (`src/cxx.rs`), which matters
/// when the libc compartment is an application's.
pub fn libgcc(config: &Config, objects: &[LoadedObject]) -> Located {
    let (ranges, how) = match object_named(objects, "libgcc_s.so") {
        Some(o) => (
            crate::plan::data_pages(o),
            "libgcc_s's writable data: the unwinder reads it to enter a landing pad".to_string(),
        ),
        None => (Vec::new(), "libgcc_s is not loaded".to_string()),
    };
    Located {
        carveout: Carveout {
            name: "libgcc",
            toggle: "IA2_SHARE_LIBGCC",
            ranges,
        },
        how,
        enabled: config.share_libgcc,
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
    enabled: bool,
}

/// The decoded locators `ds`, in order. The reads of all of them are
/// checked against libc's exported symbols in one pass over its dynsym
/// (about 3,000 symbols: a pass per locator cost strict start-up 6 µs).
fn decoded_libc_data(
    ds: &[DecodedLocator],
    config: &Config,
    objects: &[LoadedObject],
) -> Vec<Located> {
    let libc = object_named(objects, "libc.so");
    // Per locator: (function, instruction, target) of each read of libc's
    // writable data.
    let mut reads: Vec<Vec<(&core::ffi::CStr, usize, usize)>> = vec![Vec::new(); ds.len()];
    let mut exported = Vec::new();
    if let Some(libc) = libc {
        let data = mutable_data(libc);
        let dir = config.cache_dir();
        for (d, reads) in ds.iter().zip(reads.iter_mut()) {
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
                let operands = cache::operands(dir.as_deref(), libc, f, text, false, || {
                    rip_relative_operands(f, text, false)
                });
                reads.extend(
                    operands
                        .into_iter()
                        .filter(|(_, t)| data.iter().any(|r| r.contains(*t)))
                        .map(|(ip, t)| (*name, ip, t)),
                );
            }
        }
        // Exported data (`__libc_single_threaded`, ...) is its own
        // carveout's business: keep these locators to hidden state.
        let targets: Vec<usize> = reads.iter().flatten().map(|&(_, _, t)| t).collect();
        exported = exported_among(libc, &targets);
    }
    ds.iter()
        .zip(reads)
        .map(|(d, reads)| {
            let mut ranges = Vec::new();
            let mut found = Vec::new();
            if let Some(libc) = libc {
                for (name, ip, t) in reads {
                    if exported.binary_search(&t).is_ok() {
                        continue;
                    }
                    ranges.push(Range::new(t, t + 4).pages_out());
                    found.push(format!(
                        "{} at libc+{:#x} reads libc+{:#x}",
                        name.to_str().unwrap_or("?"),
                        ip - libc.base,
                        t - libc.base
                    ));
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
                (Some(_), true) => {
                    format!("no RIP-relative reads of libc data in {}", names.join(", "))
                }
                (Some(_), false) => format!("decoded {}: {}", names.join(", "), found.join("; ")),
            };
            Located {
                carveout: Carveout {
                    name: d.name,
                    toggle: d.toggle,
                    ranges,
                },
                how,
                enabled: d.enabled,
            }
        })
        .collect()
}

/// The sorted addresses among `candidates` at which one of `o`'s defined,
/// non-TLS dynamic symbols starts: exactly those for which `dladdr` gives
/// a symbol starting there (one pass over dynsym instead of one `dladdr`,
/// itself a pass over dynsym, per address).
fn exported_among(o: &LoadedObject, candidates: &[usize]) -> Vec<usize> {
    use object::elf::{Sym64, STT_TLS};
    use object::LittleEndian as LE;
    let mut sorted = candidates.to_vec();
    sorted.sort_unstable();
    sorted.dedup();
    let mut out = Vec::new();
    if sorted.is_empty() {
        return out;
    }
    let (lo, hi) = (sorted[0], sorted[sorted.len() - 1]);
    if let Some(d) = o.dynamic_info().filter(|d| d.symtab != 0) {
        for i in 1..d.symbol_count().unwrap_or(0) {
            // SAFETY: i < the symbol count derived from the hash table, and
            // DT_SYMTAB is the object's mapped dynamic symbol table. Names
            // are not read: only where each symbol is.
            let s = unsafe { &*(d.symtab as *const Sym64<LE>).add(i) };
            let (value, shndx) = (s.st_value.get(LE), s.st_shndx.get(LE));
            let a = o.base.wrapping_add(value as usize);
            if (lo..=hi).contains(&a)
                && shndx != 0
                && value != 0
                && s.st_info & 0xf != STT_TLS
                && sorted.binary_search(&a).is_ok()
            {
                out.push(a);
            }
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// `libc_tuning`: the x86 string-function thresholds
/// (`__x86_shared_non_temporal_threshold`, `__x86_rep_movsb_threshold`, …),
/// hidden symbols a distro libc's dynsym lacks, read by the selected
/// `memmove`, `memcpy` and `memset`.
fn libc_tuning_locator(config: &Config) -> DecodedLocator {
    DecodedLocator {
        name: "libc_tuning",
        toggle: "IA2_SHARE_LIBC_TUNING",
        functions: &[c"memmove", c"memcpy", c"memset"],
        enabled: config.share_libc_tuning,
    }
}

/// `pthread_once`: `__fork_generation` (hidden), read by `pthread_once`'s
/// slow path. Found in strict mode by the fault report on the real dav1d,
/// whose `dav1d_open` initialises through `pthread_once`.
fn pthread_once_locator(config: &Config) -> DecodedLocator {
    DecodedLocator {
        name: "pthread_once",
        toggle: "IA2_SHARE_PTHREAD_ONCE",
        functions: &[c"pthread_once"],
        enabled: config.share_pthread_once,
    }
}

/// `mutex_elision`: the lock-elision tunables (`__pthread_force_elision`,
/// hidden) that `pthread_mutex_lock` and friends read on every call. Found
/// in strict mode by the fault report on the real dav1d (`dlsym` from
/// `dav1d_open`, then libdav1d's own mutexes).
fn mutex_elision_locator(config: &Config) -> DecodedLocator {
    DecodedLocator {
        name: "mutex_elision",
        toggle: "IA2_SHARE_MUTEX_ELISION",
        functions: &[
            c"pthread_mutex_lock",
            c"pthread_mutex_trylock",
            c"pthread_mutex_unlock",
        ],
        enabled: config.share_mutex_elision,
    }
}

/// The decoded carveouts of libc's hidden state, in this order:
/// `libc_tuning`, `pthread_once`, `mutex_elision`.
pub fn libc_decoded(config: &Config, objects: &[LoadedObject]) -> Vec<Located> {
    decoded_libc_data(
        &[
            libc_tuning_locator(config),
            pthread_once_locator(config),
            mutex_elision_locator(config),
        ],
        config,
        objects,
    )
}

#[cfg(test)]
fn libc_tuning(config: &Config, objects: &[LoadedObject]) -> Located {
    let mut v = decoded_libc_data(&[libc_tuning_locator(config)], config, objects);
    v.remove(0)
}

#[cfg(test)]
fn pthread_once(config: &Config, objects: &[LoadedObject]) -> Located {
    let mut v = decoded_libc_data(&[pthread_once_locator(config)], config, objects);
    v.remove(0)
}

#[cfg(test)]
fn mutex_elision(config: &Config, objects: &[LoadedObject]) -> Located {
    let mut v = decoded_libc_data(&[mutex_elision_locator(config)], config, objects);
    v.remove(0)
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
pub fn find_symbol(o: &LoadedObject, sym: &str) -> Option<(Range, &'static str)> {
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

/// A dynamic symbol's run-time range in `o` (no file is read).
pub fn dynsym_range(o: &LoadedObject, sym: &str) -> Option<Range> {
    let d = o.dynamic_info()?;
    let count = d.symbol_count()?;
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
/// The first page an object maps: the base of `object+0xOFFSET` terms (the
/// same as `dladdr`'s `dli_fbase`, for PIE and fixed-address executables alike).
pub fn map_start(o: &LoadedObject) -> usize {
    o.segments
        .iter()
        .map(|s| s.range.pages_out().start)
        .min()
        .unwrap_or(o.base)
}

/// The executable's file name, so that `IA2_SHARE=prog:sym` works as well
/// as `main:sym`.
fn exe_basename() -> Option<String> {
    let p = std::fs::read_link("/proc/self/exe").ok()?;
    Some(p.file_name()?.to_str()?.to_string())
}

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
    let exe = exe_basename();
    let matches = |glob: &str, o: &LoadedObject| {
        crate::compartments::glob_match(glob, &o.basename)
            || (o.kind == crate::objects::ObjectKind::Main
                && exe
                    .as_deref()
                    .is_some_and(|e| crate::compartments::glob_match(glob, e)))
    };
    let mut ranges = Vec::new();
    let mut how = Vec::new();
    for e in config.share.entries() {
        match e {
            ShareEntry::ObjectOffset(glob, off, len) => {
                let Some(o) = objects.iter().find(|o| matches(glob, o)) else {
                    return Err(format!("IA2_SHARE={glob}+{off:#x}+{len:#x}: no loaded object matches {glob:?}; loaded objects: {}", loaded()));
                };
                let base = map_start(o);
                let r = Range::new(base + off, base + off + len);
                if !o.contains(r.start) || !o.contains(r.end - 1) {
                    return Err(format!(
                        "IA2_SHARE={glob}+{off:#x}+{len:#x}: outside {} (mapped {:#x} bytes from its first page)",
                        o.basename,
                        o.segments.iter().map(|s| s.range.pages_out().end).max().unwrap_or(base) - base
                    ));
                }
                ranges.push(r.pages_out());
                how.push(format!("{}+{off:#x}+{len:#x} at {r}", o.basename));
            }
            ShareEntry::Range(a, len) => {
                ranges.push(Range::new(a, a + len).pages_out());
                how.push(format!("{a:#x}+{len:#x}"));
            }
            ShareEntry::ObjectSymbol(glob, sym) => {
                let matching: Vec<&LoadedObject> =
                    objects.iter().filter(|o| matches(glob, o)).collect();
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
        let cfg = Config {
            cache_dir: None, // decode, whatever a cache holds
            ..Config::default()
        };
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
        // Together (one dynsym pass for the three), the same as apart.
        let all = libc_decoded(&cfg, &objects);
        let names: Vec<&str> = all.iter().map(|l| l.carveout.name).collect();
        assert_eq!(names, ["libc_tuning", "pthread_once", "mutex_elision"]);
        for (together, apart) in all.iter().zip([&t, &once, &m]) {
            assert_eq!(together.carveout.ranges, apart.carveout.ranges);
            assert_eq!(together.how, apart.how);
        }
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
    fn build_ids_read_from_memory_match_the_files() {
        let objects = crate::objects::census();
        let mut n = 0;
        for o in objects.iter().filter(|o| o.name.starts_with('/')) {
            let file = std::fs::read(&o.name).unwrap();
            assert_eq!(
                o.build_id().map(<[u8]>::to_vec),
                build_id(&file),
                "{}",
                o.name
            );
            n += usize::from(o.build_id().is_some());
        }
        assert!(n >= 2, "libc and ld.so carry build-ids");
    }

    #[test]
    fn cached_locators_equal_decoded_ones() {
        let objects = crate::objects::census();
        let dir = std::env::temp_dir().join(format!("ia2-cache-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let dir_str: &'static str = Box::leak(dir.to_str().unwrap().to_string().into_boxed_str());
        let decode = Config {
            cache_dir: None,
            ..Config::default()
        };
        let cached = Config {
            cache_dir: Some(dir_str),
            ..Config::default()
        };
        type Locator = fn(&Config, &[LoadedObject]) -> Located;
        let all: [Locator; 4] = [tls_generation, libc_tuning, pthread_once, mutex_elision];
        let fresh: Vec<Located> = all.iter().map(|l| l(&decode, &objects)).collect();
        // First run writes the cache, the second reads it (a new process
        // would read the file: drop what this one loaded).
        let cold: Vec<Located> = all.iter().map(|l| l(&cached, &objects)).collect();
        cache::forget();
        let warm: Vec<Located> = all.iter().map(|l| l(&cached, &objects)).collect();
        assert_eq!(fresh, cold);
        assert_eq!(fresh, warm);
        let files: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(files.len(), 2, "one file each for libc and ld.so");
        // A damaged cache is decoded again, not believed.
        for f in &files {
            let p = f.as_ref().unwrap().path();
            let text = std::fs::read_to_string(&p).unwrap();
            let bad = text.replace(',', ";");
            std::fs::write(&p, bad).unwrap();
        }
        cache::forget();
        let again: Vec<Located> = all.iter().map(|l| l(&cached, &objects)).collect();
        assert_eq!(fresh, again);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn exported_addresses_are_what_dladdr_names_exactly() {
        let objects = crate::objects::census();
        let libc = object_named(&objects, "libc.so").unwrap();
        // Every word of libc's writable data, as the locators ask.
        let words: Vec<usize> = mutable_data(libc)
            .iter()
            .flat_map(|r| (r.start..r.end).step_by(4))
            .collect();
        let exported = exported_among(libc, &words);
        let dladdr_exact = |addr: usize| {
            // SAFETY: zeroed Dl_info is valid for dladdr to fill.
            let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
            // SAFETY: dladdr only reads loader data.
            let found = unsafe { libc::dladdr(addr as *const libc::c_void, &mut info) } != 0;
            found && !info.dli_sname.is_null() && info.dli_saddr as usize == addr
        };
        let mut n = 0;
        for &a in &words {
            assert_eq!(
                exported.binary_search(&a).is_ok(),
                dladdr_exact(a),
                "libc+{:#x}",
                a - libc.base
            );
            n += usize::from(dladdr_exact(a));
        }
        assert!(n > 10, "only {n} exported data symbols in libc");
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
