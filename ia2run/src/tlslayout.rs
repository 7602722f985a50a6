//! The TLS layout step: before a command starts, arrange its preload list so
//! that the loader gives every compartment module's static TLS block pages
//! of its own (README, "TLS layout").
//!
//! x86-64 glibc (TLS variant II) lays static TLS blocks out below the thread
//! pointer in module order (the executable, the preloads, then the other
//! initially loaded objects) with `_dl_determine_tlsoffset`, which also puts
//! later small blocks into alignment gaps left by earlier ones. This step
//! reads every initially loaded object's `PT_TLS` from its file, replays that
//! algorithm, and inserts *pad objects* (shared objects whose only content is
//! a `PT_TLS` of a chosen size and alignment) so that:
//! - a pad with 4096-byte alignment makes the loader align the thread
//!   pointer to a page, so no block shares the TCB's page;
//! - before and after each compartment's run of blocks, pads fill the open
//!   alignment gap and the rest of the page exactly, so no other block can
//!   land on the compartment's pages.
//!
//! Every initially loaded object is then preloaded in its original order,
//! with the pads between them: the link-map order, and so the global lookup
//! scope, stay as they were (pads define no symbols); a second `--list` run
//! checks that order.

use crate::Job;
use object::elf;
use object::read::elf::{FileHeader, ProgramHeader};
use std::ffi::{OsStr, OsString};
use std::fs;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// Page size and the alignment that page-aligns the thread pointer.
const PAGE: u64 = 4096;
/// glibc's `TCB_ALIGNMENT` on x86-64: the initial `max_align`.
const TCB_ALIGNMENT: u64 = 64;
/// Pad objects are named so that the shim classifies them as its own
/// (`libia2shim*`: never a compartment, no symbols to gate).
pub const PAD_PREFIX: &str = "libia2shim-tlspad-";

/// A `PT_TLS` as the loader sees it (`l_tls_blocksize`, `l_tls_align`,
/// `l_tls_firstbyte_offset`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsSeg {
    pub size: u64,
    pub align: u64,
    /// `p_vaddr & (p_align - 1)`.
    pub firstbyte: u64,
}

impl TlsSeg {
    pub fn pad(size: u64, align: u64) -> TlsSeg {
        TlsSeg {
            size,
            align,
            firstbyte: 0,
        }
    }
}

/// `_dl_determine_tlsoffset` (elf/dl-tls.c, the `TLS_TCB_AT_TP` branch)
/// replayed one module at a time. Offsets count down from the thread
/// pointer: a block at offset `off` occupies `[tp - off, tp - off + size)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Loader {
    pub offset: u64,
    pub freetop: u64,
    pub freebottom: u64,
    pub max_align: u64,
}

fn roundup(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

impl Loader {
    pub fn new() -> Loader {
        Loader {
            max_align: TCB_ALIGNMENT,
            ..Loader::default()
        }
    }

    /// Place the next module; returns its offset. `align` must be non-zero
    /// (the loader itself would divide by zero).
    pub fn place(&mut self, m: TlsSeg) -> u64 {
        let firstbyte = m.firstbyte.wrapping_neg() & (m.align - 1);
        self.max_align = self.max_align.max(m.align);
        if self.freebottom - self.freetop >= m.size {
            let off = roundup(self.freetop + m.size - firstbyte, m.align) + firstbyte;
            if off <= self.freebottom {
                self.freetop = off;
                return off;
            }
        }
        let off = roundup(self.offset + m.size - firstbyte, m.align) + firstbyte;
        if off > self.offset + m.size + (self.freebottom - self.freetop) {
            self.freetop = self.offset;
            self.freebottom = off - m.size;
        }
        self.offset = off;
        off
    }

    /// The pads that close the open gap and complete the current page, so
    /// that the next block starts on a fresh page and nothing later can be
    /// put below `offset`'s page. Placing them leaves the state closed.
    pub fn closing_pads(&self) -> Vec<TlsSeg> {
        let mut pads = Vec::new();
        let mut l = *self;
        if l.freebottom > l.freetop {
            // Alignment 1: it lands exactly at [freetop, freebottom).
            let p = TlsSeg::pad(l.freebottom - l.freetop, 1);
            l.place(p);
            pads.push(p);
        }
        let rest = roundup(l.offset, PAGE) - l.offset;
        if rest > 0 {
            // Page alignment: it ends exactly on the page boundary, opens
            // no gap, and raises the thread pointer's alignment to a page.
            pads.push(TlsSeg::pad(rest, PAGE));
        }
        pads
    }

    fn closed(&self) -> bool {
        self.freebottom == self.freetop && self.offset % PAGE == 0
    }
}

/// One entry of the arranged module order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Item {
    /// Module `i` of the input list.
    Module(usize),
    Pad(TlsSeg),
}

