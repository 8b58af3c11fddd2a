//! Build plugin cdylibs of this workspace on demand.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

/// The workspace root (the directory holding the top-level `Cargo.toml`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Where fixture builds go: a target directory of their own, so a build from
/// inside a running `cargo test` never waits on the outer cargo's lock.
pub fn fixture_target_dir() -> PathBuf {
    workspace_root().join("target").join("fixtures")
}

static BUILD_LOCK: Mutex<()> = Mutex::new(());

/// Builds the workspace packages `packages` with the `fixture` profile into
/// [`fixture_target_dir`] and returns the directory holding the artifacts.
///
/// Serialized within the process by a mutex and across processes by an
/// `flock` on the fixture target directory. Cargo's own freshness check makes
/// repeated calls cheap.
///
/// # Panics
/// When cargo fails: a test cannot run without its fixture, and the panic
/// carries cargo's output.
pub fn build(packages: &[&str]) -> PathBuf {
    let args: Vec<&str> = packages.iter().flat_map(|p| ["-p", p]).collect();
    build_args(&args)
}

/// Builds example `name` of workspace package `package` (with `features`
/// of that package) like [`build`] and returns the executable's path.
///
/// # Panics
/// As [`build`], and when the executable is not where cargo puts it.
pub fn example(package: &str, name: &str, features: &[&str]) -> PathBuf {
    let mut args = vec!["-p", package, "--example", name];
    let joined = features.join(",");
    if !features.is_empty() {
        args.extend(["--features", &joined]);
    }
    let exe = build_args(&args).join("examples").join(name);
    assert!(
        exe.is_file(),
        "cargo built example {name} of {package} but {} is missing",
        exe.display()
    );
    exe
}

fn build_args(extra: &[&str]) -> PathBuf {
    let packages = extra;
    let _guard = BUILD_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let dir = fixture_target_dir();
    std::fs::create_dir_all(&dir).expect("create fixture target dir");
    let lock = File::create(dir.join(".build-lock")).expect("create build lock");
    // SAFETY: `lock` is an open file descriptor owned by this frame; flock
    // has no memory-safety preconditions. The lock is released when `lock`
    // is closed at the end of this function.
    let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());

    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace_root())
        .args(["build", "--quiet", "--profile", "fixture"])
        .args(extra);
    let out = cmd
        .arg("--target-dir")
        .arg(&dir)
        .output()
        .expect("spawn cargo");
    assert!(
        out.status.success(),
        "building fixtures {packages:?} failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    publish(&dir.join("fixture"), &dir, extra)
}

/// Hard-links (or copies) the files cargo just put in `built` (and in its
/// `examples/`) into a directory of their own for this invocation,
/// `DIR/sets/ARGS`, each by a link to a temporary name and an atomic
/// rename, and returns that directory.
///
/// Cargo links each invocation's outputs into the shared `built` (remove,
/// then link): a test process executing `built/hotpatch` while another test
/// process builds another set could find no file there, or that set's
/// variant (feature unification: `hotpatch-cli` built beside `demo-target`
/// is not the one built alone). A path in the
/// set's own directory is only ever replaced atomically, by the same
/// invocation's output.
fn publish(built: &Path, dir: &Path, args: &[&str]) -> PathBuf {
    let name: String = args
        .join(" ")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let out = dir.join("sets").join(name);
    for (from, to) in [
        (built.to_path_buf(), out.clone()),
        (built.join("examples"), out.join("examples")),
    ] {
        let Ok(entries) = std::fs::read_dir(&from) else {
            continue;
        };
        std::fs::create_dir_all(&to).expect("create fixture set dir");
        for e in entries {
            let e = e.expect("read fixture dir entry");
            if !e.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            let file = e.file_name();
            let mut tmp_name = std::ffi::OsString::from(".publish-");
            tmp_name.push(&file);
            let tmp = to.join(tmp_name);
            let _ = std::fs::remove_file(&tmp);
            if std::fs::hard_link(e.path(), &tmp).is_err() {
                std::fs::copy(e.path(), &tmp).expect("copy a fixture");
            }
            std::fs::rename(&tmp, to.join(&file)).expect("publish a fixture");
        }
    }
    out
}

