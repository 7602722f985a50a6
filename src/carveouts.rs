//! One locator per named carveout (DESIGN.md, "Carveouts"). Each returns the
//! ranges to keep on key 0, or says why it found nothing.

use crate::config::Config;
use crate::objects::Range;
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
    located.iter().filter(|l| l.enabled).map(|l| l.carveout.clone()).collect()
}

/// Which carveout, if any, covers `addr` (for fault reports).
pub fn covering<'a>(located: &'a [Located], addr: usize) -> Option<&'a Located> {
    located
        .iter()
        .find(|l| l.carveout.ranges.iter().any(|r: &Range| r.pages_out().contains(addr)))
}
