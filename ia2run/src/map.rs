//! `ia2run --map FILE.svg|FILE.html`: a picture of one process's address
//! space from the shim's JSON report (`IA2_REPORT=plan,gates,maps`,
//! `IA2_REPORT_FORMAT=json`, one file per process), plus any audit faults
//! in it (`IA2_ON_FAULT=audit`).
//!
//! One band per object in address order, its mappings laid side by side
//! (width growing with the log of the size, so that a one-page carveout in
//! a 2 MB libc stays visible), addresses relative to the object. Segments
//! are coloured by compartment; shared carveout pages are orange and
//! labelled with their reason and toggle; gates are arrows between bands
//! with their call counts; audit faults are red marks. Bands with nothing
//! of their own (no carveout, fault, gate, TLS) are grouped with their
//! neighbours of the same compartment, so that 200 libraries stay a page.

use crate::learn::Json;
use std::collections::BTreeMap;
use std::fmt::Write;

/// What the picture is made from: the report's records, parsed.
#[derive(Debug, Default)]
pub struct Report {
    objects: Vec<Object>,
    mappings: Vec<Mapping>,
    ranges: Vec<Range>,
    carveouts: Vec<Carveout>,
    gates: BTreeMap<u64, Gate>,
    faults: Vec<Fault>,
    tls: Vec<(u64, String)>,
}

#[derive(Debug)]
struct Object {
    name: String,
    base: u64,
    kind: String,
    compartment: Option<u64>,
    pkey: Option<u64>,
    tls: Option<String>,
}

#[derive(Debug)]
struct Mapping {
    start: u64,
    end: u64,
    perms: String,
    pkey: Option<u64>,
    path: String,
}

#[derive(Debug)]
struct Range {
    start: u64,
    end: u64,
    compartment: Option<u64>,
    reason: String,
}

#[derive(Debug)]
struct Carveout {
    name: String,
    toggle: String,
    enabled: bool,
    ranges: Vec<(u64, u64)>,
    how: String,
}

#[derive(Debug, Default)]
struct Gate {
    symbol: String,
    caller: String,
    caller_comp: Option<u64>,
    callee: String,
    callee_comp: Option<u64>,
    calls: u64,
}

#[derive(Debug)]
struct Fault {
    addr: u64,
    text: String,
}

fn hex(v: Option<&Json>) -> Option<u64> {
    let s = v?.as_str()?;
    u64::from_str_radix(s.strip_prefix("0x")?, 16).ok()
}

/// `0xA-0xB`.
fn hex_range(s: &str) -> Option<(u64, u64)> {
    let (a, b) = s.split_once('-')?;
    Some((
        u64::from_str_radix(a.strip_prefix("0x")?, 16).ok()?,
        u64::from_str_radix(b.strip_prefix("0x")?, 16).ok()?,
    ))
}

fn text(v: Option<&Json>) -> String {
    match v {
        Some(Json::Str(s)) => s.clone(),
        Some(Json::Num(n)) => format!("{n}"),
        Some(Json::Bool(b)) => b.to_string(),
        _ => String::new(),
    }
}

