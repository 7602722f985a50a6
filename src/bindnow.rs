//! Binding lazy `JUMP_SLOT`s up front, as `LD_BIND_NOW` would.
//!
//! A lazily bound object's first call through a PLT slot runs ld.so's
//! `_dl_fixup` with the caller's rights. It reads the object's `link_map`
//! (on the loader heap, which strict mode tags with the libc compartment's
//! key) and writes the slot (in the object's `.got.plt`, tagged with the
//! object's key when it is in a compartment). So a compartment's first call
//! faults in strict mode, and code of one compartment that runs with
//! another's rights faults on its own PLT in any mode. Debian's gcc links
//! lazily by default, and libstdc++, libgcc_s and libc themselves are lazy.
//!
//! At start-up and after each `dlopen`, with every key accessible, the shim
//! calls ld.so's own `_dl_fixup(link_map, index)` for every `JUMP_SLOT` of
//! every lazily bound object that can run with a compartment's rights
//! (strict mode: every object but the shim and the vdso; otherwise the
//! compartment objects). `_dl_fixup` is hidden; it is found by decoding
//! the lazy resolver that the object's `GOT[2]` points at
//! (`_dl_runtime_resolve_xsave` and friends: `mov rsi,[rbx+10h]`,
//! `mov rdi,[rbx+8]`, `call _dl_fixup`), and `GOT[1]` is the object's
//! `link_map`. Using the loader's resolver keeps its exact semantics
//! (symbol versions, scopes, IFUNC resolvers, `LD_AUDIT`-free fast path).
//!
//! A slot whose symbol is undefined, not weak, and found neither in the
//! global scope nor in the scope of the `dlopen` that loaded the object
//! would make `_dl_fixup` end the process with "symbol lookup error", which
//! lazy binding would only do if the program called it: such slots stay
//! lazy and are counted. The lookups ask for the version the reference
//! needs (`dlvsym`): a reference to a compat-only symbol such as libm's
//! `__atan2_finite@GLIBC_2.15` resolves, where plain `dlsym` finds no
//! default version. The object's own `link_map` is not a usable handle: a
//! dependency that was never opened itself has an empty search list, on
//! which glibc's lookup loop reads past the end.

use crate::objects::{LoadedObject, ObjectKind};
use crate::runtime::{Census, Runtime};
use core::ffi::c_void;
use core::sync::atomic::{AtomicUsize, Ordering};
use object::elf;

/// What binding did, for the plan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Bound {
    /// Lazily bound objects visited.
    pub objects: usize,
    /// Slots resolved by `_dl_fixup`.
    pub slots: usize,
    /// Slots left lazy: their symbol is defined nowhere.
    pub unresolvable: usize,
    /// Lazy objects whose resolver could not be decoded (left lazy).
    pub undecoded: usize,
}

static TOTAL: [AtomicUsize; 4] = [
    AtomicUsize::new(0),
    AtomicUsize::new(0),
    AtomicUsize::new(0),
    AtomicUsize::new(0),
];

/// Totals since start-up (start-up plus every `dlopen`).
pub fn totals() -> Bound {
    Bound {
        objects: TOTAL[0].load(Ordering::Relaxed),
        slots: TOTAL[1].load(Ordering::Relaxed),
        unresolvable: TOTAL[2].load(Ordering::Relaxed),
        undecoded: TOTAL[3].load(Ordering::Relaxed),
    }
}

/// Is binding on? `IA2_BIND_NOW`, which defaults to on.
pub fn enabled(rt: &Runtime) -> bool {
    rt.config.bind_now
}

/// Can `obj` (census index `i`) run with a compartment's rights?
fn candidate(rt: &Runtime, census: &Census, i: usize, obj: &LoadedObject) -> bool {
    if obj.segments.is_empty() || matches!(obj.kind, ObjectKind::Shim | ObjectKind::Vdso) {
        return false;
    }
    rt.config.libc_compartment.is_some() || census.compartment_of[i].is_some()
}