/// Builds the workspace package `package` (a `cdylib`) with the `fixture`
/// profile and returns the path of its shared object. See [`build`].
///
/// # Panics
/// As [`build`], and when the `.so` is not where cargo puts it.
pub fn plugin(package: &str) -> PathBuf {
    let so = build(&[package]).join(format!("lib{}.so", package.replace('-', "_")));
    assert!(
        so.is_file(),
        "cargo built {package} but {} is missing",
        so.display()
    );
    so
}

/// Every [`build`] / [`plugin`] package set the suite asks for, exactly as
/// the tests pass it (cargo's feature unification depends on the set, so a
/// build of the same packages in another grouping would not be the one the
/// test finds fresh). `scripts/test.sh` builds them all on the quiet
/// machine before the suite runs ([`build_all`]); a test still builds its
/// own on demand when something is missing or stale.
/// `every_fixture_build_of_the_suite_is_prebuilt` keeps this list honest.
pub const PACKAGE_SETS: &[&[&str]] = &[
    // agent_bins::bins
    &[
        "hotpatch-cli",
        "demo-target",
        "pricing-v1",
        "pricing-v2",
        "pricing-fix",
    ],
    &["hotpatch-cli", "hotpatch-agent-so"],
    &["hotpatch-cli"],
    &["hotpatch-cli", "canary-host", "canary-plugin"],
    &["gov-host"],
    &["gov-plugin"],
    &["plg-good"],
    &["plg-tls"],
    &["plg-abi99"],
    &["plg-init-fail"],
    &["plg-init-panic"],
    &["plg-noentry"],
    &["heap-leak"],
    &["heap-clean"],
    &["fx-foreign-jump"],
    &["fx-replacement"],
    &["sym-a"],
    &["sym-b"],
    &["sym-tls"],
    &["prof-work"],
    &["prof-tls"],
    &["prof-gone"],
    &["pricing-v1"],
];

/// Every [`example`] the suite runs: (package, example, features), as
/// tests/tests/examples.rs asks for them.
pub const EXAMPLES: &[(&str, &str, &[&str])] = &[
    ("hotpatch-patcher", "patch_function", &[]),
    ("hotpatch-patcher", "verify_patch", &["verify"]),
    ("hotpatch-symbolizer", "symbolize", &[]),
    ("hotpatch-loader", "load_plugin", &[]),
    ("hotpatch-profiler", "profile_plugin", &[]),
    ("hotpatch-sys", "loaded_modules", &[]),
    ("hotpatch-heap", "heap_profile", &[]),
    ("hotpatch-watch", "diff_builds", &[]),
    ("hotpatch-protocol", "wire", &[]),
    ("hotpatch-agent", "agent_status", &[]),
];

/// Builds every entry of [`PACKAGE_SETS`] and [`EXAMPLES`] the way the
/// tests do (same cargo invocation, same target directory), so that the
/// tests' own calls find them fresh, then the watch fixture's
/// dependencies ([`prebuild_watch_fixture`]). Prints one line per build
/// with its wall time.
///
/// # Panics
/// As [`build`], [`example`] and [`prebuild_watch_fixture`].
pub fn build_all() {
    for set in PACKAGE_SETS {
        let t = std::time::Instant::now();
        build(set);
        eprintln!("fixture {}: {:.1?}", set.join(" "), t.elapsed());
    }
    for (package, name, features) in EXAMPLES {
        let t = std::time::Instant::now();
        example(package, name, features);
        eprintln!("example {package} {name}: {:.1?}", t.elapsed());
    }
    let t = std::time::Instant::now();
    drop(prebuild_watch_fixture());
    eprintln!(
        "watch fixture dependencies ({WATCH_FIXTURE}): {:.1?}",
        t.elapsed()
    );
}

/// The watch fixture crate (`hotpatch watch` end to end), relative to the
/// workspace root: a cargo project of its own that depends on the agent.
pub const WATCH_FIXTURE: &str = "tests/fixtures/watch-fixture";

