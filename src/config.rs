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
    /// No calls into system code are gated (the old default, for experiments).
    None,
    /// Every call is gated (`all`; `union` is the old name).
    All,
    /// Every call but the hot list (`crate::libc_gates::HOT`) is gated.
    Hot,
    /// Every call but the names listed (a comma-separated hot list).
    Except(&'static str),
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

/// `IA2_SYSCALLS`: the seccomp filter on memory-map, key and /proc/*/mem syscalls.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Syscalls {
    Filter,
    Off,
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
    pub summary: bool,
    /// At exit: each compartment's private and shared heap bytes.
    pub heap: bool,
}

/// The gate mechanisms `IA2_GATES` turns on: `got` (cross-compartment
/// `JUMP_SLOT`/`GLOB_DAT` slots point at gates), `entry` (exported
/// functions of compartment objects get callee-side entry gates) and
/// `fault` (a function entered without a gate gets one on its first fault).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GateMechanisms {
    pub got: bool,
    pub entry: bool,
    pub fault: bool,
}

impl GateMechanisms {
    /// `IA2_GATES=1`, the default: GOT and entry gates. Fault-driven gating
    /// is opt-in: it lets a compartment's code reach its own data whatever
    /// rights the thread had (so experiments that run one compartment's
    /// code with another's rights through `ia2_switch_compartment` see no
    /// fault), and a function's first invocation runs with its caller's
    /// rights until that fault.
    pub const DEFAULT: GateMechanisms = GateMechanisms {
        got: true,
        entry: true,
        fault: false,
    };
    pub const NONE: GateMechanisms = GateMechanisms {
        got: false,
        entry: false,
        fault: false,
    };
}

fn parse_gates(v: &str) -> Result<GateMechanisms, Problem> {
    match v {
        "1" => return Ok(GateMechanisms::DEFAULT),
        "0" => return Ok(GateMechanisms::NONE),
        _ => {}
    }
    let mut m = GateMechanisms::NONE;
    for item in v.split(',').map(str::trim) {
        match item {
            "got" => m.got = true,
            "entry" => m.entry = true,
            "fault" => m.fault = true,
            _ => return Err(Problem::BadValue),
        }
    }
    Ok(m)
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

/// `IA2_SHARE`: validated comma-separated lists of extra shared ranges, one
/// per source (the variable, or each `IA2_SHARE` line of a policy file).
/// Kept as slices of the environment and of the mapped policy file, so that
/// reading the configuration allocates nothing.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct ShareList {
    parts: [&'static str; SHARE_PARTS],
    n: usize,
}

/// The most `IA2_SHARE` lines a policy file may have.
pub const SHARE_PARTS: usize = 128;

impl fmt::Debug for ShareList {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(&self.parts[..self.n]).finish()
    }
}

impl Default for ShareList {
    fn default() -> Self {
        ShareList {
            parts: [""; SHARE_PARTS],
            n: 0,
        }
    }
}

/// One `IA2_SHARE` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ShareEntry {
    /// `object:symbol` (object is a basename glob).
    ObjectSymbol(&'static str, &'static str),
    /// `symbol`, looked up in every loaded object.
    Symbol(&'static str),
    /// `0xADDR+LEN`.
    Range(usize, usize),
    /// `object+0xOFFSET[+LEN]`: relative to the object's first mapped page,
    /// so it survives ASLR (object is a basename glob; LEN defaults to 1).
    ObjectOffset(&'static str, usize, usize),
}

impl ShareList {
    fn one(v: &'static str) -> ShareList {
        let mut l = ShareList::default();
        if !v.trim().is_empty() {
            l.parts[0] = v;
            l.n = 1;
        }
        l
    }

    /// Add a policy file line's list; false when the list is full.
    fn push(&mut self, v: &'static str) -> bool {
        if self.n == SHARE_PARTS {
            return false;
        }
        self.parts[self.n] = v;
        self.n += 1;
        true
    }

    pub fn entries(&self) -> impl Iterator<Item = ShareEntry> + '_ {
        self.parts[..self.n]
            .iter()
            .flat_map(|p| p.split(','))
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .filter_map(|e| parse_share_entry(e).ok())
    }

    pub fn is_empty(&self) -> bool {
        self.entries().next().is_none()
    }
}

/// `IA2_HEAP_SHARED`: a validated comma-separated list of allocation sites
/// whose allocations come from the shared heap.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HeapSharedList(&'static str);

