//! The WRPKRU/XRSTOR byte-sequence scanner behind `IA2_SCAN_WRPKRU`, as in
//! ERIM: compartment code that contains `WRPKRU` (`0f 01 ef`) or `XRSTOR`
//! with a memory operand (`0f ae /5`, ModRM mod != 3, with or without a REX
//! prefix; mod == 3 is `LFENCE`) at *any* byte offset, aligned or not, could
//! change its own PKRU. Pure; the caller says which bytes are code.

/// What a hit is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Wrpkru,
    /// `XRSTOR` (`rex`: preceded by a REX prefix, e.g. `XRSTOR64`).
    Xrstor {
        rex: bool,
    },
}

impl Kind {
    pub fn describe(self) -> &'static str {
        match self {
            Kind::Wrpkru => "WRPKRU (0f 01 ef)",
            Kind::Xrstor { rex: false } => "XRSTOR (0f ae /5)",
            Kind::Xrstor { rex: true } => "XRSTOR with REX prefix (4x 0f ae /5)",
        }
    }
}

/// One hit: the offset of its first byte (the REX prefix, if any).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hit {
    pub offset: usize,
    pub kind: Kind,
}

/// Every WRPKRU and XRSTOR sequence in `code`, at every byte offset.
pub fn scan(code: &[u8]) -> Vec<Hit> {
    let mut out = Vec::new();
    let end = code.len().saturating_sub(2);
    // memchr finds the 0x0f escape bytes with SIMD; the check is per hit.
    for i in memchr::memchr_iter(0x0f, &code[..end]) {
        let (b1, modrm) = (code[i + 1], code[i + 2]);
        if b1 == 0x01 && modrm == 0xef {
            out.push(Hit {
                offset: i,
                kind: Kind::Wrpkru,
            });
        } else if b1 == 0xae && (modrm >> 3) & 7 == 5 && modrm >> 6 != 3 {
            let rex = i > 0 && code[i - 1] & 0xf0 == 0x40;
            out.push(Hit {
                offset: if rex { i - 1 } else { i },
                kind: Kind::Xrstor { rex },
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_wrpkru_at_any_offset() {
        let code = [0x90, 0x0f, 0x01, 0xef, 0xc3, 0x0f, 0x01, 0xef];
        assert_eq!(
            scan(&code),
            vec![
                Hit {
                    offset: 1,
                    kind: Kind::Wrpkru
                },
                Hit {
                    offset: 5,
                    kind: Kind::Wrpkru
                }
            ]
        );
        // Hidden inside another instruction's immediate: still found.
        let mov = [0xb8, 0x0f, 0x01, 0xef, 0x00];
        assert_eq!(
            scan(&mov),
            vec![Hit {
                offset: 1,
                kind: Kind::Wrpkru
            }]
        );
        assert!(scan(&[0x0f, 0x01]).is_empty());
        assert!(scan(&[]).is_empty());
    }

    #[test]
    fn xrstor_forms_and_lfence() {
        // xrstor [rdi] = 0f ae 2f; xrstor64 [rdi] = 48 0f ae 2f; xrstor [rax+8] = 0f ae 68 08.
        assert_eq!(
            scan(&[0x0f, 0xae, 0x2f]),
            vec![Hit {
                offset: 0,
                kind: Kind::Xrstor { rex: false }
            }]
        );
        assert_eq!(
            scan(&[0x48, 0x0f, 0xae, 0x2f]),
            vec![Hit {
                offset: 0,
                kind: Kind::Xrstor { rex: true }
            }]
        );
        assert_eq!(
            scan(&[0x0f, 0xae, 0x68, 0x08]),
            vec![Hit {
                offset: 0,
                kind: Kind::Xrstor { rex: false }
            }]
        );
        // lfence = 0f ae e8 (mod 3), xsave [rdi] = 0f ae 27 (/4), xsaveopt = 0f ae 37 (/6).
        assert!(scan(&[0x0f, 0xae, 0xe8]).is_empty());
        assert!(scan(&[0x0f, 0xae, 0x27]).is_empty());
        assert!(scan(&[0x0f, 0xae, 0x37]).is_empty());
    }
}
