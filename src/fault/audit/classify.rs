//! What a faulting address is (carveout, object section and symbol, page) and the fix that shares it.

use super::*;

// ---------------------------------------------------------------- classification

/// Where a faulting address lies.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(in crate::fault) enum Class {
    /// A page of a disabled carveout (index into `Census::carveouts`).
    Carveout(usize),
    /// Writable data of an object.
    Data(usize),
    Tls {
        object: usize,
        thread: usize,
    },
    /// Inside an object, but not tagged by the plan.
    Object(usize),
    /// A block of a compartment's heap (`IA2_HEAP=compartment`) and its
    /// allocation site id.
    Heap {
        heap: usize,
        site: u16,
    },
    /// No object: heap, `mmap`, a stack, the loader heap.
    Anonymous,
    /// The shim's state was busy.
    Unknown,
}

pub(in crate::fault) fn classify(c: Option<&Census>, addr: usize) -> Class {
    let Some(c) = c else { return Class::Unknown };
    let covers = |l: &crate::carveouts::Located| {
        l.carveout
            .ranges
            .iter()
            .any(|r: &Range| r.pages_out().contains(addr))
    };
    if let Some(i) = c.carveouts.iter().position(|l| !l.enabled && covers(l)) {
        return Class::Carveout(i);
    }
    match c.plan.lookup(addr).map(|e| &e.reason) {
        Some(Reason::Data { object }) => Class::Data(*object),
        Some(Reason::Tls { object, thread }) => Class::Tls {
            object: *object,
            thread: *thread,
        },
        _ => match c.object_at(addr) {
            Some((i, _)) => Class::Object(i),
            None => match crate::alloc::heap_fault(addr) {
                Some(h) => Class::Heap {
                    heap: h.heap,
                    site: h.block.map_or(0, |b| b.site),
                },
                None => Class::Anonymous,
            },
        },
    }
}

/// A recorded site's class: as [`classify`], except that compartment-heap
/// memory is classified by the block seen at its first fault.
pub(in crate::fault) fn classify_site(c: Option<&Census>, s: &Site) -> Class {
    let hs = s.heap_site.load(Relaxed);
    if hs != 0 {
        return Class::Heap {
            heap: (hs >> 16) as usize,
            site: hs as u16,
        };
    }
    classify(c, s.addr.load(Relaxed))
}

impl Class {
    pub(in crate::fault) fn kind(self) -> &'static str {
        match self {
            Class::Carveout(_) => "carveout",
            Class::Data(_) => "data",
            Class::Tls { .. } => "tls",
            Class::Object(_) => "object",
            Class::Heap { .. } => "heap",
            Class::Anonymous => "anonymous",
            Class::Unknown => "unknown",
        }
    }

    pub(in crate::fault) fn code(self) -> usize {
        match self {
            Class::Carveout(_) => 1,
            Class::Data(_) => 2,
            Class::Tls { .. } => 3,
            Class::Object(_) => 4,
            Class::Anonymous => 5,
            Class::Unknown => 6,
            Class::Heap { .. } => 7,
        }
    }

    pub(in crate::fault) fn object(self) -> Option<usize> {
        match self {
            Class::Data(o) | Class::Object(o) | Class::Tls { object: o, .. } => Some(o),
            _ => None,
        }
    }

    /// The owning object's name, and what part of it (or of memory) this is.
    pub(in crate::fault) fn describe(self, c: Option<&Census>) -> (&str, Section) {
        let name = |o: usize| {
            c.and_then(|c| c.objects.get(o))
                .map_or("?", |o| o.display_name())
        };
        match self {
            Class::Carveout(i) => (
                "",
                Section::Carveout(
                    c.and_then(|c| c.carveouts.get(i))
                        .map_or("?", |l| l.carveout.name),
                ),
            ),
            Class::Data(o) => (name(o), Section::Data),
            Class::Tls { object, thread } => {
                let modid = c
                    .and_then(|c| c.objects.get(object))
                    .and_then(|o| o.tls)
                    .map_or(0, |t| t.modid);
                (name(object), Section::Tls { modid, thread })
            }
            Class::Object(o) => (name(o), Section::Untagged),
            Class::Heap { heap, .. } => ("", Section::Heap(heap)),
            Class::Anonymous => ("", Section::Anonymous),
            Class::Unknown => ("", Section::Unknown),
        }
    }
}

#[derive(Clone, Copy)]
pub(in crate::fault) enum Section {
    Carveout(&'static str),
    Data,
    Tls { modid: usize, thread: usize },
    Untagged,
    Heap(usize),
    Anonymous,
    Unknown,
}

impl fmt::Display for Section {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Section::Carveout(n) => write!(f, "carveout {n}"),
            Section::Data => f.write_str(".data/.bss"),
            Section::Tls { modid, thread } => write!(f, "TLS of module {modid} in thread {thread}"),
            Section::Untagged => f.write_str("not tagged by the plan"),
            Section::Heap(h) => write!(f, "compartment {h}'s heap (IA2_HEAP=compartment)"),
            Section::Anonymous => {
                f.write_str("anonymous memory (heap, mmap, stack or loader heap)")
            }
            Section::Unknown => f.write_str("unknown (shim state busy)"),
        }
    }
}

/// A symbol from `dladdr1`: only when `addr` lies inside it.
pub(in crate::fault) struct SymInfo {
    pub(in crate::fault) name: &'static str,
    pub(in crate::fault) addr: usize,
    pub(in crate::fault) size: usize,
    /// The defining object's path.
    pub(in crate::fault) object: &'static str,
    /// The defining object's load base (`dli_fbase`).
    pub(in crate::fault) fbase: usize,
}