impl Report {
    /// Reads JSON lines; lines that are not JSON (the shim's notes on
    /// stderr, when the report goes there) are skipped.
    pub fn parse(input: &str) -> Report {
        let mut r = Report::default();
        for line in input.lines().filter(|l| l.starts_with('{')) {
            let Ok(j) = Json::parse(line) else { continue };
            let g = |k: &str| j.get(k);
            let num = |k: &str| j.get(k).and_then(Json::as_u64);
            match g("type").and_then(Json::as_str).unwrap_or("") {
                "object" => r.objects.push(Object {
                    name: text(g("name")),
                    base: hex(g("base")).unwrap_or(0),
                    kind: text(g("kind")),
                    compartment: num("compartment"),
                    pkey: num("pkey"),
                    tls: g("tls").and_then(Json::as_str).map(str::to_owned),
                }),
                "mapping" => r.mappings.push(Mapping {
                    start: hex(g("start")).unwrap_or(0),
                    end: hex(g("end")).unwrap_or(0),
                    perms: text(g("perms")),
                    pkey: num("pkey"),
                    path: text(g("path")),
                }),
                "range" => r.ranges.push(Range {
                    start: hex(g("start")).unwrap_or(0),
                    end: hex(g("end")).unwrap_or(0),
                    compartment: num("compartment"),
                    reason: text(g("reason")),
                }),
                "carveout" => r.carveouts.push(Carveout {
                    name: text(g("name")),
                    toggle: text(g("toggle")),
                    enabled: g("enabled").and_then(Json::as_bool).unwrap_or(false),
                    ranges: g("ranges")
                        .and_then(Json::as_array)
                        .unwrap_or_default()
                        .iter()
                        .filter_map(|v| hex_range(v.as_str()?))
                        .collect(),
                    how: text(g("how")),
                }),
                "gate" => {
                    let e = r.gates.entry(num("gate").unwrap_or(u64::MAX)).or_default();
                    e.symbol = text(g("symbol"));
                    e.caller = text(g("caller"));
                    e.caller_comp = num("caller_compartment");
                    e.callee = text(g("callee"));
                    e.callee_comp = num("callee_compartment");
                }
                "gate_calls" => {
                    let e = r.gates.entry(num("gate").unwrap_or(u64::MAX)).or_default();
                    e.calls = num("calls").unwrap_or(0);
                    if e.symbol.is_empty() {
                        e.symbol = text(g("symbol"));
                        e.callee = text(g("callee"));
                    }
                }
                "audit_fault" | "kernel_fault" => {
                    let Some(addr) = hex(g("addr")) else { continue };
                    r.faults.push(Fault {
                        addr,
                        text: format!(
                            "{} fault at {} ({}) by {} in compartment {}, page key {}: {}",
                            text(g("access")),
                            text(g("addr")),
                            text(g("symbol")),
                            text(g("rip_symbol")),
                            text(g("running_compartment")),
                            text(g("pkey")),
                            text(g("fix"))
                        ),
                    });
                }
                "untagged_tls" => {
                    if let Some(p) = hex(g("page")) {
                        r.tls.push((
                            p,
                            format!(
                                "TLS of {} stays on key 0: {}",
                                text(g("object")),
                                text(g("why"))
                            ),
                        ));
                    }
                }
                _ => {}
            }
        }
        r
    }

    /// Whether there is anything to draw.
    pub fn is_empty(&self) -> bool {
        self.objects.is_empty() && self.mappings.is_empty()
    }
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn base_name(p: &str) -> &str {
    p.rsplit('/').next().unwrap_or(p)
}

/// A compartment's colour; key 0 (shared) is grey.
fn colour(c: Option<u64>) -> &'static str {
    const P: [&str; 8] = [
        "#4e79a7", "#59a14f", "#b07aa1", "#76b7b2", "#edc948", "#9c755f", "#e15759", "#bab0ac",
    ];
    match c {
        Some(c) if c > 0 => P[(c as usize - 1) % P.len()],
        _ => "#e4e4e4",
    }
}

const CARVEOUT: &str = "#f28e2b";

/// One band: an object, a run of anonymous memory, or a group of plain
/// objects.
struct Band {
    label: String,
    sub: String,
    /// Where relative addresses count from.
    base: u64,
    maps: Vec<usize>,
    /// Objects grouped into this band (more than one: collapsed).
    members: Vec<String>,
    compartment: Option<u64>,
    notable: bool,
}

fn overlaps(a: (u64, u64), b: (u64, u64)) -> bool {
    a.0 < b.1 && b.0 < a.1
}