/// The target directory every build of the watch fixture shares:
/// `target/fixtures/watch-fixture-target`. Its dependencies (the agent and
/// all it pulls in, minutes of cold compiling) are built once, by
/// [`prebuild_watch_fixture`]; each test copy of the crate, at a fresh
/// path, is still compiled into it itself. `hotpatch watch` keeps its
/// state per build-id under `<dir>/hotpatch-watch/<build-id>/`, so runs
/// do not share it.
pub fn watch_fixture_target_dir() -> PathBuf {
    fixture_target_dir().join("watch-fixture-target")
}

/// Places a copy of [`WATCH_FIXTURE`] at `to` the way a user's checkout
/// would be: the agent dependency's placeholder replaced by this
/// workspace's `agent/`, the workspace's `Cargo.lock` beside it (the same
/// dependency versions, buildable offline). A file whose content is
/// already what it would write is left alone (its mtime too, so a
/// prebuilt copy stays fresh for cargo).
///
/// # Panics
/// When a file cannot be read or written.
pub fn place_watch_fixture(to: &Path) {
    let root = workspace_root();
    let mut files = Vec::new();
    list_files(&root.join(WATCH_FIXTURE), Path::new(""), &mut files);
    for rel in files {
        let mut bytes = std::fs::read(root.join(WATCH_FIXTURE).join(&rel)).expect("read fixture");
        if rel == Path::new("Cargo.toml") {
            let text = String::from_utf8(bytes).expect("manifest is UTF-8");
            bytes = text
                .replace(
                    "HOTPATCH_AGENT_PATH",
                    &root.join("agent").display().to_string(),
                )
                .into_bytes();
        }
        write_if_changed(&to.join(rel), &bytes);
    }
    let lock = std::fs::read(root.join("Cargo.lock")).expect("read Cargo.lock");
    write_if_changed(&to.join("Cargo.lock"), &lock);
}

fn list_files(dir: &Path, rel: &Path, out: &mut Vec<PathBuf>) {
    for e in std::fs::read_dir(dir.join(rel)).expect("read fixture dir") {
        let e = e.expect("fixture dir entry");
        let r = rel.join(e.file_name());
        if e.file_type().expect("file type").is_dir() {
            list_files(dir, &r, out);
        } else {
            out.push(r);
        }
    }
}

fn write_if_changed(path: &Path, bytes: &[u8]) {
    if std::fs::read(path).is_ok_and(|old| old == bytes) {
        return;
    }
    std::fs::create_dir_all(path.parent().expect("a file has a parent")).expect("mkdir");
    std::fs::write(path, bytes).expect("write fixture file");
}

/// The environment of every cargo (and `hotpatch`) run on the watch
/// fixture: the shared target dir, offline, and none of the outer build's
/// RUSTFLAGS (which would change every dependency's fingerprint, and the
/// prebuild is only reused when they match).
pub fn watch_fixture_env(c: &mut Command, target: &Path) {
    c.env("CARGO_TARGET_DIR", target)
        .env("CARGO_NET_OFFLINE", "true")
        .env_remove("RUSTFLAGS")
        .env_remove("CARGO_BUILD_RUSTFLAGS")
        .env_remove("CARGO_ENCODED_RUSTFLAGS");
}

/// The shared watch-fixture target dir, built; held exclusively (an
/// `flock`) until dropped. A test keeps it for its whole run: the fixture's
/// executable is one path in that dir (`debug/watch-fixture`), which the
/// watch tool reads back to capture its baseline, so a second run's build
/// must not replace it meanwhile.
#[derive(Debug)]
pub struct WatchTarget {
    /// The target dir ([`watch_fixture_target_dir`]).
    pub dir: PathBuf,
    _lock: File,
}

