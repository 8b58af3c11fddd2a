//! Building the demo's plugins from source, so the tour works from a fresh
//! clone with nothing but `cargo run --release -p demo-target`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// The plugin packages of the demo.
pub const PACKAGES: [&str; 3] = ["pricing-v1", "pricing-v2", "pricing-fix"];

/// The workspace root this binary was built from.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

/// The target directory holding this executable (`<target>/<profile>/exe`),
/// or `<workspace>/target`.
pub fn target_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent()?.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// `lib<package>.so` in `dir`.
pub fn so_in(dir: &Path, package: &str) -> PathBuf {
    dir.join(format!("lib{}.so", package.replace('-', "_")))
}

/// Builds the plugins with `cargo build --release` into a target directory
/// of their own (`<target>/demo-plugins`, so it never waits on the cargo
/// that runs us) and returns the directory holding the `.so` files.
///
/// # Errors
/// Cargo could not be run or failed; the message says how.
pub fn build() -> Result<PathBuf, String> {
    let target = target_dir().join("demo-plugins");
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(&cargo);
    cmd.current_dir(workspace_root())
        .args(["build", "--release", "--quiet"])
        .arg("--target-dir")
        .arg(&target);
    for p in PACKAGES {
        cmd.args(["-p", p]);
    }
    let status = cmd
        .status()
        .map_err(|e| format!("cannot run {}: {e}", Path::new(&cargo).display()))?;
    if !status.success() {
        return Err(format!("building the plugins failed ({status})"));
    }
    let dir = target.join("release");
    for p in PACKAGES {
        let so = so_in(&dir, p);
        if !so.is_file() {
            return Err(format!("cargo built {p} but {} is missing", so.display()));
        }
    }
    Ok(dir)
}
