//! Captures the version of the compiler building this crate, so that the
//! descriptor a plugin embeds and the check the host makes compare the same
//! string, produced the same way.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-env-changed=RUSTC");
    let rustc = std::env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let out = Command::new(&rustc)
        .arg("--version")
        .output()
        .expect("run `$RUSTC --version`");
    assert!(out.status.success(), "`$RUSTC --version` failed");
    let version = String::from_utf8(out.stdout).expect("rustc --version prints UTF-8");
    let version = version.trim();
    assert!(
        !version.is_empty() && version.len() < 128,
        "unexpected rustc version string {version:?}"
    );
    println!("cargo:rustc-env=HOTPATCH_RUSTC_VERSION={version}");
}
