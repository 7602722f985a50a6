//! Allocation-free output: JSON escaping, per-site log lines.

use super::*;

// ---------------------------------------------------------------- output

/// A JSON string literal, escaped while formatting.
pub(in crate::fault) struct J<'a>(pub(in crate::fault) &'a str);

impl fmt::Display for J<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_char('"')?;
        for ch in self.0.chars() {
            match ch {
                '"' => f.write_str("\\\"")?,
                '\\' => f.write_str("\\\\")?,
                c if (c as u32) < 0x20 => write!(f, "\\u{:04x}", c as u32)?,
                c => f.write_char(c)?,
            }
        }
        f.write_char('"')
    }
}

/// A JSON number or `null`.
pub(in crate::fault) struct N<T>(pub(in crate::fault) Option<T>);

impl<T: fmt::Display> fmt::Display for N<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            Some(v) => write!(f, "{v}"),
            None => f.write_str("null"),
        }
    }
}

pub(in crate::fault) fn json() -> bool {
    runtime::get().is_some_and(|r| r.config.report_format == ReportFormat::Json)
}

pub(in crate::fault) fn emit<const L: usize>(b: &StackBuf<L>) {
    b.write_to_fd(REPORT_FD.load(Relaxed));
}

/// `name+0xoff (object)` of a code address, into a small buffer.
pub(in crate::fault) fn sym_text(addr: usize) -> StackBuf<512> {
    let mut b = StackBuf::new();
    if addr == 0 {
        let _ = write!(b, "the kernel (rseq area update)");
    } else {
        crate::fault::write_sym(&mut b, addr);
    }
    b
}

pub(in crate::fault) fn insn_text(rip: usize) -> StackBuf<256> {
    let mut b = StackBuf::<256>::new();
    write_instruction(&mut b, rip);
    b
}

/// The compartment whose key a PKRU value allows (the running one).
pub(in crate::fault) fn running_compartment(rt: Option<&Runtime>, pkru: u32) -> Option<u8> {
    rt?.running_compartment(pkru)
}

/// One line for a new site, as it happens.
pub(in crate::fault) fn log_site(
    n: usize,
    addr: usize,
    pkey: u32,
    pkru: u32,
    rip: usize,
    write: bool,
) {
    let rt = runtime::get();
    let census = rt.and_then(|r| r.census.try_read().ok());
    let c = census.as_deref();
    let class = classify(c, addr);
    let (object, section) = class.describe(c);
    let sym = sym_info(addr);
    let fix = Fix::for_site(c, class, addr);
    let page_c = rt.and_then(|r| r.compartment_of_key(pkey));
    let run_c = running_compartment(rt, pkru);
    let access = if write { "write" } else { "read" };
    let (rip_sym, insn) = (sym_text(rip), insn_text(rip));
    let mut b = StackBuf::<2048>::new();
    let p = pid();
    if json() {
        let _ = writeln!(
            b,
            "{{\"type\":\"audit_fault\",\"pid\":{p},\"site\":{n},\"access\":\"{access}\",\"addr\":\"{addr:#x}\",\"page\":\"{:#x}\",\"pkey\":{pkey},\"page_compartment\":{},\"running_compartment\":{},\"pkru\":\"{pkru:#010x}\",\"rip\":\"{rip:#x}\",\"rip_symbol\":{},\"insn\":{},\"class\":\"{}\",\"object\":{},\"section\":{},\"symbol\":{},\"symbol_offset\":{},\"fix\":\"{}\"}}",
            page_down(addr),
            N(page_c),
            N(run_c),
            J(rip_sym.as_str()),
            J(insn.as_str()),
            class.kind(),
            J(object),
            J(section_text(section).as_str()),
            sym.as_ref().map_or(J(""), |s| J(s.name)),
            N(sym.as_ref().map(|s| addr - s.addr)),
            share_assignment(&fix).as_str(),
        );
    } else {
        let _ = write!(
            b,
            "ia2shim[{p}]: audit: site {n}: {access} {addr:#x} (page {:#x}) key {pkey}",
            page_down(addr)
        );
        if let Some(c) = page_c {
            let _ = write!(b, " = compartment {c}");
        }
        match run_c {
            Some(c) => {
                let _ = write!(b, " by compartment {c}");
            }
            None => {
                let _ = write!(b, " by no compartment");
            }
        }
        let _ = write!(
            b,
            " (PKRU {pkru:#010x}) at {}: {}; ",
            rip_sym.as_str(),
            insn.as_str()
        );
        if !object.is_empty() {
            let _ = write!(b, "{object} ");
        }
        let _ = write!(b, "{section}");
        if let Some(s) = &sym {
            let _ = write!(b, ", symbol {}+{:#x}", s.name, addr - s.addr);
        }
        let _ = writeln!(b, "; fix {}", share_assignment(&fix).as_str());
    }
    emit(&b);
}

pub(in crate::fault) fn section_text(s: Section) -> StackBuf<128> {
    let mut b = StackBuf::new();
    let _ = write!(b, "{s}");
    b
}

/// `IA2_SHARE_X=1` or `IA2_SHARE=entry`.
pub(in crate::fault) fn share_assignment(fix: &Fix) -> StackBuf<512> {
    let mut b = StackBuf::new();
    match fix {
        Fix::Toggle(_) => {
            let _ = write!(b, "{}", fix.entry());
        }
        Fix::Page(_) => {
            let _ = write!(
                b,
                "none that survives a new run (heap or anonymous page {})",
                fix.entry()
            );
        }
        Fix::Heap(_) => {
            let _ = write!(b, "IA2_HEAP_SHARED={}", fix.entry());
        }
        _ => {
            let _ = write!(b, "IA2_SHARE={}", fix.entry());
        }
    }
    b
}
