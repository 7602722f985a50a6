//! Which loaded object belongs to which compartment (DESIGN.md, "Compartments").

use crate::config::{Config, MAX_COMPARTMENT};
use crate::objects::{LoadedObject, ObjectKind};

/// The outcome of assignment: one entry per object (`None` = shared, key 0),
/// plus warnings for patterns that matched nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub of_object: Vec<Option<u8>>,
    pub warnings: Vec<String>,
}

impl Assignment {
    /// Bitmask of the compartments in use (bit c = compartment c).
    pub fn used(&self) -> u32 {
        self.of_object.iter().flatten().fold(0, |m, &c| m | 1 << c)
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AssignError {
    /// Auto mode found more application objects than there are keys.
    TooManyCompartments { objects: Vec<String> },
    /// One object matches patterns of two compartments.
    Ambiguous {
        object: String,
        first: u8,
        second: u8,
    },
}

impl core::fmt::Display for AssignError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            AssignError::TooManyCompartments { objects } => write!(
                f,
                "IA2_COMPARTMENTS=auto: {} application objects need more than {} compartments ({}); name the split with IA2_COMPARTMENTS",
                objects.len(),
                MAX_COMPARTMENT,
                objects.join(", ")
            ),
            AssignError::Ambiguous { object, first, second } => write!(
                f,
                "IA2_COMPARTMENTS: object {object} matches patterns of compartment {first} and of compartment {second}"
            ),
        }
    }
}

/// Shell-style glob on basenames: `*` any run, `?` one character.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut pi, mut ni) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if pi < p.len() && (p[pi] == b'?' || p[pi] == n[ni]) {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == b'*' {
            star = Some((pi, ni));
            pi += 1;
        } else if let Some((sp, sn)) = star {
            pi = sp + 1;
            ni = sn + 1;
            star = Some((sp, sn + 1));
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|&c| c == b'*')
}

