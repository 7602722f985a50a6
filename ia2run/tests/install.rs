//! scripts/install.sh into a temporary prefix: the installed ia2run finds
//! the installed shim without being told, says where everything is, and
//! runs a command under it. One VM boot.

mod support;
use std::path::Path;
use std::process::Command;
use support::*;

#[test]
fn install_into_a_prefix() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let built = Path::new(env!("CARGO_BIN_EXE_ia2run")).parent().unwrap();
    assert!(
        built.join("libia2shim.so").is_file(),
        "build the shim first: cargo build --release --workspace"
    );
    // A space in the prefix, and under the target dir so that the guest
    // sees it (its /tmp is a tmpfs of its own).
    let prefix = work_dir("install").join("pre fix");
    let o = Command::new("bash")
        .arg(root.join("scripts/install.sh"))
        .args(["--no-build", "--from"])
        .arg(built)
        .arg("--prefix")
        .arg(&prefix)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));
    for f in [
        "bin/ia2run",
        "lib/libia2shim.so",
        "include/ia2shim.h",
        "include/ia2_allocator.h",
        "lib/pkgconfig/ia2shim.pc",
        "share/ia2shim/install-manifest.txt",
    ] {
        assert!(prefix.join(f).is_file(), "{f} missing\n{}", show(&o));
    }
    let pc = std::fs::read_to_string(prefix.join("lib/pkgconfig/ia2shim.pc")).unwrap();
    assert!(
        pc.contains(&format!("prefix={}\n", prefix.display())),
        "{pc}"
    );

    // The headers compile from the prefix alone.
    let o = Command::new("cc")
        .args(["-fsyntax-only", "-Wall", "-Werror", "-x", "c", "-I"])
        .arg(prefix.join("include"))
        .arg("-")
        .stdin(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut c| {
            use std::io::Write;
            c.stdin.take().unwrap().write_all(
                b"#include <ia2shim.h>\n#include <ia2_allocator.h>\nint main(void) { return 0; }\n",
            )?;
            c.wait_with_output()
        })
        .unwrap();
    assert!(o.status.success(), "{}", show(&o));

    let installed = || {
        let mut c = Command::new(prefix.join("bin/ia2run"));
        // Nothing may point it at the build tree.
        c.env_remove("IA2RUN_SHIM")
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("IA2RUN_MODE")
            .current_dir(work_dir("install_cwd"));
        c
    };
    let o = installed().arg("--help").output().unwrap();
    let help = String::from_utf8_lossy(&o.stdout);
    let lib = prefix.join("lib/libia2shim.so");
    assert!(
        help.contains(&format!("libia2shim.so   {} ", lib.display())),
        "{help}"
    );
    assert!(
        help.contains(&prefix.join("include/ia2shim.h").display().to_string()),
        "{help}"
    );

    if skip_vm() {
        return;
    }
    let o = installed()
        .args(["--vm", "--", "sh", "-c", "echo \"$LD_PRELOAD\""])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", show(&o));
    assert_eq!(
        String::from_utf8_lossy(&o.stdout),
        format!("{}\n", lib.display()),
        "{}",
        show(&o)
    );
}
