//! Slot patching: GOT slots, DT_FINI/DT_FINI_ARRAY, the WRPKRU scan of compartment code.

use super::*;

// ---------------------------------------------------------------- slot writes

/// Write `value` into each `slot`, making read-only pages writable for the
/// moment (plain `mprotect` keeps each page's key) and restoring them.
pub(super) fn write_slots(writes: &[(usize, usize)], maps: &[crate::maps::Mapping]) {
    let mut by_page: Vec<(usize, usize, usize)> =
        writes.iter().map(|&(s, v)| (page_down(s), s, v)).collect();
    by_page.sort_unstable();
    let mut i = 0;
    while i < by_page.len() {
        let page = by_page[i].0;
        let mut j = i;
        while j < by_page.len() && by_page[j].0 == page {
            j += 1;
        }
        let prot = maps
            .iter()
            .find(|m| m.contains(page))
            .map(|m| m.prot)
            .unwrap_or_else(|| {
                crate::lifecycle::fatal(format_args!("GOT page {page:#x} is in no mapping"))
            });
        let writable = prot & libc::PROT_WRITE != 0;
        if !writable {
            // SAFETY: a page of a loaded object's GOT/RELRO; writable only
            // for the writes below, then back to its protection. No page is
            // made executable.
            let r = unsafe {
                libc::mprotect(
                    page as *mut c_void,
                    PAGE,
                    (prot | libc::PROT_WRITE) & !libc::PROT_EXEC,
                )
            };
            if r != 0 {
                crate::lifecycle::fatal(format_args!(
                    "mprotect({page:#x}, writable) for GOT patching failed (errno {})",
                    crate::stackfmt::errno()
                ));
            }
        }
        for &(_, slot, value) in &by_page[i..j] {
            // SAFETY: slot is an aligned GOT/fini slot of a loaded object,
            // now writable; the compartment keys are all accessible here
            // (start-up, or the dlopen hook's all-keys section).
            unsafe { core::ptr::write_volatile(slot as *mut usize, value) };
        }
        if !writable {
            // SAFETY: back to the protection the page had.
            let r = unsafe { libc::mprotect(page as *mut c_void, PAGE, prot) };
            if r != 0 {
                crate::lifecycle::fatal(format_args!(
                    "mprotect({page:#x}) restoring protection after GOT patching failed (errno {})",
                    crate::stackfmt::errno()
                ));
            }
        }
        i = j;
    }
}

// ---------------------------------------------------------------- patching

/// The executable and application libraries: the objects whose calls gates
/// switch (system objects may be in a compartment only in strict mode,
/// where calls into them keep the caller's rights).
pub(super) fn is_app(o: &LoadedObject) -> bool {
    matches!(o.kind, ObjectKind::Main | ObjectKind::Application)
}

/// Is `addr` inside an executable segment of `o`?
pub(super) fn in_text(o: &LoadedObject, addr: usize) -> bool {
    o.segments
        .iter()
        .any(|s| s.executable() && s.range.contains(addr))
}

pub(super) fn symbol_name_at(addr: usize) -> Option<String> {
    // SAFETY: zeroed Dl_info is valid for dladdr to fill.
    let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
    // SAFETY: dladdr only reads loader data.
    if unsafe { libc::dladdr(addr as *const c_void, &mut info) } != 0 && !info.dli_sname.is_null() {
        // SAFETY: a NUL-terminated string owned by the loader.
        let name = unsafe { CStr::from_ptr(info.dli_sname) }.to_string_lossy();
        let off = addr.wrapping_sub(info.dli_saddr as usize);
        if off == 0 {
            return Some(name.into_owned());
        }
        return Some(format!("{name}+{off:#x}"));
    }
    None
}

/// Resolve `name` as the dynamic linker would for a lazily bound slot.
pub(super) fn resolve_lazy(name: &str) -> usize {
    let Ok(c) = std::ffi::CString::new(name) else {
        return 0;
    };
    // SAFETY: dlsym with RTLD_DEFAULT and a NUL-terminated name.
    unsafe { libc::dlsym(libc::RTLD_DEFAULT, c.as_ptr()) as usize }
}

