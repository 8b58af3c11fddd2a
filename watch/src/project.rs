//! The user's cargo project: which binary the process runs, the baseline
//! objects of that build, and rebuilding it.
//!
//! The baseline is captured from cargo's own incremental cache: a dev build
//! keeps each codegen unit's object in
//! `target/debug/incremental/<crate>-<hash>/s-<session>/*.o`. When the
//! binary on disk is still the one the process runs (same build-id), those
//! objects are the ones it was linked from; they are copied to
//! `target/hotpatch-watch/<build-id>/baseline/` before anything is rebuilt,
//! and checked against the process's symbol table (every function they
//! define that the executable has must have the same size there).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::error::{
    E_WATCH_BASELINE_MISMATCH, E_WATCH_BUILD, E_WATCH_NO_OBJECTS, E_WATCH_NOTHING, Error, Result,
    io,
};
use crate::exe::ExeSymbols;
use crate::objects::{ObjSet, SymKind};

/// The binary a process runs, in its cargo project.
#[derive(Debug, Clone)]
pub struct Project {
    /// `Cargo.toml` of the package.
    pub manifest: PathBuf,
    /// Package name.
    pub package: String,
    /// Binary target name.
    pub bin: String,
    /// Crate name of the binary (`-` → `_`).
    pub crate_name: String,
    /// Cargo's target directory.
    pub target_dir: PathBuf,
    /// Profile directory under it (`debug`).
    pub profile_dir: String,
    /// The binary's root source file (absolute), which names its DWARF
    /// compile units.
    pub src_path: PathBuf,
}

fn sh(what: &str, cmd: &mut Command) -> Result<std::process::Output> {
    cmd.output().map_err(|e| io(what, e))
}

