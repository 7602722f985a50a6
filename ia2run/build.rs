//! Compiles the guest agent (`src/agent.rs` with `src/wire.rs` and
//! `src/exec.rs`) into a standalone binary that the library embeds.
//!
//! Why: the agent must exist for every user of the library, including the
//! shim's integration tests, which depend on the `ia2run` lib only and never
//! build the `ia2run` binary. The agent uses `std` only, so a direct `rustc`
//! call suffices and no crates need resolving.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").unwrap());
    let out = PathBuf::from(env::var_os("OUT_DIR").unwrap());
    let src = manifest.join("src");
    for f in ["agent.rs", "wire.rs", "exec.rs"] {
        println!("cargo:rerun-if-changed={}", src.join(f).display());
    }
    println!("cargo:rerun-if-changed=build.rs");

    let main_rs = out.join("agent_main.rs");
    let module = |name: &str| {
        format!(
            "#[path = {:?}]\nmod {name};\n",
            src.join(format!("{name}.rs"))
        )
    };
    let text = format!(
        "{}{}{}fn main() {{ std::process::exit(agent::main(std::env::args_os().collect())) }}\n",
        module("wire"),
        module("exec"),
        module("agent")
    );
    std::fs::write(&main_rs, text).unwrap();

    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let bin = out.join("ia2run-agent");
    let mut cmd = Command::new(rustc);
    cmd.args([
        "--edition",
        "2021",
        "--crate-name",
        "ia2run_agent",
        "--crate-type",
        "bin",
    ])
    .args([
        "-C",
        "opt-level=2",
        "-C",
        "debuginfo=0",
        "-C",
        "strip=symbols",
    ])
    // Lints are checked where these files are compiled into the library.
    .args(["--cap-lints", "allow"])
    .arg("-o")
    .arg(&bin)
    .arg(&main_rs);
    if let Ok(target) = env::var("TARGET") {
        cmd.args(["--target", &target]);
    }
    if let Ok(linker) = env::var("RUSTC_LINKER") {
        cmd.arg(format!("-Clinker={linker}"));
    }
    let status = cmd.status().expect("running rustc for the guest agent");
    assert!(status.success(), "compiling the ia2run guest agent failed");
}
