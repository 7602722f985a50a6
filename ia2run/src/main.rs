//! The `ia2run` command line. See `--help`.

use ia2run::{Error, Job, Mode, Outcome, Status, VmOptions};
use std::ffi::OsString;
use std::io::Write;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

const HELP: &str = "\
ia2run: run a command under libia2shim.so, natively when this machine has
PKU (memory protection keys), otherwise in a QEMU/TCG virtual machine that
emulates PKU.

Usage:
  ia2run [OPTIONS] [--] CMD [ARGS...]
  ia2run [OPTIONS] --batch FILE
  ia2run [OPTIONS] --learn [--] CMD [ARGS...]

Where to run:
  --auto           natively if the host has PKU, else in the VM (default;
                   $IA2RUN_MODE=vm or native overrides the detection)
  --native         run on this machine
  --vm             boot qemu-system-x86_64 -accel tcg -cpu max with the
                   host's kernel and a busybox initramfs; the guest sees the
                   host's files read-only at the same paths, except the
                   current directory and each --rw DIR (read-write) and /tmp,
                   /run, /dev/shm (empty tmpfs); commands run as your user

What to run:
  --shim PATH      preload this libia2shim.so (default: next to ia2run, else
                   in Cargo's target dir: release, then debug)
  --no-shim        preload nothing (and drop any inherited LD_PRELOAD)
  --env K=V        set a variable for the command (repeatable); the command
                   otherwise gets ia2run's whole environment, so every IA2_*
                   variable passes through
  --batch FILE     run each line of FILE as a command, all in one VM boot
                   (or natively one after the other); see below
  --timeout S      kill after S seconds: in the VM the whole run (boot and
                   every command; default 300), natively each command
                   (default none); exit status 124
  --cmd-timeout S  kill each command after S seconds (VM and native)
  --map FILE       draw the compartments: FILE.svg, or FILE.html (the
                   picture plus carveout, gate and fault tables), one per
                   process (FILE for the first, FILE-PID for the others);
                   sets IA2_REPORT=plan,gates,maps (plus yours),
                   IA2_REPORT_FORMAT=json and IA2_REPORT_FILE to a temporary
                   file in the current directory; with IA2_ON_FAULT=audit
                   the faults are marked too
  --learn          learn a sharing policy (see below): run CMD in audit mode,
                   print the variables that would have made the run clean,
                   then run CMD again with them to confirm
  -o FILE          with --learn: write the policy to FILE (for IA2_POLICY),
                   each line with the reason, and confirm with IA2_POLICY=FILE

VM settings:
  --mem MB         guest memory (default 1024)
  --cpus N         guest CPUs (default 2)
  --kernel PATH    kernel image (default: newest /boot/vmlinuz-*)
  --rw DIR         also make DIR writable in the guest (repeatable)
  --parallel N     run up to N batch commands at once in the guest
                   (default 1; they must not depend on each other)
  --keep           keep the VM's temp dir (job file, results, console log)
  -v, --verbose    say where the command runs and how long the VM took
  -h, --help       print this help

Exit status: the command's; 128+N if a signal N killed it (with a line
`ia2run: command killed by signal N (NAME)` on stderr); 124 on a timeout;
125 when ia2run itself fails (no shim, no QEMU, no PKU in the guest, ...).
In the VM (one command) the command's stdin, stdout and stderr are
ia2run's, streamed while it runs over a virtio-serial port, byte for byte.
Where ia2run's stdin, stdout or stderr is a terminal, the command's is a
pty in the guest of the same size (following resizes), and ia2run's
terminal is in raw mode meanwhile: the guest echoes, and ^C, ^Z and ^\
reach the command as signals from its terminal. Output the command left a
background process writing is passed on for at most 0.5 s after it exits.
With --batch, stdin is /dev/null and output is passed on per command once
the batch has finished.