impl Project {
    /// Finds the package and binary of the executable `exe_name` (file
    /// name of `/proc/PID/exe`) with `cargo metadata`.
    ///
    /// # Errors
    /// `E_WATCH_NOTHING` when no binary target of the package (or of the
    /// workspace) has that name; `E_WATCH_IO`.
    pub fn find(manifest: Option<&Path>, package: Option<&str>, exe_name: &str) -> Result<Project> {
        let mut cmd = Command::new(cargo());
        cmd.args(["metadata", "--format-version", "1", "--no-deps"]);
        if let Some(m) = manifest {
            cmd.arg("--manifest-path").arg(m);
        }
        let out = sh("cargo metadata", &mut cmd)?;
        if !out.status.success() {
            return Err(Error::new(
                E_WATCH_BUILD,
                format!(
                    "cargo metadata failed: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ),
            ));
        }
        let v: serde_json::Value =
            serde_json::from_slice(&out.stdout).map_err(|e| io("cargo metadata output", e))?;
        let target_dir = PathBuf::from(v["target_directory"].as_str().unwrap_or("target"));
        for p in v["packages"].as_array().into_iter().flatten() {
            let name = p["name"].as_str().unwrap_or_default();
            if package.is_some_and(|want| want != name) {
                continue;
            }
            for t in p["targets"].as_array().into_iter().flatten() {
                let is_bin = t["kind"]
                    .as_array()
                    .is_some_and(|k| k.iter().any(|k| k == "bin"));
                if is_bin && t["name"].as_str() == Some(exe_name) {
                    return Ok(Project {
                        manifest: PathBuf::from(p["manifest_path"].as_str().unwrap_or_default()),
                        package: name.to_owned(),
                        bin: exe_name.to_owned(),
                        crate_name: exe_name.replace('-', "_"),
                        target_dir,
                        profile_dir: "debug".to_owned(),
                        src_path: PathBuf::from(t["src_path"].as_str().unwrap_or_default()),
                    });
                }
            }
        }
        Err(Error::new(
            E_WATCH_NOTHING,
            format!(
                "no binary target named {exe_name} in this cargo project (use --manifest-path/--package)"
            ),
        ))
    }

    /// The binary cargo writes.
    pub fn binary(&self) -> PathBuf {
        self.target_dir.join(&self.profile_dir).join(&self.bin)
    }

    /// Where watch keeps the baseline of build `build_id`.
    pub fn state_dir(&self, build_id: &str) -> PathBuf {
        self.target_dir.join("hotpatch-watch").join(build_id)
    }

    /// Session directories of the binary's incremental cache, newest first.
    fn sessions(&self) -> Vec<PathBuf> {
        let inc = self.target_dir.join(&self.profile_dir).join("incremental");
        let prefix = format!("{}-", self.crate_name);
        let mut out: Vec<(std::time::SystemTime, PathBuf)> = Vec::new();
        for d in std::fs::read_dir(&inc).into_iter().flatten().flatten() {
            let name = d.file_name().to_string_lossy().into_owned();
            if !name.starts_with(&prefix) {
                continue;
            }
            for s in std::fs::read_dir(d.path()).into_iter().flatten().flatten() {
                let sn = s.file_name().to_string_lossy().into_owned();
                if !sn.starts_with("s-") || sn.ends_with("-working") || sn.ends_with(".lock") {
                    continue;
                }
                if let Ok(m) = s.metadata().and_then(|m| m.modified()) {
                    out.push((m, s.path()));
                }
            }
        }
        out.sort_by_key(|b| std::cmp::Reverse(b.0));
        out.into_iter().map(|(_, p)| p).collect()
    }

    /// The newest objects of the binary's crate (after a build).
    ///
    /// # Errors
    /// `E_WATCH_NO_OBJECTS`, and those of [`ObjSet::read_dir`].
    pub fn newest_objects(&self) -> Result<ObjSet> {
        let s = self
            .sessions()
            .into_iter()
            .next()
            .ok_or_else(|| self.no_objects())?;
        ObjSet::read_dir(&s)
    }

    fn no_objects(&self) -> Error {
        Error::new(
            E_WATCH_NO_OBJECTS,
            format!(
                "no incremental objects of {} under {}: hotpatch watch needs a dev-profile build with incremental compilation (cargo's default)",
                self.crate_name,
                self.target_dir
                    .join(&self.profile_dir)
                    .join("incremental")
                    .display()
            ),
        )
    }

    /// The baseline objects of build `build_id` (the process's), captured
    /// now if they were not already. `exe` reads the process's symbols,
    /// which a capture checks the objects against (returned when read).
    ///
    /// # Errors
    /// `E_WATCH_BASELINE_MISMATCH` when they cannot be known: the binary on
    /// disk is another build and none was captured for this one, or the
    /// objects do not match the process's symbols; those of `exe`.
    pub fn baseline(
        &self,
        build_id: &str,
        exe: impl FnOnce() -> Result<ExeSymbols>,
    ) -> Result<(ObjSet, Option<ExeSymbols>)> {
        let dir = self.state_dir(build_id).join("baseline");
        if dir.join("complete").is_file() {
            return Ok((ObjSet::read_dir(&dir)?, None));
        }
        let on_disk = crate::exe::build_id(&self.binary()).unwrap_or_default();
        if on_disk != build_id {
            return Err(Error::new(
                E_WATCH_BASELINE_MISMATCH,
                format!(
                    "the process runs build {build_id}, {} is build {} and no baseline was captured for the process's build: restart it (cargo run) and start hotpatch watch before editing",
                    self.binary().display(),
                    if on_disk.is_empty() {
                        "(none)"
                    } else {
                        &on_disk
                    }
                ),
            ));
        }
        let exe = exe()?;
        for s in self.sessions() {
            let set = ObjSet::read_dir(&s)?;
            if set.objs.is_empty() || !matches_exe(&set, &exe) {
                continue;
            }
            let tmp = self.state_dir(build_id).join("baseline.tmp");
            let _ = std::fs::remove_dir_all(&tmp);
            std::fs::create_dir_all(&tmp).map_err(|e| io(tmp.display(), e))?;
            for o in &set.objs {
                let to = tmp.join(o.path.file_name().unwrap_or_default());
                std::fs::copy(&o.path, &to).map_err(|e| io(to.display(), e))?;
            }
            std::fs::write(tmp.join("complete"), b"").map_err(|e| io(tmp.display(), e))?;
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::rename(&tmp, &dir).map_err(|e| io(dir.display(), e))?;
            return Ok((set, Some(exe)));
        }
        if self.sessions().is_empty() {
            return Err(self.no_objects());
        }
        Err(Error::new(
            E_WATCH_BASELINE_MISMATCH,
            format!(
                "the incremental objects of {} do not match the running executable's symbols",
                self.crate_name
            ),
        ))
    }

    /// `cargo build` of the binary, as the user's `cargo build`/`cargo run`
    /// does it (same profile, default features). Returns the compiler's
    /// output on failure, as an `E_WATCH_BUILD` error.
    ///
    /// # Errors
    /// `E_WATCH_BUILD`, `E_WATCH_IO`.
    pub fn build(&self) -> Result<()> {
        let mut cmd = Command::new(cargo());
        cmd.arg("build")
            .arg("--manifest-path")
            .arg(&self.manifest)
            .args([
                "-p",
                &self.package,
                "--bin",
                &self.bin,
                "--message-format",
                "short",
            ]);
        let out = sh("cargo build", &mut cmd)?;
        if !out.status.success() {
            let text = String::from_utf8_lossy(&out.stderr);
            let msg: Vec<&str> = text
                .lines()
                .filter(|l| {
                    let t = l.trim_start();
                    !t.starts_with("Compiling") && !t.starts_with("Blocking") && !t.is_empty()
                })
                .collect();
            return Err(Error::new(
                E_WATCH_BUILD,
                format!(
                    "the build failed; nothing was changed in the process:\n{}",
                    msg.join("\n")
                ),
            ));
        }
        Ok(())
    }
}

/// Every function of the set that the executable defines has the same size
/// there (what a relink of these objects would give).
fn matches_exe(set: &ObjSet, exe: &ExeSymbols) -> bool {
    let mut seen = 0;
    for (name, d) in &set.defs {
        let s = set.sym(*d);
        if s.kind != SymKind::Func {
            continue;
        }
        if let Some(e) = exe.syms.get(name) {
            if e.size != s.size {
                return false;
            }
            seen += 1;
        }
    }
    seen > 0
}

fn cargo() -> String {
    std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned())
}