/// Assign compartments. `first_free` lets later `dlopen`s continue auto numbering.
pub fn assign(objects: &[LoadedObject], config: &Config) -> Result<Assignment, AssignError> {
    let mut of_object = vec![None; objects.len()];
    let mut warnings = Vec::new();
    match config.compartments {
        None => {
            let mut next = 1u8;
            let mut over = false;
            for (i, o) in objects.iter().enumerate() {
                if matches!(o.kind, ObjectKind::Main | ObjectKind::Application) {
                    if next > MAX_COMPARTMENT {
                        over = true;
                    } else {
                        of_object[i] = Some(next);
                    }
                    next = next.saturating_add(1);
                }
            }
            if over {
                return Err(AssignError::TooManyCompartments {
                    objects: objects
                        .iter()
                        .filter(|o| matches!(o.kind, ObjectKind::Main | ObjectKind::Application))
                        .map(|o| o.basename.clone())
                        .collect(),
                });
            }
        }
        Some(spec) => {
            for (c, pattern) in spec.rules() {
                let mut matched = false;
                for (i, o) in objects.iter().enumerate() {
                    // The shim's own data must stay reachable from every compartment.
                    if o.kind == ObjectKind::Shim || !glob_match(pattern, &o.basename) {
                        continue;
                    }
                    matched = true;
                    match of_object[i] {
                        Some(prev) if prev != c => {
                            return Err(AssignError::Ambiguous {
                                object: o.basename.clone(),
                                first: prev,
                                second: c,
                            })
                        }
                        _ => of_object[i] = Some(c),
                    }
                }
                if !matched {
                    let loaded: Vec<&str> = objects.iter().map(|o| o.basename.as_str()).collect();
                    warnings.push(format!(
                        "IA2_COMPARTMENTS: pattern {pattern:?} (compartment {c}) matches no loaded object; loaded objects: {}",
                        loaded.join(", ")
                    ));
                }
            }
        }
    }
    // Strict mode: ld.so, libc and the other system objects join compartment N.
    if let Some(n) = config.libc_compartment {
        for (i, o) in objects.iter().enumerate() {
            if matches!(o.kind, ObjectKind::Loader | ObjectKind::System) {
                of_object[i] = Some(n);
            }
        }
    }
    Ok(Assignment {
        of_object,
        warnings,
    })
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::objects::classify;

    pub(crate) fn obj(basename: &str, first: bool) -> LoadedObject {
        LoadedObject {
            name: if first {
                String::new()
            } else {
                format!("/lib/{basename}")
            },
            basename: basename.to_string(),
            base: 0,
            kind: classify(basename, first),
            segments: vec![],
            relro: None,
            tls: None,
            dynamic: None,
        }
    }

    fn dav1d_objects() -> Vec<LoadedObject> {
        vec![
            obj("main", true),
            obj("linux-vdso.so.1", false),
            obj("libia2shim.so", false),
            obj("libdav1d.so.6", false),
            obj("libc.so.6", false),
            obj("libm.so.6", false),
            obj("ld-linux-x86-64.so.2", false),
        ]
    }

    fn cfg(vars: &[&'static str]) -> Config {
        Config::from_vars(vars.iter().copied()).unwrap()
    }

    #[test]
    fn glob() {
        assert!(glob_match("libdav1d.so*", "libdav1d.so.6"));
        assert!(glob_match("*", "x"));
        assert!(glob_match("lib?.so", "liba.so"));
        assert!(!glob_match("lib?.so", "libab.so"));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
        assert!(glob_match("main", "main"));
    }

    #[test]
    fn auto_gives_dav1d_1_and_libdav1d_2() {
        let a = assign(&dav1d_objects(), &cfg(&[])).unwrap();
        assert_eq!(
            a.of_object,
            vec![Some(1), None, None, Some(2), None, None, None]
        );
        assert_eq!(a.used(), 0b110);
        assert!(a.warnings.is_empty());
    }

    #[test]
    fn explicit_spec_and_unmatched_warning() {
        let a = assign(
            &dav1d_objects(),
            &cfg(&["IA2_COMPARTMENTS=3=main;5=libdav1d*,libnothere.so"]),
        )
        .unwrap();
        assert_eq!(a.of_object[0], Some(3));
        assert_eq!(a.of_object[3], Some(5));
        assert_eq!(a.warnings.len(), 1);
        assert!(a.warnings[0].contains("libnothere.so") && a.warnings[0].contains("libdav1d.so.6"));
    }

    #[test]
    fn the_shim_is_never_assigned() {
        let a = assign(&dav1d_objects(), &cfg(&["IA2_COMPARTMENTS=2=*"])).unwrap();
        assert_eq!(a.of_object[2], None);
        assert_eq!(a.of_object[4], Some(2));
    }

    #[test]
    fn strict_mode_puts_system_objects_in_the_libc_compartment() {
        let a = assign(&dav1d_objects(), &cfg(&["IA2_LIBC_COMPARTMENT=1"])).unwrap();
        // main, vdso, shim, libdav1d, libc, libm, ld.so
        assert_eq!(
            a.of_object,
            vec![Some(1), None, None, Some(2), Some(1), Some(1), Some(1)]
        );
    }

    #[test]
    fn ambiguous_and_too_many() {
        let e = assign(
            &dav1d_objects(),
            &cfg(&["IA2_COMPARTMENTS=1=main,lib*;2=libdav1d*"]),
        )
        .unwrap_err();
        assert!(
            matches!(
                e,
                AssignError::Ambiguous {
                    first: 1,
                    second: 2,
                    ..
                }
            ),
            "{e:?}"
        );
        let mut many = vec![obj("main", true)];
        for i in 0..15 {
            many.push(obj(&format!("libapp{i}.so"), false));
        }
        let e = assign(&many, &cfg(&[])).unwrap_err();
        assert!(e.to_string().contains("16 application objects"), "{e}");
    }
}