Learning (--learn): the audit run sets IA2_ON_FAULT=audit,
IA2_REPORT_FORMAT=json and IA2_REPORT_FILE to a temporary file in the
current directory (writable in the VM), so that every protection-key fault
is logged and let through. When the run stops on a fatal signal after
learning something new (for example the kernel kills it for a page that it
cannot write, which the shim reports), it runs again with what it learned,
at most 4 times. Then ia2run prints `ia2run: learned: VARS` on stderr,
VARS being the carveout toggles and IA2_SHARE entries of the minimal
policy (IA2_SHARE entries that you set are kept), or `ia2run: learned:
nothing`, and runs the command once more with VARS and IA2_ON_FAULT=report
to confirm (with -o FILE: writes the policy file, one line per entry with
what faulted where as a comment, and confirms with IA2_POLICY=FILE). The
confirming run prints, per compartment, the share of its static data and
TLS that stayed private. The exit status is the confirming run's: 0 when it
was clean (a fault that the policy misses kills it with SIGSEGV after a
report: 139); 125 when an audit run left no summary. Each run is a VM boot
of its own. Learned entries name memory relative to objects
(object:symbol, object+0xOFFSET+4096), so they hold in a new run with a new
address layout; heap pages have no such name and are never learned. With
IA2_HEAP=compartment it also learns the IA2_HEAP_SHARED allocation sites
whose blocks another compartment touched, and the confirming run reports
the share of each compartment's heap bytes that stayed private
(IA2_REPORT=heap).

Batch files: one command per line. Empty lines and lines starting with #
are skipped. Words are split as by a POSIX shell without expansions:
'single quotes', \"double quotes\" (where \\ escapes \\ \" $ and `) and
backslash escapes. Leading NAME=VALUE words set variables for that command
only. For each command, stdout gets `=== [i/n] CMD`, its output and
`=== [i/n] STATUS`; stderr gets `=== [i/n] CMD` and its stderr (if any).
The exit status is 0 if every command exited 0, else the status of the
first one that did not.

Environment:
  IA2RUN_SHIM       the shim to preload (like --shim)
  IA2RUN_MODE       vm or native: what --auto picks, instead of detecting
  IA2RUN_QEMU       QEMU binary (default qemu-system-x86_64 in PATH)
  IA2RUN_KERNEL     kernel image (like --kernel)
  IA2RUN_MODULES    its module directory (default /lib/modules/RELEASE)
  IA2RUN_BUSYBOX    static busybox (default busybox in PATH)
  IA2RUN_CACHE_DIR  where the initramfs and the uncompressed kernel are
                    cached, about 70 MB (default $XDG_CACHE_HOME/ia2run,
                    else $HOME/.cache/ia2run, else $TMPDIR)
  IA2RUN_KERNEL_ARGS  more kernel arguments (with --keep, `loglevel=7`
                    puts the boot messages into the kept console.log)
  IA2RUN_KEEP=1     like --keep
  IA2RUN_VERBOSE=1  like --verbose
  CARGO_TARGET_DIR  searched for the shim
  TMPDIR            where the VM's temp dir goes
  IA2_*             read by the shim, passed through like everything else

Debian packages needed for --vm: qemu-system-x86, linux-image-amd64,
busybox-static.
";

/// The end of `--help`: where this ia2run, its shim and the headers are.
fn files_help() -> String {
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("ia2run"));
    let mut s = format!(
        "\nFiles (this installation):\n  ia2run          {}\n",
        exe.display()
    );
    match ia2run::find_shim(None) {
        Ok(p) => {
            s += &format!(
                "  libia2shim.so   {} (preloaded unless --shim or IA2RUN_SHIM)\n",
                p.display()
            )
        }
        Err(_) => {
            s += "  libia2shim.so   not found; searched, in order:\n";
            for c in ia2run::shim_candidates() {
                s += &format!("                    {}\n", c.display());
            }
        }
    }
    // scripts/install.sh puts them into PREFIX/include next to PREFIX/bin.
    let include = exe
        .parent()
        .and_then(|b| b.parent())
        .map(|p| p.join("include"));
    if let Some(h) = include.map(|i| i.join("ia2shim.h")).filter(|h| h.is_file()) {
        s += &format!("  headers         {} and ia2_allocator.h\n", h.display());
    }
    s += "Install with scripts/install.sh --prefix DIR (see the README).\n";
    s
}

struct Cli {
    mode: Mode,
    shim: Option<PathBuf>,
    no_shim: bool,
    env: Vec<(OsString, OsString)>,
    batch: Option<PathBuf>,
    timeout: Option<Duration>,
    cmd_timeout: Option<Duration>,
    learn: bool,
    /// `--learn -o FILE`: write the learned policy file there.
    learn_out: Option<PathBuf>,
    map: Option<PathBuf>,
    vm: VmOptions,
    cmd: Vec<OsString>,
}