fn bands(r: &Report) -> Vec<Band> {
    let mut maps: Vec<usize> = (0..r.mappings.len()).collect();
    maps.sort_by_key(|&i| r.mappings[i].start);
    // The loader's names and /proc/self/maps' may differ by a symlinked
    // directory (/lib and /usr/lib with merged /usr): fall back to the
    // file name.
    // directory (/lib and /usr/lib with merged /usr) or a symlinked file
    // (libdav1d.so.6 -> libdav1d.so.6.6.0): compare the resolved paths, as
    // the picture is drawn on the machine (or, for the VM, the files) the
    // process ran on.
    let real: Vec<Option<std::path::PathBuf>> = r
        .objects
        .iter()
        .map(|o| std::fs::canonicalize(&o.name).ok())
        .collect();
    let owner = |m: &Mapping| {
        let same = |o: &Object| o.name == m.path || (o.kind == "Vdso" && m.path == "[vdso]");
        r.objects.iter().position(same).or_else(|| {
            if m.path.is_empty() {
                // An object's .bss beyond its file: the plan says whose.
                let x = r.ranges.iter().find(|x| {
                    x.reason.starts_with("data of ") && overlaps((x.start, x.end), (m.start, m.end))
                })?;
                let name = x.reason.strip_prefix("data of ")?;
                return r.objects.iter().position(|o| o.name == name);
            }
            let mr = std::fs::canonicalize(&m.path).ok()?;
            real.iter().position(|p| p.as_ref() == Some(&mr))
        })
    };
    let mut out: Vec<Band> = Vec::new();
    let mut last: Option<(Option<usize>, u64)> = None;
    for i in maps {
        let m = &r.mappings[i];
        let mut o = owner(m);
        // With real keys the kernel splits an object's writable data into
        // one mapping per key: anonymous pieces (carveouts in .bss) that
        // continue an object's mappings and hold planned pages are its own.
        if let (None, true, Some((Some(prev), end))) = (o, m.path.is_empty(), last) {
            let planned = r
                .ranges
                .iter()
                .any(|x| overlaps((x.start, x.end), (m.start, m.end)));
            if end == m.start && planned {
                o = Some(prev);
            }
        }
        let same = match last {
            Some((lo, end)) => lo == o && (o.is_some() || m.start.saturating_sub(end) <= 1 << 20),
            None => false,
        };
        last = Some((o, m.end));
        if same {
            out.last_mut().unwrap().maps.push(i);
            continue;
        }
        let (label, sub, base, comp, members) = match o {
            Some(oi) => {
                let ob = &r.objects[oi];
                (
                    base_name(&ob.name).to_owned(),
                    format!(
                        "{} · {} · key {}",
                        ob.kind.to_lowercase(),
                        ob.compartment
                            .map_or("shared".to_owned(), |c| format!("compartment {c}")),
                        ob.pkey.map_or("?".into(), |k| k.to_string())
                    ),
                    ob.base,
                    ob.compartment,
                    vec![ob.name.clone()],
                )
            }
            None => (
                if m.path.is_empty() {
                    "anonymous".to_owned()
                } else {
                    m.path.clone()
                },
                String::new(),
                m.start,
                None,
                Vec::new(),
            ),
        };
        out.push(Band {
            label,
            sub,
            base,
            maps: vec![i],
            members,
            compartment: comp,
            notable: false,
        });
    }
    // What makes a band worth a row of its own.
    for b in &mut out {
        let span = (
            b.maps
                .iter()
                .map(|&i| r.mappings[i].start)
                .min()
                .unwrap_or(0),
            b.maps.iter().map(|&i| r.mappings[i].end).max().unwrap_or(0),
        );
        let names: Vec<&str> = b
            .maps
            .iter()
            .map(|&i| r.mappings[i].path.as_str())
            .collect();
        if b.members.is_empty() {
            let mut kinds: Vec<String> = names
                .iter()
                .filter(|n| !n.is_empty())
                .map(|n| n.to_string())
                .collect();
            kinds.dedup();
            if r.ranges
                .iter()
                .any(|x| x.reason == "loader heap" && overlaps((x.start, x.end), span))
            {
                kinds.push("loader heap".into());
            }
            if r.carveouts
                .iter()
                .any(|c| c.name == "tcb" && c.ranges.iter().any(|&x| overlaps(x, span)))
            {
                kinds.push("TLS / TCB".into());
            }
            b.sub = kinds.join(", ");
            b.label = if names.contains(&"[heap]") {
                "heap".into()
            } else if names.contains(&"[stack]") {
                "stack".into()
            } else {
                "anonymous".into()
            };
        }
        let obj = r
            .objects
            .iter()
            .find(|o| b.members.first() == Some(&o.name));
        b.notable = b.members.is_empty() && !b.sub.is_empty()
            || obj.is_some_and(|o| o.kind == "Main" || o.tls.is_some())
            || r.carveouts
                .iter()
                .any(|c| c.ranges.iter().any(|&x| overlaps(x, span)))
            || r.ranges
                .iter()
                .any(|x| x.compartment.is_none() && overlaps((x.start, x.end), span))
            || r.faults.iter().any(|f| f.addr >= span.0 && f.addr < span.1)
            || r.tls.iter().any(|t| t.0 >= span.0 && t.0 < span.1)
            || r.gates
                .values()
                .any(|g| g.calls > 0 && b.members.iter().any(|m| *m == g.caller || *m == g.callee));
    }
    // Plain neighbours of the same compartment become one band.
    let mut grouped: Vec<Band> = Vec::new();
    for b in out {
        if let Some(prev) = grouped.last_mut() {
            let plain = |x: &Band| !x.notable && !x.members.is_empty();
            if plain(prev) && plain(&b) && prev.compartment == b.compartment {
                prev.members.extend(b.members);
                prev.maps.extend(b.maps);
                let n = prev.members.len();
                prev.label = format!("{n} objects");
                prev.sub = format!(
                    "{} · {}",
                    prev.compartment
                        .map_or("shared".to_owned(), |c| format!("compartment {c}")),
                    prev.members
                        .iter()
                        .map(|m| base_name(m))
                        .take(4)
                        .collect::<Vec<_>>()
                        .join(", ")
                        + if n > 4 { ", …" } else { "" }
                );
                continue;
            }
        }
        grouped.push(b);
    }
    grouped
}