/// Where the malloc call is: an object offset, or a symbol plus offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CodeRef {
    /// `object+0xOFF` (object is a basename glob, or `main`).
    Offset(&'static str, usize),
    /// `object:symbol+0xOFF`.
    Symbol(&'static str, &'static str, usize),
}

/// The gate through which the allocating compartment was entered: its
/// target function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GateRef {
    /// `gate:symbol`, looked up in every loaded object.
    Symbol(&'static str),
    /// `gate:object:symbol`.
    ObjectSymbol(&'static str, &'static str),
}

/// One `IA2_HEAP_SHARED` entry: a code site, a gate entry, or both
/// (`CODE@gate:SYMBOL`: allocations at CODE inside calls through the gate).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeapSite {
    pub code: Option<CodeRef>,
    pub gate: Option<GateRef>,
}

impl HeapSharedList {
    pub fn entries(&self) -> impl Iterator<Item = HeapSite> {
        self.0
            .split(',')
            .map(str::trim)
            .filter(|e| !e.is_empty())
            .filter_map(|e| parse_heap_site(e).ok())
    }

    pub fn is_empty(&self) -> bool {
        self.entries().next().is_none()
    }

    pub fn as_str(&self) -> &'static str {
        self.0
    }
}

fn valid_symbol(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.' || b == b'@')
}

fn parse_code_ref(e: &'static str) -> Result<CodeRef, Problem> {
    let (head, off) = match e.rsplit_once('+') {
        Some((h, o)) => (h, parse_number(o).ok_or(Problem::BadShareEntry)?),
        None => (e, 0),
    };
    match head.split_once(':') {
        Some((obj, sym)) if !obj.is_empty() && valid_symbol(sym) && !sym.contains('@') => {
            Ok(CodeRef::Symbol(obj, sym, off))
        }
        None if !head.is_empty() && e.contains('+') => Ok(CodeRef::Offset(head, off)),
        _ => Err(Problem::BadShareEntry),
    }
}

/// Parse one `IA2_HEAP_SHARED` entry: `obj+0xOFF`, `obj:symbol+0xOFF`,
/// `gate:symbol`, `gate:obj:symbol`, or `CODE@gate:...`.
pub fn parse_heap_site(e: &'static str) -> Result<HeapSite, Problem> {
    let gate = |g: &'static str| -> Result<GateRef, Problem> {
        match g.split_once(':') {
            Some((obj, sym)) if !obj.is_empty() && valid_symbol(sym) => {
                Ok(GateRef::ObjectSymbol(obj, sym))
            }
            None if valid_symbol(g) => Ok(GateRef::Symbol(g)),
            _ => Err(Problem::BadShareEntry),
        }
    };
    let (code, g) = match e.split_once("@gate:") {
        Some((c, g)) => (Some(c), Some(g)),
        None => match e.strip_prefix("gate:") {
            Some(g) => (None, Some(g)),
            None => (Some(e), None),
        },
    };
    Ok(HeapSite {
        code: code.map(parse_code_ref).transpose()?,
        gate: g.map(gate).transpose()?,
    })
}