impl SymInfo {
    /// The object's name in policy terms (`main` for the executable).
    pub(in crate::fault) fn object_base(&self) -> &'static str {
        crate::fault::term_name(self.object, self.fbase)
    }
}

pub(in crate::fault) const RTLD_DL_SYMENT: c_int = 1;

pub(in crate::fault) fn sym_info(addr: usize) -> Option<SymInfo> {
    // SAFETY: zeroed Dl_info is valid for dladdr1 to fill.
    let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
    let mut sym: *mut c_void = core::ptr::null_mut();
    // SAFETY: dladdr1 only reads loader data and fills the out pointers.
    if unsafe { libc::dladdr1(addr as *const c_void, &mut info, &mut sym, RTLD_DL_SYMENT) } == 0
        || info.dli_sname.is_null()
    {
        return None;
    }
    let cstr = |p: *const libc::c_char| {
        if p.is_null() {
            ""
        } else {
            // SAFETY: NUL-terminated strings owned by the loader.
            unsafe { CStr::from_ptr(p) }.to_str().unwrap_or("?")
        }
    };
    let size = if sym.is_null() {
        0
    } else {
        // SAFETY: RTLD_DL_SYMENT yields the ElfW(Sym); st_size is at offset 16.
        unsafe { core::ptr::read_unaligned((sym as *const u8).add(16) as *const u64) as usize }
    };
    let name = cstr(info.dli_sname);
    (!name.is_empty()).then(|| SymInfo {
        name,
        addr: info.dli_saddr as usize,
        size,
        object: cstr(info.dli_fname),
        fbase: info.dli_fbase as usize,
    })
}

/// The pages an `obj:symbol` entry shares.
pub(in crate::fault) fn symbol_pages(s: &SymInfo) -> Range {
    Range::new(s.addr, s.addr + s.size.max(1)).pages_out()
}

/// The fix for one site: a toggle, or an `IA2_SHARE` entry.
pub(in crate::fault) enum Fix {
    Toggle(&'static str),
    Symbol(SymInfo),
    /// A page inside an object with no covering symbol: `object+0xOFFSET`.
    Offset(crate::fault::ObjectPage),
    /// A page outside every object (heap, mmap, stack): no term survives a
    /// new run, so it is listed but never put in a policy.
    Page(usize),
    /// An allocation site (its id) to put on the shared heap.
    Heap(u16),
}

impl Fix {
    pub(in crate::fault) fn for_site(c: Option<&Census>, class: Class, addr: usize) -> Fix {
        if let Class::Carveout(i) = class {
            if let Some(l) = c.and_then(|c| c.carveouts.get(i)) {
                return Fix::Toggle(l.carveout.toggle);
            }
        }
        if let Class::Heap { site, .. } = class {
            if crate::alloc::sites::get(site).is_some() {
                return Fix::Heap(site);
            }
        }
        match (sym_info(addr), crate::fault::object_page(addr)) {
            (Some(s), _) => Fix::Symbol(s),
            (None, Some(o)) => Fix::Offset(o),
            (None, None) => Fix::Page(page_down(addr)),
        }
    }

    /// The group key part that this fix contributes: (kind, id).
    pub(in crate::fault) fn id(&self) -> (usize, usize) {
        match self {
            Fix::Toggle(_) => (0, 0),
            Fix::Symbol(s) => (1, s.addr),
            Fix::Offset(o) => (2, o.page),
            Fix::Page(p) => (2, *p),
            Fix::Heap(s) => (3, *s as usize),
        }
    }

    /// The pages it shares (carveouts: empty; see `covers`).
    pub(in crate::fault) fn pages(&self) -> Range {
        match self {
            Fix::Toggle(_) | Fix::Heap(_) => Range::new(0, 0),
            Fix::Symbol(s) => symbol_pages(s),
            Fix::Offset(o) => Range::new(o.page, o.page + PAGE),
            Fix::Page(p) => Range::new(*p, *p + PAGE),
        }
    }

    /// As an environment assignment or an `IA2_SHARE` entry.
    pub(in crate::fault) fn entry(&self) -> Entry<'_> {
        Entry(self)
    }
}

pub(in crate::fault) struct Entry<'a>(pub(in crate::fault) &'a Fix);

impl fmt::Display for Entry<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Fix::Toggle(t) => write!(f, "{t}=1"),
            Fix::Symbol(s) => write!(f, "{}:{}", s.object_base(), s.name),
            Fix::Offset(o) => write!(f, "{o}"),
            Fix::Page(p) => write!(f, "{p:#x}+{PAGE}"),
            Fix::Heap(id) => write_heap_term(f, *id),
        }
    }
}

/// Allocation site `id` as an `IA2_HEAP_SHARED` term.
pub(in crate::fault) fn write_heap_term<W: Write>(f: &mut W, id: u16) -> fmt::Result {
    let Some(s) = crate::alloc::sites::get(id) else {
        return write!(f, "?");
    };
    let census = runtime::get().and_then(|r| r.census.try_read().ok());
    let t = crate::alloc::sites::Term {
        ra: s.ra.load(Relaxed),
        gate: s.gate.load(Relaxed),
        objects: census.as_deref().map(|c| c.objects.as_slice()),
    };
    write!(f, "{t}")
}
