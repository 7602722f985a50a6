//! Every `IA2_*` variable: one struct ([`Config`]) and one table ([`VARS`]).
//!
//! The constructor reads `environ` once, before anything else, and must not
//! allocate (the malloc family may be the shim's own). Values are therefore
//! kept as `&'static str` slices of the initial environment block, which the
//! process never frees, and errors carry static data only.

use core::fmt;

/// Highest logical compartment number (16 hardware keys, key 0 is shared).
pub const MAX_COMPARTMENT: u8 = 15;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PkuMode {
    Require,
    Sim,
    Off,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LibcGates {
    None,
    Union,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HeapMode {
    Libc,
    Shared,
    Compartment,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OnFault {
    Report,
    Audit,
    Silent,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReportFormat {
    Text,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScanWrpkru {
    Warn,
    Off,
    Deny,
}

/// What `IA2_REPORT` asks for.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reports {
    pub plan: bool,
    pub maps: bool,
    pub gates: bool,
}

/// `IA2_COMPARTMENTS`: `None` is auto; otherwise a validated spec.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CompartmentSpec(&'static str);

impl CompartmentSpec {
    /// `(compartment, pattern)` pairs in the order written.
    pub fn rules(&self) -> impl Iterator<Item = (u8, &'static str)> {
        self.0
            .split(';')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .flat_map(|entry| {
                let (n, pats) = entry.split_once('=').unwrap_or(("0", ""));
                let n: u8 = n.trim().parse().unwrap_or(0);
                pats.split(',').map(move |p| (n, p.trim()))
            })
    }

    pub fn as_str(&self) -> &'static str {
        self.0
    }
}

/// `IA2_SHARE`: a validated comma-separated list of extra shared ranges.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ShareList(&'static str);

/// One `IA2_SHARE` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShareEntry {
    /// `object:symbol` (object is a basename glob).
    ObjectSymbol(&'static str, &'static str),
    /// `symbol`, looked up in every loaded object.
    Symbol(&'static str),
    /// `0xADDR+LEN`.
    Range(usize, usize),
}

impl ShareList {
    pub fn entries(&self) -> impl Iterator<Item = ShareEntry> {
        self.0
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .filter_map(|e| parse_share_entry(e).ok())
    }

    pub fn is_empty(&self) -> bool {
        self.entries().next().is_none()
    }
}

/// The whole configuration. Built once by [`Config::from_environ`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    pub pku: PkuMode,
    pub compartments: Option<CompartmentSpec>,
    pub libc_compartment: Option<u8>,
    pub libc_gates: LibcGates,
    pub share_tcb: bool,
    pub share_rseq: bool,
    pub share_below_tcb: bool,
    pub share_dtv: bool,
    pub share_tls_generation: bool,
    pub share_libc_tuning: bool,
    pub share_loader_heap: bool,
    pub share_copy_relocs: bool,
    pub share_libc_single_threaded: bool,
    pub share_pthread_once: bool,
    pub share_mutex_elision: bool,
    pub share: ShareList,
    pub tls_get_addr_gate: bool,
    /// `IA2_TLS_LAYOUT`: whether `ia2run` arranges pad objects (auto) or
    /// leaves the loader's packing (off). Read by `ia2run` from the
    /// command's environment; the shim accepts it and reports it.
    pub tls_layout: bool,
    /// `IA2_TLS_PRELOAD`: set by `ia2run`'s TLS layout to the `LD_PRELOAD`
    /// it replaced, which the shim puts back for the programs this one runs.
    pub tls_preload: Option<&'static str>,
    pub gates: bool,
    /// `None`: not set, so the mode's default applies (see [`Config::heap`]).
    pub heap_explicit: Option<HeapMode>,
    pub on_fault: OnFault,
    pub reports: Reports,
    pub report_format: ReportFormat,
    pub report_file: Option<&'static str>,
    pub scan_wrpkru: ScanWrpkru,
    pub log_level: log::LevelFilter,
    pub log_file: Option<&'static str>,
    pub help: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            pku: PkuMode::Require,
            compartments: None,
            libc_compartment: None,
            libc_gates: LibcGates::None,
            share_tcb: true,
            share_rseq: true,
            share_below_tcb: true,
            share_dtv: true,
            share_tls_generation: true,
            share_libc_tuning: true,
            share_loader_heap: false,
            share_copy_relocs: true,
            share_libc_single_threaded: true,
            share_pthread_once: true,
            share_mutex_elision: true,
            share: ShareList(""),
            tls_get_addr_gate: false,
            tls_layout: true,
            tls_preload: None,
            gates: true,
            heap_explicit: None,
            on_fault: OnFault::Report,
            reports: Reports::default(),
            report_format: ReportFormat::Text,
            report_file: None,
            scan_wrpkru: ScanWrpkru::Warn,
            log_level: log::LevelFilter::Warn,
            log_file: None,
            help: false,
        }
    }
}