fn parse_heap_shared(v: &'static str) -> Result<HeapSharedList, Problem> {
    for e in v.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        parse_heap_site(e)?;
    }
    Ok(HeapSharedList(v))
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
    pub share_libgcc: bool,
    pub share_pthread_once: bool,
    pub share_mutex_elision: bool,
    pub share_data_imports: bool,
    pub share_libc_data_imports: bool,
    pub share: ShareList,
    pub tls_get_addr_gate: bool,
    pub bind_now: bool,
    /// `IA2_TLS_LAYOUT`: whether `ia2run` arranges pad objects (auto) or
    /// leaves the loader's packing (off). Read by `ia2run` from the
    /// command's environment; the shim accepts it and reports it.
    pub tls_layout: bool,
    /// `IA2_TLS_PRELOAD`: set by `ia2run`'s TLS layout to the `LD_PRELOAD`
    /// it replaced, which the shim puts back for the programs this one runs.
    pub tls_preload: Option<&'static str>,
    /// Any gate mechanism on (`IA2_GATES` other than `0`).
    pub gates: bool,
    /// Which gate mechanisms `IA2_GATES` turns on.
    pub gate_mechanisms: GateMechanisms,
    /// `IA2_HARDEN`: the shim's own state (gate frames, the gate table,
    /// thread-start records, handler tables, the key map, the key table,
    /// the runtime and census, what routes allocations, the sealed
    /// section) on a key of its own that compartments cannot write.
    pub harden: bool,
    /// `None`: not set, so the mode's default applies (see [`Config::heap`]).
    pub heap_explicit: Option<HeapMode>,
    pub heap_shared: HeapSharedList,
    pub on_fault: OnFault,
    pub reports: Reports,
    pub report_format: ReportFormat,
    pub report_file: Option<&'static str>,
    pub scan_wrpkru: ScanWrpkru,
    pub log_level: log::LevelFilter,
    pub log_file: Option<&'static str>,
    /// `IA2_CACHE_DIR`: where decoded results (strict mode's locators,
    /// entry-gate analyses, `IA2_SCAN_WRPKRU=warn`'s hits) are kept across
    /// runs (`None`: `off`, no cache; `Some("")`: the default,
    /// `$XDG_CACHE_HOME/ia2shim`, else `$HOME/.cache/ia2shim`).
    pub cache_dir: Option<&'static str>,
    /// `IA2_DEBUG_API=1`: `ia2_switch_compartment` may change PKRU.
    pub debug_api: bool,
    pub syscalls: Syscalls,
    pub help: bool,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            pku: PkuMode::Require,
            compartments: None,
            libc_compartment: None,
            libc_gates: LibcGates::Hot,
            share_tcb: true,
            share_rseq: true,
            share_below_tcb: true,
            share_dtv: true,
            share_tls_generation: true,
            share_libc_tuning: true,
            share_loader_heap: false,
            share_copy_relocs: true,
            share_libc_single_threaded: true,
            share_libgcc: true,
            share_pthread_once: true,
            share_mutex_elision: true,
            share_data_imports: true,
            share_libc_data_imports: false,
            share: ShareList::default(),
            tls_get_addr_gate: false,
            bind_now: true,
            tls_layout: true,
            tls_preload: None,
            gates: true,
            gate_mechanisms: GateMechanisms::DEFAULT,
            harden: true,
            heap_explicit: None,
            heap_shared: HeapSharedList(""),
            on_fault: OnFault::Report,
            reports: Reports::default(),
            report_format: ReportFormat::Text,
            report_file: None,
            scan_wrpkru: ScanWrpkru::Warn,
            log_level: log::LevelFilter::Warn,
            log_file: None,
            cache_dir: Some(""),
            debug_api: false,
            syscalls: Syscalls::Filter,
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
        I::IntoIter: Clone,
    {
        Config::from_vars_in(VARS, vars)
    }

    /// [`Config::from_vars`] against a given table (unit tests give one
    /// with an unimplemented variable; today every variable in `VARS` is
    /// implemented).
    fn from_vars_in<I>(table: &[VarSpec], vars: I) -> Result<Config, ConfigError>
    where
        I: IntoIterator<Item = &'static str>,
        I::IntoIter: Clone,
    {
        let vars = vars.into_iter();
        let mut cfg = Config::default();
        // A policy file first; every variable set in the environment then
        // overrides what the file says.
        if let Some(path) = vars
            .clone()
            .find_map(|v| v.strip_prefix("IA2_POLICY="))
            .filter(|p| !p.is_empty())
        {
            let text = read_policy(path).map_err(|e| ConfigError {
                var: "IA2_POLICY",
                value: path,
                accepted: "a readable policy file",
                problem: Problem::PolicyUnreadable(e),
                at: None,
            })?;
            apply_policy(&mut cfg, path, text)?;
        }
        for var in vars {
            let Some((name, value)) = var.split_once('=') else {
                continue;
            };
            if !name.starts_with("IA2_") || name == "IA2_POLICY" {
                continue;
            }
            set_var(table, &mut cfg, name, value, None)?;
        }
        cfg.check_combinations()?;
        Ok(cfg)
    }

    /// Read the process environment. Allocation-free.
    pub fn from_environ() -> Result<Config, ConfigError> {
        // Only `IA2_` entries matter, so only they are decoded.
        Config::from_vars(
            environ_raw()
                .filter(|e| e.starts_with(b"IA2_"))
                .filter_map(|e| core::str::from_utf8(e).ok()),
        )
    }

    fn check_combinations(&self) -> Result<(), ConfigError> {
        // IA2's libc-compartment mode shares N with an application
        // compartment (dav1d: N = 1 = the executable's), so no combination
        // of IA2_LIBC_COMPARTMENT and IA2_COMPARTMENTS is refused.
        Ok(())
    }
}