fn usage_error(msg: &str) -> ExitCode {
    eprintln!("ia2run: {msg}\nTry `ia2run --help`.");
    ExitCode::from(125)
}

fn parse_secs(s: &str) -> Result<Duration, String> {
    s.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(|| format!("not a positive number of seconds: {s}"))
}

fn parse_args(args: Vec<OsString>) -> Result<Option<Cli>, String> {
    let mut cli = Cli {
        mode: Mode::Auto,
        shim: None,
        no_shim: false,
        env: Vec::new(),
        batch: None,
        timeout: None,
        cmd_timeout: None,
        learn: false,
        learn_out: None,
        map: None,
        vm: VmOptions::default(),
        cmd: Vec::new(),
    };
    let mut it = args.into_iter();
    while let Some(arg) = it.next() {
        let Some(s) = arg.to_str().filter(|s| s.starts_with('-')) else {
            cli.cmd.push(arg);
            break;
        };
        // Both `--opt VALUE` and `--opt=VALUE`.
        let (name, inline) = match s.split_once('=') {
            Some((n, v)) if n.starts_with("--") => (n.to_owned(), Some(OsString::from(v))),
            _ => (s.to_owned(), None),
        };
        let mut value = || -> Result<OsString, String> {
            inline
                .clone()
                .or_else(|| it.next())
                .ok_or_else(|| format!("{name} needs a value"))
        };
        let text = |v: OsString| {
            v.into_string()
                .map_err(|_| "option value is not UTF-8".to_string())
        };
        match name.as_str() {
            "--" => break,
            "-h" | "--help" => return Ok(None),
            "--vm" => cli.mode = Mode::Vm,
            "--native" => cli.mode = Mode::Native,
            "--auto" => cli.mode = Mode::Auto,
            "--shim" => cli.shim = Some(value()?.into()),
            "--no-shim" => cli.no_shim = true,
            "--env" => {
                let kv = value()?.into_vec();
                let eq = kv.iter().position(|&b| b == b'=').filter(|&i| i > 0);
                let Some(eq) = eq else {
                    return Err("--env wants K=V".into());
                };
                cli.env.push((
                    OsString::from_vec(kv[..eq].to_vec()),
                    OsString::from_vec(kv[eq + 1..].to_vec()),
                ));
            }
            "--batch" => cli.batch = Some(value()?.into()),
            "--learn" => cli.learn = true,
            "-o" | "--output" => cli.learn_out = Some(value()?.into()),
            "--map" => {
                let f = PathBuf::from(value()?);
                let ext = f.extension().and_then(|e| e.to_str()).unwrap_or("");
                if !matches!(ext, "svg" | "html") {
                    return Err(format!(
                        "--map wants FILE.svg or FILE.html, not {}",
                        f.display()
                    ));
                }
                cli.map = Some(f);
            }
            "--timeout" => cli.timeout = Some(parse_secs(&text(value()?)?)?),
            "--cmd-timeout" => cli.cmd_timeout = Some(parse_secs(&text(value()?)?)?),
            "--mem" => {
                cli.vm.mem_mb = text(value()?)?
                    .parse()
                    .map_err(|_| "--mem wants a number of MB")?
            }
            "--cpus" => {
                cli.vm.cpus = text(value()?)?
                    .parse()
                    .map_err(|_| "--cpus wants a number")?
            }
            "--kernel" => cli.vm.kernel = Some(value()?.into()),
            "--rw" => cli.vm.writable.push(value()?.into()),
            "--parallel" => {
                cli.vm.parallel = text(value()?)?
                    .parse()
                    .map_err(|_| "--parallel wants a number")?
            }
            "--keep" => cli.vm.keep_temp = true,
            "-v" | "--verbose" => cli.vm.verbose = true,
            _ => return Err(format!("unknown option {s}")),
        }
    }
    cli.cmd.extend(it);
    Ok(Some(cli))
}

