//! Profiler attribution, end to end: a workload spending its time in (a) the
//! main binary, (b) a plugin loaded after the profiler started, (c) a
//! TLS-bearing plugin, (d) a plugin unloaded before the report, and (e) a
//! patched function's replacement, relay and trampoline. Every sampled frame
//! in those modules must be named; `go tool pprof` must read the profile and
//! show the same names, and re-symbolize a name-stripped copy from the files
//! by build-id.
//!
//! One profiling run per test binary (the sampler is process-wide), shared
//! by the tests below through a `OnceLock`.

#![allow(clippy::unwrap_used, reason = "tests")]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use hotpatch_loader::{Policy, load};
use hotpatch_patcher::Hook;
use hotpatch_profiler::{ProfilerBuilder, Report, read_profile, write_profile};
use hotpatch_symbolizer::{Registry, RuntimeAddr};
use hotpatch_tests::fixtures;
use hotpatch_tests::loader_fixtures::TempDir;

const PHASE: Duration = Duration::from_millis(400);

#[inline(never)]
fn main_burn(iters: u64) -> u64 {
    let mut x = 0x1234_5678u64;
    for i in 0..iters {
        x = x.wrapping_mul(0x5851_f42d_4c95_7f2d).wrapping_add(i);
        x ^= x >> 31;
    }
    std::hint::black_box(x)
}

#[inline(never)]
extern "C" fn hooked_target(x: u64) -> u64 {
    std::hint::black_box(x.wrapping_mul(3) ^ (x >> 7))
}

static ORIGINAL: AtomicUsize = AtomicUsize::new(0);

#[inline(never)]
extern "C" fn hooked_replacement(x: u64) -> u64 {
    let orig = ORIGINAL.load(Ordering::Relaxed);
    // SAFETY: ORIGINAL holds the hook's `original()`, an
    // `extern "C" fn(u64) -> u64`, set before the hook is installed... or 0.
    let f: extern "C" fn(u64) -> u64 = if orig == 0 {
        hooked_target
    } else {
        // SAFETY: see above; a non-zero value is the trampoline address.
        unsafe { std::mem::transmute::<usize, extern "C" fn(u64) -> u64>(orig) }
    };
    f(x).wrapping_add(1)
}

/// Runs `f` until this thread has spent `d` of CPU time: the phases' shares
/// of the samples are then fixed ratios, whatever else the machine runs (on
/// wall time a phase starved by a burst of other work fell towards the 5 %
/// floor).
fn spin(d: Duration, mut f: impl FnMut()) {
    let end = hotpatch_tests::load::thread_cpu() + d;
    while hotpatch_tests::load::thread_cpu() < end {
        f();
    }
}

struct Run {
    report: Report,
    dir: TempDir,
    pb: PathBuf,
    exe: PathBuf,
    plugins: Vec<PathBuf>,
}

