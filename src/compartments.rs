//! Which loaded object belongs to which compartment (DESIGN.md, "Compartments").

use crate::config::{Config, MAX_COMPARTMENT};
use crate::objects::{LoadedObject, ObjectKind};

/// The outcome of assignment: one entry per object (`None` = shared, key 0),
/// plus warnings for patterns that matched nothing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Assignment {
    pub of_object: Vec<Option<u8>>,
    pub warnings: Vec<String>,
    /// What auto mode grouped and why (more application objects than keys).
    pub groups: Vec<String>,
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
    TooManyCompartments { objects: Vec<String>, limit: u8 },
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
            AssignError::TooManyCompartments { objects, limit } => write!(
                f,
                "IA2_COMPARTMENTS=auto: {} application objects need more than {} compartments ({}); name the split with IA2_COMPARTMENTS",
                objects.len(),
                limit,
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

/// Assign compartments, without dependency information (auto mode then
/// refuses more application objects than keys).
pub fn assign(objects: &[LoadedObject], config: &Config) -> Result<Assignment, AssignError> {
    assign_with_deps(objects, config, &[])
}

/// Assign compartments. `needed[i]` lists object i's `DT_NEEDED` names; with
/// them, auto mode groups a program that has more application objects than
/// keys instead of refusing it (see [`group_by_dependency`]).
pub fn assign_with_deps(
    objects: &[LoadedObject],
    config: &Config,
    needed: &[Vec<String>],
) -> Result<Assignment, AssignError> {
    let mut of_object = vec![None; objects.len()];
    let mut warnings = Vec::new();
    let mut groups = Vec::new();
    let apps = objects
        .iter()
        .filter(|o| matches!(o.kind, ObjectKind::Main | ObjectKind::Application))
        .count();
    // IA2_HARDEN=on keeps one key for the shim's own state.
    let limit = MAX_COMPARTMENT - u8::from(config.harden);
    match config.compartments {
        None if apps > limit as usize && !needed.is_empty() => {
            groups = group_by_dependency(objects, needed, &mut of_object, limit);
        }
        None => {
            let mut next = 1u8;
            let mut over = false;
            for (i, o) in objects.iter().enumerate() {
                if matches!(o.kind, ObjectKind::Main | ObjectKind::Application) {
                    if next > limit {
                        over = true;
                    } else {
                        of_object[i] = Some(next);
                    }
                    next = next.saturating_add(1);
                }
            }
            if over {
                return Err(AssignError::TooManyCompartments {
                    limit,
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
        groups,
    })
}

/// Auto mode for programs with more application objects than keys: the
/// executable is compartment 1; each direct application dependency of the
/// executable gets a compartment together with the application libraries
/// that only it pulls in (through `DT_NEEDED`, transitively); a final
/// compartment takes the rest: libraries that several direct dependencies
/// need, objects the executable does not reach (preloads), and the direct
/// dependencies beyond the available keys. Returns one line per group.
pub fn group_by_dependency(
    objects: &[LoadedObject],
    needed: &[Vec<String>],
    of_object: &mut [Option<u8>],
    limit: u8,
) -> Vec<String> {
    let is_app = |i: usize| matches!(objects[i].kind, ObjectKind::Main | ObjectKind::Application);
    let index_of = |name: &str| {
        objects
            .iter()
            .position(|o| o.basename == name || o.name.rsplit('/').next() == Some(name))
    };
    let edges: Vec<Vec<usize>> = (0..objects.len())
        .map(|i| {
            needed
                .get(i)
                .map(|n| n.iter().filter_map(|d| index_of(d)).collect())
                .unwrap_or_default()
        })
        .collect();
    let mut direct: Vec<usize> = Vec::new();
    for &d in edges.first().map(Vec::as_slice).unwrap_or(&[]) {
        if d != 0 && is_app(d) && !direct.contains(&d) {
            direct.push(d);
        }
    }
    // Which direct dependencies reach each object (bit k = direct[k]).
    let mut reached_by = vec![0u128; objects.len()];
    for (k, &d) in direct.iter().enumerate().take(128) {
        let mut stack = vec![d];
        while let Some(i) = stack.pop() {
            if reached_by[i] & (1 << k) != 0 {
                continue;
            }
            reached_by[i] |= 1 << k;
            stack.extend(edges[i].iter().copied().filter(|&j| j != 0));
        }
    }
    // Keys 2..=limit: one per direct dependency while they last, keeping
    // the last one for the rest when anything is left over.
    let keys = limit as usize - 1;
    let mut members: Vec<Vec<usize>> = vec![Vec::new(); direct.len()];
    let mut rest: Vec<usize> = Vec::new();
    for i in (1..objects.len()).filter(|&i| is_app(i)) {
        let r = reached_by[i];
        match direct.iter().position(|&d| d == i) {
            Some(k) => members[k].insert(0, i),
            None if r.count_ones() == 1 => members[r.trailing_zeros() as usize].push(i),
            None => rest.push(i),
        }
    }
    let own = if direct.len() + usize::from(!rest.is_empty()) > keys {
        keys - 1
    } else {
        direct.len()
    };
    for m in members.iter_mut().skip(own) {
        rest.append(m);
    }
    rest.sort_unstable();
    let name = |i: usize| objects[i].basename.clone();
    let mut lines = vec![format!(
        "IA2_COMPARTMENTS=auto: {} application objects for {} keys: grouped by dependency (compartment 1: {})",
        (0..objects.len()).filter(|&i| is_app(i)).count(),
        limit,
        objects[0].basename
    )];
    of_object[0] = Some(1);
    for (k, m) in members.iter().take(own).enumerate() {
        let c = k as u8 + 2;
        for &i in m {
            of_object[i] = Some(c);
        }
        let pulled: Vec<String> = m.iter().skip(1).map(|&i| name(i)).collect();
        lines.push(if pulled.is_empty() {
            format!(
                "compartment {c}: {} (direct dependency of the executable)",
                name(m[0])
            )
        } else {
            format!(
                "compartment {c}: {} with {} (pulled in only by it)",
                name(m[0]),
                pulled.join(", ")
            )
        });
    }
    if !rest.is_empty() {
        let c = own as u8 + 2;
        for &i in &rest {
            of_object[i] = Some(c);
        }
        let names: Vec<String> = rest.iter().map(|&i| name(i)).collect();
        lines.push(format!(
            "compartment {c}: the rest ({}): needed by several direct dependencies, not reached from the executable, or beyond the keys",
            names.join(", ")
        ));
    }
    lines
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

    /// 200 libraries: main needs 20 direct ones; each of those pulls in 8
    /// private libraries; the first two also share one library.
    #[test]
    fn auto_groups_a_program_with_200_libraries_by_dependency() {
        let mut objs = vec![obj("main", true), obj("libc.so.6", false)];
        let mut needed: Vec<Vec<String>> = vec![Vec::new(), Vec::new()];
        let mut main_needs = Vec::new();
        for d in 0..20 {
            let dn = format!("libd{d}.so");
            main_needs.push(dn.clone());
            objs.push(obj(&dn, false));
            let mut dneeds: Vec<String> = (0..8).map(|p| format!("libp{d}_{p}.so")).collect();
            dneeds.push("libc.so.6".into());
            if d < 2 {
                dneeds.push("libshared.so".into());
            }
            needed.push(dneeds);
        }
        for d in 0..20 {
            for p in 0..8 {
                objs.push(obj(&format!("libp{d}_{p}.so"), false));
                needed.push(vec!["libc.so.6".into()]);
            }
        }
        objs.push(obj("libshared.so", false));
        needed.push(Vec::new());
        needed[0] = main_needs;
        assert!(objs.len() > 180);
        // Hardened (the default), one key less: compartments 1..=14.
        let hard = assign_with_deps(&objs, &cfg(&[]), &needed).unwrap();
        assert!(hard
            .of_object
            .iter()
            .flatten()
            .all(|&c| (1..=14).contains(&c)));
        assert!(hard.of_object.iter().flatten().any(|&c| c == 14));
        let a = assign_with_deps(&objs, &cfg(&["IA2_HARDEN=off"]), &needed).unwrap();
        let at = |n: &str| a.of_object[objs.iter().position(|o| o.basename == n).unwrap()];
        assert_eq!(at("main"), Some(1));
        assert_eq!(at("libc.so.6"), None);
        // 13 direct dependencies get their own compartment with their
        // private libraries; the rest share compartment 15.
        assert_eq!(at("libd0.so"), Some(2));
        assert_eq!(at("libp0_7.so"), Some(2));
        assert_eq!(at("libd12.so"), Some(14));
        assert_eq!(at("libp12_3.so"), Some(14));
        assert_eq!(at("libd13.so"), Some(15));
        assert_eq!(at("libp19_0.so"), Some(15));
        assert_eq!(at("libshared.so"), Some(15));
        assert!(a.of_object.iter().flatten().all(|&c| (1..=15).contains(&c)));
        assert!(
            a.groups[0].contains("grouped by dependency"),
            "{:?}",
            a.groups
        );
        assert!(
            a.groups.iter().any(|g| g.contains("libshared.so")),
            "{:?}",
            a.groups
        );
        // Without dependency information auto mode still refuses.
        assert!(assign(&objs, &cfg(&[])).is_err());
    }
}
