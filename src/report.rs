//! Start-up reports: the census and plan (`IA2_REPORT=plan`) and the smaps
//! cross-check (`IA2_REPORT=maps`), as text or JSON lines.

use crate::config::ReportFormat;
use crate::maps::{self, Mapping};
use crate::objects::Range;
use crate::plan::Reason;
use crate::runtime::{Census, Runtime};
use core::fmt::Write as _;
use core::sync::atomic::Ordering;

/// Minimal JSON string escaping.
pub fn json_str(s: &str) -> String {
    let mut o = String::with_capacity(s.len() + 2);
    o.push('"');
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            '\n' => o.push_str("\\n"),
            c if (c as u32) < 0x20 => {
                let _ = write!(o, "\\u{:04x}", c as u32);
            }
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn emit(text: &str) {
    crate::stackfmt::write_all_fd(
        crate::fault::REPORT_FD.load(Ordering::Relaxed),
        text.as_bytes(),
    );
}

fn prot_str(prot: i32) -> String {
    let mut s = String::new();
    s.push(if prot & libc::PROT_READ != 0 {
        'r'
    } else {
        '-'
    });
    s.push(if prot & libc::PROT_WRITE != 0 {
        'w'
    } else {
        '-'
    });
    s.push(if prot & libc::PROT_EXEC != 0 {
        'x'
    } else {
        '-'
    });
    s
}

fn reason_str(c: &Census, r: &Reason) -> String {
    match r {
        Reason::Data { object } => format!("data of {}", c.objects[*object].display_name()),
        Reason::Tls { object, thread } => format!(
            "TLS of {} (module {}) in thread {thread}",
            c.objects[*object].display_name(),
            c.objects[*object].tls.map(|t| t.modid).unwrap_or(0)
        ),
        Reason::Carveout { name, toggle } => format!("carveout {name} ({toggle}=1)"),
        Reason::LoaderHeap => "loader heap".to_string(),
        Reason::TlsShared { object, thread } => format!(
            "TLS of {} in thread {thread}, kept shared (page shared with another block, or a shared module's block)",
            c.objects[*object].display_name()
        ),
    }
}

/// The census and plan, as text or JSON lines.
pub fn plan_report(rt: &Runtime, c: &Census) -> String {
    let mut o = String::new();
    let json = rt.config.report_format == ReportFormat::Json;
    let p = crate::stackfmt::pid();
    if !json {
        let _ = writeln!(o, "ia2shim[{p}]: ==== census ====");
    }
    for g in &c.groups {
        if json {
            let _ = writeln!(o, "{{\"type\":\"group\",\"text\":{}}}", json_str(g));
        } else {
            let _ = writeln!(o, "ia2shim[{p}]:   {g}");
        }
    }
    for (i, obj) in c.objects.iter().enumerate() {
        let comp = c.compartment_of[i];
        let key = comp.map(|c| rt.key_of(c)).unwrap_or(0);
        let tls = obj.tls.map(|t| {
            format!(
                "module {} size {:#x} block {:#x}",
                t.modid, t.memsz, t.block
            )
        });
        if json {
            let _ = writeln!(
                o,
                "{{\"type\":\"object\",\"index\":{i},\"name\":{},\"base\":\"{:#x}\",\"kind\":\"{:?}\",\"compartment\":{},\"pkey\":{key},\"relro\":{},\"tls\":{}}}",
                json_str(obj.display_name()),
                obj.base,
                obj.kind,
                comp.map(|c| c.to_string()).unwrap_or("null".into()),
                obj.relro.map(|r| json_str(&r.to_string())).unwrap_or("null".into()),
                tls.as_deref().map(json_str).unwrap_or("null".into()),
            );
        } else {
            let _ = writeln!(
                o,
                "ia2shim[{p}]:   [{i}] {} base {:#x} {:?}: {}{}{}",
                obj.display_name(),
                obj.base,
                obj.kind,
                comp.map(|c| format!("compartment {c} (pkey {key})"))
                    .unwrap_or("shared (pkey 0)".into()),
                obj.relro
                    .map(|r| format!(", relro {r}"))
                    .unwrap_or_default(),
                tls.map(|t| format!(", TLS {t}")).unwrap_or_default(),
            );
        }
    }
    if !json {
        let _ = writeln!(o, "ia2shim[{p}]: ==== plan ====");
    }
    for e in &c.plan.entries {
        range_line(&mut o, rt, c, e, json);
    }
    for u in &c.plan.untagged_tls {
        let name = c.objects[u.object].display_name();
        if json {
            let _ = writeln!(
                o,
                "{{\"type\":\"untagged_tls\",\"page\":\"{:#x}\",\"object\":{},\"thread\":{},\"why\":{}}}",
                u.page,
                json_str(name),
                u.thread,
                json_str(u.why)
            );
        } else {
            let _ = writeln!(
                o,
                "ia2shim[{p}]:   {:#x} TLS page of {name} in thread {} stays shared: {}",
                u.page, u.thread, u.why
            );
        }
    }
    let main_tls = crate::plan::ThreadTls::new(
        0,
        c.objects
            .iter()
            .enumerate()
            .filter_map(|(i, o)| {
                let t = o.tls.filter(|t| t.block != 0)?;
                Some((i, Range::new(t.block, t.block + t.memsz)))
            })
            .collect(),
        |i| crate::plan::is_tls_pad(&c.objects[i].basename),
    );
    let comp = |i: usize| c.compartment_of.get(i).copied().flatten();
    o.push_str(&tls_bytes_line(
        rt,
        0,
        &crate::plan::tls_bytes(&c.plan, &main_tls, &comp),
    ));
    for l in &c.carveouts {
        let ranges: Vec<String> = l.carveout.ranges.iter().map(|r| r.to_string()).collect();
        if json {
            let _ = writeln!(
                o,
                "{{\"type\":\"carveout\",\"name\":\"{}\",\"toggle\":\"{}\",\"enabled\":{},\"ranges\":[{}],\"how\":{}}}",
                l.carveout.name,
                l.carveout.toggle,
                l.enabled,
                ranges.iter().map(|r| json_str(r)).collect::<Vec<_>>().join(","),
                json_str(&l.how)
            );
        } else {
            let _ = writeln!(
                o,
                "ia2shim[{p}]:   carveout {} ({}={}): {} [{}]",
                l.carveout.name,
                l.carveout.toggle,
                u8::from(l.enabled),
                ranges.join(" "),
                l.how
            );
        }
    }
    o
}

/// A mismatch between the plan and what smaps shows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mismatch {
    pub range: Range,
    pub expected: u32,
    pub actual: Option<u32>,
}

