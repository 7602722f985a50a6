//! Census of loaded objects: `dl_iterate_phdr` for segments and TLS, and the
//! in-memory dynamic section (decoded with `object`'s ELF types) for
//! relocations and symbols.

use core::cell::UnsafeCell;
use core::ffi::{c_char, c_int, c_void, CStr};
use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use object::elf;
use object::LittleEndian as LE;

pub const PAGE: usize = 4096;

pub const fn page_down(a: usize) -> usize {
    a & !(PAGE - 1)
}

pub const fn page_up(a: usize) -> usize {
    (a + PAGE - 1) & !(PAGE - 1)
}

/// A half-open address range.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Range {
    pub start: usize,
    pub end: usize,
}

impl Range {
    pub const fn new(start: usize, end: usize) -> Self {
        Self { start, end }
    }
    pub const fn len(&self) -> usize {
        self.end.saturating_sub(self.start)
    }
    pub const fn is_empty(&self) -> bool {
        self.end <= self.start
    }
    pub const fn contains(&self, a: usize) -> bool {
        self.start <= a && a < self.end
    }
    /// The smallest page-aligned range covering this one.
    pub const fn pages_out(&self) -> Range {
        Range::new(page_down(self.start), page_up(self.end))
    }
    /// The largest page-aligned range inside this one (may be empty).
    pub const fn pages_in(&self) -> Range {
        Range::new(page_up(self.start), page_down(self.end))
    }
    pub fn intersect(&self, o: &Range) -> Range {
        Range::new(self.start.max(o.start), self.end.min(o.end))
    }
}

impl core::fmt::Display for Range {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        write!(f, "{:#x}-{:#x}", self.start, self.end)
    }
}

/// What kind of object this is, for the default compartment policy.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ObjectKind {
    /// The main executable.
    Main,
    /// ld.so.
    Loader,
    Vdso,
    /// libc and the other system libraries that stay shared by default.
    System,
    /// libia2shim.so itself.
    Shim,
    Application,
}

/// A `PT_LOAD` segment at its run-time address (not page-rounded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    pub range: Range,
    /// `PF_R | PF_W | PF_X`.
    pub flags: u32,
}

impl Segment {
    pub fn writable(&self) -> bool {
        self.flags & elf::PF_W != 0
    }
    pub fn executable(&self) -> bool {
        self.flags & elf::PF_X != 0
    }
}

/// The object's `PT_TLS` module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TlsModule {
    pub modid: usize,
    pub memsz: usize,
    pub align: usize,
    /// The block's address in the thread that took the census (null if the
    /// block is not allocated yet in that thread).
    pub block: usize,
}

#[derive(Clone, Debug)]
pub struct LoadedObject {
    /// `dlpi_name` (empty for the main executable).
    pub name: String,
    /// The name used for matching: basename of `name`, or `main`.
    pub basename: String,
    pub base: usize,
    pub kind: ObjectKind,
    pub segments: Vec<Segment>,
    pub relro: Option<Range>,
    pub tls: Option<TlsModule>,
    /// Run-time address of the dynamic section.
    pub dynamic: Option<usize>,
}

impl LoadedObject {
    pub fn contains(&self, addr: usize) -> bool {
        self.segments
            .iter()
            .any(|s| s.range.pages_out().contains(addr))
    }

    /// A name for reports: the path (the executable's too), else `main`.
    pub fn display_name(&self) -> &str {
        if self.name.is_empty() {
            "main"
        } else {
            &self.name
        }
    }