impl Config {
    /// Who serves the malloc family: `IA2_HEAP`, else `shared` in strict mode, else `libc`.
    pub fn heap(&self) -> HeapMode {
        self.heap_explicit
            .unwrap_or(if self.libc_compartment.is_some() {
                HeapMode::Shared
            } else {
                HeapMode::Libc
            })
    }

    /// Parse a sequence of `NAME=VALUE` strings (normally the environment).
    /// Variables outside the `IA2_` namespace are ignored; an unknown `IA2_`
    /// name is an error, because a mistyped toggle must not be silently ignored.
    pub fn from_vars<I>(vars: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = &'static str>,
    {
        let mut cfg = Config::default();
        for var in vars {
            let Some((name, value)) = var.split_once('=') else {
                continue;
            };
            if !name.starts_with("IA2_") {
                continue;
            }
            let Some(spec) = VARS.iter().find(|v| v.name == name) else {
                return Err(ConfigError {
                    var: name,
                    value,
                    accepted: "one of the variables listed by IA2_HELP=1",
                    problem: Problem::UnknownVariable,
                });
            };
            (spec.parse)(&mut cfg, value).map_err(|problem| ConfigError {
                var: spec.name,
                value,
                accepted: if problem == Problem::NotImplemented {
                    spec.default
                } else {
                    spec.values
                },
                problem,
            })?;
            if !spec.implemented && value != spec.default {
                return Err(ConfigError {
                    var: spec.name,
                    value,
                    accepted: spec.default,
                    problem: Problem::NotImplemented,
                });
            }
        }
        cfg.check_combinations()?;
        Ok(cfg)
    }

    /// Read the process environment. Allocation-free.
    pub fn from_environ() -> Result<Config, ConfigError> {
        Config::from_vars(environ_iter())
    }

    fn check_combinations(&self) -> Result<(), ConfigError> {
        // IA2's libc-compartment mode shares N with an application
        // compartment (dav1d: N = 1 = the executable's), so no combination
        // of IA2_LIBC_COMPARTMENT and IA2_COMPARTMENTS is refused.
        Ok(())
    }
}

/// Iterate the process environment as `&'static str` without allocating.
/// Entries that are not UTF-8 are skipped (no `IA2_` value needs them).
pub fn environ_iter() -> impl Iterator<Item = &'static str> {
    extern "C" {
        static environ: *const *const libc::c_char;
    }
    // SAFETY: reading the `environ` pointer; the constructor runs before any
    // thread exists, so nothing modifies it concurrently.
    let mut p = unsafe { environ };
    core::iter::from_fn(move || loop {
        if p.is_null() {
            return None;
        }
        // SAFETY: `environ` is a NULL-terminated array of C strings.
        let entry = unsafe { *p };
        if entry.is_null() {
            return None;
        }
        // SAFETY: still inside the array (we stop at the NULL terminator).
        p = unsafe { p.add(1) };
        // SAFETY: each entry is a NUL-terminated string in the initial
        // environment block, which lives until the process exits.
        let cstr = unsafe { core::ffi::CStr::from_ptr(entry) };
        if let Ok(s) = cstr.to_str() {
            return Some(s);
        }
    })
}

/// Why a value was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Problem {
    BadValue,
    UnknownVariable,
    NotImplemented,
    CompartmentOutOfRange,
    DuplicateCompartment,
    EmptyPattern,
    MissingEquals,
    BadShareEntry,
}

