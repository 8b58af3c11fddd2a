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
    dir.join("fixture")
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