/// Pixels for a mapping: grows with the log of its size.
fn seg_width(len: u64) -> f64 {
    let pages = (len / 4096).max(1) as f64;
    24.0 + 14.0 * pages.log2()
}

const W: f64 = 1180.0;
const LEFT: f64 = 250.0;
const RIGHT: f64 = 1060.0;
const ROW: f64 = 34.0;
const NOTE: f64 = 13.0;

/// The picture as a standalone SVG document.
pub fn svg(r: &Report, title: &str) -> String {
    let bands = bands(r);
    let mut body = String::new();
    let mut y = 92.0;
    // Where each object's band is, for the gate arrows.
    let mut band_y: BTreeMap<String, f64> = BTreeMap::new();
    for b in &bands {
        let maps: Vec<&Mapping> = b.maps.iter().map(|&i| &r.mappings[i]).collect();
        let total: f64 = maps.iter().map(|m| seg_width(m.end - m.start)).sum();
        let scale = ((RIGHT - LEFT) / total).min(1.0);
        let _ = write!(
            body,
            "<g class=\"band\"><title>{}</title>\
             <text x=\"8\" y=\"{:.1}\" class=\"l\">{}</text>\
             <text x=\"8\" y=\"{:.1}\" class=\"s\">{}</text>",
            esc(&b.members.join("\n")),
            y + 13.0,
            esc(&b.label),
            y + 25.0,
            esc(&truncate(&b.sub, 44))
        );
        for m in &b.members {
            band_y.insert(m.clone(), y + 10.0);
        }
        let mut notes: Vec<(f64, String)> = Vec::new();
        let mut x = LEFT;
        let collapsed = b.members.len() > 1;
        for m in &maps {
            let w = seg_width(m.end - m.start) * scale;
            let len = (m.end - m.start) as f64;
            let at = |a: u64| x + w * (a.saturating_sub(m.start) as f64 / len).clamp(0.0, 1.0);
            let fill = match (m.perms.as_bytes().get(1), m.perms.as_bytes().get(2)) {
                (_, Some(b'x')) => "#8d8d8d",
                (Some(b'w'), _) => colour(m.pkey.filter(|&k| k > 0).and(b.compartment)),
                _ => "#c4c4c4",
            };
            let _ = write!(
                body,
                "<rect x=\"{x:.1}\" y=\"{y:.1}\" width=\"{:.1}\" height=\"20\" fill=\"{fill}\" stroke=\"#fff\">\
                 <title>{} {} +{:#x}..+{:#x} ({} KiB){}</title></rect>",
                (w - 1.0).max(1.0),
                esc(&m.path),
                m.perms,
                m.start - b.base,
                m.end - b.base,
                (m.end - m.start) / 1024,
                m.pkey.map_or(String::new(), |k| format!(", key {k} in smaps"))
            );
            // The plan's writable ranges: compartment data and shared pages.
            for x_r in r
                .ranges
                .iter()
                .filter(|x| overlaps((x.start, x.end), (m.start, m.end)))
            {
                let (a, e) = (at(x_r.start), at(x_r.end));
                let fill = if x_r.compartment.is_some() {
                    colour(x_r.compartment)
                } else {
                    CARVEOUT
                };
                let _ = write!(
                    body,
                    "<rect x=\"{a:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"16\" fill=\"{fill}\">\
                     <title>+{:#x}..+{:#x}: {}</title></rect>",
                    y + 2.0,
                    (e - a).max(3.0),
                    x_r.start - b.base,
                    x_r.end - b.base,
                    esc(&x_r.reason)
                );
            }
            for c in &r.carveouts {
                for &(s, e) in c.ranges.iter().filter(|&&x| overlaps(x, (m.start, m.end))) {
                    let a = at(s);
                    let state = if c.enabled { "1" } else { "0, off" };
                    let _ = write!(
                        body,
                        "<rect x=\"{a:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"4\" fill=\"{}\">\
                         <title>carveout {}: {}</title></rect>",
                        y + 20.0,
                        (at(e) - a).max(3.0),
                        if c.enabled { CARVEOUT } else { "#999" },
                        esc(&c.name),
                        esc(&c.how)
                    );
                    if !collapsed {
                        notes.push((
                            a,
                            format!("▲ {} +{:#x} ({}={state})", c.name, s - b.base, c.toggle),
                        ));
                    }
                }
            }
            for f in r
                .faults
                .iter()
                .filter(|f| f.addr >= m.start && f.addr < m.end)
            {
                let a = at(f.addr);
                let _ = write!(
                    body,
                    "<g class=\"fault\"><title>{}</title>\
                     <path d=\"M{:.1} {:.1} l8 8 m0 -8 l-8 8\" stroke=\"#d00\" stroke-width=\"2.5\"/></g>",
                    esc(&f.text),
                    a - 4.0,
                    y + 6.0
                );
                notes.push((a, format!("✕ fault +{:#x}", f.addr - b.base)));
            }
            for t in r.tls.iter().filter(|t| t.0 >= m.start && t.0 < m.end) {
                notes.push((at(t.0), format!("TLS +{:#x}: {}", t.0 - b.base, t.1)));
            }
            if w > 46.0 && !collapsed {
                let _ = write!(
                    body,
                    "<text x=\"{:.1}\" y=\"{:.1}\" class=\"a\">+{:#x}</text>",
                    x + 2.0,
                    y + 31.0,
                    m.start - b.base
                );
            }
            x += w;
        }
        if collapsed {
            let _ = write!(
                body,
                "<text x=\"{:.1}\" y=\"{:.1}\" class=\"a\">{} mappings of {} objects, grouped: nothing of their own is shared, faulted or gated (hover for the list)</text>",
                LEFT,
                y + 31.0,
                maps.len(),
                b.members.len()
            );
        }
        body.push_str("</g>");
        y += ROW;
        notes.sort_by(|a, b| a.0.total_cmp(&b.0));
        notes.dedup_by(|a, b| a.1 == b.1);
        for (nx, n) in notes {
            let _ = write!(
                body,
                "<text x=\"{:.1}\" y=\"{:.1}\" class=\"n\">{}</text>",
                nx.min(RIGHT - 200.0),
                y + 2.0,
                esc(&truncate(&n, 90))
            );
            y += NOTE;
        }
        y += 4.0;
    }

    // Gates: one arrow per (caller, callee) object pair, on the right.
    let mut pairs: BTreeMap<(String, String), (u64, u64, Vec<String>)> = BTreeMap::new();
    const SHARED: &str = "(shared code)";
    for g in r.gates.values() {
        // Entries from shared code (the loader running DT_FINI, libc
        // calling back) have no caller compartment.
        let from = if g.caller_comp.is_none() {
            SHARED
        } else {
            &g.caller
        };
        let e = pairs
            .entry((from.to_owned(), g.callee.clone()))
            .or_default();
        e.0 += 1;
        e.1 += g.calls;
        if g.calls > 0 {
            e.2.push(format!("{} ×{}", g.symbol, g.calls));
        }
    }
    let mut lane = 0.0;
    for ((from, to), (n, calls, list)) in &pairs {
        let Some(&y1) = band_y.get(to) else { continue };
        let x0 = RIGHT + 14.0;
        if from == SHARED {
            let _ = write!(
                body,
                "<g class=\"gate\"><title>shared code → {}: {n} gate(s), {calls} call(s)\n{}</title>\
                 <path d=\"M{:.1} {:.1} L{:.1} {:.1}\" stroke=\"#888\" stroke-width=\"1.2\" marker-end=\"url(#arrow)\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" class=\"g\">{calls} from shared</text></g>",
                esc(to),
                esc(&list.join("\n")),
                RIGHT - 40.0,
                y1 + 12.0,
                RIGHT - 4.0,
                y1 + 12.0,
                RIGHT - 110.0,
                y1 + 15.0
            );
            continue;
        }
        let Some(&y0) = band_y.get(from) else {
            continue;
        };
        let bulge = x0 + 30.0 + lane;
        lane += 14.0;
        let width = 1.0 + (*calls as f64 + 1.0).log10();
        let _ = write!(
            body,
            "<g class=\"gate\"><title>{} → {}: {n} gate(s), {calls} call(s)\n{}</title>\
             <path d=\"M{x0} {y0:.1} C{bulge:.1} {y0:.1} {bulge:.1} {y1:.1} {:.1} {y1:.1}\" fill=\"none\" stroke=\"#333\" stroke-width=\"{width:.1}\" marker-end=\"url(#arrow)\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" class=\"g\">{calls} calls</text></g>",
            esc(from),
            esc(to),
            esc(&list.join("\n")),
            x0 + 4.0,
            bulge - 26.0,
            (y0 + y1) / 2.0 + 4.0
        );
    }

    // Header: what the colours mean, and the gate traffic per compartment pair.
    let mut comps: Vec<u64> = r.objects.iter().filter_map(|o| o.compartment).collect();
    comps.sort();
    comps.dedup();
    let mut head = format!(
        "<text x=\"8\" y=\"22\" class=\"t\">{}</text>",
        esc(&truncate(title, 120))
    );
    let mut lx = 8.0;
    let mut legend = |fill: &str, label: &str| {
        let _ = write!(
            head,
            "<rect x=\"{lx}\" y=\"34\" width=\"14\" height=\"12\" fill=\"{fill}\"/>\
             <text x=\"{:.1}\" y=\"44\" class=\"s\">{}</text>",
            lx + 18.0,
            esc(label)
        );
        lx += 26.0 + 6.5 * label.len() as f64;
    };
    for &c in &comps {
        legend(colour(Some(c)), &format!("compartment {c}"));
    }
    legend(colour(None), "writable, shared (key 0)");
    legend(CARVEOUT, "carveout (shared on purpose)");
    legend("#8d8d8d", "text");
    legend("#c4c4c4", "read-only");
    let mut traffic: BTreeMap<(Option<u64>, Option<u64>), (u64, u64)> = BTreeMap::new();
    for g in r.gates.values() {
        let e = traffic.entry((g.caller_comp, g.callee_comp)).or_default();
        e.0 += 1;
        e.1 += g.calls;
    }
    let line = traffic
        .iter()
        .map(|((a, b), (n, c))| {
            let name = |x: &Option<u64>| x.map_or("shared".to_owned(), |c| format!("C{c}"));
            format!("{} → {}: {n} gates, {c} calls", name(a), name(b))
        })
        .collect::<Vec<_>>()
        .join(" · ");
    let faults = if r.faults.is_empty() {
        String::new()
    } else {
        format!(" · {} audit fault(s) ✕", r.faults.len())
    };
    let _ = write!(
        head,
        "<text x=\"8\" y=\"66\" class=\"s\">gates: {}{}</text>\
         <text x=\"8\" y=\"80\" class=\"a\">bands: objects in address order; segment widths grow with log(size); addresses relative to each object; hover for details</text>",
        esc(if line.is_empty() { "none" } else { &line }),
        esc(&faults)
    );
    let h = y + 10.0;
    format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{h:.0}\" viewBox=\"0 0 {W} {h:.0}\" font-family=\"DejaVu Sans, sans-serif\">\
         <defs><marker id=\"arrow\" viewBox=\"0 0 10 10\" refX=\"9\" refY=\"5\" markerWidth=\"6\" markerHeight=\"6\" orient=\"auto\"><path d=\"M0 0 L10 5 L0 10 z\" fill=\"#333\"/></marker></defs>\
         <style>.t{{font-size:15px;font-weight:bold}}.l{{font-size:12px;font-weight:bold}}.s{{font-size:10.5px;fill:#444}}.a{{font-size:9px;fill:#666}}.n{{font-size:9.5px;fill:#a04000}}.g{{font-size:9.5px;fill:#333}}</style>\
         <rect width=\"100%\" height=\"100%\" fill=\"#fff\"/>{head}{body}</svg>\n"
    )
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_owned()
    } else {
        s.chars().take(n - 1).collect::<String>() + "…"
    }
}

