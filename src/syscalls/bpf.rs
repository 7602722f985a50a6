//! The classic-BPF program of the syscall filter, built from the shim's
//! syscall instruction and the text ranges to watch. Pure; a small
//! interpreter in the tests runs it on synthetic `seccomp_data`.
//!
//! Decision, in order: not x86-64 (or the x32 ABI) → kill; the syscall comes
//! from the shim's own syscall instruction → allow; not a watched syscall
//! (or `mmap` without `MAP_FIXED`, or `madvise` with advice that keeps the
//! pages' contents, [`HARMLESS_ADVICE`]) → allow; the instruction pointer lies in
//! one of the watched text ranges (every object loaded at start-up) → trap
//! with [`TRAP_DATA`]; else allow. The last test is what lets an `exec`ed
//! image live: it inherits the filter but not the shim's SIGSYS handler,
//! and its code lies elsewhere (ASLR).

use crate::objects::Range;

/// `SECCOMP_RET_DATA` of our traps (delivered as `si_errno`), so the
/// handler tells them from traps of the program's own filters.
pub const TRAP_DATA: u32 = 0x1a2;

const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const X32_SYSCALL_BIT: u32 = 0x4000_0000;
const RET_KILL_PROCESS: u32 = 0x8000_0000;
const RET_TRAP: u32 = 0x0003_0000;
const RET_ALLOW: u32 = 0x7fff_0000;
const MAP_FIXED: u32 = 0x10;

/// Watched syscalls (x86-64 numbers). `mmap` is watched only with `MAP_FIXED`,
/// `madvise` only with advice outside [`HARMLESS_ADVICE`].
pub const MMAP: u32 = 9;
pub const MADVISE: u32 = 28;
/// `madvise` advice that neither discards nor changes the pages' contents
/// (now or in a child): NORMAL RANDOM SEQUENTIAL WILLNEED MERGEABLE
/// UNMERGEABLE HUGEPAGE NOHUGEPAGE DONTDUMP DODUMP COLD PAGEOUT
/// POPULATE_READ POPULATE_WRITE COLLAPSE. Everything else (DONTNEED, FREE,
/// REMOVE, WIPEONFORK, DONTFORK, GUARD_INSTALL, unknown values …) is checked.
pub const HARMLESS_ADVICE: &[u32] = &[0, 1, 2, 3, 12, 13, 14, 15, 16, 17, 20, 21, 22, 23, 25];
pub const WATCHED: &[u32] = &[
    2,   // open
    10,  // mprotect
    11,  // munmap
    25,  // mremap
    101, // ptrace
    257, // openat
    310, // process_vm_readv
    311, // process_vm_writev
    329, // pkey_mprotect
    330, // pkey_alloc
    331, // pkey_free
    425, // io_uring_setup
    437, // openat2
];

// seccomp_data offsets.
const NR: u32 = 0;
const ARCH: u32 = 4;
const IP_LO: u32 = 8;
const IP_HI: u32 = 12;
const ARG2_LO: u32 = 16 + 2 * 8;
const ARG3_LO: u32 = 16 + 3 * 8;

// BPF opcodes.
const LD_W_ABS: u16 = 0x20;
const JA: u16 = 0x05;
const JEQ_K: u16 = 0x15;
const JGE_K: u16 = 0x35;
const JSET_K: u16 = 0x45;
const RET_K: u16 = 0x06;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Insn {
    pub code: u16,
    pub jt: u8,
    pub jf: u8,
    pub k: u32,
}

const fn stmt(code: u16, k: u32) -> Insn {
    Insn {
        code,
        jt: 0,
        jf: 0,
        k,
    }
}

const fn jump(code: u16, k: u32, jt: u8, jf: u8) -> Insn {
    Insn { code, jt, jf, k }
}