/// Set one variable; `at` names the policy file line it came from.
fn set_var(
    table: &[VarSpec],
    cfg: &mut Config,
    name: &'static str,
    value: &'static str,
    at: Option<(&'static str, usize)>,
) -> Result<(), ConfigError> {
    let Some(spec) = table.iter().find(|v| v.name == name) else {
        return Err(ConfigError {
            var: name,
            value,
            accepted: "one of the variables listed by IA2_HELP=1",
            problem: Problem::UnknownVariable,
            at,
        });
    };
    (spec.parse)(cfg, value).map_err(|problem| ConfigError {
        var: spec.name,
        value,
        accepted: if problem == Problem::NotImplemented {
            spec.default
        } else {
            spec.values
        },
        problem,
        at,
    })?;
    if !spec.implemented && value != spec.default {
        return Err(ConfigError {
            var: spec.name,
            value,
            accepted: spec.default,
            problem: Problem::NotImplemented,
            at,
        });
    }
    Ok(())
}

/// Map a policy file read-only and privately for the life of the process,
/// so its lines can be borrowed as `&'static str` without allocating.
fn read_policy(path: &'static str) -> Result<&'static str, i32> {
    let mut cpath = [0u8; 4096];
    if path.len() >= cpath.len() || path.as_bytes().contains(&0) {
        return Err(libc::ENAMETOOLONG);
    }
    cpath[..path.len()].copy_from_slice(path.as_bytes());
    let errno = || std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
    // SAFETY: a NUL-terminated path in a stack buffer.
    let fd = unsafe { libc::open(cpath.as_ptr().cast(), libc::O_RDONLY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(errno());
    }
    // SAFETY: fstat fills a zeroed stat for a descriptor we own.
    let mut st: libc::stat = unsafe { core::mem::zeroed() };
    // SAFETY: as above.
    let r = unsafe { libc::fstat(fd, &mut st) };
    let len = st.st_size as usize;
    let text = if r != 0 {
        Err(errno())
    } else if len == 0 {
        Ok("")
    } else {
        // SAFETY: a private read-only mapping of a file we opened; it is
        // never unmapped, so the slice lives as long as the process.
        let p = unsafe {
            libc::mmap(
                core::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE,
                fd,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            Err(errno())
        } else {
            // SAFETY: `len` mapped bytes.
            let bytes = unsafe { core::slice::from_raw_parts(p as *const u8, len) };
            core::str::from_utf8(bytes).map_err(|_| libc::EILSEQ)
        }
    };
    // SAFETY: closing our descriptor; the mapping stays.
    unsafe { libc::close(fd) };
    text
}

/// Apply a policy file: `IA2_NAME=value` lines, `#` comments (whole-line
/// or trailing), blank lines. `IA2_SHARE` lines add up; any other variable
/// set twice keeps the last value. A malformed line is an error naming it.
pub fn apply_policy(
    cfg: &mut Config,
    path: &'static str,
    text: &'static str,
) -> Result<(), ConfigError> {
    for (i, raw) in text.lines().enumerate() {
        let at = Some((path, i + 1));
        let line = raw.split('#').next().unwrap_or("").trim();
        if line.is_empty() {
            continue;
        }
        let bad = |problem| ConfigError {
            var: "IA2_POLICY",
            value: raw.trim(),
            accepted: "IA2_NAME=value lines for the variables of IA2_HELP=1, # comments",
            problem,
            at,
        };
        let Some((name, value)) = line.split_once('=') else {
            return Err(bad(Problem::PolicyLine));
        };
        let (name, value) = (name.trim(), value.trim());
        if !name.starts_with("IA2_") || matches!(name, "IA2_POLICY" | "IA2_HELP") {
            return Err(bad(Problem::PolicyLine));
        }
        if name == "IA2_SHARE" {
            let one = parse_share(value).map_err(|problem| ConfigError {
                var: "IA2_SHARE",
                value,
                // The accepted forms, as the table states them.
                accepted: VARS
                    .iter()
                    .find(|v| v.name == "IA2_SHARE")
                    .map_or("", |v| v.values),
                problem,
                at,
            })?;
            if one.n > 0 && !cfg.share.push(one.parts[0]) {
                return Err(bad(Problem::PolicyTooManyShares));
            }
            continue;
        }
        set_var(VARS, cfg, name, value, at)?;
    }
    Ok(())
}

/// The value of environment variable `name`, if it is set and UTF-8. Only
/// the matching entry is decoded (the whole environment can be large).
pub fn environ_var(name: &str) -> Option<&'static str> {
    environ_raw()
        .find_map(|e| e.strip_prefix(name.as_bytes())?.strip_prefix(b"="))
        .and_then(|v| core::str::from_utf8(v).ok())
}

/// The environment's entries as bytes, in order.
fn environ_raw() -> impl Iterator<Item = &'static [u8]> + Clone {
    extern "C" {
        static environ: *const *const libc::c_char;
    }
    // SAFETY: reading the `environ` pointer; the constructor runs before any
    // thread exists, so nothing modifies it concurrently.
    let mut p = unsafe { environ };
    core::iter::from_fn(move || {
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
        Some(unsafe { core::ffi::CStr::from_ptr(entry) }.to_bytes())
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
    /// `IA2_POLICY`: the file cannot be opened or read (errno).
    PolicyUnreadable(i32),
    /// `IA2_POLICY`: a line that is not `IA2_NAME=value`, or names a
    /// variable a policy cannot set.
    PolicyLine,
    /// `IA2_POLICY`: more `IA2_SHARE` lines than [`SHARE_PARTS`].
    PolicyTooManyShares,
}

/// A refused variable. `Display` gives the one-line fatal message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigError {
    pub var: &'static str,
    pub value: &'static str,
    pub accepted: &'static str,
    pub problem: Problem,
    /// Where the value came from when it was a policy file: (path, line).
    pub at: Option<(&'static str, usize)>,
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
            Problem::PolicyUnreadable(e) => {
                return write!(
                    f,
                    "IA2_POLICY={:?}: cannot read the policy file (errno {e})",
                    self.value
                )
            }
            Problem::PolicyLine => "not a policy line (IA2_NAME=value, # comment)",
            Problem::PolicyTooManyShares => "too many IA2_SHARE lines (at most 128)",
        };
        if let Some((path, line)) = self.at {
            write!(f, "IA2_POLICY={path:?} line {line}: ")?;
        }
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

/// Parse one `IA2_SHARE` entry: `obj:symbol`, `symbol`, `obj+0xOFFSET[+LEN]`
/// or `0xADDR+LEN`.
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
    // `object+0xOFF[+LEN]`: split at the first `+` before a digit, so that
    // names such as `libstdc++.so.6` keep their pluses.
    let split = e
        .char_indices()
        .find(|&(i, c)| c == '+' && e[i + 1..].starts_with(|d: char| d.is_ascii_digit()))
        .map(|(i, _)| (&e[..i], &e[i + 1..]));
    if let Some((obj, rest)) = split {
        let (off, len) = match rest.split_once('+') {
            Some((o, l)) => (o, Some(l)),
            None => (rest, None),
        };
        let off = parse_number(off).ok_or(Problem::BadShareEntry)?;
        let len = match len {
            Some(l) => parse_number(l).ok_or(Problem::BadShareEntry)?,
            None => 1,
        };
        if obj.trim().is_empty() || len == 0 || off.checked_add(len).is_none() {
            return Err(Problem::BadShareEntry);
        }
        return Ok(ShareEntry::ObjectOffset(obj.trim(), off, len));
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
    Ok(ShareList::one(v))
}

fn parse_reports(v: &str) -> Result<Reports, Problem> {
    let mut r = Reports::default();
    for item in v.split(',').map(str::trim).filter(|e| !e.is_empty()) {
        match item {
            "plan" => r.plan = true,
            "maps" => r.maps = true,
            "gates" => r.gates = true,
            "summary" => r.summary = true,
            "heap" => r.heap = true,
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
        values: "hot, all, none, name[,name...]",
        default: "hot",
        meaning: "strict mode: which calls from compartments into system code get a union gate (the caller's rights plus N's): all but the hot list printed by IA2_REPORT=plan (hot), every one (all; union is its old name), none (none), or all but the names listed",
        implemented: true,
        parse: |c, v| {
            c.libc_gates = match v {
                "none" => LibcGates::None,
                "all" | "union" => LibcGates::All,
                "hot" => LibcGates::Hot,
                list => {
                    let ok = list.split(',').all(|n| {
                        !n.is_empty()
                            && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
                    });
                    if !ok {
                        return Err(Problem::BadValue);
                    }
                    LibcGates::Except(list)
                }
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
        name: "IA2_SHARE_LIBGCC",
        values: "1, 0",
        default: "1",
        meaning: "carveout libgcc (strict mode): keep libgcc_s's writable data on pkey 0; the unwinder reads it to enter a landing pad, so with it shared C++ landing pads run with their compartment's rights alone, without the libc compartment's key",
        implemented: true,
        parse: |c, v| {
            c.share_libgcc = parse_bool(v)?;
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
        name: "IA2_SHARE_DATA_IMPORTS",
        values: "1, 0",
        default: "1",
        meaning: "share the data one compartment imports from another through GOT slots (exported variables, hook pointers), with a start-up warning for each",
        implemented: true,
        parse: |c, v| {
            c.share_data_imports = parse_bool(v)?;
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_SHARE_LIBC_DATA_IMPORTS",
        values: "0, 1",
        default: "0",
        meaning: "carveout libc_data_imports (off by default: it shares libc's stdio page): keep the pages of system objects' data that application objects import by address (libc's stdin, environ, optarg, ...) on pkey 0",
        implemented: true,
        parse: |c, v| {
            c.share_libc_data_imports = parse_bool(v)?;
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
        values: "empty, obj:symbol / symbol / obj+0xOFFSET[+LEN] / 0xADDR+LEN, comma-separated",
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
        name: "IA2_BIND_NOW",
        values: "1, 0",
        default: "1",
        meaning: "resolve every lazy PLT slot of objects that can run with a compartment's rights at start-up and after dlopen, so ld.so's lazy resolver never runs with a compartment's rights",
        implemented: true,
        parse: |c, v| {
            c.bind_now = parse_bool(v)?;
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_GATES",
        values: "1, 0, or any of got, entry, fault (comma-separated)",
        default: "1",
        meaning: "switch PKRU on cross-compartment calls: 1 = got,entry; got = gates on cross-compartment GOT slots; entry = entry gates on exported functions of compartment objects; fault (opt-in) = a function entered without a gate (a static callback) gets one on its first protection-key fault",
        implemented: true,
        parse: |c, v| {
            c.gate_mechanisms = parse_gates(v)?;
            c.gates = c.gate_mechanisms != GateMechanisms::NONE;
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_HARDEN",
        values: "on, off",
        default: "on",
        meaning: "on = gate frames, the gate table, thread-start records, the signal, fork and C++ handler tables, the key map, the key table, the runtime and census (sealed heap), exit-handler records, the heaps' layout, keys, mode, routes, policy and site table, and the sealed section (real-function slots, init state, filter range, ...) live on a shim key that compartment PKRUs write-disable, and gates check the frame they return through (one more WRPKRU and 6 more instructions per gated round trip); off = all of it on key 0, writable by every compartment",
        implemented: true,
        parse: |c, v| {
            c.harden = match v {
                "on" => true,
                "off" => false,
                _ => return Err(Problem::BadValue),
            };
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
        name: "IA2_HEAP_SHARED",
        values: "empty, site[,site...]: obj+0xOFF / obj:symbol+0xOFF (the malloc caller), gate:symbol (the gate entered), or CODE@gate:symbol",
        default: "",
        meaning: "with IA2_HEAP=compartment: allocations from these sites come from the shared heap (pkey 0); the rest stay private",
        implemented: true,
        parse: |c, v| {
            c.heap_shared = parse_heap_shared(v)?;
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
        values: "empty, any of plan, maps, gates, summary, heap (comma-separated)",
        default: "",
        meaning: "what to print at start-up (plan, maps, summary: private vs shared bytes of static data and TLS per compartment) and exit (gates; heap: each compartment's private and shared heap bytes)",
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
        name: "IA2_POLICY",
        values: "unset, a path",
        default: "",
        meaning: "read IA2_* settings from a policy file (IA2_NAME=value lines, # comments; IA2_SHARE lines add up); variables set in the environment override it",
        implemented: true,
        // Read by `Config::from_vars` before every other variable.
        parse: |_, _| Ok(()),
    },
    VarSpec {
        name: "IA2_CACHE_DIR",
        values: "default ($XDG_CACHE_HOME/ia2shim, else $HOME/.cache/ia2shim), a directory, off",
        default: "default",
        meaning: "decoded results kept by build-id across runs: strict mode's libc/ld.so locators, entry-gate analyses of compartment objects' exported functions, IA2_SCAN_WRPKRU=warn's hits",
        implemented: true,
        parse: |c, v| {
            c.cache_dir = match v {
                "off" => None,
                "default" => Some(""),
                p => Some(non_empty(p)?),
            };
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_SYSCALLS",
        values: "filter, off",
        default: "filter",
        meaning: "a seccomp filter traps pkey_*, process_vm_*, ptrace, io_uring_setup, mprotect/munmap/mremap/mmap(MAP_FIXED) and open/openat/openat2; the shim refuses those that touch another compartment's pages or keys or open /proc/*/mem (off: no filter)",
        implemented: true,
        parse: |c, v| {
            c.syscalls = match v {
                "filter" => Syscalls::Filter,
                "off" => Syscalls::Off,
                _ => return Err(Problem::BadValue),
            };
            Ok(())
        },
    },
    VarSpec {
        name: "IA2_DEBUG_API",
        values: "0, 1",
        default: "0",
        meaning: "let ia2_switch_compartment change the calling thread's PKRU (a debugging aid that defeats isolation; refused with EPERM otherwise)",
        implemented: true,
        parse: |c, v| {
            c.debug_api = parse_bool(v)?;
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

impl Config {
    /// The cache directory `IA2_CACHE_DIR` names, or its default from
    /// `XDG_CACHE_HOME` or `HOME`; `None` when off or neither is set.
    pub fn cache_dir(&self) -> Option<String> {
        let dir = self.cache_dir?;
        if !dir.is_empty() {
            return Some(dir.to_string());
        }
        let var = |name: &str| environ_var(name).filter(|v| v.starts_with('/'));
        match (var("XDG_CACHE_HOME"), var("HOME")) {
            (Some(x), _) => Some(format!("{x}/ia2shim")),
            (None, Some(h)) => Some(format!("{h}/.cache/ia2shim")),
            (None, None) => None,
        }
    }
}

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
        assert_eq!(c.gate_mechanisms, GateMechanisms::NONE);
        let g = parse(&["IA2_GATES=entry"]).unwrap();
        assert!(g.gates && g.gate_mechanisms.entry && !g.gate_mechanisms.got);
        let g = parse(&["IA2_GATES=got, entry"]).unwrap();
        assert_eq!(g.gate_mechanisms, GateMechanisms::DEFAULT);
        assert!(
            parse(&["IA2_GATES=got,fault"])
                .unwrap()
                .gate_mechanisms
                .fault
        );
        assert_eq!(err(&["IA2_GATES=got,static"]).problem, Problem::BadValue);
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
                gates: false,
                summary: false,
                heap: false
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
        assert_eq!(
            parse_share_entry("main+0x3000+4096"),
            Ok(ShareEntry::ObjectOffset("main", 0x3000, 4096))
        );
        assert_eq!(
            parse_share_entry("libstdc++.so.6+0x10"),
            Ok(ShareEntry::ObjectOffset("libstdc++.so.6", 0x10, 1))
        );
        assert_eq!(
            parse_share_entry("main+0x10+0"),
            Err(Problem::BadShareEntry)
        );
        assert_eq!(parse_share_entry("+0x10"), Err(Problem::BadShareEntry));
        assert_eq!(parse_share_entry("main+zz"), Err(Problem::BadShareEntry));
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
    fn an_unimplemented_variable_accepts_only_its_default() {
        let table = [VarSpec {
            name: "IA2_FUTURE",
            values: "0, 1",
            default: "0",
            meaning: "not built yet",
            implemented: false,
            parse: |c, v| {
                c.gates = parse_bool(v)?;
                Ok(())
            },
        }];
        let ok = Config::from_vars_in(&table, ["IA2_FUTURE=0"]);
        assert!(ok.is_ok(), "{ok:?}");
        let e = Config::from_vars_in(&table, ["IA2_FUTURE=1"]).unwrap_err();
        assert_eq!(e.problem, Problem::NotImplemented);
        assert_eq!(e.accepted, "0");
        assert!(e.to_string().contains("IA2_FUTURE=\"1\""), "{e}");
        assert!(e.to_string().contains("not yet implemented"), "{e}");
        let mut help = String::new();
        write_help(&mut help).unwrap();
        assert!(!help.contains("[not yet implemented]"), "{help}");
    }

    #[test]
    fn heap_shared_sites() {
        assert_eq!(
            parse_heap_site("libfoo.so+0x1a2b"),
            Ok(HeapSite {
                code: Some(CodeRef::Offset("libfoo.so", 0x1a2b)),
                gate: None
            })
        );
        assert_eq!(
            parse_heap_site("libfoo.so:foo_new+0x1f@gate:foo_create"),
            Ok(HeapSite {
                code: Some(CodeRef::Symbol("libfoo.so", "foo_new", 0x1f)),
                gate: Some(GateRef::Symbol("foo_create"))
            })
        );
        assert_eq!(
            parse_heap_site("gate:libfoo.so:foo_create"),
            Ok(HeapSite {
                code: None,
                gate: Some(GateRef::ObjectSymbol("libfoo.so", "foo_create"))
            })
        );
        assert_eq!(
            parse_heap_site("main:helper"),
            Ok(HeapSite {
                code: Some(CodeRef::Symbol("main", "helper", 0)),
                gate: None
            })
        );
        for bad in [
            "libfoo.so",
            "libfoo.so+zz",
            "gate:",
            "gate:a b",
            "x+0x1@gate:",
            ":f+1",
            "@gate:f",
        ] {
            assert_eq!(parse_heap_site(bad), Err(Problem::BadShareEntry), "{bad}");
        }
        let c = parse(&["IA2_HEAP_SHARED=libfoo.so+0x10, gate:foo"]).unwrap();
        assert_eq!(c.heap_shared.entries().count(), 2);
        assert_eq!(
            err(&["IA2_HEAP_SHARED=libfoo.so"]).problem,
            Problem::BadShareEntry
        );
        assert!(parse(&["IA2_REPORT=heap"]).unwrap().reports.heap);
    }

    #[test]
    fn help_lists_every_variable() {
        let mut s = String::new();
        write_help(&mut s).unwrap();
        for v in VARS {
            assert!(s.contains(v.name), "{}", v.name);
        }
    }

    fn leak(s: String) -> &'static str {
        Box::leak(s.into_boxed_str())
    }

    #[test]
    fn policy_file_lines_comments_and_accumulated_shares() {
        let mut c = Config::default();
        let text = "# learned by ia2run --learn\n\nIA2_COMPARTMENTS=1=main;2=libfoo.so\nIA2_SHARE=main+0x3000+4096   # read by libfoo.so\nIA2_SHARE = libc.so.6:stdout\nIA2_SHARE_TCB=0\n";
        apply_policy(&mut c, "p.policy", text).unwrap();
        assert!(!c.share_tcb);
        assert!(c.compartments.is_some());
        let e: Vec<ShareEntry> = c.share.entries().collect();
        assert_eq!(
            e,
            vec![
                ShareEntry::ObjectOffset("main", 0x3000, 4096),
                ShareEntry::ObjectSymbol("libc.so.6", "stdout")
            ]
        );
    }

    #[test]
    fn a_malformed_policy_line_names_file_and_line() {
        let mut c = Config::default();
        let e =
            apply_policy(&mut c, "p.policy", "IA2_SHARE_TCB=1\nshare everything\n").unwrap_err();
        assert_eq!(e.problem, Problem::PolicyLine);
        let msg = e.to_string();
        assert!(msg.starts_with("IA2_POLICY=\"p.policy\" line 2: "), "{msg}");
        let e = apply_policy(&mut c, "p.policy", "IA2_SHARE_TCB=maybe\n").unwrap_err();
        assert!(
            e.to_string().contains("line 1: IA2_SHARE_TCB=\"maybe\""),
            "{e}"
        );
        let e = apply_policy(&mut c, "p.policy", "IA2_POLICY=other\n").unwrap_err();
        assert_eq!(e.problem, Problem::PolicyLine);
        let e = apply_policy(&mut c, "p.policy", "IA2_SHARE=main+zz\n").unwrap_err();
        assert_eq!(e.problem, Problem::BadShareEntry);
    }

    #[test]
    fn environment_overrides_the_policy_file() {
        let path = std::env::temp_dir().join(format!("ia2-policy-{}", std::process::id()));
        std::fs::write(
            &path,
            "IA2_SHARE_TCB=0\nIA2_SHARE=libc.so.6:stdout\nIA2_ON_FAULT=audit\n",
        )
        .unwrap();
        let var = leak(format!("IA2_POLICY={}", path.display()));
        let c = Config::from_vars([var, "IA2_SHARE_TCB=1"]).unwrap();
        assert!(c.share_tcb, "the environment wins");
        assert_eq!(c.on_fault, OnFault::Audit, "the file's other settings hold");
        assert_eq!(c.share.entries().count(), 1);
        let c = Config::from_vars([var, "IA2_SHARE=main:x"]).unwrap();
        assert_eq!(
            c.share.entries().collect::<Vec<_>>(),
            vec![ShareEntry::ObjectSymbol("main", "x")],
            "IA2_SHARE in the environment replaces the file's list"
        );
        std::fs::remove_file(&path).unwrap();
        let e = Config::from_vars([var]).unwrap_err();
        assert!(
            matches!(e.problem, Problem::PolicyUnreadable(libc::ENOENT)),
            "{e}"
        );
        assert!(
            e.to_string()
                .contains("cannot read the policy file (errno 2)"),
            "{e}"
        );
    }
}