/// Bind every lazy slot of census objects `which`. PKRU must allow every
/// compartment key (start-up, or the dlopen hook's all-keys section).
/// `scope`: the handle of the `dlopen` that loaded them (its local scope is
/// searched after the global one), or null at start-up.
pub fn bind_objects(
    rt: &Runtime,
    census: &Census,
    which: core::ops::Range<usize>,
    scope: *mut c_void,
) -> Bound {
    let mut b = Bound::default();
    if !enabled(rt) {
        return b;
    }
    for i in which {
        let obj = &census.objects[i];
        if !candidate(rt, census, i, obj) {
            continue;
        }
        bind_object(obj, scope, &mut b);
    }
    for (t, v) in TOTAL
        .iter()
        .zip([b.objects, b.slots, b.unresolvable, b.undecoded])
    {
        t.fetch_add(v, Ordering::Relaxed);
    }
    b
}

type FixupFn = unsafe extern "C" fn(*mut c_void, u64) -> usize;

fn bind_object(obj: &LoadedObject, scope: *mut c_void, b: &mut Bound) {
    let Some(d) = obj.dynamic_info() else { return };
    if d.bind_now() || d.jmprel == 0 || d.pltrelsz == 0 {
        return;
    }
    let Some(pltgot) = pltgot(obj) else { return };
    // SAFETY: DT_PLTGOT points at the object's .got.plt; GOT[1] and GOT[2]
    // are set by ld.so for lazily relocated objects (0 otherwise).
    let (map, resolver) = unsafe {
        (
            core::ptr::read_volatile((pltgot + 8) as *const usize),
            core::ptr::read_volatile((pltgot + 16) as *const usize),
        )
    };
    if map == 0 || resolver == 0 {
        return; // relocated with LD_BIND_NOW, or no lazy PLT
    }
    b.objects += 1;
    let Some(fixup) = find_fixup(resolver) else {
        b.undecoded += 1;
        log::warn!(
            "lazy binding: cannot decode the resolver at {resolver:#x} of {}; its slots stay lazy",
            obj.display_name()
        );
        return;
    };
    // SAFETY: `fixup` is ld.so's _dl_fixup (decoded above).
    let fixup: FixupFn = unsafe { core::mem::transmute::<usize, FixupFn>(fixup) };
    let count = d.pltrelsz / core::mem::size_of::<elf::Rela64<object::LittleEndian>>();
    for index in 0..count {
        // SAFETY: DT_JMPREL is an array of `count` Elf64_Rela in mapped,
        // read-only memory.
        let r = unsafe { &*(d.jmprel as *const elf::Rela64<object::LittleEndian>).add(index) };
        let info = r.r_info.get(object::LittleEndian);
        if (info & 0xffff_ffff) as u32 != elf::R_X86_64_JUMP_SLOT {
            continue;
        }
        let sym = (info >> 32) as u32;
        let slot = obj.base + r.r_offset.get(object::LittleEndian) as usize;
        // SAFETY: an aligned .got.plt word of this loaded object.
        let value = unsafe { core::ptr::read_volatile(slot as *const usize) };
        if !obj.contains(value) {
            continue; // bound already (by an earlier run or a call)
        }
        if !resolvable(&d, scope, sym) {
            b.unresolvable += 1;
            continue;
        }
        // SAFETY: `_dl_fixup(link_map, reloc_index)` as the PLT would call
        // it: `map` is GOT[1] and `index` a JUMP_SLOT index in DT_JMPREL.
        unsafe { fixup(map as *mut c_void, index as u64) };
        b.slots += 1;
    }
}

/// `DT_PLTGOT` of `obj` (absolute).
fn pltgot(obj: &LoadedObject) -> Option<usize> {
    let mut p = obj.dynamic? as *const elf::Dyn64<object::LittleEndian>;
    loop {
        // SAFETY: the object's DT_NULL-terminated dynamic section.
        let e = unsafe { &*p };
        let tag = e.d_tag.get(object::LittleEndian) as u32;
        if tag == elf::DT_NULL {
            return None;
        }
        if tag == elf::DT_PLTGOT {
            let v = e.d_val.get(object::LittleEndian) as usize;
            return Some(if v < obj.base { obj.base + v } else { v });
        }
        // SAFETY: not past DT_NULL yet.
        p = unsafe { p.add(1) };
    }
}

