use super::*;
use crate::pku::{set_sim_pkru, sim_pkru};
use iced_x86::Mnemonic;

/// Sim-mode tests share the process-wide table and backend.
pub(super) static LOCK: Mutex<()> = Mutex::new(());

fn sim_gate(target: usize, pkru: u32) -> usize {
    pku::set_backend(Backend::Sim);
    thread_start();
    let mut st = state();
    st.enabled = true;
    if let Some(&i) = st.by_target.get(&(target, 1)) {
        return i;
    }
    let i = st.gates.len();
    write_entry(
        &mut st,
        i,
        Entry {
            target,
            code: Variant::Sim.code(),
            pkru,
            compartment: 1,
            _reserved: 0,
        },
    );
    st.gates.push(Gate {
        index: i,
        target,
        compartment: 1,
        symbol: "test".into(),
        callee: "test".into(),
        variant: Variant::Sim,
        dead: false,
    });
    st.by_target.insert((target, 1), i);
    i
}

#[test]
fn hardware_round_trip_is_within_budget() {
    let insns = round_trip_instructions(Variant::Hardware);
    let pkru = insns
        .iter()
        .filter(|i| matches!(i.mnemonic(), Mnemonic::Rdpkru | Mnemonic::Wrpkru))
        .count();
    assert_eq!(pkru, 3, "one RDPKRU and two WRPKRU");
    let n = insns.len() - pkru;
    eprintln!("hardware gate round trip: {n} instructions outside RDPKRU/WRPKRU");
    assert!(n <= 30, "{n} instructions outside RDPKRU/WRPKRU");
    let counting = round_trip_instructions(Variant::HardwareCounting).len() - pkru;
    assert_eq!(counting, n + 1);
    let sim = round_trip_instructions(Variant::Sim);
    assert!(sim
        .iter()
        .all(|i| !matches!(i.mnemonic(), Mnemonic::Rdpkru | Mnemonic::Wrpkru)));
    assert_eq!(
        sim.len(),
        n + 1,
        "sim = hardware + counter (the simulated PKRU's two moves stand in for the xors)"
    );
}

/// Hardening costs one WRPKRU (opening the shim key) and at most 10
/// instructions more per round trip (issue 17's budget): `mov r10d, eax`,
/// `and eax, [open mask]` on the way in; `mov`, `xor`, `test`, `jnz` (the
/// frame-pointer check) on the way out.
#[test]
fn hardening_costs_one_wrpkru_and_at_most_ten_instructions() {
    let plain = round_trip_instructions(Variant::Hardware);
    let hard = hardened_round_trip_instructions(Variant::Hardware);
    let is_pkru =
        |i: &&iced_x86::Instruction| matches!(i.mnemonic(), Mnemonic::Rdpkru | Mnemonic::Wrpkru);
    let pkru = hard.iter().filter(is_pkru).count();
    assert_eq!(pkru, 4, "one RDPKRU and three WRPKRU");
    let n = hard.len() - pkru;
    let base = plain.len() - plain.iter().filter(is_pkru).count();
    eprintln!(
        "hardened gate round trip: {n} instructions outside RDPKRU/WRPKRU ({base} unhardened)"
    );
    assert!(n <= base + 10, "{n} vs {base}");
    let counting = hardened_round_trip_instructions(Variant::HardwareCounting).len() - pkru;
    assert_eq!(counting, n + 1);
    let sim = hardened_round_trip_instructions(Variant::Sim);
    assert!(sim
        .iter()
        .all(|i| !matches!(i.mnemonic(), Mnemonic::Rdpkru | Mnemonic::Wrpkru)));
}

static SEEN_PKRU: AtomicU64 = AtomicU64::new(0);

extern "C" fn ten(
    a: i64,
    b: i64,
    c: i64,
    d: i64,
    e: i64,
    f: i64,
    g: i64,
    h: i64,
    i: i64,
    j: i64,
) -> i64 {
    SEEN_PKRU.store(sim_pkru() as u64, Ordering::Relaxed);
    a + 2 * b + 3 * c + 4 * d + 5 * e + 6 * f + 7 * g + 8 * h + 9 * i + 10 * j
}

#[repr(C)]
#[derive(Debug, PartialEq, Clone, Copy)]
struct Pair {
    x: f64,
    y: f64,
}

extern "C" fn doubles(
    a: f64,
    b: f64,
    c: f64,
    d: f64,
    e: f64,
    f: f64,
    g: f64,
    h: f64,
    i: f64,
    k: i64,
) -> Pair {
    Pair {
        x: a + b + c + d + e + f + g + h + i,
        y: k as f64 * h,
    }
}

#[repr(C)]
#[derive(Debug, PartialEq, Clone, Copy)]
struct Big {
    v: [u64; 9],
}

extern "C" fn big(seed: u64, s: Big) -> Big {
    let mut o = s;
    for (k, x) in o.v.iter_mut().enumerate() {
        *x = *x * 2 + seed + k as u64;
    }
    o
}

extern "C" fn two() -> u128 {
    (7u128 << 64) | 9
}