/// The arranged order and what it gives.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Layout {
    pub items: Vec<Item>,
    /// Offset of each input module's block (None: no `PT_TLS`).
    pub offsets: Vec<Option<u64>>,
    /// Bytes of pads, that is extra static TLS per thread.
    pub pad_bytes: u64,
    pub max_align: u64,
}

/// Arrange `modules` (load order, the executable first; `owner` None =
/// shared): a module that belongs to a compartment never shares a page with
/// a block of another owner or with the TCB.
pub fn arrange(modules: &[(Option<TlsSeg>, Option<u8>)]) -> Layout {
    let mut l = Loader::new();
    let mut items = Vec::new();
    let mut offsets = vec![None; modules.len()];
    let mut pad_bytes = 0;
    // The owner of the blocks on the current (open) page; the TCB side
    // counts as shared.
    let mut page_owner: Option<u8> = None;
    let close = |l: &mut Loader, items: &mut Vec<Item>, pad_bytes: &mut u64| {
        for p in l.closing_pads() {
            l.place(p);
            items.push(Item::Pad(p));
            *pad_bytes += p.size;
        }
    };
    for (i, &(seg, owner)) in modules.iter().enumerate() {
        let Some(seg) = seg else {
            items.push(Item::Module(i));
            continue;
        };
        if owner != page_owner && (owner.is_some() || page_owner.is_some()) {
            close(&mut l, &mut items, &mut pad_bytes);
        }
        page_owner = owner;
        items.push(Item::Module(i));
        offsets[i] = Some(l.place(seg));
    }
    if page_owner.is_some() {
        close(&mut l, &mut items, &mut pad_bytes);
    }
    let any_private = modules.iter().any(|(s, o)| s.is_some() && o.is_some());
    if any_private && l.max_align < PAGE {
        // Every private run ended on a page boundary by itself: one whole
        // page-aligned pad still has to align the thread pointer.
        debug_assert!(l.closed());
        let p = TlsSeg::pad(PAGE, PAGE);
        l.place(p);
        items.push(Item::Pad(p));
        pad_bytes += PAGE;
    }
    Layout {
        items,
        offsets,
        pad_bytes,
        max_align: l.max_align,
    }
}

/// Replays the loader over an arranged order: every module's offset (pads
/// included, in order).
pub fn replay(modules: &[(Option<TlsSeg>, Option<u8>)], items: &[Item]) -> Vec<(Item, u64)> {
    let mut l = Loader::new();
    let mut out = Vec::new();
    for &it in items {
        let seg = match it {
            Item::Module(i) => modules[i].0,
            Item::Pad(p) => Some(p),
        };
        if let Some(s) = seg {
            out.push((it, l.place(s)));
        }
    }
    out
}

/// The `PT_TLS` and `PT_INTERP` of an ELF file on disk.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileInfo {
    pub tls: Option<TlsSeg>,
    pub interp: Option<PathBuf>,
}

fn read_prefix(path: &Path, len: u64) -> Result<Vec<u8>, String> {
    use std::io::Read;
    let mut v = Vec::new();
    fs::File::open(path)
        .and_then(|f| f.take(len).read_to_end(&mut v))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(v)
}

