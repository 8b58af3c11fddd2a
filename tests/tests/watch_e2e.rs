//! `hotpatch watch` end to end, in processes: the fixture crate
//! (tests/fixtures/watch-fixture) is copied to a temp dir, built into the
//! shared target dir whose dependencies `build-fixtures` prebuilt
//! (`fixtures::prebuild_watch_fixture`: only the copy itself compiles
//! here; a run without the prebuild builds them first, minutes), started
//! (three worker threads, the agent), edited, and patched with `hotpatch
//! watch --once`. One test, in sequence: each step builds on the state the
//! previous one left.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use hotpatch_tests::agent_bins::{fresh_dir, text};
use hotpatch_tests::fixtures;
use serde_json::Value;

struct Fixture {
    dir: PathBuf,
    target: PathBuf,
    runtime: PathBuf,
    hotpatch: PathBuf,
    child: Option<Child>,
    /// Holds the shared target dir for this run (see `WatchTarget`).
    _shared: fixtures::WatchTarget,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        if let Some(c) = self.child.as_mut() {
            // SAFETY: kill(2) on our own child's pid; no memory involved.
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let t0 = Instant::now();
            while t0.elapsed() < Duration::from_secs(5) {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::env::var_os("HOTPATCH_KEEP_TEMP").is_none() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

impl Fixture {
    fn new() -> Fixture {
        let hotpatch = fixtures::build(&["hotpatch-cli"]).join("hotpatch");
        let t = Instant::now();
        let shared = fixtures::prebuild_watch_fixture();
        eprintln!(
            "watch_e2e: the fixture's dependencies fresh in {:.1?}",
            t.elapsed()
        );
        let dir = fresh_dir("watch", 0o700);
        fixtures::place_watch_fixture(&dir.join("fx"));
        let runtime = dir.join("run");
        std::fs::create_dir(&runtime).expect("mkdir run");
        std::fs::set_permissions(
            &runtime,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .expect("chmod");
        Fixture {
            target: shared.dir.clone(),
            dir,
            runtime,
            hotpatch,
            child: None,
            _shared: shared,
        }
    }

    fn crate_dir(&self) -> PathBuf {
        self.dir.join("fx")
    }

    fn env(&self, c: &mut Command) {
        fixtures::watch_fixture_env(c, &self.target);
        c.env("XDG_RUNTIME_DIR", &self.runtime)
            .env("TMPDIR", &self.runtime)
            .current_dir(self.crate_dir());
    }

    /// A plain `cargo build`, as the user does it.
    fn build(&self) {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut c = Command::new(cargo);
        c.args(["build", "--quiet"]);
        self.env(&mut c);
        let t = Instant::now();
        let out = c.output().expect("spawn cargo");
        eprintln!("watch_e2e: the fixture copy built in {:.1?}", t.elapsed());
        assert!(
            out.status.success(),
            "building the fixture failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        // Built from this copy, not found fresh from another run's copy in
        // the shared target dir: its DWARF names this copy's directory.
        let exe = std::fs::read(self.exe()).expect("read the fixture executable");
        let here = self.crate_dir().display().to_string();
        assert!(
            exe.windows(here.len()).any(|w| w == here.as_bytes()),
            "{} was not built from {here}",
            self.exe().display()
        );
    }

    fn exe(&self) -> PathBuf {
        self.target.join("debug").join("watch-fixture")
    }

    fn start(&mut self) {
        let mut c = Command::new(self.exe());
        self.env(&mut c);
        let child = c
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn fixture");
        let socket = self
            .runtime
            .join("hotpatch")
            .join(format!("{}.sock", child.id()));
        self.child = Some(child);
        let t0 = Instant::now();
        while !socket.exists() {
            assert!(t0.elapsed() < Duration::from_secs(60), "no agent socket");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn pid(&self) -> u32 {
        self.child.as_ref().expect("started").id()
    }

    fn hotpatch(&self, args: &[&str]) -> Output {
        let mut c = Command::new(&self.hotpatch);
        self.env(&mut c);
        c.args(args).args(["--pid", &self.pid().to_string()]);
        hotpatch_tests::proc::output_within(
            &mut c,
            hotpatch_tests::agent_bins::CLI_LIMIT,
            &format!("hotpatch {}", args.join(" ")),
        )
        .expect("run hotpatch")
    }

    /// `hotpatch ARGS` without `--pid`.
    fn run_plain(&self, args: &[&str]) -> Output {
        let mut c = Command::new(&self.hotpatch);
        self.env(&mut c);
        c.args(args);
        hotpatch_tests::proc::output_within(
            &mut c,
            hotpatch_tests::agent_bins::CLI_LIMIT,
            &format!("hotpatch {}", args.join(" ")),
        )
        .expect("run hotpatch")
    }

    fn watch_once(&self) -> Output {
        self.hotpatch(&["watch", "--once", "--json"])
    }

    fn status(&self) -> Value {
        let out = self.hotpatch(&["status", "--json"]);
        assert!(out.status.success(), "status: {}", text(&out));
        let v: Value = serde_json::from_slice(&out.stdout).expect("status json");
        v["host"].clone()
    }

    /// Waits until every worker reports a result in `range` (each worker
    /// publishes one per call; a result from before the patch may still be
    /// the last one of a worker for a moment). The timeout only bounds a
    /// hang; the verdict is the values.
    fn wait_results(&self, range: std::ops::Range<u64>) -> Value {
        let t0 = Instant::now();
        loop {
            let s = self.status();
            let all = s["results"]
                .as_array()
                .expect("results")
                .iter()
                .all(|r| r.as_u64().is_some_and(|r| range.contains(&r)));
            if all {
                return s;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "results never all in {range:?}: {s}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Waits until `guarded` has caught a panic of the patched `risky`
    /// (each worker calls it with x == 7 once per 100 calls); the process
    /// must be alive to answer. The timeout only bounds a hang.
    fn wait_caught(&self) -> u64 {
        let t0 = Instant::now();
        loop {
            let out = self.hotpatch(&["status", "--json"]);
            assert!(
                out.status.success(),
                "the process stopped answering after the panicking patch (aborted?): {}",
                text(&out)
            );
            let v: Value = serde_json::from_slice(&out.stdout).expect("status json");
            let caught = v["host"]["caught"].as_u64().expect("caught");
            if caught > 0 {
                return caught;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "no panic of risky caught: {v}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn watch_status(&self) -> Value {
        let out = self.hotpatch(&["watch", "--status", "--json"]);
        assert!(out.status.success(), "watch --status: {}", text(&out));
        serde_json::from_slice(&out.stdout).expect("watch status json")
    }

    /// Generation `g` is unmapped, by the reply `first` or by a later
    /// `watch --status` (a worker may have been inside its code, which it
    /// leaves within a call). Returns where it was mapped (None when the
    /// reply itself unloaded it, before we could ask).
    fn unloaded_eventually(&self, g: u64, first: &Value) -> Option<(usize, usize)> {
        let has = |v: &Value, key: &str| {
            v[key]
                .as_array()
                .is_some_and(|a| a.iter().any(|x| x.as_u64() == Some(g)))
        };
        if has(first, "unloaded") {
            return None;
        }
        assert!(
            has(first, "retained"),
            "generation {g} neither unloaded nor retained: {first}"
        );
        let t0 = Instant::now();
        let mut at = None;
        loop {
            let st = self.watch_status();
            if let Some(m) = st["mapped"]
                .as_array()
                .and_then(|a| a.iter().find(|m| m["generation"].as_u64() == Some(g)))
            {
                at = Some((
                    m["base"].as_u64().expect("base") as usize,
                    m["len"].as_u64().expect("len") as usize,
                ));
            }
            if has(&st, "unloaded") {
                return at;
            }
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "generation {g} never unloaded: {st}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn edit(&self, file: &str, from: &str, to: &str) {
        let p = self.crate_dir().join("src").join(file);
        let text = std::fs::read_to_string(&p).expect("read source");
        assert!(text.contains(from), "{file} has no {from:?}");
        std::fs::write(&p, text.replacen(from, to, 1)).expect("write source");
    }
}

fn applied(o: &Output) -> Value {
    assert!(o.status.success(), "watch --once failed: {}", text(o));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", text(o)))
}

fn counters(s: &Value) -> (u64, Vec<u64>) {
    let calls = s["calls"].as_u64().expect("calls");
    let mine = s["mine"]
        .as_array()
        .expect("mine")
        .iter()
        .map(|v| v.as_u64().expect("mine value"))
        .collect();
    (calls, mine)
}

/// The static and the thread-locals kept counting: each is at least what
/// it was (a copy would restart from 0), and the static moved on.
fn assert_kept(before: &Value, after: &Value) {
    let (c0, m0) = counters(before);
    let (c1, m1) = counters(after);
    assert!(
        c1 > c0,
        "the static CALLS did not keep counting: {c0} -> {c1}"
    );
    for (i, (a, b)) in m0.iter().zip(&m1).enumerate() {
        assert!(
            b >= a && *b > 0,
            "worker {i}'s thread-local restarted: {a} -> {b}"
        );
    }
}

/// No mapping of `pid` overlaps `[base, base + len)`.
fn assert_unmapped(pid: u32, base: usize, len: usize) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    for l in maps.lines() {
        let range = l.split_whitespace().next().unwrap_or("");
        let (a, b) = range.split_once('-').expect("range");
        let a = usize::from_str_radix(a, 16).expect("hex");
        let b = usize::from_str_radix(b, 16).expect("hex");
        assert!(
            b <= base || a >= base + len,
            "the unloaded generation at {base:#x}+{len:#x} is still mapped: {l}"
        );
    }
}

/// The bytes of `quote` in the running process and in the executable file.
fn quote_bytes(exe: &Path, pid: u32) -> (Vec<u8>, Vec<u8>) {
    use object::{Object, ObjectSection, ObjectSymbol};
    let data = std::fs::read(format!("/proc/{pid}/exe")).expect("read exe");
    let file = object::File::parse(&*data).expect("parse exe");
    let sym = file
        .symbols()
        .find(|s| s.name().is_ok_and(|n| n.contains("7pricing5quote")))
        .expect("quote in the symbol table");
    let sec = file
        .section_by_index(sym.section_index().expect("defined"))
        .expect("section");
    let (off, _) = sec.file_range().expect("file range");
    let start = (off + sym.address() - sec.address()) as usize;
    let in_file = data[start..start + sym.size() as usize].to_vec();
    // The executable's load bias: its mapping of file offset 0.
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).expect("maps");
    // After a rebuild the running file is "(deleted)" from the directory.
    let exe_name = std::fs::read_link(format!("/proc/{pid}/exe")).expect("exe link");
    let exe_name = PathBuf::from(
        exe_name
            .to_string_lossy()
            .trim_end_matches(" (deleted)")
            .to_owned(),
    );
    let base = maps
        .lines()
        .find(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            f.len() >= 6 && f[2] == "00000000" && Path::new(f[5]) == exe_name
        })
        .map(|l| usize::from_str_radix(l.split('-').next().unwrap_or("0"), 16).expect("hex"))
        .expect("executable mapping");
    let mut mem = vec![0u8; in_file.len()];
    let f = std::fs::File::open(format!("/proc/{pid}/mem")).expect("open mem");
    std::os::unix::fs::FileExt::read_exact_at(&f, &mut mem, (base as u64) + sym.address())
        .expect("read mem");
    let _ = exe;
    (in_file, mem)
}

#[test]
fn watch_edit_save_live() {
    let mut fx = Fixture::new();
    fx.build();
    fx.start();
    // The original code: 1000 + x % 100 + x / 1000 (x < 100).
    fx.wait_results(1000..1100);
    let pid = fx.pid();
    let (orig_file, orig_mem) = quote_bytes(&fx.exe(), pid);
    assert_eq!(orig_file, orig_mem, "quote is not the file's code at start");
    // A save without a change applies nothing and takes no generation.
    let g0 = applied(&fx.watch_once());
    assert_eq!(g0["applied"], false, "{g0}");
    assert_eq!(g0["generation"], 0, "{g0}");
    let s0 = fx.status();

    // Generation 1: a local function's body and the function that counts
    // in the static and the thread-local. `quote` also moves down the file
    // (lines inserted above it) and spins, so a profile finds it at lines
    // the original file does not have.
    let orig_lines = std::fs::read_to_string(fx.crate_dir().join("src/pricing.rs"))
        .expect("read")
        .lines()
        .count();
    fx.edit(
        "pricing.rs",
        "#[inline(never)]\npub fn quote(x: u64) -> u64 {\n",
        &format!(
            "{}#[inline(never)]\npub fn quote(x: u64) -> u64 {{\n    let mut spin = 0u64;\n    while spin < 50_000 {{\n        spin = std::hint::black_box(spin + 1);\n    }}\n",
            "// A line inserted above quote by the test.\n".repeat(30)
        ),
    );
    fx.edit("pricing.rs", "1000 + (x % LIMIT)", "2000 + (x % LIMIT)");
    fx.edit(
        "main.rs",
        "pricing::quote(x) + 0",
        "pricing::quote(x) + 100000",
    );
    let g1 = applied(&fx.watch_once());
    assert_eq!(g1["generation"], 1, "{g1}");
    let patched = g1["patched"].to_string();
    assert!(patched.contains("watch_fixture::pricing::quote"), "{g1}");
    assert!(patched.contains("watch_fixture::work"), "{g1}");
    let s1 = fx.wait_results(102_000..102_100);
    assert_kept(&s0, &s1);
    let (_, mem) = quote_bytes(&fx.exe(), pid);
    assert_ne!(mem, orig_mem, "quote's entry was not patched");
    patched_frames_have_new_lines(&fx, &g1, orig_lines);
    let again = applied(&fx.watch_once());
    assert_eq!(again["applied"], false, "{again}");
    assert_eq!(again["generation"], 1, "{again}");
    assert_eq!(fx.status()["caught"], 0, "a panic before any edit made one");

    // Generation 2 over 1: the inlined callee `bonus` (its caller `quote`
    // is what gets patched) and a brand-new function.
    fx.edit("pricing.rs", "2000 + (x % LIMIT)", "3000 + (x % LIMIT)");
    fx.edit("pricing.rs", "x / 1000\n", "x / 1000 + 500\n");
    fx.edit(
        "pricing.rs",
        "+ surcharge(x)\n",
        "+ surcharge(x) + fresh(x)\n",
    );
    // `risky` panics now; its caller `guarded` (unchanged) catches the
    // panic, which unwinds through the patched code (its unwind info
    // registered; without it the process aborts).
    fx.edit(
        "pricing.rs",
        "pub fn risky(x: u64) -> u64 {\n    x * 0\n}",
        "pub fn risky(x: u64) -> u64 {\n    if x == 7 {\n        panic!(\"risky: x is 7\");\n    }\n    x * 0\n}",
    );
    let src = fx.crate_dir().join("src/pricing.rs");
    let mut t = std::fs::read_to_string(&src).expect("read");
    t.push_str("\n#[inline(never)]\nfn fresh(x: u64) -> u64 {\n    x * 0 + 7\n}\n");
    std::fs::write(&src, t).expect("write");
    let g2 = applied(&fx.watch_once());
    assert_eq!(g2["generation"], 2, "{g2}");
    assert_eq!(g2["applied"], true, "{g2}");
    assert!(g2["patched"].to_string().contains("risky"), "{g2}");
    let caught = fx.wait_caught();
    let g1_map = fx.unloaded_eventually(1, &g2);
    assert!(g2["added"].to_string().contains("fresh"), "{g2}");
    let s2 = fx.wait_results(103_507..103_607);
    assert_kept(&s1, &s2);
    let more = s2["caught"].as_u64().expect("caught");
    assert!(more >= caught, "{s2}");
    if let Some((base, len)) = g1_map {
        assert_unmapped(pid, base, len);
    }

    // Refusals: each leaves the process serving generation 2.
    let good = std::fs::read_to_string(&src).expect("read");
    fx.edit("pricing.rs", "LIMIT: u64 = 100", "LIMIT: u64 = 50");
    let r = fx.watch_once();
    assert!(
        !r.status.success(),
        "a changed static was applied: {}",
        text(&r)
    );
    assert!(text(&r).contains("E_WATCH_STATIC_CHANGED"), "{}", text(&r));
    assert!(text(&r).contains("LIMIT"), "{}", text(&r));
    std::fs::write(&src, &good).expect("restore");
    let s3 = fx.wait_results(103_507..103_607);
    assert_kept(&s2, &s3);

    // A changed signature whose caller did not change: `surcharge` calls
    // the exported `watch_fixture_fee` through its own `extern "C"`
    // declaration (as FFI code does), so its bytes stay; it would pass a
    // `u64` to a function that now reads a `u32`.
    fx.edit(
        "pricing.rs",
        "fn watch_fixture_fee(x: u64) -> u64 {\n    x * 0\n}",
        "fn watch_fixture_fee(x: u32) -> u64 {\n    x as u64 * 0\n}",
    );
    let r = fx.watch_once();
    assert!(
        !r.status.success(),
        "a changed signature was applied: {}",
        text(&r)
    );
    let t = text(&r);
    assert!(t.contains("E_WATCH_SIGNATURE_CHANGED"), "{t}");
    assert!(t.contains("watch_fixture_fee"), "{t}");
    assert!(t.contains("surcharge"), "{t}");
    assert!(t.contains("fn watch_fixture_fee(u64) -> u64"), "{t}");
    assert!(t.contains("fn watch_fixture_fee(u32) -> u64"), "{t}");
    std::fs::write(&src, &good).expect("restore");
    let s3 = fx.wait_results(103_507..103_607);
    assert_kept(&s2, &s3);

    fx.edit("pricing.rs", "3000 + (x % LIMIT)", "3000 + (x % LIMIT) +");
    let r = fx.watch_once();
    assert!(
        !r.status.success(),
        "a build error was applied: {}",
        text(&r)
    );
    assert!(text(&r).contains("E_WATCH_BUILD"), "{}", text(&r));
    assert!(
        text(&r).contains("expected expression"),
        "no compiler message: {}",
        text(&r)
    );
    std::fs::write(&src, &good).expect("restore");
    let s4 = fx.wait_results(103_507..103_607);
    assert_kept(&s3, &s4);

    // A type whose layout changes while code that uses it does not
    // (`result_of` reads `Slot::result`, which does not move).
    let main_rs = fx.crate_dir().join("src/main.rs");
    let good_main = std::fs::read_to_string(&main_rs).expect("read main");
    fx.edit(
        "main.rs",
        "    mine: AtomicU64,\n}",
        "    mine: AtomicU64,\n    extra: AtomicU64,\n}",
    );
    fx.edit(
        "main.rs",
        "mine: AtomicU64::new(0),\n",
        "mine: AtomicU64::new(0),\n                extra: AtomicU64::new(0),\n",
    );
    let r = fx.watch_once();
    assert!(
        !r.status.success(),
        "a layout change was applied: {}",
        text(&r)
    );
    assert!(text(&r).contains("E_WATCH_LAYOUT_CHANGED"), "{}", text(&r));
    assert!(text(&r).contains("Slot"), "{}", text(&r));
    assert!(text(&r).contains("result_of"), "{}", text(&r));
    std::fs::write(&main_rs, &good_main).expect("restore main");
    let s4 = fx.wait_results(103_507..103_607);

    // Revert: the original code and bytes, state still kept.
    let r = fx.hotpatch(&["watch", "--revert", "--json"]);
    assert!(r.status.success(), "revert: {}", text(&r));
    let v: Value = serde_json::from_slice(&r.stdout).expect("revert json");
    let g2_map = fx.unloaded_eventually(2, &v);
    if let Some((base, len)) = g2_map {
        assert_unmapped(pid, base, len);
    }
    let s5 = fx.wait_results(1000..1100);
    assert_kept(&s4, &s5);
    let (file, mem) = quote_bytes(&fx.exe(), pid);
    assert_eq!(file, mem, "quote's original bytes are not back");
    assert_eq!(mem, orig_mem);

    // `hotpatch patch` by name on a process whose executable was rebuilt
    // since it started (its file on disk replaced: /proc/PID/exe says
    // "(deleted)"), and a watch refused over that foreign site.
    let s6 = patcher_refusal(&fx);
    assert_kept(&s5, &s6);
    let (_, mem) = quote_bytes(&fx.exe(), pid);
    assert_eq!(
        mem, orig_mem,
        "quote's bytes not restored after the refusal"
    );
}

/// A function the patcher refuses, by a real edit; returns the status after.
fn patcher_refusal(fx: &Fixture) -> Value {
    // A function the patcher refuses: `quote` already patched by hand to a
    // plugin (E_PATCH_ALREADY_PATCHED): the edit is refused, with the
    // function's name and the patcher's code, and nothing is applied. Done
    // last, after several rebuilds replaced the executable's file: the
    // agent's own `patch` must read the running executable, not the path.
    let so = fixtures::plugin("pricing-v1");
    let so = so.display().to_string();
    let r = fx.hotpatch(&["load", &so]);
    assert!(r.status.success(), "load: {}", text(&r));
    let r = fx.hotpatch(&[
        "patch",
        "watch_fixture::pricing::quote",
        "--with",
        "pricing-v1:pricing_v1_quote",
    ]);
    assert!(r.status.success(), "patch: {}", text(&r));
    let s6 = fx.wait_results(2000..3000);
    let src = fx.crate_dir().join("src/pricing.rs");
    let original = std::fs::read_to_string(&src).expect("read");
    fx.edit("pricing.rs", "(x % LIMIT)", "(x % LIMIT) + 4000");
    let r = fx.watch_once();
    assert!(
        !r.status.success(),
        "applied over a foreign site: {}",
        text(&r)
    );
    let t = text(&r);
    assert!(t.contains("E_WATCH_PATCH_REFUSED"), "{t}");
    assert!(t.contains("watch_fixture::pricing::quote"), "{t}");
    assert!(t.contains("E_PATCH_ALREADY_PATCHED"), "{t}");
    let st = fx.watch_status();
    assert_eq!(st["generation"], 0, "{st}");
    assert_eq!(st["sites"], serde_json::json!([]), "{st}");
    let s7 = fx.wait_results(2000..3000);
    assert_kept(&s6, &s7);
    let r = fx.hotpatch(&["revert", "watch_fixture::pricing::quote"]);
    assert!(r.status.success(), "revert: {}", text(&r));
    std::fs::write(&src, original).expect("restore");
    fx.wait_results(1000..1100)
}

/// A CPU profile taken through the CLI names the patched `quote` with its
/// new source line (one the original file does not have), read by `go tool
/// pprof -raw`; `hotpatch symbolize` of that address in the generation's
/// debug module says the same.
fn patched_frames_have_new_lines(fx: &Fixture, g1: &Value, orig_lines: usize) {
    let debug_file = g1["debug_file"]
        .as_str()
        .unwrap_or_else(|| panic!("generation 1 has no debug module: {g1}"))
        .to_owned();
    assert!(Path::new(&debug_file).is_file(), "{debug_file}: {g1}");
    let pb = fx.dir.join("gen1.pb.gz");
    // The workers spend most of their CPU time in the new `quote`; a longer
    // profile is tried only if a short one caught no sample of it (a loaded
    // machine), so the verdict never depends on timing.
    let mut found = None;
    let mut last = String::new();
    for seconds in ["2", "6", "20"] {
        let out = fx.hotpatch(&[
            "profile",
            "--seconds",
            seconds,
            "-o",
            &pb.display().to_string(),
        ]);
        assert!(out.status.success(), "profile: {}", text(&out));
        let raw = Command::new("go")
            .args(["tool", "pprof", "-raw"])
            .arg(&pb)
            .env("HOME", &fx.runtime)
            .output()
            .expect("`go` is needed for this test: apt-get install -y golang-go");
        assert!(raw.status.success(), "go tool pprof -raw: {}", text(&raw));
        last = String::from_utf8_lossy(&raw.stdout).into_owned();
        found = quote_location(&last);
        if found.is_some() {
            break;
        }
    }
    let (addr, line) =
        found.unwrap_or_else(|| panic!("no location of quote in pricing.rs in:\n{last}"));
    assert!(
        line > orig_lines,
        "quote is named with line {line}, which the original file (of {orig_lines} lines) has:\n{last}"
    );
    let module = Path::new(&debug_file)
        .file_name()
        .expect("file name")
        .to_string_lossy()
        .into_owned();
    assert!(last.contains(&module), "no mapping of {module}:\n{last}");
    let out = fx.run_plain(&["symbolize", "--exe", &debug_file, &format!("{addr:#x}")]);
    assert!(out.status.success(), "symbolize: {}", text(&out));
    let sym = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(sym.contains("watch_fixture::pricing::quote"), "{sym}");
    let at = sym
        .lines()
        .find_map(|l| l.rsplit_once("pricing.rs:"))
        .and_then(|(_, n)| n.trim().parse::<usize>().ok())
        .unwrap_or_else(|| panic!("no pricing.rs line: {sym}"));
    assert!(at > orig_lines, "symbolize names line {at}: {sym}");
}

/// The address and line of a `pprof -raw` location of `quote` in
/// `pricing.rs`: "   7: 0x7f.. M=2 watch_fixture::pricing::quote
/// /path/src/pricing.rs:40 s=0" (inlined frames on the next lines).
fn quote_location(raw: &str) -> Option<(u64, usize)> {
    let mut addr = None;
    for l in raw.lines() {
        let t = l.trim_start();
        if let Some((head, rest)) = t.split_once(": 0x") {
            if head.chars().all(|c| c.is_ascii_digit()) {
                addr = rest
                    .split_whitespace()
                    .next()
                    .and_then(|a| u64::from_str_radix(a, 16).ok());
            }
        }
        if !t.contains("watch_fixture::pricing::quote") {
            continue;
        }
        // Line 0 is DWARF's "no source line" (code the compiler made up,
        // seen at return addresses now that frames unwind through the
        // patch): not a location to check.
        let line = t
            .split_whitespace()
            .find_map(|w| w.rsplit_once("pricing.rs:"))
            .and_then(|(_, n)| n.parse::<usize>().ok())
            .filter(|n| *n > 0);
        if let (Some(a), Some(n)) = (addr, line) {
            return Some((a, n));
        }
    }
    None
}