fn run() -> &'static Run {
    static RUN: OnceLock<Run> = OnceLock::new();
    RUN.get_or_init(|| {
        // Build fixtures before sampling starts (cargo runs are not the workload).
        let work_so = fixtures::plugin("prof-work");
        let tls_so = fixtures::plugin("prof-tls");
        let gone_so = fixtures::plugin("prof-gone");
        let reg = Registry::global();
        reg.refresh().unwrap();

        let session = ProfilerBuilder::new().frequency(999).start().unwrap();

        // (a) main binary.
        spin(PHASE, || {
            main_burn(20_000);
        });
        // (b) loaded after the profiler started.
        let work = load(&work_so, &Policy::new()).unwrap();
        // (c) TLS-bearing.
        let tls = load(&tls_so, &Policy::new()).unwrap();
        assert!(tls.tls().is_some(), "prof-tls has PT_TLS");
        // (d) unloaded before the report.
        let gone = load(&gone_so, &Policy::new()).unwrap();
        {
            // SAFETY: the fixtures export these as `extern "C" fn(u64) -> u64`.
            let w = unsafe { work.get::<extern "C" fn(u64) -> u64>("prof_work_burn") }.unwrap();
            // SAFETY: as above.
            let t = unsafe { tls.get::<extern "C" fn(u64) -> u64>("prof_tls_burn") }.unwrap();
            // SAFETY: as above.
            let g = unsafe { gone.get::<extern "C" fn(u64) -> u64>("prof_gone_burn") }.unwrap();
            spin(PHASE, || {
                w.call(20_000);
            });
            spin(PHASE, || {
                t.call(20_000);
            });
            spin(PHASE, || {
                g.call(20_000);
            });
        }
        let checkpoints_before = session.checkpoints();
        let unloaded = gone.unload().map_err(|r| r.to_string()).unwrap();
        eprintln!("prof-gone unload: {unloaded:?}");
        assert!(
            session.checkpoints() > checkpoints_before,
            "unloading a plugin checkpoints the session"
        );

        // (e) a patched function: replacement, relay, trampoline.
        let target: extern "C" fn(u64) -> u64 = hooked_target;
        let mut hook = Hook::install(target, hooked_replacement as extern "C" fn(u64) -> u64)
            .expect("install hook");
        ORIGINAL.store(hook.original() as usize, Ordering::Relaxed);
        // The patcher registered the site's relay and trampoline with the
        // registry itself.
        let tramp = reg.lookup(
            RuntimeAddr(hook.original() as usize as u64),
            reg.current_seq(),
        );
        assert!(
            tramp.is_some(),
            "the trampoline is a registered anonymous range"
        );
        let call = std::hint::black_box(target);
        spin(PHASE * 3, || {
            let mut x = 1;
            for _ in 0..1000 {
                x = call(std::hint::black_box(x));
            }
            std::hint::black_box(x);
        });
        hook.remove().unwrap();

        let report = session.stop().unwrap();
        let dir = TempDir::new("prof");
        let pb = dir.join("profile.pb.gz");
        report
            .write_pprof(std::fs::File::create(&pb).unwrap())
            .unwrap();
        report
            .write_flamegraph(std::fs::File::create(dir.join("flamegraph.svg")).unwrap())
            .unwrap();
        drop((work, tls));
        Run {
            report,
            dir,
            pb,
            exe: std::env::current_exe().unwrap(),
            plugins: vec![work_so, tls_so, gone_so],
        }
    })
}

fn is_ours(run: &Run, path: Option<&Path>, name: &str) -> bool {
    let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    match path {
        Some(p) => canon(p) == canon(&run.exe) || run.plugins.iter().any(|q| canon(p) == canon(q)),
        None => name.starts_with("hotpatch::"),
    }
}

#[test]
fn every_frame_in_our_modules_is_named_and_the_workload_is_on_top() {
    let run = run();
    let r = &run.report;
    println!("{}", r.top(25));
    println!("stats: {:?}", r.stats);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(
        r.stats.epochs >= 2,
        "a checkpoint epoch per unload: {:?}",
        r.stats
    );

    // 0 unknown in our modules.
    let mut ours = 0;
    let mut unnamed = Vec::new();
    for l in &r.locations {
        let Some(m) = &l.module else { continue };
        if is_ours(run, m.path.as_deref(), &m.name) {
            ours += 1;
            if !l.is_named() {
                unnamed.push(format!("{}+{:#x}", m.name, m.offset));
            }
        }
    }
    assert!(ours > 10, "locations in our modules: {ours}");
    assert!(
        unnamed.is_empty(),
        "unnamed frames in our modules: {unnamed:?}"
    );

    // The workload's functions dominate, each with its share.
    let total = r.stats.samples;
    let top = r.top_entries();
    for want in [
        "main_burn",
        "prof_work_burn",
        "prof_tls_burn",
        "prof_gone_burn",
    ] {
        let e = top
            .iter()
            .find(|e| e.function.ends_with(want))
            .unwrap_or_else(|| panic!("{want} not sampled: {top:#?}"));
        // cum, not flat: the test binary is unoptimized, so main_burn's
        // time is partly in the std helpers it calls.
        assert!(
            e.cum * 100 >= total * 5,
            "{want}: {} of {total} samples",
            e.cum
        );
    }
    let replacement = r
        .top_entries()
        .into_iter()
        .find(|e| e.function.ends_with("hooked_replacement"))
        .expect("the replacement was sampled");
    assert!(
        replacement.cum * 100 >= total * 5,
        "{replacement:?} of {total}"
    );
    let anon: BTreeSet<String> = r
        .locations
        .iter()
        .filter(|l| r.is_anonymous(l))
        .map(|l| l.name())
        .collect();
    println!("anonymous frames sampled: {anon:?}");
    // Few instructions run there: a sample in the relay or trampoline is
    // likely but not certain; when there is one, it is named (checked above).
    // Samples in the original body reached through the trampoline are
    // charged to hooked_target, called from the replacement.
    assert!(r.samples_in("profiler_attribution::hooked_target") > 0);

    println!(
        "hotpatch: {} unnamed locations in our modules; prof_gone_burn in {} samples",
        unnamed.len(),
        r.samples_in("prof_gone_burn")
    );
}