/// The picture in a standalone HTML page, with the carveout, gate and fault
/// tables under it (collapsible).
pub fn html(r: &Report, title: &str) -> String {
    let mut s = format!(
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{}</title>\
         <style>body{{font-family:sans-serif;margin:1em}}td,th{{padding:2px 8px;text-align:left;font-size:13px}}tr:nth-child(even){{background:#f4f4f4}}</style></head><body>\n{}",
        esc(title),
        svg(r, title)
    );
    let _ = write!(s, "<details open><summary>Carveouts ({})</summary><table><tr><th>name</th><th>toggle</th><th>pages</th><th>how it was found</th></tr>", r.carveouts.len());
    for c in &r.carveouts {
        let pages: Vec<String> = c
            .ranges
            .iter()
            .map(|(a, b)| format!("{a:#x}-{b:#x}"))
            .collect();
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}={}</td><td>{}</td><td>{}</td></tr>",
            esc(&c.name),
            esc(&c.toggle),
            u8::from(c.enabled),
            pages.join(" "),
            esc(&c.how)
        );
    }
    let _ = write!(s, "</table></details><details><summary>Gates ({})</summary><table><tr><th>symbol</th><th>caller</th><th>callee</th><th>calls</th></tr>", r.gates.len());
    let mut gates: Vec<&Gate> = r.gates.values().collect();
    gates.sort_by_key(|g| std::cmp::Reverse(g.calls));
    for g in gates {
        let _ = write!(
            s,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&g.symbol),
            esc(base_name(&g.caller)),
            esc(base_name(&g.callee)),
            g.calls
        );
    }
    let _ = write!(
        s,
        "</table></details><details open><summary>Audit faults ({})</summary><ul>",
        r.faults.len()
    );
    for f in &r.faults {
        let _ = write!(s, "<li>{}</li>", esc(&f.text));
    }
    s.push_str("</ul></details></body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(libs: usize) -> String {
        let mut s = String::from(
            r#"{"type":"object","index":0,"name":"/usr/bin/app","base":"0x1000000","kind":"Main","compartment":1,"pkey":1,"relro":null,"tls":null}
{"type":"object","index":1,"name":"/usr/lib/libplugin.so","base":"0x2000000","kind":"Application","compartment":2,"pkey":2,"relro":null,"tls":null}
{"type":"mapping","start":"0x1000000","end":"0x1002000","perms":"r-xp","pkey":0,"path":"/usr/bin/app"}
{"type":"mapping","start":"0x1002000","end":"0x1004000","perms":"rw-p","pkey":1,"path":"/usr/bin/app"}
{"type":"mapping","start":"0x2000000","end":"0x2010000","perms":"r-xp","pkey":0,"path":"/usr/lib/libplugin.so"}
{"type":"mapping","start":"0x2010000","end":"0x2012000","perms":"rw-p","pkey":2,"path":"/usr/lib/libplugin.so"}
{"type":"range","start":"0x1002000","end":"0x1003000","prot":"rw-","compartment":null,"pkey":0,"reason":"carveout copy_relocs (IA2_SHARE_COPY_RELOCS=1)"}
{"type":"carveout","name":"copy_relocs","toggle":"IA2_SHARE_COPY_RELOCS","enabled":true,"ranges":["0x1002000-0x1003000"],"how":"R_X86_64_COPY: stdout"}
{"type":"gate","gate":0,"caller":"/usr/bin/app","caller_compartment":1,"symbol":"plugin_run","callee":"/usr/lib/libplugin.so","callee_compartment":2}
{"type":"gate_calls","gate":0,"symbol":"plugin_run","callee":"/usr/lib/libplugin.so","compartment":2,"calls":42,"callers":["/usr/bin/app"]}
{"type":"audit_fault","pid":1,"site":0,"access":"read","addr":"0x1003010","page":"0x1003000","pkey":1,"page_compartment":1,"running_compartment":2,"rip_symbol":"plugin_run+0x10","symbol":"secret","fix":"IA2_SHARE=app:secret"}
"#,
        );
        for i in 0..libs {
            let base = 0x3000000 + i as u64 * 0x100000;
            s += &format!(
                "{{\"type\":\"object\",\"name\":\"/usr/lib/libx{i}.so\",\"base\":\"{base:#x}\",\"kind\":\"System\",\"compartment\":null,\"pkey\":0}}\n\
                 {{\"type\":\"mapping\",\"start\":\"{base:#x}\",\"end\":\"{:#x}\",\"perms\":\"r-xp\",\"pkey\":0,\"path\":\"/usr/lib/libx{i}.so\"}}\n",
                base + 0x4000
            );
        }
        s
    }

    #[test]
    fn picture_has_the_parts() {
        let r = Report::parse(&sample(3));
        let svg = svg(&r, "app");
        assert!(
            svg.contains("copy_relocs +0x2000 (IA2_SHARE_COPY_RELOCS=1)"),
            "{svg}"
        );
        assert!(svg.contains("42 calls"));
        assert!(svg.contains("fault +0x3010"));
        assert!(svg.contains("3 objects"));
        assert!(Json::parse("{}").is_ok());
    }

    #[test]
    fn two_hundred_libraries_collapse() {
        let r = Report::parse(&sample(200));
        let svg = svg(&r, "app");
        assert!(svg.contains("200 objects"), "not grouped");
        let h: f64 = svg
            .split("height=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert!(h < 600.0, "height {h}");
    }
}
