//! The confused-deputy rule for code addresses that one compartment hands
//! the shim to run later: thread start routines (`pthread_create`), signal
//! handlers (`sigaction`, `signal`) and C++ terminate handlers
//! (`std::set_terminate`). Such code runs with the rights
//! of the compartment that owns it only when the registering code could have
//! entered it anyway: the registrant already holds that compartment's key,
//! or the address is an exported function of its object (a `.dynsym`
//! function symbol, the kind of entry a gate leads to). Otherwise, e.g. an
//! internal function of compartment 1 that compartment 2 learnt the address
//! of, it runs with the registrant's rights, so compartment 2 cannot make
//! compartment 1's code work on an argument of its choice with compartment
//! 1's key. Shared code runs with the registrant's rights, as before.

use crate::pku;
use crate::runtime::{self, Runtime};

/// The PKRU to run `target` with, registered by code running with
/// `registrant` (its PKRU). Not for signal handlers: takes ld.so's lock
/// (`dladdr`).
pub fn entry_pkru(rt: &Runtime, target: usize, registrant: u32) -> u32 {
    let Some(c) = rt.compartment_of_addr(target) else {
        return registrant;
    };
    if pku::pkru_allows(registrant, rt.key_of(c), true) || exported_function(target) {
        rt.pkru_for(c)
    } else {
        log::info!(
            "{target:#x} is an internal function of compartment {c}: it runs with its registrant's rights (PKRU {registrant:#x})"
        );
        registrant
    }
}

/// Is `addr` the address of an exported (dynamic-symbol-table) function?
pub fn exported_function(addr: usize) -> bool {
    // SAFETY: a zeroed Dl_info is valid for dladdr to fill.
    let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
    // dladdr walks ld.so's link maps: libc-compartment rights in strict mode.
    // SAFETY: dladdr only reads the loader's tables.
    let found = runtime::with_libc_rights(|| unsafe {
        libc::dladdr(addr as *const libc::c_void, &mut info)
    });
    found != 0 && !info.dli_sname.is_null() && info.dli_saddr as usize == addr
}