#[test]
fn outputs_flamegraph_and_top() {
    let run = run();
    let svg = std::fs::read_to_string(run.dir.join("flamegraph.svg")).unwrap();
    assert!(svg.starts_with("<?xml"), "{}", &svg[..svg.len().min(200)]);
    for want in [
        "prof_work_burn",
        "prof_tls_burn",
        "prof_gone_burn",
        "main_burn",
    ] {
        assert!(svg.contains(want), "{want} in flamegraph");
    }
    let top = run.report.top(5);
    assert!(top.lines().count() == 7, "{top}");
    // The profile round-trips through our reader and every mapping is real.
    let p = read_profile(&std::fs::read(&run.pb).unwrap()).unwrap();
    let s = |i: i64| p.string_table[i as usize].as_str();
    assert!(!p.mapping.is_empty() && !p.location.is_empty());
    // `go tool pprof` takes the first mapping for the main binary.
    let exe = std::fs::canonicalize(std::env::current_exe().unwrap()).unwrap();
    assert_eq!(p.mapping[0].id, 1);
    assert_eq!(
        Path::new(s(p.mapping[0].filename)),
        exe,
        "first mapping: {:?}",
        p.mapping.iter().map(|m| s(m.filename)).collect::<Vec<_>>()
    );
    for m in &p.mapping {
        assert!(m.memory_start < m.memory_limit);
        let name = s(m.filename);
        // File-backed (the vdso is named but has no file).
        if name.starts_with('/') {
            assert_eq!(s(m.build_id).len(), 40, "build-id of {name}");
        }
    }
    for l in &p.location {
        if l.mapping_id != 0 {
            let m = &p.mapping[l.mapping_id as usize - 1];
            assert!((m.memory_start..m.memory_limit).contains(&l.address));
        }
    }
    // has_* flags say whether *every* location of the mapping has the
    // thing: our plugins are built with full DWARF, so most of
    // prof-work's locations (a run has ~15-20) have a file and a line, and the flags must
    // agree with the locations written. (A sample that lands in the
    // plugin's PLT or in code without DWARF is rare but possible, and
    // then clears has_filenames/has_line_numbers, as Go means them.)
    let work = p
        .mapping
        .iter()
        .find(|m| s(m.filename).ends_with("libprof_work.so"))
        .expect("a mapping for prof-work");
    let function = |id: u64| p.function.iter().find(|f| f.id == id).expect("function id");
    let locs: Vec<_> = p
        .location
        .iter()
        .filter(|l| l.mapping_id == work.id)
        .collect();
    let has_file = |l: &&hotpatch_profiler::proto::Location| {
        !l.line.is_empty()
            && l.line
                .iter()
                .all(|ln| !s(function(ln.function_id).filename).is_empty())
    };
    let has_line = |l: &&hotpatch_profiler::proto::Location| {
        !l.line.is_empty() && l.line.iter().all(|ln| ln.line > 0)
    };
    let full: Vec<_> = locs.iter().filter(|l| has_file(l) && has_line(l)).collect();
    let partial: Vec<String> = locs
        .iter()
        .filter(|l| !(has_file(l) && has_line(l)))
        .map(|l| {
            let names: Vec<&str> = l
                .line
                .iter()
                .map(|ln| s(function(ln.function_id).name))
                .collect();
            format!("{:#x} {names:?}", l.address)
        })
        .collect();
    println!(
        "prof-work: {} locations, {} with file and line; without: {partial:?}",
        locs.len(),
        full.len()
    );
    assert!(!locs.is_empty(), "prof-work was sampled");
    assert!(work.has_functions, "every prof-work location is named");
    assert_eq!(work.has_filenames, locs.iter().all(has_file));
    assert_eq!(work.has_line_numbers, locs.iter().all(has_line));
    assert!(
        full.len() * 4 >= locs.len() * 3,
        "prof-work locations without file or line: {partial:?}"
    );
    for anon in p
        .mapping
        .iter()
        .filter(|m| s(m.filename).starts_with("[hotpatch::"))
    {
        assert!(anon.has_functions && !anon.has_filenames && !anon.has_line_numbers);
    }
}