/// Would ld.so find symbol `index` for this object? Defined and weak
/// symbols always "resolve" (a weak undefined one to 0, as with
/// `LD_BIND_NOW`); an undefined strong one is looked up, with the version
/// it requires, in the global scope and then in `scope` (a `dlopen`
/// handle, or null).
fn resolvable(d: &crate::objects::DynamicInfo, scope: *mut c_void, index: u32) -> bool {
    if d.symtab == 0 {
        return false;
    }
    // SAFETY: the index comes from this object's relocation.
    let s = unsafe { &*(d.symtab as *const elf::Sym64<object::LittleEndian>).add(index as usize) };
    let bind = s.st_info >> 4;
    if s.st_shndx.get(object::LittleEndian) != elf::SHN_UNDEF || bind == elf::STB_WEAK {
        return true;
    }
    // The string table's own NUL-terminated name: no copy per slot.
    // SAFETY: the symbol index is valid (above).
    let Some(name) = (unsafe { d.symbol_cname(index) }) else {
        return false;
    };
    // SAFETY: as above.
    let version = unsafe { d.symbol_version(index) };
    extern "C" {
        fn dlvsym(
            handle: *mut c_void,
            name: *const libc::c_char,
            version: *const libc::c_char,
        ) -> *mut c_void;
    }
    // The shim's dlsym hook is bypassed: PKRU allows every key here.
    let found = |handle: *mut c_void| match version {
        // SAFETY: a valid handle (RTLD_DEFAULT or one dlopen returned) and
        // NUL-terminated strings.
        Some(v) => unsafe { !dlvsym(handle, name.as_ptr(), v.as_ptr()).is_null() },
        // SAFETY: as above.
        None => unsafe { crate::real::dlsym_past_hook(handle, name) != 0 },
    };
    found(libc::RTLD_DEFAULT) || (!scope.is_null() && found(scope))
}

#[link_section = ".ia2shim_sealed"]
static FIXUP: AtomicUsize = AtomicUsize::new(0);

/// `_dl_fixup`, decoded from a lazy resolver (`GOT[2]`): the first direct
/// call after `mov rsi,[rbx+10h]` and `mov rdi,[rbx+8]`.
fn find_fixup(resolver: usize) -> Option<usize> {
    let cached = FIXUP.load(Ordering::Relaxed);
    if cached != 0 {
        return Some(cached);
    }
    // SAFETY: the resolver is code in ld.so's text; 256 bytes stay inside it.
    let bytes = unsafe { core::slice::from_raw_parts(resolver as *const u8, 256) };
    // glibc's resolvers (dl-trampoline.h) all end their set-up with these
    // three instructions: matching their bytes saves building iced's
    // decoder tables (3.3 M instructions, most of a small program's
    // start-up). The decode below stays for other encodings.
    if let Some(t) = fixup_by_bytes(bytes, resolver) {
        crate::pku::with_shim_writes(|| FIXUP.store(t, Ordering::Relaxed));
        return Some(t);
    }
    let t = fixup_by_decode(bytes, resolver)?;
    crate::pku::with_shim_writes(|| FIXUP.store(t, Ordering::Relaxed));
    Some(t)
}

/// The decode: the first direct call after both loads, before any jump or return.
fn fixup_by_decode(bytes: &[u8], resolver: usize) -> Option<usize> {
    use iced_x86::{Code, Decoder, DecoderOptions, OpKind, Register};
    let mut dec = Decoder::with_ip(64, bytes, resolver as u64, DecoderOptions::NONE);
    let (mut rdi, mut rsi) = (false, false);
    for insn in &mut dec {
        let loads = |reg: Register, disp: u64| {
            insn.code() == Code::Mov_r64_rm64
                && insn.op0_register() == reg
                && insn.op1_kind() == OpKind::Memory
                && insn.memory_base() == Register::RBX
                && insn.memory_index() == Register::None
                && insn.memory_displacement64() == disp
        };
        if loads(Register::RDI, 8) {
            rdi = true;
        } else if loads(Register::RSI, 16) {
            rsi = true;
        } else if insn.code() == Code::Call_rel32_64 {
            if rdi && rsi {
                return Some(insn.near_branch_target() as usize);
            }
            return None;
        } else if matches!(
            insn.mnemonic(),
            iced_x86::Mnemonic::Ret | iced_x86::Mnemonic::Jmp
        ) {
            return None;
        }
    }
    None
}

/// `mov rsi,[rbx+10h]; mov rdi,[rbx+8]; call rel32` in `bytes` (code at
/// `at`): the call's target, if it lies in the same object as the
/// resolver (a match across instruction boundaries would not).
fn fixup_by_bytes(bytes: &[u8], at: usize) -> Option<usize> {
    let target = call_target(bytes, at)?;
    same_object(at, target).then_some(target)
}

