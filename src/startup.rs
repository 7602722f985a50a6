//! Start-up: the constructor's sequence, top to bottom, as the pipeline it
//! is: configuration → logging → real functions → PKU probe → census →
//! compartments → carveouts → plan → fault handler → apply → lazy binding →
//! gates → reports → allocator → threads → signal handlers installed
//! earlier and the main thread's alternate stack → pkey guard → syscall
//! filter. The only module that calls the features'
//! `install`/`start`/`init` functions.

use crate::carveouts;
use crate::compartments;
use crate::config::{Config, PkuMode};
use crate::lifecycle::{fatal, notice, set_state, transition, InitState};
use crate::maps;
use crate::objects;
use crate::pku::{self, Backend, PkuSupport};
use crate::plan::{self, ThreadTls};
use crate::runtime::{self, Census, CensusLock, Runtime};
use crate::stackfmt::StackBuf;

/// The constructor's work. Runs once; later calls return at once.
pub fn init() {
    if !transition(InitState::Uninit, InitState::Initializing) {
        return;
    }
    let config = match Config::from_environ() {
        Ok(c) => c,
        Err(e) => fatal(format_args!("{e}")),
    };
    if config.help {
        print_help();
    }
    if let Err(errno) = crate::logging::init(config.log_level, config.log_file) {
        fatal(format_args!(
            "IA2_LOG_FILE={:?}: cannot open for appending (errno {errno})",
            config.log_file.unwrap_or("")
        ));
    }
    if let Some(original) = config.tls_preload {
        if !crate::tls::restore_preload(original) {
            log::warn!(
                "IA2_TLS_PRELOAD={original:?}: LD_PRELOAD not restored (missing or shorter)"
            );
        }
    }
    crate::real::resolve_all();
    crate::real::real_dlsym();
    crate::dl::resolve_dladdr();
    crate::callbacks::resolve();
    crate::tagmap::register_fork_handlers();
    crate::sealed::register_fork_handlers();
    crate::alloc::prepare();

    let support = match config.pku {
        PkuMode::Off => {
            notice(format_args!(
                "IA2_PKU=off: the shim is disabled; nothing is protected"
            ));
            crate::dl::pass_through();
            let _ = runtime::set(Runtime {
                config,
                pku: PkuSupport { syscall: Err(0) },
                census: CensusLock::new(Census::default()),
            });
            set_state(InitState::Ready);
            return;
        }
        PkuMode::Require => {
            let s = pku::probe();
            if !s.usable() {
                fatal(format_args!(
                    "IA2_PKU=require: no usable memory protection keys: {s}. \
                     Run the program under `ia2run --vm -- CMD` (a PKU-capable QEMU guest), \
                     or set IA2_PKU=sim to simulate keys without enforcement, or IA2_PKU=off"
                ));
            }
            pku::set_backend(Backend::Hardware);
            s
        }
        PkuMode::Sim => {
            notice(format_args!(
                "IA2_PKU=sim: protection keys are SIMULATED; nothing is enforced"
            ));
            pku::set_backend(Backend::Sim);
            pku::probe()
        }
    };

    let census = build_census(&config);
    crate::cxx::resolve(census.objects.iter());
    if let Some(exe) = census.objects.first() {
        crate::fault::set_main_base(carveouts::map_start(exe));
    }
    let mut keys = [0u32; 16];
    let used = census
        .compartment_of
        .iter()
        .flatten()
        .fold(0u32, |m, &c| m | 1 << c);
    for c in 1..16u8 {
        if used & (1 << c) != 0 {
            keys[c as usize] = pku::alloc_key().unwrap_or_else(|e| {
                fatal(format_args!(
                    "pkey_alloc for compartment {c} failed (errno {e})"
                ))
            });
        }
    }
    runtime::set_keys(keys);
    let rt = Runtime {
        config,
        pku: support,
        census: CensusLock::new(census),
    };
    if !runtime::set(rt) {
        fatal(format_args!("runtime initialised twice"));
    }
    let rt = runtime::get().expect("just set");
    // The fault handler first: threads that library constructors started
    // are already running, and the first one to touch a page tagged below
    // gets a report rather than a silent death.
    crate::fault::install();
    {
        let census = rt.census.read().unwrap_or_else(|e| e.into_inner());
        if let Err((entry, errno)) = crate::apply::apply(&census.plan, &rt.keys()) {
            fatal(format_args!(
                "pkey_mprotect({}, prot {:#x}, key of compartment {:?}) failed (errno {errno})",
                entry.range, entry.prot, entry.compartment
            ));
        }
        crate::bindnow::bind_objects(rt, &census, 0..census.objects.len(), core::ptr::null_mut());
    }
    crate::dl::share_names(rt);
    crate::fault::after_apply();
    crate::gates::install(rt);
    crate::callbacks::harden();
    crate::report::startup(rt);
    crate::bindnow::report_plan(rt);
    crate::alloc::start(rt);
    crate::threads::init();
    crate::signals::adopt_installed();
    crate::signals::thread_start();
    crate::keyguard::install(
        crate::hooks::pkey_set as *const () as usize,
        crate::hooks::libc_entries(),
    );
    crate::syscalls::install(rt);
    set_state(InitState::Ready);
    // Fork handlers that library constructors registered before now.
    crate::callbacks::decide_pending();
    // Last: the sealed statics (the real functions, the init state, the
    // filter's trusted range, ...), which start-up wrote until now.
    let key = pku::shim_key();
    if key != 0 {
        pku::seal_section(key);
    }
}