#[test]
fn sim_gates_keep_the_abi_and_switch_the_simulated_pkru() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let callee_pkru = pku::pkru_allowing(5);
    let before = 0x1234_5678;
    let g = sim_gate(ten as *const () as usize, callee_pkru);
    set_sim_pkru(before);
    let top = stack_top();
    assert_ne!(top, 0);
    let f: extern "C" fn(i64, i64, i64, i64, i64, i64, i64, i64, i64, i64) -> i64 =
        // SAFETY: the stub forwards to `ten`, whose type this is.
        unsafe { core::mem::transmute(stub_address(g)) };
    assert_eq!(f(1, 2, 3, 4, 5, 6, 7, 8, 9, 10), 385);
    assert_eq!(SEEN_PKRU.load(Ordering::Relaxed) as u32, callee_pkru);
    assert_eq!(sim_pkru(), before);
    assert_eq!(stack_top(), top);
    assert!(calls(g) >= 1);

    let g = sim_gate(doubles as *const () as usize, callee_pkru);
    let f: extern "C" fn(f64, f64, f64, f64, f64, f64, f64, f64, f64, i64) -> Pair =
        // SAFETY: as above.
        unsafe { core::mem::transmute(stub_address(g)) };
    assert_eq!(
        f(1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 3),
        Pair { x: 45.0, y: 24.0 }
    );

    let g = sim_gate(big as *const () as usize, callee_pkru);
    let f: extern "C" fn(u64, Big) -> Big =
        // SAFETY: as above.
        unsafe { core::mem::transmute(stub_address(g)) };
    let r = f(
        1,
        Big {
            v: [1, 2, 3, 4, 5, 6, 7, 8, 9],
        },
    );
    assert_eq!(r.v, [3, 6, 9, 12, 15, 18, 21, 24, 27]);

    let g = sim_gate(two as *const () as usize, callee_pkru);
    // SAFETY: as above.
    let f: extern "C" fn() -> u128 = unsafe { core::mem::transmute(stub_address(g)) };
    assert_eq!(f(), (7u128 << 64) | 9);
    assert_eq!(stack_top(), top);
}

#[test]
fn a_new_thread_gets_its_own_stack() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let main_top = stack_top();
    let t = std::thread::spawn(|| {
        assert_eq!(stack_top(), 0);
        assert_eq!(sim_pkru(), pku::DEFAULT_PKRU);
        thread_start();
        let t = stack_top();
        assert_ne!(t, 0);
        thread_exit();
        assert_eq!(stack_top(), 0);
        t
    })
    .join()
    .unwrap();
    assert_ne!(t, main_top);
}

#[test]
fn a_panic_through_a_sim_gate_restores_pkru_and_the_frame_stack() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    extern "C-unwind" fn boom(x: i64) -> i64 {
        if x > 0 {
            std::panic::panic_any(x * 3);
        }
        x
    }
    let g = sim_gate(boom as *const () as usize, pku::pkru_allowing(4));
    // SAFETY: the stub forwards to `boom`, whose type this is.
    let f: extern "C-unwind" fn(i64) -> i64 = unsafe { core::mem::transmute(stub_address(g)) };
    let before = 0x0bad_cafe;
    set_sim_pkru(before);
    let top = stack_top();
    let r = std::panic::catch_unwind(|| f(7));
    let payload = r.expect_err("the panic crosses the gate");
    assert_eq!(payload.downcast_ref::<i64>(), Some(&21));
    assert_eq!(sim_pkru(), before, "the pad restored the caller's PKRU");
    assert_eq!(stack_top(), top, "the pad popped the gate frame");
    assert_eq!(f(-1), -1, "the gate still works afterwards");
}

extern "C" fn fixup_only(_sig: c_int, info: *mut libc::siginfo_t, ctx: *mut c_void) {
    // SAFETY: the kernel's arguments, on the faulting thread.
    if !unsafe { fixup_fault(info, ctx) } {
        // SAFETY: async-signal-safe; the test failed.
        unsafe { libc::abort() };
    }
}

#[test]
fn a_thread_without_a_gate_stack_gets_one_on_its_first_gate() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    extern "C" fn add(a: i64, b: i64) -> i64 {
        a + b
    }
    let g = sim_gate(add as *const () as usize, pku::pkru_allowing(6));
    // SAFETY: zeroed sigaction structs are valid; installing a handler
    // that only runs the gate fix-up, and restoring the old one after.
    let mut old: libc::sigaction = unsafe { core::mem::zeroed() };
    // SAFETY: as above.
    let mut sa: libc::sigaction = unsafe { core::mem::zeroed() };
    sa.sa_sigaction = fixup_only as *const () as usize;
    sa.sa_flags = libc::SA_SIGINFO;
    // SAFETY: valid sigaction structs.
    assert_eq!(unsafe { libc::sigaction(libc::SIGSEGV, &sa, &mut old) }, 0);
    let r = std::thread::spawn(move || {
        assert_eq!(stack_top(), 0, "a fresh thread has no gate-frame stack");
        // SAFETY: the stub forwards to `add`.
        let f: extern "C" fn(i64, i64) -> i64 = unsafe { core::mem::transmute(stub_address(g)) };
        let r = f(40, 2);
        let top = stack_top();
        assert_ne!(top, 0);
        assert_eq!(top, stack_base(), "the frame was popped on the new stack");
        assert_eq!(f(1, 2), 3);
        thread_exit();
        r
    })
    .join()
    .unwrap();
    // SAFETY: restoring the previous disposition.
    unsafe { libc::sigaction(libc::SIGSEGV, &old, core::ptr::null_mut()) };
    assert_eq!(r, 42);
}

#[test]
fn unwinding_passes_through_sim_gates() {
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    extern "C" fn frames() -> usize {
        let mut n = 0;
        backtrace_walk(&mut n);
        n
    }
    fn backtrace_walk(n: &mut usize) {
        let bt = std::backtrace::Backtrace::force_capture();
        let s = format!("{bt:?}");
        if s.contains("unwinding_passes_through_sim_gates") {
            *n = 1;
        }
    }
    let g = sim_gate(frames as *const () as usize, pku::pkru_allowing(3));
    // SAFETY: the stub forwards to `frames`.
    let f: extern "C" fn() -> usize = unsafe { core::mem::transmute(stub_address(g)) };
    assert_eq!(
        f(),
        1,
        "the backtrace from inside the gate reaches the test function"
    );
}
