//! Shared by the governance tests (`gov_*.rs`): the fixture plugins built
//! from source, and the constructor marker that proves whether any plugin
//! code ran.

#![allow(dead_code, reason = "each test binary uses a subset")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Mutex;

use hotpatch_loader::{Error, Plugin, Policy, load};
use hotpatch_tests::fixtures;
use hotpatch_tests::loader_fixtures::{TempDir, copy_with_mode};

/// `gov-plugin`: needs host API `>=1.0, <2`, shares `gov-shared` 1.0.0,
/// and its ELF constructor writes `<its path>.ctor-ran`.
pub fn gov_plugin() -> PathBuf {
    fixtures::plugin("gov-plugin")
}

/// `gov-host`: an executable declaring host API 1.3.0 and `gov-shared`
/// 1.0.0 in `.hotpatch_host`.
pub fn gov_host() -> PathBuf {
    let p = fixtures::build(&["gov-host"]).join("gov-host");
    assert!(p.is_file(), "{} missing", p.display());
    p
}

static DRIFT_LOCK: Mutex<()> = Mutex::new(());

/// `gov-plugin-drift`: the same plugin built in a workspace of its own
/// (tests/plugins/gov-plugin/drift, its own Cargo.lock) against
/// `gov-shared` 2.0.0. Built offline with the committed lock file.
pub fn drift_plugin() -> PathBuf {
    let _g = DRIFT_LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let root = fixtures::workspace_root();
    let target = root.join("target").join("fixtures-gov-drift");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(root.join("tests/plugins/gov-plugin/drift"))
        .args(["build", "--quiet", "--offline", "--locked", "--release"])
        .arg("--target-dir")
        .arg(&target)
        .output()
        .expect("spawn cargo");
    assert!(
        out.status.success(),
        "building the drift fixture failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let so = target.join("release/libgov_plugin_drift.so");
    assert!(so.is_file(), "{} missing", so.display());
    so
}

/// A private copy of `src` in `dir` (mode 0644), so each test has its own
/// signature file and constructor marker.
pub fn copy_plugin(src: &Path, dir: &TempDir, name: &str) -> PathBuf {
    copy_with_mode(src, &dir.join(name), 0o644)
}

/// Where the fixture's constructor leaves its marker for `so`.
pub fn marker(so: &Path) -> PathBuf {
    let mut s = so.as_os_str().to_owned();
    s.push(".ctor-ran");
    PathBuf::from(s)
}

/// Loads `so`, which must be refused with `code` before any of its code
/// ran (no constructor marker). Returns the error.
pub fn refused(so: &Path, policy: &Policy, code: &str) -> Error {
    let _ = std::fs::remove_file(marker(so));
    let e = match load(so, policy) {
        Ok(p) => panic!(
            "{} loaded but must be refused with {code}: {p:?}",
            so.display()
        ),
        Err(e) => e,
    };
    assert_eq!(e.code(), code, "{e}");
    assert!(
        !marker(so).exists(),
        "{code}: the plugin's constructor ran although the load was refused"
    );
    e
}

/// Loads `so`, which must succeed, and checks that its constructor ran
/// (the marker works, so its absence elsewhere means something).
pub fn loads(so: &Path, policy: &Policy) -> Plugin {
    let _ = std::fs::remove_file(marker(so));
    let p =
        load(so, policy).unwrap_or_else(|e| panic!("{} must load: {} {e}", so.display(), e.code()));
    assert!(
        marker(so).exists(),
        "the constructor marker is missing after a load"
    );
    p
}