    /// The `DT_NEEDED` names of this object (its direct dependencies).
    pub fn needed(&self) -> Vec<String> {
        let (Some(dynamic), Some(info)) = (self.dynamic, self.dynamic_info()) else {
            return Vec::new();
        };
        if info.strtab == 0 {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut p = dynamic as *const elf::Dyn64<LE>;
        loop {
            // SAFETY: PT_DYNAMIC of a loaded object: DT_NULL-terminated.
            let e = unsafe { &*p };
            let tag = e.d_tag.get(LE) as u32;
            if tag == elf::DT_NULL {
                break;
            }
            if tag == elf::DT_NEEDED {
                let off = e.d_val.get(LE) as usize;
                if off < info.strsz.max(1) {
                    // SAFETY: a NUL-terminated name in the object's mapped
                    // string table.
                    let name = unsafe {
                        core::ffi::CStr::from_ptr((info.strtab + off) as *const core::ffi::c_char)
                    };
                    out.push(name.to_string_lossy().into_owned());
                }
            }
            // SAFETY: not past DT_NULL yet.
            p = unsafe { p.add(1) };
        }
        out
    }

    /// The GNU build-id note, read from the loaded image: the ELF header
    /// at the start of the lowest segment, its program headers, PT_NOTE.
    pub fn build_id(&self) -> Option<&'static [u8]> {
        let low = self.segments.iter().map(|s| s.range.start).min()?;
        let text = |a: usize, n: usize| -> Option<&'static [u8]> {
            let r = Range::new(a, a.checked_add(n)?);
            // Only bytes inside one of this object's readable segments.
            self.segments
                .iter()
                .any(|s| {
                    s.flags & elf::PF_R != 0 && s.range.start <= r.start && r.end <= s.range.end
                })
                // SAFETY: inside a mapped, readable segment of a loaded object.
                .then(|| unsafe { core::slice::from_raw_parts(a as *const u8, n) })
        };
        let hdr = text(low, core::mem::size_of::<elf::FileHeader64<LE>>())?;
        if hdr[..4] != elf::ELFMAG {
            return None;
        }
        // SAFETY: the bytes checked above hold an ELF64 file header.
        let h = unsafe { &*(hdr.as_ptr() as *const elf::FileHeader64<LE>) };
        let (phoff, phnum) = (h.e_phoff.get(LE) as usize, h.e_phnum.get(LE) as usize);
        let size = core::mem::size_of::<elf::ProgramHeader64<LE>>();
        let phdrs = text(low + phoff, phnum * size)?;
        for i in 0..phnum {
            // SAFETY: inside the program header table checked above.
            let ph = unsafe { &*(phdrs.as_ptr().add(i * size) as *const elf::ProgramHeader64<LE>) };
            if ph.p_type.get(LE) != elf::PT_NOTE {
                continue;
            }
            let start = self.base.wrapping_add(ph.p_vaddr.get(LE) as usize);
            let mut notes = text(start, ph.p_memsz.get(LE) as usize)?;
            // Elf64_Nhdr: namesz, descsz, type; name and desc 4-aligned.
            while notes.len() >= 12 {
                let word =
                    |i: usize| u32::from_le_bytes(notes[i..i + 4].try_into().unwrap()) as usize;
                let (namesz, descsz, ty) = (word(0), word(4), word(8));
                let name_end = 12 + namesz.next_multiple_of(4);
                let desc_end = name_end + descsz.next_multiple_of(4);
                if desc_end > notes.len() {
                    break;
                }
                if ty == elf::NT_GNU_BUILD_ID as usize && notes[12..12 + namesz] == *b"GNU\0" {
                    return Some(&notes[name_end..name_end + descsz]);
                }
                notes = &notes[desc_end..];
            }
        }
        None
    }

    pub fn dynamic_info(&self) -> Option<DynamicInfo> {
        // SAFETY: `dynamic` came from this object's PT_DYNAMIC, which stays
        // mapped while the object is loaded.
        self.dynamic
            .map(|d| unsafe { DynamicInfo::read(d, self.base) })
    }
}

/// Classify by basename. System objects stay shared in the default policy.
pub fn classify(basename: &str, is_first: bool) -> ObjectKind {
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
        // GCC's other run-time libraries: called on the program's behalf
        // with pointers into its data (`omp_init_lock(&lock)`).
        "libgomp.so",
        "libatomic.so",
        "libquadmath.so",
        // libtool's dlopen wrapper: it loads modules for whoever calls it
        // (ImageMagick's coders). Shared, it runs with its caller's rights,
        // so the modules join the caller's compartment (src/dl.rs), whose
        // code then calls them through plain function pointers.
        "libltdl.so",
    ];
    if is_first {
        ObjectKind::Main
    } else if basename.starts_with("ld-linux") || basename.starts_with("ld64.so") {
        ObjectKind::Loader
    } else if basename.starts_with("linux-vdso") || basename.starts_with("linux-gate") {
        ObjectKind::Vdso
    } else if basename.starts_with("libia2shim") {
        ObjectKind::Shim
    } else if SYSTEM_PREFIXES.iter().any(|p| basename.starts_with(p)) {
        ObjectKind::System
    } else {
        ObjectKind::Application
    }
}