/// Splits one batch line into words, like a POSIX shell without expansions.
fn split_words(line: &str) -> Result<Vec<String>, String> {
    let mut words = Vec::new();
    let mut cur: Option<String> = None;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            ' ' | '\t' => {
                if let Some(w) = cur.take() {
                    words.push(w);
                }
            }
            '\'' => {
                let w = cur.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => return Err("unterminated '".into()),
                    }
                }
            }
            '"' => {
                let w = cur.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('\\' | '"' | '$' | '`')) => w.push(c),
                            Some(c) => {
                                w.push('\\');
                                w.push(c);
                            }
                            None => return Err("unterminated \"".into()),
                        },
                        Some(c) => w.push(c),
                        None => return Err("unterminated \"".into()),
                    }
                }
            }
            '\\' => match chars.next() {
                Some(c) => cur.get_or_insert_with(String::new).push(c),
                None => return Err("trailing backslash".into()),
            },
            c => cur.get_or_insert_with(String::new).push(c),
        }
    }
    words.extend(cur);
    Ok(words)
}

/// A batch line's leading NAME=VALUE words, and the command.
type EnvAndCmd = (Vec<(String, String)>, Vec<String>);

fn parse_batch_line(line: &str) -> Result<EnvAndCmd, String> {
    let mut words = split_words(line)?.into_iter().peekable();
    let mut env = Vec::new();
    while let Some(w) = words.peek() {
        let Some((k, v)) = w.split_once('=') else {
            break;
        };
        let valid = !k.is_empty()
            && !k.starts_with(|c: char| c.is_ascii_digit())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid {
            break;
        }
        env.push((k.to_owned(), v.to_owned()));
        words.next();
    }
    let cmd: Vec<String> = words.collect();
    if cmd.is_empty() {
        return Err("no command".into());
    }
    Ok((env, cmd))
}

fn report_signal(status: Status) {
    if let Some(sig) = status.signal() {
        let name = ia2run::signal_name(sig)
            .map(|n| format!(" ({n})"))
            .unwrap_or_default();
        eprintln!("ia2run: command killed by signal {sig}{name}");
    }
}

fn exit_code(code: i32) -> ExitCode {
    ExitCode::from(code.clamp(0, 255) as u8)
}

fn fail(e: &Error) -> ExitCode {
    eprintln!("ia2run: {e}");
    ExitCode::from(if matches!(e, Error::Timeout { .. }) {
        124
    } else {
        125
    })
}

