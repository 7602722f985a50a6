//! Link `libia2shim.so` with `shim.map`, so that only the interposed entry
//! points and the public ABI are exported.
fn main() {
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
    // The sealed statics' section: whole pages between two symbols.
    let ld = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("sealed.ld");
    println!("cargo:rerun-if-changed={}", ld.display());
    println!("cargo:rustc-cdylib-link-arg=-Wl,-T,{}", ld.display());
}