/// glibc's `struct dl_phdr_info`, including the TLS fields that the `libc`
/// crate's definition leaves out.
#[repr(C)]
struct DlPhdrInfo {
    addr: usize,
    name: *const c_char,
    phdr: *const elf::ProgramHeader64<LE>,
    phnum: u16,
    adds: u64,
    subs: u64,
    tls_modid: usize,
    tls_data: *mut c_void,
}

extern "C" {
    fn dl_iterate_phdr(
        cb: unsafe extern "C" fn(*mut DlPhdrInfo, usize, *mut c_void) -> c_int,
        data: *mut c_void,
    ) -> c_int;
}

unsafe extern "C" fn census_callback(
    info: *mut DlPhdrInfo,
    size: usize,
    data: *mut c_void,
) -> c_int {
    // SAFETY: `data` is the `&mut Vec` passed by `census`, used only during the call.
    let out = unsafe { &mut *(data as *mut Vec<LoadedObject>) };
    // SAFETY: glibc passes a valid info of at least `size` bytes.
    let info = unsafe { &*info };
    let has_tls_fields = size >= core::mem::size_of::<DlPhdrInfo>();
    let name = if info.name.is_null() {
        String::new()
    } else {
        // SAFETY: dlpi_name is a NUL-terminated string owned by the link map.
        unsafe { CStr::from_ptr(info.name) }
            .to_string_lossy()
            .into_owned()
    };
    // The executable's dlpi_name is empty; name it by its path for reports.
    let name = if out.is_empty() && name.is_empty() {
        exe_path().unwrap_or_default().to_string()
    } else {
        name
    };
    let basename = if out.is_empty() {
        "main".to_string()
    } else {
        name.rsplit('/').next().unwrap_or(&name).to_string()
    };
    let mut kind = classify(&basename, out.is_empty());
    // glibc's own plug-ins: iconv's gconv modules are loaded by libc itself
    // (`__libc_dlopen`) and run as part of libc, like the NSS modules.
    if kind == ObjectKind::Application && name.contains("/gconv/") {
        kind = ObjectKind::System;
    }
    let mut obj = LoadedObject {
        name,
        basename,
        base: info.addr,
        kind,
        segments: Vec::new(),
        relro: None,
        tls: None,
        dynamic: None,
    };
    // SAFETY: dlpi_phdr points at dlpi_phnum program headers in mapped memory.
    let phdrs = unsafe { core::slice::from_raw_parts(info.phdr, info.phnum as usize) };
    for ph in phdrs {
        let vaddr = info.addr.wrapping_add(ph.p_vaddr.get(LE) as usize);
        let memsz = ph.p_memsz.get(LE) as usize;
        let range = Range::new(vaddr, vaddr + memsz);
        match ph.p_type.get(LE) {
            elf::PT_LOAD => obj.segments.push(Segment {
                range,
                flags: ph.p_flags.get(LE),
            }),
            elf::PT_GNU_RELRO => obj.relro = Some(range),
            elf::PT_DYNAMIC => obj.dynamic = Some(vaddr),
            elf::PT_TLS if memsz > 0 || ph.p_filesz.get(LE) > 0 => {
                obj.tls = Some(TlsModule {
                    modid: if has_tls_fields { info.tls_modid } else { 0 },
                    memsz,
                    align: ph.p_align.get(LE) as usize,
                    block: if has_tls_fields {
                        info.tls_data as usize
                    } else {
                        0
                    },
                })
            }
            _ => {}
        }
    }
    out.push(obj);
    0
}