/// The filter for the shim's syscall instruction at `stub_ip` (the address
/// after it, as the kernel reports it) and the watched text `ranges`.
pub fn program(stub_ip: usize, ranges: &[Range]) -> Vec<Insn> {
    let mut p = vec![
        stmt(LD_W_ABS, ARCH),
        jump(JEQ_K, AUDIT_ARCH_X86_64, 1, 0),
        stmt(RET_K, RET_KILL_PROCESS),
        stmt(LD_W_ABS, NR),
        jump(JGE_K, X32_SYSCALL_BIT, 0, 1),
        stmt(RET_K, RET_KILL_PROCESS),
        // From the shim's own syscall instruction: allow.
        stmt(LD_W_ABS, IP_LO),
        jump(JEQ_K, stub_ip as u32, 0, 3),
        stmt(LD_W_ABS, IP_HI),
        jump(JEQ_K, (stub_ip >> 32) as u32, 0, 1),
        stmt(RET_K, RET_ALLOW),
        stmt(LD_W_ABS, NR),
    ];
    // Watched: jump to the range checks; `madvise` only with advice that
    // may destroy data, `mmap` only with MAP_FIXED.
    let n = WATCHED.len();
    let m = HARMLESS_ADVICE.len();
    let madvise_block = (m + 4) as u8;
    for (i, &nr) in WATCHED.iter().enumerate() {
        // Matching: skip the remaining compares, the madvise and mmap
        // blocks and the allow.
        let rest = (n - 1 - i) as u8;
        p.push(jump(JEQ_K, nr, rest + madvise_block + 5, 0));
    }
    p.push(jump(JEQ_K, MADVISE, 0, m as u8 + 3));
    p.push(stmt(LD_W_ABS, ARG2_LO));
    for (j, &a) in HARMLESS_ADVICE.iter().enumerate() {
        p.push(jump(JEQ_K, a, (m - j) as u8, 0));
    }
    // Other advice: to the range checks, past the allow and the mmap block.
    p.push(stmt(JA, 6));
    p.push(stmt(RET_K, RET_ALLOW));
    p.push(jump(JEQ_K, MMAP, 1, 0));
    p.push(stmt(RET_K, RET_ALLOW));
    p.push(stmt(LD_W_ABS, ARG3_LO));
    p.push(jump(JSET_K, MAP_FIXED, 1, 0));
    p.push(stmt(RET_K, RET_ALLOW));
    // The watched text ranges, split so that each piece has one high word.
    for r in split_at_4g(ranges) {
        let (hi, lo, end_lo) = (
            (r.start >> 32) as u32,
            r.start as u32,
            (r.end as u64 & 0xffff_ffff) as u32,
        );
        let to_boundary = r.end == ((r.start >> 32) + 1) << 32;
        p.push(stmt(LD_W_ABS, IP_HI));
        if to_boundary {
            p.push(jump(JEQ_K, hi, 0, 3));
            p.push(stmt(LD_W_ABS, IP_LO));
            p.push(jump(JGE_K, lo, 0, 1));
        } else {
            p.push(jump(JEQ_K, hi, 0, 4));
            p.push(stmt(LD_W_ABS, IP_LO));
            p.push(jump(JGE_K, lo, 0, 2));
            p.push(jump(JGE_K, end_lo, 1, 0));
        }
        p.push(stmt(RET_K, RET_TRAP | TRAP_DATA));
    }
    p.push(stmt(RET_K, RET_ALLOW));
    p
}

