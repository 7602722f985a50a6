//! The layering rule of `src/lib.rs`, checked: every `crate::` path in every
//! file under `src/` names a module of the file's own layer or a lower one.

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    /// Module name → layer number, parsed from `src/lib.rs`'s doc comment
    /// (`//! N. name: `a`, `b``), so the rule has one written form.
    fn layers(lib: &str) -> BTreeMap<String, u32> {
        let mut m = BTreeMap::new();
        for line in lib.lines() {
            let Some(rest) = line.strip_prefix("//! ") else {
                continue;
            };
            let Some((num, body)) = rest.split_once(". ") else {
                continue;
            };
            let Ok(n) = num.parse::<u32>() else { continue };
            let Some((_, mods)) = body.split_once(':') else {
                continue;
            };
            for name in mods.split(',') {
                let name = name.trim().trim_matches('`');
                assert!(
                    m.insert(name.to_string(), n).is_none(),
                    "module {name} is in two layers"
                );
            }
        }
        m
    }

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                rust_files(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }

    /// The top-level module a file under `src/` belongs to.
    fn module_of(src: &Path, file: &Path) -> String {
        let rel = file.strip_prefix(src).unwrap();
        let first = rel.components().next().unwrap().as_os_str();
        first.to_str().unwrap().trim_end_matches(".rs").to_string()
    }

    /// Every `crate::name` in code (comments and string literals skipped).
    fn crate_paths(text: &str) -> Vec<(usize, String)> {
        let mut out = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let code = match line.find("//") {
                Some(i) => &line[..i],
                None => line,
            };
            let mut in_str = false;
            let bytes = code.as_bytes();
            let mut i = 0;
            while i < bytes.len() {
                if bytes[i] == b'"' && (i == 0 || bytes[i - 1] != b'\\') {
                    in_str = !in_str;
                } else if !in_str && code[i..].starts_with("crate::") {
                    let before_ok =
                        i == 0 || !(bytes[i - 1].is_ascii_alphanumeric() || bytes[i - 1] == b'_');
                    let name: String = code[i + 7..]
                        .chars()
                        .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                        .collect();
                    if before_ok && !name.is_empty() {
                        out.push((n + 1, name));
                    }
                }
                i += 1;
            }
        }
        out
    }

    /// The violations in a tree: (file, line, importing module, imported module).
    fn violations(src: &Path) -> Vec<String> {
        let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
        let layer = layers(&lib);
        let mut files = Vec::new();
        rust_files(src, &mut files);
        files.sort();
        let mut bad = Vec::new();
        for f in &files {
            let own = module_of(src, f);
            if own == "lib" || own == "main" || own == "layering" {
                continue;
            }
            let Some(&own_layer) = layer.get(&own) else {
                bad.push(format!(
                    "{}: module {own} is in no layer of src/lib.rs",
                    f.display()
                ));
                continue;
            };
            let text = std::fs::read_to_string(f).unwrap();
            for (line, target) in crate_paths(&text) {
                match layer.get(&target) {
                    Some(&t) if t > own_layer => bad.push(format!(
                        "{}:{line}: {own} (layer {own_layer}) imports crate::{target} (layer {t})",
                        f.display()
                    )),
                    Some(_) => {}
                    None => bad.push(format!(
                        "{}:{line}: crate::{target} is in no layer of src/lib.rs",
                        f.display()
                    )),
                }
            }
        }
        bad
    }

    #[test]
    fn no_module_imports_from_a_higher_layer() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let bad = violations(&src);
        assert!(bad.is_empty(), "upward imports:\n{}", bad.join("\n"));
    }

    #[test]
    fn every_module_of_lib_rs_has_a_layer() {
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
        let lib = std::fs::read_to_string(src.join("lib.rs")).unwrap();
        let layer = layers(&lib);
        assert!(layer.len() >= 20, "parsed only {} modules", layer.len());
        for line in lib.lines() {
            if let Some(m) = line
                .strip_prefix("pub mod ")
                .or_else(|| line.strip_prefix("mod "))
            {
                let m = m.trim_end_matches(';');
                if m != "layering" {
                    assert!(layer.contains_key(m), "module {m} is in no layer");
                }
            }
        }
    }

    /// The check catches an upward import: a scratch tree with the pure core
    /// importing a feature fails.
    #[test]
    fn an_upward_import_is_caught() {
        let dir = std::env::temp_dir().join(format!("ia2-layering-{}", std::process::id()));
        let src = dir.join("src");
        std::fs::create_dir_all(src.join("gates")).unwrap();
        std::fs::write(
            src.join("lib.rs"),
            "//! 1. pure core: `plan`\n//! 4. features: `gates`\npub mod plan;\npub mod gates;\n",
        )
        .unwrap();
        std::fs::write(
            src.join("plan.rs"),
            "// crate::gates in a comment is fine\nuse crate::gates::install;\n",
        )
        .unwrap();
        std::fs::write(src.join("gates/mod.rs"), "use crate::plan::build;\n").unwrap();
        let bad = violations(&src);
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(bad.len(), 1, "{bad:?}");
        assert!(
            bad[0].contains("plan.rs:2: plan (layer 1) imports crate::gates (layer 4)"),
            "{bad:?}"
        );
    }
}