/// The executable's path, kept once per process in a static buffer (no
/// allocation): from [`seed_exe_path`] (the start-up census finds it in
/// its `/proc/self/maps` snapshot), else `readlink("/proc/self/exe")` on
/// first use. `None` while another thread fills it, or if unreadable.
pub fn exe_path() -> Option<&'static str> {
    fill_exe_path(|buf| {
        // SAFETY: a NUL-terminated path and a buffer of `buf.len()` bytes.
        let n = unsafe {
            libc::readlink(
                c"/proc/self/exe".as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        usize::try_from(n).ok()
    })
}

/// Record the executable's path where the caller already has it (the same
/// text `readlink` would return), so that naming it costs no system call.
/// Ignored once the path is known.
pub fn seed_exe_path(path: &str) {
    fill_exe_path(|buf| {
        let b = path.as_bytes();
        (b.len() < buf.len()).then(|| {
            buf[..b.len()].copy_from_slice(b);
            b.len()
        })
    });
}

fn fill_exe_path(fill: impl FnOnce(&mut [u8; 4096]) -> Option<usize>) -> Option<&'static str> {
    // Header first: a short path then shares its page (one page fault at
    // start-up, not two).
    #[repr(C)]
    struct Buf {
        state: AtomicU8,
        len: AtomicUsize,
        bytes: UnsafeCell<[u8; 4096]>,
    }
    // SAFETY: `bytes` is written once, by the thread that moved `state`
    // from EMPTY to BUSY, and read only after `state` is READY.
    unsafe impl Sync for Buf {}
    const EMPTY: u8 = 0;
    const BUSY: u8 = 1;
    const READY: u8 = 2;
    const FAILED: u8 = 3;
    // Large: with the other large statics (sealed.ld).
    #[link_section = ".bss.ia2shim_large"]
    static EXE: Buf = Buf {
        state: AtomicU8::new(EMPTY),
        len: AtomicUsize::new(0),
        bytes: UnsafeCell::new([0; 4096]),
    };
    if EXE
        .state
        .compare_exchange(EMPTY, BUSY, Ordering::Acquire, Ordering::Acquire)
        .is_ok()
    {
        // SAFETY: only this thread writes the buffer (state BUSY).
        let buf = unsafe { &mut *EXE.bytes.get() };
        let n = fill(buf).filter(|&n| n > 0 && n < buf.len());
        EXE.len.store(n.unwrap_or(0), Ordering::Relaxed);
        EXE.state
            .store(if n.is_some() { READY } else { FAILED }, Ordering::Release);
    }
    if EXE.state.load(Ordering::Acquire) != READY {
        return None;
    }
    // SAFETY: READY: the buffer's first `len` bytes are final.
    let all: &'static [u8; 4096] = unsafe { &*EXE.bytes.get() };
    core::str::from_utf8(&all[..EXE.len.load(Ordering::Relaxed)]).ok()
}

/// Every loaded object, in load order (the main executable first).
pub fn census() -> Vec<LoadedObject> {
    let mut out: Vec<LoadedObject> = Vec::new();
    // SAFETY: the callback only touches `out` and the info glibc passes.
    unsafe { dl_iterate_phdr(census_callback, (&mut out as *mut Vec<LoadedObject>).cast()) };
    let shim = crate::objects::census as *const () as usize;
    for o in &mut out {
        if o.kind != ObjectKind::Main && o.contains(shim) {
            o.kind = ObjectKind::Shim;
        }
    }
    out
}

unsafe extern "C" fn tls_callback(info: *mut DlPhdrInfo, size: usize, data: *mut c_void) -> c_int {
    // SAFETY: `data` is the `&mut Vec` passed by `tls_blocks_here`.
    let out = unsafe { &mut *(data as *mut Vec<(usize, usize, usize)>) };
    // SAFETY: glibc passes a valid info of at least `size` bytes.
    let info = unsafe { &*info };
    if size < core::mem::size_of::<DlPhdrInfo>() || info.tls_modid == 0 {
        return 0;
    }
    // SAFETY: dlpi_phdr points at dlpi_phnum program headers.
    let phdrs = unsafe { core::slice::from_raw_parts(info.phdr, info.phnum as usize) };
    if let Some(ph) = phdrs.iter().find(|p| p.p_type.get(LE) == elf::PT_TLS) {
        out.push((
            info.tls_modid,
            info.tls_data as usize,
            ph.p_memsz.get(LE) as usize,
        ));
    }
    0
}

/// `(module id, block address, size)` of every TLS module in the calling
/// thread (address 0: not allocated in this thread yet). Cheaper than a
/// census: no names.
pub fn tls_blocks_here() -> Vec<(usize, usize, usize)> {
    let mut out: Vec<(usize, usize, usize)> = Vec::new();
    // SAFETY: the callback only touches `out` and the info glibc passes.
    unsafe {
        dl_iterate_phdr(
            tls_callback,
            (&mut out as *mut Vec<(usize, usize, usize)>).cast(),
        )
    };
    out
}

