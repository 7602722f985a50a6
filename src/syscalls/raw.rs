//! The shim's own syscall instruction. The filter allows every syscall made
//! from it (by instruction pointer), so the SIGSYS handler can carry out the
//! calls it allows without trapping again.

core::arch::global_asm!(
    ".pushsection .text.ia2shim_raw_syscall,\"ax\",@progbits",
    ".globl ia2shim_raw_syscall",
    ".hidden ia2shim_raw_syscall",
    ".type ia2shim_raw_syscall,@function",
    ".p2align 4",
    "ia2shim_raw_syscall:",
    ".cfi_startproc",
    "mov rax, rdi",
    "mov rdi, rsi",
    "mov rsi, rdx",
    "mov rdx, rcx",
    "mov r10, r8",
    "mov r8, r9",
    "mov r9, qword ptr [rsp + 8]",
    "syscall",
    ".globl ia2shim_raw_syscall_ret",
    ".hidden ia2shim_raw_syscall_ret",
    "ia2shim_raw_syscall_ret:",
    "ret",
    ".cfi_endproc",
    ".size ia2shim_raw_syscall, .-ia2shim_raw_syscall",
    ".popsection",
);

extern "C" {
    fn ia2shim_raw_syscall(
        nr: i64,
        a: usize,
        b: usize,
        c: usize,
        d: usize,
        e: usize,
        f: usize,
    ) -> isize;
    static ia2shim_raw_syscall_ret: u8;
}

/// The address the kernel reports for syscalls made by [`syscall6`]: the
/// instruction after its `syscall`.
pub fn stub_ip() -> usize {
    core::ptr::addr_of!(ia2shim_raw_syscall_ret) as usize
}

/// A raw syscall from the shim's instruction: returns the kernel's value
/// (negative errno on failure).
///
/// # Safety
/// As the syscall `nr` with these arguments.
pub unsafe fn syscall6(nr: i64, args: [usize; 6]) -> isize {
    // SAFETY: the caller's contract.
    unsafe { ia2shim_raw_syscall(nr, args[0], args[1], args[2], args[3], args[4], args[5]) }
}