/// Patch the GOT slots and destructors of census objects `which` (those in
/// a compartment), and scan their code for WRPKRU/XRSTOR. Called at
/// start-up for every object and by the dlopen hook for new ones. PKRU must
/// allow every compartment key.
pub fn patch_objects(rt: &Runtime, census: &Census, which: core::ops::Range<usize>) {
    let mut st = state();
    let count = rt.config.reports.gates;
    let variant = Variant::current(count);
    // The census's own read of /proc/self/maps: applying the plan kept
    // every page's protection.
    let maps = &census.maps;
    let gating = st.enabled;
    // Entry gates first, so that the slot pass knows which targets switch
    // on their own.
    if gating && st.entry {
        // Timed only for the log: the first clock read of a process maps
        // the vDSO's data page.
        let t = log::log_enabled!(log::Level::Info).then(std::time::Instant::now);
        let before = st.entries.len();
        for i in which.clone() {
            gate_exports(&mut st, rt, census, i, variant);
        }
        // The pass's /proc/self/mem, if a write needed it.
        st.text_writer = None;
        if let Some(t) = t {
            log::info!(
                "entry gates: {} installed in {} µs",
                st.entries.len() - before,
                t.elapsed().as_micros()
            );
        }
    }
    let mut writes: Vec<(usize, usize)> = Vec::new();
    for i in which {
        let Some(own) = census.compartment_of.get(i).copied().flatten() else {
            continue;
        };
        let obj = &census.objects[i];
        // System objects (ld.so, libc, … in strict mode's compartment) are
        // trusted code, as in IA2: not scanned, not gated, their callers'
        // rights unchanged.
        if !is_app(obj) || obj.segments.is_empty() {
            continue;
        }
        scan_object(&mut st, rt, obj);
        if !gating {
            continue;
        }
        let Some(dynamic) = obj.dynamic_info() else {
            continue;
        };
        let lazy = !dynamic.bind_now();
        for r in dynamic.relocations(obj.base) {
            let via = match r.r_type {
                elf::R_X86_64_JUMP_SLOT => Via::JumpSlot,
                elf::R_X86_64_GLOB_DAT => Via::GlobDat,
                _ => continue,
            };
            if r.sym == 0 || !obj.contains(r.slot) {
                continue;
            }
            // SAFETY: the index comes from this object's own relocation.
            let Some(sym) = (unsafe { dynamic.symbol(r.sym) }) else {
                continue;
            };
            // SAFETY: the slot is an aligned GOT word of this loaded object.
            let mut value = unsafe { core::ptr::read_volatile(r.slot as *const usize) };
            if lazy && via == Via::JumpSlot && obj.contains(value) {
                // Still the lazy PLT stub (or a function of the object itself).
                let resolved = resolve_lazy(sym.name);
                if resolved == 0 || obj.contains(resolved) {
                    continue;
                }
                value = resolved;
            }
            if value == 0 {
                continue;
            }
            let Some((owner_index, owner)) = census.object_at(value) else {
                continue;
            };
            let Some(theirs) = census.compartment_of[owner_index] else {
                continue;
            };
            // Strict mode's system objects: gated only as union gates, as
            // `IA2_LIBC_GATES` and `IA2_TLS_GET_ADDR_GATE` say (libc_gates.rs).
            let union = !is_app(owner)
                && theirs != own
                && crate::libc_gates::gated(
                    rt.config.libc_gates,
                    sym.name,
                    rt.config.tls_get_addr_gate && owner.kind == ObjectKind::Loader,
                );
            if theirs == own || owner_index == i || (!is_app(owner) && !union) {
                continue;
            }
            let is_function = match sym.st_type {
                elf::STT_FUNC | elf::STT_GNU_IFUNC => true,
                elf::STT_NOTYPE => in_text(owner, value),
                _ => false,
            };
            // The callee has an entry gate. A `GLOB_DAT` slot (`&function`)
            // stays as the loader set it, so pointers compare equal, and the
            // entry gate switches. A `JUMP_SLOT` (a direct call) gets a GOT
            // gate straight to the relocated body, which skips the entry's
            // check: one `jmp` more than a GOT gate into the function itself.
            let mut target = value;
            if let Some(&e) = st.entry_by_function.get(&value) {
                if is_function && !union && st.entries[e].compartment == theirs {
                    if via == Via::JumpSlot && st.got {
                        target = st.entries[e].body;
                    } else {
                        st.entry_slots.push(EntrySlot {
                            entry: e,
                            caller: obj.display_name().to_string(),
                            caller_compartment: own,
                            slot: r.slot,
                            via,
                        });
                        continue;
                    }
                }
            }
            if !is_function {
                st.data_imports.push(DataImport {
                    importer: obj.display_name().to_string(),
                    importer_compartment: own,
                    symbol: sym.name.to_string(),
                    owner: owner.display_name().to_string(),
                    owner_compartment: theirs,
                    address: value,
                    page_compartment: census.plan.lookup(value).and_then(|e| e.compartment),
                });
                continue;
            }
            if !union && !st.got {
                continue;
            }
            let g = gate_for(
                &mut st,
                rt,
                target,
                theirs,
                sym.name,
                owner.display_name(),
                if union { Variant::union() } else { variant },
            );
            writes.push((r.slot, stub_address(g)));
            st.patches.push(Patch {
                gate: g,
                caller: obj.display_name().to_string(),
                caller_compartment: Some(own),
                slot: r.slot,
                via,
            });
        }
        // Strict mode without libc gates: every object's first destructor
        // calls libc's `__cxa_finalize`, whose atexit list is
        // libc-compartment data, so destructors keep the rights of the
        // thread that calls `exit`. With libc gates that call is gated.
        if rt.config.libc_compartment.is_none()
            || rt.config.libc_gates != crate::config::LibcGates::None
        {
            patch_fini(&mut st, rt, obj, own, variant, &mut writes);
        }
    }
    write_slots(&writes, maps);
}