/// Builds a copy of the watch fixture, placed by [`place_watch_fixture`]
/// at `target/fixtures/watch-fixture-src`, with `cargo build` and
/// [`watch_fixture_env`], exactly as the test builds its own copy, so the
/// dependencies are built (or found fresh) in [`watch_fixture_target_dir`].
/// Cheap when they are fresh. Returns the dir, locked (see
/// [`WatchTarget`]): another process's call waits until it is dropped.
///
/// # Panics
/// When cargo fails, with its output.
pub fn prebuild_watch_fixture() -> WatchTarget {
    let dir = watch_fixture_target_dir();
    std::fs::create_dir_all(&dir).expect("create watch fixture target dir");
    let lock = File::create(fixture_target_dir().join(".watch-fixture-lock"))
        .expect("create watch fixture lock");
    // SAFETY: `lock` is an open file descriptor owned by this frame (then
    // by the returned `WatchTarget`); flock has no memory-safety
    // preconditions. The lock is released when the file is closed.
    let rc = unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) };
    assert_eq!(rc, 0, "flock: {}", std::io::Error::last_os_error());
    let src = fixture_target_dir().join("watch-fixture-src");
    place_watch_fixture(&src);
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    // Cargo reads `.cargo/config.toml` from the directories above its
    // working directory, not above the manifest: run from the temp dir,
    // where the test's copy lives, so this workspace's config (its
    // `force-frame-pointers` rustflags) is not read here either. Read, it
    // changes every dependency's hash and the test rebuilds them all.
    cmd.args(["build", "--quiet", "--manifest-path"])
        .arg(src.join("Cargo.toml"))
        .current_dir(reachable_tmp());
    watch_fixture_env(&mut cmd, &dir);
    let out = cmd.output().expect("spawn cargo");
    assert!(
        out.status.success(),
        "prebuilding the watch fixture failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    WatchTarget { dir, _lock: lock }
}

/// The temp directory, if other users can reach into it (every ancestor
/// searchable by others), else `/tmp`: tests run processes of other uids
/// from directories under it, wherever `TMPDIR` points.
pub fn reachable_tmp() -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let t = std::env::temp_dir();
    let reachable = t
        .ancestors()
        .all(|a| std::fs::metadata(a).is_ok_and(|m| m.permissions().mode() & 0o001 != 0));
    if reachable { t } else { PathBuf::from("/tmp") }
}

#[cfg(test)]
mod tests {
    use super::{EXAMPLES, PACKAGE_SETS, WATCH_FIXTURE, place_watch_fixture, workspace_root};

    /// The quoted strings of a `[...]` or `(...)` argument list starting at
    /// `s` (up to its closing bracket).
    fn quoted(s: &str) -> Vec<String> {
        let end = s.find([']', ')']).unwrap_or(s.len());
        s[..end]
            .split('"')
            .skip(1)
            .step_by(2)
            .map(str::to_owned)
            .collect()
    }

