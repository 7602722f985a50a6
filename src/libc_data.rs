//! The `libc_data_imports` carveout (strict mode): data that system
//! objects define and application objects import by address
//! (`R_X86_64_GLOB_DAT`, `R_X86_64_64`), such as libc's `stdin`, `stdout`,
//! `stderr` (when the executable has no copy of them), `environ`, `optarg`,
//! or libstdc++'s `std::cin`. Application code reads these variables
//! directly, with its own rights, so their pages stay on key 0. Found on
//! jq and libpython (`stdin` read by library code).

use crate::carveouts::Located;
use crate::config::Config;
use crate::objects::{LoadedObject, ObjectKind, Range};
use crate::plan::Carveout;
use object::elf;

/// Locate the pages of system-object data imported by application objects.
pub fn data_imports(
    config: &Config,
    objects: &[LoadedObject],
    compartment_of: &[Option<u8>],
) -> Located {
    let mut ranges = Vec::new();
    let mut names: Vec<String> = Vec::new();
    for (i, o) in objects.iter().enumerate() {
        if !matches!(o.kind, ObjectKind::Main | ObjectKind::Application)
            || compartment_of.get(i).copied().flatten().is_none()
        {
            continue;
        }
        let Some(d) = o.dynamic_info() else { continue };
        for r in d.relocations(o.base) {
            if r.sym == 0
                || !(r.r_type == elf::R_X86_64_GLOB_DAT || r.r_type == elf::R_X86_64_64)
                || !o.contains(r.slot)
            {
                continue;
            }
            // SAFETY: the index comes from this object's own relocation.
            let Some(sym) = (unsafe { d.symbol(r.sym) }) else {
                continue;
            };
            if sym.st_type != elf::STT_OBJECT {
                continue;
            }
            // SAFETY: an aligned, relocated slot of this loaded object.
            let value = unsafe { core::ptr::read_volatile(r.slot as *const usize) }.wrapping_sub(
                if r.r_type == elf::R_X86_64_64 {
                    r.addend as usize
                } else {
                    0
                },
            );
            let Some(owner) = objects.iter().position(|x| x.contains(value)) else {
                continue;
            };
            let system = matches!(objects[owner].kind, ObjectKind::System | ObjectKind::Loader);
            if !system || compartment_of.get(owner).copied().flatten().is_none() {
                continue;
            }
            let size = (sym.size as usize).max(8);
            ranges.push(Range::new(value, value + size).pages_out());
            let n = format!("{}:{}", objects[owner].basename, sym.name);
            if !names.contains(&n) {
                names.push(n);
            }
        }
    }
    ranges.sort();
    ranges.dedup();
    let how = if names.is_empty() {
        "no application object imports a system object's data".to_string()
    } else {
        format!("data imported from system objects: {}", names.join(", "))
    };
    Located {
        carveout: Carveout {
            name: "libc_data_imports",
            toggle: "IA2_SHARE_LIBC_DATA_IMPORTS",
            ranges,
        },
        how,
        enabled: config.share_libc_data_imports,
    }
}