/// Point `DT_FINI` and each `DT_FINI_ARRAY` entry of `obj` at gates into
/// its own compartment.
pub(super) fn patch_fini(
    st: &mut State,
    rt: &Runtime,
    obj: &LoadedObject,
    own: u8,
    variant: Variant,
    writes: &mut Vec<(usize, usize)>,
) {
    let Some(d) = obj.dynamic_info() else { return };
    if d.fini_array != 0 && d.fini_arraysz != 0 {
        for k in 0..d.fini_arraysz / 8 {
            let slot = d.fini_array + 8 * k;
            // SAFETY: DT_FINI_ARRAY describes an array of function pointers
            // in this object's (mapped) image.
            let f = unsafe { core::ptr::read_volatile(slot as *const usize) };
            if f == 0 || f == usize::MAX || !in_text(obj, f) {
                continue;
            }
            let name = symbol_name_at(f).unwrap_or_else(|| format!("DT_FINI_ARRAY[{k}]"));
            let g = gate_for(st, rt, f, own, &name, obj.display_name(), variant);
            writes.push((slot, stub_address(g)));
            st.patches.push(Patch {
                gate: g,
                caller: obj.display_name().to_string(),
                caller_compartment: None,
                slot,
                via: Via::FiniArray(k),
            });
        }
    }
    // DT_FINI's d_ptr stays relative to the load address (glibc does not
    // rebase it), and ld.so reads it from the dynamic section at exit.
    let Some(dynamic) = obj.dynamic else { return };
    let mut p = dynamic as *const elf::Dyn64<object::LittleEndian>;
    loop {
        // SAFETY: the object's DT_NULL-terminated dynamic section.
        let e = unsafe { &*p };
        let tag = e.d_tag.get(object::LittleEndian) as u32;
        if tag == elf::DT_NULL {
            break;
        }
        if tag == elf::DT_FINI {
            let f = obj
                .base
                .wrapping_add(e.d_val.get(object::LittleEndian) as usize);
            if in_text(obj, f) {
                let name = symbol_name_at(f).unwrap_or_else(|| "DT_FINI".to_string());
                let g = gate_for(st, rt, f, own, &name, obj.display_name(), variant);
                let slot = p as usize + 8;
                writes.push((slot, stub_address(g).wrapping_sub(obj.base)));
                st.patches.push(Patch {
                    gate: g,
                    caller: obj.display_name().to_string(),
                    caller_compartment: None,
                    slot,
                    via: Via::Fini,
                });
            }
        }
        // SAFETY: not past DT_NULL yet.
        p = unsafe { p.add(1) };
    }
}

