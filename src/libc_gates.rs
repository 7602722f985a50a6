//! Strict mode's policy for calls from compartments into system code
//! (`IA2_LIBC_GATES`): which calls get a union gate (the caller's rights
//! plus the libc compartment's, as IA2's rewriter wraps every call into
//! libc) and the **hot list** of functions left ungated for speed. An
//! ungated function runs with the caller's rights only, so every piece of
//! libc or loader state it touches needs a carveout: each entry names the
//! carveouts it is the reason for. `IA2_REPORT=plan` prints this table.

use crate::config::LibcGates;

/// One group of hot-list functions.
pub struct HotEntry {
    pub names: &'static [&'static str],
    /// Why the group is ungated.
    pub why: &'static str,
    /// The carveouts that ungated calls to the group need (empty: none).
    pub carveouts: &'static [&'static str],
}

/// The hot list (`IA2_LIBC_GATES=hot`, strict mode's default).
pub const HOT: &[HotEntry] = &[
    HotEntry {
        names: &[
            "memcpy",
            "memmove",
            "memset",
            "mempcpy",
            "__memcpy_chk",
            "__memmove_chk",
            "__memset_chk",
            "__mempcpy_chk",
            "wmemset",
            "__wmemset_chk",
        ],
        why: "copies and fills: the hottest libc calls (dav1d: most of its libc calls per frame); they read the string-function thresholds",
        carveouts: &["libc_tuning"],
    },
    HotEntry {
        names: &[
            "strlen", "strnlen", "strcmp", "strncmp", "memcmp", "bcmp", "__memcmpeq", "memchr",
            "memrchr", "rawmemchr", "strchr", "strchrnul", "strrchr", "strcpy", "stpcpy",
            "strncpy", "stpncpy", "strcat", "strncat", "__strcpy_chk", "__stpcpy_chk",
            "__strcat_chk", "__strncpy_chk", "strstr", "wcslen", "wmemchr",
        ],
        why: "string scans and copies: pure code over the caller's buffers (IFUNC-selected AVX2/EVEX variants read no libc data)",
        carveouts: &[],
    },
    HotEntry {
        names: &["__errno_location"],
        why: "returns a %fs-relative address; called after every failing system call",
        carveouts: &[],
    },
    HotEntry {
        names: &["__tls_get_addr"],
        why: "every global-dynamic TLS access (IA2_TLS_GET_ADDR_GATE=1 gates it instead)",
        carveouts: &["tls_generation", "dtv"],
    },
    HotEntry {
        names: &["bsearch", "lfind", "lsearch"],
        why: "take a callback and touch no libc state: ungated, the callback runs with the caller's rights (qsort is interposed by the shim for the same reason)",
        carveouts: &[],
    },
    HotEntry {
        names: &["pthread_once"],
        why: "takes a callback (the init routine runs with the caller's rights); reads __fork_generation",
        carveouts: &["pthread_once"],
    },
    HotEntry {
        names: &[
            "pthread_mutex_lock",
            "pthread_mutex_unlock",
            "pthread_mutex_trylock",
        ],
        why: "per-task locking in threaded decoders (dav1d --threads 4); read the lock-elision tunables",
        carveouts: &["mutex_elision"],
    },
];

/// Functions that are never gated, whatever the policy: they return twice
/// or never return to their caller, so a gate between them and their
/// caller breaks them (`setjmp` through a gate saves the gate's stack and
/// return point; found on perl, which then spins in `longjmp`).
pub const NEVER: HotEntry = HotEntry {
    names: &[
        "setjmp",
        "_setjmp",
        "__setjmp",
        "sigsetjmp",
        "__sigsetjmp",
        "longjmp",
        "_longjmp",
        "siglongjmp",
        "__longjmp_chk",
        "vfork",
        "getcontext",
        "setcontext",
        "swapcontext",
    ],
    why: "return twice or never return to their caller: a gate in between breaks them (setjmp through a gate saves the gate's frame)",
    carveouts: &["tcb"],
};

/// Is `name` on the built-in hot list?
pub fn is_hot(name: &str) -> bool {
    HOT.iter().any(|e| e.names.contains(&name))
}

