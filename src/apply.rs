//! Carrying out a plan: `pkey_mprotect` each tagged range with the key that
//! the kernel returned for its logical compartment.

use crate::pku;
use crate::plan::{Plan, PlanEntry};

/// Tag every range of `plan` that carries a compartment. `keys[c]` is the
/// key of compartment `c`. Returns the first entry that failed, with errno.
pub fn apply(plan: &Plan, keys: &[u32; 16]) -> Result<(), (PlanEntry, i32)> {
    for e in plan.tagged() {
        let c = e.compartment.unwrap_or(0) as usize;
        let key = keys[c];
        if key == 0 {
            return Err((e.clone(), libc::EINVAL));
        }
        pku::protect(e.range.start, e.range.len(), e.prot, key)
            .map_err(|errno| (e.clone(), errno))?;
    }
    Ok(())
}

/// Put every range of `plan` that carries a compartment back on key 0.
pub fn unapply(plan: &Plan) -> Result<(), (PlanEntry, i32)> {
    for e in plan.tagged() {
        pku::protect(e.range.start, e.range.len(), e.prot, 0)
            .map_err(|errno| (e.clone(), errno))?;
    }
    Ok(())
}