fn go_pprof(args: &[&str], envs: &[(&str, &Path)]) -> Option<String> {
    if Command::new("go").arg("version").output().is_err() {
        assert!(
            std::env::var_os("CI").is_none(),
            "go is required in CI (.ci/run installs golang-go)"
        );
        eprintln!("SKIP: `go` not installed (apt-get install golang-go)");
        return None;
    }
    let mut cmd = Command::new("go");
    cmd.arg("tool").arg("pprof").args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    // go wants a writable HOME / cache.
    cmd.env("HOME", std::env::temp_dir());
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "go tool pprof {args:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!(
        "go tool pprof {args:?} stderr:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

#[test]
fn go_tool_pprof_reads_our_names() {
    let run = run();
    let Some(raw) = go_pprof(&["-raw", "-symbolize=none", run.pb.to_str().unwrap()], &[]) else {
        return;
    };
    for want in [
        "main_burn",
        "prof_work_burn",
        "prof_tls_burn",
        "prof_gone_burn",
        "hooked_replacement",
    ] {
        assert!(
            raw.contains(want),
            "{want} missing in go tool pprof -raw:\n{raw}"
        );
    }
    let top = go_pprof(&["-top", "-symbolize=none", run.pb.to_str().unwrap()], &[]).unwrap();
    println!("{top}");
    assert!(top.contains("prof_gone_burn"));
}

#[test]
fn go_tool_pprof_resymbolizes_a_stripped_profile_from_the_files() {
    let run = run();
    let mut p = read_profile(&std::fs::read(&run.pb).unwrap()).unwrap();
    // Strip names from every file-backed mapping (mappings, paths and
    // build-ids kept): pprof must open the files to name the frames.
    //
    // `go tool pprof` (Go 1.19, cmd/pprof/pprof.go) opens them at the
    // mapping's path: its object tool reports every file's build-id as ""
    // ("No support for build ID"), so a copy under
    // $PPROF_BINARY_PATH/<build-id>/ is *ignored* as a mismatch (tried:
    // "Ignoring local file …: build-id mismatch (e8de… != )"). Standalone
    // google/pprof matches by build-id; the build-ids we write are checked
    // against the files below.
    let bin = run.dir.join("binaries");
    std::fs::create_dir_all(&bin).unwrap();
    let file_maps: Vec<u64> = p
        .mapping
        .iter()
        .filter(|m| !p.string_table[m.filename as usize].starts_with('['))
        .map(|m| m.id)
        .collect();
    for l in &mut p.location {
        if file_maps.contains(&l.mapping_id) {
            l.line.clear();
        }
    }
    let mut moved = Vec::new();
    for m in &mut p.mapping {
        if !file_maps.contains(&m.id) {
            continue;
        }
        m.has_functions = false;
        m.has_filenames = false;
        m.has_line_numbers = false;
        m.has_inline_frames = false;
        let file = PathBuf::from(&p.string_table[m.filename as usize]);
        let base = file.file_name().unwrap().to_str().unwrap().to_owned();
        if base.starts_with("libprof_") {
            assert!(file.is_file(), "{}", file.display());
            // The mapping's build-id is the file's, as binutils reads it.
            let notes = Command::new("readelf")
                .arg("-n")
                .arg(&file)
                .output()
                .unwrap();
            let notes = String::from_utf8_lossy(&notes.stdout);
            let id = notes
                .lines()
                .find_map(|l| l.trim().strip_prefix("Build ID: "))
                .unwrap_or_else(|| panic!("readelf -n {}: no build id\n{notes}", file.display()));
            assert_eq!(p.string_table[m.build_id as usize], id.trim(), "{base}");
            moved.push(base);
        }
    }
    assert_eq!(moved.len(), 3, "{moved:?}");
    let stripped = run.dir.join("stripped.pb.gz");
    write_profile(&p, std::fs::File::create(&stripped).unwrap()).unwrap();

    let Some(none) = go_pprof(
        &["-raw", "-symbolize=none", stripped.to_str().unwrap()],
        &[],
    ) else {
        return;
    };
    assert!(!none.contains("prof_gone_burn"), "names really stripped");
    let raw = go_pprof(
        &["-raw", "-symbolize=local", stripped.to_str().unwrap()],
        &[("PPROF_BINARY_PATH", &bin)],
    )
    .unwrap();
    for want in [
        "main_burn",
        "prof_work_burn",
        "prof_tls_burn",
        "prof_gone_burn",
    ] {
        assert!(raw.contains(want), "{want} not re-symbolized:\n{raw}");
    }
}