fn split_at_4g(ranges: &[Range]) -> Vec<Range> {
    let mut out = Vec::new();
    for r in ranges.iter().filter(|r| r.start < r.end) {
        let mut s = r.start;
        while s < r.end {
            let boundary = ((s >> 32) + 1) << 32;
            let e = r.end.min(boundary);
            out.push(Range::new(s, e));
            s = e;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run the program on (arch, nr, ip, arg3) as the kernel would.
    fn run(p: &[Insn], arch: u32, nr: u32, ip: usize, arg3: u64) -> u32 {
        run_args(p, arch, nr, ip, 0, arg3)
    }

    fn run_args(p: &[Insn], arch: u32, nr: u32, ip: usize, arg2: u64, arg3: u64) -> u32 {
        let word = |off: u32| -> u32 {
            match off {
                NR => nr,
                ARCH => arch,
                IP_LO => ip as u32,
                IP_HI => (ip >> 32) as u32,
                ARG2_LO => arg2 as u32,
                ARG3_LO => arg3 as u32,
                _ => panic!("offset {off}"),
            }
        };
        let (mut pc, mut a) = (0usize, 0u32);
        loop {
            let i = p[pc];
            pc += 1;
            match i.code {
                LD_W_ABS => a = word(i.k),
                RET_K => return i.k,
                JA => pc += i.k as usize,
                JEQ_K | JGE_K | JSET_K => {
                    let t = match i.code {
                        JEQ_K => a == i.k,
                        JGE_K => a >= i.k,
                        _ => a & i.k != 0,
                    };
                    pc += if t { i.jt } else { i.jf } as usize;
                }
                c => panic!("opcode {c:#x}"),
            }
        }
    }

    #[test]
    fn decisions() {
        let stub = 0x7f10_0000_5678usize;
        let libc = Range::new(0x7f00_2000_0000, 0x7f00_2020_0000);
        let exe = Range::new(0x5555_0000_0000, 0x5555_0001_0000);
        // A range that crosses a 4 GiB boundary.
        let cross = Range::new(0x7e00_ffff_f000, 0x7e01_0000_1000);
        let p = program(stub, &[libc, exe, cross]);
        let trap = RET_TRAP | TRAP_DATA;
        let x86 = AUDIT_ARCH_X86_64;
        assert_eq!(run(&p, 0x4000_0003, 10, libc.start, 0), RET_KILL_PROCESS);
        assert_eq!(
            run(&p, x86, 10 | X32_SYSCALL_BIT, libc.start, 0),
            RET_KILL_PROCESS
        );
        // Watched, from libc and the executable: trapped; one past the end: allowed.
        for &nr in WATCHED {
            assert_eq!(run(&p, x86, nr, libc.start + 100, 0), trap, "nr {nr}");
            assert_eq!(run(&p, x86, nr, exe.end - 1, 0), trap, "nr {nr}");
            assert_eq!(run(&p, x86, nr, exe.end, 0), RET_ALLOW, "nr {nr}");
            assert_eq!(run(&p, x86, nr, stub, 0), RET_ALLOW, "nr {nr}");
            // The stub's low word under another high word is not the stub.
            assert_eq!(
                run(
                    &p,
                    x86,
                    nr,
                    (exe.start & !0xffff_ffff) | (stub & 0xffff_ffff),
                    0
                ),
                trap
            );
        }
        assert_eq!(run(&p, x86, 10, 0x7e00_ffff_f800, 0), trap);
        assert_eq!(run(&p, x86, 10, 0x7e01_0000_0800, 0), trap);
        assert_eq!(run(&p, x86, 10, 0x7e01_0000_1000, 0), RET_ALLOW);
        // mmap: only MAP_FIXED.
        assert_eq!(run(&p, x86, MMAP, libc.start, 0x22), RET_ALLOW);
        assert_eq!(run(&p, x86, MMAP, libc.start, 0x32), trap);
        assert_eq!(run(&p, x86, MMAP, exe.end + 5, 0x32), RET_ALLOW);
        // madvise: advice that may discard data is trapped, the rest allowed.
        for advice in [4u64, 8, 9, 10, 18, 24, 102, 0xdead] {
            assert_eq!(
                run_args(&p, x86, MADVISE, libc.start, advice, 0),
                trap,
                "{advice}"
            );
            assert_eq!(run_args(&p, x86, MADVISE, exe.end, advice, 0), RET_ALLOW);
            assert_eq!(run_args(&p, x86, MADVISE, stub, advice, 0), RET_ALLOW);
        }
        for &advice in HARMLESS_ADVICE {
            assert_eq!(
                run_args(&p, x86, MADVISE, libc.start, advice as u64, 0),
                RET_ALLOW
            );
        }
        // Not watched.
        for nr in [0, 1, 3, 39, 60, 231] {
            assert_eq!(run(&p, x86, nr, libc.start, 0), RET_ALLOW, "nr {nr}");
        }
    }
}