/// Compare every planned range with the `ProtectionKey` of the mappings it spans.
pub fn check_against_smaps(rt: &Runtime, c: &Census, smaps: &[Mapping]) -> Vec<Mismatch> {
    let mut out = Vec::new();
    for e in &c.plan.entries {
        let expected = e.compartment.map(|c| rt.key_of(c)).unwrap_or(0);
        for m in smaps {
            let inter = e.range.intersect(&Range::new(m.start, m.end));
            if !inter.is_empty() && m.pkey != Some(expected) {
                out.push(Mismatch {
                    range: inter,
                    expected,
                    actual: m.pkey,
                });
            }
        }
    }
    out
}

/// Every mapping with its key, then the mismatches (`IA2_REPORT=maps`).
pub fn maps_report(rt: &Runtime, c: &Census) -> String {
    let mut o = String::new();
    let json = rt.config.report_format == ReportFormat::Json;
    let p = crate::stackfmt::pid();
    let smaps = match maps::read_self_smaps() {
        Ok(m) => m,
        Err(e) => {
            return format!("ia2shim[{p}]: error: IA2_REPORT=maps: reading /proc/self/smaps: {e}\n")
        }
    };
    let simulated = crate::pku::backend() == crate::pku::Backend::Sim;
    if !json {
        let _ = writeln!(
            o,
            "ia2shim[{p}]: ==== maps (ProtectionKey from /proc/self/smaps) ===="
        );
    }
    for m in &smaps {
        let key = m.pkey.map(|k| k.to_string()).unwrap_or("-".into());
        let perms = String::from_utf8_lossy(&m.perms()).into_owned();
        if json {
            let _ = writeln!(
                o,
                "{{\"type\":\"mapping\",\"start\":\"{:#x}\",\"end\":\"{:#x}\",\"perms\":\"{perms}\",\"pkey\":{},\"path\":{}}}",
                m.start,
                m.end,
                m.pkey.map(|k| k.to_string()).unwrap_or("null".into()),
                json_str(&m.path)
            );
        } else {
            let _ = writeln!(
                o,
                "ia2shim[{p}]:   {:#x}-{:#x} {perms} pkey {key:<2} {}",
                m.start, m.end, m.path
            );
        }
    }
    if simulated {
        let _ = writeln!(
            o,
            "ia2shim[{p}]: IA2_PKU=sim: keys are simulated, so smaps shows none; the plan is not checked against it"
        );
        return o;
    }
    let bad = check_against_smaps(rt, c, &smaps);
    for b in &bad {
        let actual = b.actual.map(|k| k.to_string()).unwrap_or("none".into());
        if json {
            let _ = writeln!(
                o,
                "{{\"type\":\"mismatch\",\"range\":{},\"expected_pkey\":{},\"actual_pkey\":{}}}",
                json_str(&b.range.to_string()),
                b.expected,
                b.actual.map(|k| k.to_string()).unwrap_or("null".into())
            );
        } else {
            let _ = writeln!(
                o,
                "ia2shim[{p}]: error: maps: {} has pkey {actual} but the plan says {}",
                b.range, b.expected
            );
        }
    }
    if !json {
        let _ = writeln!(
            o,
            "ia2shim[{p}]: maps: {} planned ranges checked, {} mismatches",
            c.plan.entries.len(),
            bad.len()
        );
    }
    o
}

