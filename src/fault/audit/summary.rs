//! The summary at exit or on a fatal signal: the minimal toggles and IA2_SHARE entries.

use super::*;

// ---------------------------------------------------------------- the summary

pub(in crate::fault) fn gkey(s: &Site) -> [usize; 3] {
    [
        s.gkey[0].load(Relaxed),
        s.gkey[1].load(Relaxed),
        s.gkey[2].load(Relaxed),
    ]
}

pub(in crate::fault) fn page_of(s: &Site) -> usize {
    page_down(s.page_key.load(Relaxed))
}

/// Is `page` shared by the fix of an emitted group before `leader`?
pub(in crate::fault) fn covered_before(
    c: Option<&Census>,
    leader: *const Site,
    page: usize,
) -> bool {
    for s in sites() {
        if core::ptr::eq(s, leader) {
            return false;
        }
        if !s.emitted.load(Relaxed) {
            continue;
        }
        let [code, arg, _] = gkey(s);
        if code == Class::Carveout(0).code() && s.fix[1].load(Relaxed) == 0 {
            // A toggle: its carveout's ranges.
            if let Some(l) = c.and_then(|c| c.carveouts.get(arg)) {
                if l.carveout
                    .ranges
                    .iter()
                    .any(|r: &Range| r.pages_out().contains(page))
                {
                    return true;
                }
            }
        } else if Range::new(s.fix[0].load(Relaxed), s.fix[1].load(Relaxed)).contains(page) {
            return true;
        }
    }
    false
}

/// Print the summary once: at exit, or on a fatal signal (`sig`).
pub fn summary(sig: Option<c_int>) {
    if !active() || SUMMARY_DONE.swap(true, AcqRel) {
        return;
    }
    // In strict mode libc's and ld.so's state (dladdr's) carries the libc
    // compartment's key: the shim is trusted, so allow every key meanwhile.
    let hw = crate::pku::backend() == crate::pku::Backend::Hardware;
    let before = crate::pku::read_pkru();
    if hw {
        crate::pku::write_pkru(0);
    }
    print_summary(sig);
    if hw {
        crate::pku::write_pkru(before);
    }
}