fn main() -> ExitCode {
    let cli = match parse_args(std::env::args_os().skip(1).collect()) {
        Ok(Some(cli)) => cli,
        Ok(None) => {
            print!("{HELP}");
            print!("{}", files_help());
            return ExitCode::SUCCESS;
        }
        Err(e) => return usage_error(&e),
    };
    if cli.learn_out.is_some() && !cli.learn {
        return usage_error("-o FILE goes with --learn");
    }
    if cli.learn && cli.batch.is_some() {
        return usage_error("--learn takes a command, not --batch");
    }
    if cli.map.is_some() && (cli.learn || cli.batch.is_some()) {
        return usage_error("--map takes a command, not --batch or --learn");
    }
    if cli.batch.is_some() != cli.cmd.is_empty() {
        return usage_error(if cli.batch.is_some() {
            "give either --batch FILE or a command, not both"
        } else {
            "no command given"
        });
    }
    let shim = if cli.no_shim {
        None
    } else {
        match ia2run::find_shim(cli.shim.as_deref()) {
            Ok(p) => Some(p),
            Err(e) => return fail(&e),
        }
    };

    // One job from argv words plus extra variables, everything else shared.
    let make_job = |argv: Vec<OsString>, extra: &[(OsString, OsString)]| {
        let mut job = Job::new(argv);
        for (k, v) in cli.env.iter().chain(extra) {
            job = job.env(k, v);
        }
        job = match &shim {
            Some(s) => job.preload(s),
            None => job.no_preload(),
        };
        let native_limit = if cli.mode.resolve() == Mode::Native {
            cli.timeout
        } else {
            None
        };
        job.timeout = match (cli.cmd_timeout, native_limit) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        job
    };
    let mut vm = cli.vm.clone();
    if let Some(t) = cli.timeout {
        vm.timeout = t;
    }
    let mode = cli.mode.resolve();
    if vm.verbose {
        let how = if mode == Mode::Vm {
            "in the VM"
        } else {
            "natively"
        };
        let pku = if ia2run::host_has_pku() {
            "has"
        } else {
            "lacks"
        };
        eprintln!("ia2run: running {how} (host {pku} PKU); shim: {:?}", shim);
    }

    if cli.learn {
        return learn(&cli.cmd, cli.learn_out.as_deref(), mode, &vm, &make_job);
    }

    let Some(batch) = &cli.batch else {
        let report = cli.map.as_ref().map(|_| MapReport::new());
        let extra = report
            .as_ref()
            .map_or(Vec::new(), |m| m.env(&make_job(cli.cmd.clone(), &[])));
        let job = make_job(cli.cmd.clone(), &extra);
        let (status, timed_out) = if mode == Mode::Native {
            match ia2run::run_native_inherit(&job) {
                Ok(r) => r,
                Err(e) => return fail(&e),
            }
        } else {
            match ia2run::run_vm_stream(&vm, &ia2run::tlslayout::arranged(&job)) {
                Ok(r) => r,
                Err(e) => return fail(&e),
            }
        };
        if let (Some(m), Some(file)) = (&report, &cli.map) {
            if let Err(e) = m.render(file, &job, mode) {
                eprintln!("ia2run: --map: {e}");
                return ExitCode::from(125);
            }
        }
        if timed_out {
            let secs = job.timeout.map_or(0.0, |t| t.as_secs_f64());
            eprintln!("ia2run: command timed out after {secs} s and was killed");
            return ExitCode::from(124);
        }
        report_signal(status);
        return exit_code(status.code());
    };

    let text = match std::fs::read_to_string(batch) {
        Ok(t) => t,
        Err(e) => return usage_error(&format!("cannot read {}: {e}", batch.display())),
    };
    let mut jobs = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match parse_batch_line(line) {
            Ok((env, cmd)) => {
                let env: Vec<(OsString, OsString)> =
                    env.into_iter().map(|(k, v)| (k.into(), v.into())).collect();
                jobs.push(make_job(cmd.into_iter().map(Into::into).collect(), &env));
            }
            Err(e) => return usage_error(&format!("{}:{}: {e}", batch.display(), n + 1)),
        }
    }
    let outs: Vec<Outcome> = match ia2run::run_batch(mode, &vm, &jobs) {
        Ok(o) => o,
        Err(e) => return fail(&e),
    };
    let total = jobs.len();
    let mut first_failure = None;
    let (mut stdout, mut stderr) = (std::io::stdout().lock(), std::io::stderr().lock());
    for (i, (job, o)) in jobs.iter().zip(&outs).enumerate() {
        let tag = format!("=== [{}/{total}]", i + 1);
        let _ = writeln!(stdout, "{tag} {job}");
        let _ = stdout.write_all(&o.stdout);
        if !o.stdout.is_empty() && !o.stdout.ends_with(b"\n") {
            let _ = writeln!(stdout);
        }
        let timed = if o.timed_out { " (timed out)" } else { "" };
        let _ = writeln!(stdout, "{tag} {}{timed}", o.status);
        let _ = stdout.flush();
        if !o.stderr.is_empty() {
            let _ = writeln!(stderr, "{tag} {job}");
            let _ = stderr.write_all(&o.stderr);
            if !o.stderr.ends_with(b"\n") {
                let _ = writeln!(stderr);
            }
        }
        if !o.status.success() && first_failure.is_none() {
            first_failure = Some(if o.timed_out { 124 } else { o.status.code() });
        }
    }
    exit_code(first_failure.unwrap_or(0))
}

/// `--map`: the shim's JSON reports, one file per process, in the current
/// directory (which the VM can write), turned into pictures afterwards.
struct MapReport {
    dir: PathBuf,
    prefix: String,
}

impl MapReport {
    fn new() -> MapReport {
        MapReport {
            dir: std::env::current_dir().unwrap_or_else(|_| PathBuf::from(".")),
            prefix: format!(".ia2run-map-{}-", std::process::id()),
        }
    }

    /// The variables that make the shim write the report: the user's
    /// IA2_REPORT items stay, plus plan, gates and maps.
    fn env(&self, job: &Job) -> Vec<(OsString, OsString)> {
        let mut items: Vec<String> = job
            .env
            .iter()
            .find(|(k, _)| k == "IA2_REPORT")
            .and_then(|(_, v)| v.to_str())
            .unwrap_or("")
            .split(',')
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect();
        for want in ["plan", "gates", "maps"] {
            if !items.iter().any(|i| i == want) {
                items.push(want.into());
            }
        }
        let file = self.dir.join(format!("{}%p.jsonl", self.prefix));
        vec![
            ("IA2_REPORT".into(), items.join(",").into()),
            ("IA2_REPORT_FORMAT".into(), "json".into()),
            ("IA2_REPORT_FILE".into(), file.into()),
        ]
    }

