//! The gate table: entries, the registry of gates and data imports, and its write protection.

use super::*;

// ---------------------------------------------------------------- the table

/// Why a gate exists.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Via {
    JumpSlot,
    GlobDat,
    /// `DT_FINI_ARRAY[index]`.
    FiniArray(usize),
    Fini,
}

impl core::fmt::Display for Via {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            Via::JumpSlot => write!(f, "JUMP_SLOT"),
            Via::GlobDat => write!(f, "GLOB_DAT"),
            Via::FiniArray(i) => write!(f, "DT_FINI_ARRAY[{i}]"),
            Via::Fini => write!(f, "DT_FINI"),
        }
    }
}

/// One patched slot: a caller object's way into a gate.
#[derive(Clone, Debug)]
pub struct Patch {
    pub gate: usize,
    /// The importing object (for fini entries: the object itself, called by ld.so).
    pub caller: String,
    pub caller_compartment: Option<u8>,
    pub slot: usize,
    pub via: Via,
}

/// One gate (one stub).
#[derive(Clone, Debug)]
pub struct Gate {
    pub index: usize,
    pub target: usize,
    pub compartment: u8,
    pub symbol: String,
    pub callee: String,
    pub variant: Variant,
    /// The gate's object was unloaded by `dlclose`.
    pub dead: bool,
}

/// A `GLOB_DAT` import of data owned by another compartment.
#[derive(Clone, Debug)]
pub struct DataImport {
    pub importer: String,
    pub importer_compartment: u8,
    pub symbol: String,
    pub owner: String,
    pub owner_compartment: u8,
    pub address: usize,
    /// The compartment key that tags the page holding it (`None`: the page
    /// is shared, e.g. by a carveout or because it is read-only).
    pub page_compartment: Option<u8>,
}

/// WRPKRU/XRSTOR byte sequences found in compartment code.
#[derive(Clone, Debug)]
pub struct ScanHit {
    pub object: String,
    pub offset: usize,
    pub what: &'static str,
}

#[derive(Default)]
pub(super) struct State {
    pub(super) enabled: bool,
    pub(super) installed: bool,
    pub(super) gates: Vec<Gate>,
    pub(super) by_target: BTreeMap<(usize, u8), usize>,
    pub(super) patches: Vec<Patch>,
    pub(super) data_imports: Vec<DataImport>,
    pub(super) scan_hits: Vec<ScanHit>,
    /// The mechanisms `IA2_GATES` turned on.
    pub(super) got: bool,
    pub(super) entry: bool,
    pub(super) entries: Vec<EntryGate>,
    /// Function address → index in `entries`.
    pub(super) entry_by_function: BTreeMap<usize, usize>,
    /// Record address → index in `entries`.
    pub(super) entry_by_record: BTreeMap<usize, usize>,
    pub(super) entry_slots: Vec<EntrySlot>,
    pub(super) refusals: Vec<Refusal>,
    pub(super) weak_skipped: usize,
    pub(super) arenas: Vec<Arena>,
    /// `/proc/self/mem` for the text writes of one pass over the objects
    /// (start-up, a `dlopen`, a fault-driven gate), closed at its end.
    pub(super) text_writer: Option<super::entry::TextWriter>,
}

pub(super) static STATE: Mutex<State> = Mutex::new(State {
    enabled: false,
    installed: false,
    gates: Vec::new(),
    by_target: BTreeMap::new(),
    patches: Vec::new(),
    data_imports: Vec::new(),
    scan_hits: Vec::new(),
    got: false,
    entry: false,
    entries: Vec::new(),
    entry_by_function: BTreeMap::new(),
    entry_by_record: BTreeMap::new(),
    entry_slots: Vec::new(),
    refusals: Vec::new(),
    weak_skipped: 0,
    arenas: Vec::new(),
    text_writer: None,
});

pub(super) fn state() -> std::sync::MutexGuard<'static, State> {
    STATE.lock().unwrap_or_else(|e| e.into_inner())
}

pub(super) static TABLE_READ_ONLY: AtomicBool = AtomicBool::new(false);

pub(super) fn protect_table(writable: bool) {
    let prot = if writable {
        libc::PROT_READ | libc::PROT_WRITE
    } else {
        libc::PROT_READ
    };
    // SAFETY: the table is a page-aligned, page-multiple part of the shim's
    // .bss that only this module uses; read-only protection is what the
    // gate code needs.
    let r = unsafe { libc::mprotect(GATE_MEM.table.get().cast(), TABLE_BYTES, prot) };
    if r != 0 {
        crate::lifecycle::fatal(format_args!(
            "mprotect of the gate table failed (errno {})",
            crate::stackfmt::errno()
        ));
    }
    TABLE_READ_ONLY.store(!writable, Ordering::Release);
}

/// Write table entry `i`. Holds `STATE`'s lock (the caller's guard).
pub(super) fn write_entry(_st: &mut State, i: usize, e: Entry) {
    patch_tls();
    let ro = TABLE_READ_ONLY.load(Ordering::Acquire);
    if ro {
        protect_table(true);
    }
    // SAFETY: i < MAX_GATES; the table is writable now and the lock
    // serialises writers; the gate code reads only entries already handed out.
    // Hardened, the table carries the shim key: only this write opens it.
    pku::with_shim_writes(|| unsafe { (*GATE_MEM.table.get())[i] = e });
    if ro {
        protect_table(false);
    }
}

/// The gate for (`target`, `compartment`), made on first request. Returns
/// its stub's index.
pub(super) fn gate_for(
    st: &mut State,
    rt: &Runtime,
    target: usize,
    compartment: u8,
    symbol: &str,
    callee: &str,
    variant: Variant,
) -> usize {
    // Union gates are keyed apart from plain gates into the same compartment.
    let key = (
        target,
        if variant.is_union() {
            compartment | 0x80
        } else {
            compartment
        },
    );
    if let Some(&i) = st.by_target.get(&key) {
        return i;
    }
    let i = st.gates.len();
    if i >= MAX_GATES {
        crate::lifecycle::fatal(format_args!(
            "more than {MAX_GATES} cross-compartment call targets: the gate pool is full \
             (gating {symbol} in {callee}); set IA2_GATES=0 or merge compartments"
        ));
    }
    write_entry(
        st,
        i,
        Entry {
            target,
            code: variant.code(),
            // A union gate ANDs this mask into the caller's PKRU: clear the
            // AD and WD bits of the callee compartment's key.
            pkru: if variant.is_union() {
                !(3u32 << (2 * rt.key_of(compartment)))
            } else {
                rt.pkru_for(compartment)
            },
            compartment: compartment as u32,
            _reserved: 0,
        },
    );
    st.gates.push(Gate {
        index: i,
        target,
        compartment,
        symbol: symbol.to_string(),
        callee: callee.to_string(),
        variant,
        dead: false,
    });
    st.by_target.insert(key, i);
    i
}

/// Calls made through gate `i` so far (0 for the non-counting variant).
pub fn calls(i: usize) -> u64 {
    GATE_MEM
        .counts
        .get(i)
        .map_or(0, |c| c[0].load(Ordering::Relaxed))
}