pub(in crate::fault) fn print_summary(sig: Option<c_int>) {
    let rt = runtime::get();
    // At exit nothing else holds the lock for long; in a signal handler
    // only try.
    let census = rt.and_then(|r| {
        if sig.is_none() {
            r.census.read().ok()
        } else {
            r.census.try_read().ok()
        }
    });
    let c = census.as_deref();
    let json = json();
    let p = pid();

    // Pass 1: classify each site and compute its group key and fix pages.
    for s in sites() {
        let addr = s.addr.load(Relaxed);
        let class = classify_site(c, s);
        let fix = Fix::for_site(c, class, addr);
        let (fk, fid) = fix.id();
        let arg = match class {
            Class::Carveout(i) => i,
            other => other.object().unwrap_or(0),
        };
        s.gkey[0].store(class.code(), Relaxed);
        s.gkey[1].store(arg, Relaxed);
        s.gkey[2].store(fk << 62 | fid, Relaxed);
        let pages = fix.pages();
        s.fix[0].store(pages.start, Relaxed);
        s.fix[1].store(pages.end, Relaxed);
        s.emitted.store(false, Relaxed);
    }

    // Pass 2: one line per group, in first-seen order.
    let (mut faults, mut nsites, mut groups) = (0u64, 0usize, 0usize);
    for s in sites() {
        faults += s.hits.load(Relaxed);
        nsites += 1;
    }
    let when = When(sig);
    if !json {
        let mut b = StackBuf::<512>::new();
        let _ = writeln!(
            b,
            "ia2shim[{p}]: ==== audit summary ({when}): {faults} protection-key fault{} at {nsites} distinct (page, key, RIP) site{} ====",
            plural(faults as usize),
            plural(nsites)
        );
        emit(&b);
    }
    for (k, lead) in sites().enumerate() {
        let key = gkey(lead);
        if sites().take(k).any(|e| gkey(e) == key) {
            continue;
        }
        groups += 1;
        let (mut g_faults, mut g_sites, mut g_pages) = (0u64, 0usize, 0usize);
        let mut covered = true;
        let mut hot = false;
        let members = || sites().skip(k).filter(move |e| gkey(e) == key);
        for (j, e) in members().enumerate() {
            g_faults += e.hits.load(Relaxed);
            g_sites += 1;
            hot |= promoted(e.page_key.load(Relaxed));
            if !members().take(j).any(|x| page_of(x) == page_of(e)) {
                g_pages += 1;
                covered &= covered_before(c, lead, page_of(e));
            }
        }
        lead.emitted.store(!covered, Relaxed);
        let addr = lead.addr.load(Relaxed);
        let pkey = (lead.page_key.load(Relaxed) & (PAGE - 1)) as u32;
        let class = classify_site(c, lead);
        let (object, section) = class.describe(c);
        let sym = if matches!(class, Class::Heap { .. }) {
            None
        } else {
            sym_info(addr)
        };
        let fix = Fix::for_site(c, class, addr);
        let rip = lead.rip.load(Relaxed);
        let rip_sym = sym_text(rip);
        let page_c = rt.and_then(|r| r.compartment_of_key(pkey));
        let run_c = running_compartment(rt, lead.pkru.load(Relaxed));
        let mut b = StackBuf::<2048>::new();
        if json {
            let _ = writeln!(
                b,
                "{{\"type\":\"audit_group\",\"pid\":{p},\"group\":{groups},\"class\":\"{}\",\"object\":{},\"section\":{},\"symbol\":{},\"pkey\":{pkey},\"page_compartment\":{},\"running_compartment\":{},\"faults\":{g_faults},\"sites\":{g_sites},\"pages\":{g_pages},\"first_rip\":\"{rip:#x}\",\"first_rip_symbol\":{},\"fix\":\"{}\",\"covered\":{covered},\"shared_early\":{hot}}}",
                class.kind(),
                J(object),
                J(section_text(section).as_str()),
                sym.as_ref().map_or(J(""), |s| J(s.name)),
                N(page_c),
                N(run_c),
                J(rip_sym.as_str()),
                share_assignment(&fix).as_str(),
            );
        } else {
            let _ = write!(b, "ia2shim[{p}]:   [{groups}] ");
            if !object.is_empty() {
                let _ = write!(b, "{object} ");
            }
            let _ = write!(b, "{section}");
            if let Some(s) = &sym {
                let _ = write!(b, ", symbol {}", s.name);
            } else if let Class::Heap { site, .. } = class {
                let _ = write!(b, ", allocated at ");
                let _ = write_heap_term(&mut b, site);
            } else if !matches!(class, Class::Carveout(_)) {
                let _ = write!(b, ", page {:#x}", page_down(addr));
            }
            let _ = write!(
                b,
                ": {g_faults} fault{}, {g_sites} site{}, {g_pages} page{}, key {pkey}",
                plural(g_faults as usize),
                plural(g_sites),
                plural(g_pages)
            );
            if let Some(c) = page_c {
                let _ = write!(b, " = compartment {c}");
            }
            if let Some(c) = run_c {
                let _ = write!(b, ", by compartment {c}");
            }
            let _ = write!(b, "; first at {}", rip_sym.as_str());
            if hot {
                let _ = write!(
                    b,
                    "; shared after {HOT_PAGE} faults on a page (later accesses not counted)"
                );
            }
            if covered {
                let _ = writeln!(b, "; already shared by an entry above");
            } else {
                let _ = writeln!(b, "; fix {}", share_assignment(&fix).as_str());
            }
        }
        emit(&b);
    }

    // The policy: toggles (space-separated), then the IA2_SHARE entries
    // (comma-separated). Kept small: this may run on a signal stack.
    let dropped = DROPPED.load(Relaxed);
    let mut toggles = StackBuf::<512>::new();
    let mut list = StackBuf::<4096>::new();
    for s in sites().filter(|s| s.emitted.load(Relaxed)) {
        let addr = s.addr.load(Relaxed);
        let fix = Fix::for_site(c, classify_site(c, s), addr);
        let (buf, sep): (&mut dyn Write, &str) = match fix {
            // No run-independent term for heap or anonymous pages.
            Fix::Page(_) => continue,
            // Heap sites come from the allocator's learned set, below.
            Fix::Heap(_) => continue,
            Fix::Toggle(_) if toggles.as_bytes().is_empty() => (&mut toggles, ""),
            Fix::Toggle(_) => (&mut toggles, " "),
            _ if list.as_bytes().is_empty() => (&mut list, ""),
            _ => (&mut list, ","),
        };
        let _ = write!(buf, "{sep}{}", fix.entry());
    }
    // Every allocation site whose blocks another compartment touched
    // (learned by the allocator, which also counts faults on pages that were
    // shared early), each term once.
    let mut heap_list = StackBuf::<4096>::new();
    for (id, _) in crate::alloc::sites::all()
        .filter(|(_, s)| s.flags.load(Relaxed) & crate::alloc::sites::LEARNED != 0)
    {
        let mut t = StackBuf::<512>::new();
        let _ = write_heap_term(&mut t, id);
        if !heap_list.as_str().split(',').any(|e| e == t.as_str()) {
            let sep = if heap_list.as_bytes().is_empty() {
                ""
            } else {
                ","
            };
            let _ = write!(heap_list, "{sep}{}", t.as_str());
        }
    }
    let (toggles, list, heap_list) = (toggles.as_str(), list.as_str(), heap_list.as_str());
    let mut env = StackBuf::<8704>::new();
    let _ = write!(env, "{toggles}");
    if !list.is_empty() {
        let sep = if toggles.is_empty() { "" } else { " " };
        let _ = write!(env, "{sep}IA2_SHARE='{list}'");
    }
    if !heap_list.is_empty() {
        let sep = if env.as_bytes().is_empty() { "" } else { " " };
        let _ = write!(env, "{sep}IA2_HEAP_SHARED='{heap_list}'");
    }
    let clean = faults == 0 && dropped == 0;
    let mut b = StackBuf::<16384>::new();
    if json {
        let _ = write!(
            b,
            "{{\"type\":\"audit_summary\",\"pid\":{p},\"reason\":\"{when}\",\"faults\":{faults},\"sites\":{nsites},\"groups\":{groups},\"dropped\":{dropped},\"clean\":{clean},\"toggles\":["
        );
        for (i, t) in toggles.split(' ').filter(|t| !t.is_empty()).enumerate() {
            let _ = write!(b, "{}{}", if i > 0 { "," } else { "" }, J(t));
        }
        let _ = write!(b, "],\"share\":[");
        for (i, e) in list.split(',').filter(|e| !e.is_empty()).enumerate() {
            let _ = write!(b, "{}{}", if i > 0 { "," } else { "" }, J(e));
        }
        let _ = write!(b, "],\"heap_shared\":[");
        for (i, e) in heap_list.split(',').filter(|e| !e.is_empty()).enumerate() {
            let _ = write!(b, "{}{}", if i > 0 { "," } else { "" }, J(e));
        }
        let _ = writeln!(b, "],\"env\":{}}}", J(env.as_str()));
    } else {
        if dropped > 0 {
            let _ = writeln!(
                b,
                "ia2shim[{p}]: audit: the site table was full: {dropped} more faults were let through unrecorded"
            );
        }
        if clean {
            let _ = writeln!(
                b,
                "ia2shim[{p}]: audit: the run was clean: no protection-key faults"
            );
        } else {
            let _ = writeln!(
                b,
                "ia2shim[{p}]: audit: {groups} group{}; to run clean: {}",
                plural(groups),
                env.as_str()
            );
        }
    }
    emit(&b);
}

pub(in crate::fault) fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// Why the summary is printed.
pub(in crate::fault) struct When(pub(in crate::fault) Option<c_int>);

impl fmt::Display for When {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            None => f.write_str("exit"),
            Some(sig) => write!(f, "signal {sig}"),
        }
    }
}

/// Is audit mode configured?
pub(in crate::fault) fn configured() -> bool {
    runtime::get().is_some_and(|r| r.config.on_fault == OnFault::Audit)
}
