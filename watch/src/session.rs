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
    /// Before the build: the process's build-id, `cargo metadata` and the
    /// baseline objects (the last two once per [`Session`]).
    pub setup_ms: f64,
    /// `cargo build`.
    pub build_ms: f64,
    /// Reading the new objects and the executable's symbols, diffing, and
    /// the refusal checks (`exe_ms` and `check_ms` are parts of it).
    pub diff_ms: f64,
    /// Part of `diff_ms`: the running executable's symbols (read once per
    /// [`Session`] that keeps them, else only those the build names).
    pub exe_ms: f64,
    /// Part of `diff_ms`: the signature and layout checks (DWARF).
    pub check_ms: f64,
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
/// the bundle for the process `opts.pid` (a [`Session`] of one save).
///
/// # Errors
/// Every `E_WATCH_*` refusal of the build-and-diff half.
pub fn prepare(opts: &Options) -> Result<Prepared> {
    Session::new(opts.clone(), false).prepare()
}

/// Successive saves of one process: the cargo project, the baseline
/// objects and (when kept) the running executable's symbols are read once
/// per build-id of the process's executable, not once per save.
#[derive(Debug)]
pub struct Session {
    opts: Options,
    /// Keep the executable's full symbol table across saves (a long
    /// session); else each save reads only the symbols its build names.
    keep_exe: bool,
    project: Option<Project>,
    build_id: String,
    baseline: Option<ObjSet>,
    exe: Option<ExeSymbols>,
}

impl Session {
    /// A session for `opts.pid`; `keep_exe`: see [`Session`].
    pub fn new(opts: Options, keep_exe: bool) -> Session {
        Session {
            opts,
            keep_exe,
            project: None,
            build_id: String::new(),
            baseline: None,
            exe: None,
        }
    }

    /// The project, found once.
    ///
    /// # Errors
    /// As [`Project::find`] and [`exe_of`].
    pub fn project(&mut self) -> Result<&Project> {
        if self.project.is_none() {
            let (_, exe_name) = exe_of(self.opts.pid)?;
            self.project = Some(Project::find(
                self.opts.manifest_path.as_deref(),
                self.opts.package.as_deref(),
                &exe_name,
            )?);
        }
        self.project
            .as_ref()
            .ok_or_else(|| Error::new(crate::error::E_WATCH_NOTHING, "no project"))
    }

    /// Captures (or reads) the baseline of the process's build now: before
    /// the first edit is built over it.
    ///
    /// # Errors
    /// As [`Project::baseline`].
    pub fn baseline(&mut self) -> Result<()> {
        let t = Instant::now();
        let (exe_path, _) = exe_of(self.opts.pid)?;
        let build_id = crate::exe::build_id(&exe_path)?;
        trace("  build-id", t);
        if build_id != self.build_id {
            self.build_id = build_id;
            self.baseline = None;
            self.exe = None;
        }
        if self.baseline.is_some() {
            return Ok(());
        }
        self.project()?;
        trace("  cargo metadata", t);
        let build_id = self.build_id.clone();
        let project = self.project.as_ref().ok_or_else(|| io("project", "none"))?;
        let (set, read) = project.baseline(&build_id, || ExeSymbols::read(&exe_path))?;
        if self.keep_exe {
            self.exe = read;
        }
        trace("  baseline", t);
        self.baseline = Some(set);
        Ok(())
    }