/// Does a call from a compartment into system function `name` (owned by
/// the libc compartment, which is not the caller's) get a union gate?
/// `tls_gate` is `IA2_TLS_GET_ADDR_GATE`.
pub fn gated(policy: LibcGates, name: &str, tls_gate: bool) -> bool {
    if tls_gate && name == "__tls_get_addr" {
        return true;
    }
    if NEVER.names.contains(&name) {
        return false;
    }
    match policy {
        LibcGates::None => false,
        LibcGates::All => true,
        LibcGates::Hot => !is_hot(name),
        LibcGates::Except(list) => !list.split(',').any(|n| n == name),
    }
}

/// The policy and the hot list, for the plan.
pub fn plan_text(policy: LibcGates, tls_gate: bool, pid: impl core::fmt::Display) -> String {
    use core::fmt::Write as _;
    let mut o = String::new();
    let what = match policy {
        LibcGates::None => "none: calls into system code keep the caller's rights".to_string(),
        LibcGates::All => "all: every call into system code gets a union gate".to_string(),
        LibcGates::Hot => {
            "hot: every call into system code gets a union gate, except the hot list".to_string()
        }
        LibcGates::Except(l) => {
            format!("every call into system code gets a union gate, except {l}")
        }
    };
    let _ = writeln!(
        o,
        "ia2shim[{pid}]: ==== libc gates (IA2_LIBC_GATES={what}) ===="
    );
    if policy != LibcGates::None {
        let _ = writeln!(
            o,
            "ia2shim[{pid}]:   never gated {}: {}; carveouts: {}",
            NEVER.names.join(" "),
            NEVER.why,
            NEVER.carveouts.join(", ")
        );
    }
    if policy != LibcGates::Hot {
        return o;
    }
    for e in HOT {
        let names: Vec<&str> = e
            .names
            .iter()
            .copied()
            .filter(|n| !(tls_gate && *n == "__tls_get_addr"))
            .collect();
        if names.is_empty() {
            continue;
        }
        let _ = writeln!(
            o,
            "ia2shim[{pid}]:   hot {}: {}; carveouts: {}",
            names.join(" "),
            e.why,
            if e.carveouts.is_empty() {
                "none".to_string()
            } else {
                e.carveouts.join(", ")
            }
        );
    }
    o
}

/// The plan's policy lines as JSON lines.
pub fn plan_json(policy: LibcGates) -> String {
    use core::fmt::Write as _;
    let mut o = String::new();
    let mode = match policy {
        LibcGates::None => "none".to_string(),
        LibcGates::All => "all".to_string(),
        LibcGates::Hot => "hot".to_string(),
        LibcGates::Except(l) => l.to_string(),
    };
    let _ = writeln!(o, "{{\"type\":\"libc_gates\",\"policy\":\"{mode}\"}}");
    if policy == LibcGates::Hot {
        for e in HOT {
            let _ = writeln!(
                o,
                "{{\"type\":\"hot\",\"names\":[{}],\"carveouts\":[{}]}}",
                e.names
                    .iter()
                    .map(|n| format!("\"{n}\""))
                    .collect::<Vec<_>>()
                    .join(","),
                e.carveouts
                    .iter()
                    .map(|n| format!("\"{n}\""))
                    .collect::<Vec<_>>()
                    .join(",")
            );
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies() {
        assert!(!gated(LibcGates::Hot, "memcpy", false));
        assert!(gated(LibcGates::Hot, "printf", false));
        assert!(!gated(LibcGates::Hot, "__tls_get_addr", false));
        assert!(gated(LibcGates::Hot, "__tls_get_addr", true));
        assert!(gated(LibcGates::All, "memcpy", false));
        assert!(!gated(LibcGates::None, "printf", false));
        assert!(gated(LibcGates::None, "__tls_get_addr", true));
        assert!(!gated(LibcGates::Except("printf,puts"), "puts", false));
        assert!(gated(LibcGates::Except("printf,puts"), "memcpy", false));
        assert!(!gated(LibcGates::All, "_setjmp", false));
        assert!(!gated(LibcGates::Hot, "__longjmp_chk", false));
    }

    #[test]
    fn every_hot_carveout_exists() {
        let known = [
            "libc_tuning",
            "tls_generation",
            "dtv",
            "pthread_once",
            "mutex_elision",
        ];
        for e in HOT {
            for c in e.carveouts {
                assert!(known.contains(c), "{c}");
            }
        }
    }
}