/// Per compartment: private and shared bytes of static data and TLS, and
/// why the shared part is shared (`IA2_REPORT=summary`, and the plan).
pub fn privacy_report(rt: &Runtime, c: &Census) -> String {
    let json = rt.config.report_format == ReportFormat::Json;
    let p = crate::stackfmt::pid();
    let mut o = String::new();
    for s in crate::privacy::summarize(&c.objects, &c.compartment_of, &c.plan) {
        let why: Vec<String> = s
            .why_shared
            .iter()
            .map(|(w, b)| {
                if json {
                    format!("{{\"why\":{},\"bytes\":{b}}}", json_str(w))
                } else {
                    format!("{w}: {b}")
                }
            })
            .collect();
        if json {
            let _ = writeln!(
                o,
                "{{\"type\":\"privacy\",\"compartment\":{},\"objects\":[{}],\"data_private\":{},\"data_shared\":{},\"tls_private\":{},\"tls_shared\":{},\"private_percent\":{:.1},\"shared\":[{}]}}",
                s.compartment,
                s.objects.iter().map(|n| json_str(n)).collect::<Vec<_>>().join(","),
                s.data_private,
                s.data_shared,
                s.tls_private,
                s.tls_shared,
                s.private_percent(),
                why.join(",")
            );
        } else {
            let _ = writeln!(
                o,
                "ia2shim[{p}]: compartment {} ({}): static data {} B private, {} B shared; TLS {} B private, {} B shared; {:.1}% private{}",
                s.compartment,
                s.objects.join(", "),
                s.data_private,
                s.data_shared,
                s.tls_private,
                s.tls_shared,
                s.private_percent(),
                if why.is_empty() {
                    String::new()
                } else {
                    format!(" (shared: {})", why.join("; "))
                }
            );
        }
    }
    o
}

