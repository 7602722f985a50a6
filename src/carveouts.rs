//! One locator per named carveout (DESIGN.md, "Carveouts"). Each returns the
//! ranges to keep on key 0, or says why it found nothing.

use crate::config::Config;
use crate::objects::{LoadedObject, Range};
use crate::plan::Carveout;
use crate::tls;

/// What a locator found, for the plan and for the report.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Located {
    pub carveout: Carveout,
    /// How the ranges were found.
    pub how: String,
    pub enabled: bool,
}

/// The calling thread's `tcb`, `below_tcb` and `dtv` carveouts.
pub fn thread_carveouts(config: &Config) -> Vec<Located> {
    let tp = tls::thread_pointer();
    let dtv = tls::dtv_pointer();
    // SAFETY: the calling thread's own DTV pointer.
    let dtv_range = unsafe { tls::dtv_range(dtv) };
    vec![
        Located {
            carveout: Carveout {
                name: "tcb",
                toggle: "IA2_SHARE_TCB",
                ranges: vec![tls::tcb_page(tp)],
            },
            how: format!("thread pointer %fs:0 = {tp:#x}"),
            enabled: config.share_tcb,
        },
        Located {
            carveout: Carveout {
                name: "below_tcb",
                toggle: "IA2_SHARE_BELOW_TCB",
                ranges: vec![tls::below_tcb_page(tp)],
            },
            how: format!("page below the TCB page of {tp:#x}"),
            enabled: config.share_below_tcb,
        },
        Located {
            carveout: Carveout {
                name: "dtv",
                toggle: "IA2_SHARE_DTV",
                ranges: vec![dtv_range.pages_out()],
            },
            how: format!("DTV pointer %fs:8 = {dtv:#x}, extent {dtv_range} including dtv[-1]"),
            enabled: config.share_dtv,
        },
    ]
}

/// The carveouts that are switched on, as plan input.
pub fn enabled(located: &[Located]) -> Vec<Carveout> {
    located
        .iter()
        .filter(|l| l.enabled)
        .map(|l| l.carveout.clone())
        .collect()
}

/// Which carveout, if any, covers `addr` (for fault reports).
pub fn covering(located: &[Located], addr: usize) -> Option<&Located> {
    located.iter().find(|l| {
        l.carveout
            .ranges
            .iter()
            .any(|r: &Range| r.pages_out().contains(addr))
    })
}

/// `copy_relocs`: the executable's copies of data defined by shared objects
/// (`R_X86_64_COPY`, e.g. libc's `stdout`, `stderr`, `environ`). After
/// copy relocation the copy is the only instance, and libc's own code reads
/// it, so a compartment that calls `printf` needs it on key 0.
pub fn copy_relocs(
    config: &Config,
    objects: &[LoadedObject],
    compartment_of: &[Option<u8>],
) -> Located {
    let mut ranges = Vec::new();
    let mut names = Vec::new();
    for (i, o) in objects.iter().enumerate() {
        if compartment_of.get(i).copied().flatten().is_none() {
            continue;
        }
        let Some(d) = o.dynamic_info() else { continue };
        for r in d.relocations(o.base) {
            if r.r_type != object::elf::R_X86_64_COPY {
                continue;
            }
            // SAFETY: the index comes from this object's own relocation.
            let sym = unsafe { d.symbol(r.sym) };
            let size = sym.map_or(8, |s| s.size.max(1) as usize);
            ranges.push(Range::new(r.slot, r.slot + size).pages_out());
            if let Some(s) = sym {
                names.push(s.name);
            }
        }
    }
    ranges.sort();
    ranges.dedup();
    let how = if names.is_empty() {
        "no R_X86_64_COPY relocations in compartment objects".to_string()
    } else {
        format!("R_X86_64_COPY relocations: {}", names.join(", "))
    };
    Located {
        carveout: Carveout {
            name: "copy_relocs",
            toggle: "IA2_SHARE_COPY_RELOCS",
            ranges,
        },
        how,
        enabled: config.share_copy_relocs,
    }
}