/// `IA2_HELP=1`: the variables, then exit. Out of line: its 16 KiB buffer
/// in `init`'s frame cost every start-up four stack pages.
#[cold]
#[inline(never)]
fn print_help() -> ! {
    let mut b = StackBuf::<16384>::new();
    let _ = crate::config::write_help(&mut b);
    b.write_to_fd(1);
    // SAFETY: exiting before the program runs, as IA2_HELP promises.
    unsafe { libc::_exit(0) }
}

/// Census, assignment, carveouts and plan for the objects loaded now.
fn build_census(config: &Config) -> Census {
    // /proc/self/maps first: its line for the executable names it for the
    // census, as `readlink("/proc/self/exe")` would, without a system call
    // (the first look at /proc/self costs a new process 15-25 µs; one is
    // enough).
    let maps = maps::read_self_maps()
        .unwrap_or_else(|e| fatal(format_args!("reading /proc/self/maps: {e}")));
    // SAFETY: getauxval has no preconditions.
    let phdr = unsafe { libc::getauxval(libc::AT_PHDR) } as usize;
    if let Some(m) = maps.iter().find(|m| m.contains(phdr)) {
        // Paths are printed escaped (a newline as \012): those keep readlink.
        if m.path.starts_with('/') && !m.path.contains('\\') {
            objects::seed_exe_path(&m.path);
        }
    }
    let objects = objects::census();
    crate::tls::note_layout(objects.iter().any(|o| plan::is_tls_pad(&o.basename)));
    let needed: Vec<Vec<String>> = objects.iter().map(|o| o.needed()).collect();
    let assignment = compartments::assign_with_deps(&objects, config, &needed)
        .unwrap_or_else(|e| fatal(format_args!("{e}")));
    for w in &assignment.warnings {
        log::warn!("{w}");
    }
    if let Some(g) = assignment.groups.first() {
        notice(format_args!("{g}; IA2_REPORT=plan lists the groups"));
    }
    let mut carveouts = carveouts::thread_carveouts(config);
    let copies = carveouts::copy_relocs(config, &objects, &assignment.of_object);
    let imports = carveouts::data_imports(config, &objects, &assignment.of_object, &copies);
    carveouts.push(copies);
    carveouts.push(imports);
    // The libc and ld.so carveouts matter only when libc and ld.so carry a
    // key (strict mode); their decoders cost start-up time, so they run then.
    if config.libc_compartment.is_some() {
        carveouts.push(carveouts::tls_generation(config, &objects));
        // libc_tuning, pthread_once, mutex_elision: one pass over libc's
        // dynsym for the three; pushed in the order the plan paints them.
        let [tuning, once, elision]: [carveouts::Located; 3] =
            carveouts::libc_decoded(config, &objects)
                .try_into()
                .unwrap_or_else(|_| unreachable!("three locators in, three out"));
        carveouts.push(tuning);
        carveouts.push(carveouts::libc_single_threaded(config, &objects));
        carveouts.push(once);
        carveouts.push(carveouts::libgcc(config, &objects));
        carveouts.push(elision);
        carveouts.push(crate::libc_data::data_imports(
            config,
            &objects,
            &assignment.of_object,
        ));
    }
    // Strict mode tags the loader heap with the libc compartment's key.
    let mut extra = Vec::new();
    if let Some(n) = config.libc_compartment {
        let heap = carveouts::loader_heap(&maps, &objects);
        extra.extend(heap.iter().map(|&range| plan::ExtraRange {
            range,
            compartment: n,
            reason: plan::Reason::LoaderHeap,
        }));
        carveouts.push(carveouts::loader_heap_carveout(config, &heap));
    }
    match carveouts::user_share(config, &objects) {
        Ok(Some(l)) => carveouts.push(l),
        Ok(None) => {}
        Err(e) => fatal(format_args!("{e}")),
    }
    let main_thread = ThreadTls::new(
        0,
        objects
            .iter()
            .enumerate()
            .filter_map(|(i, o)| {
                let t = o.tls?;
                (t.block != 0).then(|| (i, objects::Range::new(t.block, t.block + t.memsz)))
            })
            .collect(),
        |i| plan::is_tls_pad(&objects[i].basename),
    );
    let enabled = carveouts::enabled(&carveouts);
    let governed = carveouts::governed(&carveouts);
    let plan = plan::build(&plan::PlanInput {
        objects: &objects,
        compartment_of: &assignment.of_object,
        threads: &[main_thread],
        extra: &extra,
        carveouts: &enabled,
        governed: &governed,
        maps: &maps,
    });
    Census {
        objects,
        compartment_of: assignment.of_object,
        carveouts,
        plan,
        groups: assignment.groups,
        maps,
    }
}