/// Reads the program headers of an x86-64 ELF file.
pub fn read_file_info(path: &Path) -> Result<FileInfo, String> {
    // The headers, program headers and interpreter path lie at the start of
    // the file; libraries are megabytes, so read only what is needed.
    let data = read_prefix(path, 64 * 1024)?;
    let data = match elf::FileHeader64::<object::Endianness>::parse(&*data) {
        Ok(h)
            if h.e_phoff.get(object::Endianness::Little) as usize
                + h.e_phnum.get(object::Endianness::Little) as usize * 56
                > data.len() =>
        {
            fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?
        }
        _ => data,
    };
    let hdr = elf::FileHeader64::<object::Endianness>::parse(&*data)
        .map_err(|e| format!("{}: not a 64-bit ELF file ({e})", path.display()))?;
    let endian = hdr
        .endian()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let phdrs = hdr
        .program_headers(endian, &*data)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let mut info = FileInfo::default();
    for ph in phdrs {
        match ph.p_type(endian) {
            elf::PT_TLS if ph.p_memsz(endian) > 0 => {
                let align = ph.p_align(endian);
                if align == 0 || !align.is_power_of_two() {
                    return Err(format!(
                        "{}: PT_TLS alignment {align} is not a power of two",
                        path.display()
                    ));
                }
                info.tls = Some(TlsSeg {
                    size: ph.p_memsz(endian),
                    align,
                    firstbyte: ph.p_vaddr(endian) & (align - 1),
                });
            }
            elf::PT_INTERP => {
                if let Ok(Some(b)) = ph.interpreter(endian, &*data) {
                    info.interp = Some(PathBuf::from(OsStr::from_bytes(b)));
                }
            }
            _ => {}
        }
    }
    Ok(info)
}

/// Writes a shared object whose only content is a `PT_TLS` (`.tbss`) of
/// `seg`'s size and alignment: one `PT_LOAD` holding the headers and a
/// minimal dynamic section (the loader requires both), no symbols.
pub fn pad_object(seg: TlsSeg) -> Vec<u8> {
    use object::write::elf::{FileHeader, ProgramHeader, Writer};
    let mut buf = Vec::new();
    let mut w = Writer::new(object::Endianness::Little, true, &mut buf);
    w.reserve_file_header();
    w.reserve_program_headers(4);
    w.reserve_null_dynamic_symbol_index();
    let dynsym_off = w.reserve_dynsym();
    let dynstr_off = w.reserve_dynstr();
    // DT_SYMTAB, DT_STRTAB, DT_STRSZ, DT_SYMENT, DT_NULL.
    let dynamic_off = w.reserve_dynamic(5);
    let dynamic_len = w.reserved_len() - dynamic_off;
    let end = w.reserved_len() as u64;
    w.write_file_header(&FileHeader {
        os_abi: elf::ELFOSABI_NONE,
        abi_version: 0,
        e_type: elf::ET_DYN,
        e_machine: elf::EM_X86_64,
        e_entry: 0,
        e_flags: 0,
    })
    .expect("a valid header");
    w.write_align_program_headers();
    // The file is mapped at its own offsets (vaddr == offset).
    w.write_program_header(&ProgramHeader {
        p_type: elf::PT_LOAD,
        p_flags: elf::PF_R,
        p_offset: 0,
        p_vaddr: 0,
        p_paddr: 0,
        p_filesz: end,
        p_memsz: end,
        p_align: PAGE,
    });
    w.write_program_header(&ProgramHeader {
        p_type: elf::PT_DYNAMIC,
        p_flags: elf::PF_R,
        p_offset: dynamic_off as u64,
        p_vaddr: dynamic_off as u64,
        p_paddr: dynamic_off as u64,
        p_filesz: dynamic_len as u64,
        p_memsz: dynamic_len as u64,
        p_align: 8,
    });
    // A .tbss block: no file bytes, vaddr 0 so the first byte is aligned.
    w.write_program_header(&ProgramHeader {
        p_type: elf::PT_TLS,
        p_flags: elf::PF_R,
        p_offset: end,
        p_vaddr: 0,
        p_paddr: 0,
        p_filesz: 0,
        p_memsz: seg.size,
        p_align: seg.align,
    });
    w.write_program_header(&ProgramHeader {
        p_type: elf::PT_GNU_STACK,
        p_flags: elf::PF_R | elf::PF_W,
        p_offset: 0,
        p_vaddr: 0,
        p_paddr: 0,
        p_filesz: 0,
        p_memsz: 0,
        p_align: 16,
    });
    w.write_null_dynamic_symbol();
    w.write_dynstr();
    w.write_align_dynamic();
    w.write_dynamic(elf::DT_SYMTAB, dynsym_off as u64);
    w.write_dynamic(elf::DT_STRTAB, dynstr_off as u64);
    let strsz = w.dynstr_len() as u64;
    w.write_dynamic(elf::DT_STRSZ, strsz);
    w.write_dynamic(elf::DT_SYMENT, 24);
    w.write_dynamic(elf::DT_NULL, 0);
    debug_assert_eq!(w.len() as u64, end);
    buf
}