/// The target of the call in the byte pattern, unchecked.
fn call_target(bytes: &[u8], at: usize) -> Option<usize> {
    const SEQ: [u8; 9] = [0x48, 0x8b, 0x73, 0x10, 0x48, 0x8b, 0x7b, 0x08, 0xe8];
    let k = bytes.windows(SEQ.len() + 4).position(|w| w[..9] == SEQ)?;
    let rel = i32::from_le_bytes(bytes[k + 9..k + 13].try_into().ok()?);
    Some((at + k + 13).wrapping_add_signed(rel as isize))
}

/// Do `a` and `b` lie in the same loaded object?
fn same_object(a: usize, b: usize) -> bool {
    let base = |addr: usize| {
        // SAFETY: zeroed Dl_info is valid for dladdr to fill.
        let mut info: libc::Dl_info = unsafe { core::mem::zeroed() };
        // SAFETY: dladdr only reads loader data.
        let ok = unsafe { libc::dladdr(addr as *const c_void, &mut info) } != 0;
        ok.then_some(info.dli_fbase as usize)
    };
    matches!((base(a), base(b)), (Some(x), Some(y)) if x == y)
}

/// The plan line.
pub fn plan_line(rt: &Runtime) -> String {
    let t = totals();
    let p = crate::stackfmt::pid();
    if rt.config.report_format == crate::config::ReportFormat::Json {
        return format!(
            "{{\"type\":\"bind_now\",\"enabled\":{},\"objects\":{},\"slots\":{},\"unresolvable\":{},\"undecoded\":{}}}\n",
            enabled(rt),
            t.objects,
            t.slots,
            t.unresolvable,
            t.undecoded
        );
    }
    if !enabled(rt) {
        return format!("ia2shim[{p}]: lazy binding: left lazy (IA2_BIND_NOW=0)\n");
    }
    format!(
        "ia2shim[{p}]: lazy binding: {} slots bound now in {} lazily bound objects ({} unresolvable left lazy, {} objects with an undecodable resolver)\n",
        t.slots, t.objects, t.unresolvable, t.undecoded
    )
}

/// `IA2_REPORT=plan`'s lines for binding and, in strict mode, the libc-gate
/// policy with its hot list.
pub fn report_plan(rt: &Runtime) {
    if !rt.config.reports.plan {
        return;
    }
    let mut text = plan_line(rt);
    if rt.config.libc_compartment.is_some() {
        if rt.config.report_format == crate::config::ReportFormat::Json {
            text.push_str(&crate::libc_gates::plan_json(rt.config.libc_gates));
        } else {
            text.push_str(&crate::libc_gates::plan_text(
                rt.config.libc_gates,
                rt.config.tls_get_addr_gate,
                crate::stackfmt::pid(),
            ));
        }
    }
    crate::stackfmt::write_all_fd(
        crate::fault::REPORT_FD.load(Ordering::Relaxed),
        text.as_bytes(),
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The byte match finds what the decode finds, in glibc's xsave
    /// resolver's tail (bytes from ld.so 2.36) at several offsets.
    #[test]
    fn byte_match_agrees_with_the_decode() {
        let tail: [u8; 21] = [
            0x0f, 0xae, 0x64, 0x24, 0x40, // xsave [rsp+40h]
            0x48, 0x8b, 0x73, 0x10, // mov rsi,[rbx+10h]
            0x48, 0x8b, 0x7b, 0x08, // mov rdi,[rbx+8]
            0xe8, 0x10, 0xfe, 0xff, 0xff, // call
            0x49, 0x89, 0xc3, // mov r11,rax
        ];
        for pad in [0usize, 1, 7, 100] {
            let mut code = vec![0x90u8; pad];
            code.extend_from_slice(&tail);
            code.resize(256, 0xcc);
            let at = 0x7f00_0000_1000;
            let d = fixup_by_decode(&code, at).expect("decodes");
            assert_eq!(call_target(&code, at), Some(d), "pad {pad}");
        }
        // Without the loads there is no match either way.
        let mut code = vec![0x90u8; 16];
        code.extend_from_slice(&[0xe8, 0, 0, 0, 0]);
        code.resize(256, 0xcc);
        assert_eq!(call_target(&code, 0x1000), None);
        assert_eq!(fixup_by_decode(&code, 0x1000), None);
    }
}
