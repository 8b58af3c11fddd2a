//! The part outside the target: from a process id to a patch bundle.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Instant;

use hotpatch_symbolizer::signature::Signature;
use hotpatch_symbolizer::signatures_in::{CrateTypes, signatures_in_crate, types_in_crate};
use serde::Serialize;

use crate::bundle::{self, Bundle, Diff, display_name};
use crate::error::{
    E_WATCH_LAYOUT_CHANGED, E_WATCH_SIGNATURE_CHANGED, E_WATCH_STATIC_CHANGED, Error, Result, io,
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
    let t = Instant::now();
    let (exe_path, exe_name) = exe_of(opts.pid)?;
    let exe = ExeSymbols::read(&exe_path)?;
    trace("read the executable's symbols", t);
    let project = Project::find(
        opts.manifest_path.as_deref(),
        opts.package.as_deref(),
        &exe_name,
    )?;
    let baseline = project.baseline(&exe.build_id, &exe)?;
    trace("cargo metadata + baseline", t);
    let t = Instant::now();
    project.build()?;
    let build_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let new = project.newest_objects()?;
    trace("read new objects", t);
    let diff = bundle::diff(&baseline, &new);
    trace("diff", t);
    check_statics(&diff, &exe)?;
    let mut facts = Facts::load(&project, &exe.build_id);
    let checked = check_signatures(&diff, &baseline, &project, &exe_path, &exe, &mut facts)
        .and_then(|()| {
            trace("signatures", t);
            check_layouts(&diff, &project, &exe_path, &exe, &mut facts)
        });
    trace("layouts", t);
    facts.save(&project, &exe.build_id);
    checked?;
    let diff_ms = t.elapsed().as_secs_f64() * 1e3;
    let t = Instant::now();
    let b = bundle::build(&new, &diff.changed, &exe.syms, &exe.build_id)?;
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

/// What the DWARF checks read from the baseline executable, which depends
/// only on its build-id: cached in `target/hotpatch-watch/<build-id>/
/// facts.json`, so a save reads the DWARF of the new build only (the
/// running process's executable is read once per baseline, not per save).
#[derive(Debug, Default, Serialize, serde::Deserialize)]
struct Facts {
    /// The crate's type layouts and their users, once read.
    types: Option<CrateTypes>,
    /// Signatures by function (mangled); `None`: no subprogram found.
    signatures: HashMap<String, Option<Signature>>,
    #[serde(skip)]
    dirty: bool,
}

impl Facts {
    fn path(project: &Project, build_id: &str) -> PathBuf {
        project.state_dir(build_id).join("facts.json")
    }

    /// The cached facts, or none (a missing or unreadable cache is rebuilt).
    fn load(project: &Project, build_id: &str) -> Facts {
        std::fs::read(Self::path(project, build_id))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or_default()
    }

    /// Writes the facts if something was added (best effort: a cache that
    /// cannot be written is read again next time).
    fn save(&self, project: &Project, build_id: &str) {
        if !self.dirty || build_id.is_empty() {
            return;
        }
        let path = Self::path(project, build_id);
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        let Ok(text) = serde_json::to_vec(self) else {
            return;
        };
        if std::fs::create_dir_all(project.state_dir(build_id)).is_ok()
            && std::fs::write(&tmp, text).is_ok()
        {
            let _ = std::fs::rename(&tmp, &path);
        }
    }
}

/// With `HOTPATCH_WATCH_TRACE` set, prints the time since `t` to stderr.
fn trace(what: &str, t: Instant) {
    if std::env::var_os("HOTPATCH_WATCH_TRACE").is_some() {
        eprintln!(
            "hotpatch watch: {what}: {:.1} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
    }
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
    project: &Project,
    old_exe: &Path,
    exe: &ExeSymbols,
    facts: &mut Facts,
) -> Result<()> {
    let changed: Vec<&String> = diff
        .changed
        .iter()
        .filter(|n| exe.syms.contains_key(*n))
        .collect();
    if changed.is_empty() {
        return Ok(());
    }
    let changed_set: HashSet<&str> = changed.iter().map(|s| s.as_str()).collect();
    // Only functions with a caller in the process that did not change need
    // the (DWARF) check.
    let mut stale_callers: Vec<(&String, Vec<String>)> = Vec::new();
    for name in &changed {
        let stale: Vec<String> = callers(baseline, name)
            .into_iter()
            .filter(|c| !changed_set.contains(c.as_str()) && exe.syms.contains_key(c))
            .collect();
        if !stale.is_empty() {
            stale_callers.push((name, stale));
        }
    }
    if stale_callers.is_empty() {
        return Ok(());
    }
    let t = Instant::now();
    let new_exe = project.binary();
    let wanted: HashSet<&str> = stale_callers.iter().map(|(n, _)| n.as_str()).collect();
    let new_syms = ExeSymbols::read_only(&new_exe, &wanted)?;
    trace("  new executable's symbols", t);
    let entries = |syms: &ExeSymbols| -> HashMap<String, u64> {
        stale_callers
            .iter()
            .filter_map(|(n, _)| syms.syms.get(*n).map(|s| ((*n).clone(), s.value)))
            .collect()
    };
    let sigs = |path: &Path, syms: &ExeSymbols| {
        signatures_in_crate(path, &project.src_path, &entries(syms)).unwrap_or_default()
    };
    // The baseline's signatures: from the cache, the missing ones read now.
    let missing: HashMap<String, u64> = stale_callers
        .iter()
        .filter(|(n, _)| !facts.signatures.contains_key(*n))
        .filter_map(|(n, _)| exe.syms.get(*n).map(|s| ((*n).clone(), s.value)))
        .collect();
    if !missing.is_empty() {
        let mut read =
            signatures_in_crate(old_exe, &project.src_path, &missing).unwrap_or_default();
        for n in missing.keys() {
            facts.signatures.insert(n.clone(), read.remove(n));
        }
        facts.dirty = true;
    }
    let old: HashMap<String, Signature> = stale_callers
        .iter()
        .filter_map(|(n, _)| {
            facts
                .signatures
                .get(*n)
                .cloned()
                .flatten()
                .map(|s| ((*n).clone(), s))
        })
        .collect();
    trace("  old signatures", t);
    let new = sigs(&new_exe, &new_syms);
    trace("  new signatures", t);
    for (name, stale) in &stale_callers {
        let (Some(a), Some(b)) = (old.get(*name), new.get(*name)) else {
            continue;
        };
        let why = a.abi_mismatches(b);
        if why.is_empty() {
            continue;
        }
        let stale: Vec<String> = stale.iter().map(|c| display_name(c)).collect();
        return Err(Error::new(
            E_WATCH_SIGNATURE_CHANGED,
            format!(
                "the signature of {} changed from `{a}` to `{b}` ({}) but its callers {} did not: they would pass the old arguments; nothing was applied",
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
    Ok(())
}

/// A type whose size or member offsets changed is refused while a function
/// of the process that uses it (DWARF: parameters, variables, through
/// pointers) did not change: it would read the new values with the old
/// layout.
fn check_layouts(
    diff: &Diff,
    project: &Project,
    old_exe: &Path,
    exe: &ExeSymbols,
    facts: &mut Facts,
) -> Result<()> {
    if diff.changed.is_empty() {
        return Ok(());
    }
    if facts.types.is_none() {
        let Ok(t) = types_in_crate(old_exe, &project.src_path) else {
            return Ok(());
        };
        facts.types = Some(t);
        facts.dirty = true;
    }
    let Some(old) = facts.types.as_ref() else {
        return Ok(());
    };
    let Ok(new) = types_in_crate(&project.binary(), &project.src_path) else {
        return Ok(());
    };
    let changed: HashSet<&str> = diff.changed.iter().map(String::as_str).collect();
    let mut names: Vec<&String> = old.layouts.keys().collect();
    names.sort();
    for q in names {
        let (Some(a), Some(b)) = (old.layouts.get(q), new.layouts.get(q)) else {
            continue;
        };
        if a == b {
            continue;
        }
        if std::env::var_os("HOTPATCH_WATCH_TRACE").is_some() {
            eprintln!(
                "hotpatch watch: layout of {q} changed: {a:?} -> {b:?}; users {:?}",
                old.users.get(q)
            );
        }
        let mut users: Vec<String> = old
            .users
            .get(q)
            .into_iter()
            .flatten()
            .filter(|f| !changed.contains(f.as_str()) && exe.syms.contains_key(*f))
            .map(|f| display_name(f))
            .collect();
        // The crate's own functions first: what the user wrote.
        let own = format!("{}::", project.crate_name);
        users.sort_by_key(|u| (!u.starts_with(&own), u.clone()));
        users.dedup();
        if users.is_empty() {
            continue;
        }
        let what = if a.size != b.size {
            format!(
                "its size went from {} to {} bytes",
                a.size.map_or("?".into(), |s| s.to_string()),
                b.size.map_or("?".into(), |s| s.to_string())
            )
        } else {
            "its members moved".to_owned()
        };
        let shown: Vec<&str> = users.iter().take(3).map(String::as_str).collect();
        return Err(Error::new(
            E_WATCH_LAYOUT_CHANGED,
            format!(
                "the layout of {q} changed ({what}) but code that uses it did not change: {}{}; it would read the values with the old layout, so nothing was applied (restart to take it)",
                shown.join(", "),
                if users.len() > 3 {
                    format!(" and {} more", users.len() - 3)
                } else {
                    String::new()
                }
            ),
        ));
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