/// One object of the command's initial link map, as `ld.so --list` gives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Listed {
    pub name: String,
    /// `None` for the vDSO.
    pub path: Option<PathBuf>,
}

/// Parses `ld.so --list` output (link-map order, the executable omitted).
/// Fails on a `not found` line.
pub fn parse_list(text: &str) -> Result<Vec<Listed>, String> {
    let mut out = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        let (name, rest) = match line.split_once(" => ") {
            Some((n, r)) => (n.trim(), r.trim()),
            None => (line, line),
        };
        if rest.starts_with("not found") {
            return Err(format!("{name} not found"));
        }
        // Strip the trailing " (0x...)".
        let target = match rest.rfind(" (0x") {
            Some(i) => &rest[..i],
            None => rest,
        };
        let path = target.starts_with('/').then(|| PathBuf::from(target));
        let name = match line.split_once(" => ") {
            Some(_) => name.to_string(),
            None => target.to_string(),
        };
        out.push(Listed { name, path });
    }
    Ok(out)
}

fn basename(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

/// Shell-style glob on basenames (`*`, `?`), as the shim matches
/// `IA2_COMPARTMENTS` patterns.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// The shim's object classes (its `objects::classify`, checked against it
/// by `tests/tls.rs`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Main,
    Loader,
    Vdso,
    System,
    Shim,
    Application,
}

pub fn classify(basename: &str, is_first: bool) -> Kind {
    const SYSTEM_PREFIXES: &[&str] = &[
        "libc.so",
        "libm.so",
        "libmvec.so",
        "libpthread.so",
        "libdl.so",
        "librt.so",
        "libresolv.so",
        "libutil.so",
        "libanl.so",
        "libnsl.so",
        "libnss_",
        "libBrokenLocale.so",
        "libthread_db.so",
        "libc_malloc_debug.so",
        "libgcc_s.so",
        "libstdc++.so",
    ];
    if is_first {
        Kind::Main
    } else if basename.starts_with("ld-linux") || basename.starts_with("ld64.so") {
        Kind::Loader
    } else if basename.starts_with("linux-vdso") || basename.starts_with("linux-gate") {
        Kind::Vdso
    } else if basename.starts_with("libia2shim") {
        Kind::Shim
    } else if SYSTEM_PREFIXES.iter().any(|p| basename.starts_with(p)) {
        Kind::System
    } else {
        Kind::Application
    }
}

/// The compartment (an owner identity for the layout) of each object, as
/// the shim will assign it: `IA2_COMPARTMENTS` patterns, else the
/// executable and each application object its own. System objects stay
/// shared here even in strict mode (`IA2_LIBC_COMPARTMENT`): libc runs with
/// its callers' rights, so its TLS must stay reachable from every
/// compartment, as the shim's plan keeps it.
pub fn owners(names: &[(String, Kind)], compartments: Option<&str>) -> Vec<Option<u8>> {
    let mut out = vec![None; names.len()];
    match compartments.filter(|s| !s.is_empty() && *s != "auto") {
        None => {
            let mut next = 1u8;
            for (i, (_, k)) in names.iter().enumerate() {
                if matches!(k, Kind::Main | Kind::Application) {
                    out[i] = Some(next);
                    next = next.saturating_add(1);
                }
            }
        }
        Some(spec) => {
            for rule in spec.split(';').filter(|r| !r.is_empty()) {
                let Some((n, pats)) = rule.split_once('=') else {
                    continue;
                };
                let Ok(c) = n.trim().parse::<u8>() else {
                    continue;
                };
                for pat in pats.split(',').map(str::trim) {
                    for (i, (name, k)) in names.iter().enumerate() {
                        if matches!(k, Kind::Shim | Kind::System | Kind::Loader | Kind::Vdso) {
                            continue;
                        }
                        let b = if *k == Kind::Main {
                            "main"
                        } else {
                            basename(name)
                        };
                        if glob_match(pat, b) {
                            out[i] = Some(c);
                        }
                    }
                }
            }
        }
    }
    out
}

/// What the layout step did for one job, for `--verbose` and tests.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Arranged {
    pub job: Job,
    pub pads: usize,
    pub pad_bytes: u64,
}

