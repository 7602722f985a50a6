//! Link `libia2shim.so` with `shim.map`, so that only the interposed entry
//! points and the public ABI are exported.
fn main() {
    let map = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("shim.map");
    println!("cargo:rerun-if-changed={}", map.display());
    println!(
        "cargo:rustc-cdylib-link-arg=-Wl,--version-script={}",
        map.display()
    );
}
