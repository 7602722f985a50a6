//! Link `libia2shim.so` with `shim.map`, so that only the interposed entry
//! points and the public ABI are exported, and with a private copy of
//! libgcc's unwinder instead of `libgcc_s.so.1`.
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    private_unwinder();
    let map = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shim.map");
    println!("cargo:rerun-if-changed={}", map.display());
    println!(
        "cargo:rustc-cdylib-link-arg=-Wl,--version-script={}",
        map.display()
    );
    // DT_RELR (glibc >= 2.36): the ~3000 relative relocations packed into a
    // bitmap, so ld.so reads a few hundred bytes instead of 80 KB of
    // `.rela.dyn` at every start-up.
    println!("cargo:rustc-cdylib-link-arg=-Wl,-z,pack-relative-relocs");
    // The writable statics' layout: the sealed section (whole pages between
    // two symbols), and the small statics packed together (sealed.ld).
    let ld = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sealed.ld");
    println!("cargo:rerun-if-changed={}", ld.display());
    println!("cargo:rustc-cdylib-link-arg=-Wl,-T,{}", ld.display());
}

/// The shim's own unwinder: gcc's static `libgcc_eh.a`, copied with the
/// names the shim interposes renamed (`ia2shim_libgcc_*`), linked in
/// instead of `libgcc_s.so.1`. std's `-lgcc_s` comes with `--as-needed`,
/// so once every `_Unwind_*` reference resolves here the shim no longer
/// needs `libgcc_s` at all: one object, four mappings and a constructor
/// (`__cpu_indicator_init`'s CPUID instructions, which trap on virtual
/// machines) less at every start-up (PERFORMANCE.md). Its symbols stay
/// local (`shim.map`); `src/unwinder.rs` says who calls which copy.
fn private_unwinder() {
    let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("OUT_DIR"));
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".into());
    let found = Command::new(&cc)
        .arg("-print-file-name=libgcc_eh.a")
        .output()
        .unwrap_or_else(|e| panic!("running `{cc} -print-file-name=libgcc_eh.a`: {e}"));
    let eh = PathBuf::from(String::from_utf8_lossy(&found.stdout).trim());
    // gcc prints the bare name when it has no such file.
    if !eh.is_absolute() || !eh.exists() {
        panic!("`{cc} -print-file-name=libgcc_eh.a` found no libgcc_eh.a (install gcc)");
    }
    println!("cargo:rerun-if-changed={}", eh.display());
    let objcopy = std::env::var("OBJCOPY").unwrap_or_else(|_| "objcopy".into());
    let dest = out.join("libia2shim_unwind.a");
    let mut c = Command::new(&objcopy);
    for name in INTERPOSED {
        c.arg(format!("--redefine-sym={name}=ia2shim_libgcc{name}"));
    }
    let status = c
        .arg(&eh)
        .arg(&dest)
        .status()
        .unwrap_or_else(|e| panic!("running {objcopy}: {e} (install binutils)"));
    assert!(
        status.success(),
        "{objcopy} {} failed: {status}",
        eh.display()
    );
    link_static(&out, "ia2shim_unwind");
}

/// libgcc's functions that the shim exports under the same names
/// (`src/hooks.rs`); its private copies get an `ia2shim_libgcc` prefix.
const INTERPOSED: &[&str] = &[
    "_Unwind_Resume",
    "_Unwind_RaiseException",
    "_Unwind_Resume_or_Rethrow",
    "__gcc_personality_v0",
];

fn link_static(dir: &Path, name: &str) {
    println!("cargo:rustc-link-search=native={}", dir.display());
    println!("cargo:rustc-link-lib=static={name}");
}