    /// One picture per process: `file` for the first (lowest pid), and
    /// `STEM-PID.EXT` next to it for each other one.
    fn render(&self, file: &std::path::Path, job: &Job, mode: Mode) -> Result<(), String> {
        let mut reports: Vec<(u64, PathBuf)> = std::fs::read_dir(&self.dir)
            .map_err(|e| format!("{}: {e}", self.dir.display()))?
            .flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let pid = name.strip_prefix(&self.prefix)?.strip_suffix(".jsonl")?;
                Some((pid.parse().ok()?, e.path()))
            })
            .collect();
        reports.sort();
        if reports.is_empty() {
            return Err(
                "the shim wrote no report (is it preloaded? --no-shim gives no picture)".into(),
            );
        }
        let html = file.extension().is_some_and(|e| e == "html");
        let mut written = Vec::new();
        for (n, (pid, path)) in reports.iter().enumerate() {
            let text = std::fs::read_to_string(path).unwrap_or_default();
            let _ = std::fs::remove_file(path);
            let r = ia2run::map::Report::parse(&text);
            if r.is_empty() {
                continue;
            }
            let how = if mode == Mode::Vm { "PKU VM" } else { "native" };
            let title = format!("{job} — pid {pid} ({how})");
            let out = if n == 0 {
                file.to_path_buf()
            } else {
                let stem = file.file_stem().unwrap_or_default().to_string_lossy();
                let ext = if html { "html" } else { "svg" };
                file.with_file_name(format!("{stem}-{pid}.{ext}"))
            };
            let doc = if html {
                ia2run::map::html(&r, &title)
            } else {
                ia2run::map::svg(&r, &title)
            };
            std::fs::write(&out, doc).map_err(|e| format!("{}: {e}", out.display()))?;
            written.push(out.display().to_string());
        }
        if written.is_empty() {
            return Err("the shim's report had no objects or mappings".into());
        }
        eprintln!("ia2run: map: wrote {}", written.join(", "));
        Ok(())
    }
}

/// Runs one job (natively or in one VM boot) and passes its output on.
fn run_one(mode: Mode, vm: &VmOptions, job: &Job) -> Result<Outcome, Error> {
    let o = ia2run::run_batch(mode, vm, std::slice::from_ref(job))?.remove(0);
    let _ = std::io::stdout().write_all(&o.stdout);
    let _ = std::io::stdout().flush();
    let _ = std::io::stderr().write_all(&o.stderr);
    Ok(o)
}

/// Builds a job from argv words plus extra variables.
type MakeJob<'a> = dyn Fn(Vec<OsString>, &[(OsString, OsString)]) -> Job + 'a;

/// Audit runs of one command, at most this many: another round only when a
/// run stopped on a fatal signal after learning something new.
const LEARN_ROUNDS: usize = 4;