/// The parts of a dynamic section that the shim uses. Addresses are run-time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DynamicInfo {
    pub symtab: usize,
    pub strtab: usize,
    pub strsz: usize,
    pub rela: usize,
    pub relasz: usize,
    pub jmprel: usize,
    pub pltrelsz: usize,
    pub pltrel_is_rela: bool,
    pub init_array: usize,
    pub init_arraysz: usize,
    pub fini_array: usize,
    pub fini_arraysz: usize,
    pub fini: usize,
    pub flags: u64,
    pub flags_1: u64,
    pub gnu_hash: usize,
    pub hash: usize,
    pub versym: usize,
    pub verneed: usize,
    pub verneednum: usize,
}

/// One `Elf64_Rela`, with the run-time address of the slot it patches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reloc {
    pub slot: usize,
    pub r_type: u32,
    pub sym: u32,
    pub addend: i64,
}

/// A dynamic symbol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DynSym<'a> {
    pub name: &'a str,
    pub value: u64,
    pub size: u64,
    pub st_type: u8,
    pub shndx: u16,
}

impl DynamicInfo {
    /// Read the dynamic section at `dynamic`.
    ///
    /// # Safety
    /// `dynamic` must point at a mapped, `DT_NULL`-terminated dynamic section
    /// of an object loaded at `base`.
    pub unsafe fn read(dynamic: usize, base: usize) -> DynamicInfo {
        // glibc rewrites most d_ptr entries to absolute addresses in place
        // (writable dynamic sections); read-only ones (vdso) stay relative.
        let abs = |v: u64| -> usize {
            let v = v as usize;
            if v != 0 && v < base {
                base + v
            } else {
                v
            }
        };
        let mut d = DynamicInfo::default();
        let mut p = dynamic as *const elf::Dyn64<LE>;
        loop {
            // SAFETY: the caller guarantees a DT_NULL-terminated array.
            let e = unsafe { &*p };
            let tag = e.d_tag.get(LE) as u32;
            let val = e.d_val.get(LE);
            match tag {
                elf::DT_NULL => break,
                elf::DT_SYMTAB => d.symtab = abs(val),
                elf::DT_STRTAB => d.strtab = abs(val),
                elf::DT_STRSZ => d.strsz = val as usize,
                elf::DT_RELA => d.rela = abs(val),
                elf::DT_RELASZ => d.relasz = val as usize,
                elf::DT_JMPREL => d.jmprel = abs(val),
                elf::DT_PLTRELSZ => d.pltrelsz = val as usize,
                elf::DT_PLTREL => d.pltrel_is_rela = val == elf::DT_RELA as u64,
                elf::DT_INIT_ARRAY => d.init_array = abs(val),
                elf::DT_INIT_ARRAYSZ => d.init_arraysz = val as usize,
                elf::DT_FINI_ARRAY => d.fini_array = abs(val),
                elf::DT_FINI_ARRAYSZ => d.fini_arraysz = val as usize,
                elf::DT_FINI => d.fini = base + val as usize,
                elf::DT_FLAGS => d.flags = val,
                elf::DT_FLAGS_1 => d.flags_1 = val,
                elf::DT_GNU_HASH => d.gnu_hash = abs(val),
                elf::DT_HASH => d.hash = abs(val),
                elf::DT_VERSYM => d.versym = abs(val),
                elf::DT_VERNEED => d.verneed = abs(val),
                elf::DT_VERNEEDNUM => d.verneednum = val as usize,
                _ => {}
            }
            // SAFETY: not past DT_NULL yet.
            p = unsafe { p.add(1) };
        }
        d
    }