pub(super) fn scan_object(st: &mut State, rt: &Runtime, obj: &LoadedObject) {
    if rt.config.scan_wrpkru == ScanWrpkru::Off {
        return;
    }
    let cache = scan_cache_path(rt, obj);
    let hits = match cache.as_ref().and_then(|(_, path)| cached_scan(obj, path)) {
        Some(hits) => hits,
        None => {
            let mut hits = Vec::new();
            for s in obj.segments.iter().filter(|s| s.executable()) {
                // SAFETY: an executable PT_LOAD segment of a loaded object:
                // mapped and readable (text is never tagged).
                let bytes = unsafe {
                    core::slice::from_raw_parts(s.range.start as *const u8, s.range.len())
                };
                for h in crate::scan::scan(bytes) {
                    hits.push((s.range.start - obj.base + h.offset, h.kind));
                }
            }
            if let Some((dir, path)) = &cache {
                let mut text = String::new();
                for (off, kind) in &hits {
                    let k = match kind {
                        crate::scan::Kind::Wrpkru => 'w',
                        crate::scan::Kind::Xrstor { rex: false } => 'x',
                        crate::scan::Kind::Xrstor { rex: true } => 'r',
                    };
                    text += &format!("{off:x} {k}\n");
                }
                text += "end\n";
                if let Err(e) = crate::carveouts::cache::append(dir, path, &text) {
                    log::debug!("IA2_CACHE_DIR: cannot write {path}: {e}");
                }
            }
            hits
        }
    };
    let hits: Vec<ScanHit> = hits
        .into_iter()
        .map(|(offset, kind)| ScanHit {
            object: obj.display_name().to_string(),
            offset,
            what: kind.describe(),
        })
        .collect();
    const SHOWN: usize = 16;
    for h in hits.iter().take(SHOWN) {
        log::warn!(
            "IA2_SCAN_WRPKRU: {} at {}+{:#x} (compartment code can change its own rights)",
            h.what,
            h.object,
            h.offset
        );
    }
    if hits.len() > SHOWN {
        log::warn!(
            "IA2_SCAN_WRPKRU: … and {} more in {}",
            hits.len() - SHOWN,
            obj.display_name()
        );
    }
    if rt.config.scan_wrpkru == ScanWrpkru::Deny {
        if let Some(h) = hits.first() {
            crate::lifecycle::fatal(format_args!(
                "IA2_SCAN_WRPKRU=deny: {} at {}+{:#x} ({} such sequence(s) in this object)",
                h.what,
                h.object,
                h.offset,
                hits.len()
            ));
        }
    }
    st.scan_hits.extend(hits);
}

/// Where `IA2_SCAN_WRPKRU=warn` keeps an object's hits across runs, under
/// its build-id: (directory, file). `deny` always scans: the decision must
/// be the bytes', not a file's; `warn` only reports, and the scan reads
/// all of the object's text (libdav1d: 1.5 MB, 1.1 M instructions and
/// the page faults, at every start).
fn scan_cache_path(rt: &Runtime, obj: &LoadedObject) -> Option<(String, String)> {
    // Below this much text, scanning costs less than reading a file.
    const WORTH: usize = 256 << 10;
    let text: usize = obj
        .segments
        .iter()
        .filter(|s| s.executable())
        .map(|s| s.range.len())
        .sum();
    if rt.config.scan_wrpkru != ScanWrpkru::Warn || text < WORTH {
        return None;
    }
    let (dir, id) = (rt.config.cache_dir()?, obj.build_id()?);
    let path = format!("{dir}/scan-v1-{}", crate::carveouts::cache::hex(id));
    Some((dir, path))
}

/// The hits (offset from the base, kind) a complete cache file lists:
/// lines `OFF w|x|r` up to the first `end`; `None` if there is none, or a
/// line does not parse or lies outside the object's text.
fn cached_scan(obj: &LoadedObject, path: &str) -> Option<Vec<(usize, crate::scan::Kind)>> {
    let text = crate::files::read_to_string(path, 4096).ok()?;
    let mut hits = Vec::new();
    for line in text.lines() {
        if line == "end" {
            return Some(hits);
        }
        let (off, k) = line.split_once(' ')?;
        let off = usize::from_str_radix(off, 16).ok()?;
        let kind = match k {
            "w" => crate::scan::Kind::Wrpkru,
            "x" => crate::scan::Kind::Xrstor { rex: false },
            "r" => crate::scan::Kind::Xrstor { rex: true },
            _ => return None,
        };
        if !in_text(obj, obj.base.checked_add(off)?) {
            return None;
        }
        hits.push((off, kind));
    }
    None
}
