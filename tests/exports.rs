//! The shim exports exactly what `shim.map` lists: the interposed entry
//! points, the introspection API and the shared allocator ABI.

mod common;
use std::collections::BTreeSet;
use std::process::Command;

fn map_globals() -> BTreeSet<String> {
    let text = std::fs::read_to_string(common::root().join("shim.map")).unwrap();
    // Strip /* comments */, then take the names between `global:` and `local:`.
    let mut clean = String::new();
    let mut rest = text.as_str();
    while let Some(i) = rest.find("/*") {
        clean.push_str(&rest[..i]);
        rest = &rest[rest[i..].find("*/").map(|j| i + j + 2).unwrap()..];
    }
    clean.push_str(rest);
    let globals = clean
        .split("global:")
        .nth(1)
        .unwrap()
        .split("local:")
        .next()
        .unwrap();
    globals
        .split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_string)
        .collect()
}

#[test]
fn exported_symbols_are_exactly_shim_map() {
    let shim = common::shim();
    let out = Command::new("nm")
        .args(["-D", "--defined-only"])
        .arg(&shim)
        .output()
        .expect("nm (binutils)");
    assert!(out.status.success());
    let exported: BTreeSet<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let (_addr, kind, name) = (f.next()?, f.next()?, f.next()?);
            // Code and data symbols; the version-definition marker is not an export.
            (kind != "A").then(|| name.split('@').next().unwrap().to_string())
        })
        .collect();
    let listed = map_globals();
    assert_eq!(
        exported, listed,
        "nm -D --defined-only differs from shim.map"
    );
    for required in ["__libc_start_main", "sigaction", "ia2_get_compartment"] {
        assert!(listed.contains(required), "{required}");
    }
}
