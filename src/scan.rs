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
///
/// Both sequences start with the pair `0f 01` or `0f ae`. Blocks of 64
/// offsets are tested for that pair at once (SSE2 byte compares and a
/// move-mask), and only the rare offsets that match are checked exactly by
/// [`hit_at`]; the hits are those of the byte-by-byte definition (a unit
/// test compares the two on random and real code).
pub fn scan(code: &[u8]) -> Vec<Hit> {
    const W: usize = 64;
    let mut out = Vec::new();
    let mut i = 0;
    // Each block reads offsets i..i+W and their successors i+1..i+W+1.
    while i + W < code.len() {
        let block = &code[i..i + W + 1];
        let mut mask = u64::from(pair_mask(block))
            | u64::from(pair_mask(&block[16..])) << 16
            | u64::from(pair_mask(&block[32..])) << 32
            | u64::from(pair_mask(&block[48..])) << 48;
        while mask != 0 {
            let j = mask.trailing_zeros() as usize;
            mask &= mask - 1;
            if let Some(h) = hit_at(code, i + j) {
                out.push(h);
            }
        }
        i += W;
    }
    while i < code.len() {
        if let Some(h) = hit_at(code, i) {
            out.push(h);
        }
        i += 1;
    }
    out
}

/// Bit `j` set where `block[j] == 0x0f` and `block[j + 1]` is `0x01` or
/// `0xae`, for `j` in 0..16 (`block` holds 17 bytes).
fn pair_mask(block: &[u8]) -> u32 {
    use core::arch::x86_64::{
        __m128i, _mm_and_si128, _mm_cmpeq_epi8, _mm_loadu_si128, _mm_movemask_epi8, _mm_or_si128,
        _mm_set1_epi8,
    };
    assert!(block.len() > 16);
    // SAFETY: two unaligned 16-byte loads at offsets 0 and 1 of a slice of
    // at least 17 bytes; SSE2 is part of x86-64.
    unsafe {
        let a = _mm_loadu_si128(block.as_ptr() as *const __m128i);
        let b = _mm_loadu_si128(block.as_ptr().add(1) as *const __m128i);
        let esc = _mm_cmpeq_epi8(a, _mm_set1_epi8(0x0f));
        let second = _mm_or_si128(
            _mm_cmpeq_epi8(b, _mm_set1_epi8(0x01)),
            _mm_cmpeq_epi8(b, _mm_set1_epi8(0xae_u8 as i8)),
        );
        _mm_movemask_epi8(_mm_and_si128(esc, second)) as u32
    }
}

/// The hit whose `0f` escape byte is at `i`, if any: `0f 01 ef`, or
/// `0f ae` with a ModRM of reg 5 and a memory operand (with the REX prefix
/// before it, if there is one).
fn hit_at(code: &[u8], i: usize) -> Option<Hit> {
    let (&b1, &modrm) = (code.get(i + 1)?, code.get(i + 2)?);
    if code[i] != 0x0f {
        None
    } else if b1 == 0x01 && modrm == 0xef {
        Some(Hit {
            offset: i,
            kind: Kind::Wrpkru,
        })
    } else if b1 == 0xae && (modrm >> 3) & 7 == 5 && modrm >> 6 != 3 {
        let rex = i > 0 && code[i - 1] & 0xf0 == 0x40;
        Some(Hit {
            offset: if rex { i - 1 } else { i },
            kind: Kind::Xrstor { rex },
        })
    } else {
        None
    }
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

    /// The byte-by-byte definition the block scan must agree with.
    fn reference(code: &[u8]) -> Vec<Hit> {
        (0..code.len()).filter_map(|i| hit_at(code, i)).collect()
    }

    #[test]
    fn block_scan_equals_the_byte_by_byte_definition() {
        // Random bytes drawn mostly from the interesting ones, every length
        // around the block size (hits straddling blocks and the tail).
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        const BYTES: [u8; 8] = [0x0f, 0x01, 0xef, 0xae, 0x2f, 0x48, 0xe8, 0x90];
        for len in (0..200).chain([1000, 4096, 65537]) {
            let code: Vec<u8> = (0..len)
                .map(|_| {
                    let r = next();
                    if r % 4 == 0 {
                        (r >> 8) as u8
                    } else {
                        BYTES[(r >> 8) as usize % BYTES.len()]
                    }
                })
                .collect();
            assert_eq!(scan(&code), reference(&code), "length {len}");
        }
        // Real code: this test binary's own text and libc's file.
        for path in ["/proc/self/exe", "/lib/x86_64-linux-gnu/libc.so.6"] {
            if let Ok(code) = std::fs::read(path) {
                assert_eq!(scan(&code), reference(&code), "{path}");
            }
        }
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
