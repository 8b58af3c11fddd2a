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
/// tests' own calls find them fresh. Prints one line per build with its
/// wall time.
///
/// # Panics
/// As [`build`] and [`example`].
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
}

#[cfg(test)]
mod tests {
    use super::{EXAMPLES, PACKAGE_SETS, workspace_root};

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
}