/// `--learn`: audit runs, the learned policy, a confirming run.
fn learn(
    cmd: &[OsString],
    out: Option<&std::path::Path>,
    mode: Mode,
    vm: &VmOptions,
    make_job: &MakeJob,
) -> ExitCode {
    let dir = std::env::current_dir().unwrap_or_else(|_| PathBuf::from("."));
    let report = dir.join(format!(".ia2run-learn-{}.jsonl", std::process::id()));
    // The user's own IA2_SHARE entries stay.
    let plain = make_job(cmd.to_vec(), &[]);
    let var = |name: &str| {
        plain
            .env
            .iter()
            .find(|(k, _)| k == name)
            .and_then(|(_, v)| v.to_str())
    };
    let (existing, existing_heap) = (var("IA2_SHARE"), var("IA2_HEAP_SHARED"));
    let policy_env = |p: &ia2run::learn::Policy| -> Vec<(OsString, OsString)> {
        p.env_with(existing, existing_heap)
            .into_iter()
            .map(|(k, v)| (k.into(), v.into()))
            .collect()
    };
    let mut policy = ia2run::learn::Policy::default();
    for round in 1..=LEARN_ROUNDS {
        let _ = std::fs::remove_file(&report);
        let mut env = policy_env(&policy);
        env.extend([
            ("IA2_ON_FAULT".into(), "audit".into()),
            ("IA2_REPORT_FORMAT".into(), "json".into()),
            ("IA2_REPORT_FILE".into(), report.clone().into()),
        ]);
        eprintln!("ia2run: learn: audit run {round} (IA2_ON_FAULT=audit)");
        let run = match run_one(mode, vm, &make_job(cmd.to_vec(), &env)) {
            Ok(o) => o,
            Err(e) => return fail(&e),
        };
        let text = std::fs::read_to_string(&report).unwrap_or_default();
        let _ = std::fs::remove_file(&report);
        let learned = match ia2run::learn::Policy::from_report(&text) {
            Ok(p) if p.summaries > 0 => p,
            Ok(_) => {
                eprintln!(
                    "ia2run: learn: the audit run ({}) left no audit summary in {}",
                    run.status,
                    report.display()
                );
                return ExitCode::from(125);
            }
            Err(e) => {
                eprintln!("ia2run: learn: {}: {e}", report.display());
                return ExitCode::from(125);
            }
        };
        let new = policy.merge(&learned);
        if !learned.stopped || !new {
            break;
        }
        eprintln!("ia2run: learn: the run stopped on a fatal signal; again with: {policy}");
    }
    if policy.is_empty() {
        eprintln!("ia2run: learned: nothing (the audit run had no protection-key faults)");
    } else {
        eprintln!("ia2run: learned: {policy}");
    }
    let mut env = policy_env(&policy);
    // With -o the confirming run reads the written file, as a user would.
    if let Some(path) = out {
        let words: Vec<String> = cmd
            .iter()
            .map(|w| w.to_string_lossy().into_owned())
            .collect();
        if let Err(e) = std::fs::write(path, policy.to_file(&words.join(" "))) {
            eprintln!("ia2run: learn: writing {}: {e}", path.display());
            return ExitCode::from(125);
        }
        eprintln!("ia2run: learn: wrote the policy to {}", path.display());
        let abs = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
        env = vec![("IA2_POLICY".into(), abs.into())];
    }
    // The confirming run also reports how much stayed private: static data
    // and TLS through a JSON report file read back here; with compartment
    // heaps, the heap report (IA2_REPORT=heap) on stderr instead.
    let heap = var("IA2_HEAP") == Some("compartment");
    let summary = dir.join(format!(
        ".ia2run-learn-{}-summary.jsonl",
        std::process::id()
    ));
    env.push(("IA2_ON_FAULT".into(), "report".into()));
    if heap {
        let reports = match var("IA2_REPORT") {
            Some(r) if !r.is_empty() => format!("{r},heap"),
            _ => "heap".into(),
        };
        env.push(("IA2_REPORT".into(), reports.into()));
    } else {
        env.extend([
            ("IA2_REPORT".into(), "summary".into()),
            ("IA2_REPORT_FORMAT".into(), "json".into()),
            ("IA2_REPORT_FILE".into(), summary.clone().into()),
        ]);
    }
    eprintln!("ia2run: learn: confirming run");
    let second = match run_one(mode, vm, &make_job(cmd.to_vec(), &env)) {
        Ok(o) => o,
        Err(e) => return fail(&e),
    };
    let text = std::fs::read_to_string(&summary).unwrap_or_default();
    let _ = std::fs::remove_file(&summary);
    for p in ia2run::learn::privacy_from_report(&text) {
        eprintln!(
            "ia2run: learn: kept private: compartment {} ({}): {:.1}% of its static data and TLS ({} B private, {} B shared)",
            p.compartment,
            p.objects.join(", "),
            p.private_percent,
            p.private_bytes,
            p.shared_bytes
        );
    }
    if second.timed_out {
        eprintln!("ia2run: learn: the confirming run timed out");
        return ExitCode::from(124);
    }
    report_signal(second.status);
    if second.status.success() {
        eprintln!("ia2run: learn: the confirming run was clean");
    } else {
        eprintln!(
            "ia2run: learn: the confirming run was not clean: {}",
            second.status
        );
    }
    exit_code(second.status.code())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words() {
        assert_eq!(
            split_words(r#"a 'b c' "d \"e\" \q" f\ g ''"#).unwrap(),
            ["a", "b c", r#"d "e" \q"#, "f g", ""]
        );
        assert!(split_words("'x").is_err());
        let (env, cmd) = parse_batch_line("A=1 B_2='x y' prog C=3").unwrap();
        assert_eq!(
            env,
            [("A".into(), "1".into()), ("B_2".into(), "x y".into())]
        );
        assert_eq!(cmd, ["prog", "C=3"]);
    }
}