fn env_get<'a>(env: &'a [(OsString, OsString)], key: &str) -> Option<&'a OsStr> {
    env.iter()
        .rev()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_os_str())
}

/// `argv[0]` as `execvp` would find it with the job's `PATH`.
fn resolve_program(job: &Job) -> Option<PathBuf> {
    let prog = Path::new(job.argv.first()?);
    if prog.as_os_str().as_bytes().contains(&b'/') {
        return Some(job.cwd.join(prog));
    }
    let path = env_get(&job.env, "PATH")?;
    std::env::split_paths(path)
        .map(|d| job.cwd.join(d).join(prog))
        .find(|p| p.is_file())
}

/// Where pad objects go: next to the shim (the VM guest sees it), else the
/// user's cache.
fn pad_dir(shim: &Path) -> PathBuf {
    let beside = shim.parent().map(|d| d.join("tlspads"));
    let cache = std::env::var_os("IA2RUN_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|p| PathBuf::from(p).join("ia2run")))
        .or_else(|| std::env::var_os("HOME").map(|p| PathBuf::from(p).join(".cache/ia2run")))
        .map(|d| d.join("tlspads"));
    beside
        .into_iter()
        .chain(cache)
        .find(|d| {
            fs::create_dir_all(d).is_ok()
                && fs::metadata(d).is_ok_and(|m| !m.permissions().readonly())
        })
        .unwrap_or_else(|| std::env::temp_dir().join("ia2run-tlspads"))
}

/// Writes (once) the pad file for `seg`; `k` tells equal pads apart (the
/// loader loads one file only once).
fn pad_file(dir: &Path, seg: TlsSeg, k: usize) -> Result<PathBuf, String> {
    let p = dir.join(format!("{PAD_PREFIX}{}-{}-{k}.so", seg.size, seg.align));
    if !p.is_file() {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
        // A name of its own per writer: concurrent runs (threads of a test
        // harness, other processes) each rename a complete file into place.
        static SEQ: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let tmp = dir.join(format!(".{}.{n}.tmp", std::process::id()));
        fs::write(&tmp, pad_object(seg)).map_err(|e| format!("{}: {e}", tmp.display()))?;
        fs::rename(&tmp, &p).map_err(|e| format!("{}: {e}", p.display()))?;
    }
    Ok(p)
}

fn list(ldso: &Path, exe: &Path, job: &Job, preload: &OsStr) -> Result<Vec<Listed>, String> {
    let mut env = job.effective_env();
    env.retain(|(k, _)| k != "LD_PRELOAD");
    env.push(("LD_PRELOAD".into(), preload.to_owned()));
    let o = Command::new(ldso)
        .arg("--list")
        .arg(exe)
        .env_clear()
        .envs(env)
        .current_dir(&job.cwd)
        .output()
        .map_err(|e| format!("{}: {e}", ldso.display()))?;
    if !o.status.success() {
        return Err(format!(
            "{} --list {} failed: {}",
            ldso.display(),
            exe.display(),
            String::from_utf8_lossy(&o.stderr).trim()
        ));
    }
    parse_list(&String::from_utf8_lossy(&o.stdout))
}

/// Arranges `job`'s preload list for the TLS layout. `Ok(None)`: nothing to
/// do (no shim, `IA2_TLS_LAYOUT=off`, not a dynamic ELF program, or no
/// compartment module has static TLS). `Err`: the layout could not be
/// arranged (the caller warns and runs the job as it is).
pub fn arrange_job(job: &Job) -> Result<Option<Arranged>, String> {
    let Some(shim) = &job.preload else {
        return Ok(None);
    };
    let var = |k: &str| env_get(&job.env, k).and_then(OsStr::to_str);
    if var("IA2_TLS_LAYOUT") == Some("off") || var("IA2_PKU") == Some("off") {
        return Ok(None);
    }
    let Some(exe) = resolve_program(job) else {
        return Ok(None);
    };
    let Ok(exe_info) = read_file_info(&exe) else {
        return Ok(None); // a script or not ELF: the shim comes up in its interpreter
    };
    let Some(ldso) = exe_info.interp.clone() else {
        return Ok(None); // static
    };
    let original = shim.clone().into_os_string();
    let listed = list(&ldso, &exe, job, &original)?;
    let ldso_canon = fs::canonicalize(&ldso).unwrap_or(ldso.clone());
    // The executable, then the link map; ld.so and the vDSO are never preloaded.
    let mut names: Vec<(String, Kind)> = vec![(exe.display().to_string(), Kind::Main)];
    let mut paths: Vec<Option<PathBuf>> = vec![None];
    let mut segs: Vec<Option<TlsSeg>> = vec![exe_info.tls];
    for l in &listed {
        let is_ldso = l
            .path
            .as_ref()
            .is_some_and(|p| fs::canonicalize(p).unwrap_or(p.clone()) == ldso_canon);
        let kind = match &l.path {
            None => Kind::Vdso,
            Some(_) if is_ldso => Kind::Loader,
            Some(p) => classify(basename(&p.to_string_lossy()), false),
        };
        let tls = match (&l.path, kind) {
            (Some(p), Kind::Application | Kind::System | Kind::Shim) => read_file_info(p)?.tls,
            _ => None,
        };
        names.push((
            l.path
                .as_ref()
                .map_or(l.name.clone(), |p| p.display().to_string()),
            kind,
        ));
        paths.push(
            l.path
                .clone()
                .filter(|_| !matches!(kind, Kind::Vdso | Kind::Loader)),
        );
        segs.push(tls);
    }
    let owner = owners(&names, var("IA2_COMPARTMENTS"));
    let modules: Vec<(Option<TlsSeg>, Option<u8>)> =
        segs.iter().copied().zip(owner.iter().copied()).collect();
    if !modules.iter().any(|(s, o)| s.is_some() && o.is_some()) {
        return Ok(None);
    }
    let layout = arrange(&modules);
    let dir = pad_dir(shim);
    let mut preload: Vec<PathBuf> = Vec::new();
    let mut pads = 0;
    for it in &layout.items {
        match *it {
            Item::Module(i) => preload.extend(paths[i].clone()),
            Item::Pad(p) => {
                preload.push(pad_file(&dir, p, pads)?);
                pads += 1;
            }
        }
    }
    for p in &preload {
        let b = p.as_os_str().as_bytes();
        if b.contains(&b':') || b.contains(&b' ') {
            return Err(format!(
                "{}: a path with ':' or ' ' cannot go into LD_PRELOAD",
                p.display()
            ));
        }
    }
    let joined = preload
        .iter()
        .map(|p| p.as_os_str())
        .collect::<Vec<_>>()
        .join(OsStr::new(":"));
    // The arranged link map must be the old one with the pads inserted.
    let again = list(&ldso, &exe, job, &joined)?;
    let is_ldso = |l: &Listed| {
        l.path
            .as_ref()
            .is_some_and(|p| fs::canonicalize(p).unwrap_or(p.clone()) == ldso_canon)
    };
    let without_pads: Vec<&Listed> = again
        .iter()
        .filter(|l| !l.name.contains(PAD_PREFIX))
        .collect();
    check_order(&listed, &without_pads, &is_ldso)?;
    let mut job = job.clone();
    job.preload = None;
    job = job
        .env("LD_PRELOAD", joined)
        .env("IA2_TLS_PRELOAD", original);
    Ok(Some(Arranged {
        job,
        pads,
        pad_bytes: layout.pad_bytes,
    }))
}

/// Checks that `after` (the arranged link map, pads removed) is `before`
/// in the same order, except that ld.so itself may come later: ld.so's link
/// map is put where a `DT_NEEDED` first names it, and with everything
/// preloaded that is after the preloads. Its place in the lookup scope
/// then matters only for a symbol that ld.so and an object moved ahead of
/// it both define, which is checked in their dynamic symbol tables.
fn check_order(
    before: &[Listed],
    after: &[&Listed],
    is_ldso: &dyn Fn(&Listed) -> bool,
) -> Result<(), String> {
    let same = |a: &Listed, b: &Listed| a.path == b.path;
    let strip = |v: Vec<&Listed>| -> Vec<Listed> {
        v.into_iter().filter(|l| !is_ldso(l)).cloned().collect()
    };
    let (b, a) = (strip(before.iter().collect()), strip(after.to_vec()));
    if b.len() != a.len() || !b.iter().zip(&a).all(|(x, y)| same(x, y)) {
        return Err("preloading the link map in order changed its order".into());
    }
    let pos = |v: &[&Listed]| v.iter().position(|l| is_ldso(l));
    let old = pos(&before.iter().collect::<Vec<_>>());
    let new = pos(after);
    let (Some(old), Some(new)) = (old, new) else {
        return Ok(());
    };
    if old == new {
        return Ok(());
    }
    // Objects that ld.so now follows but used to precede.
    let moved: Vec<&Listed> = before[old + 1..]
        .iter()
        .filter(|l| after[..new].iter().any(|x| same(x, l)))
        .collect();
    let ldso = before[old].path.as_ref().expect("ld.so has a path");
    let ld_syms = defined_dynamic_symbols(ldso)?;
    for m in moved {
        let Some(p) = &m.path else { continue };
        let clash: Vec<String> = defined_dynamic_symbols(p)?
            .intersection(&ld_syms)
            .cloned()
            .collect();
        if !clash.is_empty() {
            return Err(format!(
                "ld.so would move behind {}, which also defines {}",
                p.display(),
                clash.join(", ")
            ));
        }
    }
    Ok(())
}

/// The names of the symbols an object defines in its dynamic symbol table.
fn defined_dynamic_symbols(path: &Path) -> Result<std::collections::BTreeSet<String>, String> {
    use object::read::elf::ElfFile64;
    use object::{Object, ObjectSymbol};
    let data = fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let f = ElfFile64::<object::Endianness>::parse(&*data)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(f.dynamic_symbols()
        .filter(|s| s.is_definition())
        .filter_map(|s| s.name().ok().map(str::to_string))
        .collect())
}

/// [`arrange_job`] for running: the arranged job, or (with a warning on
/// stderr) the job as it was.
pub fn arranged(job: &Job) -> Job {
    match arrange_job(job) {
        Ok(Some(a)) => a.job,
        Ok(None) => job.clone(),
        Err(e) => {
            eprintln!("ia2run: TLS layout not arranged for {job}: {e}; compartment TLS may share pages (see IA2_REPORT=plan)");
            job.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seg(size: u64, align: u64) -> Option<TlsSeg> {
        Some(TlsSeg::pad(size, align))
    }

    #[test]
    fn the_loader_fills_gaps_with_later_small_blocks() {
        // The measurement: exe 4 bytes, the aligned 4096 pad, then
        // a 4-byte library block lands 4 bytes from the executable's.
        let mut l = Loader::new();
        assert_eq!(l.place(TlsSeg::pad(4, 4)), 4);
        assert_eq!(l.place(TlsSeg::pad(4096, 4096)), 0x2000);
        assert_eq!(l.place(TlsSeg::pad(4, 4)), 8);
    }

    #[test]
    fn three_compartments_each_get_their_own_page() {
        // exe (1), shim (shared), lib A (2), lib B (3), libc (shared).
        let modules = vec![
            (seg(4, 4), Some(1)),
            (seg(200, 8), None),
            (seg(4, 4), Some(2)),
            (seg(4, 4), Some(3)),
            (seg(0x90, 8), None),
        ];
        let lay = arrange(&modules);
        assert!(lay.max_align >= PAGE);
        let placed = replay(&modules, &lay.items);
        // Each private block's pages hold nothing of another owner.
        for (i, (s, o)) in modules.iter().enumerate() {
            let (Some(s), Some(_)) = (s, o) else { continue };
            let off = lay.offsets[i].unwrap();
            let (lo, hi) = (off, off - s.size); // distances from tp
            let pages = (hi / PAGE, (lo - 1) / PAGE);
            for &(it, o2) in &placed {
                if it == Item::Module(i) {
                    continue;
                }
                let size = match it {
                    Item::Module(j) => {
                        if modules[j].1 == modules[i].1 {
                            continue;
                        }
                        modules[j].0.unwrap().size
                    }
                    Item::Pad(_) => continue,
                };
                let p2 = ((o2 - size) / PAGE, (o2 - 1) / PAGE);
                assert!(
                    p2.1 < pages.0 || p2.0 > pages.1,
                    "{it:?} shares a page with {i}"
                );
            }
        }
        assert_eq!(lay.offsets[0], Some(4));
        assert_eq!(lay.offsets[2].unwrap() % PAGE, 4);
        assert_eq!(lay.offsets[3].unwrap() % PAGE, 4);
        // Pads = what completes three pages, around the shim's block.
        assert!(lay.pad_bytes < 4 * PAGE, "{lay:?}");
    }

    #[test]
    fn alignment_gaps_inside_a_private_page_are_filled() {
        // Lib A's 64-aligned block after an odd offset opens a gap that
        // libc's small block would take.
        let modules = vec![
            (seg(4, 4), None),
            (seg(100, 64), Some(2)),
            (seg(8, 8), None),
        ];
        let lay = arrange(&modules);
        let placed = replay(&modules, &lay.items);
        let a = lay.offsets[1].unwrap();
        let libc = lay.offsets[2].unwrap();
        assert!(
            libc / PAGE != (a - 1) / PAGE && (libc - 8) / PAGE != (a - 100) / PAGE,
            "{placed:?}"
        );
        assert!(placed
            .iter()
            .any(|(it, _)| matches!(it, Item::Pad(p) if p.align == 1)));
    }

    #[test]
    fn no_private_tls_no_pads() {
        let lay = arrange(&[(seg(4, 4), None), (None, Some(1))]);
        assert_eq!(lay.pad_bytes, 0);
        assert!(lay.items.iter().all(|i| matches!(i, Item::Module(_))));
    }

    #[test]
    fn list_output_parses() {
        let t = "\tlinux-vdso.so.1 (0x00007f0f8616f000)\n\t/a/libia2shim.so (0x00007f0f85fa0000)\n\tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f0f85d85000)\n";
        let l = parse_list(t).unwrap();
        assert_eq!(l.len(), 3);
        assert_eq!(l[0].path, None);
        assert_eq!(l[1].path.as_deref(), Some(Path::new("/a/libia2shim.so")));
        assert_eq!(l[2].name, "libc.so.6");
        assert!(parse_list("\tlibx.so => not found\n").is_err());
    }

    #[test]
    fn ldso_may_move_behind_objects_that_define_none_of_its_symbols() {
        let l = |p: &str| Listed {
            name: p.into(),
            path: Some(PathBuf::from(p)),
        };
        let ld = "/lib64/ld-linux-x86-64.so.2";
        let is_ld = |x: &Listed| x.path.as_deref() == Some(Path::new(ld));
        let libc = "/lib/x86_64-linux-gnu/libc.so.6";
        let libm = "/lib/x86_64-linux-gnu/libm.so.6";
        let before = vec![l(libc), l(ld), l(libm)];
        let same: Vec<Listed> = before.clone();
        assert!(check_order(&before, &same.iter().collect::<Vec<_>>(), &is_ld).is_ok());
        let moved = [l(libc), l(libm), l(ld)];
        assert!(check_order(&before, &moved.iter().collect::<Vec<_>>(), &is_ld).is_ok());
        let swapped = [l(libm), l(libc), l(ld)];
        assert!(check_order(&before, &swapped.iter().collect::<Vec<_>>(), &is_ld).is_err());
        // An object that defines one of ld.so's symbols (here: a second
        // copy of ld.so under another name) may not move ahead of it.
        let is_first_ld = |x: &Listed| x.name == ld;
        let twin = Listed {
            name: "twin".into(),
            path: Some(PathBuf::from(ld)),
        };
        let before = vec![l(ld), twin.clone()];
        let after = [twin, l(ld)];
        let e = check_order(&before, &after.iter().collect::<Vec<_>>(), &is_first_ld);
        assert!(e.is_err_and(|e| e.contains("also defines")));
    }

    #[test]
    fn pad_objects_parse_back() {
        let b = pad_object(TlsSeg::pad(4092, 4096));
        let dir = std::env::temp_dir().join(format!("ia2run-padtest-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let p = dir.join("pad.so");
        fs::write(&p, &b).unwrap();
        let info = read_file_info(&p).unwrap();
        assert_eq!(info.tls, Some(TlsSeg::pad(4092, 4096)));
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn owners_follow_the_shims_rules() {
        let n = |s: &str, k| (s.to_string(), k);
        let names = vec![
            n("/x/prog", Kind::Main),
            n("/x/libia2shim.so", Kind::Shim),
            n("/x/liba.so", Kind::Application),
            n("/lib/libc.so.6", Kind::System),
        ];
        assert_eq!(owners(&names, None), vec![Some(1), None, Some(2), None]);
        assert_eq!(
            owners(&names, Some("3=main,liba*;4=libc*")),
            vec![Some(3), None, Some(3), None]
        );
    }
}