/// A refused variable. `Display` gives the one-line fatal message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub var: &'static str,
    pub value: &'static str,
    pub accepted: &'static str,
    pub problem: Problem,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let why = match self.problem {
            Problem::BadValue => "invalid value",
            Problem::UnknownVariable => "unknown variable",
            Problem::NotImplemented => {
                "this feature is not yet implemented; only the default is accepted"
            }
            Problem::CompartmentOutOfRange => "compartment number out of range (1-15)",
            Problem::DuplicateCompartment => "the same compartment number appears twice",
            Problem::EmptyPattern => "empty object pattern",
            Problem::MissingEquals => "entry lacks N=pattern form",
            Problem::BadShareEntry => "invalid entry",
        };
        write!(
            f,
            "{}={:?}: {}; accepted: {}",
            self.var, self.value, why, self.accepted
        )
    }
}

/// One row of the variable table.
pub struct VarSpec {
    pub name: &'static str,
    /// Accepted values, default first.
    pub values: &'static str,
    pub default: &'static str,
    pub meaning: &'static str,
    /// `false`: only the default is accepted until the feature exists.
    pub implemented: bool,
    parse: fn(&mut Config, &'static str) -> Result<(), Problem>,
}

fn parse_bool(v: &str) -> Result<bool, Problem> {
    match v {
        "1" => Ok(true),
        "0" => Ok(false),
        _ => Err(Problem::BadValue),
    }
}

fn parse_compartment_number(v: &str) -> Result<u8, Problem> {
    let v = v.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return Err(Problem::BadValue);
    }
    match v.parse::<u32>() {
        Ok(n) if (1..=MAX_COMPARTMENT as u32).contains(&n) => Ok(n as u8),
        _ => Err(Problem::CompartmentOutOfRange),
    }
}

/// Validate `N=glob[,glob];…`.
pub fn parse_compartments(v: &'static str) -> Result<Option<CompartmentSpec>, Problem> {
    if v.trim() == "auto" {
        return Ok(None);
    }
    let mut seen = 0u32;
    let mut any = false;
    for entry in v.split(';').map(str::trim).filter(|e| !e.is_empty()) {
        let (n, pats) = entry.split_once('=').ok_or(Problem::MissingEquals)?;
        let n = parse_compartment_number(n)?;
        if seen & (1 << n) != 0 {
            return Err(Problem::DuplicateCompartment);
        }
        seen |= 1 << n;
        for p in pats.split(',') {
            if p.trim().is_empty() {
                return Err(Problem::EmptyPattern);
            }
        }
        any = true;
    }
    if !any {
        return Err(Problem::EmptyPattern);
    }
    Ok(Some(CompartmentSpec(v)))
}

fn parse_number(s: &str) -> Option<usize> {
    let s = s.trim();
    if let Some(hex) = s.strip_prefix("0x").or_else(|| s.strip_prefix("0X")) {
        usize::from_str_radix(hex, 16).ok()
    } else {
        s.parse().ok()
    }
}

/// Parse one `IA2_SHARE` entry: `obj:symbol`, `symbol` or `0xADDR+LEN`.
pub fn parse_share_entry(e: &'static str) -> Result<ShareEntry, Problem> {
    if e.starts_with("0x") || e.starts_with("0X") {
        let (a, l) = e.split_once('+').ok_or(Problem::BadShareEntry)?;
        let addr = parse_number(a).ok_or(Problem::BadShareEntry)?;
        let len = parse_number(l).ok_or(Problem::BadShareEntry)?;
        if len == 0 || addr.checked_add(len).is_none() {
            return Err(Problem::BadShareEntry);
        }
        return Ok(ShareEntry::Range(addr, len));
    }
    let valid_sym = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'@')
    };
    match e.split_once(':') {
        Some((obj, sym)) if !obj.trim().is_empty() && valid_sym(sym) => {
            Ok(ShareEntry::ObjectSymbol(obj.trim(), sym))
        }
        Some(_) => Err(Problem::BadShareEntry),
        None if valid_sym(e) => Ok(ShareEntry::Symbol(e)),
        None => Err(Problem::BadShareEntry),
    }
}

fn parse_share(v: &'static str) -> Result<ShareList, Problem> {
    for e in v.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        parse_share_entry(e)?;
    }
    Ok(ShareList(v))
}