    /// Number of dynamic symbols, from DT_HASH or DT_GNU_HASH (the
    /// highest index any GNU hash chain reaches, plus one).
    pub fn symbol_count(&self) -> Option<usize> {
        if self.hash != 0 {
            // SAFETY: DT_HASH starts with nbucket, nchain; nchain = symbol count.
            return Some(unsafe { *((self.hash + 4) as *const u32) } as usize);
        }
        if self.gnu_hash == 0 {
            return None;
        }
        // SAFETY: the GNU hash table layout: nbuckets, symoffset, bloom_size,
        // bloom_shift, bloom[bloom_size] (u64), buckets[nbuckets], chains[].
        unsafe {
            let h = self.gnu_hash as *const u32;
            let (nbuckets, symoffset, bloom) =
                (*h as usize, *h.add(1) as usize, *h.add(2) as usize);
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

    /// Lazy binding is off (`BIND_NOW` or `DF_1_NOW`): every slot is final.
    pub fn bind_now(&self) -> bool {
        self.flags & elf::DF_BIND_NOW as u64 != 0 || self.flags_1 & elf::DF_1_NOW as u64 != 0
    }

    /// `DT_RELA` then `DT_JMPREL` relocations, with slots made absolute.
    pub fn relocations(&self, base: usize) -> impl Iterator<Item = Reloc> + '_ {
        let table = |addr: usize, size: usize| -> &[elf::Rela64<LE>] {
            if addr == 0 || size == 0 {
                return &[];
            }
            // SAFETY: DT_RELA/DT_JMPREL describe arrays of Elf64_Rela in the
            // object's mapped, read-only relocation section.
            let bytes = unsafe { core::slice::from_raw_parts(addr as *const u8, size) };
            object::pod::slice_from_bytes::<elf::Rela64<LE>>(
                bytes,
                size / core::mem::size_of::<elf::Rela64<LE>>(),
            )
            .map(|(s, _)| s)
            .unwrap_or(&[])
        };
        let plt = if self.pltrel_is_rela || self.jmprel != 0 {
            table(self.jmprel, self.pltrelsz)
        } else {
            &[]
        };
        table(self.rela, self.relasz)
            .iter()
            .chain(plt.iter())
            .map(move |r| {
                let info = r.r_info.get(LE);
                Reloc {
                    slot: base + r.r_offset.get(LE) as usize,
                    r_type: (info & 0xffff_ffff) as u32,
                    sym: (info >> 32) as u32,
                    addend: r.r_addend.get(LE),
                }
            })
    }

    /// The version that symbol `index` (an undefined reference) requires,
    /// from `DT_VERSYM` and `DT_VERNEED` (`GLIBC_2.15` for
    /// `__atan2_finite@GLIBC_2.15`); `None` for an unversioned reference.
    ///
    /// # Safety
    /// As [`DynamicInfo::symbol`].
    pub unsafe fn symbol_version(&self, index: u32) -> Option<&'static CStr> {
        if self.versym == 0 || self.verneed == 0 || self.strtab == 0 {
            return None;
        }
        // SAFETY: DT_VERSYM has one u16 per dynamic symbol; `index` is valid.
        let want = unsafe { *(self.versym as *const u16).add(index as usize) } & 0x7fff;
        if want < 2 {
            return None; // local or global: no version required
        }
        let mut need = self.verneed;
        for _ in 0..self.verneednum {
            // SAFETY: DT_VERNEED is a chain of DT_VERNEEDNUM Elf64_Verneed,
            // each with vn_cnt Elf64_Vernaux, in mapped read-only memory.
            unsafe {
                let vn = &*(need as *const elf::Verneed<LE>);
                let mut aux = need + vn.vn_aux.get(LE) as usize;
                for _ in 0..vn.vn_cnt.get(LE) {
                    let a = &*(aux as *const elf::Vernaux<LE>);
                    if a.vna_other.get(LE) & 0x7fff == want {
                        let off = a.vna_name.get(LE) as usize;
                        return (off < self.strsz)
                            .then(|| CStr::from_ptr((self.strtab + off) as *const c_char));
                    }
                    aux += a.vna_next.get(LE) as usize;
                }
                need += vn.vn_next.get(LE) as usize;
            }
        }
        None
    }