/// Open the report destination and print what `IA2_REPORT` asks for at start-up.
/// One thread's TLS bytes by protection (`IA2_REPORT=plan`).
fn tls_bytes_line(rt: &Runtime, thread: usize, b: &crate::plan::TlsBytes) -> String {
    let p = std::process::id();
    let layout = if crate::tls::layout() {
        "on"
    } else if rt.config.tls_layout {
        "not arranged (run under ia2run)"
    } else {
        "off (IA2_TLS_LAYOUT=off)"
    };
    if rt.config.report_format == ReportFormat::Json {
        format!(
            "{{\"type\":\"tls_bytes\",\"thread\":{thread},\"private\":{},\"compartment_shared\":{},\"shared_modules\":{},\"pads\":{},\"layout\":{}}}\n",
            b.private, b.compartment_shared, b.shared_modules, b.pads, json_str(layout)
        )
    } else {
        format!(
            "ia2shim[{p}]:   TLS of thread {thread}: {} bytes of compartment modules private (on pages with their key); {} bytes of compartment modules shared (on a page with another owner's block, the TCB or a carveout); {} bytes of shared modules (pkey 0 by design); {} pad bytes; TLS layout {layout}\n",
            b.private, b.compartment_shared, b.shared_modules, b.pads
        )
    }
}

/// A new thread's tagged TLS pages and byte counts (`IA2_REPORT=plan`).
/// One plan entry: its range, protection, key and reason.
fn range_line(o: &mut String, rt: &Runtime, c: &Census, e: &crate::plan::PlanEntry, json: bool) {
    let key = e.compartment.map(|c| rt.key_of(c)).unwrap_or(0);
    if json {
        let _ = writeln!(
            o,
            "{{\"type\":\"range\",\"start\":\"{:#x}\",\"end\":\"{:#x}\",\"prot\":\"{}\",\"compartment\":{},\"pkey\":{key},\"reason\":{}}}",
            e.range.start,
            e.range.end,
            prot_str(e.prot),
            e.compartment.map(|c| c.to_string()).unwrap_or("null".into()),
            json_str(&reason_str(c, &e.reason))
        );
    } else {
        let _ = writeln!(
            o,
            "ia2shim[{}]:   {} {} pkey {key:<2} {}",
            crate::stackfmt::pid(),
            e.range,
            prot_str(e.prot),
            reason_str(c, &e.reason)
        );
    }
}

pub fn thread_tls(
    rt: &Runtime,
    thread: usize,
    entries: &[crate::plan::PlanEntry],
    bytes: &crate::plan::TlsBytes,
) {
    if !rt.config.reports.plan {
        return;
    }
    let Ok(c) = rt.census.read() else { return };
    let json = rt.config.report_format == ReportFormat::Json;
    let mut o = String::new();
    for e in entries {
        range_line(&mut o, rt, &c, e, json);
    }
    o.push_str(&tls_bytes_line(rt, thread, bytes));
    emit(&o);
}

pub fn startup(rt: &Runtime) {
    if let Some(path) = rt.config.report_file {
        match crate::logging::open_output_file(path) {
            Ok(fd) => crate::fault::REPORT_FD.store(fd, Ordering::Relaxed),
            Err(e) => crate::lifecycle::fatal(format_args!(
                "IA2_REPORT_FILE={path:?}: cannot open for appending (errno {e})"
            )),
        }
    }
    let Ok(c) = rt.census.read() else { return };
    if rt.config.reports.plan {
        emit(&plan_report(rt, &c));
        emit(&crate::gates::report(rt));
    }
    if rt.config.reports.plan || rt.config.reports.summary {
        emit(&privacy_report(rt, &c));
    }
    if rt.config.reports.maps {
        let text = maps_report(rt, &c);
        emit(&text);
    }
}