fn parse_reports(v: &str) -> Result<Reports, Problem> {
    let mut r = Reports::default();
    for item in v.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        match item {
            "plan" => r.plan = true,
            "maps" => r.maps = true,
            "gates" => r.gates = true,
            _ => return Err(Problem::BadValue),
        }
    }
    Ok(r)
}

fn parse_level(v: &str) -> Result<log::LevelFilter, Problem> {
    Ok(match v {
        "off" => log::LevelFilter::Off,
        "error" => log::LevelFilter::Error,
        "warn" => log::LevelFilter::Warn,
        "info" => log::LevelFilter::Info,
        "debug" => log::LevelFilter::Debug,
        "trace" => log::LevelFilter::Trace,
        _ => return Err(Problem::BadValue),
    })
}

fn non_empty(v: &'static str) -> Result<&'static str, Problem> {
    if v.is_empty() {
        Err(Problem::BadValue)
    } else {
        Ok(v)
    }
}

/// Every `IA2_*` variable. `IA2_HELP=1` prints this table; the README's
/// table is checked against it by a test.
pub static VARS: &[VarSpec] = &[
    VarSpec {
        name: "IA2_PKU",
        values: "require, sim, off",
        default: "require",
        meaning: "without PKU: abort (require), simulate keys without enforcing (sim), or do nothing (off)",
        implemented: true,
        parse: |c, v| {
            c.pku = match v {
                "require" => PkuMode::Require,
                "sim" => PkuMode::Sim,
                "off" => PkuMode::Off,
                _ => return Err(Problem::BadValue),
            };
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_COMPARTMENTS",
        values: "auto, N=glob[,glob];... (N in 1-15, 'main' is the executable)",
        default: "auto",
        meaning: "which objects form which compartment; auto: executable=1, each other application object the next number",
        implemented: true,
        parse: |c, v| {
            c.compartments = parse_compartments(v)?;
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_LIBC_COMPARTMENT",
        values: "off, N (1-15)",
        default: "off",
        meaning: "strict mode: ld.so, libc, other system objects and the loader heap join compartment N",
        implemented: true,
        parse: |c, v| {
            c.libc_compartment = match v {
                "off" => None,
                n => Some(parse_compartment_number(n)?),
            };
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_LIBC_GATES",
        values: "none, union",
        default: "none",
        meaning: "strict mode: calls into system code run with the caller's rights (none) or the caller's plus N's (union)",
        implemented: true,
        parse: |c, v| {
            c.libc_gates = match v {
                "none" => LibcGates::None,
                "union" => LibcGates::Union,
                _ => return Err(Problem::BadValue),
            };
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_SHARE_TCB",
        values: "1, 0",
        default: "1",
        meaning: "carveout tcb: keep the thread pointer's page (stack guard %fs:0x28, DTV pointer) on pkey 0",
        implemented: true,
        parse: |c, v| {
            c.share_tcb = parse_bool(v)?;
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_SHARE_RSEQ",
        values: "1, 0",
        default: "1",
        meaning: "carveout rseq: keep each thread's rseq area (in glibc's struct pthread, written by the kernel on preemption) on pkey 0",
        implemented: true,
        parse: |c, v| {
            c.share_rseq = parse_bool(v)?;
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_SHARE_BELOW_TCB",
        values: "1, 0",
        default: "1",
        meaning: "carveout below_tcb: keep the page below the TCB (static TLS tail, unwinder state at %fs:-0x20) on pkey 0",
        implemented: true,
        parse: |c, v| {
            c.share_below_tcb = parse_bool(v)?;
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_SHARE_DTV",
        values: "1, 0",
        default: "1",
        meaning: "carveout dtv: keep each thread's DTV pages on pkey 0",
        implemented: true,
        parse: |c, v| {
            c.share_dtv = parse_bool(v)?;
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_SHARE_TLS_GENERATION",
        values: "1, 0",
        default: "1",
        meaning: "carveout tls_generation: keep ld.so's page holding _dl_tls_generation on pkey 0",
        implemented: true,
        parse: |c, v| {
            c.share_tls_generation = parse_bool(v)?;
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_SHARE_LIBC_TUNING",
        values: "1, 0",
        default: "1",
        meaning: "carveout libc_tuning: keep libc's string-function threshold pages on pkey 0",
        implemented: true,
        parse: |c, v| {
            c.share_libc_tuning = parse_bool(v)?;
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_SHARE_COPY_RELOCS",
        values: "1, 0",
        default: "1",
        meaning: "carveout copy_relocs: keep the executable's copies of shared objects' data (R_X86_64_COPY: stdout, stderr, environ, ...) on pkey 0",
        implemented: true,
        parse: |c, v| {
            c.share_copy_relocs = parse_bool(v)?;
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_SHARE_LIBC_SINGLE_THREADED",
        values: "1, 0",
        default: "1",
        meaning: "carveout libc_single_threaded: keep libc's page holding __libc_single_threaded (read by wait4, stdio, ... in every compartment) on pkey 0",
        implemented: true,
        parse: |c, v| {
            c.share_libc_single_threaded = parse_bool(v)?;
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_SHARE_PTHREAD_ONCE",
        values: "1, 0",
        default: "1",
        meaning: "carveout pthread_once: keep libc's page holding __fork_generation (read by pthread_once) on pkey 0",
        implemented: true,
        parse: |c, v| {
            c.share_pthread_once = parse_bool(v)?;
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_SHARE_MUTEX_ELISION",
        values: "1, 0",
        default: "1",
        meaning: "carveout mutex_elision: keep libc's lock-elision tunables (read by pthread_mutex_lock/unlock) on pkey 0",
        implemented: true,
        parse: |c, v| {
            c.share_mutex_elision = parse_bool(v)?;
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_SHARE_LOADER_HEAP",
        values: "0, 1",
        default: "0",
        meaning: "broad carveout loader_heap: keep every loader-heap mapping on pkey 0 (for comparison)",
        implemented: true,
        parse: |c, v| {
            c.share_loader_heap = parse_bool(v)?;
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_SHARE",
        values: "empty, obj:symbol / symbol / 0xADDR+LEN, comma-separated",
        default: "",
        meaning: "extra pages to keep on pkey 0",
        implemented: true,
        parse: |c, v| {
            c.share = parse_share(v)?;
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_TLS_GET_ADDR_GATE",
        values: "0, 1",
        default: "0",
        meaning: "gate __tls_get_addr (adds the loader's key during the call) instead of sharing the DTV and generation counter",
        implemented: true,
        parse: |c, v| {
            c.tls_get_addr_gate = parse_bool(v)?;
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_TLS_LAYOUT",
        values: "auto, off",
        default: "auto",
        meaning: "static TLS layout: ia2run preloads pad objects so that each compartment's TLS blocks get pages of their own (auto), or leaves the loader's packing, where small blocks share pages (off)",
        implemented: true,
        parse: |c, v| {
            c.tls_layout = match v {
                "auto" => true,
                "off" => false,
                _ => return Err(Problem::BadValue),
            };
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_TLS_PRELOAD",
        values: "unset, an LD_PRELOAD value",
        default: "",
        meaning: "set by ia2run's TLS layout: the LD_PRELOAD it extended with the link map and pads; the shim puts it back so that programs this one executes do not inherit them",
        implemented: true,
        parse: |c, v| {
            c.tls_preload = (!v.is_empty()).then_some(v);
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_GATES",
        values: "1, 0",
        default: "1",
        meaning: "switch PKRU through call gates on cross-compartment calls",
        implemented: true,
        parse: |c, v| {
            c.gates = parse_bool(v)?;
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_HEAP",
        values: "libc (shared in strict mode), shared, compartment",
        default: "libc",
        meaning: "who serves the malloc family: glibc, the shim's shared heap (pkey 0), or each compartment's own heap (by caller address)",
        implemented: true,
        parse: |c, v| {
            c.heap_explicit = Some(match v {
                "libc" => HeapMode::Libc,
                "shared" => HeapMode::Shared,
                "compartment" => HeapMode::Compartment,
                _ => return Err(Problem::BadValue),
            });
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_ON_FAULT",
        values: "report, audit, silent",
        default: "report",
        meaning: "on SEGV_PKUERR: print a report and die (report), log and continue (audit), or just die (silent)",
        implemented: true,
        parse: |c, v| {
            c.on_fault = match v {
                "report" => OnFault::Report,
                "audit" => OnFault::Audit,
                "silent" => OnFault::Silent,
                _ => return Err(Problem::BadValue),
            };
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_REPORT",
        values: "empty, any of plan, maps, gates (comma-separated)",
        default: "",
        meaning: "what to print at start-up (plan, maps) and exit (gates)",
        implemented: true,
        parse: |c, v| {
            c.reports = parse_reports(v)?;
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_REPORT_FORMAT",
        values: "text, json",
        default: "text",
        meaning: "format of reports and summaries (json: one object per line)",
        implemented: true,
        parse: |c, v| {
            c.report_format = match v {
                "text" => ReportFormat::Text,
                "json" => ReportFormat::Json,
                _ => return Err(Problem::BadValue),
            };
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_REPORT_FILE",
        values: "stderr, a path (%p expands to the pid)",
        default: "stderr",
        meaning: "where reports go",
        implemented: true,
        parse: |c, v| {
            c.report_file = match v {
                "stderr" => None,
                p => Some(non_empty(p)?),
            };
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_SCAN_WRPKRU",
        values: "warn, off, deny",
        default: "warn",
        meaning: "scan compartment code for WRPKRU/XRSTOR byte sequences",
        implemented: true,
        parse: |c, v| {
            c.scan_wrpkru = match v {
                "warn" => ScanWrpkru::Warn,
                "off" => ScanWrpkru::Off,
                "deny" => ScanWrpkru::Deny,
                _ => return Err(Problem::BadValue),
            };
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_LOG",
        values: "warn, off, error, info, debug, trace",
        default: "warn",
        meaning: "diagnostic log level",
        implemented: true,
        parse: |c, v| {
            c.log_level = parse_level(v)?;
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_LOG_FILE",
        values: "stderr, a path (%p expands to the pid)",
        default: "stderr",
        meaning: "where diagnostics go",
        implemented: true,
        parse: |c, v| {
            c.log_file = match v {
                "stderr" => None,
                p => Some(non_empty(p)?),
            };
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_HELP",
        values: "unset, 1",
        default: "",
        meaning: "print this table and exit 0",
        implemented: true,
        parse: |c, v| {
            c.help = match v {
                "1" => true,
                "" | "0" => false,
                _ => return Err(Problem::BadValue),
            };
            Ok(())
        },
    },
];

/// Write the variable table (for `IA2_HELP=1`) through `out`.
pub fn write_help(out: &mut dyn fmt::Write) -> fmt::Result {
    writeln!(
        out,
        "libia2shim.so: MPK/PKU compartments for unmodified programs."
    )?;
    writeln!(
        out,
        "Usage: LD_PRELOAD=/path/to/libia2shim.so PROGRAM ARGS  (or: ia2run [--vm] -- PROGRAM ARGS)"
    )?;
    writeln!(
        out,
        "Variables (read once, at start-up; a bad value aborts before main):"
    )?;
    for v in VARS {
        let default = if v.default.is_empty() {
            "(unset)"
        } else {
            v.default
        };
        let status = if v.implemented {
            ""
        } else {
            " [not yet implemented]"
        };
        writeln!(
            out,
            "  {}\n      values: {}\n      default: {}\n      {}{}",
            v.name, v.values, default, v.meaning, status
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(vars: &[&'static str]) -> Result<Config, ConfigError> {
        Config::from_vars(vars.iter().copied())
    }

    fn err(vars: &[&'static str]) -> ConfigError {
        parse(vars).expect_err("should be refused")
    }

    #[test]
    fn defaults_when_nothing_is_set() {
        let c = parse(&["PATH=/bin", "HOME=/root"]).unwrap();
        assert_eq!(c, Config::default());
        assert_eq!(c.pku, PkuMode::Require);
        assert_eq!(c.heap(), HeapMode::Libc);
        assert!(c.share_tcb && c.share_below_tcb && c.share_dtv);
        assert!(c.share_tls_generation && c.share_libc_tuning && !c.share_loader_heap);
    }

    #[test]
    fn every_table_default_parses_to_the_struct_default() {
        for v in VARS {
            let s: &'static str = Box::leak(format!("{}={}", v.name, v.default).into_boxed_str());
            let mut c = parse(&[s]).unwrap_or_else(|e| panic!("{e}"));
            // Setting IA2_HEAP to its default makes it explicit; the effect is the same.
            assert_eq!(c.heap(), Config::default().heap());
            c.heap_explicit = None;
            assert_eq!(c, Config::default(), "{}", v.name);
        }
    }

    #[test]
    fn pku_modes() {
        assert_eq!(parse(&["IA2_PKU=sim"]).unwrap().pku, PkuMode::Sim);
        assert_eq!(parse(&["IA2_PKU=off"]).unwrap().pku, PkuMode::Off);
        assert_eq!(parse(&["IA2_PKU=require"]).unwrap().pku, PkuMode::Require);
        let e = err(&["IA2_PKU=maybe"]);
        assert_eq!(
            (e.var, e.value, e.problem),
            ("IA2_PKU", "maybe", Problem::BadValue)
        );
        let msg = e.to_string();
        assert!(
            msg.contains("IA2_PKU") && msg.contains("maybe") && msg.contains("require, sim, off"),
            "{msg}"
        );
    }

    #[test]
    fn compartments_spec() {
        let c = parse(&["IA2_COMPARTMENTS=1=main;2=libdav1d.so*,libfoo.so"]).unwrap();
        let rules: Vec<_> = c.compartments.unwrap().rules().collect();
        assert_eq!(
            rules,
            vec![(1, "main"), (2, "libdav1d.so*"), (2, "libfoo.so")]
        );
        assert_eq!(
            parse(&["IA2_COMPARTMENTS=auto"]).unwrap().compartments,
            None
        );
        assert!(parse(&["IA2_COMPARTMENTS=15=x;"]).is_ok());
    }

    #[test]
    fn compartments_bad_inputs() {
        assert_eq!(err(&["IA2_COMPARTMENTS=x=main"]).problem, Problem::BadValue);
        assert_eq!(
            err(&["IA2_COMPARTMENTS=16=main"]).problem,
            Problem::CompartmentOutOfRange
        );
        assert_eq!(
            err(&["IA2_COMPARTMENTS=0=main"]).problem,
            Problem::CompartmentOutOfRange
        );
        assert_eq!(
            err(&["IA2_COMPARTMENTS=1=main;1=libx.so"]).problem,
            Problem::DuplicateCompartment
        );
        assert_eq!(err(&["IA2_COMPARTMENTS=1="]).problem, Problem::EmptyPattern);
        assert_eq!(
            err(&["IA2_COMPARTMENTS=1=a,,b"]).problem,
            Problem::EmptyPattern
        );
        assert_eq!(err(&["IA2_COMPARTMENTS="]).problem, Problem::EmptyPattern);
        assert_eq!(
            err(&["IA2_COMPARTMENTS=main"]).problem,
            Problem::MissingEquals
        );
        let e = err(&["IA2_COMPARTMENTS=16=main"]);
        assert!(
            e.to_string().contains("IA2_COMPARTMENTS=\"16=main\""),
            "{e}"
        );
    }

    #[test]
    fn booleans() {
        for name in [
            "IA2_SHARE_TCB",
            "IA2_SHARE_RSEQ",
            "IA2_SHARE_BELOW_TCB",
            "IA2_SHARE_DTV",
            "IA2_SHARE_TLS_GENERATION",
            "IA2_SHARE_LIBC_TUNING",
            "IA2_SHARE_LOADER_HEAP",
            "IA2_SHARE_COPY_RELOCS",
            "IA2_SHARE_LIBC_SINGLE_THREADED",
            "IA2_SHARE_PTHREAD_ONCE",
            "IA2_SHARE_MUTEX_ELISION",
            "IA2_GATES",
        ] {
            for bad in ["2", "yes", "", "true"] {
                let s: &'static str = Box::leak(format!("{name}={bad}").into_boxed_str());
                let e = err(&[s]);
                assert_eq!((e.var, e.problem), (name, Problem::BadValue), "{s}");
                assert!(e.to_string().contains("1, 0") || e.to_string().contains("0, 1"));
            }
        }
        let c = parse(&[
            "IA2_SHARE_DTV=0",
            "IA2_SHARE_TCB=0",
            "IA2_SHARE_LOADER_HEAP=1",
            "IA2_GATES=0",
        ])
        .unwrap();
        assert!(!c.share_dtv && !c.share_tcb && c.share_loader_heap && !c.gates);
        assert_eq!(err(&["IA2_SHARE_DTV=2"]).var, "IA2_SHARE_DTV");
    }

    #[test]
    fn enums_and_lists() {
        let c = parse(&[
            "IA2_ON_FAULT=silent",
            "IA2_REPORT=plan,maps",
            "IA2_REPORT_FORMAT=json",
            "IA2_REPORT_FILE=/tmp/r.%p",
            "IA2_LOG=debug",
            "IA2_LOG_FILE=/tmp/log",
        ])
        .unwrap();
        assert_eq!(c.on_fault, OnFault::Silent);
        assert_eq!(
            c.reports,
            Reports {
                plan: true,
                maps: true,
                gates: false
            }
        );
        assert_eq!(c.report_format, ReportFormat::Json);
        assert_eq!(c.report_file, Some("/tmp/r.%p"));
        assert_eq!(c.log_level, log::LevelFilter::Debug);
        assert_eq!(c.log_file, Some("/tmp/log"));
        assert_eq!(
            parse(&["IA2_ON_FAULT=audit"]).unwrap().on_fault,
            OnFault::Audit
        );
        assert_eq!(
            err(&["IA2_REPORT=plan,everything"]).problem,
            Problem::BadValue
        );
        assert_eq!(err(&["IA2_REPORT_FORMAT=xml"]).problem, Problem::BadValue);
        assert_eq!(err(&["IA2_LOG=loud"]).problem, Problem::BadValue);
        assert_eq!(err(&["IA2_REPORT_FILE="]).problem, Problem::BadValue);
        assert_eq!(err(&["IA2_ON_FAULT=ignore"]).problem, Problem::BadValue);
        assert!(parse(&["IA2_HELP=1"]).unwrap().help);
        assert_eq!(err(&["IA2_HELP=yes"]).problem, Problem::BadValue);
    }

    #[test]
    fn share_entries() {
        assert_eq!(
            parse_share_entry("libc.so.6:stdout"),
            Ok(ShareEntry::ObjectSymbol("libc.so.6", "stdout"))
        );
        assert_eq!(
            parse_share_entry("_rtld_global"),
            Ok(ShareEntry::Symbol("_rtld_global"))
        );
        assert_eq!(
            parse_share_entry("0x1000+4096"),
            Ok(ShareEntry::Range(0x1000, 4096))
        );
        assert_eq!(
            parse_share_entry("0x1000+0x10"),
            Ok(ShareEntry::Range(0x1000, 16))
        );
        assert_eq!(parse_share_entry("0x1000"), Err(Problem::BadShareEntry));
        assert_eq!(parse_share_entry("0x1000+0"), Err(Problem::BadShareEntry));
        assert_eq!(parse_share_entry("libc.so.6:"), Err(Problem::BadShareEntry));
        assert_eq!(parse_share_entry("a b"), Err(Problem::BadShareEntry));
        assert_eq!(
            parse_share_entry("0xffffffffffffffff+2"),
            Err(Problem::BadShareEntry)
        );
    }

    #[test]
    fn unknown_ia2_variable_is_refused_other_variables_ignored() {
        let e = err(&["IA2_SHARE_TBC=0"]);
        assert_eq!(
            (e.var, e.problem),
            ("IA2_SHARE_TBC", Problem::UnknownVariable)
        );
        assert!(parse(&["IA2RUN_QEMU=/x", "NOT_IA2_X=1", "garbage"]).is_ok());
    }

    #[test]
    fn unimplemented_features_accept_only_their_default() {
        for v in VARS.iter().filter(|v| !v.implemented) {
            let def: &'static str = Box::leak(format!("{}={}", v.name, v.default).into_boxed_str());
            assert!(parse(&[def]).is_ok(), "{}", v.name);
        }
    }

    #[test]
    fn heap_default_follows_strict_mode() {
        let mut c = Config::default();
        assert_eq!(c.heap(), HeapMode::Libc);
        c.libc_compartment = Some(3);
        assert_eq!(c.heap(), HeapMode::Shared);
        c.heap_explicit = Some(HeapMode::Compartment);
        assert_eq!(c.heap(), HeapMode::Compartment);
    }

    #[test]
    fn help_lists_every_variable() {
        let mut s = String::new();
        write_help(&mut s).unwrap();
        for v in VARS {
            assert!(s.contains(v.name), "{}", v.name);
        }
    }
}