    /// Dynamic symbol number `index`.
    ///
    /// # Safety
    /// `index` must be a valid index into this object's symbol table (for
    /// instance, taken from one of its relocations).
    pub unsafe fn symbol(&self, index: u32) -> Option<DynSym<'static>> {
        // SAFETY: the caller's guarantee, passed on.
        let name = unsafe { self.symbol_cname(index) }?.to_str().ok()?;
        // SAFETY: in range (the caller), and symtab is set (symbol_cname).
        let s = unsafe { &*(self.symtab as *const elf::Sym64<LE>).add(index as usize) };
        Some(DynSym {
            name,
            value: s.st_value.get(LE),
            size: s.st_size.get(LE),
            st_type: s.st_info & 0xf,
            shndx: s.st_shndx.get(LE),
        })
    }

    /// The name of dynamic symbol `index` as the string table holds it,
    /// NUL-terminated: for `dlsym`-style look-ups without a copy.
    ///
    /// # Safety
    /// As [`Self::symbol`].
    pub unsafe fn symbol_cname(&self, index: u32) -> Option<&'static CStr> {
        if self.symtab == 0 || self.strtab == 0 {
            return None;
        }
        // SAFETY: the caller guarantees the index is in range.
        let s = unsafe { &*(self.symtab as *const elf::Sym64<LE>).add(index as usize) };
        let off = s.st_name.get(LE) as usize;
        if off >= self.strsz {
            return None;
        }
        // SAFETY: st_name indexes the NUL-terminated string table, mapped
        // for the object's life.
        Some(unsafe { CStr::from_ptr((self.strtab + off) as *const c_char) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_round_to_pages() {
        let r = Range::new(0x1ff0, 0x3010);
        assert_eq!(r.pages_out(), Range::new(0x1000, 0x4000));
        assert_eq!(r.pages_in(), Range::new(0x2000, 0x3000));
        assert!(Range::new(0x1ff0, 0x2010).pages_in().is_empty());
    }

    #[test]
    fn classification() {
        assert_eq!(classify("main", true), ObjectKind::Main);
        assert_eq!(classify("libc.so.6", false), ObjectKind::System);
        assert_eq!(classify("ld-linux-x86-64.so.2", false), ObjectKind::Loader);
        assert_eq!(classify("linux-vdso.so.1", false), ObjectKind::Vdso);
        assert_eq!(classify("libstdc++.so.6", false), ObjectKind::System);
        assert_eq!(classify("libdav1d.so.6", false), ObjectKind::Application);
        assert_eq!(classify("libltdl.so.7", false), ObjectKind::System);
        assert_eq!(classify("libia2shim.so", false), ObjectKind::Shim);
    }

    #[test]
    fn census_of_the_test_binary() {
        let objs = census();
        assert_eq!(objs[0].kind, ObjectKind::Main);
        // The executable is named by its path, as readlink gives it; a
        // later seed does not change a known path.
        let exe = std::fs::read_link("/proc/self/exe").unwrap();
        assert_eq!(objs[0].name, exe.to_str().unwrap());
        seed_exe_path("/elsewhere");
        assert_eq!(exe_path(), exe.to_str());
        assert!(objs.iter().any(|o| o.kind == ObjectKind::Loader));
        let libc = objs
            .iter()
            .find(|o| o.basename == "libc.so.6")
            .expect("libc");
        assert_eq!(libc.kind, ObjectKind::System);
        assert!(libc.segments.iter().any(|s| s.writable()));
        assert!(libc.relro.is_some());
        assert!(libc.tls.is_some_and(|t| t.modid > 0));
        let d = libc.dynamic_info().unwrap();
        assert!(d.symtab > libc.base && d.strtab > libc.base);
        // libc has GLOB_DAT/JUMP_SLOT relocations, all slots inside libc.
        let mut n = 0;
        for r in d.relocations(libc.base) {
            assert!(libc.contains(r.slot), "{:#x}", r.slot);
            n += 1;
        }
        assert!(n > 10);
    }

    #[test]
    fn versions_of_undefined_references() {
        // The test binary's references into libc and libgcc_s name GLIBC_*
        // and GCC_* versions (what the lazy binder asks dlvsym for).
        let main = &census()[0];
        let d = main.dynamic_info().unwrap();
        let mut versioned = 0;
        for r in d.relocations(main.base).filter(|r| r.sym != 0) {
            // SAFETY: the symbol index comes from the object's relocation.
            let (sym, ver) = unsafe { (d.symbol(r.sym).unwrap(), d.symbol_version(r.sym)) };
            if sym.shndx != elf::SHN_UNDEF {
                continue;
            }
            if let Some(v) = ver {
                let v = v.to_str().unwrap();
                assert!(
                    v.starts_with("GLIBC_") || v.starts_with("GCC_"),
                    "{} {v}",
                    sym.name
                );
                versioned += 1;
            }
        }
        assert!(versioned > 5, "{versioned}");
    }
}
