//! The part outside the target: from a process id to a patch bundle.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use hotpatch_symbolizer::resolve::{DebugSearch, ElfSymbolizer};
use serde::Serialize;

use crate::bundle::{self, Bundle, Diff, display_name};
use crate::error::{
    E_WATCH_SIGNATURE_CHANGED, E_WATCH_STATIC_CHANGED, Error, Result, io,
};
use crate::exe::ExeSymbols;
use crate::objects::ObjSet;
use crate::project::Project;

/// What to watch.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// The process.
    pub pid: i32,
    /// `--manifest-path` (default: cargo's search from the current dir).
    pub manifest_path: Option<PathBuf>,
    /// `--package`.
    pub package: Option<String>,
}

/// Where the time went, milliseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Timings {
    /// `cargo build`.
    pub build_ms: f64,
    /// Reading both object sets and diffing them, with the refusal checks.
    pub diff_ms: f64,
    /// Building the bundle (the closure of the new code) and writing it.
    pub link_ms: f64,
}

/// A bundle ready for the agent.
#[derive(Debug)]
pub struct Prepared {
    /// The project.
    pub project: Project,
    /// The diff against the baseline.
    pub diff: Diff,
    /// The bundle.
    pub bundle: Bundle,
    /// Where it was written.
    pub bundle_path: PathBuf,
    /// Time spent.
    pub timings: Timings,
}

/// The executable of `pid` and its name as cargo knows it.
///
/// # Errors
/// `E_WATCH_IO` when the process is gone or not ours.
pub fn exe_of(pid: i32) -> Result<(PathBuf, String)> {
    let link = PathBuf::from(format!("/proc/{pid}/exe"));
    let target = std::fs::read_link(&link).map_err(|e| io(link.display(), e))?;
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let name = name.trim_end_matches(" (deleted)").to_owned();
    Ok((link, name))
}

/// Captures the baseline (if not yet), rebuilds, diffs, checks and builds
/// the bundle for the process `opts.pid`.
///
/// # Errors
/// Every `E_WATCH_*` refusal of the build-and-diff half.
pub fn prepare(opts: &Options) -> Result<Prepared> {
    let (exe_path, exe_name) = exe_of(opts.pid)?;
    let exe = ExeSymbols::read(&exe_path)?;
    let project = Project::find(
        opts.manifest_path.as_deref(),
        opts.package.as_deref(),
        &exe_name,
    )?;
    let baseline = project.baseline(&exe.build_id, &exe)?;
    let t = Instant::now();
    project.build()?;
    let build_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let new = project.newest_objects()?;
    let diff = bundle::diff(&baseline, &new);
    check_statics(&diff, &exe)?;
    check_signatures(&diff, &baseline, &exe_path, &project.binary(), &exe)?;
    let diff_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let names: HashSet<String> = exe.syms.keys().cloned().collect();
    let b = bundle::build(&new, &diff.changed, &names, &exe.build_id)?;
    let dir = project.state_dir(&exe.build_id);
    std::fs::create_dir_all(&dir).map_err(|e| io(dir.display(), e))?;
    let bundle_path = dir.join(format!("bundle-{}.json", std::process::id()));
    let text = serde_json::to_vec(&b).map_err(|e| io("bundle", e))?;
    std::fs::write(&bundle_path, text).map_err(|e| io(bundle_path.display(), e))?;
    let link_ms = t.elapsed().as_secs_f64() * 1e3;
    Ok(Prepared {
        project,
        diff,
        bundle: b,
        bundle_path,
        timings: Timings {
            build_ms,
            diff_ms,
            link_ms,
        },
    })
}

fn check_statics(diff: &Diff, exe: &ExeSymbols) -> Result<()> {
    let changed: Vec<String> = diff
        .statics_changed
        .iter()
        .filter(|n| exe.syms.contains_key(*n))
        .map(|n| display_name(n))
        .collect();
    if changed.is_empty() {
        return Ok(());
    }
    Err(Error::new(
        E_WATCH_STATIC_CHANGED,
        format!(
            "the type or initializer of {} changed: the running process's value cannot be migrated, so the old static is kept and nothing was applied (restart to take it)",
            changed.join(", ")
        ),
    ))
}

/// A changed function whose DWARF signature differs is refused unless
/// every function of the process that calls it changed too (and so comes
/// along, compiled against the new signature).
fn check_signatures(
    diff: &Diff,
    baseline: &ObjSet,
    old_exe: &Path,
    new_exe: &Path,
    exe: &ExeSymbols,
) -> Result<()> {
    let changed: Vec<&String> = diff
        .changed
        .iter()
        .filter(|n| exe.syms.contains_key(*n))
        .collect();
    if changed.is_empty() {
        return Ok(());
    }
    let search = DebugSearch::default();
    let (Ok(old), Ok(new)) = (
        ElfSymbolizer::open(old_exe, &search),
        ElfSymbolizer::open(new_exe, &search),
    ) else {
        return Ok(());
    };
    let sig = |s: &ElfSymbolizer, name: &str| {
        let sym = s.find_symbol(name).into_iter().find(|x| x.func)?;
        s.signature(sym.addr).ok().flatten()
    };
    let changed_set: HashSet<&str> = changed.iter().map(|s| s.as_str()).collect();
    for name in changed {
        let (Some(a), Some(b)) = (sig(&old, name), sig(&new, name)) else {
            continue;
        };
        let why = a.abi_mismatches(&b);
        if why.is_empty() {
            continue;
        }
        let stale: Vec<String> = callers(baseline, name)
            .into_iter()
            .filter(|c| !changed_set.contains(c.as_str()) && exe.syms.contains_key(c))
            .map(|c| display_name(&c))
            .collect();
        if !stale.is_empty() {
            return Err(Error::new(
                E_WATCH_SIGNATURE_CHANGED,
                format!(
                    "the signature of {} changed ({}) but its callers {} did not: they would pass the old arguments; nothing was applied",
                    display_name(name),
                    why.join("; ")
                        .replace("the target", "the old")
                        .replace("the replacement", "the new")
                        .replace("target ", "old ")
                        .replace("replacement ", "new "),
                    stale.join(", ")
                ),
            ));
        }
    }
    Ok(())
}

/// Functions of `set` with a relocation naming `callee`.
fn callers(set: &ObjSet, callee: &str) -> Vec<String> {
    let mut out = Vec::new();
    for (oi, o) in set.objs.iter().enumerate() {
        for (sec, named) in &o.named_in {
            let Some(s) = o.sections.get(*sec).and_then(Option::as_ref) else {
                continue;
            };
            if s.kind != crate::objects::SecKind::Code {
                continue;
            }
            let calls = s.relocs.iter().any(|r| {
                set.named_target(oi, r.sym, r.addend)
                    .is_some_and(|(n, _)| n == callee)
            });
            if calls {
                out.extend(named.iter().map(|&i| o.symbols[i].name.clone()));
            }
        }
    }
    out
}