    /// Rebuilds, diffs, checks and builds the bundle.
    ///
    /// # Errors
    /// Every `E_WATCH_*` refusal of the build-and-diff half.
    pub fn prepare(&mut self) -> Result<Prepared> {
        let t = Instant::now();
        let (exe_path, _) = exe_of(self.opts.pid)?;
        self.baseline()?;
        let setup_ms = ms(t);
        trace("build-id, cargo metadata, baseline", t);
        let project = self.project()?.clone();
        let t = Instant::now();
        project.build()?;
        let build_ms = ms(t);
        let t = Instant::now();
        let new = project.newest_objects()?;
        trace("read new objects", t);
        let baseline = self
            .baseline
            .as_ref()
            .ok_or_else(|| io("baseline", "none"))?;
        let te = Instant::now();
        let read;
        let exe: &ExeSymbols = match &self.exe {
            Some(e) => e,
            None if self.keep_exe => self.exe.insert(ExeSymbols::read(&exe_path)?),
            None => {
                // Only what this build and the baseline name: the same
                // scan without a `String` per symbol of the executable.
                let wanted: HashSet<&str> = new
                    .objs
                    .iter()
                    .chain(&baseline.objs)
                    .flat_map(|o| o.symbols.iter())
                    .filter(|s| s.is_named())
                    .map(|s| s.name.as_str())
                    .collect();
                read = ExeSymbols::read_only(&exe_path, &wanted)?;
                &read
            }
        };
        let exe_ms = ms(te);
        trace("the executable's symbols", te);
        let diff = bundle::diff(baseline, &new);
        trace("diff", t);
        check_statics(&diff, exe)?;
        let tl = Instant::now();
        let b = bundle::build(&new, &diff.changed, &exe.syms, &exe.build_id)?;
        let mut link_ms = ms(tl);
        let tc = Instant::now();
        let mut facts = Facts::load(&project, &exe.build_id);
        let checked = CheckImage::write(&b, &project, &exe.build_id).and_then(|image| {
            let r = check_signatures(
                &diff, baseline, &project, &exe_path, exe, &mut facts, &image,
            )
            .and_then(|()| {
                trace("signatures", t);
                check_layouts(&diff, &project, &exe_path, exe, &mut facts, &image)
            });
            image.remove();
            r
        });
        trace("layouts", t);
        facts.save(&project, &exe.build_id);
        checked?;
        let check_ms = ms(tc);
        let diff_ms = ms(t) - link_ms;
        let tw = Instant::now();
        let dir = project.state_dir(&exe.build_id);
        std::fs::create_dir_all(&dir).map_err(|e| io(dir.display(), e))?;
        let bundle_path = dir.join(format!("bundle-{}.json", std::process::id()));
        let text = serde_json::to_vec(&b).map_err(|e| io("bundle", e))?;
        std::fs::write(&bundle_path, text).map_err(|e| io(bundle_path.display(), e))?;
        link_ms += ms(tw);
        Ok(Prepared {
            project,
            diff,
            bundle: b,
            bundle_path,
            timings: Timings {
                setup_ms,
                build_ms,
                diff_ms,
                exe_ms,
                check_ms,
                link_ms,
            },
        })
    }
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

/// The new code's DWARF as the checks read it: the bundle's debug
/// sections (those of the objects the patch takes code from, which
/// describe every type and signature the new code was compiled against)
/// relocated against stand-in addresses and written as a small ELF file.
/// Reading it replaces reading the whole new executable's DWARF.
struct CheckImage {
    path: PathBuf,
    /// Stand-in address of each changed function (mangled).
    entries: HashMap<String, u64>,
}

impl CheckImage {
    fn write(b: &Bundle, project: &Project, build_id: &str) -> Result<CheckImage> {
        let mut at = 0x40_0000usize;
        let mut addr_of = Vec::with_capacity(b.sections.len());
        for s in &b.sections {
            let a = s.align.max(1) as usize;
            at = at.div_ceil(a) * a;
            addr_of.push(at);
            at += (s.size as usize).max(1);
        }
        let debug = crate::debug::relocate(b, &addr_of, &|_| None)?;
        let entries: HashMap<String, u64> = b
            .functions
            .iter()
            .map(|f| (f.name.clone(), (addr_of[f.section] as u64) + f.offset))
            .collect();
        let image = crate::debug::elf_image((0x40_0000, (at - 0x40_0000) as u64), &[], &debug, &[]);
        let dir = project.state_dir(build_id);
        std::fs::create_dir_all(&dir).map_err(|e| io(dir.display(), e))?;
        let path = dir.join(format!("check-{}.elf", std::process::id()));
        std::fs::write(&path, image).map_err(|e| io(path.display(), e))?;
        Ok(CheckImage { path, entries })
    }

    fn remove(self) {
        let _ = std::fs::remove_file(&self.path);
    }
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
    image: &CheckImage,
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
    let wanted: HashMap<String, u64> = stale_callers
        .iter()
        .filter_map(|(n, _)| image.entries.get(*n).map(|a| ((*n).clone(), *a)))
        .collect();
    let new = signatures_in_crate(&image.path, &project.src_path, &wanted).unwrap_or_default();
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
    image: &CheckImage,
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
    // The new layouts as the new code sees them: the types its objects
    // describe (a type none of them mentions is not one the new code
    // depends on).
    let Ok(new) = types_in_crate(&image.path, &project.src_path) else {
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