    fn sources(dir: &std::path::Path, out: &mut Vec<(String, String)>) {
        for e in std::fs::read_dir(dir).expect("read tests dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                sources(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                let text = std::fs::read_to_string(&p).expect("read source");
                out.push((p.display().to_string(), text));
            }
        }
    }

    /// A test that calls `fixtures::plugin("x")` or `fixtures::build(&[..])`
    /// with a set `scripts/test.sh` does not prebuild would build it under
    /// the CPU hog, in the middle of the suite: fail instead, naming it.
    #[test]
    fn every_fixture_build_of_the_suite_is_prebuilt() {
        let root = workspace_root();
        let mut files = Vec::new();
        sources(&root.join("tests/tests"), &mut files);
        sources(&root.join("tests/src"), &mut files);
        let known: Vec<Vec<String>> = PACKAGE_SETS
            .iter()
            .map(|s| s.iter().map(|p| (*p).to_owned()).collect())
            .collect();
        let mut missing = Vec::new();
        let mut seen = 0;
        for (path, text) in &files {
            if path.ends_with("src/fixtures.rs") {
                continue;
            }
            for (pat, is_set) in [("fixtures::plugin(", false), ("fixtures::build(&[", true)] {
                for (i, _) in text.match_indices(pat) {
                    let args = quoted(&text[i + pat.len()..]);
                    if args.is_empty() {
                        continue; // a variable: checked where it is defined
                    }
                    let set = if is_set { args } else { args[..1].to_vec() };
                    seen += 1;
                    if !known.contains(&set) {
                        missing.push(format!("{path}: {set:?}"));
                    }
                }
            }
        }
        assert!(
            seen >= 20,
            "found only {seen} fixture builds: the scan is broken"
        );
        assert!(
            missing.is_empty(),
            "add these to fixtures::PACKAGE_SETS:\n{}",
            missing.join("\n")
        );
    }

    #[test]
    fn every_example_the_suite_runs_is_prebuilt() {
        let text = std::fs::read_to_string(workspace_root().join("tests/tests/examples.rs"))
            .expect("read examples.rs");
        let mut missing = Vec::new();
        let mut seen = 0;
        for pat in ["run(", "run_with("] {
            for (i, _) in text.match_indices(pat) {
                let args = quoted(&text[i + pat.len()..]);
                if args.len() < 2 {
                    continue; // the helpers' own definitions
                }
                seen += 1;
                let features: Vec<&str> = args[2..].iter().map(String::as_str).collect();
                if !EXAMPLES
                    .iter()
                    .any(|(p, n, f)| *p == args[0] && *n == args[1] && *f == features.as_slice())
                {
                    missing.push(format!("{args:?}"));
                }
            }
        }
        assert!(seen >= 10, "found only {seen} examples: the scan is broken");
        assert!(
            missing.is_empty(),
            "add these to fixtures::EXAMPLES:\n{}",
            missing.join("\n")
        );
    }

    /// The prebuild and the test place the fixture the same way: the
    /// agent's placeholder replaced, the workspace's lock file beside it;
    /// placing it again changes no file (cargo would rebuild the prebuilt
    /// copy on every call otherwise).
    #[test]
    fn the_watch_fixture_is_placed_like_a_checkout_and_again_untouched() {
        let root = workspace_root();
        let dir = std::env::temp_dir().join(format!("hp-place-watch-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        place_watch_fixture(&dir);
        let manifest = std::fs::read_to_string(dir.join("Cargo.toml")).expect("manifest");
        assert!(!manifest.contains("HOTPATCH_AGENT_PATH"), "{manifest}");
        assert!(
            manifest.contains(&root.join("agent").display().to_string()),
            "{manifest}"
        );
        let lock = std::fs::read(dir.join("Cargo.lock")).expect("lock");
        assert_eq!(
            lock,
            std::fs::read(root.join("Cargo.lock")).expect("workspace lock")
        );
        let main = dir.join("src/main.rs");
        assert_eq!(
            std::fs::read(&main).expect("main.rs"),
            std::fs::read(root.join(WATCH_FIXTURE).join("src/main.rs")).expect("source")
        );
        let mtimes = |d: &std::path::Path| -> Vec<std::time::SystemTime> {
            ["Cargo.toml", "Cargo.lock", "src/main.rs"]
                .iter()
                .map(|f| {
                    std::fs::metadata(d.join(f))
                        .and_then(|m| m.modified())
                        .expect("mtime")
                })
                .collect()
        };
        let before = mtimes(&dir);
        // An edited copy is put back; an unchanged one is left as it is.
        std::fs::write(&main, "edited").expect("edit");
        let edited = mtimes(&dir);
        place_watch_fixture(&dir);
        assert_ne!(std::fs::read(&main).expect("main.rs"), b"edited");
        let after = mtimes(&dir);
        assert_eq!(before[..2], after[..2], "unchanged files were rewritten");
        assert!(after[2] >= edited[2]);
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// Every test that builds the watch fixture builds it into the shared,
    /// prebuilt target dir (a target dir of its own would compile every
    /// dependency cold, ten minutes and more under load), and
    /// `build-fixtures` prebuilds it.
    #[test]
    fn every_watch_fixture_build_uses_the_prebuilt_target() {
        let root = workspace_root();
        let mut files = Vec::new();
        sources(&root.join("tests/tests"), &mut files);
        let mut users = 0;
        for (path, text) in &files {
            if !text.contains("place_watch_fixture") && !text.contains("watch-fixture") {
                continue;
            }
            users += 1;
            assert!(
                text.contains("fixtures::prebuild_watch_fixture()"),
                "{path} builds the watch fixture without the prebuilt target dir"
            );
            assert!(
                !text.contains("\"CARGO_TARGET_DIR\""),
                "{path} sets a target dir of its own for the watch fixture"
            );
        }
        assert!(
            users >= 1,
            "no test builds the watch fixture: the scan is broken"
        );
        let own = std::fs::read_to_string(root.join("tests/src/fixtures.rs")).expect("read");
        let start = own.find("pub fn build_all()").expect("build_all");
        let body = &own[start..start + own[start..].find("\n}\n").expect("end")];
        assert!(
            body.contains("prebuild_watch_fixture()"),
            "build_all does not prebuild the watch fixture"
        );
    }
}
