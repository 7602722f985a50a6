//! How much of each compartment stays private: per compartment, the bytes
//! of writable static data and of the main thread's TLS blocks that carry
//! its key, and for the rest, why it stays shared (`IA2_REPORT=summary` and
//! the plan). A policy that shares everything runs clean and protects
//! nothing; this is the number that tells the two apart.

use crate::objects::{LoadedObject, Range};
use crate::plan::{data_pages, Plan, Reason};

/// One compartment's private and shared bytes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Privacy {
    pub compartment: u8,
    /// The compartment's objects, by name.
    pub objects: Vec<String>,
    pub data_private: usize,
    pub data_shared: usize,
    pub tls_private: usize,
    pub tls_shared: usize,
    /// Why the shared bytes are shared: (reason, bytes), largest first.
    pub why_shared: Vec<(String, usize)>,
}

impl Privacy {
    /// Private bytes over all bytes, in percent (100 with nothing to protect).
    pub fn private_percent(&self) -> f64 {
        let private = self.data_private + self.tls_private;
        let all = private + self.data_shared + self.tls_shared;
        if all == 0 {
            100.0
        } else {
            100.0 * private as f64 / all as f64
        }
    }
}

fn why(reason: &Reason) -> String {
    match reason {
        Reason::Carveout { name, toggle } => format!("carveout {name} ({toggle})"),
        Reason::TlsShared { .. } => {
            "TLS page shared with another module's block or the TCB".to_string()
        }
        Reason::LoaderHeap => "loader heap".to_string(),
        Reason::Data { .. } | Reason::Tls { .. } => "tagged for another compartment".to_string(),
    }
}

/// Split `r` over the plan: (private bytes, [(why, bytes)] for the rest).
fn split(plan: &Plan, c: u8, r: Range, why_shared: &mut Vec<(String, usize)>) -> (usize, usize) {
    let (mut private, mut shared) = (0, 0);
    let mut at = r.start;
    let mut add = |w: String, n: usize| match why_shared.iter_mut().find(|(x, _)| *x == w) {
        Some((_, b)) => *b += n,
        None => why_shared.push((w, n)),
    };
    let first = plan.entries.partition_point(|e| e.range.end <= r.start);
    for e in plan.entries[first..]
        .iter()
        .take_while(|e| e.range.start < r.end)
    {
        let (s, t) = (e.range.start.max(r.start), e.range.end.min(r.end));
        if s > at {
            shared += s - at;
            add("not in the plan".to_string(), s - at);
        }
        if e.compartment == Some(c) {
            private += t - s;
        } else {
            shared += t - s;
            add(why(&e.reason), t - s);
        }
        at = t;
    }
    if at < r.end {
        shared += r.end - at;
        add("not in the plan".to_string(), r.end - at);
    }
    (private, shared)
}

/// Per compartment in use, in compartment order.
pub fn summarize(
    objects: &[LoadedObject],
    compartment_of: &[Option<u8>],
    plan: &Plan,
) -> Vec<Privacy> {
    let mut out: Vec<Privacy> = Vec::new();
    for (i, o) in objects.iter().enumerate() {
        let Some(c) = compartment_of.get(i).copied().flatten() else {
            continue;
        };
        let p = match out.iter().position(|p| p.compartment == c) {
            Some(k) => &mut out[k],
            None => {
                out.push(Privacy {
                    compartment: c,
                    ..Privacy::default()
                });
                out.last_mut().unwrap()
            }
        };
        p.objects.push(o.basename.clone());
        for r in data_pages(o) {
            let (a, b) = split(plan, c, r, &mut p.why_shared);
            p.data_private += a;
            p.data_shared += b;
        }
        if let Some(t) = o.tls.filter(|t| t.block != 0 && t.memsz != 0) {
            let (a, b) = split(
                plan,
                c,
                Range::new(t.block, t.block + t.memsz),
                &mut p.why_shared,
            );
            p.tls_private += a;
            p.tls_shared += b;
        }
    }
    for p in &mut out {
        p.why_shared
            .sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    }
    out.sort_by_key(|p| p.compartment);
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::PlanEntry;

    fn entry(s: usize, e: usize, c: Option<u8>, reason: Reason) -> PlanEntry {
        PlanEntry {
            range: Range::new(s, e),
            compartment: c,
            prot: 3,
            reason,
        }
    }

    #[test]
    fn split_counts_private_carveouts_and_gaps() {
        let plan = Plan {
            entries: vec![
                entry(0x1000, 0x3000, Some(2), Reason::Data { object: 0 }),
                entry(
                    0x3000,
                    0x4000,
                    None,
                    Reason::Carveout {
                        name: "copy_relocs",
                        toggle: "IA2_SHARE_COPY_RELOCS",
                    },
                ),
            ],
            untagged_tls: Vec::new(),
        };
        let mut why = Vec::new();
        let (p, s) = split(&plan, 2, Range::new(0x1000, 0x5000), &mut why);
        assert_eq!((p, s), (0x2000, 0x2000));
        assert!(why.contains(&(
            "carveout copy_relocs (IA2_SHARE_COPY_RELOCS)".to_string(),
            0x1000
        )));
        assert!(why.contains(&("not in the plan".to_string(), 0x1000)));
        let mut why = Vec::new();
        assert_eq!(
            split(&plan, 3, Range::new(0x1000, 0x2000), &mut why),
            (0, 0x1000)
        );
        assert_eq!(why[0].0, "tagged for another compartment");
    }
}
